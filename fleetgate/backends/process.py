"""Process backend: a "machine" is a local OpenSSH sshd started on demand on the gateway host.

It is the embedded default (the demo fleet) and the cheapest real upstream for tests: a
real sshd with its own host key. It keeps its state (config, pid file, log) on disk so
that a restarted gateway adopts sshds that are still running instead of starting a
second copy.

Because such a machine runs on the gateway host, it is isolated by default
(`isolation = "namespaces"`, needs root): each machine's sshd runs in its own network
namespace (only a loopback: the gateway's ports, other machines and the host's network
are out of reach; `-R` binds there), its own mount namespace (private /tmp, /var/tmp,
/dev/shm and /run with its own /run/lock, so agent sockets of other machines' sessions are
invisible; the gateway's state and config directories are hidden behind empty tmpfs), its
own IPC namespace and its own pid namespace,
and its users log in as the machine's own unprivileged account (the machine's `user`,
created as a system account if missing). The gateway reaches the sshd with a socket
created inside the machine's network namespace (fleetgate.transport, kind "netns").

Nothing a machine can write is trusted (issue 25): the pid file lives outside the one
directory of the gateway's a machine sees, is written before anything starts (so a full
disk refuses a start instead of losing a running sshd), and names a process only if that
process is still the one recorded and the gateway's own (_is_ours); otherwise machines are
found in /proc. Every file and directory gets its mode explicitly, whatever the umask.

Where that cannot be set up (not root, no unshare), the backend refuses to run unless the
operator sets `isolation = "none"`: then every machine user is the gateway's own account.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import trio

from ..private import makedirs as private_makedirs
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
PID_DIR = ".pids"          # state_dir/process/.pids/NAME: "PID STARTTIME", root's, 0600
PID_RECORD_SIZE = 64

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
# A private /run: its own /run/lock (world-writable, so a meeting place if shared), and
# none of the host's sockets there (D-Bus, container runtimes). sshd needs /run/sshd.
if [ -d /run ]; then
  mount -t tmpfs -o mode=0755,nosuid,nodev,size=16m fleetgate-run /run
  mkdir -m 0755 /run/sshd
  mkdir -m 1777 /run/lock
fi
# Its own IPC namespace (unshare --ipc): POSIX message queues seen through its own mqueue fs.
if [ -d /dev/mqueue ]; then mount -t mqueue -o nosuid,nodev,noexec fleetgate-mqueue /dev/mqueue || true; fi
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


def _write_file(dst: Path, data: bytes, mode: int) -> None:
    """dst holds exactly `data` with exactly `mode`, whatever the umask, or an OSError says why.

    Unchanged content is not rewritten (a machine whose files are in place starts on a full
    disk); otherwise a temporary file is written whole and renamed over dst, so a full disk
    leaves the old file or none, never half a file."""
    try:
        st = os.lstat(dst)
        if stat.S_ISREG(st.st_mode) and st.st_size == len(data) and dst.read_bytes() == data:
            if stat.S_IMODE(st.st_mode) != mode or st.st_uid != os.geteuid():
                os.chown(dst, os.geteuid(), os.getegid())
                os.chmod(dst, mode)
            return
    except FileNotFoundError:
        pass
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask masked os.open's mode; an old file kept its own
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, dst)


def _copy_private(src: Path, dst: Path, mode: int) -> None:
    _write_file(dst, src.read_bytes(), mode)


def _private_dir(path: Path, mode: int) -> None:
    """mkdir with exactly `mode` (not the umask's), also for a directory that exists."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if stat.S_IMODE(st.st_mode) != mode or st.st_uid != os.geteuid():
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, mode)


# Errors that say a process is gone or not ours to look at. Any other (EMFILE when the gateway
# is out of descriptors, ENOMEM, EIO) raises: status() then fails and the machine keeps its
# state; a machine with live sessions must never read as "stopped outside fleetgate" (issue 25).
_GONE = (errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM)


def _gone(exc: OSError) -> bool:
    if exc.errno in _GONE:
        return True
    raise exc


def proc_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None if gone
    or a zombie: with the pid, it names one process, not whichever later reuses the number."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError as exc:
        _gone(exc)
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _cmdline(pid: int | str) -> list[bytes] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as exc:
        _gone(exc)
        return None
    return raw.split(b"\0")[:-1] if raw.endswith(b"\0") else raw.split(b"\0")


