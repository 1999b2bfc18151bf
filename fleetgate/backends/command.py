"""Command backend: start, stop and status are programs you already have (virsh, a cloud CLI, a script).

Why it works the way it does:
- Commands are argv lists with `{machine}` substituted, run without a shell, so a machine
  name can never become shell syntax; `shell = true` is an explicit opt-in for one-liners
  (the name is then shell-quoted).
- Output goes to temporary files, not pipes: a start script that launches a daemon in the
  background would otherwise hold the pipe open and look hung until its timeout.
- Each command runs in its own process group; on timeout the whole group is killed, so a
  hung `sleep` or `ssh` inside a script does not outlive the call.
- A non-zero exit is a failure carrying the tail of the command's stderr: that tail is what
  the log sees (it usually says exactly what went wrong), with an error id; the user sees
  the exit status and the same id, never the output (a cloud CLI prints request ids, ARNs,
  sometimes credentials).
- `status_all` (optional) is one command for every machine's state, asked once per reconcile
  pass instead of `status` once per machine: at 10 000 machines a process per machine every
  30 s costs a large share of a core just in fork/exec (docs/benchmarks.md, scale).
- Commands get a minimal environment (PATH, HOME, LANG, ... and FLEETGATE_MACHINE,
  FLEETGATE_OP), not the gateway's: its environment may hold other backends' tokens
  (`token_env`). `pass_env` names the variables a command needs (AWS_PROFILE, KUBECONFIG).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Mapping, Sequence

import trio

from ..settings import BackendConfig, MachineConfig, parse_host_port
from .base import Address, Backend, BackendError, is_port, is_seconds, PathResolver, PowerState
from .http import parse_ip, power_state

log = logging.getLogger(__name__)

OPS = ("start", "stop", "status", "status_all")
DEFAULT_TIMEOUTS = {"start": 300.0, "stop": 120.0, "status": 30.0, "status_all": 30.0}
TERM_GRACE = 3.0
TAIL_CHARS = 400
# What a command gets from the gateway's environment unless `pass_env` names more.
BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_OUTPUT = 64 * 1024
MAX_OUTPUT_ALL = 16 * 1024 * 1024  # status_all: a line per machine


def parse_address(line: str, default_port: int) -> Address | None:
    """An address printed by a command: IP, IP:PORT or [IPv6]:PORT; None if the line is not one."""
    line = line.strip()
    try:
        return Address(parse_ip(line), default_port)
    except ValueError:
        pass
    hp = parse_host_port(line, "") if ":" in line else None
    if hp is None or not hp.port:
        return None
    try:
        return Address(parse_ip(hp.host), hp.port)
    except ValueError:
        return None


def _tail(f: BinaryIO) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - TAIL_CHARS))
    text = f.read().decode("utf-8", errors="replace").strip()
    return ("..." + text) if size > TAIL_CHARS else text


class CommandBackend(Backend):
    TYPE = "command"
    BACKEND_OPTIONS = ("start", "stop", "status", "status_all", "shell", "start_timeout", "stop_timeout",
                       "status_timeout", "status_all_timeout", "pass_env")
    MACHINE_OPTIONS = ("ssh_port", "vm_name")
    PROVIDES_ADDRESS = True

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        shell = opts.get("shell", False)
        if not isinstance(shell, bool):
            yield "shell", "must be true or false"
            shell = False
        if "start" not in opts:
            yield "start", "missing; the command that starts a machine, e.g. start = [\"virsh\", \"start\", \"{machine}\"]"
        for op in OPS:
            cmd = opts.get(op)
            if cmd is None:
                continue
            if shell:
                if not isinstance(cmd, str) or not cmd.strip():
                    yield op, "must be a shell command string (shell = true)"
                continue
            if isinstance(cmd, str):
                yield op, f"must be a list of arguments, e.g. {shlex.split(cmd) or ['prog']!r}; or set shell = true"
            elif not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
                yield op, "must be a non-empty list of strings (program and arguments)"
            elif _find_program(cmd[0], resolve) is None:
                yield op, f"no executable '{cmd[0]}' (not on PATH nor a file relative to the config)"
        for op in OPS:
            v = opts.get(f"{op}_timeout")
            if v is not None and not is_seconds(v, allow_zero=False):
                yield f"{op}_timeout", f"must be a number of seconds > 0, got {v!r}"
        pe = opts.get("pass_env")
        if pe is not None and (not isinstance(pe, list) or
                               not all(isinstance(n, str) and ENV_NAME_RE.match(n) for n in pe)):
            yield "pass_env", "must be a list of environment variable names, e.g. [\"AWS_PROFILE\", \"KUBECONFIG\"]"

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        port = opts.get("ssh_port")
        if port is not None and not is_port(port):
            yield "ssh_port", f"must be a TCP port number (used with an address printed without one), got {port!r}"
        name = opts.get("vm_name")
        if name is not None and (not isinstance(name, str) or not name):
            yield "vm_name", "must be the non-empty name substituted for {machine}"

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        o = config.options
        self.shell = bool(o.get("shell", False))
        self.timeouts = {op: float(o.get(f"{op}_timeout", DEFAULT_TIMEOUTS[op])) for op in OPS}
        self._addresses: dict[str, Address] = {}
        self.pass_env = (*BASE_ENV, *(o.get("pass_env") or ()))

    def _env(self, op: str, machine: MachineConfig | None) -> dict[str, str]:
        env = {k: os.environ[k] for k in self.pass_env if k in os.environ}
        env.setdefault("PATH", os.defpath)
        return {**env, **({"FLEETGATE_MACHINE": machine.name} if machine else {}), "FLEETGATE_OP": op}

    def _argv(self, op: str, machine: MachineConfig | None) -> list[str]:
        vm = str(machine.options.get("vm_name", machine.name)) if machine else ""
        cmd = self.config.options[op]
        if self.shell:
            return ["/bin/sh", "-c", str(cmd).replace("{machine}", shlex.quote(vm))]
        argv = [a.replace("{machine}", vm) for a in cmd]
        argv[0] = _find_program(argv[0], self.resolve) or argv[0]
        return argv

    async def _run(self, op: str, machine: MachineConfig | None, failure_reason: str) -> str:
        """Run one command; its stdout, or BackendError with its stderr tail."""
        argv = self._argv(op, machine)
        timeout = self.timeouts[op]
        env = self._env(op, machine)
        killed: list[int] = []

        async def deliver_cancel(proc: trio.Process) -> None:
            killed.append(proc.pid)
            await _kill_group(proc)

        with _scratch() as out, _scratch() as err:
            try:
                with trio.move_on_after(timeout) as scope:
                    try:
                        proc = await trio.run_process(argv, stdin=b"", stdout=out, stderr=err, check=False, env=env,
                                                      start_new_session=True, deliver_cancel=deliver_cancel)
                    except OSError as exc:
                        raise BackendError(f"{op} command {argv[0]!r} cannot run: {exc.strerror}",
                                           failure_reason) from None
            finally:
                for pgid in killed:  # also when an outer scope (the boot timeout) cancelled us
                    _kill_leftovers(pgid)
            if scope.cancelled_caught:
                tail = _tail(err)
                log.warning("command backend timeout op=%s machine=%s seconds=%g", op,
                            machine.name if machine else "-", timeout)
                raise BackendError(f"{op} command timed out after {timeout:g} s", "backend_unreachable",
                                   detail=f"{op} command timed out after {timeout:g} s: {tail or '(no stderr)'}")
            if proc.returncode != 0 or op not in ("status", "status_all"):  # 10 000 status calls: no line each
                log.info("command backend op=%s machine=%s exit=%d", op, machine.name if machine else "-",
                         proc.returncode)
            if proc.returncode != 0:
                tail = _tail(err) or "(no output on stderr)"
                raise BackendError(f"{op} command exited with status {proc.returncode}", failure_reason,
                                   detail=f"{op} command exited with status {proc.returncode}: {tail}")
            out.seek(0)
            return out.read(MAX_OUTPUT_ALL if op == "status_all" else MAX_OUTPUT).decode("utf-8", errors="replace")

    async def start(self, machine: MachineConfig) -> None:
        stdout = await self._run("start", machine, "start_error")
        port = int(machine.options.get("ssh_port", 22))
        for line in reversed(stdout.splitlines()):  # the last address printed wins; chatter before it is fine
            address = parse_address(line, port)
            if address is not None:
                self._addresses[machine.name] = address
                return
        self._addresses.pop(machine.name, None)
        if machine.address is None:
            raise BackendError("start command printed no address (IP or IP:PORT on a line of its own) and "
                               f"machine {machine.name} has no address configured", "start_error")

    async def stop(self, machine: MachineConfig) -> None:
        self._addresses.pop(machine.name, None)
        if "stop" in self.config.options:
            await self._run("stop", machine, "stop_failed")

    async def status(self, machine: MachineConfig) -> PowerState:
        if "status" not in self.config.options:
            if "status_all" in self.config.options:
                return (await self.status_all([machine]))[machine.name]
            return PowerState.UNKNOWN
        stdout = await self._run("status", machine, "backend_error")
        words = stdout.split("\n", 1)[0].split()
        if not words:
            return PowerState.UNKNOWN
        state = power_state(words[0])
        if state is PowerState.RUNNING and len(words) > 1:
            address = parse_address(words[1], int(machine.options.get("ssh_port", 22)))
            if address is not None:
                self._addresses[machine.name] = address
        return state

    def can_status_all(self) -> bool:
        return "status_all" in self.config.options

    async def status_all(self, machines: Sequence[MachineConfig]) -> Mapping[str, PowerState]:
        """One `status_all` command for all: it prints `NAME STATE [ADDRESS]` lines (NAME as
        {machine} would be: vm_name or the machine's name). A machine it does not list is
        stopped (a `virsh list --all` or a cloud listing has no line for what does not exist)."""
        stdout = await self._run("status_all", None, "backend_error")
        seen: dict[str, list[str]] = {}
        for line in stdout.splitlines():
            words = line.split()
            if len(words) >= 2:
                seen[words[0]] = words[1:]
        out: dict[str, PowerState] = {}
        for machine in machines:
            words = seen.get(str(machine.options.get("vm_name", machine.name)))
            if words is None:
                out[machine.name] = PowerState.STOPPED
                continue
            state = out[machine.name] = power_state(words[0])
            if state is PowerState.RUNNING and len(words) > 1:
                address = parse_address(words[1], int(machine.options.get("ssh_port", 22)))
                if address is not None:
                    self._addresses[machine.name] = address
        return out

    async def address(self, machine: MachineConfig) -> Address:
        if machine.name in self._addresses:
            return self._addresses[machine.name]
        return await super().address(machine)


def _scratch() -> BinaryIO:
    """A file for a command's output: in memory (memfd) where Linux has it, else a temporary file.

    Creating and deleting a temporary file on disk costs ~0.2 ms, twice per command: with a
    status command per machine (10 000 every 30 s) that was most of what a call cost the
    gateway (issue 15). Like a temporary file, and unlike a pipe, it never blocks a writer."""
    if hasattr(os, "memfd_create"):
        try:
            return open(os.memfd_create("fleetgate-command", os.MFD_CLOEXEC), "w+b")
        except OSError:
            pass
    return tempfile.TemporaryFile()


def _find_program(prog: str, resolve: PathResolver) -> str | None:
    if "/" in prog:
        p = resolve(prog)
        return str(p) if p is not None and os.access(p, os.X_OK) and p.is_file() else None
    return shutil.which(prog)


async def _kill_group(proc: trio.Process) -> None:
    """Timeout: TERM the command's whole process group, KILL it if the command lingers.

    trio stops running this once the command itself has exited; the caller kills what is
    left of the group (a `sleep` that ignored TERM) after that.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        with trio.move_on_after(TERM_GRACE):
            await proc.wait()
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_leftovers(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
