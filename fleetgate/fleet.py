"""The Fleet owns every machine's state; it is the only place a state changes.

Why it looks like this:
- One start per machine however many clients arrive: the first waiter creates a wake
  that runs in the Fleet's own nursery, so a client that gives up (Ctrl-C, timeout)
  cancels only its own wait, never the boot the others are waiting for.
- Sessions are counted by leases taken synchronously once the machine is running; the
  reaper's "no session" check and its transition to `stopping` happen in the same
  synchronous step, so no connection can slip in between (trio runs one task at a time).
- Times come from trio's clock so tests can drive them with MockClock.
- With several replicas (`[store] type = "etcd"`), the same rules hold fleet-wide: the start,
  the stop and session holds become etcd transactions (the "shared store" section below,
  fleetgate/store/etcd.py, docs/ha.md). With the default in-process store none of that runs.
"""

from __future__ import annotations

import collections
import enum
import logging
import secrets
import statistics
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, TypeVar

import trio

from . import probe
from .errors import WakeError
from .backends.base import Address, Backend, BackendError, PowerState
from .config import MachineConfig
from .metrics import Metrics
from .store import MemoryStore, Store, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[str], None]

PROGRESS_INTERVAL = 2.0
STORE_WAIT = 1.0        # shared store: re-read etcd at least this often while waiting on another replica
HOLD_RETRY_MAX = 2.0    # shared store: backoff cap for registering/dropping a hold in the background
STORE_PATIENCE = 5.0    # shared store: how long a wake retries etcd before refusing (elections take ~1-2 s)
CLAIM_MARGIN = 45.0     # shared store: a start/stop claim outlives the call by this (cleanup stop 30 s + clock skew)
FAILURE_COOLDOWN = 5.0
RECONCILE_CALL_TIMEOUT = 30.0
RECONCILE_CONCURRENCY = 16  # default [gateway] status_concurrency: status calls at once per backend
RECONCILE_PACE = 1.0        # a spread reconcile starts its calls in steps of this many seconds
RECONCILE_SLICE = 100       # calls that never checkpoint (process backend): yield after this many
RECONCILE_LOG_ERRORS = 3    # per backend and pass: the first failures logged one by one, then a count
RECONCILABLE = ("unknown", "running", "stopped")  # states a status answer may change
BOOT_HISTORY = 10


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass
class _Wake:
    done: trio.Event = field(default_factory=trio.Event)
    error: WakeError | None = None
    started: float = 0.0
    cause: str = "login"  # fleetgate_wakes_total{cause}: login, keep_awake, schedule, passthrough


class Machine:
    def __init__(self, config: MachineConfig, backend: Backend):
        self.config = config
        self.name = config.name
        self.backend = backend
        self.state = State.UNKNOWN
        self.sessions = 0
        self.last_activity = 0.0
        self.started_at = 0.0
        self.address: Address | None = None
        self.boot_history: collections.deque[float] = collections.deque(maxlen=BOOT_HISTORY)
        self.wake: _Wake | None = None
        self.failure: WakeError | None = None
        self.failed_at = 0.0
        self.changed = trio.Event()           # set (and replaced) on every state change
        self.sessions_changed = trio.Event()  # set (and replaced) on every lease taken or released
        self.start_calls = 0
        self.stop_calls = 0
        self.keep_until = 0.0
        self.stop_error: str | None = None
        self.pending_backend: Backend | None = None
        # shared store only: this replica's hold key in etcd ("absent", "present" or "maybe")
        self.hold = "absent"
        self.hold_lock = trio.Lock()
        self.hold_syncing = False
        self.seen_running = False
        self.state_rev: int | None = None  # the store's state revision when we last saw it running
        self.finishing = False             # our "running" is still being recorded in etcd (retrying)
        # The backend cannot tell this machine's state (an HTTP API without status_url): since
        # when. It may be running (a gateway restart forgot it), so the reaper stops it when idle.
        self.unknown_since: float | None = None
        self.powered_since: float | None = None  # trio time the running-seconds counter was last brought up to

    def typical_boot(self) -> float | None:
        return statistics.median(self.boot_history) if self.boot_history else None


class Lease:
    """A session's hold on a running machine; release() is idempotent."""

    def __init__(self, fleet: "Fleet", machine: Machine):
        self._fleet = fleet
        self.machine = machine
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._fleet._release(self.machine)


