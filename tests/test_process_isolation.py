"""The process backend isolates its machines from the gateway and from each other (issue 10, item 4).

Each check runs inside a machine, through the gateway, with the real OpenSSH client: the
machine's user must not be the gateway (its account, keys, state, admin socket, ports),
must not reach other machines, and must not see other sessions' forwarded agents.
Where isolation cannot be set up, `serve` refuses unless the operator opts in.
"""

from __future__ import annotations

import base64
import getpass
import logging
import os
import subprocess
import sys

import pytest
import trio

from helpers import REPO, DemoProcess, Session, free_port, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e

if os.geteuid() != 0:  # pragma: no cover - CI runs as root
    pytest.skip("process isolation needs root", allow_module_level=True)


def with_metrics(doc) -> None:
    doc["metrics"] = {"listen": "127.0.0.1:0"}


def reach(host: str, port: int) -> str:
    """Shell run inside a machine: prints OPEN or CLOSED for a TCP connect (bash /dev/tcp, bounded)."""
    return f"if timeout 3 bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>/dev/null; then echo OPEN; else echo CLOSED; fi"


async def _serve_text(text: bytes, task_status=trio.TASK_STATUS_IGNORED):
    """A TCP listener on the gateway host's loopback that greets with `text`."""
    async def handle(stream):
        async with stream:
            await stream.send_all(text)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _read_line(port: int, send: bytes = b"") -> bytes:
    """The first line a TCP connect to the host's loopback port yields after sending `send`
    (b"" when refused or closed)."""
    with trio.fail_after(10):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return b""
        async with stream:
            out = b""
            try:
                await stream.send_all(send)
                async for chunk in stream:
                    out += chunk
                    if b"\n" in out:
                        break
            except trio.BrokenResourceError:
                pass
    return out


async def test_machine_is_its_own_account_and_reaches_nothing_of_the_gateway(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=with_metrics)
    running = await start_gateway(nursery, fleet, cfg)
    assert cfg.machines["alice"].user == "fg-alice"
    # bob's machine runs, so its sshd is a real target to try from alice's.
    r = await run(fleet.ssh("bob", "true"))
    assert r.returncode == 0, r.err
    bob_port = cfg.machines["bob"].options["port"]
    alice_port = cfg.machines["alice"].options["port"]
    host_port = await nursery.start(_serve_text, b"gateway host\n")
    state = cfg.gateway.state_dir
    secrets = [fleet.dir / "upstream_key", fleet.dir / "gateway_host_key", fleet.dir / "client_key",
               fleet.dir / "machines" / "alice" / "ssh_host_ed25519_key",
               state / "process" / "alice" / "ssh_host_key", state / "process" / "bob" / "ssh_host_key"]
    script = "; ".join([
        "id -u; id -un",
        *[f"if cat {p} >/dev/null 2>&1; then echo READ {p}; fi" for p in secrets],
        f"ls -A {state} 2>/dev/null | tr '\\n' ' '; echo",
        f"ls -A {fleet.dir} 2>/dev/null | tr '\\n' ' '; echo",
        f"python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' "
        f"{cfg.gateway.admin_socket} 2>/dev/null && echo ADMIN-OPEN || echo ADMIN-CLOSED",
        reach("127.0.0.1", running.metrics_port),
        reach("127.0.0.1", fleet.port),
        reach("127.0.0.1", bob_port),
        reach("127.0.0.1", host_port),
        reach("127.0.0.1", alice_port),   # positive control: the machine's own sshd, in its own netns
        "ip -o link | wc -l",
    ])
    r = await run(fleet.ssh("alice", script))
    assert r.returncode == 0, r.err
    lines = r.out.splitlines()
    uid, name = int(lines[0]), lines[1]
    assert (name, uid != 0, uid != os.geteuid()) == ("fg-alice", True, True)
    assert not any(line.startswith("READ ") for line in lines), lines
    assert lines[2] == "process "        # of the state dir, only the path to alice's own sshd files
    assert lines[3] == "state "          # the config dir (keys, fleetgate.toml) is hidden
    assert lines[4:] == ["ADMIN-CLOSED", "CLOSED", "CLOSED", "CLOSED", "CLOSED", "OPEN", "1"], lines
    # The sshd files the machine can see hold nothing secret to it: its host key stays root's.
    r = await run(fleet.ssh("alice", f"cat {state}/process/alice/ssh_host_key"))
    assert r.returncode != 0 and "Permission denied" in r.err
    # Not even through the gateway's own process: /proc shows only the machine's processes.
    r = await run(fleet.ssh("alice", "ps -e -o comm= | sort -u | tr '\\n' ' '"))
    assert "python" not in r.out and "fleetgate" not in r.out, r.out


