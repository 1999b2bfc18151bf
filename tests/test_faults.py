"""Fault injection: for each fault, what the user sees, what the metric says, and that
another user's session (bob's, open through the same gateway) keeps flowing."""

from __future__ import annotations

import pytest

import os
import signal
import subprocess

import trio

from fleetgate.backends.process import descendants
from helpers import Session, fetch_metrics, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


async def open_bob(fleet, nursery) -> Session:
    bob = await Session(fleet.ssh("bob", "echo ready; cat")).open(nursery)
    assert await bob.echo(b"before\n") == b"before\n"
    return bob


async def bob_still_flows(bob: Session) -> None:
    payload = os.urandom(64 * 1024).hex().encode() + b"\n"
    assert await bob.echo(payload) == payload
    assert await bob.close() == 0


def alice(**settings):
    def patch(doc):
        for key, value in settings.items():
            if key.startswith("backend_"):
                doc["backends"]["local"][key[len("backend_"):]] = value
            else:
                doc["machines"]["alice"][key] = value
    return patch


async def test_start_hang(tmp_path, nursery):
    # The process backend's start_delay applies to every machine: bob boots before it matters.
    fleet, cfg = make_fleet(tmp_path, patch=alice(boot_timeout=3))
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    fleet.machine("alice").backend.start_delay = 3600  # from now on every start hangs
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode == 255 and "fleetgate: alice did not answer within 3 s" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="local", reason="boot_timeout") == 1
    await bob_still_flows(bob)


async def test_start_error(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    fleet.machine("alice").backend.sshd = "/bin/false"  # the next start fails
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode == 255 and "fleetgate: alice could not be started" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="local", reason="start_error") == 1
    await bob_still_flows(bob)


