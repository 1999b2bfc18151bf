"""The Fleet owns every machine's state; it is the only place a state changes.

Why it looks like this:
- One start per machine however many clients arrive: the first waiter creates a wake
  that runs in the Fleet's own nursery, so a client that gives up (Ctrl-C, timeout)
  cancels only its own wait, never the boot the others are waiting for.
- Sessions are counted by leases taken synchronously once the machine is running; the
  reaper's "no session" check and its transition to `stopping` happen in the same
  synchronous step, so no connection can slip in between (trio runs one task at a time).
- Times come from trio's clock so tests can drive them with MockClock.
"""

from __future__ import annotations

import collections
import enum
import logging
import statistics
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Mapping, TypeVar

import trio

from . import probe
from .backends.base import Address, Backend, BackendError, PowerState
from .config import MachineConfig
from .metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")
Progress = Callable[[str], None]

PROGRESS_INTERVAL = 2.0
FAILURE_COOLDOWN = 5.0
RECONCILE_CALL_TIMEOUT = 30.0
BOOT_HISTORY = 10


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"
    UNKNOWN = "unknown"


class WakeError(Exception):
    """Why a client could not be given a ready machine: a bounded reason and a sentence for the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Wake:
    done: trio.Event = field(default_factory=trio.Event)
    error: WakeError | None = None
    started: float = 0.0


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
                 ready_probe: Callable[[Address], Awaitable[object]] = probe.wait_for_banner):
        self.metrics = metrics
        self._ready_probe = ready_probe
        self._nursery = nursery
        self.machines: dict[str, Machine] = {}
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
        for name in set(self.machines) - set(machines):
            log.warning("machine removed from config machine=%s state=%s sessions=%d: no new connections; "
                        "the reaper stops it when idle", name, self.machines[name].state.value,
                        self.machines[name].sessions)

    # -- state ---------------------------------------------------------------------------

    def _set_state(self, m: Machine, state: State) -> None:
        if m.state is not state:
            log.info("machine state machine=%s %s -> %s", m.name, m.state.value, state.value)
            m.state = state
            if state is State.STOPPED and m.pending_backend is not None:
                m.backend, m.pending_backend = m.pending_backend, None
            self.metrics.set_state(m.name, state.value)
            m.changed.set()
            m.changed = trio.Event()

    async def _call(self, m: Machine, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        t0 = trio.current_time()
        result = "error"
        try:
            value = await fn()
            result = "ok"
            return value
        finally:
            self.metrics.backend_calls.labels(m.backend.name, op, result).observe(trio.current_time() - t0)

    async def reconcile(self) -> None:
        """Ask every backend for the real state; adopted running machines get a full idle grace.

        A backend call is a checkpoint: if the machine's state changed meanwhile (a wake or
        a stop of ours began), our answer is stale and that machine is left alone.
        """
        for m in self.machines.values():
            before = m.state
            if before not in (State.UNKNOWN, State.RUNNING, State.STOPPED):
                continue  # a wake or stop of ours is in flight; it knows better
            try:
                with trio.fail_after(RECONCILE_CALL_TIMEOUT):
                    power = await self._call(m, "status", lambda: m.backend.status(m.config))
                    address = (await self._call(m, "address", lambda: m.backend.address(m.config))
                               if power is PowerState.RUNNING and before is not State.RUNNING else None)
            except Exception as exc:  # a lying, failing or hanging backend must not stop the gateway
                log.warning("status failed machine=%s backend=%s error=%r", m.name, m.backend.name, exc)
                continue
            if m.state is not before:
                continue
            if power is PowerState.RUNNING and before is not State.RUNNING:
                m.address = address
                m.started_at = m.last_activity = trio.current_time()
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

    async def acquire(self, name: str, progress: Progress | None = None) -> Lease:
        """Wait until the machine runs (waking it if needed) and hold it with a lease."""
        m = self.machines[name]
        said_stopping = False
        while True:
            if m.state is State.RUNNING:
                return self._lease(m)
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
                self._begin_wake(m)
            await self._wait_wake(m, progress)

    def _begin_wake(self, m: Machine) -> None:
        m.wake = _Wake(started=trio.current_time())
        self._set_state(m, State.STARTING)
        self._nursery.start_soon(self._run_wake, m, m.wake)

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
                await self._ready_probe(address)
        except trio.TooSlowError:
            error = WakeError("boot_timeout", f"fleetgate: {m.name} did not answer within {cfg.boot_timeout:g} s")
        except BackendError as exc:
            error = WakeError(exc.reason, f"fleetgate: {m.name} could not be started: {exc}")
        except Exception as exc:  # a buggy backend is a failed wake, not a dead gateway
            log.exception("backend raised machine=%s backend=%s", m.name, bname)
            error = WakeError("start_error", f"fleetgate: {m.name} could not be started: {type(exc).__name__}: {exc}")
        now = trio.current_time()
        if error is None:
            latency = now - t0
            m.boot_history.append(latency)
            m.address = address
            m.started_at = m.last_activity = now
            self.metrics.boot_latency.labels(bname).observe(latency)
            self.metrics.wakes.labels(bname, "success").inc()
            log.info("machine ready machine=%s backend=%s boot_seconds=%.2f address=%s", m.name, bname, latency, address)
            self._set_state(m, State.RUNNING)
            wake.done.set()
            return
        self.metrics.wakes.labels(bname, "failure").inc()
        self.metrics.wake_failures.labels(bname, error.reason).inc()
        log.warning("wake failed machine=%s backend=%s reason=%s seconds=%.2f detail=%s",
                    m.name, bname, error.reason, now - t0, error.message)
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

    # -- sessions ------------------------------------------------------------------------

    def try_acquire(self, name: str) -> Lease | None:
        """A lease without waiting, only if the machine is running now."""
        m = self.machines[name]
        return self._lease(m) if m.state is State.RUNNING else None

    def _lease(self, m: Machine) -> Lease:
        m.sessions += 1
        m.last_activity = trio.current_time()
        self.metrics.active_sessions.labels(m.name).set(m.sessions)
        self._sessions_changed(m)
        self.metrics.machine_idle.labels(m.name).set(0)
        return Lease(self, m)

    def _release(self, m: Machine) -> None:
        m.sessions -= 1
        assert m.sessions >= 0, m.name
        if m.sessions == 0:
            m.last_activity = trio.current_time()
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
        self._update_lease_gauge(m)
        log.info("keep-awake machine=%s seconds=%.0f", m.name, seconds)
        self.wake_in_background(name)
        return m.keep_until

    def _update_lease_gauge(self, m: Machine) -> None:
        self.metrics.leases.labels(m.name).set(1 if m.keep_until > trio.current_time() else 0)

    def wake_in_background(self, name: str) -> None:
        """Start a wake nobody waits for (keep-awake, warm schedules); failures are counted as usual."""
        m = self.machines[name]
        if m.state in (State.STOPPED, State.UNKNOWN) or (m.state is State.FAILED and self._cooldown_left(m) <= 0):
            self._begin_wake(m)

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
        now = trio.current_time()
        if m.state is not State.RUNNING:
            return "not running"
        if m.sessions:
            return "in use"
        if now - m.last_activity < m.config.idle_timeout:
            return "idle timeout not reached"
        if now - m.started_at < m.config.min_uptime:
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
        if reaper:
            if self.stop_blocker(m, warm) is not None:
                return False
        elif m.state is not State.RUNNING:
            return False
        else:
            m.keep_until = 0.0  # an explicit stop ends any keep-awake lease
        self._set_state(m, State.STOPPING)
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
            log.warning("stop failed machine=%s backend=%s error=%s", m.name, m.backend.name, m.stop_error)
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
