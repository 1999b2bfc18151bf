"""Shared test helpers: a real gateway (in-process or as `fleetgate demo`) and the real OpenSSH client.

Every wait is bounded; nothing sleeps to synchronise where an event or a line of output
can be awaited instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import trio

from fleetgate import config as config_mod
from fleetgate import demo
from fleetgate.app import App, Running

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
HOST_ALIAS = "fleetgate-under-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Fleet:
    """A demo fleet directory (keys, machines, fleetgate.toml) and a gateway over it."""

    dir: Path
    config_path: Path
    running: Running | None = None

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.ssh_ports[0]

    @property
    def client_key(self) -> Path:
        return self.dir / "client_key"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def ssh_opts(self, port: int | None = None) -> list[str]:
        """Options for the real OpenSSH client to reach the gateway and trust only its key."""
        return [
            "-p", str(port or self.port),
            "-i", str(self.client_key),
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", f"HostKeyAlias={HOST_ALIAS}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=30",
            "-F", "/dev/null",
        ]

    def ssh(self, user: str, *command: str, extra: Sequence[str] = ()) -> list[str]:
        return ["ssh", *self.ssh_opts(), *extra, f"{user}@127.0.0.1", *command]

    def scp_opts(self) -> list[str]:
        opts = self.ssh_opts()
        opts[0] = "-P"
        return opts

    def machine(self, name: str):
        assert self.running is not None
        return self.running.fleet.machines[name]

    def backend_calls(self, op: str) -> float:
        """How many backend calls of this op the gateway made (from its own metric)."""
        assert self.running is not None
        total = 0.0
        for metric in self.running.metrics.registry.collect():
            if metric.name == "fleetgate_backend_call_duration_seconds":
                for s in metric.samples:
                    if s.name.endswith("_count") and s.labels.get("op") == op:
                        total += s.value
        return total

    def metric(self, name: str, **labels: str) -> float:
        assert self.running is not None
        registry = self.running.metrics.registry
        value = registry.get_sample_value(name, labels)
        if value is None:  # labels left out (e.g. wakes' `cause`): the sum over them
            value = sum(s.value for family in registry.collect() for s in family.samples
                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
        return value


def make_fleet(tmp_path: Path, *, boot_delay: float = 0.0, patch: Callable[[dict], None] | None = None,
               port: int = 0, isolation: str = "auto") -> tuple[Fleet, config_mod.Config]:
    """Write a demo fleet under tmp_path and return it with its (optionally patched) config.

    Its process machines are isolated (own namespaces, accounts fg-alice / fg-bob) where the
    host allows it; isolation="none" for tests whose machines must share the gateway host's
    network and files (as the gateway's own account)."""
    d = tmp_path / "fleet"
    cfg_path = demo.prepare(d, port, None, boot_delay=boot_delay, isolation=isolation)
    host_line = (d / "gateway_host_key.pub").read_text().strip()
    with open(d / "known_hosts", "a") as f:
        f.write(f"{HOST_ALIAS} {host_line}\n")
    doc = tomllib.loads(cfg_path.read_text())
    if patch is not None:
        patch(doc)
    cfg = config_mod.parse(doc, file=str(cfg_path), base_dir=d)
    return Fleet(d, cfg_path), cfg


async def start_gateway(nursery: trio.Nursery, fleet: Fleet, cfg: config_mod.Config, **app_kwargs: Any) -> Running:
    """Run the gateway in the test's nursery; when the test ends, its machines are stopped too."""
    app_kwargs.setdefault("stop_machines_on_exit", True)
    app = App(cfg, **app_kwargs)
    with trio.fail_after(30):
        fleet.running = await nursery.start(app.run)
    return fleet.running


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


async def run(argv: Sequence[str], *, timeout: float = 60, stdin: bytes | None = None,
              env: dict[str, str] | None = None, cwd: str | Path | None = None) -> Result:
    """Run a real program (ssh, scp, rsync, ...) without blocking the gateway's event loop."""
    with trio.fail_after(timeout):
        p = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False,
                                   stdin=stdin if stdin is not None else b"",
                                   env={**os.environ, **(env or {})}, cwd=cwd)
    return Result(p.returncode, p.stdout, p.stderr)


async def spawn_until(argv: Sequence[str], marker: bytes, log: Path, timeout: float = 30,
                      **popen: Any) -> tuple[trio.Process, bytes]:
    """Start a program (stderr to `log`) and return once its stdout has shown `marker`."""
    with open(log, "wb") as logf:
        proc = await trio.lowlevel.open_process(list(argv), stdout=subprocess.PIPE, stderr=logf,
                                                stdin=subprocess.DEVNULL, **popen)
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while marker not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{argv[0]} exited early:\n{log.read_text()}")
            buf += chunk
    return proc, buf


