"""Limits after authentication: sshd's MaxSessions, channels per connection, connections per user.

An authenticated user could otherwise open 10 000 session channels on one connection (each
with an upstream channel and buffers), or hundreds of connections (each an upstream login).
"""

from __future__ import annotations

import asyncssh
import pytest
import trio
import trio_asyncio

from helpers import Session, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


def limits(**kw):
    def patch(doc):
        doc.setdefault("limits", {}).update(kw)
    return patch


async def _sessions_until_refused(port: int, key_path: str, known_hosts: str, count: int) -> tuple[int, str]:
    async with asyncssh.connect("127.0.0.1", port, username="alice", client_keys=[key_path],
                                known_hosts=None, agent_path=None, config=[]) as conn:
        opened = []
        try:
            for _ in range(count):
                chan, _ = await conn.create_session(asyncssh.SSHClientSession, "cat")
                opened.append(chan)
        except asyncssh.ChannelOpenError as exc:
            return len(opened), exc.reason
        return len(opened), ""


async def test_max_sessions_refuses_the_next_session_with_a_reason(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=limits(max_sessions=3, max_channels=5))
    running = await start_gateway(nursery, fleet, cfg)
    async with trio_asyncio.open_loop():
        opened, reason = await trio_asyncio.aio_as_trio(_sessions_until_refused)(
            fleet.port, str(fleet.client_key), str(fleet.known_hosts), 50)
    assert opened == 3
    assert "at most 3 sessions per connection" in reason
    assert fleet.metric("fleetgate_channels_total", kind="session", result="limit") == 1
    # The connection's holds are all released afterwards.
    with trio.fail_after(20):
        while running.fleet.machines["alice"].sessions:
            await trio.sleep(0.05)  # released by the gateway's connection_lost; nothing to await on


async def test_max_channels_counts_forwards_too(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=limits(max_sessions=10, max_channels=2))
    await start_gateway(nursery, fleet, cfg)

    async def go() -> tuple[str, str]:
        async with asyncssh.connect("127.0.0.1", fleet.port, username="alice", client_keys=[str(fleet.client_key)],
                                    known_hosts=None, agent_path=None, config=[]) as conn:
            for _ in range(2):
                await conn.create_session(asyncssh.SSHClientSession, "cat")
            reasons = []
            try:
                await conn.open_connection("localhost", 9)  # -L: refused for the cap, before any connect
            except asyncssh.ChannelOpenError as exc:
                reasons.append(exc.reason)
            try:
                await conn.create_session(asyncssh.SSHClientSession, "cat")
            except asyncssh.ChannelOpenError as exc:
                reasons.append(exc.reason)
            return reasons[0], reasons[1]

    async with trio_asyncio.open_loop():
        forward, session = await trio_asyncio.aio_as_trio(go)()
    assert "at most 2 channels per connection" in forward
    assert "at most 2 channels per connection" in session
    assert fleet.metric("fleetgate_channels_total", kind="forward", result="limit") == 1
    assert fleet.metric("fleetgate_channels_total", kind="session", result="limit") == 1


async def test_connections_per_user_are_capped_before_anything_wakes(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=limits(max_connections_per_user=2))
    running = await start_gateway(nursery, fleet, cfg)
    held = [await Session(fleet.ssh("alice", "echo ready; cat")).open(nursery) for _ in range(2)]
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode == 255
    assert "alice already has 2 connections open (limit 2)" in r.err
    assert fleet.metric("fleetgate_connections_total", result="user_limit") == 1
    assert running.fleet.machines["bob"].state.value == "stopped"
    r = await run(fleet.ssh("bob", "true"))  # another user is not affected
    assert r.returncode == 0, r.err
    assert await held[0].close() == 0
    with trio.fail_after(20):
        while running.gateway.user_connections.get("alice", 0) != 1:
            await running.gateway.connections_changed.wait()
    r = await run(fleet.ssh("alice", "true"))  # a slot is free again
    assert r.returncode == 0, r.err
    assert await held[1].close() == 0
