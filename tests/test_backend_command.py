"""The command backend with real scripts: success (a real sshd the script starts), non-zero exit, timeout.

Each case goes through a real in-process gateway and the real `ssh` client; the scripts
are ordinary shell scripts written by the test, the "VM" a real sshd they daemonise.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import MappingProxyType

import pytest
import trio

from fleetgate.backends.base import Address, BackendError, PowerState
from fleetgate.backends.command import CommandBackend, parse_address
from fleetgate.config import BackendConfig, ConfigError, MachineConfig
from helpers import free_port, make_fleet, run, start_gateway

SSHD_CONFIG = """ListenAddress 127.0.0.1:{port}
HostKey {mdir}/ssh_host_ed25519_key
AuthorizedKeysFile {mdir}/authorized_keys
PidFile {vmdir}/sshd.pid
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
LogLevel ERROR
"""

START = """#!/bin/sh
# A start command as users write them: chatter, then the address on a line of its own.
echo "starting $1 ..."
/usr/sbin/sshd -f "{vms}/$1/sshd_config" -E "{vms}/$1/sshd.log" || exit 1
echo "127.0.0.1"
"""
STOP = """#!/bin/sh
kill "$(cat "{vms}/$1/sshd.pid")" && rm -f "{vms}/$1/sshd.pid"
"""
STATUS = """#!/bin/sh
if [ -f "{vms}/$1/sshd.pid" ] && kill -0 "$(cat "{vms}/$1/sshd.pid")" 2>/dev/null; then
  echo "running 127.0.0.1"
else
  echo "stopped"
