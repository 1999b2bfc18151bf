"""The login flow (fleetgate/login.py) without sockets: fake backend, MockClock, fake upstream."""

from __future__ import annotations

import pytest
import trio

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.errors import UpstreamError
from fleetgate.fleet import State
from fleetgate.login import Refused, log_in
from fleetgate.routing import TableRouter
from fleetgate.config import UserConfig


def router(*machines: str) -> TableRouter:
    users = {"alice": UserConfig("alice", ("k",), tuple(machines))}
    return TableRouter(users, {m: machine_config(m) for m in machines})


class Upstream:
    """A fake upstream login: each call pops the next outcome (an exception or a value)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls: list[tuple] = []

    async def __call__(self, target, address, password):
        self.calls.append((target.machine, target.upstream_user, password))
        outcome = self.outcomes.pop(0) if self.outcomes else "conn"
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


async def test_wakes_the_routed_machine_and_holds_it(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"), machine_config("box2"))
    lines: list[str] = []
    up = Upstream()
    session = await log_in("alice+box2", router=router("box1", "box2"), fleet=fleet, connect=up,
                           progress=lines.append)
    assert session.target.machine == "box2" and session.upstream == "conn"
    assert backend.count("start", "box2") == 1 and backend.count("start", "box1") == 0
    assert fleet.machines["box2"].sessions == 1
    assert lines and "starting box2" in lines[0]
    session.lease.release()
    assert fleet.machines["box2"].sessions == 0


async def test_routing_refusal_wakes_nothing(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"), machine_config("box2"))
    with pytest.raises(Refused) as refused:
        await log_in("alice+box3", router=router("box1"), fleet=fleet, connect=Upstream())
    assert refused.value.reason == "routing_refused" and "box3" in refused.value.message
    assert backend.calls == []


async def test_failed_wake_is_refused_with_the_backend_reason(nursery, autojump_clock):
    backend = FakeBackend()
    backend.fail_start.add("box1")
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    with pytest.raises(Refused) as refused:
        await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream())
    assert refused.value.reason == "wake_failed" and "the fake API said no" in refused.value.message
    assert fleet.machines["box1"].sessions == 0


async def test_dead_machine_is_noticed_and_woken_again_once(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    (await fleet.acquire("box1")).release()
    from fleetgate.backends.base import PowerState
    backend.power["box1"] = PowerState.STOPPED  # died behind the gateway's back
    failures: list[str] = []
    up = Upstream(UpstreamError("upstream_error", "cannot reach box1"), "conn2")
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=up,
                           upstream_failed=failures.append)
    assert session.upstream == "conn2" and failures == ["upstream_error"]
    assert backend.count("start", "box1") == 2
    assert fleet.machines["box1"].sessions == 1


async def test_second_upstream_failure_is_refused_and_holds_nothing(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    up = Upstream(UpstreamError("upstream_error", "a"), UpstreamError("upstream_error", "fleetgate: still down"))
    with pytest.raises(Refused) as refused:
        await log_in("alice", router=router("box1"), fleet=fleet, connect=up)
    assert refused.value.reason == "upstream_failed" and refused.value.message == "fleetgate: still down"
    assert fleet.machines["box1"].sessions == 0


@pytest.mark.parametrize("reason", ["host_key_mismatch", "upstream_auth"])
async def test_upstream_refusals_are_not_retried(nursery, autojump_clock, reason):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    up = Upstream(UpstreamError(reason, "no"))
    with pytest.raises(Refused) as refused:
        await log_in("alice", router=router("box1"), fleet=fleet, connect=up)
    assert refused.value.reason == "upstream_failed" and len(up.calls) == 1


async def test_a_wrong_password_is_a_failed_attempt_not_an_error(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    failures: list[str] = []
    up = Upstream(UpstreamError("upstream_auth", "fleetgate: permission denied"))
    with pytest.raises(Refused) as refused:
        await log_in("alice", router=router("box1"), fleet=fleet, connect=up, password="pw",
                     upstream_failed=failures.append)
    assert refused.value.reason == "password_rejected" and failures == []
    assert up.calls == [("box1", "alice", "pw")]
    assert fleet.machines["box1"].sessions == 0


async def test_a_client_that_left_during_the_boot_holds_nothing(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    gone = trio.Event()

    async def leave():
        await trio.sleep(backend.start_delay / 2)
        gone.set()

    nursery.start_soon(leave)
    with pytest.raises(Refused) as refused:
        await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream(),
                     still_wanted=lambda: not gone.is_set())
    assert refused.value.reason == "gone"
    assert fleet.machines["box1"].state is State.RUNNING and fleet.machines["box1"].sessions == 0


async def test_a_login_cancelled_during_the_upstream_handshake_holds_nothing(nursery, autojump_clock):
    """asyncssh cancels an auth callback when the client sends another USERAUTH_REQUEST."""
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))

    async def slow_upstream(target, address, password):
        await trio.sleep(5)
        return "conn"

    with trio.move_on_after(backend.start_delay + 1):
        await log_in("alice", router=router("box1"), fleet=fleet, connect=slow_upstream)
        raise AssertionError("not cancelled")
    assert fleet.machines["box1"].state is State.RUNNING and fleet.machines["box1"].sessions == 0


async def test_timings_say_whether_the_login_needed_a_wake(nursery, autojump_clock):
    """time-to-shell (issue 14): from authentication to the session, split by wake; one upstream timing."""
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    ready: list[tuple[bool, float]] = []
    connected: list[float] = []
    for _ in range(2):
        session = await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream(),
                               connected=connected.append, ready=lambda woke, s: ready.append((woke, s)))
        session.lease.release()
    assert [woke for woke, _ in ready] == [True, False]  # the first woke box1, the second found it running
    assert ready[0][1] > 0 and ready[1][1] == 0  # the fake boot takes (mock) time; a running machine none
    assert len(connected) == 2


# -- lazy upstream (issue 15): a jump needs the machine, not the gateway's own login ----------

from fleetgate.login import connect_upstream  # noqa: E402


async def test_a_lazy_login_holds_the_machine_without_logging_in(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    up = Upstream()
    ready: list[tuple[bool, float]] = []
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=up, lazy=True,
                           ready=lambda woke, s: ready.append((woke, s)))
    assert session.upstream is None and up.calls == []  # the machine's sshd saw nothing from us
    assert fleet.machines["box1"].state is State.RUNNING and fleet.machines["box1"].sessions == 1
    assert session.woke and session.waited > 0 and ready == []  # the caller observes readiness
    connected: list[float] = []
    assert await connect_upstream(session, fleet=fleet, connect=up, connected=connected.append) == "conn"
    assert session.upstream == "conn" and len(up.calls) == 1 and len(connected) == 1
    assert fleet.machines["box1"].sessions == 1  # still the one lease
    session.lease.release()


async def test_a_password_login_is_never_lazy(nursery, autojump_clock):
    """Only the machine's sshd can check the password, before the user is let in."""
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    up = Upstream()
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=up, password="pw", lazy=True)
    assert session.upstream == "conn" and up.calls == [("box1", "alice", "pw")]
    session.lease.release()


