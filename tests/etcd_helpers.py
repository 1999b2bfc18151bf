"""A real etcd cluster (Debian's etcd-server) on loopback for end-to-end tests.

Members are started by the test, in the test's tmp dir (so conftest's reap_strays kills any
left behind). Elections are tuned fast (50 ms heartbeat, 500 ms election timeout) so a
killed leader is replaced in about a second.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import trio

from helpers import free_port

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


class Member:
    def __init__(self, name: str, data_dir: Path, client_port: int, peer_port: int):
        self.name = name
        self.data_dir = data_dir
        self.client_port = client_port
        self.peer_port = peer_port
        self.proc: trio.Process | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    def __init__(self, base: Path, size: int = 3):
        self.base = base
        self.members = [Member(f"m{i}", base / f"m{i}", free_port(), free_port()) for i in range(size)]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    async def start_member(self, m: Member, state: str = "new") -> None:
        log = open(self.base / f"{m.name}.log", "ab")
        m.proc = await trio.lowlevel.open_process(
            [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
             "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
             "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
             "--initial-cluster", self.initial, "--initial-cluster-state", state,
             "--initial-cluster-token", f"fleetgate-test-{self.base.name}",
             "--heartbeat-interval", "50", "--election-timeout", "500", "--log-level", "warn",
             "--logger", "zap"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    async def start(self) -> "EtcdCluster":
        self.base.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            await self.start_member(m)
        await self.wait_healthy()
        return self

    async def wait_healthy(self, members: list[Member] | None = None, timeout: float = 30) -> None:
        """Until every given member answers /health with a leader (etcd offers no event to await)."""
        members = members or [m for m in self.members if m.proc is not None and m.proc.returncode is None]
        async with httpx.AsyncClient(timeout=1.0) as client:
            with trio.fail_after(timeout):
                for m in members:
                    while True:
                        try:
                            r = await client.get(m.client_url + "/health")
                            if r.status_code == 200 and r.json().get("health") == "true":
                                break
                        except (httpx.HTTPError, ValueError):
                            pass
                        await trio.sleep(0.1)

    async def leader(self) -> Member:
        async with httpx.AsyncClient(timeout=2.0) as client:
            for m in self.members:
                if m.proc is None or m.proc.returncode is not None:
                    continue
                try:
                    r = await client.post(m.client_url + "/v3/maintenance/status", content="{}")
                    data = r.json()
                except (httpx.HTTPError, ValueError):
                    continue
                lid = data.get("leader")
                if lid and lid == data.get("header", {}).get("member_id"):
                    return m
        raise RuntimeError("no leader")

    async def kill(self, m: Member) -> None:
        assert m.proc is not None
        m.proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await m.proc.wait()

    async def restart(self, m: Member) -> None:
        await self.start_member(m, state="existing")

    async def aclose(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.returncode is None:
                m.proc.kill()
                with trio.move_on_after(5):
                    await m.proc.wait()


def store_patch(endpoints: list[str], *, replica: str, admin_socket: str, ttl: int = 3, prefix: str = "/fg-test/",
                idle_timeout: float | None = None, min_uptime: float = 0, metrics_port: int | None = None):
    """A make_fleet patch: this replica's [store] section, its own admin socket and short timers."""

    def patch(doc: dict) -> None:
        doc["store"] = {"type": "etcd", "endpoints": endpoints, "prefix": prefix, "lease_ttl": ttl,
                        "timeout": 0.8, "replica": replica}
        doc["gateway"]["admin_socket"] = admin_socket
        if metrics_port is not None:
            doc["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
        for m in doc["machines"].values():
            if idle_timeout is not None:
                m["idle_timeout"] = idle_timeout
            m["min_uptime"] = min_uptime

    return patch