fi
"""
FAIL = """#!/bin/sh
echo "connecting to hypervisor"
echo "error: failed to get domain '$1'" >&2
echo "error: Domain not found: no domain with matching name '$1'" >&2
exit 3
"""
# Ignores TERM (and so does its child), so the timeout must escalate to KILL on the whole group.
# The child is a copy of sleep under the test's directory, so that a scan of /proc finds every
# survivor by its command line, whether or not the script got as far as writing the pid files.
HANG = """#!/bin/sh
trap '' TERM
echo $$ > "{vms}/hang.pid"
"{vms}/hang-sleep" 120 &
echo $! > "{vms}/hang-child.pid"
echo "waiting for the hypervisor lock" >&2
wait
"""


def script(path: Path, text: str, **fmt: str) -> str:
    path.write_text(text.format(**fmt))
    path.chmod(0o755)
    return str(path)


def survivors(mark: str) -> list[str]:
    """Live (not zombie) processes whose command line mentions `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if mark in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.e2e
async def test_real_scripts_success_nonzero_exit_and_timeout(tmp_path, nursery):
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    vms = tmp_path / "vms"
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    port = free_port()
    scripts = {name: script(bin_ / f"{name}.sh", text, vms=str(vms))
               for name, text in (("start", START), ("stop", STOP), ("status", STATUS), ("fail", FAIL),
                                  ("hang", HANG))}

    def patch(doc: dict) -> None:
        alice = doc["machines"]["alice"]
        doc["backends"]["cmd-ok"] = {"type": "command", "start": [scripts["start"], "{machine}"],
                                     "stop": [scripts["stop"], "{machine}"],
                                     "status": [scripts["status"], "{machine}"], "start_timeout": 20}
        doc["backends"]["cmd-fail"] = {"type": "command", "start": [scripts["fail"], "{machine}"]}
        doc["backends"]["cmd-hang"] = {"type": "command", "start": ["sh", scripts["hang"]], "start_timeout": 1}
        for name in ("ok", "fail", "hang"):
            doc["machines"][name] = {"backend": f"cmd-{name}", "user": alice["user"], "host_key": alice["host_key"],
                                     "ssh_port": port, "boot_timeout": 30}
        doc["users"]["tester"] = {"authorized_keys_file": "client_key.pub", "machines": ["ok", "fail", "hang"]}

    fleet, cfg = make_fleet(tmp_path, patch=patch, isolation="none")  # its "VM" is a host sshd
    mdir = fleet.dir / "machines" / "alice"
    (vms / "ok").mkdir(parents=True)
    shutil.copy2(shutil.which("sleep"), vms / "hang-sleep")
    (vms / "ok" / "sshd_config").write_text(SSHD_CONFIG.format(port=port, mdir=mdir, vmdir=vms / "ok"))
    await start_gateway(nursery, fleet, cfg)
    try:
        assert fleet.machine("ok").state.value == "stopped"  # the status script ran at start-up

        # Success: the start script's sshd is where the user lands.
        r = await run(fleet.ssh("tester+ok", 'echo "landed on port ${SSH_CONNECTION##* }"'))
        assert (r.returncode, r.out) == (0, f"landed on port {port}\n"), r.err
        assert fleet.metric("fleetgate_wakes_total", backend="cmd-ok", result="success") == 1
        assert fleet.machine("ok").address == Address("127.0.0.1", port)
        ok = fleet.running.fleet.machines["ok"]
        assert await ok.backend.status(ok.config) is PowerState.RUNNING
        assert await fleet.running.fleet.stop("ok")
        assert not (vms / "ok" / "sshd.pid").exists()
        assert await ok.backend.status(ok.config) is PowerState.STOPPED

        # Non-zero exit: the user reads the exit status and an error id; the stderr tail is for the log.
        r = await run(fleet.ssh("tester+fail", "true"))
        assert r.returncode == 255
        assert "fleetgate: fail could not be started: start command exited with status 3 (error id " in r.err, r.err
        assert "Domain not found" not in r.err, r.err
        assert fleet.metric("fleetgate_wake_failures_total", backend="cmd-fail", reason="start_error") == 1

        # Timeout: the user is told, the whole process group (TERM ignored) is killed.
        with trio.fail_after(30):
            r = await run(fleet.ssh("tester+hang", "true"))
        assert r.returncode == 255
        assert "fleetgate: hang could not be started: start command timed out after 1 s (error id " in r.err, r.err
        assert "hypervisor lock" not in r.err, r.err
        assert fleet.metric("fleetgate_wake_failures_total", backend="cmd-hang", reason="backend_unreachable") == 1
        # Nothing of the start command survives. Under load the timeout can fire before the
        # script wrote its pid files, so the proof is a scan for its command lines; the pid
        # files, where written, name dead processes too.
        assert survivors(str(vms)) == []
        for f in ("hang.pid", "hang-child.pid"):
            if (vms / f).exists():
                assert not alive(int((vms / f).read_text())), f
    finally:
        pid_file = vms / "ok" / "sshd.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)


def machine(name: str, **options) -> MachineConfig:
    return MachineConfig(name=name, backend="cmd", user=None, address=None, host_keys=(), known_hosts=None,
                         identity=None, boot_timeout=30.0, options=MappingProxyType(options))


def backend(tmp_path: Path, **options) -> CommandBackend:
    return CommandBackend(BackendConfig("cmd", "command", MappingProxyType(options)),
                          lambda p: None if p is None else tmp_path / p, tmp_path)


async def test_machine_name_is_an_argument_never_shell_syntax(tmp_path):
    out = tmp_path / "arg"
    b = backend(tmp_path, start=["sh", "-c", 'printf %s "$1" > "$0"; echo 10.1.2.3:2200', str(out), "{machine}"])
    m = machine("vm", vm_name="x; touch pwned")
    await b.start(m)
    assert out.read_text() == "x; touch pwned"
    assert not (tmp_path / "pwned").exists()
    assert await b.address(m) == Address("10.1.2.3", 2200)


async def test_shell_mode_quotes_the_machine_name(tmp_path):
    out = tmp_path / "arg"
    b = backend(tmp_path, shell=True, start="true", status=f"printf %s {{machine}} > {out}; echo shutoff")
    assert await b.status(machine("vm", vm_name="it's $(id)")) is PowerState.STOPPED
    assert out.read_text() == "it's $(id)"


async def test_start_without_an_address_needs_one_configured(tmp_path):
    b = backend(tmp_path, start=["echo", "started, no address here"])
    with pytest.raises(BackendError, match="printed no address") as info:
        await b.start(machine("vm"))
    assert info.value.reason == "start_error"


def test_parse_address():
    assert parse_address("192.168.0.57", 22) == Address("192.168.0.57", 22)
    assert parse_address(" 10.0.0.1:2222 ", 22) == Address("10.0.0.1", 2222)
    assert parse_address("[fd00::1]:2200", 22) == Address("fd00::1", 2200)
    assert parse_address("fd00::1", 2200) == Address("fd00::1", 2200)
    for line in ("done", "starting vm ...", "vm.example.org:22", "0.0.0.0", "10.0.0.1:", ""):
        assert parse_address(line, 22) is None, line


@pytest.mark.parametrize("options, key, words", [
    ({}, "backends.cmd.start", "missing; the command that starts a machine"),
    ({"start": "virsh start {machine}"}, "backends.cmd.start", "must be a list of arguments"),
    ({"start": ["no-such-program-fg", "{machine}"]}, "backends.cmd.start", "no executable 'no-such-program-fg'"),
    ({"start": ["true"], "start_timeout": -1}, "backends.cmd.start_timeout", "seconds > 0"),
    ({"start": ["true"], "shell": "yes"}, "backends.cmd.shell", "must be true or false"),
])
@pytest.mark.e2e
def test_config_errors_name_the_key_and_the_fix(tmp_path, options, key, words):
    def patch(doc: dict) -> None:
        doc["backends"]["cmd"] = {"type": "command", **options}
        m = doc["machines"]["alice"]
        m["backend"] = "cmd"
        for k in ("port", "host_key_file", "authorized_keys_file"):
            m.pop(k)

    with pytest.raises(ConfigError) as info:
        make_fleet(tmp_path, patch=patch)
    assert f"key '{key}': " in str(info.value) and words in str(info.value), str(info.value)
