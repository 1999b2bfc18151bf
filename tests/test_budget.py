"""The budget ledger (fleetgate/budget.py): it adds up, refuses with the limit's name, never leaks."""

from __future__ import annotations

import random

import pytest

from fleetgate import budget
from fleetgate.budget import GiB, KiB, MiB, BudgetExceeded, Budgets, BudgetLimits, HoldGroup


def limits(**kw) -> BudgetLimits:
    base = dict(fds_total=100, fds_per_user=30, buffer_total=64 * MiB, buffer_per_user=16 * MiB,
                channels_total=50, channels_per_user=20)
    base.update(kw)
    return BudgetLimits(**base)


def test_random_open_close_returns_the_ledger_to_zero():
    """Connections and channels of several users opened, refused and closed in random order
    (channels closed on their own or by their connection's end): nothing is left held."""
    rng = random.Random(25)
    b = Budgets(limits())
    refusals = 0
    for _ in range(20):
        conns: list[tuple[str, HoldGroup]] = []
        for _ in range(400):
            op = rng.random()
            if op < 0.25 or not conns:
                user = rng.choice("abcde")
                group = HoldGroup()
                try:
                    group.add(b.take(user, fds=2, what="connection"))
                except BudgetExceeded:
                    refusals += 1
                    continue
                conns.append((user, group))
            elif op < 0.75:
                user, group = rng.choice(conns)
                try:
                    group.add(b.take_channel(user, want_window=rng.choice([64 * KiB, 1 * MiB, 8 * MiB]),
                                             fds=rng.choice([0, 1])))
                except BudgetExceeded:
                    refusals += 1
            elif op < 0.9:
                _, group = rng.choice(conns)
                holds = list(group._holds)
                if holds:
                    hold = rng.choice(holds)
                    hold.close()
                    hold.close()  # idempotent
            else:
                conns.remove(pair := rng.choice(conns))
                pair[1].close()
            for kind in budget.KINDS:  # the invariants hold at every step
                assert 0 <= b.used[kind] <= b.limits.limit(kind, "gateway")
                assert sum(u[kind] for u in b.users.values()) == b.used[kind]
                assert all(u[kind] <= b.limits.limit(kind, "user") for u in b.users.values())
        for _, group in conns:
            group.close()
        assert b.used == {"fds": 0, "buffer": 0, "channels": 0}
        assert b.users == {}
    assert refusals > 100  # the budgets were reached, not merely never approached


def test_refusals_name_the_limit_and_count_by_kind_and_scope():
    seen = []
    b = Budgets(limits(fds_per_user=4, fds_total=6), on_refusal=lambda kind, scope: seen.append((kind, scope)))
    b.take("alice", fds=2)
    b.take("alice", fds=2)
    with pytest.raises(BudgetExceeded) as exc:
        b.take("alice", fds=2)
    assert exc.value.kind == "fds" and exc.value.scope == "user"
    assert "alice holds 4 of 4 descriptors" in exc.value.message and "limits.fds_per_user" in exc.value.message
    b.take("bob", fds=2)
    with pytest.raises(BudgetExceeded) as exc:
        b.take("carol", fds=2)
    assert exc.value.scope == "gateway" and "limits.fds_total" in exc.value.message
    assert seen == [("fds", "user"), ("fds", "gateway")]


def test_windows_shrink_as_the_buffer_budget_fills_then_channels_are_refused():
    b = Budgets(limits(buffer_per_user=256 * MiB, buffer_total=530 * MiB, channels_per_user=1000,
                       channels_total=2000))
    windows = []
    with pytest.raises(BudgetExceeded) as exc:
        while True:
            hold = b.take_channel("alice", want_window=8 * MiB)
            assert hold.buffer == 2 * hold.window  # both directions are charged
            windows.append(hold.window)
    assert exc.value.kind == "buffer" and "limits.buffer_per_user" in exc.value.message
    assert windows[0] == 8 * MiB  # the first channels get the full window
    assert windows == sorted(windows, reverse=True) and windows[-1] == budget.WINDOW_FLOOR
    assert 80 < len(windows) < 200, len(windows)  # many channels fit, not 16 full ones
    assert b.user_used("alice", "buffer") <= 256 * MiB
    jump = b.take_channel("bob", want_window=8 * MiB, both_ways=False, extra=budget.JUMP_READ)
    assert (jump.window, jump.buffer) == (8 * MiB, 8 * MiB + budget.JUMP_READ)  # others are not affected
    b.take("carol", buffer=256 * MiB)  # the gateway now holds ~520 of 530 MiB
    with pytest.raises(BudgetExceeded) as exc:
        b.take_channel("dave", want_window=8 * MiB, floor=8 * MiB)  # -R: the full window or nothing
    assert exc.value.scope == "gateway" and "limits.buffer_total" in exc.value.message
    assert b.take_channel("dave", want_window=8 * MiB).window < 8 * MiB