@pytest.mark.parametrize("reason", ["host_key_mismatch", "upstream_auth"])
async def test_a_failed_lazy_login_lets_the_machine_go(nursery, autojump_clock, reason):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    failures: list[str] = []
    up = Upstream(UpstreamError(reason, f"fleetgate: {reason}"))
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=up, lazy=True)
    with pytest.raises(Refused) as refused:
        await connect_upstream(session, fleet=fleet, connect=up, upstream_failed=failures.append)
    assert refused.value.reason == "upstream_failed" and refused.value.message == f"fleetgate: {reason}"
    assert failures == [reason] and len(up.calls) == 1
    assert session.lease is None and fleet.machines["box1"].sessions == 0


async def test_a_lazy_login_to_a_machine_that_died_wakes_it_again_once(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream(), lazy=True)
    from fleetgate.backends.base import PowerState
    backend.power["box1"] = PowerState.STOPPED  # died between the user's login and the first session
    up = Upstream(UpstreamError("upstream_error", "cannot reach box1"), "conn2")
    assert await connect_upstream(session, fleet=fleet, connect=up) == "conn2"
    assert backend.count("start", "box1") == 2 and fleet.machines["box1"].sessions == 1
    session.lease.release()


async def test_a_lazy_login_after_a_jump_dropped_the_lease_holds_the_machine_again(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream(), lazy=True)
    session.lease.release()  # a pure jump lets the login's own hold go
    session.lease = None
    await fleet.stop("box1")
    assert await connect_upstream(session, fleet=fleet, connect=Upstream()) == "conn"
    assert fleet.machines["box1"].state is State.RUNNING and fleet.machines["box1"].sessions == 1
    session.lease.release()


async def test_a_lazy_login_cancelled_mid_handshake_holds_nothing(nursery, autojump_clock):
    backend = FakeBackend()
    fleet = make_fleet(nursery, backend, machine_config("box1"))
    session = await log_in("alice", router=router("box1"), fleet=fleet, connect=Upstream(), lazy=True)

    async def slow_upstream(target, address, password):
        await trio.sleep(5)
        return "conn"

    with trio.move_on_after(1):
        await connect_upstream(session, fleet=fleet, connect=slow_upstream)
        raise AssertionError("not cancelled")
    assert session.lease is None and session.upstream is None and fleet.machines["box1"].sessions == 0
