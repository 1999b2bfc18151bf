"""The readiness probe's cadence (issue 15): fast early and near the usual boot, never faster
than the floor, backing off to the cap on long boots, one attempt at a time.

Driven by trio's MockClock (autojump) with a fake attempt, so no socket is opened; the one
test that does (a refused connect returns at once) is in the e2e tier.
"""

from __future__ import annotations

import math

import pytest
import trio

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate import fleet as fleet_mod, probe
from fleetgate.backends.base import Address
from fleetgate.fleet import Fleet
from fleetgate.metrics import Metrics
from fleetgate.probe import DEFAULT_PACING, Pacing

ADDR = Address("127.0.0.1", 22)
EPS = 1e-9
P = DEFAULT_PACING


class FakeMachine:
    """An sshd that answers from `ready` on. Before that an attempt is refused at once, or, with
    `hang`, is held open as by a NAT or QEMU hostfwd (accepted, no banner) for up to `hang`
    seconds, and gets the banner if the sshd comes up meanwhile. Records every attempt."""

    def __init__(self, ready: float, hang: float = 0.0):
        self.t0 = trio.current_time()
        self.ready = ready
        self.hang = hang
        self.starts: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def attempt(self, address: Address) -> bytes | None:
        now = trio.current_time() - self.t0
        self.starts.append(now)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if now >= self.ready:
                return b"SSH-2.0-OpenSSH_9.2"
            if self.hang:
                await trio.sleep_until(self.t0 + min(now + self.hang, self.ready))
                if trio.current_time() - self.t0 >= self.ready:
                    return b"SSH-2.0-OpenSSH_9.2"
            return None
        finally:
            self.in_flight -= 1


def gaps(starts: list[float]) -> list[float]:
    return [b - a for a, b in zip(starts, starts[1:])]


# -- the schedule, as a pure function ------------------------------------------------------

@pytest.mark.parametrize("expected", [None, 0.03, 1.0, 4.0, 60.0])
def test_never_faster_than_the_floor_nor_slower_than_the_cap(expected):
    for i in range(0, 200_000, 7):
        g = P.gap(i / 1000, expected)
        assert P.floor - EPS <= g <= P.cap + EPS, (i, expected, g)
    assert min(gaps(P.schedule(120.0, expected))) >= P.floor - EPS


def test_fast_early_then_backs_off_to_the_cap():
    starts = P.schedule(60.0)
    assert starts[:10] == pytest.approx([i * P.floor for i in range(10)])   # every 5 ms for the first 50 ms
    g = gaps(starts)
    assert all(b >= a - EPS for a, b in zip(g, g[1:]))                      # never speeds up again (no expectation)
    assert g[-1] == pytest.approx(P.cap)
    assert P.gap(1.0) == pytest.approx(0.1)                                 # 10 % of the time waited
    # A minute's boot is asked about 4 times a second at most once past the first seconds,
    # not hammered: fewer attempts than the old fixed 100–250 ms poll made (~340).
    assert len(starts) < 300
    assert sum(1 for t in starts if 10 <= t < 60) == pytest.approx(50 / P.cap, abs=1)


@pytest.mark.parametrize("ready", [0.001, 0.028, 0.05, 0.3, 1.0, 4.0, 30.0, 59.0])
def test_lag_after_the_banner_is_a_small_fraction_of_the_boot(ready):
    """Noticing the banner late is the wake cost: at most max(floor, ~10 % of the boot), ≤ cap."""
    first_after = next(t for t in P.schedule(ready + 1.0) if t >= ready)
    lag = first_after - ready
    assert lag <= min(P.cap, max(P.floor, P.growth * ready * (1 + P.growth))) + EPS


def test_faster_around_the_expected_boot():
    expected = 4.0
    assert P.gap(expected, expected) == pytest.approx(P.near * expected)    # 80 ms instead of ...
    assert P.gap(expected, None) == pytest.approx(P.cap)                    # ... 250 ms without the hint
    assert P.gap(0.5 * expected, expected) == P.gap(0.5 * expected, None)   # only around it
    assert P.gap(2.0 * expected, expected) == P.gap(2.0 * expected, None)
    # A boot that came when expected is noticed sooner; one that did not still gets a cadence.
    hinted = [t for t in P.schedule(10.0, expected) if 0.7 * expected <= t <= 1.5 * expected]
    plain = [t for t in P.schedule(10.0) if 0.7 * expected <= t <= 1.5 * expected]
    assert len(hinted) > 2 * len(plain)
    # A 60 s VM gets no hammering near its usual boot either (the hint never goes under the floor
    # nor above the rate of the cap).
    assert P.gap(60.0, 60.0) == pytest.approx(P.cap)
    assert P.gap(0.03, 0.03) == pytest.approx(P.floor)