async def test_local_forward_reaches_only_the_machines_loopback(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=with_metrics)
    running = await start_gateway(nursery, fleet, cfg)
    alice_port = cfg.machines["alice"].options["port"]
    to_metrics, to_sshd = free_port(), free_port()
    s = await Session(fleet.ssh("alice", "echo ready; cat", extra=[
        "-o", "ExitOnForwardFailure=yes",
        "-L", f"{to_metrics}:127.0.0.1:{running.metrics_port}",
        "-L", f"{to_sshd}:127.0.0.1:{alice_port}"])).open(nursery)
    try:
        # 127.0.0.1 is the machine's own loopback: its sshd answers there, the gateway's metrics do not.
        assert (await _read_line(to_sshd)).startswith(b"SSH-2.0-")
        assert await _read_line(to_metrics, b"GET /metrics HTTP/1.0\r\n\r\n") == b""
        # (the same request straight to the gateway's metrics port, for contrast)
        assert (await _read_line(running.metrics_port, b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.")
    finally:
        assert await s.close() == 0


async def test_remote_forward_binds_inside_the_machine_only(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    target = await nursery.start(_serve_text, b"from the client side\n")
    rport = free_port()
    # The session announces itself only once the forward answers inside the machine.
    wait = (f"for i in $(seq 200); do timeout 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{rport}' 2>/dev/null "
            f"&& break; sleep 0.05; done; echo ready; cat")
    s = await Session(fleet.ssh("alice", wait, extra=["-o", "ExitOnForwardFailure=yes",
                                                      "-R", f"{rport}:127.0.0.1:{target}"])).open(nursery)
    try:
        r = await run(fleet.ssh("alice", f"timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{rport}; cat <&3'"))
        assert r.out == "from the client side\n", r.err
        # Nothing was bound on the gateway host: the port is free there.
        with trio.fail_after(5):
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", rport)
        # Nor in bob's machine.
        r = await run(fleet.ssh("bob", reach("127.0.0.1", rport)))
        assert r.out == "CLOSED\n", r.err
    finally:
        assert await s.close() == 0


async def test_another_sessions_agent_is_invisible(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    sock = agent_dir / "sock"
    agent = await trio.lowlevel.open_process(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            while not sock.exists():
                await trio.sleep(0.02)  # ssh-agent -D has no readiness signal but its socket
        env = {"SSH_AUTH_SOCK": str(sock)}
        assert (await run(["ssh-add", str(fleet.client_key)], env=env)).returncode == 0
        # bob forwards his agent and stays logged in.
        argv = fleet.ssh("bob", 'echo "$SSH_AUTH_SOCK"; ssh-add -l >/dev/null && echo ready; cat', extra=["-A"])
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.DEVNULL, env={**os.environ, **env})
        out = b""
        with trio.fail_after(30):
            while b"ready\n" not in out:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, out
                out += chunk
        bob_sock = out.decode().splitlines()[0]
        assert bob_sock.startswith("/tmp/ssh-")
        try:
            # From alice's machine: not there, not anywhere in its /tmp, and no agent reachable.
            r = await run(fleet.ssh("alice", f"ls -A /tmp /var/tmp /dev/shm | grep -c ssh-; test -e {bob_sock} && "
                                             f"echo VISIBLE; SSH_AUTH_SOCK={bob_sock} ssh-add -l; echo rc=$?"))
            assert "VISIBLE" not in r.out and r.out.splitlines()[0] == "0", r.out
            assert r.out.splitlines()[-1] == "rc=2", r.out  # ssh-add: cannot connect to an agent
            # A second session on bob's machine, without -A, sees its machine's agent socket
            # (same machine, same account: that is what sharing a machine means).
            r = await run(fleet.ssh("bob", f"test -S {bob_sock} && echo shared"))
            assert r.out == "shared\n"
        finally:
            await proc.stdin.aclose()
            with trio.fail_after(20):
                await proc.wait()
    finally:
        agent.terminate()
        await agent.wait()


def _serve_config(fleet, extra: str):
    text = fleet.config_path.read_text().replace('type = "process"\n', f'type = "process"\n{extra}', 1)
    fleet.config_path.write_text(text)
    return fleet.config_path


async def test_serve_refuses_when_isolation_cannot_be_set_up(tmp_path):
    fleet, _ = make_fleet(tmp_path)
    # An unshare that always fails is what a host without the privilege for namespaces looks like.
    cfg = _serve_config(fleet, 'unshare = "/bin/false"\n')
    r = await run([sys.executable, "-m", "fleetgate", "serve", "-c", str(cfg)], timeout=30, cwd=REPO)
    assert r.returncode == 1
    assert "process backend 'local' cannot isolate its machines" in r.err
    assert 'isolation = "none"' in r.err
    assert "Traceback" not in r.err, r.err


async def test_opt_in_without_isolation_warns_and_runs_as_the_gateway(tmp_path, nursery, caplog):
    caplog.set_level(logging.WARNING)

    def patch(doc):
        doc["backends"]["local"].update(isolation="none", unshare="/bin/false")
        for m in doc["machines"].values():
            m["user"] = getpass.getuser()

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    assert 'runs with isolation = "none"' in caplog.text
    r = await run(fleet.ssh("alice", "id -u"))
    assert (r.returncode, r.out) == (0, f"{os.geteuid()}\n"), r.err   # exactly what the operator accepted


async def test_a_reload_that_would_need_isolation_is_rejected_whole(tmp_path, nursery, caplog):
    from fleetgate.app import App
    from fleetgate.config import load

    caplog.set_level(logging.INFO)
    fleet, _ = make_fleet(tmp_path, isolation="none")   # its config says isolation = "none"
    path = _serve_config(fleet, 'unshare = "/bin/false"\n')
    app = App(load(path), stop_machines_on_exit=True)
    with trio.fail_after(30):
        fleet.running = await nursery.start(app.run)
    text = path.read_text().replace('isolation = "none"\n', "")
    for name in ("alice", "bob"):   # accounts an isolated machine may have (check refuses root)
        text = text.replace(f'[machines.{name}]\nbackend = "local"\nuser = "{getpass.getuser()}"',
                            f'[machines.{name}]\nbackend = "local"\nuser = "fg-{name}"')
    path.write_text(text)
    before = app.config
    assert app.reload() is False
    assert app.config is before
    assert "cannot isolate its machines" in caplog.text
    r = await run(fleet.ssh("alice", "echo still-serving"))
    assert (r.returncode, r.out) == (0, "still-serving\n"), r.err
    fleet.running.shutdown.set()


async def test_isolated_machine_refuses_root_as_its_account(tmp_path, nursery):
    import dataclasses

    from fleetgate.config import ConfigError

    def patch(doc):
        doc["machines"]["alice"]["user"] = "root"

    # `check` refuses it (issue 25, item 8) ...
    with pytest.raises(ConfigError, match="machines.alice.user"):
        make_fleet(tmp_path, patch=patch)
    # ... and so does the backend at start, for a config that got past check some other way.
    fleet, cfg = make_fleet(tmp_path)
    alice = dataclasses.replace(cfg.machines["alice"], user="root")
    cfg = dataclasses.replace(cfg, machines={**cfg.machines, "alice": alice})
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode == 255
    assert fleet.machine("alice").state.value in ("stopped", "failed")


async def test_demo_says_which_mode_it_runs_in(tmp_path):
    async with DemoProcess(tmp_path / "demo") as demo:
        assert "mode: isolated" in demo.banner
        r = await run(["ssh", *demo.ssh_opts(), "alice@127.0.0.1", "id -un"])
        assert (r.returncode, r.out) == (0, "fg-alice\n"), r.err
    # Where it cannot isolate (not root), the demo opts in to "none" and says so first.
    async with DemoProcess(tmp_path / "demo-none", "--isolation", "none") as demo:
        assert "mode: NOT ISOLATED" in demo.banner.splitlines()[1]
        r = await run(["ssh", *demo.ssh_opts(), "alice@127.0.0.1", "id -u"])
        assert (r.returncode, r.out) == (0, f"{os.geteuid()}\n"), r.err


def test_account_checks():
    from fleetgate.backends.process import check_account

    assert check_account("root", "m") is not None
    assert check_account(getpass.getuser(), "m") is not None
    assert check_account(None, "m") is not None
    assert check_account("Bad Name", "m") is not None
    assert check_account("fg-some-new-machine", "m") is None


def _machine_roots(state, machine: str) -> list[int]:
    """The top process of each running copy of `machine` (its unshare), found in /proc."""
    cfg = os.fsencode(f"{state}/process/{machine}/sshd_config")
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                argv = open(f"{entry.path}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"unshare") and cfg in argv:
                out.append(int(entry.name))
    return out


def proc_start_time(pid: int) -> int:
    """/proc/PID/stat field 22: when the process started, in clock ticks after boot."""
    return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[19])


def _mode(path) -> int:
    import stat

    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_files_are_private_under_any_umask_and_the_pid_file_is_out_of_reach(tmp_path, nursery):
    """Issue 25, item 7: under umask 000 the state dir was 0777 and sshd_config / sshd.pid 0666;
    from inside alice's machine `echo 999999 > .../sshd.pid` made a restarted gateway lose her
    sshd and start a second one."""
    from fleetgate.app import App

    old_umask = os.umask(0)
    try:
        fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc.update(audit={"file": "audit.jsonl"}))
        app = App(cfg, stop_machines_on_exit=False)   # a gateway that leaves its machines running
        async with trio.open_nursery() as first:
            with trio.fail_after(30):
                fleet.running = await first.start(app.run)
            r = await run(fleet.ssh("alice", "echo up"))
            assert (r.returncode, r.out) == (0, "up\n"), r.err
            state = cfg.gateway.state_dir
            mdir = state / "process" / "alice"
            pidfile = state / "process" / ".pids" / "alice"
            assert {p: _mode(p) for p in (fleet.dir, state, state / "process", mdir)} == {
                fleet.dir: 0o700, state: 0o700, state / "process": 0o700, mdir: 0o711}
            files = {"sshd_config": 0o600, "ssh_host_key": 0o600, "sshd.log": 0o600, "authorized_keys": 0o644}
            assert {n: _mode(mdir / n) for n in files} == files
            assert _mode(pidfile.parent) == 0o700
            assert (_mode(pidfile), _mode(fleet.config_path), _mode(fleet.dir / "audit.jsonl")) == (0o600,) * 3
            assert (_mode(fleet.dir / "upstream_key"), _mode(fleet.dir / "upstream_key.pub")) == (0o600, 0o644)
            assert not (mdir / "sshd.pid").exists()
            # Nothing of the gateway's record is in the machine's reach, nor can it plant one.
            r = await run(fleet.ssh("alice", f"ls -A {state}/process; echo 999999 > {mdir}/sshd.pid || echo REFUSED; "
                                             f"echo 999999 > {pidfile} || echo REFUSED"))
            assert r.out.splitlines() == ["alice", "REFUSED", "REFUSED"], (r.out, r.err)
            roots = _machine_roots(state, "alice")
            assert len(roots) == 1
            fleet.running.shutdown.set()
        # The record now names a live process of root's with its true start time, but not alice's
        # sshd (this test's own process): a restarted gateway must neither trust nor kill it.
        pidfile.write_text(f"{os.getpid()} {proc_start_time(os.getpid())}\n")
        app = App(cfg, stop_machines_on_exit=True)
        with trio.fail_after(30):
            fleet.running = await nursery.start(app.run)
        assert fleet.machine("alice").state.value == "running"     # adopted, found by its process
        r = await run(fleet.ssh("alice", "echo again"))
        assert (r.returncode, r.out) == (0, "again\n"), r.err
        assert _machine_roots(state, "alice") == roots              # the same sshd, no second one
        assert pidfile.read_text().split() == [str(roots[0]), str(proc_start_time(roots[0]))]
        fleet.running.shutdown.set()
    finally:
        os.umask(old_umask)


async def test_machines_have_their_own_ipc_namespace(tmp_path, nursery):
    """Issue 25, item 9: a SysV segment made inside a machine was visible on the host."""
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    alice_uid = pwd_uid("fg-alice")

    def alices_segments() -> list[list[str]]:
        rows = [line.split() for line in open("/proc/sysvipc/shm").read().splitlines()[1:]]
        return [row for row in rows if row[7] == str(alice_uid)]   # key shmid perms size cpid lpid nattch uid

    try:
        r = await run(fleet.ssh("alice", "ipcmk -M 4096 >/dev/null && ipcs -m | grep -c fg-alice"))
        assert r.out == "1\n", (r.out, r.err)
        assert alices_segments() == []
        r = await run(fleet.ssh("bob", "ipcs -m | grep -c fg-alice"))
        assert r.out == "0\n", (r.out, r.err)
    finally:
        for seg in alices_segments():   # what an unisolated machine left on the host
            subprocess.run(["ipcrm", "-m", seg[1]], capture_output=True, check=False)


async def test_machines_have_their_own_run_and_run_lock(tmp_path, nursery):
    """Issue 25, item 9: /run/lock is world-writable and was shared by every machine and the
    host, so two machines could meet there; the rest of /run (the host's sockets) too."""
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    tag = f"fg-meet-{os.getpid()}"
    try:
        r = await run(fleet.ssh("alice", f"touch /run/lock/{tag} && echo LEFT; test -d /run/sshd && echo SSHD; "
                                         f"ls -A /run | tr '\\n' ' '"))
        left, sshd, run_dir = r.out.splitlines()
        assert (left, sshd) == ("LEFT", "SSHD"), (r.out, r.err)
        assert set(run_dir.split()) <= {"lock", "sshd", "mount"}, run_dir   # mount: mount(8)'s own utab
        assert not os.path.exists(f"/run/lock/{tag}")
        r = await run(fleet.ssh("bob", f"test -e /run/lock/{tag} && echo MET || echo ALONE"))
        assert r.out == "ALONE\n", (r.out, r.err)
    finally:
        if os.path.exists(f"/run/lock/{tag}"):   # what an unisolated machine left on the host
            os.unlink(f"/run/lock/{tag}")


def pwd_uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


async def test_a_pid_file_written_from_inside_the_machine_loses_nothing(tmp_path, nursery):
    """Issue 25, item 7, as reported: under umask 000, `echo 999999 > .../sshd.pid` inside alice's
    machine made a restarted gateway lose her sshd and start a second one."""
    from fleetgate.app import App

    old_umask = os.umask(0)
    state = None
    try:
        fleet, cfg = make_fleet(tmp_path)
        state = cfg.gateway.state_dir
        async with trio.open_nursery() as first:
            with trio.fail_after(30):
                fleet.running = await first.start(App(cfg, stop_machines_on_exit=False).run)
            r = await run(fleet.ssh("alice", f"echo 999999 > {state}/process/alice/sshd.pid; echo done"))
            assert r.out == "done\n", r.err
            roots = _machine_roots(state, "alice")
            assert len(roots) == 1
            fleet.running.shutdown.set()
        with trio.fail_after(30):
            fleet.running = await nursery.start(App(cfg, stop_machines_on_exit=True).run)
        assert fleet.machine("alice").state.value == "running"
        r = await run(fleet.ssh("alice", "echo again"))
        assert (r.returncode, r.out) == (0, "again\n"), r.err
        assert _machine_roots(state, "alice") == roots   # the same sshd; no second one
        fleet.running.shutdown.set()
    finally:
        os.umask(old_umask)
        if state is not None:
            for pid in _machine_roots(state, "alice"):   # what a lost machine left running
                os.killpg(pid, 9)
