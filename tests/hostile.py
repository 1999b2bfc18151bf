"""Shared helpers for the hostile pre-authentication tests (scan, half-open, fuzz, timing).

Why a gateway subprocess: a scanner on the internet does not share the gateway's CPU
thread, and a crash, a leak or a hang must show up as a dead process, a growing RSS or
a login that does not come back. `GatewayProcess` runs the same demo fleet as
`helpers.make_fleet` (optionally patched) as its own process, and this file is also its
entry point (`python tests/hostile.py serve DIR PATCH_JSON`).

Scanner traffic comes from loopback addresses other than 127.0.0.1 (Linux routes all of
127/8 to lo), so the per-source limits and penalties it earns never touch the
legitimate user at 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import REPO, Fleet, free_port, make_fleet, run, fetch_metrics, sample, spawn_until  # noqa: E402

CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n"
MSG_KEXINIT = 20
MSG_KEX_ECDH_INIT = 30


# -- where scanner traffic comes from ------------------------------------------------------

def source_addresses(count: int, second_octet: int = 1) -> list[str]:
    """`count` distinct loopback addresses 127.N.x.y, none of them 127.0.0.1."""
    return [f"127.{second_octet}.{i // 250}.{i % 250 + 1}" for i in range(count)]


def cpu_split() -> tuple[str, str] | None:
    """Two disjoint CPU lists for taskset: (gateway side, scanner side); None with one CPU.

    A scanner on the internet does not run on the gateway's CPU. On a 2-core test machine
    it would, and a legitimate login measured during a scan would then measure the
    scanner's own CPU use. Pinned apart, the gateway (with the user's ssh and the
    machine's sshd) still handles every scanning connection, on its own core.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))


@contextlib.contextmanager
def pinned(cpus: str | None) -> Iterator[None]:
    """Run this (the main) thread on `cpus` for a while; spawned processes need `taskset` themselves."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


# -- SSH wire format, just enough to build and cut handshakes ------------------------------

def ssh_string(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack(">I", len(raw)) + raw


def ssh_packet(payload: bytes, block: int = 8) -> bytes:
    """An unencrypted binary packet (RFC 4253 §6): length, padding length, payload, padding."""
    pad = block - (len(payload) + 5) % block
    if pad < 4:
        pad += block
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + secrets.token_bytes(pad)


def kexinit_payload(kex: str = "curve25519-sha256,ecdh-sha2-nistp256",
                    hostkey: str = "ssh-ed25519,rsa-sha2-256",
                    cipher: str = "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr",
                    mac: str = "hmac-sha2-256", first_follows: bool = False) -> bytes:
    lists = [kex, hostkey, cipher, cipher, mac, mac, "none", "none", "", ""]
    return (bytes([MSG_KEXINIT]) + secrets.token_bytes(16) + b"".join(ssh_string(x) for x in lists)
            + bytes([int(first_follows)]) + b"\0\0\0\0")


def ecdh_init_payload() -> bytes:
    return bytes([MSG_KEX_ECDH_INIT]) + ssh_string(secrets.token_bytes(32))


def split_plaintext(stream: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A recorded client stream → (version line, plaintext packets up to NEWKEYS, encrypted rest)."""
    end = stream.index(b"\n") + 1
    banner, rest = stream[:end], stream[end:]
    packets: list[bytes] = []
    while len(rest) >= 5:
        length = struct.unpack(">I", rest[:4])[0]
        if length > 35000 or len(rest) < 4 + length:
            break
        packet, rest = rest[:4 + length], rest[4 + length:]
        packets.append(packet)
        if packet[5] == 21:  # NEWKEYS: everything after is encrypted
            break
    return banner, packets, rest


# -- raw TCP probes ------------------------------------------------------------------------

@dataclass
class Probe:
    received: bytes
    ended: str          # "eof", "reset", "timeout" or "refused"
    seconds: float      # from connected to ended


