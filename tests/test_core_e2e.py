"""Issue 2 acceptance: the real OpenSSH client through a real gateway to real sshd machines."""

from __future__ import annotations

import pytest

import hashlib
import os
import subprocess
from pathlib import Path

import trio

from helpers import DemoProcess, free_port, make_fleet, run, sample, start_gateway

pytestmark = pytest.mark.e2e


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_demo_exec_wakes_machine_and_keeps_exit_status(tmp_path):
    async with DemoProcess(tmp_path / "demo") as demo:
        before = await demo.metrics()
        assert sample(before, "fleetgate_machine_state", machine="alice", state="stopped") == 1.0
        assert sample(before, "fleetgate_boot_latency_seconds_count", backend="local") == 0.0
        r = await run(["ssh", *demo.ssh_opts(), "alice@127.0.0.1", "echo hi; exit 7"])
        assert r.returncode == 7, r.err
        assert r.out == "hi\n"
        after = await demo.metrics()
        assert sample(after, "fleetgate_machine_state", machine="alice", state="running") == 1.0
        assert sample(after, "fleetgate_machine_state", machine="bob", state="stopped") == 1.0
        # What just happened shows in the metrics: one wake, no failure, the session gone.
        assert sample(after, "fleetgate_boot_latency_seconds_count", backend="local") == 1.0
        assert sample(after, "fleetgate_wake_failures_total", backend="local", reason="start_error") == 0.0
        assert sample(after, "fleetgate_active_sessions", machine="alice") == 0.0
        assert "ssh -p" in demo.banner


async def test_exec_stdin_eof_env_and_exit_signal(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "cat; echo done"), stdin=b"through stdin\n")
    assert (r.returncode, r.out) == (0, "through stdin\ndone\n"), r.err
    r = await run(fleet.ssh("alice", 'echo "$FLEETGATE_HELLO"', extra=["-o", "SendEnv=FLEETGATE_HELLO"]),
                  env={"FLEETGATE_HELLO": "from-the-client"})
    assert r.out == "from-the-client\n", r.err
    r = await run(fleet.ssh("alice", "kill -TERM $$"))
    assert r.returncode == 255  # OpenSSH's code for a remote killed by a signal, as with direct sshd
    # Binary data both ways, byte for byte.
    blob = os.urandom(3 * 1024 * 1024)
    r = await run(fleet.ssh("alice", "cat"), stdin=blob)
    assert r.stdout == blob


