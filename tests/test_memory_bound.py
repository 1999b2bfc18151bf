"""One authenticated user cannot make the gateway buffer without bound.

The client picks its channel window: a client that advertises 2 GiB and then stops reading
its TCP socket while the machine sends as fast as it can (`cat /dev/zero`) made the gateway
buffer everything (137 MB → 2.2 GB in 10 s). What the gateway holds per channel is bounded
by its own window and buffers, whatever the client advertises (docs/security.md).
"""

from __future__ import annotations

import asyncio

import asyncssh
import pytest
import trio
import trio_asyncio

from hostile import GatewayProcess

pytestmark = pytest.mark.e2e

CHANNELS = 3
HUGE_WINDOW = 2 * 1024 ** 3
WATCH_SECONDS = 6.0
BOUND_MIB = 96  # 3 channels × gateway.window (8 MiB) of held machine data + allocator slack; docs/security.md


async def open_and_stop_reading(port: int, key: str) -> tuple[asyncssh.SSHClientConnection, list]:
    conn = await asyncssh.connect("127.0.0.1", port, username="alice", client_keys=[key], known_hosts=None,
                                  agent_path=None, config=[])
    chans = []
    for _ in range(CHANNELS):
        chan, _ = await conn.create_session(asyncssh.SSHClientSession, "cat /dev/zero", encoding=None,
                                            window=HUGE_WINDOW)
        chans.append(chan)
    await asyncio.sleep(0.2)  # let the data start flowing before the client stops reading
    conn._transport.pause_reading()  # noqa: SLF001  the attacker: a client that never reads its socket
    return conn, chans


async def test_a_client_that_never_reads_cannot_grow_the_gateway(tmp_path):
    async with GatewayProcess(tmp_path) as gw, trio_asyncio.open_loop():
        t, r = await gw.login("alice", "true")  # wake the machine
        assert r.returncode == 0, r.err
        before = gw.rss_mib()
        conn, _ = await trio_asyncio.aio_as_trio(open_and_stop_reading)(gw.port, str(gw.fleet.client_key))
        peak = before
        deadline = trio.current_time() + WATCH_SECONDS
        while trio.current_time() < deadline:  # measuring over time is the point here
            peak = max(peak, gw.rss_mib())
            await trio.sleep(0.2)
        # The gateway still serves everyone else meanwhile.
        t, r = await gw.login("bob", "echo ok")
        assert r.returncode == 0 and r.out == "ok\n", r.err
        conn.abort()
        growth = peak - before
        print(f"\ngateway RSS before {before:.0f} MiB, peak {peak:.0f} MiB (+{growth:.0f}) with {CHANNELS} "
              f"non-reading channels")
        assert growth < BOUND_MIB, f"+{growth:.0f} MiB"
        assert gw.alive()