class Fleet:
    def __init__(self, machines: Mapping[str, MachineConfig], backends: Mapping[str, Backend],
                 metrics: Metrics, nursery: trio.Nursery,
                 ready_probe: Callable[[Address], Awaitable[object]] | None = None,
                 store: Store | None = None):
        self.metrics = metrics
        # The store decides fleet-wide (several replicas, etcd) or not at all (memory: this
        # process is the fleet and every rule below is applied in its own memory, as always).
        self.store = store if store is not None else MemoryStore()
        self.shared = self.store.shared
        if self.shared:
            self.store.on_lease_lost = self._store_lease_lost
        self._ready_probe = ready_probe
        self._nursery = nursery
        self.machines: dict[str, Machine] = {}
        # Machines the reaper and the scrape must look at (powered, in use, kept awake, or maybe
        # running): idle work is proportional to these, not to the whole fleet (issue 15).
        # Added on every change that can make a machine need it; the reaper drops the ones that
        # no longer do (awake_needed).
        self.awake: set[Machine] = set()
        metrics.before_scrape.append(self.refresh_series)
        self.apply(machines, backends)

    def apply(self, machines: Mapping[str, MachineConfig], backends: Mapping[str, Backend]) -> None:
        """The config at start, or a reloaded one: new machines join, changed ones take their new settings.

        A running machine keeps the backend instance that started it until it stops (so
        the right one stops it); a machine no longer in the config is left to the reaper
        with its last settings, and no new connection is routed to it.
        """
        for name, mc in machines.items():
            backend = backends[mc.backend]
            backend.on_machine_exited = self.machine_exited
            backend.on_request = (lambda op, cls, _b=backend.name:
                                  self.metrics.backend_requests.labels(_b, op, cls).inc())
            backend.on_state_write_error = lambda kind: self.metrics.state_write_errors.labels(kind).inc()
            m = self.machines.get(name)
            if m is None:
                self.machines[name] = Machine(mc, backend)
                self.metrics.add_machine(name, backend.name)
                self.metrics.set_state(name, State.UNKNOWN.value)
                log.info("machine added machine=%s backend=%s", name, backend.name)
                continue
            m.config = mc
            if m.backend is not backend:
                if m.state in (State.STOPPED, State.FAILED, State.UNKNOWN):
                    m.backend = backend
                else:
                    m.pending_backend = backend
        self.configured = set(machines)
        for name in set(self.machines) - set(machines):
            if self.machines[name].state in (State.STOPPED, State.UNKNOWN, State.FAILED) \
                    and not self.machines[name].sessions:
                self.forget(name)
                continue
            log.warning("machine removed from config machine=%s state=%s sessions=%d: no new connections; "
                        "the reaper stops it when idle", name, self.machines[name].state.value,
                        self.machines[name].sessions)

    def forget(self, name: str) -> None:
        """A machine left the config and runs no more: drop it and its per-machine series."""
        m = self.machines.pop(name)
        self.awake.discard(m)
        log.info("machine forgotten machine=%s (removed from the config, %s)", name, m.state.value)
        self.metrics.remove_machine(name)

    def awake_needed(self, m: Machine) -> bool:
        """Whether the machine still belongs in `awake`: something about it changes with time alone."""
        return (m.state.value not in ("stopped", "failed", "unknown") or bool(m.sessions)
                or m.keep_until > trio.current_time() or m.powered_since is not None
                or (m.state is State.UNKNOWN and m.unknown_since is not None))

    def refresh_series(self) -> None:
        """Before a scrape: the per-machine series that move with time alone (running seconds, last
        activity while in use, keep-awake leases that expired), for the machines in `awake` only."""
        for m in self.awake:
            self.account_running(m)
            self._update_lease_gauge(m)

    def account_running(self, m: Machine) -> None:
        """Bring fleetgate_machine_running_seconds_total up to now (state changes and scrapes)."""
        now = trio.current_time()
        if m.powered_since is not None:
            self.metrics.machine_running_seconds.labels(m.name).inc(max(0.0, now - m.powered_since))
        m.powered_since = now if m.state in (State.STARTING, State.RUNNING, State.STOPPING) else None
        if m.sessions:
            self.metrics.machine_last_activity.labels(m.name).set(time.time())

    # -- state ---------------------------------------------------------------------------

    def _set_state(self, m: Machine, state: State) -> None:
        if m.state is not state:
            log.info("machine state machine=%s %s -> %s", m.name, m.state.value, state.value)
            m.state = state
            self.account_running(m)
            m.unknown_since = None
            if state is State.STOPPED and m.pending_backend is not None:
                m.backend, m.pending_backend = m.pending_backend, None
            self.metrics.set_state(m.name, state.value)
            self.awake.add(m)
            m.changed.set()
            m.changed = trio.Event()

    async def _call(self, m: Machine, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        return await self._call_backend(m.backend, op, fn)

    async def _call_backend(self, backend: Backend, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """A backend call, timed and counted by backend, operation and result (a machine's
        call goes through _call; status_all is for no machine in particular)."""
        t0 = trio.current_time()
        result = "error"
        try:
            value = await fn()
            result = "ok"
            return value
        finally:
            self.metrics.backend_calls.labels(backend.name, op, result).observe(trio.current_time() - t0)

    async def reconcile(self, *, concurrency: int = RECONCILE_CONCURRENCY, spread: float = 0.0) -> None:
        """Ask every backend for the real state; adopted running machines get a full idle grace.

        Backends are asked side by side. One that can answer for all its machines at once
        (Backend.status_all: one command, one API request) is asked once; the others per
        machine, at most `concurrency` calls at a time per backend, so 10 000 machines take
        10 000 / concurrency call durations, not 10 000. With `spread` (the periodic
        reconcile: its interval) the calls start evenly over that many seconds instead of in
        one burst, so a status command per machine costs a steady share of a core that logins
        do not feel, rather than seconds of every core at once.

        A backend call is a checkpoint: if the machine's state changed meanwhile (a wake or
        a stop of ours began), our answer is stale and that machine is left alone.
        """
        groups: dict[Backend, list[Machine]] = {}
        for m in self.machines.values():
            if m.state.value in RECONCILABLE:
                groups.setdefault(m.backend, []).append(m)
        async with trio.open_nursery() as nursery:
            for backend, machines in groups.items():
                nursery.start_soon(self._reconcile_backend, backend, machines, max(1, concurrency), spread)

    async def _reconcile_backend(self, backend: Backend, machines: list[Machine], concurrency: int,
                                 spread: float) -> None:
        errors = [0]
        if backend.can_status_all():
            before = {m: m.state for m in machines}
            try:
                with trio.fail_after(RECONCILE_CALL_TIMEOUT):
                    answers = await self._call_backend(backend, "status", lambda: backend.status_all(
                        [m.config for m in machines]))
            except Exception as exc:  # a lying, failing or hanging backend must not stop the gateway
                log.warning("status of all machines failed backend=%s machines=%d error=%r", backend.name,
                            len(machines), exc)
                return
            rest = []
            for i, m in enumerate(machines):
                power = answers.get(m.name)
                if power is None:
                    rest.append(m)  # left out of the answer: asked alone, below
                elif m.state is before[m] and m.backend is backend and self.machines.get(m.name) is m:
                    await self._reconcile_one(m, power, errors)
                if i % RECONCILE_SLICE == RECONCILE_SLICE - 1:
                    await trio.lowlevel.checkpoint()
            machines = rest
        if not machines:
            return
        # A few workers over one list: no task per machine (cheap backends answer without a
        # checkpoint, so the workers also yield every RECONCILE_SLICE machines).
        todo = iter(enumerate(machines))
        start = trio.current_time()
        step = spread / len(machines)

        async def worker() -> None:
            done = 0
            for i, m in todo:
                if step:  # in steps of RECONCILE_PACE: few wake-ups however many machines
                    due = start + (i * step) // RECONCILE_PACE * RECONCILE_PACE
                    if due > trio.current_time():
                        await trio.sleep_until(due)
                if m.state.value in RECONCILABLE and m.backend is backend and self.machines.get(m.name) is m:
                    await self._reconcile_one(m, None, errors)
                done += 1
                if done % RECONCILE_SLICE == 0:
                    await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(machines))):
                nursery.start_soon(worker)
        if errors[0] > RECONCILE_LOG_ERRORS:
            log.warning("status failed backend=%s machines=%d (the first %d logged above)", backend.name,
                        errors[0], RECONCILE_LOG_ERRORS)

    async def _reconcile_one(self, m: Machine, power: PowerState | None, errors: list[int]) -> None:
        """One machine's status (asked now, or `power` from a status_all answer) applied to its state."""
        before = m.state
        address = None
        if power is None or (power is PowerState.RUNNING and before is not State.RUNNING):
            try:  # (a status_all answer that changes nothing costs no scope: 10 000 of them a pass)
                with trio.fail_after(RECONCILE_CALL_TIMEOUT):
                    if power is None:
                        power = await self._call(m, "status", lambda: m.backend.status(m.config))
                    address = (await self._call(m, "address", lambda: m.backend.address(m.config))
                               if power is PowerState.RUNNING and before is not State.RUNNING else None)
            except Exception as exc:  # a lying, failing or hanging backend must not stop the gateway
                errors[0] += 1
                if errors[0] <= RECONCILE_LOG_ERRORS:
                    log.warning("status failed machine=%s backend=%s error=%r", m.name, m.backend.name, exc)
                return
            if m.state is not before:
                return
        if power is PowerState.UNKNOWN and before is State.UNKNOWN and m.unknown_since is None:
            m.unknown_since = trio.current_time()
            self.awake.add(m)  # the reaper stops it when idle
            log.info("machine state cannot be read machine=%s backend=%s: treated as maybe running, "
                     "stopped when idle (after idle_timeout and min_uptime)", m.name, m.backend.name)
        if power is PowerState.RUNNING and before is not State.RUNNING:
            m.address = address
            m.started_at = m.last_activity = trio.current_time()
            self.metrics.machine_last_activity.labels(m.name).set(time.time())
            log.info("adopted running machine=%s (full idle grace)", m.name)
            self._set_state(m, State.RUNNING)
        elif power is PowerState.STOPPED and before is not State.STOPPED:
            if before is State.RUNNING:
                log.warning("machine stopped outside fleetgate machine=%s sessions=%d", m.name, m.sessions)
                self.metrics.machine_lost.labels(m.backend.name).inc()
            self._set_state(m, State.STOPPED)

    # -- waking --------------------------------------------------------------------------

    def progress_line(self, m: Machine, elapsed: float | None) -> str:
        typical = m.typical_boot()
        usual = f", usually ~{typical:.0f} s" if typical is not None else ""
        note = m.backend.progress_note(m.config)
        note = f" ({note})" if note else ""
        if elapsed is None:
            return f"fleetgate: starting {m.name} ({m.backend.config.type}){usual}{note}"
        return f"fleetgate: starting {m.name} ({m.backend.config.type}) ... {elapsed:.0f} s{usual}{note}"

    async def acquire(self, name: str, progress: Progress | None = None, cause: str = "login") -> Lease:
        """Wait until the machine runs (waking it if needed) and hold it with a lease.

        `cause` labels the wake this may start (login, passthrough, keep_awake)."""
        m = self.machines[name]
        said_stopping = False
        while True:
            if m.state is State.RUNNING:
                if not self.shared:
                    return self._lease(m)
                lease = await self._shared_hold(m)
                if lease is not None:
                    return lease
                continue
            if m.state is State.STOPPING:
                if progress and not said_stopping:
                    progress(f"fleetgate: {m.name} is stopping; it will be started again for you")
                    said_stopping = True
                await m.changed.wait()
                if m.state is State.UNKNOWN and m.stop_error:
                    self.metrics.wake_failures.labels(m.backend.name, "stop_failed").inc()
                    raise WakeError("stop_failed", f"fleetgate: {m.name} was being stopped and the stop failed "
                                                   f"({m.stop_error}); try again in a moment")
                continue
            if m.state is State.FAILED:
                left = self._cooldown_left(m)
                if left > 0:
                    assert m.failure is not None
                    self.metrics.wake_failures.labels(m.backend.name, "cooldown").inc()
                    raise WakeError("cooldown", f"{m.failure.message}; fleetgate retries in {left:.0f} s")
            if m.state in (State.STOPPED, State.FAILED, State.UNKNOWN):
                self._begin_wake(m, cause)
            await self._wait_wake(m, progress)

    def _begin_wake(self, m: Machine, cause: str) -> None:
        m.wake = _Wake(started=trio.current_time(), cause=cause)
        self._set_state(m, State.STARTING)
        self._nursery.start_soon(self._run_shared_wake if self.shared else self._run_wake, m, m.wake)

    async def _wait_wake(self, m: Machine, progress: Progress | None) -> None:
        wake = m.wake
        assert wake is not None
        if progress:
            progress(self.progress_line(m, None))
        while not wake.done.is_set():
            with trio.move_on_after(PROGRESS_INTERVAL):
                await wake.done.wait()
            if progress and not wake.done.is_set():
                progress(self.progress_line(m, trio.current_time() - wake.started))
        if wake.error is not None:
            raise wake.error

    async def _probe_ready(self, m: Machine, address: Address, since: float | None = None) -> None:
        """Wait for the machine's SSH banner (unbounded: the caller's scope bounds it).

        The probe is paced by the machine's usual boot (probe.Pacing): `since` is when its
        start call began, so the probe is told how long is usually still to go (None: no
        start of ours, no expectation)."""
        if self._ready_probe is not None:   # tests: a fake readiness
            await self._ready_probe(address)
            return
        typical = m.typical_boot()
        expected = None
        if typical is not None and since is not None:
            expected = max(0.0, typical - (trio.current_time() - since))
        await probe.wait_for_banner(address, expected)

    async def _run_wake(self, m: Machine, wake: _Wake) -> None:
        t0 = trio.current_time()
        cfg = m.config
        bname = m.backend.name
        error: WakeError | None = None
        try:
            with trio.fail_after(cfg.boot_timeout):
                m.start_calls += 1
                await self._call(m, "start", lambda: m.backend.start(cfg))
                address = await self._call(m, "address", lambda: m.backend.address(cfg))
                await self._probe_ready(m, address, since=t0)
        except trio.TooSlowError:
            error = WakeError("boot_timeout", f"fleetgate: {m.name} did not answer within {cfg.boot_timeout:g} s")
        except BackendError as exc:
            error = WakeError(exc.reason, f"fleetgate: {m.name} could not be started: {exc}")
            error.error_id, error.detail = exc.error_id, exc.detail
        except Exception as exc:  # a buggy backend is a failed wake, not a dead gateway
            eid = secrets.token_hex(4)  # its text may hold anything: the user gets an id, the log the detail
            log.exception("backend raised machine=%s backend=%s error_id=%s", m.name, bname, eid)
            error = WakeError("start_error", f"fleetgate: {m.name} could not be started: "
                                             f"internal error in the {bname} backend (error id {eid})")
            error.error_id, error.detail = eid, f"{type(exc).__name__}: {exc}"
        now = trio.current_time()
        if error is None:
            latency = now - t0
            m.boot_history.append(latency)
            m.address = address
            m.started_at = m.last_activity = now
            self.metrics.machine_last_activity.labels(m.name).set(time.time())
            self.metrics.boot_latency.labels(bname).observe(latency)
            self.metrics.wakes.labels(bname, "success", wake.cause).inc()
            log.info("machine ready machine=%s backend=%s boot_seconds=%.2f address=%s", m.name, bname, latency, address)
            if self.shared:
                # Record "running" (and drop our start claim) before anyone uses it, so the other
                # replicas adopt it and their reapers see it; if etcd does not answer, retry later.
                self.metrics.store_claims.labels("start", "performed").inc()
                m.state_rev = None
                try:
                    m.state_rev = await self.store.finish_start(m.name, "running", address=str(address))
                except StoreUnavailable:
                    async def finish() -> None:
                        try:
                            m.state_rev = await self.store.finish_start(m.name, "running", address=str(address))
                        finally:
                            m.finishing = m.state_rev is None and m.finishing
                        self._kick_hold_sync(m)

                    m.finishing = True
                    self._nursery.start_soon(self._store_retry, "finish start", m.name, finish)
            self._set_state(m, State.RUNNING)
            wake.done.set()
            return
        self.metrics.wakes.labels(bname, "failure", wake.cause).inc()
        if error.reason == "boot_timeout":  # so that the histogram's p95 does not leave the slowest out
            self.metrics.boot_latency.labels(bname).observe(now - t0)
        self.metrics.wake_failures.labels(bname, error.reason).inc()
        log.warning("wake failed machine=%s backend=%s reason=%s seconds=%.2f error_id=%s detail=%s",
                    m.name, bname, error.reason, now - t0, getattr(error, "error_id", None) or "-",
                    getattr(error, "detail", None) or error.message)  # the detail only operators see
        m.failure, m.failed_at = error, now
        wake.error = error
        wake.done.set()
        # Leave nothing half-booted behind; while we clean up, arrivals wait (state stopping).
        self._set_state(m, State.STOPPING)
        with trio.move_on_after(30):
            try:
                m.stop_calls += 1
                await self._call(m, "stop", lambda: m.backend.stop(cfg))
            except Exception as exc:
                log.warning("cleanup stop failed machine=%s error=%s", m.name, exc)
        self._set_state(m, State.FAILED)
        if self.shared:
            await self._store_retry("finish start", m.name,
                                    lambda: self.store.finish_start(m.name, "failed", message=error.message))

    # -- sessions ------------------------------------------------------------------------

    def try_acquire(self, name: str) -> Lease | None:
        """A lease without waiting, only if the machine is running now."""
        m = self.machines[name]
        if self.shared and m.hold != "present":
            return None  # no hold of ours in etcd to join: another replica could be claiming a stop
        return self._lease(m) if m.state is State.RUNNING else None

    def _lease(self, m: Machine) -> Lease:
        m.sessions += 1
        self.awake.add(m)
        m.last_activity = trio.current_time()
        self.metrics.active_sessions.labels(m.name).set(m.sessions)
        self._sessions_changed(m)
        self.metrics.machine_last_activity.labels(m.name).set(time.time())
        return Lease(self, m)

    def _release(self, m: Machine) -> None:
        m.sessions -= 1
        assert m.sessions >= 0, m.name
        if m.sessions == 0:
            m.last_activity = trio.current_time()
            self.metrics.machine_last_activity.labels(m.name).set(time.time())
            if self.shared:
                self._kick_hold_sync(m)  # never blocks: release() is called from asyncio callbacks
        self.metrics.active_sessions.labels(m.name).set(m.sessions)
        self._sessions_changed(m)

    @staticmethod
    def _sessions_changed(m: Machine) -> None:
        m.sessions_changed.set()
        m.sessions_changed = trio.Event()

    @staticmethod
    async def wait_sessions(m: Machine, count: int) -> None:
        """Wait until the machine holds exactly `count` sessions (callers bound the wait)."""
        while m.sessions != count:
            await m.sessions_changed.wait()

    def machine_exited(self, name: str) -> None:
        """A backend saw the machine die by itself: the next connection wakes it again."""
        m = self.machines.get(name)
        if m is None or m.state is not State.RUNNING:
            return
        log.warning("machine exited by itself machine=%s backend=%s sessions=%d", m.name, m.backend.name, m.sessions)
        self.metrics.machine_lost.labels(m.backend.name).inc()
        self._set_state(m, State.STOPPED)

    async def machine_lost(self, name: str) -> None:
        """Upstream could not be reached on a machine we thought running: ask the backend."""
        m = self.machines[name]
        if m.state is not State.RUNNING:
            return
        try:
            power = await self._call(m, "status", lambda: m.backend.status(m.config))
        except Exception:
            power = PowerState.UNKNOWN
        if power is not PowerState.RUNNING and m.state is State.RUNNING:
            log.warning("machine died under fleetgate machine=%s sessions=%d power=%s", m.name, m.sessions, power.value)
            self.metrics.machine_lost.labels(m.backend.name).inc()
            self._set_state(m, State.STOPPED if power is PowerState.STOPPED else State.UNKNOWN)

    # -- keep-awake ---------------------------------------------------------------------

    def keep_awake(self, name: str, seconds: float) -> float:
        """Hold a machine up for `seconds` from now (and wake it if stopped); returns the expiry."""
        m = self.machines[name]
        until = trio.current_time() + seconds
        m.keep_until = max(m.keep_until, until)
        self.awake.add(m)
        self._update_lease_gauge(m)
        log.info("keep-awake machine=%s seconds=%.0f", m.name, seconds)
        if self.shared:
            until_store = self.store.now() + seconds
            self._nursery.start_soon(self._store_retry, "keep-awake", m.name,
                                     lambda: self.store.put_keep(m.name, until_store))
        self.wake_in_background(name, cause="keep_awake")
        return m.keep_until

    def _update_lease_gauge(self, m: Machine) -> None:
        self.metrics.leases.labels(m.name).set(1 if m.keep_until > trio.current_time() else 0)

    def wake_in_background(self, name: str, cause: str = "schedule") -> None:
        """Start a wake nobody waits for (keep-awake, warm schedules); failures are counted as usual."""
        m = self.machines[name]
        if m.state in (State.STOPPED, State.UNKNOWN) or (m.state is State.FAILED and self._cooldown_left(m) <= 0):
            self._begin_wake(m, cause)

    @staticmethod
    def _cooldown_left(m: Machine) -> float:
        """Seconds before a failed machine may be woken again (no retry loop against a broken backend)."""
        return m.failed_at + FAILURE_COOLDOWN - trio.current_time()

    # -- stopping ------------------------------------------------------------------------

    def idle_for(self, m: Machine) -> float:
        """Seconds since the machine's last session ended (0 while one is open)."""
        if m.state is not State.RUNNING or m.sessions:
            return 0.0
        return max(0.0, trio.current_time() - m.last_activity)

    def stop_blocker(self, m: Machine, warm: bool = False) -> str | None:
        """Why the reaper must not stop this machine now, or None if it may."""
        if self.shared:
            return self._shared_stop_blocker(m, warm)
        now = trio.current_time()
        started, last = m.started_at, m.last_activity
        if m.state is State.UNKNOWN and m.unknown_since is not None:
            # Maybe running, and we cannot ask: stop it when idle (a stop is idempotent), counting
            # from when we found it so (a restart gives it a full grace).
            started, last = m.unknown_since, max(m.last_activity, m.unknown_since)
        elif m.state is not State.RUNNING:
            return "not running"
        if m.sessions:
            return "in use"
        if now - last < m.config.idle_timeout:
            return "idle timeout not reached"
        if now - started < m.config.min_uptime:
            return "minimum uptime not reached"
        if m.keep_until > now:
            return "keep-awake lease"
        if warm:
            return "warm schedule"
        return None

    async def stop(self, name: str, *, reaper: bool = False, warm: bool = False) -> bool:
        """Stop a machine. With reaper=True only if stop_blocker() finds nothing.

        The check and the transition to `stopping` happen with no checkpoint between
        them, so a connection can never slip in between. Stop is graceful first and
        forced after the machine's stop_timeout.
        """
        m = self.machines[name]
        if self.shared:
            return await self._stop_shared(m, reaper=reaper, warm=warm)
        if reaper:
            if self.stop_blocker(m, warm) is not None:
                return False
        elif m.state is not State.RUNNING:
            return False
        else:
            m.keep_until = 0.0  # an explicit stop ends any keep-awake lease
        self._set_state(m, State.STOPPING)
        return await self._do_stop(m, reaper)

    async def _do_stop(self, m: Machine, reaper: bool) -> bool:
        """The backend stop of a machine already in state `stopping`."""
        m.stop_error = None
        cfg = m.config
        t0 = trio.current_time()
        result = "success"
        try:
            m.stop_calls += 1
            with trio.move_on_after(cfg.stop_timeout) as graceful:
                await self._call(m, "stop", lambda: m.backend.stop(cfg))
            if graceful.cancelled_caught:
                log.warning("graceful stop timed out machine=%s after=%.0fs; forcing", m.name, cfg.stop_timeout)
                with trio.fail_after(cfg.stop_timeout):
                    await self._call(m, "stop", lambda: m.backend.force_stop(cfg))
        except (Exception, trio.TooSlowError) as exc:
            result = "failure"
            m.stop_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("stop failed machine=%s backend=%s error=%s detail=%s", m.name, m.backend.name,
                        m.stop_error, getattr(exc, "detail", None) or "-")
            self._set_state(m, State.UNKNOWN)
            return False
        except BaseException:  # cancelled (shutdown): we no longer know what the backend did
            result = "failure"
            self._set_state(m, State.UNKNOWN)
            raise
        finally:
            if reaper:
                self.metrics.reaper_stops.labels(m.backend.name, result).inc()
        log.info("machine stopped machine=%s by=%s seconds=%.1f", m.name, "reaper" if reaper else "request",
                 trio.current_time() - t0)
        self._set_state(m, State.STOPPED)
        return True

    async def stop_all(self) -> None:
        for name in self.machines:
            try:
                await self.stop(name)
            except Exception as exc:
                log.warning("stop failed machine=%s error=%s", name, exc)

    # -- shared store (several replicas, etcd) --------------------------------------------
    #
    # Local state is this replica's view; the decisions (one start, one stop, no stop under
    # a hold) are etcd transactions in fleetgate/store/etcd.py. Nothing here stops a machine
    # or starts one unless etcd said so: when etcd cannot be reached, stops do not happen
    # and wakes of machines not known running are refused (docs/ha.md).

    def store_unavailable_error(self, m: Machine) -> WakeError:
        return WakeError("store_unavailable",
                         f"fleetgate: {m.name} is not available through this gateway right now: it cannot reach "
                         f"the gateways' coordination store (etcd), and waking or joining {m.name} without it "
                         f"could start it twice or race a stop; please try again in a minute")

    async def _shared_hold(self, m: Machine) -> Lease | None:
        """A lease on a running machine, registered fleet-wide; None if a stop was claimed meanwhile."""
        async with m.hold_lock:
            if m.state is not State.RUNNING:
                return None
            if m.hold == "present" and self.store.lease_alive():
                # Our hold is in etcd (and our lease alive): no stop can be claimed until it goes,
                # so this session joins it without a round trip, even while etcd is unreachable.
                return self._lease(m)
            if m.state_rev is None and not m.finishing:
                # Running as far as this replica knows (found by reconcile, or before a restart),
                # but not seen running in etcd: look there first (the wake path adopts it).
                self._set_state(m, State.UNKNOWN)
                return None
            try:
                if m.state_rev is None:
                    raise StoreUnavailable("our start is not recorded in etcd yet")
                ok = await self.store.register_hold(m.name, m.sessions + 1, m.state_rev)
            except StoreUnavailable as exc:
                # Without a hold of ours we cannot know that no other replica is stopping it right
                # now (a stop claimed just before etcd went away can still be running): refuse.
                log.warning("store unavailable: login refused machine=%s: %s", m.name, exc)
                self.metrics.wake_failures.labels(m.backend.name, "store_unavailable").inc()
                raise self.store_unavailable_error(m) from None
            if not ok:
                log.info("machine is being (or was) stopped by another replica machine=%s: waiting, then waking",
                         m.name)
                if m.state is State.RUNNING:
                    self._set_state(m, State.UNKNOWN)
                return None
            m.hold = "present"
            if m.state is not State.RUNNING:
                self._kick_hold_sync(m)
                return None
            return self._lease(m)

    def _kick_hold_sync(self, m: Machine) -> None:
        if not m.hold_syncing:
            m.hold_syncing = True
            self._nursery.start_soon(self._hold_sync, m)

    async def _hold_sync(self, m: Machine) -> None:
        """Make this replica's hold in etcd match its sessions (background; retries with backoff)."""
        delay = 0.1
        try:
            while True:
                async with m.hold_lock:
                    try:
                        if m.sessions == 0 and m.hold != "absent":
                            m.hold = "maybe"
                            await self.store.drop_hold(m.name)
                            m.hold = "absent"
                        elif m.sessions > 0 and (m.hold != "present" or not self.store.lease_alive()):
                            if m.state_rev is None:
                                pass  # our start is not recorded yet; finish start kicks us again
                            elif await self.store.register_hold(m.name, m.sessions, m.state_rev):
                                m.hold = "present"
                            else:
                                log.warning("sessions on machine=%s but its state changed in etcd meanwhile "
                                            "(stopped by another replica?)", m.name)
                                return
                        else:
                            return
                    except StoreUnavailable:
                        pass
                await trio.sleep(delay)
                delay = min(delay * 2, HOLD_RETRY_MAX)
        finally:
            m.hold_syncing = False

    def _store_lease_lost(self) -> None:
        """Our etcd lease expired: every hold we had is gone; register them again."""
        for m in self.machines.values():
            if m.hold != "absent":
                m.hold = "maybe"
            if m.sessions or m.hold != "absent":
                self._kick_hold_sync(m)

    async def _store_retry(self, what: str, name: str, fn: Callable[[], Awaitable[object]]) -> None:
        """A store write that must happen eventually (bounded: our lease is the backstop)."""
        delay = 0.2
        with trio.move_on_after(120):
            while True:
                try:
                    await fn()
                    return
                except StoreUnavailable as exc:
                    log.warning("store: %s for machine=%s failed, retrying: %s", what, name, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.error("store: gave up on %s for machine=%s", what, name)

    async def _run_shared_wake(self, m: Machine, wake: _Wake) -> None:
        """Wake fleet-wide: join a start or stop in progress on any replica, adopt a machine another
        replica started (after probing it ourselves), or win the start claim and start it."""
        cfg = m.config
        error: WakeError | None = None
        unavailable_since: float | None = None
        try:
            with trio.fail_after(cfg.boot_timeout + 2 * STORE_WAIT + 30):
                while True:
                    try:
                        v = await self.store.snapshot(m.name)
                    except StoreUnavailable:
                        # An election (etcd leader lost) takes a second or two: be patient that long.
                        now = trio.current_time()
                        unavailable_since = unavailable_since or now
                        if now - unavailable_since >= STORE_PATIENCE:
                            raise
                        await trio.sleep(0.25)
                        continue
                    unavailable_since = None
                    if v.start == self.store.replica and not v.stop:
                        break  # our claim (a txn whose answer we lost, or an earlier us that died): start
                    if v.start or v.stop:
                        await self.store.wait_change(STORE_WAIT)
                        continue
                    st = (v.state or {}).get("state")
                    if st == "running":
                        try:
                            with trio.fail_after(min(cfg.boot_timeout, 15.0)):
                                address = await self._call(m, "address", lambda: m.backend.address(cfg))
                                await self._probe_ready(m, address)
                        except Exception as exc:  # not really up (died, or a stale state): start it
                            log.info("machine marked running in the store does not answer machine=%s: %r", m.name, exc)
                        else:
                            m.address = address
                            m.state_rev = v.state_rev
                            m.started_at = m.last_activity = trio.current_time()
                            log.info("machine ready (started by another replica) machine=%s address=%s",
                                     m.name, address)
                            self._set_state(m, State.RUNNING)
                            wake.done.set()
                            return
                    if st == "failed" and self.store.now() - float(v.state.get("at", 0)) < FAILURE_COOLDOWN:
                        left = FAILURE_COOLDOWN - (self.store.now() - float(v.state.get("at", 0)))
                        msg = v.state.get("message") or f"fleetgate: {m.name} could not be started"
                        self.metrics.wake_failures.labels(m.backend.name, "cooldown").inc()
                        error = WakeError("cooldown", f"{msg}; fleetgate retries in {left:.0f} s")
                        break
                    try:
                        won = await self.store.claim_start(m.name, v, cfg.boot_timeout + CLAIM_MARGIN)
                    except StoreUnavailable:
                        # Unknown outcome: the txn may have been applied. Look again (our claim, if
                        # it was made, shows as a live claim by us: we then wait out its deadline).
                        unavailable_since = unavailable_since or trio.current_time()
                        await trio.sleep(0.25)
                        continue
                    if won:
                        self.metrics.store_claims.labels("start", "won").inc()
                        break
                    self.metrics.store_claims.labels("start", "lost").inc()
        except StoreUnavailable as exc:
            if m.backend.name in getattr(self.store.config, "wake_without_store", ()):
                log.warning("store unavailable; waking machine=%s anyway (backend %s is declared idempotent): %s",
                            m.name, m.backend.name, exc)
                await self._run_wake(m, wake)
                return
            log.warning("store unavailable: wake refused machine=%s: %s", m.name, exc)
            self.metrics.wake_failures.labels(m.backend.name, "store_unavailable").inc()
            error = self.store_unavailable_error(m)
        except trio.TooSlowError:
            self.metrics.wake_failures.labels(m.backend.name, "boot_timeout").inc()
            error = WakeError("boot_timeout", f"fleetgate: {m.name} did not answer within {cfg.boot_timeout:g} s")
        if error is not None:
            wake.error = error
            wake.done.set()
            self._set_state(m, State.UNKNOWN)  # nothing of ours runs; the next connection asks again
            return
        await self._run_wake(m, wake)

    def _shared_stop_blocker(self, m: Machine, warm: bool) -> str | None:
        now = trio.current_time()
        store = self.store
        if not store.healthy:
            return "store unavailable"
        if store.healthy_for() < 2 * getattr(store.config, "lease_ttl", 10):
            # Just recovered: replicas that admitted sessions while etcd was away register them first.
            return "store recovering"
        v = store.view(m.name)
        if (m.state is State.RUNNING and not m.sessions and v.state_rev and v.state_rev != m.state_rev
                and not v.start and not v.stop and (v.state or {}).get("state") != "running"):
            self._set_state(m, State.UNKNOWN)  # stopped by another replica: the next login asks etcd
        local_ok = m.state in (State.RUNNING, State.UNKNOWN, State.STOPPED)
        if v.start or v.stop or (v.state or {}).get("state") != "running" or not local_ok:
            m.seen_running = False
            return "not running"
        if m.sessions or v.holds:
            m.last_activity = now
            return "in use"
        if not m.seen_running:  # first seen running here (or after a restart): a full idle grace
            m.seen_running = True
            m.last_activity = max(m.last_activity, now) if m.state is not State.RUNNING else m.last_activity
        if now - m.last_activity < m.config.idle_timeout:
            return "idle timeout not reached"
        if store.now() - float(v.state.get("at", 0)) < m.config.min_uptime:
            return "minimum uptime not reached"
        if m.keep_until > now or v.keep_until > store.now():
            return "keep-awake lease"
        if warm:
            return "warm schedule"
        return None

    async def _stop_shared(self, m: Machine, *, reaper: bool, warm: bool) -> bool:
        if reaper:
            if self.stop_blocker(m, warm) is not None:
                return False
        elif m.state in (State.STARTING, State.STOPPING):
            return False
        prev = m.state
        self._set_state(m, State.STOPPING)  # arrivals on this replica wait from here on
        try:
            v = await self.store.snapshot(m.name)
            running = (v.state or {}).get("state") == "running" or prev is State.RUNNING
            if not running or (reaper and (v.holds or v.keep_until > self.store.now() or m.sessions)):
                won = False
            else:
                won = await self.store.claim_stop(m.name, v, 2 * m.config.stop_timeout + CLAIM_MARGIN,
                                                  force=not reaper)
        except StoreUnavailable as exc:
            log.warning("store unavailable: no stop machine=%s: %s", m.name, exc)
            won = False
        if not won:
            if reaper:
                self.metrics.store_claims.labels("stop", "lost").inc()
            self._set_state(m, prev)
            return False
        self.metrics.store_claims.labels("stop", "won").inc()
        if reaper and m.sessions:  # admitted while we claimed (cannot happen: we were `stopping`); be safe
            await self._store_retry("abandon stop", m.name, lambda: self.store.finish_stop(m.name, "running"))
            self._set_state(m, prev)
            return False
        if not reaper:
            m.keep_until = 0.0
        stopped = await self._do_stop(m, reaper)
        self.metrics.store_claims.labels("stop", "performed").inc()
        await self._store_retry("finish stop", m.name, lambda: self.store.finish_stop(
            m.name, "stopped" if stopped else "unknown", end_keep=not reaper,
            **({} if stopped else {"message": m.stop_error or ""})))
        m.seen_running = False
        return stopped
