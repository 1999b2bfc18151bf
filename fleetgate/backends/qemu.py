"""QEMU backend: fleetgate runs `qemu-system-x86_64` itself, one process per machine.

Why it looks like this:
- Each guest gets QEMU's user-mode network with a loopback host port forwarded to its
  port 22, so no root, bridge or tap device is needed, and nothing listens beyond
  127.0.0.1.
- KVM is detected by trying, never assumed: on some hosts /dev/kvm opens but cannot run
  a stock kernel (the guest hangs silently). `accel = "auto"` boots the guest's kernel
  under KVM once and looks for its first console line; no line means TCG.
- Boots are capped per backend (`max_concurrent_starts`): emulated guests booting at once
  on a small host slow each other down far more than they gain. A start holds its slot
  until the guest's SSH banner answers, and queued wakes say so in the user's progress line.
- The QMP socket is bound by fleetgate and handed to QEMU as a file descriptor, so
  talking to QEMU never races its start-up, and a QEMU that dies at launch is seen as EOF.
- Each QEMU is watched by a task in the backend's own nursery (`run()`, started by the
  App), not in a connection's cancel scope; a guest that exits by itself is reported
  through `on_machine_exited`. Guests outlive a gateway restart and are adopted again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping

import trio

from .. import probe
from ..settings import BackendConfig, MachineConfig
from . import qmp as qmp_mod
from .base import Address, Backend, BackendError, is_port, PathResolver, PowerState

log = logging.getLogger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_APPEND = "console=ttyS0 quiet"
DEFAULT_MEMORY = 256
KVM_PROBE_TIMEOUT = 3.0   # a working KVM prints the kernel's first line in well under 1 s
LAUNCH_TIMEOUT = 30.0     # until QEMU answers QMP (it is initialised then)
QMP_TIMEOUT = 10.0
QUIT_TIMEOUT = 5.0
KILL_TIMEOUT = 10.0
PORT_ATTEMPTS = 3
LOG_TAIL = 400
# Measured on 2 cores under TCG: one boot 2.0-2.3 s to the banner, two at once 2.4-2.9 s
# each, three or four at once 4.4-5.0 s each. Two at a time keeps the average wait lowest.
DEFAULT_MAX_CONCURRENT_STARTS = 2

# The host does not change under a running gateway: probe KVM once per (qemu, kernel),
# not once per backend instance (a config reload builds new backends).
_KVM_VERDICTS: dict[tuple[str, str, int], bool] = {}


@dataclass
class Guest:
    """One QEMU process of ours (or adopted from an earlier gateway when `proc` is None)."""

    name: str
    dir: Path
    pid: int
    port: int
    accel: str
    proc: trio.Process | None
    launched_at: float
    ready_at: float | None = None
    expected_exit: bool = False
    returncode: int | None = None
    stop_outcome: str | None = None   # powerdown | quit | kill, when fleetgate stopped it
    exited: trio.Event = field(default_factory=trio.Event)
    qmp_lock: trio.Lock = field(default_factory=trio.Lock)


def find_qemu() -> str | None:
    return shutil.which(QEMU_BINARY)


def host_kernels() -> list[Path]:
    """This host's kernels, newest last (the KVM probe for disk-only guests boots one)."""
    found = [p for p in Path("/boot").glob("vmlinuz-*") if os.access(p, os.R_OK)]
    return sorted(found, key=lambda p: [int(x) if x.isdigit() else x for x in p.name.replace("-", ".").split(".")])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def qemu_argv(qemu: str, machine: MachineConfig, resolve: PathResolver, accel: str, port: int,
              qmp_fd: int) -> list[str]:
    """The command line for one guest; file names without a directory live in its state dir."""
    o = machine.options
    argv = [qemu, "-name", f"{machine.name},process=qemu-{machine.name}",
            "-accel", accel, "-m", str(o.get("memory", DEFAULT_MEMORY)), "-smp", str(o.get("cpus", 1)),
            "-display", "none", "-no-user-config", "-nodefaults", "-serial", "file:console.log"]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if o.get("kernel"):
        argv += ["-kernel", str(resolve(o["kernel"])), "-append", o.get("append", DEFAULT_APPEND)]
        if o.get("initrd"):
            argv += ["-initrd", str(resolve(o["initrd"]))]
    if o.get("disk"):
        disk = resolve(o["disk"])
        fmt = o.get("disk_format") or ("qcow2" if str(disk).endswith(".qcow2") else "raw")
        drive = f"file={disk},if=virtio,format={fmt}"
        if o.get("snapshot"):
            drive += ",snapshot=on"
        argv += ["-drive", drive]
    argv += [
        "-device", "virtio-rng-pci",  # without it the guest's sshd waits ~1.4 s for entropy
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22", "-device", "virtio-net-pci,netdev=n0",
        "-chardev", f"socket,id=qmp,fd={qmp_fd},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
    ]
    argv += list(o.get("extra_args", ()))
    return argv


