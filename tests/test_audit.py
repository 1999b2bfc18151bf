"""Audit log: one JSON line per session start and end; a lost destination never breaks sessions."""

from __future__ import annotations

import pytest

import json

import trio

from helpers import make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


async def test_audit_lines_for_relay_and_jump_sessions(tmp_path, nursery):
    audit = tmp_path / "audit.jsonl"
    fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc.update(audit={"file": str(audit)}))
    await start_gateway(nursery, fleet, cfg)
    payload = b"z" * 100_000
    r = await run(fleet.ssh("alice", "cat; printf 12345"), stdin=payload)
    assert r.returncode == 0, r.err
    outer = " ".join(["ssh", *fleet.ssh_opts(), "-W", "%h:%p", "alice@127.0.0.1"])
    r = await run(["ssh", "-F", "/dev/null", "-i", str(fleet.client_key), "-o", f"UserKnownHostsFile={fleet.known_hosts}",
                   "-o", "BatchMode=yes", "-o", f"ProxyCommand={outer}", f"{cfg.machines['alice'].user}@alice", "true"])
    assert r.returncode == 0, r.err
    with trio.fail_after(10):  # the clients have exited; wait for the gateway to see both ends
        await fleet.running.fleet.wait_sessions(fleet.machine("alice"), 0)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    relay = [x for x in lines if x["mode"] == "relay"]
    jump = [x for x in lines if x["mode"] == "jump"]
    starts = [x for x in relay if x["event"] == "session_start"]
    ends = [x for x in relay if x["event"] == "session_end"]
    assert len(starts) >= 2 and len(ends) >= 1
    first_end = ends[0]
    assert first_end["user"] == "alice" and first_end["machine"] == "alice"
    assert first_end["source"].startswith("127.0.0.1:")
    assert first_end["bytes_up"] == len(payload)
    assert first_end["bytes_down"] == len(payload) + 5
    assert first_end["result"] == "closed" and first_end["seconds"] >= 0
    assert [x["event"] for x in jump] == ["session_start", "session_end"]
    assert jump[1]["bytes_up"] > 0 and jump[1]["bytes_down"] > 0


async def test_unwritable_audit_log_is_counted_and_sessions_continue(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc.update(audit={"file": "/dev/full"}))
    await start_gateway(nursery, fleet, cfg)
    for _ in range(2):
        r = await run(fleet.ssh("alice", "echo still-works"))
        assert (r.returncode, r.out) == (0, "still-works\n"), r.err
    assert fleet.metric("fleetgate_audit_write_failures_total") >= 2
