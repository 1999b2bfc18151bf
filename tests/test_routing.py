"""TableRouter and the `user+machine` login syntax, on the routing table of tests/configs/valid.toml.

alice may use box1 (her default) and box2; bob only box2. The refusal texts are what the
user sees in their terminal, so they are asserted exactly; they must not tell a machine
that exists apart from one that does not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fleetgate.config import load
from fleetgate.routing import RoutingError, TableRouter, Target, split_login

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_check import place, write_keys  # noqa: E402


@pytest.fixture
def router(tmp_path: Path) -> TableRouter:
    write_keys(tmp_path)
    cfg = load(place(tmp_path, "valid.toml"))
    return TableRouter(cfg.users, cfg.machines)


@pytest.mark.parametrize("login, expected", [
    ("alice", ("alice", None)),
    ("alice+box2", ("alice", "box2")),
    ("alice+", ("alice", "")),
    ("alice+box2+x", ("alice", "box2+x")),   # only the first '+' separates; machine names have none
    ("+box2", ("", "box2")),
    ("", ("", None)),
])
def test_split_login(login: str, expected: tuple[str, str | None]) -> None:
    assert split_login(login) == expected


async def test_default_machine_is_the_first(router: TableRouter) -> None:
    assert await router.route("alice", None) == Target("alice", "box1", "alice")


async def test_plus_target_selects_an_allowed_machine(router: TableRouter) -> None:
    # box2 logs in as its configured `user`, not as the gateway user.
    assert await router.route("alice", "box2") == Target("alice", "box2", "dev")
    assert await router.route("bob", None) == Target("bob", "box2", "dev")
    assert await router.route("bob", "box2") == Target("bob", "box2", "dev")


@pytest.mark.parametrize("user, target, message", [
    ("bob", "box1", "fleetgate: bob may not use box1"),          # exists, not bob's
    ("bob", "box9", "fleetgate: bob may not use box9"),          # does not exist: same words
    ("alice", "box2+x", "fleetgate: alice may not use box2+x"),
    ("alice", "", "fleetgate: no machine name after '+' in alice+"),
    ("mallory", None, "fleetgate: no machine for mallory"),
    ("mallory", "box1", "fleetgate: no machine for mallory"),
    ("", "box2", "fleetgate: no machine for "),
])
async def test_refusals(router: TableRouter, user: str, target: str | None, message: str) -> None:
    with pytest.raises(RoutingError) as info:
        await router.route(user, target)
    assert str(info.value) == message


async def test_login_strings_end_to_end(router: TableRouter) -> None:
    """What the front does with the SSH user name: split, then route."""
    assert (await router.route(*split_login("alice+box2"))).machine == "box2"
    assert (await router.route(*split_login("alice"))).machine == "box1"
    with pytest.raises(RoutingError):
        await router.route(*split_login("alice+"))


def test_may_reach_is_the_same_table(router: TableRouter) -> None:
    """Jump mode asks may_reach(); it must agree with route() for every pair."""
    assert router.may_reach("alice", "box1") and router.may_reach("alice", "box2")
    assert router.may_reach("bob", "box2")
    assert not router.may_reach("bob", "box1")
    assert not router.may_reach("alice", "box9")
    assert not router.may_reach("mallory", "box1")
    assert not router.may_reach("alice", "")