_OWN_PIDNS: str | None = None


def _own_pidns() -> str:
    global _OWN_PIDNS
    if _OWN_PIDNS is None:
        _OWN_PIDNS = os.readlink("/proc/self/ns/pid")
    return _OWN_PIDNS


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

    @classmethod
    def check_machine(cls, machine: MachineConfig, backend_options: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        # An isolated machine's account: root, the gateway's account or a privileged group's
        # member is refused here, not first at a login. (No user at all is still refused at start.)
        if backend_options.get("isolation", "namespaces") != "none" and machine.user is not None:
            problem = check_account(machine.user, machine.name)
            if problem is not None:
                yield "user", (f"{problem} (an isolated process machine runs its users' sessions as this account; "
                               f"e.g. user = \"fg-{machine.name}\", created if missing)")

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
            log.info("process backend %s: machines isolated (own network, mount, IPC and pid namespaces, "
                     "own /tmp and /run, own account)", self.name)
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

    def _pidfile(self, machine: MachineConfig) -> Path:
        """Where the gateway records a machine's pid: outside the machine's directory (the one
        directory of the gateway's a machine sees), so nothing inside a machine can touch it.
        Machine names never start with ".", so no machine's directory is called ".pids"."""
        return self.state_dir / "process" / PID_DIR / machine.name

    def _make_dirs(self) -> None:
        """state_dir/process and its .pids: 0700 (root's), whatever the umask or an older mode."""
        private_makedirs(self.state_dir)
        _private_dir(self.state_dir / "process", 0o700)
        _private_dir(self.state_dir / "process" / PID_DIR, 0o700)

    def _write_config(self, machine: MachineConfig, account: str | None = None) -> Path:
        """sshd_config for this machine; isolated (account given): with private copies of its files.

        Every mode is set explicitly (the umask may be 000): the directory 0711 (the machine's
        account must reach authorized_keys through it) or 0700, root's files 0600, and what
        the account reads 0644."""
        d = self._dir(machine)
        self._make_dirs()
        _private_dir(d, 0o711 if account is not None else 0o700)
        # Where an older fleetgate kept the pid file, inside the machine's view: never trusted.
        (d / "sshd.pid").unlink(missing_ok=True)
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
        # The pid file is the gateway's to write, before anything starts (sshd's own would be
        # written after the start, and in an isolated machine it is pid 1 of its pid namespace).
        if account is None:
            who = "PidFile none\nStrictModes no\nPermitRootLogin prohibit-password\n"
        else:
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
        _write_file(cfg, text.encode(), 0o600)
        return cfg

    def _argv_head(self, machine: MachineConfig) -> list[bytes]:
        """How this machine's top process was started: what a process must show to be it."""
        cfg = str(self._dir(machine) / "sshd_config")
        if self.isolated:
            return [os.fsencode(self.unshare), f"fleetgate-machine-{machine.name}".encode(), os.fsencode(cfg)]
        return [os.fsencode(self.sshd), os.fsencode(cfg)]

    def _is_ours(self, pid: int, machine: MachineConfig, argv: list[bytes] | None = None) -> bool:
        """Whether pid is this machine's sshd as the gateway started it: the gateway's own account,
        in the gateway's pid namespace (every process inside an isolated machine is in the machine's
        own, whatever its uid or argv), with the argv the gateway gave it."""
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
                return False
            if os.readlink(f"/proc/{pid}/ns/pid") != _own_pidns():
                return False
        except OSError as exc:
            _gone(exc)
            return False
        argv = _cmdline(pid) if argv is None else argv
        if not argv:
            return False
        head = self._argv_head(machine)
        return argv[0] == head[0] and all(part in argv for part in head[1:]) and proc_start_time(pid) is not None

    def _read_pidfile(self, machine: MachineConfig) -> tuple[int, int] | None:
        """(pid, start time) as the gateway recorded them, None if absent or not a record."""
        try:
            text = self._pidfile(machine).read_text()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            log.warning("process backend: pid file is not a record machine=%s path=%s error=%s", machine.name,
                        self._pidfile(machine), exc)
            return None
        parts = text.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            return None   # reserved for a start that has not recorded its pid (yet)
        return int(parts[0]), int(parts[1])

    def _scan(self, machines: Sequence[MachineConfig]) -> dict[str, list[int]]:
        """This backend's machines that run, found in /proc (not by any file): for a pid file lost
        to a full disk or a crash, or left by an older fleetgate where the machine could write it.
        One read of each process's command line; a candidate is matched to its machine by its
        sshd_config path and then verified (_is_ours)."""
        by_cfg = {os.fsencode(str(self._dir(m) / "sshd_config")): m for m in machines}
        heads = {self._argv_head(m)[0] for m in machines}
        found: dict[str, list[int]] = {}
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                argv = _cmdline(entry.name)
                if not argv or argv[0] not in heads:
                    continue
                m = next((by_cfg[a] for a in argv if a in by_cfg), None)
                if m is not None and self._is_ours(int(entry.name), m, argv):
                    found.setdefault(m.name, []).append(int(entry.name))
        return found

    def _live_pid(self, machine: MachineConfig) -> int | None:
        """The pid of this machine's sshd if one runs (ours or left by an earlier gateway).

        Trusted only once verified: the pid file's start time must match the process's, and the
        process must be the one the gateway started (_is_ours). Without a good record, /proc is
        searched, and the record rewritten."""
        record = self._read_pidfile(machine)
        if record is not None:
            pid, started = record
            if proc_start_time(pid) == started and self._is_ours(pid, machine):
                return pid
        pid = min(self._scan([machine]).get(machine.name, []), default=None)
        if pid is not None:
            log.warning("process backend: found machine=%s pid=%s by its process, not its pid file; "
                        "recording it", machine.name, pid)
            try:
                self._make_dirs()
                self._record_pid(machine, pid)
            except OSError as exc:
                self._state_write_failed(machine, "pid_file", self._pidfile(machine), exc)
        elif record is not None:
            self._pidfile(machine).unlink(missing_ok=True)   # stale: that process is gone
        return pid

    def _record_pid(self, machine: MachineConfig, pid: int, fd: int | None = None) -> None:
        """Write "PID STARTTIME" over the pid file's reserved bytes (in place: no new disk space)."""
        started = proc_start_time(pid)
        line = f"{pid} {started if started is not None else 0}".ljust(PID_RECORD_SIZE - 1).encode() + b"\n"
        own = fd is None
        if own:
            fd = os.open(self._pidfile(machine), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if os.pwrite(fd, line, 0) != len(line):
                raise OSError(errno.ENOSPC, "short write")
        finally:
            if own:
                os.close(fd)

    def _reserve_pidfile(self, machine: MachineConfig) -> int:
        """Before anything starts: the pid file, 0600, with room for its record written now; the
        open descriptor is where _record_pid writes once the pid is known. A full disk fails here,
        where nothing runs yet, not after sshd started."""
        fd = os.open(self._pidfile(machine), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            placeholder = b"starting".ljust(PID_RECORD_SIZE - 1) + b"\n"
            if os.pwrite(fd, placeholder, 0) != len(placeholder):
                raise OSError(errno.ENOSPC, "short write")
            os.ftruncate(fd, PID_RECORD_SIZE)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _state_write_failed(self, machine: MachineConfig, kind: str, path: Path, exc: OSError) -> BackendError:
        """Counted (fleetgate_state_write_errors_total{kind}), logged with its context, and the
        error the user sees: in words, the path and errno only for operators (error id)."""
        self.on_state_write_error(kind)
        log.error("process backend: state write failed machine=%s backend=%s kind=%s path=%s error=%s "
                  "(counted in fleetgate_state_write_errors_total)", machine.name, self.name, kind, path, exc)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "its disk is full" if full else "it cannot write there"
        return BackendError(f"the gateway cannot write this machine's files ({why}); nothing was started",
                            "start_error", detail=f"{kind} {path}: {exc}")

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
        # Every file before anything starts: on a full disk the start fails here, with nothing
        # running that the gateway would not know of.
        try:
            cfg = self._write_config(machine, account)
        except OSError as exc:
            raise self._state_write_failed(machine, "machine_files", Path(exc.filename or self._dir(machine)),
                                           exc) from None
        try:
            pidfd = self._reserve_pidfile(machine)
        except OSError as exc:
            try:
                self._pidfile(machine).unlink(missing_ok=True)   # no empty record left behind
            except OSError:
                pass
            raise self._state_write_failed(machine, "pid_file", self._pidfile(machine), exc) from None
        try:
            await self._spawn(machine, account, cfg, pidfd)
        except BaseException:
            if machine.name not in self._procs:
                self._pidfile(machine).unlink(missing_ok=True)   # nothing runs: no reservation left behind
            raise
        finally:
            os.close(pidfd)

    async def _spawn(self, machine: MachineConfig, account: str | None, cfg: Path, pidfd: int) -> None:
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
            # New network (only lo), mount (private /tmp, /run, gateway dirs hidden), IPC and pid
            # namespaces; --kill-child: if unshare dies, so does the machine. sshd then drops to
            # `account` for every session as usual.
            argv = [self.unshare, "--net", "--mount", "--ipc", "--pid", "--fork", "--mount-proc", "--kill-child",
                    "--", "/bin/sh", "-c", NAMESPACE_SETUP, f"fleetgate-machine-{machine.name}", str(d), self.sshd,
                    str(cfg), *self._hidden_dirs()]
        fd = os.open(d / "sshd.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot run {argv[0]}: {exc.strerror}", "start_error") from exc
        finally:
            os.close(fd)
        self._procs[machine.name] = proc   # tracked from its first instant, whatever fails next
        try:
            self._record_pid(machine, proc.pid, pidfd)
        except OSError as exc:
            # Written over reserved bytes, so this should not happen; if it does, a machine the
            # next gateway could only find in /proc is not left running.
            await self.stop(machine)
            raise self._state_write_failed(machine, "pid_file", self._pidfile(machine), exc) from None
        log.info("process backend started sshd machine=%s pid=%s port=%s isolation=%s%s", machine.name, proc.pid,
                 machine.options["port"], self.isolation, f" account={account}" if account else "")

    async def stop(self, machine: MachineConfig) -> None:
        if self.stop_delay:
            await trio.sleep(self.stop_delay)
        proc = self._procs.pop(machine.name, None)
        pids = {self._live_pid(machine), *self._scan([machine]).get(machine.name, [])}
        if proc is not None:
            pids.add(proc.pid)
        pids.discard(None)
        for pid in sorted(pids):   # each one verified as this machine's (_is_ours), or our own child
            await self._stop_pid(pid, proc if proc is not None and proc.pid == pid else None)
        self._pidfile(machine).unlink(missing_ok=True)

    async def _stop_pid(self, pid: int, proc: trio.Process | None) -> None:
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

    @staticmethod
    async def _wait_gone(pid: int, proc: trio.Process | None) -> None:
        if proc is not None:
            await proc.wait()
            return
        while True:  # adopted (started by an earlier gateway or another replica): not our child, so poll
            if proc_start_time(pid) is None:
                return  # gone, or exited and its parent (another process) has not reaped it yet
            await trio.sleep(0.05)

    async def status(self, machine: MachineConfig) -> PowerState:
        proc = self._procs.get(machine.name)
        if proc is not None:
            if proc.poll() is None:
                return PowerState.RUNNING
            self._procs.pop(machine.name, None)
        return PowerState.RUNNING if self._live_pid(machine) is not None else PowerState.STOPPED

    def can_status_all(self) -> bool:
        return True

    async def status_all(self, machines: Sequence[MachineConfig]) -> Mapping[str, PowerState]:
        """Every machine in one pass (issue 15): its own children by poll(), the others by their
        verified pid file, and the rest (nearly all of a large idle fleet) by one walk of /proc,
        so that a machine whose pid file was lost (full disk, crash) is still seen running."""
        out = {}
        rest = []
        for machine in machines:
            proc = self._procs.get(machine.name)
            if proc is not None and proc.poll() is None:
                out[machine.name] = PowerState.RUNNING
            elif self._pidfile(machine).exists() or proc is not None:
                out[machine.name] = await self.status(machine)
            else:
                rest.append(machine)
        found = self._scan(rest) if rest else {}
        for machine in rest:
            out[machine.name] = PowerState.STOPPED if machine.name not in found else await self.status(machine)
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
