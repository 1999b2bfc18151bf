"""The session core, end to end with the real OpenSSH client: what a user reads when the
machine goes away under a session, and a reload that changes the front's algorithms."""

from __future__ import annotations

import re
import signal

import pytest
import trio

from helpers import ServeProcess, Session, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


async def _open(fleet, nursery) -> Session:
    return await Session(fleet.ssh("alice", "echo ready; cat")).open(nursery)


async def test_forced_stop_tells_the_user_why_and_exits_non_zero(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    running = await start_gateway(nursery, fleet, cfg)
    session = await _open(fleet, nursery)
    assert await session.echo(b"ping\n") == b"ping\n"
    assert await running.fleet.stop("alice")  # what `fleetgate stop alice --force` asks the fleet
    with trio.fail_after(20):
        rc = await session.proc.wait()
    await session.wait_err(b"alice was stopped")
    assert rc != 0
    assert b"fleetgate stop --force" in session.err


async def test_machine_lost_under_a_session_tells_the_user(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    running = await start_gateway(nursery, fleet, cfg)
    session = await _open(fleet, nursery)
    m = running.fleet.machines["alice"]
    await m.backend.force_stop(m.config)  # the machine dies behind the gateway's back
    with trio.fail_after(20):
        rc = await session.proc.wait()
    await session.wait_err(b"lost the connection to alice")
    assert rc != 0


async def test_sighup_applies_new_ciphers_to_new_connections(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    text = fleet.config_path.read_text()
    fleet.config_path.write_text(text.replace("[gateway]\n", '[gateway]\nciphers = ["aes128-gcm@openssh.com"]\n', 1))
    serve = await ServeProcess(fleet.config_path).start(nursery)
    try:
        def ssh(*extra: str) -> list[str]:
            return ["ssh", *fleet.ssh_opts(serve.port), "-vv", *extra, "alice@127.0.0.1", "echo ok"]

        before = await run(ssh())
        assert before.returncode == 0, before.err
        assert re.search(r"cipher: aes128-gcm@openssh.com", before.err)
        refused = await run(ssh("-o", "Ciphers=aes256-gcm@openssh.com"))
        assert refused.returncode == 255 and "no matching cipher" in refused.err
        # Reload with another cipher; a session opened before keeps running on the old one.
        alice = await Session(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        fleet.config_path.write_text(text.replace("[gateway]\n", '[gateway]\nciphers = ["aes256-gcm@openssh.com"]\n', 1))
        serve.signal(signal.SIGHUP)
        await serve.wait_for("config reloaded")
        after = await run(ssh())
        assert after.returncode == 0, after.err
        assert re.search(r"cipher: aes256-gcm@openssh.com", after.err)
        old = await run(ssh("-o", "Ciphers=aes128-gcm@openssh.com"))
        assert old.returncode == 255 and "no matching cipher" in old.err
        assert await alice.echo(b"still here\n") == b"still here\n"
        assert await alice.close() == 0
    finally:
        await serve.kill()


async def test_relayed_bytes_show_while_a_session_runs_and_are_counted_once(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    running = await start_gateway(nursery, fleet, cfg)
    session = await _open(fleet, nursery)
    up = lambda: fleet.metric("fleetgate_relayed_bytes_total", direction="up", mode="relay")  # noqa: E731
    before = up()
    chunk = b"x" * 65535 + b"\n"
    for _ in range(4):
        assert await session.echo(chunk) == chunk
    running.metrics.exposition()  # a scrape: open channels are counted first
    during = up() - before
    assert during >= 4 * len(chunk)  # visible while the session is still open
    assert await session.close() == 0
    with trio.fail_after(20):
        while running.gateway.connections:
            await running.gateway.connections_changed.wait()
    running.metrics.exposition()
    assert up() - before == during  # the end of the channel adds only what came after the scrape (nothing)
