"""PreauthLimiter rules, with a fake clock and a seeded RNG."""

from __future__ import annotations

import random

from fleetgate.ssh.limits import LimitsConfig, PreauthLimiter


class Conn:
    def __init__(self):
        self.aborted = False

    def abort(self):
        self.aborted = True


def make(**kw):
    refusals: list[str] = []
    now = {"t": 0.0}
    lim = PreauthLimiter(LimitsConfig(**kw), refusals.append, clock=lambda: now["t"], rng=random.Random(1))
    return lim, refusals, now


def test_per_source_random_early_drop_then_full():
    lim, refusals, _ = make(per_source_start=3, per_source_rate=50, per_source_full=6)
    admitted = [lim.admit("10.0.0.1", Conn()) for _ in range(40)]
    assert admitted[:3] == [True] * 3           # below start: always
    assert 3 < sum(admitted) <= 6               # between start and full: some dropped
    assert set(refusals) == {"per_source"}
    assert lim.admit("10.0.0.2", Conn())        # another source is unaffected


def test_global_cap_evicts_oldest_of_busiest_source():
    lim, refusals, _ = make(max_unauthenticated=4, per_source_start=10, per_source_full=20)
    a = [Conn() for _ in range(3)]
    for c in a:
        assert lim.admit("10.0.0.1", c)
    b = Conn()
    assert lim.admit("10.0.0.2", b)
    newcomer = Conn()
    assert lim.admit("10.0.0.3", newcomer)      # admitted: room is made, not the newcomer refused
    assert a[0].aborted and not a[1].aborted and not b.aborted
    assert refusals == ["evicted"]
    assert lim.unauthenticated == 4


def test_failed_logins_block_the_source_for_a_while_except_exempt():
    lim, refusals, now = make(penalty_after=3, penalty_window=60, penalty_duration=100, exempt=("192.0.2.0/24",))
    for _ in range(3):
        c = Conn()
        assert lim.admit("10.0.0.1", c)
        lim.closed("10.0.0.1", c, failed_auth=True)
    assert not lim.admit("10.0.0.1", Conn())
    assert refusals == ["penalty"]
    now["t"] = 101
    assert lim.admit("10.0.0.1", Conn())
    for _ in range(10):
        c = Conn()
        assert lim.admit("192.0.2.7", c)
        lim.closed("192.0.2.7", c, failed_auth=True)
    assert lim.admit("192.0.2.7", Conn())


def test_authenticated_connections_leave_the_count():
    lim, _, _ = make(per_source_start=1, per_source_rate=100, per_source_full=1)
    c = Conn()
    assert lim.admit("10.0.0.1", c)
    assert not lim.admit("10.0.0.1", Conn())
    lim.authenticated("10.0.0.1", c)
    assert lim.admit("10.0.0.1", Conn())
    assert lim.unauthenticated == 1
