"""Helpers for tests/test_conformance.py: one gateway for the module, two endpoints, a results table.

The conformance suite runs every client twice, once through fleetgate and once straight
against the machine's own sshd, and compares what the client saw. Here:

- `GatewayUnderTest`: `fleetgate demo` as a real subprocess (machines are real sshds on
  loopback; it stops them when it exits), shared by the whole module;
- `Endpoint`: where a client connects (host, port, user, key, the host key it trusts) and
  the argv/options each client needs for it;
- `Outcome` and `Results`: what each side observed, and docs/compatibility.md built from it;
- small real-network helpers (an upper-casing TCP echo server, a SOCKS5 CONNECT, port waits).

Every wait is bounded: subprocess timeouts or deadlines around select/poll.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from helpers import REPO, Result, free_port
GATEWAY = "gateway"
DIRECT = "direct"


def run(argv: Sequence[str], *, timeout: float = 60, stdin: bytes = b"", env: dict[str, str] | None = None,
        cwd: str | Path | None = None) -> Result:
    """Run a real client to completion (bounded by timeout)."""
    p = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> str:
    """One digest over every file's relative path and content under root."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- the gateway


class GatewayUnderTest:
    """`python -m fleetgate demo` in its own process: the gateway as users run it."""

    def __init__(self, root: Path):
        self.root = root
        self.state_dir = root / "demo"
        self.port = free_port()
        self.log = root / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "GatewayUnderTest":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "fleetgate", "demo", "--port", str(self.port), "--metrics-port", "0",
                "--state-dir", str(self.state_dir), "--idle-timeout", "3600",
                # The "direct" leg connects to the machines' sshds from the host: not isolated.
                "--isolation", "none"]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                         cwd=REPO)
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"Ctrl-C stops" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"fleetgate demo did not start in {timeout} s:\n{self.log.read_text()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"fleetgate demo exited early:\n{self.log.read_text()}")
                buf += chunk
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # the demo stops its machines on the way out
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def machine_port(self, name: str) -> int:
        for line in (self.state_dir / "machine_ports").read_text().split():
            key, _, value = line.partition("=")
            if key == name:
                return int(value)
        raise KeyError(name)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


# --------------------------------------------------------------------------- endpoints