async def raw_probe(source: str, port: int, payload: bytes = b"", *, close_after_send: bool = True,
                    timeout: float = 15.0, read_limit: int = 1 << 16) -> Probe:
    """Connect from `source`, send `payload`, optionally half-close, read until the gateway ends it."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind((source, 0))
        try:
            await sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return Probe(b"", "refused", 0.0)
        t0 = time.monotonic()
        received = b""
        ended = "timeout"
        with trio.move_on_after(timeout):
            try:
                if payload:
                    await sock.send(payload)
                if close_after_send:
                    sock.shutdown(trio.socket.SHUT_WR)
                while True:
                    chunk = await sock.recv(4096)
                    if not chunk:
                        ended = "eof"
                        break
                    if len(received) < read_limit:
                        received += chunk
            except OSError as exc:  # reset, broken pipe, or not connected any more: the gateway cut us
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                    raise
                ended = "reset"
        return Probe(received, ended, time.monotonic() - t0)


async def run_bounded(jobs: Iterable[Any], concurrency: int) -> list[Any]:
    """Await the zero-argument async callables in `jobs`, at most `concurrency` at a time, in order of results."""
    jobs = list(jobs)
    results: list[Any] = [None] * len(jobs)
    limit = trio.Semaphore(concurrency)

    async def one(i: int, job: Any) -> None:
        try:
            results[i] = await job()
        finally:
            limit.release()

    async with trio.open_nursery() as n:
        for i, job in enumerate(jobs):
            await limit.acquire()
            n.start_soon(one, i, job)
    return results


class RecordingProxy:
    """A TCP proxy in front of the gateway that records what each client sends (a fuzz corpus).

    Its upstream side comes from `sources` in turn, never 127.0.0.1: the recorded clients
    fail to log in, and the penalty they earn must fall neither on the legitimate user
    nor on the next recording.
    """

    def __init__(self, target_port: int, sources: list[str]):
        self.target_port = target_port
        self.sources = sources
        self.recordings: list[bytes] = []
        self.port = 0
        self._active = 0
        self._idle = trio.Event()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self._active += 1
        self._idle = trio.Event()
        sock = trio.socket.socket()
        await sock.bind((self.sources[len(self.recordings) % len(self.sources)], 0))
        await sock.connect(("127.0.0.1", self.target_port))
        upstream = trio.SocketStream(sock)
        sent = bytearray()

        async def pump(src: trio.SocketStream, dst: trio.SocketStream, record: bool) -> None:
            try:
                async for chunk in src:
                    if record:
                        sent.extend(chunk)
                    await dst.send_all(chunk)
                await dst.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                nursery.cancel_scope.cancel()

        try:
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream, True)
                nursery.start_soon(pump, upstream, client, False)
        finally:
            self.recordings.append(bytes(sent))
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def wait_idle(self) -> None:
        if self._active:
            await self._idle.wait()


# -- keys ----------------------------------------------------------------------------------

def write_wrong_key(directory: Path) -> Path:
    """A fresh ed25519 key that no user of the demo fleet has, in OpenSSH format for `ssh -i`."""
    import asyncssh

    path = directory / "wrong_key"
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(str(path))
    os.chmod(path, 0o600)
    return path


# -- the gateway as its own process --------------------------------------------------------

def deep_merge(doc: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            deep_merge(doc[k], v)
        else:
            doc[k] = v


class GatewayProcess:
    """The demo fleet's gateway in a subprocess, its config patched by a TOML-shaped dict."""

    def __init__(self, tmp_path: Path, patch: dict | None = None, cpus: str | None = None,
                 prefix: Iterable[str] = ()):
        self.tmp_path = tmp_path
        self.cpus = cpus
        self.prefix = list(prefix)  # e.g. ["prlimit", "--nofile=1024:1024"]
        self.metrics_port = free_port()
        self.patch = {"metrics": {"listen": f"127.0.0.1:{self.metrics_port}"}, **(patch or {})}
        self.log = tmp_path / "gateway.log"
        self.proc: trio.Process | None = None
        self.port = 0
        d = tmp_path / "fleet"
        self.fleet = Fleet(d, d / "fleetgate.toml")

    async def __aenter__(self) -> "GatewayProcess":
        self.proc, buf = await spawn_until(
            [*self.prefix, *taskset(self.cpus), sys.executable, str(Path(__file__).resolve()), "serve", str(self.tmp_path),
             json.dumps(self.patch)], b"\n", self.log, timeout=60, cwd=str(REPO))
        word, port = buf.split(b"\n")[0].split()
        assert word == b"READY", buf
        self.port = int(port)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(30):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self) -> str:
        return await fetch_metrics(self.metrics_port)

    async def metric(self, name: str, **labels: str) -> float:
        return sample(await self.metrics(), name, **labels) or 0.0

    async def backend_calls(self, op: str) -> float:
        return await self.metric("fleetgate_backend_call_duration_seconds_count", op=op)

    async def login(self, user: str = "alice", *command: str, timeout: float = 60) -> tuple[float, Any]:
        """A legitimate login with the real OpenSSH client from 127.0.0.1 (on the gateway's CPUs)."""
        t0 = time.monotonic()
        r = await run([*taskset(self.cpus), "ssh", *self.fleet.ssh_opts(self.port), f"{user}@127.0.0.1",
                       *(command or ("true",))], timeout=timeout)
        return time.monotonic() - t0, r

    def log_problems(self) -> list[str]:
        """Lines of the gateway's log that betray an unhandled error."""
        bad = ("Traceback", "Exception in callback", "exception was never retrieved", "Unhandled", "unclosed")
        return [line for line in self.log.read_text(errors="replace").splitlines() if any(b in line for b in bad)]


async def timed_login(fleet: Fleet, port: int, user: str = "alice", *command: str) -> tuple[float, Any]:
    """The real OpenSSH client's whole `ssh user@gw true`, timed (for an in-process gateway)."""
    t0 = time.monotonic()
    r = await run(["ssh", *fleet.ssh_opts(port), f"{user}@127.0.0.1", *(command or ("true",))], timeout=60)
    return time.monotonic() - t0, r


def _serve(tmp_path: str, patch_json: str) -> None:
    from fleetgate.app import App

    patch = json.loads(patch_json)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)  # as `fleetgate serve` does
    _, cfg = make_fleet(Path(tmp_path), patch=lambda doc: deep_merge(doc, patch))

    async def main() -> None:
        app = App(cfg, stop_machines_on_exit=True)
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                running = await nursery.start(app.run)
                print(f"READY {running.ssh_ports[0]}", flush=True)
                async for _ in signals:
                    running.shutdown.set()
                    break

    trio.run(main)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        _serve(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: hostile.py serve TMP_DIR PATCH_JSON")
