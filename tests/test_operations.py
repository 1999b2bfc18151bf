"""Operations with `fleetgate serve` as a real process: SIGHUP reload, SIGTERM drain, SIGKILL
and restart, systemd socket activation — with real OpenSSH sessions running through them."""

from __future__ import annotations

import pytest

import os
import signal
import socket
import sys
from pathlib import Path

import trio

from helpers import ServeProcess, Session, fetch_metrics, make_fleet, run, sample

pytestmark = pytest.mark.e2e


def _write_setting(cfg: Path, table: str, line: str) -> None:
    text = cfg.read_text()
    assert f"[{table}]\n" in text
    cfg.write_text(text.replace(f"[{table}]\n", f"[{table}]\n{line}\n", 1))


async def _metric(serve: ServeProcess, name: str, **labels: str) -> float | None:
    line = [ln for ln in serve.lines if "http listening address=" in ln][0]
    return sample(await fetch_metrics(int(line.rsplit(":", 1)[1])), name, **labels)


async def test_sighup_reload_adds_a_user_keeps_sessions_and_rejects_a_broken_file(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    with open(fleet.config_path, "a") as f:
        f.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    serve = await ServeProcess(fleet.config_path).start(nursery)
    try:
        alice = await Session(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        r = await run(["ssh", *fleet.ssh_opts(serve.port), "carol@127.0.0.1", "true"])
        assert r.returncode == 255  # carol does not exist yet

        with open(fleet.config_path, "a") as f:
            f.write('\n[users.carol]\nauthorized_keys_file = "client_key.pub"\nmachines = ["bob"]\n')
        serve.signal(signal.SIGHUP)
        await serve.wait_for("config reloaded")
        r = await run(["ssh", *fleet.ssh_opts(serve.port), "carol@127.0.0.1", "echo carol-on-bob"])
        assert (r.returncode, r.out) == (0, "carol-on-bob\n"), r.err
        assert await alice.echo(b"still here\n") == b"still here\n"  # the live session never noticed

        good = fleet.config_path.read_text()
        fleet.config_path.write_text(good + "\n[users.dave\n")
        serve.signal(signal.SIGHUP)
        line = await serve.wait_for("reload rejected")
        assert str(fleet.config_path) in line and "TOML syntax error" in line
        assert await _metric(serve, "fleetgate_config_last_reload_successful") == 0.0
        assert await _metric(serve, "fleetgate_config_reloads_total", result="failure") == 1.0
        r = await run(["ssh", *fleet.ssh_opts(serve.port), "carol@127.0.0.1", "echo old-config-stays"])
        assert (r.returncode, r.out) == (0, "old-config-stays\n"), r.err
        assert await alice.echo(b"and still\n") == b"and still\n"

        head, _, tail = good.rpartition('machines = ["bob"]')  # carol's, the last one
        fleet.config_path.write_text(head + 'machines = ["nosuch"]' + tail)
        serve.signal(signal.SIGHUP)
        line = await serve.wait_for("reload rejected")
        assert "users.carol.machines" in line and "no machine named 'nosuch'" in line
        assert await alice.close() == 0
    finally:
        await serve.kill()


async def test_sigterm_drains_tells_users_and_leaves_busy_machines_running(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    _write_setting(fleet.config_path, "gateway", "drain_timeout = 30")
    serve = await ServeProcess(fleet.config_path).start(nursery)
    try:
        alice = await Session(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        pid = int((fleet.dir / "state" / "process" / ".pids" / "alice").read_text().split()[0])
        serve.signal(signal.SIGTERM)
        await serve.wait_for("draining connections=1")
        await alice.wait_err(b"fleetgate: the gateway is shutting down")
        r = await run(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "true"])
        assert r.returncode == 255 and "Connection refused" in r.err  # no new connections
        assert await alice.echo(b"finishing my work\n") == b"finishing my work\n"
        assert serve.proc.returncode is None  # waits for the session
        assert await alice.close() == 0
        assert await serve.wait(timeout=20) == 0
        os.kill(pid, 0)  # the machine is still up: fleetgate never stops machines on shutdown
    finally:
        await serve.kill()


async def test_drain_timeout_closes_sessions_that_do_not_end(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    _write_setting(fleet.config_path, "gateway", "drain_timeout = 2")
    serve = await ServeProcess(fleet.config_path).start(nursery)
    try:
        alice = await Session(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        t0 = trio.current_time()
        serve.signal(signal.SIGTERM)
        assert await serve.wait(timeout=20) == 0
        assert 2 - 0.2 <= trio.current_time() - t0 < 10
        with trio.fail_after(10):
            await alice.proc.wait()
        await serve.wait_for("drain timeout: closing connections=1")
    finally:
        await serve.kill()


async def test_sigkill_restart_adopts_running_machines_with_a_full_idle_grace(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    text = fleet.config_path.read_text().replace("boot_timeout =", "idle_timeout = 4\nmin_uptime = 0\nboot_timeout =")
    fleet.config_path.write_text(text)
    first = await ServeProcess(fleet.config_path).start(nursery)
    r = await run(["ssh", *fleet.ssh_opts(first.port), "alice@127.0.0.1", "true"])
    assert r.returncode == 0, r.err
    first.proc.kill()  # SIGKILL: no drain, no cleanup
    await first.wait()

    second = ServeProcess(fleet.config_path)
    t0 = trio.current_time()
    await second.start(nursery)
    try:
        await second.wait_for("adopted running machine=alice")
        await second.wait_for("reaper stops machine=alice", timeout=30)
        assert trio.current_time() - t0 >= 4 - 0.2  # a full idle_timeout after the restart
        assert not any("process backend started sshd machine=alice" in ln for ln in second.lines)
        r = await run(["ssh", *fleet.ssh_opts(second.port), "alice@127.0.0.1", "echo woken-again"])
        assert (r.returncode, r.out) == (0, "woken-again\n"), r.err
    finally:
        await second.kill()


async def test_systemd_socket_activation(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    # What systemd does between fork and exec: the socket on fd 3, LISTEN_PID = our pid, LISTEN_FDS = 1.
    activate = [sys.executable, "-c",
                "import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.environ['LISTEN_FDS'] = '1'; os.execvp(sys.argv[2], sys.argv[2:])", str(sock.fileno())]
    serve = ServeProcess(fleet.config_path, argv_prefix=activate, pass_fds=[sock.fileno()])
    await serve.start(nursery)
    sock.close()
    try:
        assert serve.port == port  # it served the inherited socket, not gateway.listen
        r = await run(["ssh", *fleet.ssh_opts(port), "alice@127.0.0.1", "echo activated"])
        assert (r.returncode, r.out) == (0, "activated\n"), r.err
    finally:
        await serve.kill()


async def test_a_second_sigterm_during_the_drain_stops_at_once(tmp_path, nursery):
    fleet, _ = make_fleet(tmp_path)
    _write_setting(fleet.config_path, "gateway", "drain_timeout = 300")
    serve = await ServeProcess(fleet.config_path).start(nursery)
    try:
        await Session(["ssh", *fleet.ssh_opts(serve.port), "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        serve.signal(signal.SIGTERM)
        await serve.wait_for("draining connections=1")
        serve.signal(signal.SIGTERM)
        assert await serve.wait(timeout=15) == 0  # not the 300 s drain
        await serve.wait_for("again: shutting down now")
    finally:
        await serve.kill()
