"""A full disk loses nothing it should keep (issue 25, item 6).

The audit log never holds a partial line (a short write is taken back and counted), and a
process machine whose state dir is full is not started at all: the user is told why, no
sshd runs that the gateway does not know of, status stays true and `fleetgate stop` works.
The e2e test runs a real gateway on a real, full 512 KiB tmpfs (a private mount namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from helpers import REPO, free_port, make_fleet, run

AUDIT_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    from fleetgate.audit import AuditLog
    from fleetgate.metrics import Metrics

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
    path, m = sys.argv[1], Metrics()
    audit = AuditLog(path, m)
    audit.write("session_start", user="alice", n=0)
    # Room for one more line and part of the next: that one is written short, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 150, resource.RLIM_INFINITY))
    for n in range(1, 5):
        audit.write("session_start", user="alice", n=n, pad="x" * 60)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    audit.write("session_end", user="alice", n=99)   # the disk has room again
    audit.close()
    print(int(m.audit_failures._value.get()))
""")


def test_audit_log_never_writes_a_partial_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    r = subprocess.run([sys.executable, "-c", AUDIT_SCRIPT, str(path)], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]   # every line is whole JSON
    assert [x["n"] for x in records] == [0, 1, 99], raw
    assert int(r.stdout.split()[-1]) == 3   # the three that did not fit are counted, not half-written


def _processes_of(state: Path, machine: str) -> list[int]:
    """Every process on the host started for `machine` of the gateway whose state dir is `state`
    (found by its command line in /proc, as an operator would with pgrep -f)."""
    marker = os.fsencode(f"{state}/process/{machine}/sshd_config")
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                out.append(int(entry.name))
    return out


async def _admin(cfg: Path, *args: str):
    return await run([sys.executable, "-m", "fleetgate", *args, "-c", str(cfg), "--timeout", "30"], timeout=60,
                     cwd=REPO)


async def _scrape(port: int) -> str:
    from helpers import fetch_metrics

    return await fetch_metrics(port)


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the scrape")


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root, a private mount namespace)")
async def test_full_state_dir_loses_no_machine(tmp_path):
    state = tmp_path / "full"        # a 512 KiB tmpfs in the gateway's own mount namespace
    state.mkdir()
    metrics_port = free_port()

    def patch(doc):
        doc["gateway"].update(state_dir=str(state), admin_socket=str(tmp_path / "admin.sock"))
        doc["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
        doc["audit"] = {"file": str(state / "audit.jsonl")}

    port = free_port()
    fleet, cfg = make_fleet(tmp_path, port=port, patch=patch)
    import tomllib

    from test_reload_atomic import dump

    doc = tomllib.loads(fleet.config_path.read_text())
    patch(doc)
    fleet.config_path.write_text(dump(doc))
    cfg_path = fleet.config_path

    def ssh(user: str, command: str) -> list[str]:
        return ["ssh", *fleet.ssh_opts(port), f"{user}@127.0.0.1", command]

    log = open(tmp_path / "serve.log", "wb")
    gw = await trio.lowlevel.open_process(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
         'mount -t tmpfs -o size=512k,mode=0700 fleetgate-full "$1" && exec "$2" -m fleetgate serve -c "$3"',
         "sh", str(state), sys.executable, str(cfg_path)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.PIPE, cwd=REPO)
    inside = ["nsenter", "-t", str(gw.pid), "-m", "--"]
    seen = b""
    try:
        with trio.fail_after(60):   # the gateway logs "ssh listening" once it accepts logins
            while b"ssh listening" not in seen:
                chunk = await gw.stderr.receive_some(65536)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
        r = await run(ssh("bob", "echo up"))
        assert (r.returncode, r.out) == (0, "up\n"), r.err
        assert (await _admin(cfg_path, "stop", "bob")).returncode == 0   # bob's files stay; its pid file goes
        assert _processes_of(state, "bob") == []
        r = await run(ssh("alice", "echo up"))   # alice runs through it all
        assert r.returncode == 0, r.err
        alice = _processes_of(state, "alice")
        assert alice

        # Fill the state dir's file system (dd stops at ENOSPC).
        await run([*inside, "dd", "if=/dev/zero", f"of={state}/filler", "bs=4096"])
        r = await run([*inside, "df", "--output=avail", "-B1", str(state)])
        assert r.out.split()[-1] == "0", r.out

        for _ in range(3):
            r = await run(ssh("bob", "true"))
            assert r.returncode == 255
            assert "internal error" not in r.err, r.err
            assert "cannot write this machine's files (its disk is full); nothing was started" in r.err, r.err
        assert _processes_of(state, "bob") == []     # no sshd the gateway does not know of
        r = await _admin(cfg_path, "status", "--json")
        states = {m["machine"]: m["state"] for m in json.loads(r.out)}
        assert states["alice"] == "running" and states["bob"] in ("failed", "stopped"), states
        assert _sample(await _scrape(metrics_port), 'fleetgate_state_write_errors_total{kind="pid_file"}') >= 1
        # alice, already running, keeps working, and `fleetgate stop` stops her on a full disk too.
        r = await run(ssh("alice", "echo still-up"))
        assert (r.returncode, r.out) == (0, "still-up\n"), r.err
        assert (await _admin(cfg_path, "stop", "alice")).returncode == 0
        assert _processes_of(state, "alice") == []

        # Room again: bob starts (after the 5 s retry cooldown a failed start earns), and stops.
        await run([*inside, "rm", f"{state}/filler"])
        await trio.sleep(5.5)
        r = await run(ssh("bob", "echo back"))
        assert (r.returncode, r.out) == (0, "back\n"), r.err
        assert (await _admin(cfg_path, "stop", "bob")).returncode == 0
        assert _processes_of(state, "bob") == []
        # Every audit line is whole JSON, whatever the full disk did to the ones in between.
        r = await run([*inside, "cat", f"{state}/audit.jsonl"])
        records = [json.loads(line) for line in r.out.splitlines()]
        assert records and all(isinstance(x, dict) for x in records)
    finally:
        gw.terminate()
        with trio.move_on_after(30):
            await gw.wait()
        log.close()
        for pid in _processes_of(state, "bob") + _processes_of(state, "alice"):   # what a failed run left
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
