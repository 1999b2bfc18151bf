"""Deterministic lifecycle and reaper rules, driven by trio's MockClock (autojump)."""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.backends.base import PowerState
from fleetgate.fleet import State, WakeError
from fleetgate.reaper import Reaper
from fleetgate.schedule import parse_rule


async def sleep_until(t: float) -> None:
    await trio.sleep_until(t)


async def start_reaper(nursery, fleet, **kw) -> Reaper:
    reaper = Reaper(fleet, interval=1.0, **kw)
    await nursery.start(reaper.run)
    return reaper


async def test_idle_timeout_stops_after_last_session(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=60, min_uptime=0))
    await start_reaper(nursery, fleet)
    t0 = trio.current_time()
    lease = await fleet.acquire("alice")
    assert trio.current_time() - t0 == pytest.approx(backend.start_delay)
    await trio.sleep(100)  # in use: never stopped, however long
    assert fleet.machines["alice"].state is State.RUNNING
    lease.release()
    released = trio.current_time()
    await sleep_until(released + 59)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(released + 62)
    assert fleet.machines["alice"].state is State.STOPPED
    assert backend.count("stop") == 1
    assert fleet.metrics.reaper_stops.labels("fake", "success")._value.get() == 1


async def test_min_uptime_holds_a_fresh_machine(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=5, min_uptime=100))
    await start_reaper(nursery, fleet)
    (await fleet.acquire("alice")).release()
    started = fleet.machines["alice"].started_at
    await sleep_until(started + 95)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(started + 103)
    assert fleet.machines["alice"].state is State.STOPPED


async def test_keep_awake_lease_holds_then_expires(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=10, min_uptime=0))
    await start_reaper(nursery, fleet)
    t0 = trio.current_time()
    fleet.keep_awake("alice", 300)  # also wakes it
    await trio.sleep(5)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(t0 + 290)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(t0 + 303)
    assert fleet.machines["alice"].state is State.STOPPED


async def test_warm_schedule_prewakes_and_holds(nursery, autojump_clock):
    backend = FakeBackend()
    rules = (parse_rule("mon-fri 08:00-19:00"),)
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=10, min_uptime=0, warm=rules))
    now = {"t": dt.datetime(2026, 11, 23, 7, 59)}  # a Monday
    await fleet.reconcile()
    await start_reaper(nursery, fleet, wall_clock=lambda: now["t"])
    await trio.sleep(30)
    assert fleet.machines["alice"].state is State.STOPPED
    now["t"] = dt.datetime(2026, 11, 23, 8, 0)
    await trio.sleep(5)
    assert fleet.machines["alice"].state is State.RUNNING  # pre-woken, nobody connected
    await trio.sleep(600)
    assert fleet.machines["alice"].state is State.RUNNING  # idle, but warm
    now["t"] = dt.datetime(2026, 11, 23, 19, 0)
    await trio.sleep(3)
    assert fleet.machines["alice"].state is State.STOPPED
    assert backend.count("start") == 1


def test_schedule_rules():
    r = parse_rule("fri-mon 22:00-06:00")
    assert r.active(dt.datetime(2026, 11, 27, 23, 0))      # Friday night
    assert r.active(dt.datetime(2026, 11, 28, 5, 59))      # Saturday early (Friday's rule)
    assert not r.active(dt.datetime(2026, 11, 25, 23, 0))  # Wednesday
    assert r.active(dt.datetime(2026, 11, 24, 3, 0))       # Tuesday early belongs to Monday's rule
    with pytest.raises(ValueError, match="not a day"):
        parse_rule("monday 08:00-09:00")
    with pytest.raises(ValueError, match="time of day"):
        parse_rule("daily 25:00-26:00")


async def test_restart_adopts_running_machine_with_full_grace(nursery, autojump_clock):
    backend = FakeBackend()
    backend.power["alice"] = PowerState.RUNNING  # left running by the previous gateway
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=60, min_uptime=0))
    t0 = trio.current_time()
    await fleet.reconcile()
    await start_reaper(nursery, fleet)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(t0 + 58)
    assert fleet.machines["alice"].state is State.RUNNING
    await sleep_until(t0 + 62)
    assert fleet.machines["alice"].state is State.STOPPED
    assert backend.count("start") == 0


async def test_connect_during_stopping_waits_and_rewakes(nursery, autojump_clock):
    backend = FakeBackend()
    backend.stop_delay = 3
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=10, min_uptime=0))
    await start_reaper(nursery, fleet)
    (await fleet.acquire("alice")).release()
    m = fleet.machines["alice"]
    with trio.fail_after(30):
        while m.state is not State.STOPPING:
            await m.changed.wait()
    lines: list[str] = []
    lease = await fleet.acquire("alice", lines.append)
    assert m.state is State.RUNNING
    assert backend.power["alice"] is PowerState.RUNNING
    assert [op for op, _ in backend.calls if op != "status"] == ["start", "stop", "start"]
    assert "is stopping; it will be started again" in lines[0]
    lease.release()