async def test_guest_dies_mid_session(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    victim = await Session(fleet.ssh("alice", "echo ready; cat")).open(nursery)
    pid = int((cfg.gateway.state_dir / "process" / ".pids" / "alice").read_text().split()[0])
    for p in [pid, *descendants(pid)]:  # alice's machine dies: its sshd and every session on it
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already gone: an isolated machine's pid namespace dies with its first process
    with trio.fail_after(20):
        code = await victim.proc.wait()
    assert code != 0  # she sees her session end
    r = await run(fleet.ssh("alice", "echo back"))  # and the next login wakes it again
    assert (r.returncode, r.out) == (0, "back\n"), r.err
    assert fleet.metric("fleetgate_machine_lost_total", backend="local") == 1
    await bob_still_flows(bob)


async def test_upstream_host_key_change(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    assert (await run(fleet.ssh("alice", "true"))).returncode == 0
    await fleet.running.fleet.stop("alice")
    key = cfg.machines["alice"].options["host_key_file"]
    hk = fleet.dir / key
    hk.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)  # re-imaged
    r = await run(fleet.ssh("alice", "echo must-not-run"))
    assert r.returncode == 255 and "fleetgate: host key of alice changed; refusing to connect" in r.err
    assert "must-not-run" not in r.out
    assert fleet.metric("fleetgate_upstream_failures_total", reason="host_key_mismatch") == 1
    await bob_still_flows(bob)


async def test_metrics_scraper_gone(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc.update(metrics={"listen": "127.0.0.1:0"}))
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    port = fleet.running.metrics_port
    # Scrapers that vanish: mid-request, before reading the answer, and one that never speaks.
    half = await trio.open_tcp_stream("127.0.0.1", port)
    await half.send_all(b"GET /metr")
    await half.aclose()
    rude = await trio.open_tcp_stream("127.0.0.1", port)
    await rude.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await rude.aclose()
    mute = await trio.open_tcp_stream("127.0.0.1", port)
    assert "fleetgate_active_sessions" in await fetch_metrics(port)  # raises unless 200
    await mute.aclose()
    await bob_still_flows(bob)


async def test_stop_error(tmp_path, nursery):
    from fleetgate.backends.base import BackendError

    def patch(doc):
        doc["machines"]["alice"].update(idle_timeout=1, min_uptime=0)

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    assert (await run(fleet.ssh("alice", "true"))).returncode == 0
    backend = fleet.machine("alice").backend
    real_stop = backend.stop

    async def broken_stop(machine):
        if machine.name == "alice":
            raise BackendError("the hypervisor refused the stop", "stop_failed")
        await real_stop(machine)

    backend.stop = broken_stop
    with trio.fail_after(20):  # the reaper tries, fails, and says so
        while fleet.metric("fleetgate_reaper_stops_total", backend="local", result="failure") < 1:
            await fleet.machine("alice").changed.wait()
    assert fleet.machine("alice").state.value == "unknown"
    backend.stop = real_stop
    r = await run(fleet.ssh("alice", "echo alice-still-reachable"))  # the next login finds it and goes on
    assert (r.returncode, r.out) == (0, "alice-still-reachable\n"), r.err
    await bob_still_flows(bob)


async def test_descriptor_exhaustion(tmp_path, nursery, monkeypatch):
    """accept() fails with EMFILE (the process is out of descriptors): asyncio pauses the
    listener and reports it; trio-asyncio used to re-raise that report into the main nursery,
    ending the gateway and every session. Now it is counted and logged, bob flows, and the
    login that arrived meanwhile succeeds once descriptors are back (floods under a real
    `ulimit -n 1024`: tests/test_fd_exhaustion.py)."""
    import errno
    import socket

    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    bob = await open_bob(fleet, nursery)
    refused = trio.Event()
    real_accept = socket.socket.accept

    def exhausted(self):
        address = self.getsockname()
        if isinstance(address, tuple) and address[1] == fleet.port:
            refused.set()
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", exhausted)
    async with trio.open_nursery() as n:
        results = []

        async def login() -> None:
            results.append(await run(fleet.ssh("alice", "echo in")))

        n.start_soon(login)
        with trio.fail_after(20):
            await refused.wait()
        monkeypatch.setattr(socket.socket, "accept", real_accept)  # descriptors are back
    assert (results[0].returncode, results[0].out) == (0, "in\n"), results[0].err
    assert fleet.metric("fleetgate_loop_errors_total", kind="accept_descriptors") >= 1
    await bob_still_flows(bob)


async def test_reload_that_fails_at_apply_time(tmp_path, nursery, monkeypatch, caplog):
    """A config that check could not refuse (a key file swapped after check; before this fix,
    an upstream_ca_key that is a public key) fails while being applied: the old config stays
    whole (no machine half-added), the failure is counted and logged, sessions flow. It used
    to raise out of the SIGHUP handler and end the process."""
    import dataclasses
    import logging

    from fleetgate import app as app_mod
    from fleetgate.app import App
    from fleetgate.config import load

    fleet, cfg = make_fleet(tmp_path)
    app = App(cfg, stop_machines_on_exit=True)
    with trio.fail_after(30):
        running = fleet.running = await nursery.start(app.run)
    bob = await open_bob(fleet, nursery)
    before = running.gateway.config
    new = load(fleet.config_path)
    new = dataclasses.replace(
        new, gateway=dataclasses.replace(new.gateway, upstream_ca_key=fleet.dir / "upstream_key.pub"),
        machines={**new.machines, "carol": dataclasses.replace(new.machines["alice"], name="carol")})
    monkeypatch.setattr(app_mod, "load", lambda path: new)
    with caplog.at_level(logging.ERROR, logger="fleetgate.app"):
        assert app.reload() is False
    assert "reload rejected at apply time, old config stays in force" in caplog.text
    assert running.gateway.config is before and app.config is before
    assert "carol" not in running.fleet.machines  # nothing half-applied
    assert fleet.metric("fleetgate_config_reloads_total", result="failure") == 1
    assert fleet.metric("fleetgate_config_last_reload_successful") == 0
    r = await run(fleet.ssh("alice", "echo still-served"))
    assert (r.returncode, r.out) == (0, "still-served\n"), r.err
    await bob_still_flows(bob)
