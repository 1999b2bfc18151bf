"""Issue 15, a gateway with many machines: what a scrape, a reaper pass and a reconcile cost.

Timing targets live in bench/scale.py; these tests pin the shape that makes them reachable:
per-machine series rendered from records (the same bytes prometheus_client would write, five
series per machine), a scrape that yields to other tasks between slices and is shared by
concurrent scrapers, a reaper pass that does not look at stopped machines, and a reconcile
that asks a backend with bounded concurrency, spread over time, or once for all machines.
No sockets; MockClock where time matters.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import prometheus_client
import pytest
import trio

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate import config as config_mod
from fleetgate.backends.base import PowerState
from fleetgate.backends.command import CommandBackend
from fleetgate.config import BackendConfig, MachineConfig
from fleetgate.fleet import RECONCILE_PACE, State
from fleetgate.metrics import SCRAPE_SLICE, SERIES_PER_MACHINE, Metrics
from fleetgate.reaper import Reaper
from fleetgate.schedule import parse_rule


def machine_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if 'machine="' in line and not line.startswith("#")]


# -- the exposition -------------------------------------------------------------------------------

def test_fast_rendering_is_what_prometheus_client_writes() -> None:
    m = Metrics()
    names = ["a", 'we"ird\\name', "new\nline", "m-1"]
    for n in names:
        m.add_machine(n, "fake")
        m.set_state(n, "stopped")
    m.set_state("a", "running")
    m.active_sessions.labels("a").set(3)
    m.machine_last_activity.labels("a").set(1_700_000_000.25)
    m.machine_running_seconds.labels("a").inc(12.5)
    m.leases.labels("m-1").set(1)
    slow = prometheus_client.generate_latest(m.machines).decode()
    fast = m.machines.render()
    assert fast == slow
    assert 'fleetgate_machine_state{machine="a",state="running"} 1.0' in fast
    assert 'fleetgate_machine_last_activity_timestamp_seconds{machine="a"} 1.70000000025e+09' in fast
    # the whole scrape: the fixed part and the per-machine part, once each
    full = m.exposition().decode()
    assert full.count("# TYPE fleetgate_machine_state gauge") == 1
    assert full.count("# TYPE fleetgate_connections_total counter") == 1


def test_five_series_per_machine_whatever_the_state() -> None:
    m = Metrics()
    n = 2 * SCRAPE_SLICE + 7  # several slices, the last one partial
    for i in range(n):
        m.add_machine(f"m{i}", "fake")
        m.set_state(f"m{i}", ("stopped", "running", "unknown")[i % 3])
    lines = machine_lines(m.exposition().decode())
    assert SERIES_PER_MACHINE == 5
    assert len(lines) == SERIES_PER_MACHINE * n
    assert sum(1 for line in lines if line.startswith("fleetgate_machine_state{")) == n  # only the current state
    m.remove_machine("m0")
    assert len(machine_lines(m.exposition().decode())) == SERIES_PER_MACHINE * (n - 1)


def test_the_fixed_part_does_not_grow_with_machines_of_one_backend() -> None:
    few, many = Metrics(), Metrics()
    few.add_machine("a", "fake")
    for i in range(500):
        many.add_machine(f"m{i}", "fake")
    count = lambda m: len([s for f in m._base.collect() for s in f.samples])  # noqa: E731
    assert count(few) == count(many)


async def test_a_scrape_lets_other_tasks_run_between_slices() -> None:
    m = Metrics()
    n = 5 * SCRAPE_SLICE
    for i in range(n):
        m.add_machine(f"m{i}", "fake")
        m.set_state(f"m{i}", "stopped")
    ran = 0
    done = trio.Event()

    async def other_work() -> None:
        nonlocal ran
        while not done.is_set():
            ran += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_work)
            await trio.lowlevel.checkpoint()
            before = ran
            body = await m.exposition_async()
            during = ran - before
            done.set()
    slices = SERIES_PER_MACHINE * (n // SCRAPE_SLICE)
    assert during >= slices - 1, f"the event loop ran other work {during} times during a {slices}-slice scrape"
    assert len(machine_lines(body.decode())) == SERIES_PER_MACHINE * n
    assert machine_lines(body.decode()) == machine_lines(m.exposition().decode())  # as rendered at once


async def test_concurrent_scrapes_share_one_render(monkeypatch, autojump_clock) -> None:
    m = Metrics()
    for i in range(3 * SCRAPE_SLICE):
        m.add_machine(f"m{i}", "fake")
    renders = 0
    original = m.machines.render_slices

    def counting():
        nonlocal renders
        renders += 1
        return original()

    monkeypatch.setattr(m.machines, "render_slices", counting)
    bodies: list[bytes] = []

    async def scrape() -> None:
        bodies.append(await m.exposition_async())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(scrape)
    assert renders == 1 and len(bodies) == 4 and len(set(bodies)) == 1
    await trio.sleep(10)  # (real seconds are never 10 000 render durations)
    with trio.fail_after(30):
        await m.exposition_async()  # a lone scraper later: a fresh render
    assert renders == 2


# -- the reaper and the scrape-time series --------------------------------------------------------

async def test_an_idle_reaper_pass_does_not_look_at_stopped_machines(nursery, autojump_clock, monkeypatch):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, *(machine_config(f"m{i}", idle_timeout=60, min_uptime=0)
                                           for i in range(1000)))
    await fleet.reconcile()  # every machine: stopped
    assert all(m.state is State.STOPPED for m in fleet.machines.values())
    looked: list[str] = []
    blocker = fleet.stop_blocker
    monkeypatch.setattr(fleet, "stop_blocker", lambda m, warm=False: looked.append(m.name) or blocker(m, warm))
    reaper = Reaper(fleet)
    async with trio.open_nursery() as stops:
        reaper.tick(stops)  # the reconcile's state changes are looked at once ...
        looked.clear()
        reaper.tick(stops)  # ... and then never again
        assert looked == [] and not fleet.awake
        lease = await fleet.acquire("m7")
        reaper.tick(stops)
        assert looked == ["m7"]
        lease.release()
        await trio.sleep(61)
        reaper.tick(stops)  # idle past its timeout: stopped
    assert fleet.machines["m7"].state is State.STOPPED
    async with trio.open_nursery() as stops:
        reaper.tick(stops)
        looked.clear()
        reaper.tick(stops)
    assert looked == [] and not fleet.awake


async def test_warm_schedules_are_still_honoured(nursery, autojump_clock):
    backend = FakeBackend()
    rules = (parse_rule("mon-fri 08:00-19:00"),)
    fleet = make_fleet(nursery, backend, machine_config("w", warm=rules, idle_timeout=10, min_uptime=0),
                       *(machine_config(f"m{i}") for i in range(50)))
    await fleet.reconcile()
    now = {"t": dt.datetime(2026, 11, 23, 7, 59)}  # a Monday
    reaper = Reaper(fleet, wall_clock=lambda: now["t"])
    async with trio.open_nursery() as stops:
        reaper.tick(stops)
        reaper.tick(stops)
        assert fleet.machines["w"].state is State.STOPPED
        now["t"] = dt.datetime(2026, 11, 23, 8, 0)
        reaper.tick(stops)
        assert fleet.machines["w"].state is State.STARTING


async def test_time_driven_series_are_brought_up_to_date_at_scrape(nursery, autojump_clock, monkeypatch):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("a", idle_timeout=600, min_uptime=0),
                       machine_config("b"))
    m = fleet.metrics
    monkeypatch.setattr("fleetgate.fleet.time.time", lambda: 1_700_000_000.0)
    lease = await fleet.acquire("a")  # the fake boot takes 1 s
    fleet.keep_awake("a", 30)
    await trio.sleep(100)             # no reaper running: only a scrape brings the series up to date
    monkeypatch.setattr("fleetgate.fleet.time.time", lambda: 1_700_000_100.0)
    body = (await m.exposition_async()).decode()
    assert 'fleetgate_machine_running_seconds_total{machine="a"} 101.0' in body
    assert 'fleetgate_machine_last_activity_timestamp_seconds{machine="a"} 1.7000001e+09' in body
    assert 'fleetgate_keep_awake_leases{machine="a"} 0.0' in body  # expired meanwhile
    assert 'fleetgate_active_sessions{machine="a"} 1.0' in body
    assert 'fleetgate_machine_state{machine="a",state="running"} 1.0' in body
    assert 'fleetgate_machine_state{machine="b",state="unknown"} 1.0' in body
    assert body.count('machine="b"') == SERIES_PER_MACHINE
    lease.release()


# -- reconcile --------------------------------------------------------------------------------------

class SlowStatus(FakeBackend):
    """Status takes `delay` seconds; records when each call started and how many ran at once."""

    def __init__(self, delay: float = 1.0):
        super().__init__()
        self.delay = delay
        self.in_flight = 0
        self.peak = 0
        self.started: list[float] = []

    async def status(self, machine: MachineConfig) -> PowerState:
        self.started.append(trio.current_time())
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await trio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return await super().status(machine)


async def test_reconcile_is_concurrent_with_a_bound(nursery, autojump_clock):
    backend = SlowStatus()
    fleet = make_fleet(nursery, backend, *(machine_config(f"m{i}") for i in range(100)))
    backend.power["m3"] = PowerState.RUNNING
    t0 = trio.current_time()
    with trio.fail_after(1000):
        await fleet.reconcile(concurrency=8)
    assert backend.peak == 8
    assert trio.current_time() - t0 == pytest.approx(13)  # ceil(100 / 8) calls of 1 s, not 100
    assert fleet.machines["m3"].state is State.RUNNING
    assert sum(m.state is State.STOPPED for m in fleet.machines.values()) == 99


async def test_reconcile_spreads_its_calls_over_the_interval(nursery, autojump_clock):
    backend = SlowStatus(delay=0.01)
    fleet = make_fleet(nursery, backend, *(machine_config(f"m{i}") for i in range(300)))
    t0 = trio.current_time()
    with trio.fail_after(1000):
        await fleet.reconcile(concurrency=4, spread=30)
    offsets = sorted(t - t0 for t in backend.started)
    assert len(offsets) == 300
    assert offsets[0] < RECONCILE_PACE and offsets[-1] >= 30 - 2 * RECONCILE_PACE
    per_second = [sum(1 for o in offsets if s <= o < s + 1) for s in range(30)]
    assert max(per_second) <= 2 * 300 / 30, per_second  # no burst
    assert all(m.state is State.STOPPED for m in fleet.machines.values())


async def test_a_spread_reconcile_leaves_a_machine_alone_that_got_busy_before_its_turn(nursery, autojump_clock):
    backend = SlowStatus(delay=0.01)
    fleet = make_fleet(nursery, backend, *(machine_config(f"m{i}") for i in range(29)),
                       machine_config("m29", boot_timeout=100))
    await fleet.reconcile()
    backend.started.clear()
    backend.hang_start.add("m29")
    async with trio.open_nursery() as n:
        n.start_soon(lambda: fleet.reconcile(spread=30))
        await trio.sleep(1.5)
        fleet.wake_in_background("m29")  # starting when its turn comes (~29 s): a wake knows better
    assert fleet.machines["m29"].state is State.STARTING
    assert len(backend.started) == 29


class BatchBackend(FakeBackend):
    """Answers for every machine in one call, except those in `left_out`."""

    def __init__(self):
        super().__init__()
        self.left_out: set[str] = set()

    def can_status_all(self) -> bool:
        return True

    async def status_all(self, machines: Sequence[MachineConfig]) -> Mapping[str, PowerState]:
        self.calls.append(("status_all", ""))
        await trio.sleep(0.5)
        return {m.name: self.power.get(m.name, PowerState.STOPPED) for m in machines if m.name not in self.left_out}


async def test_a_backend_that_answers_for_all_is_asked_once(nursery, autojump_clock):
    backend = BatchBackend()
    fleet = make_fleet(nursery, backend, *(machine_config(f"m{i}") for i in range(1000)))
    backend.power["m5"] = PowerState.RUNNING
    backend.left_out.add("m9")
    with trio.fail_after(100):
        await fleet.reconcile()
    assert backend.count("status_all") == 1
    assert [n for op, n in backend.calls if op == "status"] == ["m9"]  # left out: asked alone
    assert fleet.machines["m5"].state is State.RUNNING  # adopted
    assert sum(m.state is State.STOPPED for m in fleet.machines.values()) == 999
    m = fleet.metrics
    assert m.registry.get_sample_value("fleetgate_backend_call_duration_seconds_count",
                                       {"backend": "fake", "op": "status", "result": "ok"}) == 2


# -- the command backend's status_all, and the config key -------------------------------------------

def _command_backend(tmp_path: Path, **opts) -> CommandBackend:
    cfg = BackendConfig("cmd", "command", MappingProxyType({"start": "true", "shell": True, **opts}))
    return CommandBackend(cfg, lambda p: tmp_path / p if p else None, tmp_path)


async def test_command_status_all_is_one_command(tmp_path):
    script = tmp_path / "all.sh"
    script.write_text("echo \"$FLEETGATE_OP\" >> calls\necho 'vm-a running 10.0.0.5:2200'\necho 'b stopped'\n"
                      "echo 'garbage'\n")
    backend = _command_backend(tmp_path, status_all=f"cd {tmp_path} && sh {script}")
    a = machine_config("a", backend="cmd", options=MappingProxyType({"vm_name": "vm-a"}))
    b, c = machine_config("b", backend="cmd"), machine_config("c", backend="cmd")
    assert backend.can_status_all()
    with trio.fail_after(30):
        got = await backend.status_all([a, b, c])
        assert got == {"a": PowerState.RUNNING, "b": PowerState.STOPPED, "c": PowerState.STOPPED}
        assert str(await backend.address(a)) == "10.0.0.5:2200"
        assert await backend.status(b) is PowerState.STOPPED  # no `status`: status_all for one
    assert (tmp_path / "calls").read_text().split() == ["status_all", "status_all"]
    assert not _command_backend(tmp_path, status="echo stopped").can_status_all()


def test_status_concurrency_config_key(tmp_path):
    from test_cli_check import write_keys
    from test_config import doc, issues, parse

    write_keys(tmp_path)
    assert parse(tmp_path, doc()).gateway.status_concurrency == 16
    assert parse(tmp_path, doc(gateway={"status_concurrency": 64})).gateway.status_concurrency == 64
    got = issues(tmp_path, doc(gateway={"status_concurrency": 0}))
    assert [k for k, _ in got] == ["gateway.status_concurrency"]
    assert config_mod  # the module the key is parsed by


async def test_process_backend_answers_for_all_from_its_children_and_pid_files(tmp_path):
    from fleetgate.backends.process import ProcessBackend

    backend = ProcessBackend(BackendConfig("local", "process", MappingProxyType({"isolation": "none"})),
                             lambda p: None, tmp_path)

    class Child:
        def __init__(self, code: int | None):
            self.code = code

        def poll(self) -> int | None:
            return self.code

    backend._procs["up"] = Child(None)
    backend._procs["exited"] = Child(0)
    pids = tmp_path / "process" / ".pids"
    pids.mkdir(parents=True)
    start = open(f"/proc/{os.getpid()}/stat").read().rpartition(")")[2].split()[19]
    (pids / "stale").write_text(f"{os.getpid()} {start}\n")  # a live pid, but not this machine's sshd
    names = ["up", "exited", "stale", *(f"m{i}" for i in range(100))]
    assert backend.can_status_all()
    with trio.fail_after(30):
        got = await backend.status_all([machine_config(n, backend="local") for n in names])
    assert got == {"up": PowerState.RUNNING, **{n: PowerState.STOPPED for n in names[1:]}}
    assert "exited" not in backend._procs


async def test_a_failing_backend_logs_a_few_lines_per_pass_not_one_per_machine(nursery, autojump_clock, caplog):
    class Failing(FakeBackend):
        async def status(self, machine: MachineConfig) -> PowerState:
            raise RuntimeError("the API is down")

    fleet = make_fleet(nursery, Failing(), *(machine_config(f"m{i}") for i in range(200)))
    with trio.fail_after(100):
        await fleet.reconcile()
    lines = [r.getMessage() for r in caplog.records if "status failed" in r.getMessage()]
    assert len(lines) == 4 and "machines=200" in lines[-1]
    assert all(m.state is State.UNKNOWN for m in fleet.machines.values())


async def test_scrapers_back_to_back_get_the_last_body_for_a_few_render_durations(autojump_clock, monkeypatch):
    import fleetgate.metrics as metrics_mod

    m = Metrics()
    m.add_machine("a", "fake")
    clock = iter(range(0, 10**6, 10))  # every perf_counter() call: 10 s later, so a render "takes" 10 s
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: float(next(clock)))
    first = await m.exposition_async()
    m.active_sessions.labels("a").set(7)
    again = await m.exposition_async()  # at once: the same body
    assert again is first
    took = m._last[1]
    assert took > 0
    await trio.sleep(metrics_mod.RENDER_REUSE * took + 1)
    fresh = await m.exposition_async()
    assert b'fleetgate_active_sessions{machine="a"} 7.0' in fresh
