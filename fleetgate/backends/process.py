"""Process backend: a "machine" is a local OpenSSH sshd started on demand on the gateway host.

It is the embedded default (the demo fleet) and the cheapest real upstream for tests: a
real sshd with its own host key. It keeps its state (config, pid file, log) on disk so
that a restarted gateway adopts sshds that are still running instead of starting a
second copy.

Because such a machine runs on the gateway host, it is isolated by default
(`isolation = "namespaces"`, needs root): each machine's sshd runs in its own network
namespace (only a loopback: the gateway's ports, other machines and the host's network
are out of reach; `-R` binds there), its own mount namespace (private /tmp, /var/tmp and
/dev/shm, so agent sockets of other machines' sessions are invisible; the gateway's
state and config directories are hidden behind empty tmpfs) and its own pid namespace,
and its users log in as the machine's own unprivileged account (the machine's `user`,
created as a system account if missing). The gateway reaches the sshd with a socket
created inside the machine's network namespace (fleetgate.transport, kind "netns").

Where that cannot be set up (not root, no unshare), the backend refuses to run unless the
operator sets `isolation = "none"`: then every machine user is the gateway's own account.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import trio

from ..settings import MachineConfig
from .base import Address, Backend, BackendError, is_port, is_seconds, PathResolver, PowerState

log = logging.getLogger(__name__)

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
ISOLATION_MODES = ("namespaces", "none")
ACCOUNT_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Membership in one of these is as good as root on most hosts: never run a machine as such an account.
PRIVILEGED_GROUPS = ("root", "sudo", "wheel", "adm", "disk", "shadow", "docker", "lxd", "libvirt", "kvm")
# Never hidden behind a tmpfs even if the gateway's state or config lives there (sshd needs them).
NEVER_HIDE = {"/", "/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/var", "/run", "/proc", "/sys", "/dev",
              "/home", "/tmp", "/var/tmp", "/dev/shm", "/opt", "/srv", "/root"}
ACCOUNT_HOME_BASE = "/home"

# Runs as root inside the machine's new namespaces (unshare), then becomes its sshd.
# $1 machine dir (kept visible), $2 sshd, $3 sshd_config, $4.. directories to hide.
NAMESPACE_SETUP = r"""set -e
umask 022
mdir=$1; sshd=$2; cfg=$3; shift 3
ip link set lo up
exec 3<"$mdir"
for d in /tmp /var/tmp /dev/shm; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m fleetgate-private "$d"; fi
done
for d in "$@"; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=0755,nosuid,nodev,noexec,size=1m fleetgate-hidden "$d"; fi
done
mkdir -p "$mdir"
mount --no-canonicalize --bind /proc/self/fd/3 "$mdir"
exec 3<&-
exec "$sshd" -D -e -f "$cfg"
"""


def find_sshd() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    for cand in SSHD_CANDIDATES:
        if os.access(cand, os.X_OK):
            return cand
    return None


_problem_cache: dict[str | None, str | None] = {}


def isolation_problem(unshare: str | None = None) -> str | None:
    """Why machines cannot be isolated on this host, or None if they can (tried once per process)."""
    if unshare not in _problem_cache:
        _problem_cache[unshare] = _isolation_problem(unshare)
    return _problem_cache[unshare]


def _isolation_problem(unshare: str | None) -> str | None:
    if os.geteuid() != 0:
        return "it needs root (namespaces, mounts and one system account per machine)"
    tools = {"unshare": unshare or shutil.which("unshare"), "ip": shutil.which("ip"),
             "mount": shutil.which("mount"), "useradd": shutil.which("useradd")}
    missing = [name for name, path in tools.items() if not path or not os.access(path, os.X_OK)]
    if missing:
        return f"{', '.join(missing)} not found (Debian: apt-get install util-linux iproute2 mount passwd)"
    try:
        r = subprocess.run([tools["unshare"], "--net", "--mount", "--pid", "--fork", "--mount-proc", "--",
                            tools["ip"], "link", "set", "lo", "up"],
                           capture_output=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run unshare: {exc}"
    if r.returncode != 0:
        why = r.stderr.decode(errors="replace").strip().splitlines()
        return f"creating namespaces failed: {why[-1] if why else f'exit {r.returncode}'}"
    return None


def _key_file_problem(key: str, path: Path) -> str | None:
    """`fleetgate check` reads each key file as the kind sshd will need, so a wrong file
    (a public key where the private one belongs) is an error there, not at a machine's start."""
    import asyncssh

    try:
        if key == "host_key_file":
            asyncssh.read_private_key(str(path))
        elif key == "host_certificate_file":
            asyncssh.read_certificate(str(path))
        elif not any(line.strip() and not line.lstrip().startswith("#")
                     for line in path.read_text(errors="replace").splitlines()):
            return None  # no key at all: valid for sshd (e.g. only a CA is trusted)
        elif key == "authorized_keys_file":
            asyncssh.read_authorized_keys(str(path))
        else:  # trusted_user_ca_keys_file: public keys, one a line
            asyncssh.read_public_key_list(str(path))
    except (asyncssh.KeyImportError, ValueError, OSError) as exc:
        kind = {"host_key_file": "an OpenSSH private key", "host_certificate_file": "an OpenSSH host certificate",
                "authorized_keys_file": "an authorized_keys file"}.get(key, "OpenSSH public keys")
        return f"{path} is not {kind} ({exc})"
    return None