async def probe_kvm(qemu: str, kernel: Path | None) -> tuple[bool, str]:
    """Boot `kernel` under KVM and wait for its first console line: the only honest test.

    Returns the verdict and why, for the log.
    """
    if kernel is None:
        return False, "no kernel to test with"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-m", "128", "-display", "none", "-no-user-config",
            "-nodefaults", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
            "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"]
    try:
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        return False, f"cannot run {qemu}: {exc.strerror}"
    assert proc.stdout is not None
    buf = b""
    try:
        with trio.move_on_after(KVM_PROBE_TIMEOUT):
            while b"Linux version" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                buf = (buf + chunk)[-8192:]
    finally:
        proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_TIMEOUT):
            await proc.wait()
        await proc.stdout.aclose()
    if b"Linux version" in buf:
        return True, "the kernel printed its first line under KVM"
    if proc.returncode is not None and proc.returncode != -signal.SIGKILL:
        text = " | ".join(ln.strip() for ln in buf.decode(errors="replace").splitlines() if ln.strip())
        return False, f"qemu -accel kvm exited ({proc.returncode}): {text[-200:]}"
    return False, f"no console output under KVM within {KVM_PROBE_TIMEOUT:g} s"


async def _wait_pid_gone(pid: int) -> None:
    """Wait for a process that is not our child (an adopted guest) to exit, via a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


class QemuBackend(Backend):
    TYPE = "qemu"
    BACKEND_OPTIONS = ("qemu", "accel", "max_concurrent_starts", "probe_kernel")
    MACHINE_OPTIONS = ("kernel", "initrd", "append", "disk", "disk_format", "snapshot", "memory", "cpus",
                       "port", "extra_args")
    PROVIDES_ADDRESS = True

    # -- configuration ---------------------------------------------------------------------

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        q = opts.get("qemu")
        if q is not None:
            if not isinstance(q, str) or not (os.access(q, os.X_OK) or shutil.which(q)):
                yield "qemu", f"'{q}' is not an executable; give the path of qemu-system-x86_64"
        elif find_qemu() is None:
            yield "qemu", "no qemu-system-x86_64 on PATH; apt-get install qemu-system-x86, or set qemu = PATH"
        accel = opts.get("accel", "auto")
        if accel not in ACCELS:
            yield "accel", f"must be one of {', '.join(ACCELS)}, got {accel!r}"
        n = opts.get("max_concurrent_starts", DEFAULT_MAX_CONCURRENT_STARTS)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            yield "max_concurrent_starts", f"must be an integer >= 1, got {n!r}"
        pk = opts.get("probe_kernel")
        if pk is not None:
            p = resolve(pk) if isinstance(pk, str) else None
            if p is None or not p.is_file():
                yield "probe_kernel", f"no such file {pk!r}; a kernel image to test KVM with"

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        if not opts.get("kernel") and not opts.get("disk"):
            yield "kernel", "missing; give kernel = PATH (with initrd = PATH) or disk = PATH"
        for key in ("kernel", "initrd", "disk"):
            v = opts.get(key)
            if v is None:
                continue
            p = resolve(v) if isinstance(v, str) else None
            if p is None:
                yield key, "must be a path string"
            elif not p.is_file():
                yield key, f"no such file {p}"
        for key in ("initrd", "append"):
            if key in opts and not opts.get("kernel"):
                yield key, "only used with kernel = PATH (direct kernel boot)"
        for key in ("append", "disk_format"):
            if key in opts and not isinstance(opts[key], str):
                yield key, f"must be a string, got {opts[key]!r}"
        if "snapshot" in opts and not isinstance(opts["snapshot"], bool):
            yield "snapshot", "must be true (discard the guest's disk writes) or false"
        mem = opts.get("memory", DEFAULT_MEMORY)
        if isinstance(mem, bool) or not isinstance(mem, int) or mem < 64:
            yield "memory", f"must be MiB as an integer >= 64, got {mem!r}"
        cpus = opts.get("cpus", 1)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= 64:
            yield "cpus", f"must be an integer from 1 to 64, got {cpus!r}"
        port = opts.get("port")
        if port is not None and not is_port(port):
            yield "port", f"must be a TCP port number (leave it out to let fleetgate pick one), got {port!r}"
        extra = opts.get("extra_args")
        if extra is not None and (not isinstance(extra, list) or not all(isinstance(a, str) for a in extra)):
            yield "extra_args", "must be a list of strings, added to QEMU's command line"

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        o = config.options
        self.qemu = o.get("qemu") or find_qemu() or QEMU_BINARY
        self.accel_option: str = o.get("accel", "auto")
        self.max_concurrent_starts: int = int(o.get("max_concurrent_starts", DEFAULT_MAX_CONCURRENT_STARTS))
        self.probe_kernel = resolve(o["probe_kernel"]) if o.get("probe_kernel") else None
        self.live: dict[str, Guest] = {}        # running QEMU processes by machine name
        self.last_exit: dict[str, Guest] = {}   # the last guest that exited, by machine name
        self._slots = trio.Semaphore(self.max_concurrent_starts)
        self._queue: list[str] = []             # machines waiting for a slot, in FIFO order
        self._booting: set[str] = set()
        self._probe_lock = trio.Lock()
        self._probing = False
        self._nursery: trio.Nursery | None = None
        self._unwatched: list[Guest] = []

    # -- the backend's own task ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._nursery is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the tasks that watch QEMU processes; the App runs this for the gateway's lifetime."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for guest in self._unwatched:
                    nursery.start_soon(self._watch, guest)
                self._unwatched.clear()
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _register(self, guest: Guest) -> None:
        self.live[guest.name] = guest
        if self._nursery is not None:
            self._nursery.start_soon(self._watch, guest)
        else:
            self._unwatched.append(guest)

    async def _watch(self, guest: Guest) -> None:
        await self._wait_exit(guest)
        if guest.expected_exit:
            log.info("qemu exited machine=%s pid=%s code=%s", guest.name, guest.pid, guest.returncode)
            return
        log.warning("qemu exited by itself machine=%s pid=%s code=%s console=%s", guest.name, guest.pid,
                    guest.returncode, _tail(guest.dir / "console.log", 200))
        self.on_machine_exited(guest.name)

    async def _wait_exit(self, guest: Guest) -> None:
        """Wait until the QEMU process is gone, then forget it; safe from several tasks at once."""
        if guest.proc is not None:
            guest.returncode = await guest.proc.wait()
        else:
            await _wait_pid_gone(guest.pid)
        self._forget(guest)

    def _forget(self, guest: Guest) -> None:
        if not guest.exited.is_set():
            guest.exited.set()
            self.last_exit[guest.name] = guest
        if self.live.get(guest.name) is guest:
            del self.live[guest.name]
            (guest.dir / "guest.json").unlink(missing_ok=True)

    # -- helpers --------------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        return self.state_dir / "qemu" / name

    @asynccontextmanager
    async def _qmp(self, guest: Guest) -> AsyncIterator[qmp_mod.QMP]:
        """A QMP session; QEMU serves one client at a time, so ours take turns."""
        async with guest.qmp_lock:
            async with qmp_mod.connect(guest.dir / "qmp.sock") as q:
                yield q

    async def _qmp_execute(self, guest: Guest, command: str, timeout: float = QMP_TIMEOUT) -> Any:
        with trio.fail_after(timeout):
            async with self._qmp(guest) as q:
                return await q.execute(command)

    def _adopt(self, machine: MachineConfig) -> Guest | None:
        """A QEMU left running by an earlier gateway, if its state file still describes it."""
        d = self._dir(machine.name)
        try:
            info = json.loads((d / "guest.json").read_text())
            pid, port, accel = int(info["pid"]), int(info["port"]), str(info["accel"])
            cwd = os.readlink(f"/proc/{pid}/cwd")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if Path(cwd) != d.resolve() or stat.rpartition(")")[2].split()[0] == "Z":
            return None  # the pid now belongs to someone else, or is a zombie
        now = trio.current_time()
        guest = Guest(machine.name, d, pid, port, accel, None, launched_at=now, ready_at=now)
        log.info("adopted running qemu machine=%s pid=%s port=%s", machine.name, pid, port)
        self._register(guest)
        return guest

    def _guest(self, machine: MachineConfig) -> Guest | None:
        guest = self.live.get(machine.name)
        if guest is not None and guest.proc is not None and guest.proc.poll() is not None:
            guest.returncode = guest.proc.returncode
            self._forget(guest)
            guest = None
        return guest or self._adopt(machine)

    def progress_note(self, machine: MachineConfig) -> str | None:
        if machine.name in self._queue:
            ahead = len(self._booting) + self._queue.index(machine.name)
            return f"queued: {ahead} boot{'' if ahead == 1 else 's'} ahead"
        if self._probing and machine.name in self._booting:
            return "checking whether KVM works"
        return None

    @asynccontextmanager
    async def _start_slot(self, name: str) -> AsyncIterator[None]:
        self._queue.append(name)
        try:
            await self._slots.acquire()
        finally:
            self._queue.remove(name)
        self._booting.add(name)
        try:
            yield
        finally:
            self._booting.discard(name)
            self._slots.release()

    async def _choose_accel(self, machine: MachineConfig) -> str:
        if self.accel_option != "auto":
            return self.accel_option
        kernel = self.resolve(machine.options["kernel"]) if machine.options.get("kernel") else self.probe_kernel
        if kernel is None:
            kernels = host_kernels()
            kernel = kernels[-1] if kernels else None
        if kernel is None:
            log.warning("no kernel to test KVM with; using TCG (set accel = \"kvm\" or probe_kernel = PATH)")
            return "tcg"
        try:
            key = (self.qemu, str(kernel), kernel.stat().st_mtime_ns)
        except OSError:
            return "tcg"
        async with self._probe_lock:
            if key not in _KVM_VERDICTS:
                self._probing = True
                try:
                    t0 = trio.current_time()
                    _KVM_VERDICTS[key], why = await probe_kvm(self.qemu, kernel)
                    log.info("kvm probe backend=%s usable=%s seconds=%.2f why=%s", self.name, _KVM_VERDICTS[key],
                             trio.current_time() - t0, why)
                finally:
                    self._probing = False
        return "kvm" if _KVM_VERDICTS[key] else "tcg"

    # -- the four calls -------------------------------------------------------------------------

    async def start(self, machine: MachineConfig) -> None:
        """Launch the guest and return once its SSH banner answers (holding a boot slot till then)."""
        guest = self._guest(machine)
        if guest is not None:
            if guest.expected_exit:
                await guest.exited.wait()  # a stop of ours is finishing; then boot afresh
            elif await self._qmp_status(guest) == "running":
                return
            else:
                await self._halt(guest, machine, powerdown=False)
        if self._nursery is None:
            raise BackendError("the qemu backend's run() task is not running; fleetgate must start it "
                               "before machines are woken", "start_error")
        async with self._start_slot(machine.name):
            accel = await self._choose_accel(machine)
            guest = await self._launch(machine, accel)
            try:
                await self._wait_ready(guest)
            except BaseException:
                # A half-booted guest is of no use to anyone: do not leave it behind.
                guest.expected_exit = True
                if guest.proc is not None and guest.proc.returncode is None:
                    guest.proc.kill()
                raise
            guest.ready_at = trio.current_time()
            log.info("qemu guest ready machine=%s accel=%s seconds=%.2f", machine.name, accel,
                     guest.ready_at - guest.launched_at)

    async def _launch(self, machine: MachineConfig, accel: str) -> Guest:
        d = self._dir(machine.name)
        d.mkdir(parents=True, exist_ok=True)
        fixed_port = machine.options.get("port")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = fixed_port or _free_port()
            listener = qmp_mod.bind_listening(d / "qmp.sock")
            argv = qemu_argv(self.qemu, machine, self.resolve, accel, port, listener.fileno())
            logf = open(d / "qemu.log", "ab")
            try:
                logf.write(f"--- fleetgate: {' '.join(argv)}\n".encode())
                logf.flush()
                proc = await trio.lowlevel.open_process(
                    argv, cwd=d, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    pass_fds=(listener.fileno(),), start_new_session=True)
            except OSError as exc:
                raise BackendError(f"cannot run {self.qemu}: {exc.strerror}", "start_error") from exc
            finally:
                logf.close()
                listener.close()   # QEMU holds its own copy now
            guest = Guest(machine.name, d, proc.pid, port, accel, proc, launched_at=trio.current_time())
            self._register(guest)
            (d / "guest.json").write_text(json.dumps({"pid": proc.pid, "port": port, "accel": accel}))
            log.info("qemu launched machine=%s pid=%s port=%s accel=%s", machine.name, proc.pid, port, accel)
            try:
                # QEMU answers QMP once it is initialised (devices, port forward); EOF if it died.
                if await self._qmp_status(guest, LAUNCH_TIMEOUT) is not None:
                    return guest
            except BaseException:
                guest.expected_exit = True
                proc.kill()
                raise
            guest.expected_exit = True
            with trio.move_on_after(KILL_TIMEOUT):
                if proc.returncode is None:
                    proc.kill()
                await self._wait_exit(guest)
            tail = _tail(d / "qemu.log")
            if not fixed_port and "forward" in tail and attempt < PORT_ATTEMPTS:
                log.info("qemu could not forward port %s (taken meanwhile); trying another", port)
                continue
            raise BackendError(f"qemu exited at launch (code {proc.returncode}): {tail[-300:]}", "start_error")
        raise AssertionError("unreachable")

    async def _qmp_status(self, guest: Guest, timeout: float = QMP_TIMEOUT) -> str | None:
        """QEMU's run state ('running', 'shutdown', ...), or None if it does not answer."""
        try:
            st = await self._qmp_execute(guest, "query-status", timeout)
        except (qmp_mod.QMPError, trio.TooSlowError) as exc:
            log.info("qmp query-status failed machine=%s error=%s", guest.name, exc)
            return None
        return st.get("status") if isinstance(st, dict) else None

    async def _wait_ready(self, guest: Guest) -> None:
        died = False
        async with trio.open_nursery() as nursery:
            async def watch_exit() -> None:
                nonlocal died
                await guest.exited.wait()
                died = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_exit)
            await probe.wait_for_banner(Address("127.0.0.1", guest.port))
            nursery.cancel_scope.cancel()
        if died:
            raise BackendError(f"qemu exited while the guest booted (code {guest.returncode}); console: "
                               f"{_tail(guest.dir / 'console.log', 300)}", "start_error")

    async def stop(self, machine: MachineConfig) -> None:
        """ACPI power button, then QMP quit after stop_timeout, then SIGKILL.

        The Fleet bounds stop() by stop_timeout itself and then calls force_stop(); the
        fallback here is for callers that do not.
        """
        guest = self._guest(machine)
        if guest is None:
            return
        # A guest that never finished booting has no ACPI daemon yet: do not wait for it.
        await self._halt(guest, machine, powerdown=guest.ready_at is not None)

    async def force_stop(self, machine: MachineConfig) -> None:
        """QMP quit, then SIGKILL: the guest did not power off within stop_timeout."""
        guest = self._guest(machine)
        if guest is None:
            return
        await self._halt(guest, machine, powerdown=False)

    async def _halt(self, guest: Guest, machine: MachineConfig, *, powerdown: bool) -> None:
        guest.expected_exit = True
        t0 = trio.current_time()
        outcome = None
        if powerdown and not guest.exited.is_set():
            try:
                await self._qmp_execute(guest, "system_powerdown")
            except (qmp_mod.QMPError, trio.TooSlowError) as exc:
                log.info("qmp system_powerdown failed machine=%s error=%s", guest.name, exc)
            else:
                with trio.move_on_after(machine.stop_timeout):
                    await self._wait_exit(guest)
                    outcome = "powerdown"
        if outcome is None and not guest.exited.is_set():
            try:
                await self._qmp_execute(guest, "quit", QUIT_TIMEOUT)
            except (qmp_mod.QMPError, trio.TooSlowError):
                pass  # QEMU closes the connection as it quits; the wait below decides
            with trio.move_on_after(QUIT_TIMEOUT):
                await self._wait_exit(guest)
                outcome = "quit"
        if outcome is None and not guest.exited.is_set():
            try:
                os.kill(guest.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            with trio.move_on_after(KILL_TIMEOUT):
                await self._wait_exit(guest)
                outcome = "kill"
            if outcome is None:
                raise BackendError(f"qemu pid {guest.pid} survived SIGKILL", "stop_failed")
        guest.stop_outcome = outcome or "exited"
        log.info("qemu stopped machine=%s how=%s code=%s seconds=%.2f", guest.name, guest.stop_outcome,
                 guest.returncode, trio.current_time() - t0)

    async def status(self, machine: MachineConfig) -> PowerState:
        guest = self._guest(machine)
        if guest is None:
            return PowerState.STOPPED
        if machine.name in self._booting:
            return PowerState.STARTING
        if guest.expected_exit:
            return PowerState.STOPPING
        state = await self._qmp_status(guest)
        if state == "running":
            return PowerState.RUNNING
        if state == "shutdown":
            return PowerState.STOPPING
        return PowerState.UNKNOWN

    async def address(self, machine: MachineConfig) -> Address:
        if machine.address is not None:
            return Address.of(machine.address)
        guest = self._guest(machine)
        if guest is not None:
            return Address("127.0.0.1", guest.port)
        if machine.options.get("port"):
            return Address("127.0.0.1", int(machine.options["port"]))
        raise BackendError(f"machine {machine.name} is not running, so it has no forwarded port",
                           "backend_unreachable")
