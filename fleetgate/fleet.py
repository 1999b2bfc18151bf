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
        self.changed = trio.Event()
        self.start_calls = 0
        self.stop_calls = 0

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
                 metrics: Metrics, nursery: trio.Nursery):
        self.metrics = metrics
        self._nursery = nursery
        self.machines: dict[str, Machine] = {}
        for name, mc in machines.items():
            backend = backends[mc.backend]
            backend.on_machine_exited = self.machine_exited
            self.machines[name] = Machine(mc, backend)
            metrics.add_machine(name, backend.name)
            metrics.set_state(name, State.UNKNOWN.value)

    # -- state ---------------------------------------------------------------------------

    def _set_state(self, m: Machine, state: State) -> None:
        if m.state is not state:
            log.info("machine state machine=%s %s -> %s", m.name, m.state.value, state.value)
            m.state = state
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
        """Ask every backend for the real state; running machines get a full idle grace."""
        now = trio.current_time()
        for m in self.machines.values():
            if m.state not in (State.UNKNOWN, State.RUNNING, State.STOPPED):
                continue  # a wake or stop of ours is in flight; it knows better
            try:
                power = await self._call(m, "status", lambda: m.backend.status(m.config))
            except Exception as exc:  # a lying or dead backend must not stop the gateway
                log.warning("status failed machine=%s backend=%s error=%s", m.name, m.backend.name, exc)
                continue
            if power is PowerState.RUNNING and m.state is not State.RUNNING:
                try:
                    m.address = await self._call(m, "address", lambda: m.backend.address(m.config))
                except Exception as exc:
                    log.warning("address failed machine=%s error=%s", m.name, exc)
                    continue
                m.started_at = m.last_activity = now
                log.info("adopted running machine=%s", m.name)
                self._set_state(m, State.RUNNING)
            elif power is PowerState.STOPPED and m.state is not State.STOPPED:
                if m.state is State.RUNNING:
                    log.warning("machine stopped outside fleetgate machine=%s sessions=%d", m.name, m.sessions)
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
                continue
            if m.state is State.FAILED:
                left = m.failed_at + FAILURE_COOLDOWN - trio.current_time()
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
                await probe.wait_for_banner(address)
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
        self.metrics.machine_idle.labels(m.name).set(0)
        return Lease(self, m)

    def _release(self, m: Machine) -> None:
        m.sessions -= 1
        assert m.sessions >= 0, m.name
        if m.sessions == 0:
            m.last_activity = trio.current_time()
        self.metrics.active_sessions.labels(m.name).set(m.sessions)

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

    # -- stopping ------------------------------------------------------------------------

    async def stop(self, name: str, *, only_if_idle_for: float | None = None) -> bool:
        """Stop a machine; with only_if_idle_for, only if it has no session and has been idle that long.

        The check and the transition to `stopping` happen without a checkpoint between them.
        """
        m = self.machines[name]
        if m.state is not State.RUNNING:
            return False
        if only_if_idle_for is not None:
            if m.sessions or trio.current_time() - m.last_activity < only_if_idle_for:
                return False
        self._set_state(m, State.STOPPING)
        try:
            m.stop_calls += 1
            await self._call(m, "stop", lambda: m.backend.stop(m.config))
        except BaseException:
            self._set_state(m, State.UNKNOWN)
            raise
        self._set_state(m, State.STOPPED)
        return True

    async def stop_all(self) -> None:
        for name in self.machines:
            try:
                await self.stop(name)
            except Exception as exc:
                log.warning("stop failed machine=%s error=%s", name, exc)
