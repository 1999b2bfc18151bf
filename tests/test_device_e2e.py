"""Issue 13 / seed 003: a device behind NAT that dials in with `ssh -R` when asked.

The device is made of real parts started by the test: its own sshd on loopback (which the
gateway cannot reach directly: it is only ever reached through the tunnel), a fake metadata
API (the carrier's flag, served by the test), and a small agent that polls the flag and runs
the real OpenSSH client `ssh -N -R dev1:22:127.0.0.1:PORT device:dev1@gateway` while it is set.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from fleetgate.keys import ensure_key, public_line
from helpers import Session, free_port, make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


class Metadata:
    """The carrier's metadata API: POST /wake/NAME and /sleep/NAME set the flag, GET /flag/NAME reads it."""

    def __init__(self) -> None:
        self.flags: dict[str, bool] = {}
        self.calls: list[str] = []
        meta = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, doc: Any) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                _, op, name = self.path.split("/")
                meta.calls.append(f"{op} {name}")
                meta.flags[name] = op == "wake"
                self._answer({"ok": True})

            def do_GET(self) -> None:
                self._answer({"dial": meta.flags.get(self.path.rsplit("/", 1)[1], False)})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Device:
    """The device's sshd and its agent (a trio task polling the flag, as the seed's device does)."""

    def __init__(self, d: Path, gateway_opts: list[str], meta: Metadata):
        self.dir = d
        d.mkdir()
        self.host_key = ensure_key(d / "host_key", "device-dev1")
        self.key = ensure_key(d / "device_key", "dev1-tunnel")
        self.port = free_port()
        self.gateway_opts = gateway_opts
        self.meta = meta
        self.tunnel: trio.Process | None = None
        self.dials = 0
        self.sshd: subprocess.Popen | None = None

    def start_sshd(self, authorized: str) -> None:
        (self.dir / "authorized_keys").write_text(authorized)
        cfg = self.dir / "sshd_config"
        cfg.write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
                       f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPidFile {self.dir / 'sshd.pid'}\n"
                       "StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                       "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=subprocess.DEVNULL)

    def tunnel_argv(self, name: str = "dev1") -> list[str]:
        return ["ssh", *self.gateway_opts, "-i", str(self.dir / "device_key"), "-N",
                "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=5",
                "-R", f"{name}:22:127.0.0.1:{self.port}", "device:dev1@127.0.0.1"]

    async def agent(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    dial = (await client.get(f"{self.meta.url}/flag/dev1")).json()["dial"]
                except httpx.HTTPError:
                    dial = False
                if self.tunnel is not None and self.tunnel.poll() is not None:
                    self.tunnel = None  # the tunnel dropped: dial again at the next poll if still wanted
                if dial and self.tunnel is None:
                    self.dials += 1
                    self.tunnel = await trio.lowlevel.open_process(self.tunnel_argv(), stdin=subprocess.DEVNULL,
                                                                   stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.DEVNULL)
                elif not dial and self.tunnel is not None:
                    self.tunnel.terminate()
                    await self.tunnel.wait()
                    self.tunnel = None
                await trio.sleep(0.2)  # the device polls its metadata: that is its nature, not a test wait

    def close(self) -> None:
        if self.tunnel is not None and self.tunnel.returncode is None:
            self.tunnel.kill()
        if self.sshd is not None:
            self.sshd.kill()
            self.sshd.wait()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


async def test_device_wakes_relays_reaps_and_survives_tunnel_loss(tmp_path, nursery):
    meta = Metadata()
    me = getpass.getuser()
    device: Device | None = None
    try:
        holder: dict[str, Device] = {}

        def patch(doc: dict) -> None:
            d = holder["device"]
            doc["backends"]["devices"] = {"type": "device"}
            doc["machines"]["dev1"] = {
                "backend": "devices", "user": me, "host_key": public_line(d.host_key),
                "device_keys": [public_line(d.key)], "boot_timeout": 30,
                "wake_url": f"{meta.url}/wake/dev1", "sleep_url": f"{meta.url}/sleep/dev1"}
            doc["users"]["alice"]["machines"] = ["alice", "dev1"]

        # The fleet's files first (for the gateway's keys), then the device, then the config.
        fleet, _ = make_fleet(tmp_path)
        device = holder["device"] = Device(tmp_path / "device", [], meta)
        fleet, cfg = make_fleet(tmp_path, patch=patch)
        device.start_sshd((fleet.dir / "upstream_key.pub").read_text() + (fleet.dir / "client_key.pub").read_text())
        await start_gateway(nursery, fleet, cfg)
        opts = fleet.ssh_opts()
        del opts[2:4]  # the device logs in with its own key, not the user's
        device.gateway_opts = opts
        nursery.start_soon(device.agent)
        assert fleet.machine("dev1").state.value == "stopped"

        # Wake through the metadata flag; the session runs on the device's sshd, through its tunnel.
        r = await run(fleet.ssh("alice+dev1", "echo via $SSH_CONNECTION; exit 5"), timeout=60)
        assert r.returncode == 5, r.err
        assert r.out.startswith("via 127.0.0.1 ") and r.out.split()[-1] == str(device.port)
        assert meta.calls == ["wake dev1"] and device.dials == 1
        assert fleet.metric("fleetgate_boot_latency_seconds_count", backend="devices") == 1
        src = tmp_path / "blob.bin"
        src.write_bytes(os.urandom(2 * 1024 * 1024))
        scp = ["scp", "-q", *fleet.scp_opts()]
        r = await run([*scp, str(src), f"alice+dev1@127.0.0.1:{tmp_path}/device/up.bin"])
        assert r.returncode == 0, r.err
        assert sha256(tmp_path / "device" / "up.bin") == sha256(src)

        # Jump mode: spliced through the tunnel to the device's own sshd, end to end.
        r = await run(["ssh", *fleet.ssh_opts(), "-W", "dev1:22", "alice+dev1@127.0.0.1"], stdin=b"", timeout=30)
        assert r.returncode == 0 and r.out.startswith("SSH-2.0-OpenSSH"), r.err

        # The device's key: no shell, no other forwarding, no other device's name, not a user.
        dev_opts = ["ssh", *device.gateway_opts, "-i", str(tmp_path / "device" / "device_key")]
        r = await run([*dev_opts, "device:dev1@127.0.0.1", "id"])
        assert r.returncode == 255 and "carries only its own tunnel" in r.err, r.err
        r = await run([*dev_opts, "-W", "alice:22", "device:dev1@127.0.0.1"], stdin=b"")
        assert r.returncode == 255 and "carries only its own tunnel" in r.err, r.err
        r = await run(device.tunnel_argv("alice"), timeout=30)
        assert r.returncode == 255 and "remote port forwarding failed" in r.err, r.err
        r = await run([*dev_opts, "alice@127.0.0.1", "true"])
        assert r.returncode == 255 and "Permission denied" in r.err
        assert fleet.machine("alice").state.value == "stopped"

        # Tunnel loss mid-session: the session ends with the reason; the device dials again.
        async with trio.open_nursery() as n:
            s = await Session(fleet.ssh("alice+dev1", "echo ready; cat")).open(n)
            assert await s.echo(b"ping\n") == b"ping\n"
            device.tunnel.kill()
            with trio.fail_after(30):
                code = await s.proc.wait()
            assert code == 255
            await s.wait_err(b"fleetgate: the tunnel of dev1 closed (the device went offline); this session has ended")
            n.cancel_scope.cancel()
        r = await run(fleet.ssh("alice+dev1", "echo again"), timeout=60)
        assert (r.returncode, r.out) == (0, "again\n"), r.err
        assert device.dials == 2
        assert fleet.metric("fleetgate_machine_lost_total", backend="devices") == 1  # the loss is counted

        # Idle: the reaper's stop asks the device to close and closes the tunnel from our side.
        with trio.fail_after(30):
            await fleet.running.fleet.wait_sessions(fleet.machine("dev1"), 0)
            assert await fleet.running.fleet.stop("dev1")
        assert meta.flags["dev1"] is False and meta.calls[-1] == "sleep dev1"
        assert fleet.machine("dev1").state.value == "stopped"
        with trio.fail_after(10):
            while device.tunnel is not None:
                await trio.sleep(0.1)  # the agent notices at its next poll
    finally:
        if device is not None:
            device.close()
        meta.close()