class DemoProcess:
    """`fleetgate demo` as a real subprocess, the way a user runs it."""

    def __init__(self, state_dir: Path, *args: str):
        self.state_dir = state_dir
        self.port = free_port()
        self.metrics_port = free_port()
        self.args = ["--port", str(self.port), "--metrics-port", str(self.metrics_port),
                     "--state-dir", str(state_dir), *args]
        self.proc: trio.Process | None = None
        self.log = state_dir.parent / "demo.log"

    async def __aenter__(self) -> "DemoProcess":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc, out = await spawn_until([sys.executable, "-m", "fleetgate", "demo", *self.args],
                                           b"Ctrl-C stops", self.log)
        self.banner = out.decode()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.send_signal(2)
        with trio.move_on_after(30):
            await self.proc.wait()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def ssh_opts(self) -> list[str]:
        return [
            "-p", str(self.port),
            "-i", str(self.state_dir / "client_key"),
            "-o", f"UserKnownHostsFile={self.state_dir / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-F", "/dev/null",
        ]

    async def metrics(self) -> str:
        return await fetch_metrics(self.metrics_port)


async def fetch_metrics(port: int) -> str:
    """A gateway's /metrics text, fetched like a scraper does (bounded)."""
    import httpx

    async with httpx.AsyncClient() as client:
        with trio.fail_after(10):
            r = await client.get(f"http://127.0.0.1:{port}/metrics")
    r.raise_for_status()
    return r.text


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class ServeProcess:
    """`fleetgate serve -c FILE` as a real subprocess; a task pumps its log (stderr) into lines."""

    def __init__(self, config_path: Path, *, argv_prefix: Sequence[str] = (), env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = ()):
        self.config_path = config_path
        self.argv = [*argv_prefix, sys.executable, "-m", "fleetgate", "--log-level", "info", "serve", "-c",
                     str(config_path)]
        self.env = {**os.environ, **(env or {})}
        self.pass_fds = tuple(pass_fds)
        self.proc: trio.Process | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._taken: set[int] = set()
        self._changed = trio.Event()
        self._eof = False

    async def start(self, nursery: trio.Nursery) -> "ServeProcess":
        self.proc = await trio.lowlevel.open_process(self.argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                     stdin=subprocess.DEVNULL, env=self.env, pass_fds=self.pass_fds)
        nursery.start_soon(self._pump)
        line = await self.wait_for("ssh listening ports=")
        self.port = int(line.split("ports=[", 1)[1].split("]", 1)[0].split(",")[0])
        return self

    async def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        buf = b""
        async with self.proc.stderr:
            while True:
                chunk = await self.proc.stderr.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                self.lines += [d.decode(errors="replace") for d in done]
                self._changed.set()
                self._changed = trio.Event()
        self._eof = True
        self._changed.set()

    async def wait_for(self, text: str, timeout: float = 30) -> str:
        """The first log line containing text that no earlier wait_for returned."""
        with trio.fail_after(timeout):
            while True:
                for i in range(len(self.lines)):
                    if i not in self._taken and text in self.lines[i]:
                        self._taken.add(i)
                        return self.lines[i]
                if self._eof:
                    raise EOFError(f"fleetgate exited before logging {text!r}; log:\n" + "\n".join(self.lines))
                await self._changed.wait()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        with trio.fail_after(timeout):
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class Session:
    """An open `ssh alice 'echo ready; cat'`: an echo line we can talk through."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: trio.Process | None = None
        self.err = b""

    async def open(self, nursery: trio.Nursery) -> "Session":
        self.proc = await trio.lowlevel.open_process(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE)
        nursery.start_soon(self._read_err)
        assert await self.read_until(b"ready\n") == b"ready\n"
        return self

    async def _read_err(self) -> None:
        async for chunk in self.proc.stderr:
            self.err += chunk

    async def read_until(self, end: bytes, timeout: float = 20) -> bytes:
        out = b""
        with trio.fail_after(timeout):
            while not out.endswith(end):
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    break
                out += chunk
        return out

    async def echo(self, data: bytes) -> bytes:
        await self.proc.stdin.send_all(data)
        return await self.read_until(data)

    async def wait_err(self, text: bytes, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while text not in self.err:
                await trio.sleep(0.05)  # stderr is pumped by _read_err; nothing else to wait on

    async def close(self) -> int:
        await self.proc.stdin.aclose()
        with trio.fail_after(20):
            return await self.proc.wait()
