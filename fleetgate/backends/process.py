"""Process backend: a "machine" is a local OpenSSH sshd started on demand on a loopback port.

It is the embedded default (the demo fleet) and the cheapest real upstream for tests: a
real sshd with its own host key, run as the current user, no root needed. It keeps its
state (config, pid file, log) on disk so that a restarted gateway adopts sshds that are
still running instead of starting a second copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping

import trio

from ..config import MachineConfig
from .base import Address, Backend, BackendError, is_port, is_seconds, PathResolver, PowerState

log = logging.getLogger(__name__)

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    for cand in SSHD_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (children first found, then theirs)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class ProcessBackend(Backend):
    TYPE = "process"
    BACKEND_OPTIONS = ("sshd", "start_delay", "stop_delay", "stop_timeout")
    MACHINE_OPTIONS = ("port", "host_key_file", "authorized_keys_file", "accept_env", "trusted_user_ca_keys_file",
                       "host_certificate_file", "password_authentication")
    PROVIDES_ADDRESS = True

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        sshd = opts.get("sshd")
        if sshd is not None and (not isinstance(sshd, str) or not os.access(sshd, os.X_OK)):
            yield "sshd", f"'{sshd}' is not an executable sshd"
        elif sshd is None and find_sshd() is None:
            yield "sshd", "no sshd found on this machine; install openssh-server or set sshd = PATH"
        for key in ("start_delay", "stop_delay", "stop_timeout"):
            v = opts.get(key)
            if v is not None and not is_seconds(v, allow_zero=True):
                yield key, f"must be a number of seconds >= 0, got {v!r}"

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        port = opts.get("port")
        if port is None:
            yield "port", "missing; the loopback port this machine's sshd listens on"
        elif not is_port(port):
            yield "port", f"must be a TCP port number, got {port!r}"
        for key in ("host_key_file", "authorized_keys_file"):
            v = opts.get(key)
            if v is None:
                yield key, "missing; a path (fleetgate demo writes these for you)"
            elif not isinstance(v, str):
                yield key, "must be a path string"
            else:
                p = resolve(v)
                if p is None or not p.is_file():
                    yield key, f"no such file {p}"
        for key in ("trusted_user_ca_keys_file", "host_certificate_file"):
            v = opts.get(key)
            if v is not None and (not isinstance(v, str) or resolve(v) is None or not resolve(v).is_file()):
                yield key, f"no such file {resolve(v) if isinstance(v, str) else v!r}"
        env = opts.get("accept_env")
        if env is not None and (not isinstance(env, list) or not all(isinstance(e, str) for e in env)):
            yield "accept_env", "must be a list of environment variable patterns"

    def __init__(self, config, resolve, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        self.sshd = config.options.get("sshd") or find_sshd() or "/usr/sbin/sshd"
        # Demo knobs: make a start or stop take as long as a real VM's, to watch the lifecycle.
        self.start_delay = float(config.options.get("start_delay", 0))
        self.stop_delay = float(config.options.get("stop_delay", 0))
        self.stop_timeout = float(config.options.get("stop_timeout", 5))
        self._procs: dict[str, trio.Process] = {}

    def _dir(self, machine: MachineConfig) -> Path:
        return self.state_dir / "process" / machine.name

    def _write_config(self, machine: MachineConfig) -> Path:
        d = self._dir(machine)
        d.mkdir(parents=True, exist_ok=True)
        o = machine.options
        accept_env = " ".join(o.get("accept_env", ["LANG", "LC_*", "FLEETGATE_*"]))
        text = f"""# written by fleetgate's process backend for machine {machine.name}
ListenAddress 127.0.0.1:{o['port']}
HostKey {self.resolve(o['host_key_file'])}
AuthorizedKeysFile {self.resolve(o['authorized_keys_file'])}
PidFile {d / 'sshd.pid'}
UsePAM no
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication {"yes" if o.get("password_authentication") else "no"}
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowAgentForwarding yes
X11Forwarding no
PrintMotd no
PrintLastLog no
AcceptEnv {accept_env}
Subsystem sftp internal-sftp
LogLevel ERROR
MaxStartups 200:30:400
MaxSessions 100
"""
        if o.get("trusted_user_ca_keys_file"):
            text += f"TrustedUserCAKeys {self.resolve(o['trusted_user_ca_keys_file'])}\n"
        if o.get("host_certificate_file"):
            text += f"HostCertificate {self.resolve(o['host_certificate_file'])}\n"
        cfg = d / "sshd_config"
        cfg.write_text(text)
        return cfg

    def _live_pid(self, machine: MachineConfig) -> int | None:
        """The pid of this machine's sshd if one runs (ours or left by an earlier gateway)."""
        pidfile = self._dir(machine) / "sshd.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if str(self._dir(machine) / "sshd_config").encode() not in cmdline:
            return None  # the pid was reused by another process
        if stat.rpartition(")")[2].split()[0] == "Z":
            return None
        return pid

    async def start(self, machine: MachineConfig) -> None:
        if self._live_pid(machine) is not None:
            return
        cfg = self._write_config(machine)
        if os.geteuid() == 0:
            # sshd run by root insists on its privilege separation directory.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        check = await trio.run_process([self.sshd, "-t", "-f", str(cfg)], capture_stdout=True,
                                       capture_stderr=True, check=False)
        if check.returncode != 0:
            tail = check.stderr.decode(errors="replace").strip()[-300:]
            raise BackendError(f"sshd rejected its config: {tail}", "start_error")
        if self.start_delay:
            await trio.sleep(self.start_delay)
        logf = open(self._dir(machine) / "sshd.log", "ab")
        try:
            proc = await trio.lowlevel.open_process(
                [self.sshd, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot run {self.sshd}: {exc.strerror}", "start_error") from exc
        finally:
            logf.close()
        self._procs[machine.name] = proc
        log.info("process backend started sshd machine=%s pid=%s port=%s", machine.name, proc.pid,
                 machine.options["port"])

    async def stop(self, machine: MachineConfig) -> None:
        if self.stop_delay:
            await trio.sleep(self.stop_delay)
        proc = self._procs.pop(machine.name, None)
        pid = proc.pid if proc is not None else self._live_pid(machine)
        if pid is None:
            return
        # Like a power-off: sshd's per-connection processes run in sessions of their own
        # (setsid), so the listener's process group does not reach them.
        for child in descendants(pid):
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        with trio.move_on_after(self.stop_timeout) as scope:
            await self._wait_gone(pid, proc)
        if scope.cancelled_caught:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with trio.fail_after(5):
                await self._wait_gone(pid, proc)
        (self._dir(machine) / "sshd.pid").unlink(missing_ok=True)

    @staticmethod
    async def _wait_gone(pid: int, proc: trio.Process | None) -> None:
        if proc is not None:
            await proc.wait()
            return
        while Path(f"/proc/{pid}").exists():  # adopted: not our child, so poll
            await trio.sleep(0.05)

    async def status(self, machine: MachineConfig) -> PowerState:
        proc = self._procs.get(machine.name)
        if proc is not None:
            if proc.poll() is None:
                return PowerState.RUNNING
            self._procs.pop(machine.name, None)
            return PowerState.STOPPED
        return PowerState.RUNNING if self._live_pid(machine) is not None else PowerState.STOPPED

    async def address(self, machine: MachineConfig) -> Address:
        if machine.address is not None:
            return Address.of(machine.address)
        return Address("127.0.0.1", int(machine.options["port"]))