class IsolationUnavailable(OSError):
    """The process backend would run machines as the gateway's own account and was not told to.

    An OSError (like EPERM), so `fleetgate serve` reports it as one line and exits 1."""


def check_account(name: str | None, machine: str) -> str | None:
    """Why `name` cannot be an isolated machine's account, or None."""
    if not name:
        return (f"machine {machine} has no user: an isolated process machine needs one, its own account "
                f"(e.g. user = \"fg-{machine}\", created if missing)")
    if not ACCOUNT_RE.match(name):
        return f"user {name!r} is not a valid account name"
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None  # created at start
    if pw.pw_uid == 0 or pw.pw_uid == os.geteuid():
        return f"user {name} is root or the gateway's own account; an isolated machine needs an account of its own"
    groups = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
    try:
        groups.add(grp.getgrgid(pw.pw_gid).gr_name)
    except KeyError:
        pass
    bad = sorted(groups & set(PRIVILEGED_GROUPS))
    if bad:
        return f"user {name} is in group {', '.join(bad)} (as good as root); give the machine an account of its own"
    return None


def ensure_account(name: str) -> pwd.struct_passwd:
    """The machine's account, created as a system account (own group, own home, no password) if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    home = os.path.join(ACCOUNT_HOME_BASE, name)
    r = subprocess.run(["useradd", "--system", "--user-group", "--create-home", "--home-dir", home,
                        "--shell", "/bin/bash", "--password", "*", "--comment", "fleetgate machine", name],
                       capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    try:
        pw = pwd.getpwnam(name)   # a concurrent gateway may have created it first: fine
    except KeyError:
        raise BackendError(f"cannot create account {name}: {r.stderr.decode(errors='replace').strip()[-200:]}",
                           "start_error") from None
    if os.path.isdir(pw.pw_dir):
        os.chmod(pw.pw_dir, 0o700)
    log.info("process backend created account %s uid=%s home=%s", name, pw.pw_uid, pw.pw_dir)
    return pw


def _copy_private(src: Path, dst: Path, mode: int) -> None:
    data = src.read_bytes()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


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
    BACKEND_OPTIONS = ("sshd", "start_delay", "stop_delay", "stop_timeout", "isolation", "unshare", "hide")
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
        iso = opts.get("isolation")
        if iso is not None and iso not in ISOLATION_MODES:
            yield "isolation", f"must be one of {', '.join(ISOLATION_MODES)}, got {iso!r}"
        unshare = opts.get("unshare")
        if unshare is not None and not isinstance(unshare, str):
            yield "unshare", "must be a path to util-linux unshare"
        hide = opts.get("hide")
        if hide is not None and (not isinstance(hide, list) or not all(isinstance(h, str) for h in hide)):
            yield "hide", "must be a list of directories to hide from machines"

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
                else:
                    problem = _key_file_problem(key, p)
                    if problem:
                        yield key, problem
        for key in ("trusted_user_ca_keys_file", "host_certificate_file"):
            v = opts.get(key)
            if v is not None and (not isinstance(v, str) or resolve(v) is None or not resolve(v).is_file()):
                yield key, f"no such file {resolve(v) if isinstance(v, str) else v!r}"
            elif v is not None:
                problem = _key_file_problem(key, resolve(v))
                if problem:
                    yield key, problem
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
        self.isolation = config.options.get("isolation", "namespaces")
        self.unshare = config.options.get("unshare") or shutil.which("unshare") or "/usr/bin/unshare"
        self.hide = [str(resolve(h)) for h in config.options.get("hide", [])]
        if self.isolated:
            # Checked when the backend is built: at start-up `serve` exits with this one line,
            # and a reload that would need it is rejected whole (the old config stays).
            problem = isolation_problem(config.options.get("unshare"))
            if problem is not None:
                raise IsolationUnavailable(
                    f"process backend '{self.name}' cannot isolate its machines: {problem}. Refusing to run "
                    f"them as the gateway's own account (every machine user could read the gateway's keys and "
                    f"reach its ports). Run fleetgate as root, or set isolation = \"none\" under "
                    f"[backends.{self.name}] to accept exactly that (docs/security.md).")

    @property
    def isolated(self) -> bool:
        return self.isolation != "none"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """At start-up (and for a backend a reload adds): say which mode the machines run in."""
        if self.isolated:
            log.info("process backend %s: machines isolated (own network, mount and pid namespaces, "
                     "own account)", self.name)
        else:
            log.warning("WARNING: process backend %s runs with isolation = \"none\": every machine runs as the "
                        "gateway's own account on the gateway's network; any user of any machine can read the "
                        "gateway's keys, use its admin socket, reach its ports and the other machines. "
                        "Use only for a demo or a single trusted user.", self.name)
        task_status.started()

    def _hidden_dirs(self) -> list[str]:
        """The gateway's directories to cover with an empty tmpfs inside a machine."""
        out = []
        base = self.resolve(".")
        for d in (str(self.state_dir), str(base) if base is not None else None, *self.hide):
            if not d:
                continue
            d = os.path.realpath(d)
            if d not in NEVER_HIDE and d not in out and os.path.isdir(d):
                out.append(d)
        return out

    def _dir(self, machine: MachineConfig) -> Path:
        return self.state_dir / "process" / machine.name

    def _write_config(self, machine: MachineConfig, account: str | None = None) -> Path:
        """sshd_config for this machine; isolated (account given): with private copies of its files."""
        d = self._dir(machine)
        d.mkdir(parents=True, exist_ok=True)
        o = machine.options
        host_key = self.resolve(o["host_key_file"])
        authorized_keys = self.resolve(o["authorized_keys_file"])
        ca_keys = self.resolve(o["trusted_user_ca_keys_file"]) if o.get("trusted_user_ca_keys_file") else None
        host_cert = self.resolve(o["host_certificate_file"]) if o.get("host_certificate_file") else None
        if account is not None:
            # Inside the machine only this directory of the gateway's stays visible (the rest of
            # the state and config directories is hidden), so sshd gets its own copies here. sshd
            # reads authorized_keys as the account (public keys: world-readable); the host key
            # stays root's.
            os.chmod(d, 0o755)
            _copy_private(host_key, d / "ssh_host_key", 0o600)
            host_key = d / "ssh_host_key"
            _copy_private(authorized_keys, d / "authorized_keys", 0o644)
            authorized_keys = d / "authorized_keys"
            if ca_keys is not None:
                _copy_private(ca_keys, d / "trusted_user_ca_keys", 0o644)
                ca_keys = d / "trusted_user_ca_keys"
            if host_cert is not None:
                _copy_private(host_cert, d / "ssh_host_key-cert.pub", 0o644)
                host_cert = d / "ssh_host_key-cert.pub"
        accept_env = " ".join(o.get("accept_env", ["LANG", "LC_*", "FLEETGATE_*"]))
        if account is None:
            who = f"PidFile {d / 'sshd.pid'}\nStrictModes no\nPermitRootLogin prohibit-password\n"
        else:
            # The pid file is the gateway's to write (sshd is pid 1 in the machine's pid namespace).
            who = f"PidFile none\nStrictModes no\nPermitRootLogin no\nAllowUsers {account}\n"
        text = f"""# written by fleetgate's process backend for machine {machine.name}
ListenAddress 127.0.0.1:{o['port']}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
{who}UsePAM no
PubkeyAuthentication yes
PasswordAuthentication {"yes" if o.get("password_authentication") else "no"}
KbdInteractiveAuthentication no
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
        if ca_keys is not None:
            text += f"TrustedUserCAKeys {ca_keys}\n"
        if host_cert is not None:
            text += f"HostCertificate {host_cert}\n"
        cfg = d / "sshd_config"
        cfg.write_text(text)
        return cfg

    def _live_pid(self, machine: MachineConfig) -> int | None:
        """The pid of this machine's sshd if one runs (ours or left by an earlier gateway)."""
        pidfile = self._dir(machine) / "sshd.pid"
        # Only "no such file / process" means no sshd: any other read error (EMFILE when the
        # gateway is out of descriptors, EACCES, EIO) raises, so status() fails and the machine
        # keeps its state; it must never read as "stopped outside fleetgate" (issue 25).
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return None
        if str(self._dir(machine) / "sshd_config").encode() not in cmdline:
            return None  # the pid was reused by another process
        if stat.rpartition(")")[2].split()[0] == "Z":
            return None
        return pid

    async def start(self, machine: MachineConfig) -> None:
        if self._live_pid(machine) is not None:
            return
        account = None
        if self.isolated:
            account = machine.user
            problem = check_account(account, machine.name)
            if problem is not None:
                raise BackendError(problem, "start_error")
            await trio.to_thread.run_sync(ensure_account, account)
        cfg = self._write_config(machine, account)
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
        d = self._dir(machine)
        argv = [self.sshd, "-D", "-e", "-f", str(cfg)]
        if account is not None:
            # New network (only lo), mount (private /tmp, gateway dirs hidden) and pid namespaces;
            # --kill-child: if unshare dies, so does the machine. sshd then drops to `account`
            # for every session as usual.
            argv = [self.unshare, "--net", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
                    "/bin/sh", "-c", NAMESPACE_SETUP, f"fleetgate-machine-{machine.name}", str(d), self.sshd,
                    str(cfg), *self._hidden_dirs()]
        fd = os.open(d / "sshd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]}: {exc.strerror}", "start_error") from exc
        finally:
            os.close(fd)
        if account is not None:
            (d / "sshd.pid").write_text(f"{proc.pid}\n")
        self._procs[machine.name] = proc
        log.info("process backend started sshd machine=%s pid=%s port=%s isolation=%s%s", machine.name, proc.pid,
                 machine.options["port"], self.isolation, f" account={account}" if account else "")

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
        while True:  # adopted (started by an earlier gateway or another replica): not our child, so poll
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return
            if stat.rpartition(")")[2].split()[0] == "Z":
                return  # exited; its parent (another process) has not reaped it yet
            await trio.sleep(0.05)

    async def status(self, machine: MachineConfig) -> PowerState:
        proc = self._procs.get(machine.name)
        if proc is not None:
            if proc.poll() is None:
                return PowerState.RUNNING
            self._procs.pop(machine.name, None)
            return PowerState.STOPPED
        return PowerState.RUNNING if self._live_pid(machine) is not None else PowerState.STOPPED

    def can_status_all(self) -> bool:
        return True

    async def status_all(self, machines: Sequence[MachineConfig]) -> Mapping[str, PowerState]:
        """Every machine in one pass (issue 15): its own children by poll(), the others by their
        pid file, and a machine without one (nearly all of a large idle fleet) with one stat()."""
        base = os.path.join(self.state_dir, "process")
        out = {}
        for machine in machines:
            if machine.name not in self._procs and not os.path.exists(
                    os.path.join(base, machine.name, "sshd.pid")):
                out[machine.name] = PowerState.STOPPED
            else:
                out[machine.name] = await self.status(machine)
        return out

    async def address(self, machine: MachineConfig) -> Address:
        if machine.address is not None:
            return Address.of(machine.address)
        port = int(machine.options["port"])
        if not self.isolated:
            return Address("127.0.0.1", port)
        proc = self._procs.get(machine.name)
        pid = proc.pid if proc is not None and proc.poll() is None else self._live_pid(machine)
        if pid is None:
            raise BackendError(f"machine {machine.name} is not running", "backend_error")
        # Its own loopback, reached through its network namespace (fleetgate.transport).
        return Address.in_netns(f"/proc/{pid}/ns/net", "127.0.0.1", port)
