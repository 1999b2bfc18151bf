"""Builds the main trio nursery and wires the parts; owns start-up and shutdown order.

Start-up: backends → fleet (reconcile: adopt what already runs) → SSH listeners →
metrics. Shutdown runs in reverse under a shielded scope: stop accepting, close user
connections (so asyncio prints no unclosed-transport warnings), then, only if asked
(the demo), stop the machines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import asyncssh
import trio
import trio_asyncio

from . import http
from .admin import AdminAPI
from .backends import BACKEND_TYPES, Backend
from .config import Config, resolve_path
from .fleet import Fleet
from .metrics import Metrics
from .reaper import Reaper
from .routing import Router, TableRouter
from .ssh.front import FrontConnection

log = logging.getLogger(__name__)


def build_backends(config: Config) -> dict[str, Backend]:
    return {
        name: BACKEND_TYPES[b.type](b, partial(resolve_path, config.base_dir), config.gateway.state_dir)
        for name, b in config.backends.items()
    }


class Gateway:
    """The asyncssh listeners and what every FrontConnection shares."""

    def __init__(self, config: Config, fleet: Fleet, router: Router, metrics: Metrics):
        self.config = config
        self.fleet = fleet
        self.router = router
        self.metrics = metrics
        self.connections: set[FrontConnection] = set()
        self.no_keys: frozenset[bytes] = frozenset()
        self.user_keys = {
            name: frozenset(asyncssh.import_public_key(k).public_data for k in u.authorized_keys)
            for name, u in config.users.items()
        }
        self.ca_keys = frozenset(asyncssh.import_public_key(k).public_data for k in config.user_ca_keys)
        self.host_keys = [asyncssh.read_private_key(str(p)) for p in config.gateway.host_keys]
        self._servers: list[asyncssh.SSHAcceptor] = []
        self.ports: list[int] = []

    async def start(self) -> None:
        """asyncio side: open every listener."""
        g = self.config.gateway
        max_boot = max((m.boot_timeout for m in self.config.machines.values()), default=0)
        for hp in g.listen:
            server = await asyncssh.create_server(
                lambda: FrontConnection(self), hp.host, hp.port,
                server_host_keys=self.host_keys,
                encryption_algs=list(g.ciphers), compression_algs=None,
                # Our own grace timer bounds pre-auth time; asyncssh's is only a backstop
                # that must outlast a wake held before USERAUTH_SUCCESS.
                login_timeout=g.login_grace + max_boot + 60,
                keepalive_interval=g.keepalive_interval, keepalive_count_max=3,
                line_editor=False, encoding=None, allow_pty=True, agent_forwarding=True,
                x11_forwarding=False, password_auth=False, kbdint_auth=False, gss_host=None,
                host_based_auth=False, reuse_address=True,
            )
            self._servers.append(server)
            for sock in server.sockets:
                self.ports.append(sock.getsockname()[1])
        log.info("ssh listening ports=%s", self.ports)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for c in list(self.connections):
            if c.conn is not None:
                c.conn.close()
        for server in self._servers:
            await server.wait_closed()
        for c in list(self.connections):
            if c.conn is not None:
                await c.conn.wait_closed()


@dataclass
class Running:
    """What a started App hands to whoever started it (tests, the demo)."""

    gateway: Gateway
    fleet: Fleet
    metrics: Metrics
    ssh_ports: list[int]
    metrics_port: int | None
    shutdown: trio.Event = field(default_factory=trio.Event)


class App:
    def __init__(self, config: Config, *, stop_machines_on_exit: bool = False):
        self.config = config
        self.stop_machines_on_exit = stop_machines_on_exit
        self.metrics = Metrics()

    async def _http(self, method: str, path: str, query: dict) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/metrics":
            return 200, http.CONTENT_TYPE_METRICS, self.metrics.exposition()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready = self._running is not None
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"starting\n")
        return 404, "text/plain", b"not found\n"

    _running: Running | None = None

    async def _reconcile_loop(self, fleet: Fleet) -> None:
        """Adopt machines started or stopped outside fleetgate, and notice ones that died."""
        while True:
            await trio.sleep(self.config.gateway.reconcile_interval)
            await fleet.reconcile()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or until `Running.shutdown` is set."""
        backends = build_backends(self.config)
        async with trio_asyncio.open_loop():
            async with trio.open_nursery() as nursery:
                fleet = Fleet(self.config.machines, backends, self.metrics, nursery)
                await fleet.reconcile()
                gateway = Gateway(self.config, fleet, TableRouter(self.config.users, self.config.machines),
                                  self.metrics)
                metrics_port = None
                try:
                    await trio_asyncio.aio_as_trio(gateway.start)()
                    nursery.start_soon(self._reconcile_loop, fleet)
                    await nursery.start(Reaper(fleet).run)
                    if self.config.gateway.admin_socket is not None:
                        await nursery.start(http.serve_unix, str(self.config.gateway.admin_socket), AdminAPI(fleet))
                    if self.config.metrics.listen is not None:
                        hp = self.config.metrics.listen
                        metrics_port = await nursery.start(http.serve, hp.host, hp.port, self._http)
                    running = self._running = Running(gateway, fleet, self.metrics, gateway.ports, metrics_port)
                    task_status.started(running)
                    await running.shutdown.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio_asyncio.aio_as_trio(gateway.close)()
                        if self.stop_machines_on_exit:
                            with trio.move_on_after(30):
                                await fleet.stop_all()
                        for b in backends.values():
                            await b.aclose()
                    nursery.cancel_scope.cancel()