@pytest.mark.parametrize("expected", [0.0, -1.0, math.inf, math.nan])
def test_a_meaningless_expectation_is_ignored(expected):
    for t in (0.0, 0.01, 1.0, 10.0):
        assert P.gap(t, expected) == P.gap(t, None)


# -- wait_for_banner under a MockClock -----------------------------------------------------

async def test_local_sshd_noticed_within_the_floor(autojump_clock):
    m = FakeMachine(ready=0.028)
    t0 = trio.current_time()
    with trio.fail_after(5):
        banner = await probe.wait_for_banner(ADDR, attempt=m.attempt)
    assert banner == b"SSH-2.0-OpenSSH_9.2"
    assert m.starts[0] == 0.0                                   # the first try at once
    assert min(gaps(m.starts)) >= P.floor - EPS
    assert trio.current_time() - t0 - m.ready <= P.floor + EPS  # noticed within 5 ms
    assert len(m.starts) == 7                                   # 0, 5, ... 30 ms


async def test_a_long_boot_is_not_hammered_and_the_wait_is_bounded_by_the_caller(autojump_clock):
    m = FakeMachine(ready=math.inf)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(60):
            await probe.wait_for_banner(ADDR, 60.0, attempt=m.attempt)
    assert min(gaps(m.starts)) >= P.floor - EPS
    assert max(gaps(m.starts)) == pytest.approx(P.cap)
    assert len(m.starts) < 300
    assert m.in_flight == 0                                     # nothing left behind


async def test_attempts_start_on_the_schedule(autojump_clock):
    m = FakeMachine(ready=3.0)
    with trio.fail_after(30):
        await probe.wait_for_banner(ADDR, attempt=m.attempt)
    # Refused at once: the starts are exactly the pure schedule, up to the banner.
    assert m.starts == pytest.approx(P.schedule(m.starts[-1]))
    assert m.starts[-1] - m.ready <= P.gap(m.ready) + EPS


async def test_one_attempt_at_a_time_and_a_held_one_sees_the_banner(autojump_clock):
    """Behind a NAT an attempt is held open until the guest answers or BANNER_TIMEOUT: the
    sshd must never see several probe connections at once (per-source limits would then drop
    the gateway's real login), and the held attempt itself notices the banner."""
    m = FakeMachine(ready=5.3, hang=probe.BANNER_TIMEOUT)
    t0 = trio.current_time()
    with trio.fail_after(30):
        await probe.wait_for_banner(ADDR, attempt=m.attempt)
    assert m.max_in_flight == 1
    assert trio.current_time() - t0 == pytest.approx(m.ready)      # no lag: the held attempt got it
    # The next attempt starts as soon as a held one gives up (no gap on top), never sooner.
    assert gaps(m.starts) == pytest.approx([probe.BANNER_TIMEOUT] * (len(m.starts) - 1))


# -- the Fleet tells the probe when the banner is due --------------------------------------

async def test_fleet_passes_the_usual_boot_less_the_start_call(nursery, autojump_clock, monkeypatch):
    seen: list[float | None] = []

    async def recording_probe(address: Address, expected: float | None = None, **kw) -> bytes:
        seen.append(expected)
        await trio.sleep(0.5)                 # the sshd answers 0.5 s after the start call returns
        return b"SSH-2.0-x"

    monkeypatch.setattr(fleet_mod.probe, "wait_for_banner", recording_probe)
    backend = FakeBackend()
    backend.start_delay = 1.0
    fleet = Fleet({"box": machine_config("box")}, {backend.name: backend}, Metrics(), nursery)
    backend.fleet = fleet
    with trio.fail_after(60):
        (await fleet.acquire("box")).release()
        assert seen == [None]                 # first boot: nothing known yet
        assert fleet.machines["box"].typical_boot() == pytest.approx(1.5)
        await fleet.stop("box")
        (await fleet.acquire("box")).release()
    assert seen[1] == pytest.approx(0.5)      # 1.5 s usual, 1.0 s of it spent in the start call


async def test_a_fake_probe_is_called_with_the_address_alone(nursery, autojump_clock):
    """Tests and embedders may pass their own readiness (address) -> awaitable, as before."""
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box"))
    with trio.fail_after(60):
        (await fleet.acquire("box")).release()
    assert backend.count("start") == 1


# -- a real refused connect ----------------------------------------------------------------

@pytest.mark.e2e
async def test_refused_connect_returns_at_once():
    """ECONNREFUSED must end an attempt at once, not after the connect timeout."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, never listening: connects are refused
        t0 = trio.current_time()
        with trio.fail_after(5):
            assert await probe.read_banner(Address("127.0.0.1", port)) is None
        assert trio.current_time() - t0 < probe.CONNECT_TIMEOUT / 2