async def test_pty_follows_resize_and_ctrl_c_interrupts(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    sock = f"fg-{os.getpid()}-{free_port()}"
    ssh_cmd = " ".join(fleet.ssh("alice", extra=["-tt"]))
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    await run([*tmux, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", ssh_cmd])

    async def screen() -> str:
        return (await run([*tmux, "capture-pane", "-p", "-t", "t", "-S", "-200"])).out

    async def wait_for(text: str, timeout: float = 20) -> str:
        with trio.fail_after(timeout):
            while True:
                s = await screen()
                if text in s:
                    return s
                await trio.sleep(0.1)  # polling the terminal: tmux has no event to await

    try:
        await run([*tmux, "send-keys", "-t", "t", "echo SIZE1 $(stty size)", "Enter"])
        await wait_for("SIZE1 30 100")
        await run([*tmux, "resize-window", "-t", "t", "-x", "120", "-y", "40"])
        await run([*tmux, "send-keys", "-t", "t", "echo SIZE2 $(stty size)", "Enter"])
        await wait_for("SIZE2 40 120")
        await run([*tmux, "send-keys", "-t", "t", "echo STA''RTED; sleep 30; echo SLE''PT", "Enter"])
        await wait_for("STARTED")
        await run([*tmux, "send-keys", "-t", "t", "C-c"])
        await run([*tmux, "send-keys", "-t", "t", "echo AFTER-$?", "Enter"])
        s = await wait_for("AFTER-", timeout=10)  # well before the sleep's 30 s
        assert "SLEPT" not in s
    finally:
        await run([*tmux, "kill-server"])


async def _machine_sha256(fleet, *paths: str) -> list[str]:
    """sha256 of files on the machine (its own file system: it does not share the gateway's)."""
    r = await run(fleet.ssh("alice", "sha256sum " + " ".join(paths)))
    assert r.returncode == 0, r.err
    return [line.split()[0] for line in r.out.splitlines()]


async def test_scp_sftp_rsync_keep_checksums(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(20 * 1024 * 1024))
    remote = "/tmp/xfer"  # the machine's private /tmp, gone when it stops
    assert (await run(fleet.ssh("alice", f"mkdir -p {remote}"))).returncode == 0
    scp = ["scp", "-q", *fleet.scp_opts()]
    r = await run([*scp, str(src), f"alice@127.0.0.1:{remote}/up.bin"])
    assert r.returncode == 0, r.err
    assert await _machine_sha256(fleet, f"{remote}/up.bin") == [sha256(src)]
    r = await run([*scp, f"alice@127.0.0.1:{remote}/up.bin", str(tmp_path / "down.bin")])
    assert r.returncode == 0, r.err
    assert sha256(tmp_path / "down.bin") == sha256(src)

    batch = tmp_path / "batch"
    batch.write_text(f"put {src} {remote}/sftp.bin\nget {remote}/sftp.bin {tmp_path}/sftp-back.bin\n")
    r = await run(["sftp", "-b", str(batch), *fleet.scp_opts(), "alice@127.0.0.1"])
    assert r.returncode == 0, r.err
    assert await _machine_sha256(fleet, f"{remote}/sftp.bin") == [sha256(src)]
    assert sha256(tmp_path / "sftp-back.bin") == sha256(src)

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(20):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(10_000 + i))
    (tree / "big").write_bytes(os.urandom(2 * 1024 * 1024))
    rsh = " ".join(["ssh", *fleet.ssh_opts()])
    r = await run(["rsync", "-a", "-e", rsh, f"{tree}/", f"alice@127.0.0.1:{remote}/tree/"])
    assert r.returncode == 0, r.err
    files = sorted(f.relative_to(tree) for f in tree.rglob("*") if f.is_file())
    assert await _machine_sha256(fleet, *(f"{remote}/tree/{f}" for f in files)) == [sha256(tree / f) for f in files]


async def _upper_echo_server(task_status=trio.TASK_STATUS_IGNORED):
    async def handle(stream):
        async with stream:
            async for data in stream:
                await stream.send_all(data.upper())
            await stream.send_eof()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def _wait_port(port: int) -> None:
    with trio.fail_after(20):
        while True:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.aclose()
                return
            except OSError:
                await trio.sleep(0.05)  # the ssh client opens its listener after auth: poll it


async def _roundtrip(port: int, payload: bytes) -> bytes:
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            out = b""
            async for chunk in stream:
                out += chunk
    return out


# Run inside a machine (python3 -c): an upper-casing echo server on its own loopback, and a
# client that sends stdin to a port there (retrying while a -R forward is being set up).
_MACHINE_ECHO = """
import socket, sys, threading
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d.upper())
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""
_MACHINE_CLIENT = """
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        c = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.05)
data = sys.stdin.buffer.read(); c.sendall(data); c.shutdown(socket.SHUT_WR)
out = b""
while True:
    d = c.recv(65536)
    if not d: break
    out += d
sys.stdout.buffer.write(out)
"""


def _py(code: str, *args: str) -> str:
    """A shell command running `code` with python3 on the machine."""
    import base64
    b64 = base64.b64encode(code.encode()).decode()
    return f"exec python3 -c \"import base64; exec(base64.b64decode('{b64}'))\" {' '.join(args)}"


async def test_local_remote_forwards_and_agent(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    echo_port = await nursery.start(_upper_echo_server)
    payload = os.urandom(256 * 1024).hex().encode()

    # -L reaches the machine's own loopback (process machines have their own network
    # namespace): an echo server started on the machine answers through it.
    server = await trio.lowlevel.open_process(fleet.ssh("alice", _py(_MACHINE_ECHO)), stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE)
    with trio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            chunk = await server.stdout.receive_some(100)
            assert chunk, "echo server on the machine did not start"
            line += chunk
    machine_echo = int(line)
    lport = free_port()
    proc_l = await trio.lowlevel.open_process(fleet.ssh("alice", extra=["-N", "-L", f"{lport}:localhost:{machine_echo}"]))
    rport = free_port()
    proc_r = await trio.lowlevel.open_process(fleet.ssh("alice", extra=["-N", "-R", f"{rport}:localhost:{echo_port}"]))
    try:
        await _wait_port(lport)
        assert await _roundtrip(lport, payload) == payload.upper()
        # -R binds on the machine; the client's side (echo_port here) answers.
        r = await run(fleet.ssh("alice", _py(_MACHINE_CLIENT, str(rport))), stdin=payload)
        assert r.returncode == 0, r.err
        assert r.stdout == payload.upper()
        with trio.fail_after(10):  # the echo server's, -L's and -R's sessions; the client's has ended
            await fleet.running.fleet.wait_sessions(fleet.machine("alice"), 3)
    finally:
        for p in (proc_l, proc_r, server):
            p.terminate()
            with trio.fail_after(10):
                await p.wait()

    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    sock = agent_dir / "sock"
    agent = await trio.lowlevel.open_process(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        await _wait_for_path(sock)
        env = {"SSH_AUTH_SOCK": str(sock)}
        r = await run(["ssh-add", str(fleet.client_key)], env=env)
        assert r.returncode == 0, r.err
        r = await run(fleet.ssh("alice", "ssh-add -l", extra=["-A"]), env=env)
        assert r.returncode == 0, r.err
        assert "fleetgate-demo-client" in r.out
        # Without -A the machine sees no agent.
        r = await run(fleet.ssh("alice", "ssh-add -l"), env=env)
        assert r.returncode != 0
    finally:
        agent.terminate()
        await agent.wait()


async def _wait_for_path(path: Path) -> None:
    with trio.fail_after(10):
        while not path.exists():
            await trio.sleep(0.02)  # ssh-agent -D has no readiness signal but its socket


async def test_jump_mode_end_to_end_and_refusals(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    me = cfg.machines["alice"].user
    outer = " ".join(["ssh", *fleet.ssh_opts(), "-W", "%h:%p", "alice@127.0.0.1"])
    inner = ["ssh", "-F", "/dev/null", "-i", str(fleet.client_key), "-o", f"UserKnownHostsFile={fleet.known_hosts}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", f"ProxyCommand={outer}"]
    # The inner session authenticates to alice's machine itself: its host key is the machine's.
    r = await run([*inner, f"{me}@alice", "echo jumped"])
    assert (r.returncode, r.out) == (0, "jumped\n"), r.err
    assert fleet.backend_calls("start") == 1  # only alice's machine woke
    r = await run([*inner, f"{me}@bob", "echo no"])
    assert r.returncode == 255
    assert "alice may not jump to bob:22" in r.err
    assert fleet.machine("bob").state.value == "stopped"
    # End of input on a jump closes it both ways: no process, connection or lease lingers.
    r = await run(["ssh", *fleet.ssh_opts(), "-W", "alice:22", "alice@127.0.0.1"], stdin=b"", timeout=15)
    assert r.returncode == 0 and r.out.startswith("SSH-2.0-"), r.err
    with trio.fail_after(10):
        await fleet.running.fleet.wait_sessions(fleet.machine("alice"), 0)
    r = await run(["ssh", *fleet.ssh_opts(), "-W", "somewhere.invalid:22", "alice@127.0.0.1"])
    assert r.returncode == 255
    assert "forwarding to somewhere.invalid:22 is not allowed" in r.err


def _sign_cert(tmp_path: Path, name: str, principals: str, validity: str) -> tuple[Path, Path]:
    ca = tmp_path / "user_ca"
    if not ca.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", name, "-n", principals, "-V", validity, f"{key}.pub"],
                   check=True, capture_output=True)
    return key, Path(f"{key}-cert.pub")


async def test_refused_logins_never_wake_anything(tmp_path, nursery):
    certs = tmp_path / "certs"
    certs.mkdir()
    expired = _sign_cert(certs, "expired", "alice", "-2d:-1d")
    other = _sign_cert(certs, "other", "mallory", "-1h:+1h")
    valid = _sign_cert(certs, "valid", "alice", "-1h:+1h")
    ca_line = (certs / "user_ca.pub").read_text().strip()
    stranger = certs / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)

    fleet, cfg = make_fleet(tmp_path, patch=lambda doc: doc.update(user_ca={"keys": [ca_line]}))
    await start_gateway(nursery, fleet, cfg)

    def with_key(user: str, key: Path, cert: Path | None = None) -> list[str]:
        opts = fleet.ssh_opts()
        opts[opts.index("-i") + 1] = str(key)
        if cert:
            opts += ["-o", f"CertificateFile={cert}"]
        return ["ssh", *opts, f"{user}@127.0.0.1", "true"]

    attempts = {
        "wrong key": with_key("alice", stranger),
        "unknown user": with_key("nobody", fleet.client_key),
        "unknown user, routed": with_key("nobody+alice", fleet.client_key),
        "expired certificate": with_key("alice", *expired),
        "certificate for another principal": with_key("alice", *other),
    }
    for what, argv in attempts.items():
        r = await run(argv)
        assert r.returncode == 255, what
        assert "Permission denied (publickey)" in r.err, (what, r.err)
    assert fleet.backend_calls("start") == 0
    assert fleet.machine("alice").state.value == "stopped"
    assert fleet.metric("fleetgate_auth_failures_total", method="publickey") >= len(attempts)
    with trio.fail_after(10):  # each refused client has exited; the gateway counts its connection's end
        while fleet.metric("fleetgate_connections_total", result="auth_failed") < len(attempts):
            await fleet.running.gateway.connections_changed.wait()

    # The control: a valid certificate from the same CA gets in (and only then wakes alice).
    r = await run(with_key("alice", *valid))
    assert r.returncode == 0, r.err
    assert fleet.backend_calls("start") == 1


async def test_upstream_host_key_mismatch_is_refused(tmp_path, nursery):
    imposter = tmp_path / "imposter"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(imposter)], check=True)
    wrong = (tmp_path / "imposter.pub").read_text().strip()

    def patch(doc):
        doc["machines"]["alice"]["host_key"] = wrong

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "echo should-not-run"))
    assert r.returncode == 255
    assert "fleetgate: host key of alice changed; refusing to connect" in r.err
    assert "should-not-run" not in r.out
    assert fleet.metric("fleetgate_upstream_failures_total", reason="host_key_mismatch") == 1
    assert fleet.machine("alice").sessions == 0


async def test_routing_plus_target_and_refusal(tmp_path, nursery):
    def patch(doc):
        doc["users"]["alice"]["machines"] = ["alice", "bob"]

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    port_bob = cfg.machines["bob"].options["port"]
    r = await run(fleet.ssh("alice+bob", "echo $SSH_CONNECTION"))
    assert r.returncode == 0, r.err
    assert r.out.split()[-1] == str(port_bob)  # landed on bob's sshd
    r = await run(fleet.ssh("bob+alice", "true"))
    assert r.returncode == 255
    assert "bob may not use alice" in r.err
    assert fleet.machine("alice").state.value == "stopped"
