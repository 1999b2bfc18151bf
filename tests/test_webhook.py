"""The webhook router's parts without sockets: [routing] validation, the TTL cache, single
flight, and what an answer may say (issue 13). End to end: tests/test_webhook_e2e.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from fleetgate.config import ConfigError, load
from fleetgate.webhook import CachedCalls, TTLCache, WebhookError, user_message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_check import place, write_keys  # noqa: E402


def config_with(tmp_path: Path, routing: str, *, drop_users: bool = False) -> Path:
    write_keys(tmp_path)
    path = place(tmp_path, "valid.toml")
    text = path.read_text()
    if drop_users:
        text = text.split("[users.", 1)[0]
    path.write_text(text + "\n[routing]\n" + routing)
    return path


def issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(path)
    return [str(i) for i in exc.value.issues]


def test_webhook_routing_needs_no_users_and_parses(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    token.chmod(0o600)
    path = config_with(tmp_path, 'type = "webhook"\nurl = "https://inv.example/route"\n'
                                 'keys_url = "https://inv.example/keys"\ntimeout = 1.5\n'
                       + 'cache_ttl = "2m"\ntoken_file = "token"\n', drop_users=True)
    cfg = load(path)
    rc = cfg.routing
    assert (rc.type, rc.url, rc.keys_url, rc.timeout, rc.cache_ttl, rc.token) == \
        ("webhook", "https://inv.example/route", "https://inv.example/keys", 1.5, 120.0, "abc123")
    assert "abc123" not in repr(rc)  # the token never reaches a log line through repr
    assert not cfg.users


@pytest.mark.parametrize("routing, expected", [
    ('type = "webhook"\n', "key 'routing.url': missing; type = \"webhook\" needs the routing service's URL"),
    ('type = "ldap"\n', "key 'routing.type': must be 'table' (the [users.NAME] tables) or 'webhook'"),
    ('type = "webhook"\nurl = "ftp://x/route"\n', "key 'routing.url': 'ftp://x/route' is not an http:// or https:// URL"),
    ('type = "webhook"\nurl = "https://u:p@x/route"\n', "key 'routing.url': must not carry credentials"),
    ('url = "https://x/route"\n', "key 'routing.url': given with type = \"table\""),
    ('type = "webhook"\nurl = "http://x/r"\ntimeout = 0\n', "key 'routing.timeout': must be between 0.1 and 30"),
    ('type = "webhook"\nurl = "http://x/r"\ntoken_file = "nope"\n', "key 'routing.token_file': no such file"),
    ('type = "webhook"\nurl = "http://x/r"\ncache_size = 0\n', "key 'routing.cache_size': must be 1 or more"),
    ('type = "webhook"\nurl = "http://x/r"\nretries = 3\n', "key 'routing.retries': unknown key; allowed here:"),
    ('timeout = 3\n', "key 'routing': webhook options given but no routing.url nor routing.keys_url"),
])
def test_check_names_file_and_key(tmp_path: Path, routing: str, expected: str) -> None:
    path = config_with(tmp_path, routing)
    found = issues(path)
    assert any(i.startswith(f"{path}: {expected}") for i in found), found


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    path = config_with(tmp_path, 'type = "webhook"\nurl = "http://x/r"\ntoken_file = "token"\n')
    assert any("key 'routing.token_file'" in i and "chmod 600" in i for i in issues(path))


def test_users_still_required_with_table_routing(tmp_path: Path) -> None:
    path = config_with(tmp_path, 'keys_url = "http://x/keys"\n', drop_users=True)
    assert any("key 'users': no users" in i for i in issues(path))


async def test_ttl_cache_expires_and_stays_bounded(autojump_clock) -> None:
    c: TTLCache[int] = TTLCache(size=2, ttl=10)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == (True, 1)  # a is now the most recently used
    c.put("c", 3)
    assert c.get("b") == (False, None) and len(c) == 2
    await trio.sleep(10)
    assert c.get("a") == (False, None) and c.get("c") == (False, None)
    off: TTLCache[int] = TTLCache(size=2, ttl=0)
    off.put("a", 1)
    assert off.get("a") == (False, None)


async def test_single_flight_shares_one_fetch_and_errors_are_not_cached(autojump_clock) -> None:
    calls = CachedCalls[str](size=10, ttl=60)
    fetched = []
    gate = trio.Event()

    async def fetch() -> str:
        fetched.append(1)
        await gate.wait()
        return "answer"

    results = []

    async def ask() -> None:
        results.append(await calls.get("k", fetch))

    async with trio.open_nursery() as n:
        for _ in range(30):
            n.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert results == ["answer"] * 30 and len(fetched) == 1
    assert await calls.get("k", fetch) == "answer" and len(fetched) == 1  # cached

    async def failing() -> str:
        fetched.append(2)
        raise WebhookError("error", "fleetgate: the routing service failed", "HTTP 500")

    for _ in range(2):
        with pytest.raises(WebhookError):
            await calls.get("e", failing)
    assert fetched.count(2) == 2  # a failure is asked again, not remembered


async def test_a_cancelled_fetch_hands_over_to_the_next_waiter(autojump_clock) -> None:
    """The login doing the fetch leaves (its client disconnected): a waiter fetches instead."""
    calls = CachedCalls[str](size=10, ttl=60)
    started = trio.Event()
    leader = trio.CancelScope()

    async def slow() -> str:
        started.set()
        await trio.sleep_forever()
        return "never"

    async def quick() -> str:
        return "from the second"

    async def lead() -> None:
        with leader:
            await calls.get("k", slow)

    got = []

    async def follow() -> None:
        got.append(await calls.get("k", quick))

    async with trio.open_nursery() as n:
        n.start_soon(lead)
        await started.wait()
        n.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()
    assert got == ["from the second"]


def test_user_message_is_printable_bounded_and_marked() -> None:
    assert user_message("on leave\x1b[2J\nbye", "x") == "fleetgate: on leave [2J bye"
    assert user_message("fleetgate: already marked", "x") == "fleetgate: already marked"
    assert user_message(None, "fallback") == "fallback"
    assert user_message("   ", "fallback") == "fallback"
    assert len(user_message("a" * 1000, "x")) == len("fleetgate: ") + 300


def test_reload_keeps_the_cache_while_routing_is_unchanged(tmp_path: Path) -> None:
    import dataclasses

    from fleetgate.app import App
    from fleetgate.routing import TableRouter
    from fleetgate.webhook import WebhookRouter

    cfg = load(config_with(tmp_path, 'type = "webhook"\nurl = "http://127.0.0.1:9/route"\n'
                                     'keys_url = "http://127.0.0.1:9/keys"\n'))
    app = App(cfg)
    first, again = app.build_router(cfg), app.build_router(cfg)
    assert isinstance(first, WebhookRouter) and first.calls is again.calls and first.keys is again.keys
    changed = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, timeout=5.0))
    third = app.build_router(changed)
    assert third.calls is not first.calls and len(app._old_webhooks) == 1  # closed at shutdown
    keys_only = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, type="table", url=None))
    table = app.build_router(keys_only)
    assert isinstance(table, TableRouter) and table.keys is not None
    plain = dataclasses.replace(cfg, routing=dataclasses.replace(cfg.routing, type="table", url=None, keys_url=None))
    assert app.build_router(plain).keys is None