@dataclass
class Endpoint:
    """One side of the comparison: through the gateway, or straight to the machine's sshd."""

    label: str  # GATEWAY or DIRECT
    port: int
    user: str
    key: Path  # OpenSSH private key (its .pub next to it)
    host_key_pub: Path  # the host key this endpoint must present
    workdir: Path  # per-endpoint client files (known_hosts, converted keys, HOME for dbclient)
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        kt, kb = self.host_key_pub.read_text().split()[:2]
        self.host_key_type, self.host_key_b64 = kt, kb
        self.known_hosts = self.workdir / "known_hosts"
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {kt} {kb}\n")

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def host_key_sha256(self) -> str:
        """The host key's SHA256 fingerprint, base64 without padding (what curl --hostpubsha256 wants)."""
        digest = hashlib.sha256(base64.b64decode(self.host_key_b64)).digest()
        return base64.b64encode(digest).decode().rstrip("=")

    def ssh_opts(self, *, port_flag: str = "-p") -> list[str]:
        return [
            "-F", "/dev/null",
            port_flag, str(self.port),
            "-i", str(self.key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=30",
        ]

    def ssh(self, *command: str, extra: Sequence[str] = ()) -> list[str]:
        return ["ssh", *self.ssh_opts(), *extra, self.dest, *command]

    def scp_opts(self) -> list[str]:
        return self.ssh_opts(port_flag="-P")

    def ssh_command_line(self, extra: Sequence[str] = ()) -> str:
        """`ssh ...` as one string, for rsync -e and GIT_SSH_COMMAND (no port: they give it)."""
        opts = self.ssh_opts()
        i = opts.index("-p")
        del opts[i:i + 2]
        return " ".join(["ssh", *opts, *extra])

    # Dropbear's dbclient reads ~/.ssh/known_hosts by bare host name (no [host]:port), and
    # wants keys in its own format: each endpoint gets its own HOME.
    def dropbear_home(self) -> Path:
        home = self.workdir / "dbhome"
        if not home.exists():
            (home / ".ssh").mkdir(parents=True)
            (home / ".ssh" / "known_hosts").write_text(f"{self.host} {self.host_key_type} {self.host_key_b64}\n")
            subprocess.run(["dropbearconvert", "openssh", "dropbear", str(self.key), str(home / "id_dropbear")],
                           check=True, capture_output=True, timeout=30)
        return home

    def dbclient(self, *command: str, extra: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
        home = self.dropbear_home()
        argv = ["dbclient", "-i", str(home / "id_dropbear"), "-p", str(self.port), *extra, self.dest, *command]
        return argv, {"HOME": str(home)}


# --------------------------------------------------------------------------- outcomes and the table


@dataclass
class Outcome:
    """What one side observed. Only `value` is compared; `text` is its table cell, `detail` helps debug."""

    value: Any
    text: str = field(default="", compare=False)
    detail: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.text:
            self.text = str(self.value)

    @classmethod
    def error(cls, exc: BaseException) -> "Outcome":
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return cls(("error", type(exc).__name__), f"error ({msg})", msg)


def first_line(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Warning: Permanently added"):
            return line[:160]
    return ""


def exit_text(rc: int, err: str = "") -> str:
    line = first_line(err) if rc != 0 else ""
    return f"exit {rc}" + (f" ({line})" if line else "")


@dataclass
class Row:
    client: str
    feature: str
    gateway: Outcome
    direct: Outcome

    @property
    def same(self) -> bool:
        return self.gateway == self.direct


class Results:
    """Every (client, feature) compared in this run, written as docs/compatibility.md at the end."""

    COMMAND = ".venv/bin/python -m pytest tests/test_conformance.py"

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.started = time.monotonic()
        self.tests_run: list[str] = []
        self.tests_all: list[str] = []

    def compare(self, client: str, feature: str, observe: Callable[[Endpoint], Outcome],
                gateway: Endpoint, direct: Endpoint) -> Row:
        """Observe the same action on both sides (direct first), record it, return the row."""
        outcomes = {}
        for ep in (direct, gateway):
            try:
                outcomes[ep.label] = observe(ep)
            except Exception as exc:  # a client that hangs or crashes is an outcome too
                outcomes[ep.label] = Outcome.error(exc)
        row = Row(client, feature, outcomes[GATEWAY], outcomes[DIRECT])
        self.rows.append(row)
        return row

    def markdown(self, versions: dict[str, str]) -> str:
        same = sum(r.same for r in self.rows)
        lines = [
            "# Client compatibility",
            "",
            f"<!-- Generated by `{self.COMMAND}` (tests/test_conformance.py); do not edit by hand. -->",
            "",
            f"Generated by `{self.COMMAND}` on {datetime.date.today().isoformat()}. Each row runs one real",
            "client action twice: through fleetgate (`fleetgate demo`, default algorithm settings) and",
            "straight against the machine's own sshd (process backend, a stock OpenSSH sshd on loopback),",
            "and compares what the client saw (exit status, output, files). A row is ✅ when both sides",
            "gave the same outcome and ❌ when they did not (a bug or a missing feature in fleetgate).",
            "Algorithm rows come from `sshd -T` on the machine that ran the suite.",
            "",
            f"**{same} of {len(self.rows)} cases behave the same through fleetgate as direct.**",
            "",
            "| client | feature | through fleetgate | direct to sshd | same |",
            "| --- | --- | --- | --- | :---: |",
        ]

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        for r in self.rows:
            lines.append(f"| {cell(r.client)} | {cell(r.feature)} | {cell(r.gateway.text)} | "
                         f"{cell(r.direct.text)} | {'✅' if r.same else '❌'} |")
        missing = [t for t in self.tests_all if t not in self.tests_run]
        if missing:
            lines += ["", "Not run in this run (the table above is partial): " + ", ".join(f"`{t}`" for t in missing)
                      + "."]
        lines += ["", "Versions:", ""]
        lines += [f"- {name}: {v}" for name, v in versions.items()]
        lines.append("")
        return "\n".join(lines)


def tool_versions() -> dict[str, str]:
    def out(argv: Sequence[str], pattern: str = r"(.+)") -> str:
        try:
            p = subprocess.run(list(argv), capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
        text = (p.stdout + p.stderr).decode(errors="replace")
        m = re.search(pattern, text)
        found = m.group(1) if m else text.strip().splitlines()[0] if text.strip() else "?"
        return " ".join(found.split())

    def py(mod: str) -> str:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version(mod)
        except PackageNotFoundError:
            return "not installed"

    return {
        "OpenSSH (client and machine sshd)": out(["ssh", "-V"]),
        "Dropbear dbclient": out(["dbclient", "-V"], r"(Dropbear[^\n]*)"),
        "curl": out(["curl", "-V"], r"(curl [^\n]*)"),
        "rsync": out(["rsync", "--version"], r"(rsync\s+version \S+)"),
        "git": out(["git", "--version"]),
        "Paramiko": py("paramiko"),
        "asyncssh": py("asyncssh"),
        "ansible-core": py("ansible-core"),
    }


def sshd_algorithms(workdir: Path) -> dict[str, list[str]]:
    """Ciphers, MACs and key exchanges a default sshd on this machine offers (`sshd -T`).

    With a host key of its own in workdir: `sshd -T` prints nothing on a machine whose
    /etc/ssh has no host keys yet (a fresh install), which made the list empty there."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if os.geteuid() == 0:  # sshd, -T too, wants its privilege separation directory (made by its service)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    key = workdir / "host_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=20)
    p = subprocess.run([sshd, "-T", "-f", "/dev/null", "-h", str(key)], capture_output=True, timeout=20, text=True)
    assert p.returncode == 0, f"`sshd -T` failed: {p.stderr.strip()}"
    found = {}
    for line in p.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("ciphers", "macs", "kexalgorithms"):
            found[key] = value.split(",")
    return found


def machine_user() -> str:
    return getpass.getuser()


# --------------------------------------------------------------------------- network helpers


class UpperEchoServer:
    """A TCP server on loopback that answers every connection with its input upper-cased."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    @staticmethod
    def _handle(conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data.upper())
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self.thread.join(timeout=5)


def wait_port(port: int, timeout: float = 20, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port (an ssh client opens its listener after auth)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"ssh exited with {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")
            time.sleep(0.05)  # polling a port: the listener has no event to await


def roundtrip(sock: socket.socket, payload: bytes, timeout: float = 20) -> bytes:
    sock.settimeout(timeout)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return out
        out += chunk


def tcp_roundtrip(port: int, payload: bytes, timeout: float = 20) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return roundtrip(s, payload, timeout)


def socks5_roundtrip(proxy_port: int, dest_host: str, dest_port: int, payload: bytes, timeout: float = 20) -> bytes:
    """A SOCKS5 CONNECT (no auth) through `ssh -D`, then a round trip to the destination."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"\x05\x01\x00")
        if _recv_exact(s, 2) != b"\x05\x00":
            raise RuntimeError("SOCKS5 method negotiation refused")
        host = dest_host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(host)]) + host + dest_port.to_bytes(2, "big"))
        reply = _recv_exact(s, 4)
        if reply[1] != 0:
            raise RuntimeError(f"SOCKS5 CONNECT refused (reply code {reply[1]})")
        atyp = reply[3]
        rest = {1: 4, 4: 16}.get(atyp)
        if rest is None:
            rest = _recv_exact(s, 1)[0]
        _recv_exact(s, rest + 2)
        return roundtrip(s, payload, timeout)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise RuntimeError("connection closed during SOCKS5 handshake")
        out += chunk
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


# --------------------------------------------------------------------------- a terminal for ssh -tt


class Terminal:
    """A pseudo-terminal an ssh client runs in, so that it sends pty-req and window-change."""

    def __init__(self, argv: Sequence[str], rows: int, cols: int, env: dict[str, str] | None = None):
        import pty

        self.master, slave = pty.openpty()
        self.set_size(rows, cols, fd=slave)
        self.proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        os.close(slave)
        self.buf = b""

    def set_size(self, rows: int, cols: int, fd: int | None = None) -> None:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, rows: int, cols: int) -> None:
        self.set_size(rows, cols)
        self.proc.send_signal(signal.SIGWINCH)  # ssh's terminal is not its controlling tty: tell it

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def read_until(self, pattern: bytes | re.Pattern, timeout: float = 20, start: int = 0) -> re.Match:
        """Wait until pattern appears in the output after offset `start`."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, start)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {rx.pattern!r} on the terminal in {timeout} s; saw {self.buf[-300:]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the client closed the terminal
                    chunk = b""
                if not chunk:
                    m = rx.search(self.buf, start)
                    if m:
                        return m
                    raise EOFError(f"terminal closed before {rx.pattern!r}; saw {self.buf[-300:]!r}")
                self.buf += chunk

    def wait(self, timeout: float = 20) -> int:
        """Wait for the client to exit (draining the terminal so it never blocks on output)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ssh did not exit in {timeout} s; saw {self.buf[-300:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)
