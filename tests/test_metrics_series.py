"""The series issue 14 added or fixed, on a fake fleet (MockClock, no sockets).

Wakes by cause, the cost counter, the last-activity timestamp, timed-out boots in the boot
histogram, series of removed machines deleted, process_* and build_info, the pre-auth gauges.
"""

from __future__ import annotations

import trio
import pytest

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.fleet import State, WakeError
from fleetgate.metrics import WAKE_CAUSES, WAKE_FAILURE_REASONS, Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_wakes_say_why_the_machine_woke(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, *(machine_config(n) for n in ("a", "b", "c", "d")))
    m = fleet.metrics
    for cause in WAKE_CAUSES:  # every cause exists from the start, at 0
        assert value(m, "fleetgate_wakes_total", backend="fake", result="success", cause=cause) == 0
    (await fleet.acquire("a")).release()                      # an SSH login
    (await fleet.acquire("b", cause="passthrough")).release()  # a passthrough port
    fleet.keep_awake("c", 600)                                 # fleetgate keep-awake
    fleet.wake_in_background("d")                              # a warm schedule (the reaper's call)
    with trio.fail_after(60):
        while any(fleet.machines[n].state is not State.RUNNING for n in "cd"):
            await fleet.machines["c" if fleet.machines["c"].state is not State.RUNNING else "d"].changed.wait()
    got = {c: value(m, "fleetgate_wakes_total", backend="fake", result="success", cause=c) for c in WAKE_CAUSES}
    assert got == {"login": 1, "keep_awake": 1, "schedule": 1, "passthrough": 1}


async def test_running_seconds_and_last_activity(nursery, autojump_clock, monkeypatch):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("a"))
    m = fleet.metrics
    assert value(m, "fleetgate_machine_running_seconds_total", machine="a") == 0
    assert value(m, "fleetgate_machine_last_activity_timestamp_seconds", machine="a") == 0
    monkeypatch.setattr("fleetgate.fleet.time.time", lambda: 1_700_000_000.0)
    lease = await fleet.acquire("a")  # the fake boot takes 1 s (mock clock)
    await trio.sleep(100)
    fleet.account_running(fleet.machines["a"])  # what each reaper pass does
    assert value(m, "fleetgate_machine_running_seconds_total", machine="a") == pytest.approx(101)
    assert value(m, "fleetgate_machine_last_activity_timestamp_seconds", machine="a") == 1_700_000_000.0
    monkeypatch.setattr("fleetgate.fleet.time.time", lambda: 1_700_000_500.0)
    lease.release()
    assert value(m, "fleetgate_machine_last_activity_timestamp_seconds", machine="a") == 1_700_000_500.0
    assert await fleet.stop("a")
    stopped = value(m, "fleetgate_machine_running_seconds_total", machine="a")
    await trio.sleep(1000)
    fleet.account_running(fleet.machines["a"])
    assert value(m, "fleetgate_machine_running_seconds_total", machine="a") == stopped, "stopped: no cost"
    assert stopped == pytest.approx(101.5)  # the fake stop takes 0.5 s


async def test_a_timed_out_boot_is_in_the_boot_histogram(nursery, autojump_clock):
    backend = FakeBackend()
    backend.hang_start.add("a")
    fleet = make_fleet(nursery, backend, machine_config("a", boot_timeout=42))
    with pytest.raises(WakeError):
        await fleet.acquire("a")
    m = fleet.metrics
    assert value(m, "fleetgate_boot_latency_seconds_count", backend="fake") == 1
    assert value(m, "fleetgate_boot_latency_seconds_bucket", backend="fake", le="30.0") == 0
    assert value(m, "fleetgate_boot_latency_seconds_bucket", backend="fake", le="45.0") == 1


async def test_series_of_a_removed_machine_go_once_it_is_stopped(nursery, autojump_clock):
    backend = FakeBackend()
    a, b = machine_config("a"), machine_config("b")
    fleet = make_fleet(nursery, backend, a, b)
    m = fleet.metrics
    lease = await fleet.acquire("b")
    fleet.apply({"a": a}, {"fake": backend})  # b removed while in use: kept until stopped
    assert value(m, "fleetgate_machine_state", machine="b", state="running") == 1
    lease.release()
    assert await fleet.stop("b")
    from fleetgate.reaper import Reaper

    async with trio.open_nursery() as stops:
        Reaper(fleet).tick(stops)
    assert "b" not in fleet.machines
    for name in ("fleetgate_machine_state", "fleetgate_active_sessions",
                 "fleetgate_keep_awake_leases", "fleetgate_machine_running_seconds_total",
                 "fleetgate_machine_last_activity_timestamp_seconds"):
        families = [s for f in m.registry.collect() for s in f.samples if s.name == name]
        assert families and not [s for s in families if s.labels.get("machine") == "b"], name
    fleet.apply({"a": a}, {"fake": backend})  # a stopped machine removed by a reload goes at once
    fleet.apply({"b": b}, {"fake": backend})
    assert "a" not in fleet.machines and value(m, "fleetgate_machine_state", machine="a", state="unknown") is None


def test_process_build_and_preinitialised_series() -> None:
    m = Metrics()
    m.add_machine("a", "fake")
    text = m.exposition().decode()
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds", "python_info"):
        assert f"\n{name}" in text, name
    [build] = [line for line in text.splitlines() if line.startswith("fleetgate_build_info{")]
    for label in ("version=", "revision=", "python=", "asyncssh="):
        assert label in build
    assert "backend_error" in WAKE_FAILURE_REASONS
    assert value(m, "fleetgate_wake_failures_total", backend="fake", reason="backend_error") == 0
    assert value(m, "fleetgate_channels_total", kind="session", result="ok") == 0
    assert value(m, "fleetgate_time_to_shell_seconds_count", wake="yes") == 0
    assert value(m, "fleetgate_config_last_reload_success_timestamp_seconds") > 1_600_000_000
    assert value(m, "fleetgate_backend_call_duration_seconds_bucket", backend="fake", op="start", result="ok",
                 le="300.0") == 0, "backend-call buckets reach 300 s, like a boot"