async def test_single_flight_and_a_waiter_that_gives_up(nursery, autojump_clock):
    backend = FakeBackend()
    backend.start_delay = 10
    fleet = make_fleet(nursery, backend, machine_config("alice"))
    leases = []

    async def client():
        leases.append(await fleet.acquire("alice"))

    async with trio.open_nursery() as clients:
        for _ in range(49):
            clients.start_soon(client)
        quitter_scope = trio.CancelScope()

        async def gives_up():
            with quitter_scope:
                await fleet.acquire("alice")

        clients.start_soon(gives_up)
        await trio.sleep(3)
        quitter_scope.cancel()  # Ctrl-C during the boot: only its own wait ends
    assert len(leases) == 49
    assert backend.count("start") == 1
    assert fleet.machines["alice"].sessions == 49


async def test_start_failure_reason_cooldown_then_retry(nursery, autojump_clock):
    backend = FakeBackend()
    backend.fail_start.add("alice")
    fleet = make_fleet(nursery, backend, machine_config("alice"))
    errors = []

    async def client():
        try:
            await fleet.acquire("alice")
        except WakeError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(client)
    assert [e.reason for e in errors] == ["start_error"] * 3
    assert "could not be started: the fake API said no" in errors[0].message
    assert backend.count("start", "alice") == 1
    with pytest.raises(WakeError) as info:
        await fleet.acquire("alice")
    assert info.value.reason == "cooldown"
    assert backend.count("start", "alice") == 1  # no tight loop
    backend.fail_start.clear()
    await trio.sleep(6)
    (await fleet.acquire("alice")).release()
    assert backend.count("start", "alice") == 2
    assert fleet.metrics.wake_failures.labels("fake", "start_error")._value.get() == 1


async def test_boot_timeout_is_exact(nursery, autojump_clock):
    backend = FakeBackend()
    backend.hang_start.add("alice")
    fleet = make_fleet(nursery, backend, machine_config("alice", boot_timeout=42))
    t0 = trio.current_time()
    with pytest.raises(WakeError) as info:
        await fleet.acquire("alice")
    assert info.value.reason == "boot_timeout"
    assert trio.current_time() - t0 == pytest.approx(42)
    assert "did not answer within 42 s" in info.value.message


async def test_stop_failure_is_told_to_waiting_client(nursery, autojump_clock):
    backend = FakeBackend()
    backend.stop_delay = 3
    backend.fail_stop.add("alice")
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=10, min_uptime=0))
    await start_reaper(nursery, fleet)
    (await fleet.acquire("alice")).release()
    m = fleet.machines["alice"]
    with trio.fail_after(30):
        while m.state is not State.STOPPING:
            await m.changed.wait()
    with pytest.raises(WakeError) as info:
        await fleet.acquire("alice")
    assert info.value.reason == "stop_failed"
    assert fleet.metrics.reaper_stops.labels("fake", "failure")._value.get() == 1


async def test_progress_lines_carry_elapsed_and_eta(nursery, autojump_clock):
    backend = FakeBackend()
    backend.start_delay = 7
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=10, min_uptime=0))
    first: list[str] = []
    (await fleet.acquire("alice", first.append)).release()
    assert first[0] == "fleetgate: starting alice (fake)"
    assert first[1:] == ["fleetgate: starting alice (fake) ... 2 s", "fleetgate: starting alice (fake) ... 4 s",
                         "fleetgate: starting alice (fake) ... 6 s"]
    await fleet.stop("alice")
    second: list[str] = []
    (await fleet.acquire("alice", second.append)).release()
    assert second[0] == "fleetgate: starting alice (fake), usually ~7 s"


async def test_reconcile_adopts_outside_starts_and_reports_outside_stops(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=60, min_uptime=0))
    await fleet.reconcile()
    m = fleet.machines["alice"]
    assert m.state is State.STOPPED
    backend.power["alice"] = PowerState.RUNNING  # someone started it by hand
    await fleet.reconcile()
    assert m.state is State.RUNNING
    lease = fleet.try_acquire("alice")
    backend.power["alice"] = PowerState.STOPPED  # and it died under a session
    await fleet.reconcile()
    assert m.state is State.STOPPED
    assert fleet.metrics.machine_lost.labels("fake")._value.get() == 1
    lease.release()
    (await fleet.acquire("alice")).release()  # the next connection wakes it again
    assert backend.count("start") == 1 and m.state is State.RUNNING


async def test_machine_whose_state_cannot_be_read_is_stopped_when_idle(nursery, autojump_clock):
    """Issue 10, item 9: an HTTP backend without status_url after a gateway restart. The machine
    may be running; it must be stopped (stop is idempotent) once idle past its minimum uptime."""

    class NoStatus(FakeBackend):
        async def status(self, machine):
            self.calls.append(("status", machine.name))
            return PowerState.UNKNOWN

    backend = NoStatus()
    fleet = make_fleet(nursery, backend, machine_config("alice", idle_timeout=60, min_uptime=100))
    await fleet.reconcile()  # what a (re)started gateway does first
    found = trio.current_time()
    assert fleet.machines["alice"].state is State.UNKNOWN
    await start_reaper(nursery, fleet)
    await sleep_until(found + 98)  # idle since found, but the minimum uptime counts from then too
    assert backend.count("stop") == 0
    await sleep_until(found + 103)
    assert backend.count("stop", "alice") == 1
    assert fleet.machines["alice"].state is State.STOPPED
    await sleep_until(found + 1000)
    assert backend.count("stop", "alice") == 1  # once: now its state is known
