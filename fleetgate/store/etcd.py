"""Fleet-wide coordination in etcd: several gateway replicas, one fleet.

Keys, under the configured prefix P (default "/fleetgate/"):

    P/replicas/RID            this replica is alive (under its lease)
    P/m/NAME/holds/RID        RID holds NAME with N sessions (under RID's lease: a dead
                              replica's holds vanish after the lease TTL)
    P/m/NAME/gen              bumped by every hold registration (its mod revision is what
                              a stop claim compares against)
    P/m/NAME/start            the start claim: the one replica that calls Backend.start, until
                              {"until": t} (boot_timeout + cleanup + margin). NOT under the
                              replica's lease: a starter cut off from etcd longer than its TTL
                              is still starting, and a second start must not begin meanwhile.
                              A claim past its deadline is stale and may be taken over (txn on
                              its mod revision); if its replica died, wakes wait until then.
    P/m/NAME/stop             the stop claim: the one replica that calls Backend.stop (same rules,
                              deadline 2 x stop_timeout + margin)
    P/m/NAME/state            {"state": running|stopping|stopped|failed|unknown, "at": unix time, ...}
                              (written with the stop claim too: a replica that saw it running
                              at an older revision can no longer register a hold on that)
    P/m/NAME/keep             {"until": unix time}: a keep-awake lease

Decisions are transactions that compare revisions, never timing:
- start claim: create `start` iff `start` and `stop` are absent and `state` is unchanged
  since the claimer read it;
- hold registration: put `holds/RID` and bump `gen` iff `stop` is absent;
- stop claim: create `stop` iff `start` and `stop` are absent and `gen` is unchanged since
  the claimer saw no holds — a hold registered meanwhile makes the claim fail.

The store keeps a mirror of P/m/ (a range, then a watch) for status and waits; every
decision re-reads or compares in etcd.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Callable

import trio

from .base import MachineView, Store, StoreConfig, StoreUnavailable
from .client import KV, Compare, Delete, Put, prefix_end

log = logging.getLogger(__name__)


class EtcdStore(Store):
    shared = True

    def __init__(self, kv, config: StoreConfig, *, metrics=None, clock: Callable[[], float] = time.time):
        self.kv = kv
        self.config = config
        self.prefix = config.prefix if config.prefix.endswith("/") else config.prefix + "/"
        self.replica = config.replica or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.metrics = metrics
        self._clock = clock
        self.lease = 0
        self.healthy = False
        self.healthy_since: float | None = None      # trio time the store last became healthy
        self.last_ok = 0.0                            # trio time of the last successful keep-alive
        self.on_lease_lost: Callable[[], None] | None = None
        self._raw: dict[str, KV] = {}
        self.revision = 0
        self.changed = trio.Event()
        self.health_changed = trio.Event()            # set (and replaced) when `healthy` flips
        self.ops = 0                                  # etcd requests made (the benchmark reads it)
        if hasattr(kv, "observe"):
            kv.observe = self._observe
        if metrics is not None:
            metrics.store_up.set(0)
            metrics.replica_info.info({"replica": self.replica, "store": "etcd"})

    # -- plumbing --------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def _observe(self, op: str, seconds: float, ok: bool) -> None:
        self.ops += 1
        if self.metrics is not None:
            self.metrics.store_ops.labels(op, "ok" if ok else "error").observe(seconds)

    def _set_health(self, ok: bool) -> None:
        if ok and not self.healthy:
            self.healthy_since = trio.current_time()
            log.info("store healthy replica=%s", self.replica)
        elif not ok and self.healthy:
            log.warning("store unavailable replica=%s: no stop will happen; wakes of stopped machines are refused",
                        self.replica)
        if ok != self.healthy:
            self.health_changed.set()
            self.health_changed = trio.Event()
        self.healthy = ok
        if self.metrics is not None:
            self.metrics.store_up.set(1 if ok else 0)

    def healthy_for(self) -> float:
        """Seconds the store has been continuously healthy (0 if not healthy)."""
        if not self.healthy or self.healthy_since is None:
            return 0.0
        return trio.current_time() - self.healthy_since

    def lease_alive(self) -> bool:
        """Our lease was renewed less than a TTL ago (so the holds under it still exist in etcd)."""
        return bool(self.lease) and trio.current_time() - self.last_ok < self.config.lease_ttl

    def _k(self, name: str, leaf: str) -> str:
        return f"{self.prefix}m/{name}/{leaf}"

    def _json(self, **kw) -> bytes:
        return json.dumps(kw, sort_keys=True).encode()

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the replica's lease alive and the mirror current, for as long as the gateway runs.

        Starts (task_status.started) after a first attempt whatever its outcome: a gateway
        comes up with etcd down, serves what it safely can, and recovers when etcd returns.
        """
        with trio.move_on_after(self.config.timeout * 2 + 1):
            await self._ensure_lease()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive_loop)
                nursery.start_soon(self._mirror_loop)
                task_status.started()
        finally:
            # A clean shutdown (after the drain) gives its holds back at once instead of after the TTL.
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.timeout):
                try:
                    if self.lease:
                        await self.kv.lease_revoke(self.lease)
                except StoreUnavailable:
                    pass
                await self.kv.aclose()

    async def _ensure_lease(self) -> bool:
        try:
            lease = await self.kv.lease_grant(self.config.lease_ttl)
            await self.kv.txn([], [Put(f"{self.prefix}replicas/{self.replica}",
                                       self._json(replica=self.replica, host=socket.gethostname(), pid=os.getpid()),
                                       lease)])
        except StoreUnavailable as exc:
            log.warning("store: cannot get a lease: %s", exc)
            self._set_health(False)
            return False
        old, self.lease = self.lease, lease
        self.last_ok = trio.current_time()
        self._set_health(True)
        log.info("store lease granted replica=%s lease=%x ttl=%ds", self.replica, lease, self.config.lease_ttl)
        if old:
            # Our earlier lease expired (etcd unreachable or paused past the TTL): every hold we
            # had is gone in etcd. Register them again under the new lease.
            log.warning("store lease lost replica=%s: re-registering holds", self.replica)
            if self.metrics is not None:
                self.metrics.store_lease_lost.inc()
            if self.on_lease_lost is not None:
                self.on_lease_lost()
        return True

    async def _keepalive_loop(self) -> None:
        interval = max(0.2, self.config.lease_ttl / 3)
        while True:
            await trio.sleep(interval)
            if not self.lease:
                await self._ensure_lease()
                continue
            try:
                ttl = await self.kv.lease_keepalive(self.lease)
            except StoreUnavailable as exc:
                if self.healthy:
                    log.warning("store keep-alive failed: %s", exc)
                self._set_health(False)
                continue
            if ttl <= 0:
                await self._ensure_lease()  # expired while we could not reach etcd
                continue
            self.last_ok = trio.current_time()
            self._set_health(True)

    async def _mirror_loop(self) -> None:
        """A range of P/m/ then a watch from the next revision; on any break, again."""
        prefix = f"{self.prefix}m/"
        while True:
            try:
                rev, kvs = await self.kv.range(prefix, prefix_end(prefix))
                self._raw = {k.key: k for k in kvs}
                self.revision = rev
                self._notify()
                async for events in self.kv.watch(prefix, prefix_end(prefix), rev + 1):
                    for typ, kv in events:
                        if typ == "DELETE":
                            self._raw.pop(kv.key, None)
                        else:
                            self._raw[kv.key] = kv
                        self.revision = max(self.revision, kv.mod_revision)
                    self._notify()
            except StoreUnavailable as exc:
                log.debug("store mirror: %s", exc)
            except Exception:  # never let a bug here take the gateway down
                log.exception("store mirror failed")
            await trio.sleep(0.5)

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_change(self, timeout: float) -> None:
        """Until the mirror changes, or timeout (callers re-read etcd then: a watch can break)."""
        with trio.move_on_after(timeout):
            await self.changed.wait()

    # -- views -----------------------------------------------------------------------------

    def _view_from(self, name: str, revision: int, kvs) -> MachineView:
        v = MachineView(name, revision)
        base = self._k(name, "")
        for kv in kvs:
            leaf = kv.key[len(base):]
            if leaf.startswith("holds/"):
                try:
                    v.holds[leaf[6:]] = max(1, int(kv.value or b"1"))
                except ValueError:
                    v.holds[leaf[6:]] = 1
            elif leaf in ("start", "stop"):
                setattr(v, f"{leaf}_rev", kv.mod_revision)
                try:
                    claim = json.loads(kv.value)
                except ValueError:
                    claim = {}
                if float(claim.get("until", 0)) > self.now():  # a stale claim is no claim
                    setattr(v, leaf, claim.get("replica", "?"))
            elif leaf == "state":
                try:
                    v.state = json.loads(kv.value)
                except ValueError:
                    v.state = None
                v.state_rev = kv.mod_revision
            elif leaf == "gen":
                v.gen_rev = kv.mod_revision
            elif leaf == "keep":
                try:
                    v.keep_until = float(json.loads(kv.value).get("until", 0))
                except ValueError:
                    pass
        return v

    def view(self, name: str) -> MachineView:
        """The mirror's (possibly stale) view: for status, waits and pre-checks, never decisions."""
        base = self._k(name, "")
        return self._view_from(name, self.revision, [kv for k, kv in self._raw.items() if k.startswith(base)])

    async def snapshot(self, name: str) -> MachineView:
        """The machine as etcd has it now (a linearizable read)."""
        base = self._k(name, "")
        rev, kvs = await self.kv.range(base, prefix_end(base))
        return self._view_from(name, rev, kvs)

    # -- decisions ---------------------------------------------------------------------------

    def _claim_compares(self, name: str, seen: MachineView) -> list[Compare]:
        """No claim, or only the stale ones we saw (by mod revision): nobody claimed since `seen`."""
        assert not seen.start and not seen.stop, "live claims are waited for, never taken over"
        return [Compare(self._k(name, "start"), "MOD", "EQUAL", seen.start_rev),
                Compare(self._k(name, "stop"), "MOD", "EQUAL", seen.stop_rev)]

    async def claim_start(self, name: str, seen: MachineView, seconds: float) -> bool:
        ops: list = [Put(self._k(name, "start"), self._json(replica=self.replica, at=self.now(),
                                                           until=self.now() + seconds))]
        if seen.stop_rev:
            ops.append(Delete(self._k(name, "stop")))  # stale: its replica died or lost its way
        ok, _ = await self.kv.txn(self._claim_compares(name, seen)
                                  + [Compare(self._k(name, "state"), "MOD", "EQUAL", seen.state_rev)], ops)
        return ok

    async def finish_start(self, name: str, state: str, **info) -> int:
        """Record the outcome of our start and drop our claim; returns the state key's new revision."""
        ops = [Put(self._k(name, "state"), self._json(state=state, at=self.now(), by=self.replica, **info))]
        # Delete the claim only if it is still ours (it is under our lease; it could have expired).
        start_key = self._k(name, "start")
        rev, kvs = await self.kv.range(start_key)
        ours = bool(kvs) and json.loads(kvs[0].value).get("replica") == self.replica
        if ours:
            ops.append(Delete(start_key))
            _, rev = await self.kv.txn([Compare(start_key, "MOD", "EQUAL", kvs[0].mod_revision)], ops, ops[:1])
        else:
            _, rev = await self.kv.txn([], ops)
        return rev

    async def register_hold(self, name: str, sessions: int, state_rev: int) -> bool:
        """Hold the machine for this replica's sessions; False if a stop claim is in place or the
        machine's state changed since this replica saw it running (state_rev: then it was stopped)."""
        ok, _ = await self.kv.txn(
            [Compare(self._k(name, "stop"), "CREATE", "EQUAL", 0),
             Compare(self._k(name, "state"), "MOD", "EQUAL", state_rev)],
            [Put(self._k(name, f"holds/{self.replica}"), str(max(1, sessions)).encode(), self.lease),
             Put(self._k(name, "gen"), self.replica.encode())])
        return ok

    async def drop_hold(self, name: str) -> None:
        await self.kv.txn([], [Delete(self._k(name, f"holds/{self.replica}"))])

    async def claim_stop(self, name: str, seen: MachineView, seconds: float, *, force: bool = False) -> bool:
        """The one replica that stops the machine: only if nobody holds it since `seen`."""
        if seen.start or seen.stop:
            return False
        compares = self._claim_compares(name, seen)
        if not force:
            if seen.holds:
                return False
            compares.append(Compare(self._k(name, "gen"), "MOD", "EQUAL", seen.gen_rev))
        # The state changes with the claim, so every replica's "I saw it running at revision R"
        # is void from here on (even if our claim expires before we record the outcome).
        ops: list = [
            Put(self._k(name, "stop"), self._json(replica=self.replica, at=self.now(), until=self.now() + seconds)),
            Put(self._k(name, "state"), self._json(state="stopping", at=self.now(), by=self.replica))]
        if seen.start_rev:
            ops.append(Delete(self._k(name, "start")))
        ok, _ = await self.kv.txn(compares, ops)
        return ok

    async def finish_stop(self, name: str, state: str, *, end_keep: bool = False, **info) -> None:
        ops = [Put(self._k(name, "state"), self._json(state=state, at=self.now(), by=self.replica, **info)),
               Delete(self._k(name, "stop"))]
        if end_keep:
            ops.append(Delete(self._k(name, "keep")))
        await self.kv.txn([], ops)

    async def put_keep(self, name: str, until: float) -> float:
        current = self.view(name).keep_until
        until = max(until, current)
        await self.kv.txn([], [Put(self._k(name, "keep"), self._json(until=until))])
        return until

    async def replicas(self) -> list[str]:
        base = f"{self.prefix}replicas/"
        _, kvs = await self.kv.range(base, prefix_end(base), serializable=True)
        return sorted(k.key[len(base):] for k in kvs)
