"""An in-memory etcd with the EtcdClient interface, for MockClock-driven multi-replica tests.

The semantics fleetgate relies on, and only those: revisions (create/mod), txn compares on
CREATE / MOD / VALUE, leases that expire on trio's clock (deleting their keys), and watches
that see every change in order. `up = False` makes every call raise StoreUnavailable (etcd
unreachable or without quorum); the real cluster is exercised by tests/test_ha_e2e.py.
"""

from __future__ import annotations

from dataclasses import replace

import trio

from fleetgate.store.base import StoreUnavailable
from fleetgate.store.client import KV, Compare, Put


class FakeCluster:
    def __init__(self) -> None:
        self.revision = 1
        self.data: dict[str, KV] = {}
        self.leases: dict[int, tuple[int, float]] = {}  # id -> (ttl, expiry)
        self.next_lease = 0x1000
        self.up = True
        self.changed = trio.Event()
        self.log: list[tuple[int, str, KV]] = []  # (revision, type, kv) for watchers

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def expire(self) -> None:
        now = trio.current_time()
        dead = [lid for lid, (_, exp) in self.leases.items() if exp <= now]
        if not dead:
            return
        self.revision += 1
        for lid in dead:
            del self.leases[lid]
            for k, kv in list(self.data.items()):
                if kv.lease == lid:
                    del self.data[k]
                    self.log.append((self.revision, "DELETE", replace(kv, mod_revision=self.revision)))
        self._notify()

    async def expiry_loop(self) -> None:
        while True:
            self.expire()
            await trio.sleep(0.25)

    def client(self) -> "FakeEtcd":
        return FakeEtcd(self)


class FakeEtcd:
    def __init__(self, cluster: FakeCluster):
        self.c = cluster
        self.up = True   # this replica's own link to etcd
        self.observe = None
        self.calls = 0

    async def _enter(self, op: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if self.observe is not None:
            self.observe(op, 0.0, self.c.up and self.up)
        if not (self.c.up and self.up):
            raise StoreUnavailable("fake etcd is down")
        self.c.expire()

    async def range(self, key, range_end=None, *, serializable=False):
        await self._enter("range")
        if range_end is None:
            kvs = [self.c.data[key]] if key in self.c.data else []
        else:
            kvs = [kv for k, kv in sorted(self.c.data.items()) if key <= k < range_end]
        return self.c.revision, kvs

    def _check(self, c: Compare) -> bool:
        kv = self.c.data.get(c.key)
        if c.target == "CREATE":
            actual = kv.create_revision if kv else 0
        elif c.target == "MOD":
            actual = kv.mod_revision if kv else 0
        else:
            actual = kv.value if kv else b""
        return {"EQUAL": actual == c.value, "NOT_EQUAL": actual != c.value,
                "GREATER": actual > c.value, "LESS": actual < c.value}[c.result]

    async def txn(self, compares, success, failure=()):
        await self._enter("txn")
        ok = all(self._check(c) for c in compares)
        ops = success if ok else failure
        if ops:
            self.c.revision += 1
            rev = self.c.revision
            for o in ops:
                if isinstance(o, Put):
                    if o.lease and o.lease not in self.c.leases:
                        raise StoreUnavailable("lease not found")
                    old = self.c.data.get(o.key)
                    kv = KV(o.key, o.value, old.create_revision if old else rev, rev, o.lease)
                    self.c.data[o.key] = kv
                    self.c.log.append((rev, "PUT", kv))
                else:
                    keys = [o.key] if o.range_end is None else [k for k in self.c.data if o.key <= k < o.range_end]
                    for k in keys:
                        if k in self.c.data:
                            kv = self.c.data.pop(k)
                            self.c.log.append((rev, "DELETE", replace(kv, mod_revision=rev)))
            self.c._notify()
        return ok, self.c.revision

    async def lease_grant(self, ttl):
        await self._enter("lease_grant")
        self.c.next_lease += 1
        self.c.leases[self.c.next_lease] = (ttl, trio.current_time() + ttl)
        return self.c.next_lease

    async def lease_keepalive(self, lease):
        await self._enter("lease_keepalive")
        if lease not in self.c.leases:
            return 0
        ttl, _ = self.c.leases[lease]
        self.c.leases[lease] = (ttl, trio.current_time() + ttl)
        return ttl

    async def lease_revoke(self, lease):
        await self._enter("lease_revoke")
        if lease in self.c.leases:
            self.c.leases[lease] = (0, trio.current_time())
            self.c.expire()

    async def aclose(self):
        pass

    async def watch(self, key, range_end, start_revision):
        await self._enter("watch")
        pos = start_revision
        while True:
            if not (self.c.up and self.up):
                raise StoreUnavailable("fake etcd is down")
            batch = [(t, kv) for rev, t, kv in self.c.log if rev >= pos and key <= kv.key < range_end]
            if batch:
                pos = self.c.revision + 1
                yield batch
            else:
                pos = max(pos, self.c.revision + 1)
                with trio.move_on_after(1.0):
                    await self.c.changed.wait()