def test_defaults_add_up_to_the_fd_limit_and_follow_memory():
    r = budget.resolve(fd_limit=1024, memory=24 * GiB, max_unauthenticated=240, http_connections=60,
                       max_connections_per_user=64, max_channels=64)
    assert r.fd_reserve + 240 + 60 + r.fds_total == 1024
    assert r.fds_per_user == r.fds_total // 8
    assert r.buffer_total == 1 * GiB and r.buffer_per_user == 256 * MiB
    small = budget.resolve(fd_limit=1024, memory=2 * GiB, max_unauthenticated=240, http_connections=60,
                           max_connections_per_user=64, max_channels=64)
    assert small.buffer_total == 128 * MiB
    big = budget.resolve(fd_limit=1 << 20, memory=24 * GiB, max_unauthenticated=1024, http_connections=256,
                         max_connections_per_user=64, max_channels=64)
    assert big.fds_per_user == 64 * 66  # no more than the user's connections and channels can hold
    fixed = budget.resolve(fd_limit=1024, memory=24 * GiB, max_unauthenticated=240, http_connections=60,
                           max_connections_per_user=64, max_channels=64, fds_per_user=10, buffer_total=100 * MiB)
    assert (fixed.fds_per_user, fixed.buffer_total, fixed.buffer_per_user) == (10, 100 * MiB, 25 * MiB)


def test_config_keys_parse_sizes_and_explain_errors(tmp_path):
    from test_config import doc, issues, parse, write_keys

    write_keys(tmp_path)
    parsed = parse(tmp_path, doc(limits={"buffer_per_user": "128 MiB", "buffer_total": 1 << 30,
                                         "fds_per_user": 100, "channels_total": 500})).limits
    assert (parsed.buffer_per_user, parsed.buffer_total, parsed.fds_per_user, parsed.channels_total) == \
        (128 * MiB, 1 << 30, 100, 500)
    assert parsed.fds_total == 0  # derived at run time
    for key, value, words in [("buffer_total", "lots", "is not a size"), ("fds_per_user", 0, "at least 1"),
                              ("channels_per_user", "9", "must be an integer"), ("buffer_per_user", 10, "1 MiB")]:
        assert [(k, words in m) for k, m in issues(tmp_path, doc(limits={key: value}))] == [(f"limits.{key}", True)]


def test_malloc_trim_is_callable():
    assert budget.malloc_trim() in (True, False)


def _size(text: str) -> int:
    number, _, unit = text.strip().partition(" ")
    return int(number) * {"": 1, "MiB": MiB, "GiB": GiB}[unit]


def test_security_md_budget_table_matches_the_code():
    """docs/security.md's "Budgets that add up" table: every key is a [limits] key, and the
    values it gives for `ulimit -n 1024` on a 24 GiB host are what the code derives."""
    from pathlib import Path

    from fleetgate import fdlimit
    from fleetgate.config import BUDGET_KEYS
    from fleetgate.ssh.limits import LimitsConfig

    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    section = text.split("### Budgets that add up", 1)[1]
    rows = []
    for line in section.split("\n\n| budget |", 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break  # the end of the table
        rows.append(line)
    d = LimitsConfig()
    r = budget.resolve(fd_limit=1024, memory=24 * GiB, max_unauthenticated=fdlimit.default_max_unauthenticated(1024),
                       http_connections=fdlimit.default_http_connections(1024),
                       max_connections_per_user=d.max_connections_per_user, max_channels=d.max_channels)
    documented = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        documented[cells[1].strip("`").removeprefix("limits.")] = cells[3]
    assert documented.pop("—") == str(r.fd_reserve)
    assert set(documented) == set(BUDGET_KEYS)
    for key, value in documented.items():
        got = getattr(r, key)
        assert (_size(value) if key.startswith("buffer_") else int(value)) == got, (key, value, got)
    # The file-descriptor table's reserve and the shares add up to the limit, as documented.
    assert f"| 628 |" in section and r.fds_total == 628
    assert r.fd_reserve + fdlimit.default_max_unauthenticated(1024) + fdlimit.default_http_connections(1024) \
        + r.fds_total == 1024


def test_check_warns_when_an_explicit_fds_total_does_not_fit():
    from fleetgate import fdlimit

    assert fdlimit.check(240, 60, 1024, fds_total=628) == []
    warning, = fdlimit.check(240, 60, 1024, fds_total=700)
    assert "limits.fds_total (700)" in warning and "= 1096 descriptors" in warning and "derived: 628" in warning
