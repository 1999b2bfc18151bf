"""Issue 15: the gateway logs in to a machine only when a channel needs it.

A jump (`ssh -J alice@gateway alice@vm`) is end to end: it needs the machine's TCP port,
not the gateway's own upstream SSH login. These run the real OpenSSH client through a
real gateway to real sshd machines, and count the gateway's upstream logins with its own
metric (fleetgate_upstream_handshake_seconds_count: one per successful login to a machine).
"""

from __future__ import annotations

import subprocess

import pytest
import trio

from helpers import Fleet, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e

UPSTREAM_LOGINS = "fleetgate_upstream_handshake_seconds_count"


def jump_argv(fleet: Fleet, user: str, machine: str, *command: str) -> list[str]:
    """`ssh -J alice@gateway user@machine`, spelled as the ProxyCommand it stands for."""
    outer = " ".join(["ssh", *fleet.ssh_opts(), "-W", "%h:%p", "alice@127.0.0.1"])
    return ["ssh", "-F", "/dev/null", "-i", str(fleet.client_key), "-o", f"UserKnownHostsFile={fleet.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ProxyCommand={outer}",
            f"{user}@{machine}", *command]


async def settled(fleet: Fleet, result: str, count: float) -> None:
    """Wait (bounded) until connections_total{result} reaches count: a connection's outcome is
    counted by the gateway as it learns it, which may be just after the client exited."""
    with trio.fail_after(10):
        while fleet.metric("fleetgate_connections_total", result=result) < count:
            await fleet.running.gateway.connections_changed.wait()


async def test_a_jump_only_login_costs_the_machine_one_login(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    me = cfg.machines["alice"].user
    r = await run(jump_argv(fleet, me, "alice", "echo jumped"))
    assert (r.returncode, r.out) == (0, "jumped\n"), r.err
    assert fleet.backend_calls("start") == 1  # the wake still happens at the user's authentication
    assert fleet.metric(UPSTREAM_LOGINS) == 0  # the inner login was the machine's only one
    await settled(fleet, "authenticated", 1)
    assert fleet.metric("fleetgate_time_to_shell_seconds_count", wake="yes") == 1
    assert fleet.metric("fleetgate_channels_total", kind="jump", result="ok") == 1
    # A plain login logs in upstream once, for its session.
    r = await run(fleet.ssh("alice", "exit 3"))
    assert r.returncode == 3, r.err
    assert fleet.metric(UPSTREAM_LOGINS) == 1
    await settled(fleet, "authenticated", 2)
    assert fleet.metric("fleetgate_time_to_shell_seconds_count", wake="no") == 1
    with trio.fail_after(10):
        await fleet.running.fleet.wait_sessions(fleet.machine("alice"), 0)


async def test_one_lazy_login_serves_the_session_and_the_forwards_of_a_connection(tmp_path, nursery):
    """A session and -W to the machine's own loopback (a -L, opened by the machine's sshd)
    on one connection: both wait for, and then share, one upstream login."""
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    port = cfg.machines["alice"].options["port"]
    r = await run(["ssh", *fleet.ssh_opts(), "-W", f"localhost:{port}", "alice@127.0.0.1"], stdin=b"", timeout=30)
    assert r.returncode == 0 and r.out.startswith("SSH-2.0-"), r.err  # the machine's sshd, from inside it
    assert fleet.metric(UPSTREAM_LOGINS) == 1
    r = await run(fleet.ssh("alice", "-tt", "tty >/dev/null && echo pty; exit 7"))
    assert r.returncode == 7 and "pty" in r.out, r.err
    assert fleet.metric(UPSTREAM_LOGINS) == 2


def _wrong_host_key(tmp_path) -> str:
    imposter = tmp_path / "imposter"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(imposter)], check=True)
    return (tmp_path / "imposter.pub").read_text().strip()


async def test_a_failed_lazy_login_tells_the_user_why_on_each_kind_of_channel(tmp_path, nursery):
    wrong = _wrong_host_key(tmp_path)
    fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc["machines"]["alice"].update(host_key=wrong))
    await start_gateway(nursery, fleet, cfg)
    message = "fleetgate: host key of alice changed; refusing to connect"
    # A session: the sentence on stderr, exit 255 (as for a lost connection), nothing run.
    r = await run(fleet.ssh("alice", "echo must-not-run"))
    assert r.returncode == 255 and message in r.err and "must-not-run" not in r.out, r.err
    # The login SLI still sees it: an upstream failure, not an authenticated login.
    await settled(fleet, "upstream_failed", 1)
    assert fleet.metric("fleetgate_connections_total", result="authenticated") == 0
    assert fleet.metric("fleetgate_upstream_failures_total", reason="host_key_mismatch") == 1
    assert fleet.machine("alice").sessions == 0  # a login that cannot reach its machine holds nothing
    # -L (here -W to the machine's loopback): the channel's open failure carries the sentence.
    port = cfg.machines["alice"].options["port"]
    r = await run(["ssh", *fleet.ssh_opts(), "-W", f"localhost:{port}", "alice@127.0.0.1"], stdin=b"", timeout=30)
    assert r.returncode == 255 and message in r.err, r.err
    # -R: a refused forward (a global request carries no message).
    r = await run(fleet.ssh("alice", extra=["-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:localhost:9"]),
                  timeout=30)
    assert r.returncode == 255 and "remote port forwarding failed" in r.err, r.err
    assert fleet.metric("fleetgate_upstream_failures_total", reason="host_key_mismatch") == 3
    # A jump does not use the gateway's login: the inner client checks the machine's key itself.
    me = cfg.machines["alice"].user
    r = await run(jump_argv(fleet, me, "alice", "echo jumped"))
    assert (r.returncode, r.out) == (0, "jumped\n"), r.err
