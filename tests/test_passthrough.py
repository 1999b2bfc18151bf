"""The opt-in passthrough listener: wake on connect, splice to the machine's own sshd, rate-limit sources.

SSH is not terminated here: scp talks to the machine's sshd directly, so it verifies the
machine's host key (from the demo known_hosts, under its alias `alice`) and logs in with
the client key, which the demo authorises on its machines.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from fleetgate.config import ConfigError
from fleetgate.passthrough import RateLimiter
from helpers import make_fleet, run, start_gateway


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def direct_opts(fleet) -> list[str]:
    """OpenSSH options for the machine alice itself (end to end), through the passthrough port."""
    return [
        "-i", str(fleet.client_key),
        "-o", f"UserKnownHostsFile={fleet.known_hosts}",
        "-o", "HostKeyAlias=alice",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=30",
        "-F", "/dev/null",
    ]


def with_passthrough(limit: int):
    def patch(doc: dict) -> None:
        doc["machines"]["alice"]["passthrough_listen"] = "127.0.0.1:0"
        doc["passthrough"] = {"per_source_per_minute": limit}
    return patch


async def wait_sessions_zero(machine) -> None:
    # The lease is released when our side of the splice sees the end, just after scp exits;
    # sessions have no event to await, so poll briefly (bounded).
    with trio.fail_after(10):
        while machine.sessions:
            await trio.sleep(0.02)


@pytest.mark.e2e
async def test_scp_20mib_through_passthrough_wakes_the_machine_end_to_end(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=with_passthrough(10))
    running = await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=True)
    port = running.passthrough_ports["alice"]
    assert set(running.passthrough_ports) == {"alice"}  # bob did not opt in
    m = fleet.machine("alice")
    assert m.state.value == "stopped"

    src = tmp_path / "blob"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    dst = "/tmp/copied"   # on the machine (its own /tmp), as its own account
    me = cfg.machines["alice"].user
    r = await run(["scp", "-q", "-P", str(port), *direct_opts(fleet), str(src), f"{me}@127.0.0.1:{dst}"],
                  timeout=120)
    assert r.returncode == 0, r.err
    assert m.state.value == "running" and m.start_calls == 1
    await wait_sessions_zero(m)
    assert fleet.metric("fleetgate_relayed_bytes_total", direction="up", mode="passthrough") > 20 * 1024 * 1024
    assert fleet.metric("fleetgate_passthrough_refusals_total", reason="rate_limited") == 0

    # And back, through a second connection, with the machine already awake.
    back = tmp_path / "back"
    r = await run(["scp", "-q", "-P", str(port), *direct_opts(fleet), f"{me}@127.0.0.1:{dst}", str(back)],
                  timeout=120)
    assert r.returncode == 0, r.err
    assert sha256(back) == sha256(src)
    assert m.start_calls == 1


@pytest.mark.e2e
async def test_a_source_over_its_rate_limit_is_refused_before_any_wake(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=with_passthrough(2))
    running = await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=True)
    port = running.passthrough_ports["alice"]
    ssh = ["ssh", "-p", str(port), *direct_opts(fleet), f"{cfg.machines['alice'].user}@127.0.0.1"]
    for i in range(2):
        r = await run([*ssh, f"echo allowed-{i}"])
        assert (r.returncode, r.out) == (0, f"allowed-{i}\n"), r.err
    m = fleet.machine("alice")
    assert m.start_calls == 1
    # Stop it, so that a refused connection would show as a wake if it caused one.
    assert await running.fleet.stop("alice")
    r = await run([*ssh, "echo should-not-run"])
    assert r.returncode == 255 and r.out == ""
    assert "Connection closed" in r.err or "kex_exchange_identification" in r.err, r.err
    assert fleet.metric("fleetgate_passthrough_refusals_total", reason="rate_limited") == 1
    assert m.state.value == "stopped" and m.start_calls == 1
    # The limit is per source: the SSH front is not affected.
    r = await run(fleet.ssh("alice", "echo front"))
    assert r.out == "front\n", r.err


def test_rate_limiter_refills_over_a_minute_and_groups_ipv6_by_64():
    rl = RateLimiter(2)
    assert rl.allow("10.0.0.1", 0.0) and rl.allow("10.0.0.1", 0.1)
    assert not rl.allow("10.0.0.1", 0.2)
    assert rl.allow("10.0.0.2", 0.2)  # another source has its own bucket
    assert not rl.allow("10.0.0.1", 20.0)
    assert rl.allow("10.0.0.1", 30.5)  # one token back after 30 s at 2/min
    assert rl.allow("2001:db8::1", 0) and rl.allow("2001:db8::ffff", 0)
    assert not rl.allow("2001:db8::1:2", 0)  # same /64
    assert rl.allow("2001:db8:0:1::1", 0)  # next /64
    assert RateLimiter.source_key("::ffff:10.0.0.1") == "10.0.0.1"


@pytest.mark.e2e
def test_passthrough_config_errors(tmp_path):
    def patch(doc: dict) -> None:
        doc["machines"]["alice"]["passthrough_listen"] = "127.0.0.1:notaport"
        doc["passthrough"] = {"per_source_per_minute": 0, "burst": 3}

    with pytest.raises(ConfigError) as info:
        make_fleet(tmp_path, patch=patch)
    text = str(info.value)
    assert "key 'machines.alice.passthrough_listen': '127.0.0.1:notaport' is not HOST:PORT" in text
    assert "key 'passthrough.per_source_per_minute': must be 1 or more" in text
    assert "key 'passthrough.burst': unknown key" in text
