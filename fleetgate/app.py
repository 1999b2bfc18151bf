"""Builds the main trio nursery and wires the parts; owns start-up and shutdown order.

Start-up: backends → fleet (reconcile: adopt what already runs) → SSH listeners →
metrics. Shutdown runs in reverse under a shielded scope: stop accepting, close user
connections (so asyncio prints no unclosed-transport warnings), then, only if asked
(the demo), stop the machines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import asyncssh
import trio
import trio_asyncio

from . import http, passthrough
from .admin import AdminAPI
from .audit import AuditLog
from .backends import BACKEND_TYPES, Backend
from .config import Config, ConfigError, load, resolve_path
from .fleet import Fleet
from .metrics import Metrics
from .reaper import Reaper
from .routing import Router, TableRouter
from .passthrough import RateLimiter
from .ssh import algorithms, internals
from .ssh.front import FrontConnection
from .ssh.grace import GraceClock
from .ssh.limits import LimitsConfig, PreauthLimiter

log = logging.getLogger(__name__)


def build_backends(config: Config, previous: dict[str, Backend] | None = None) -> dict[str, Backend]:
    """One instance per [backends.NAME]; on a reload, an unchanged backend keeps its instance
    (and with it the processes it watches)."""
    resolve = partial(resolve_path, config.base_dir)
    out = {}
    for name, b in config.backends.items():
        old = (previous or {}).get(name)
        out[name] = old if old is not None and old.config == b else \
            BACKEND_TYPES[b.type](b, resolve, config.gateway.state_dir)
    return out


class Gateway:
    """The asyncssh listeners and what every FrontConnection shares."""

    def __init__(self, config: Config, fleet: Fleet, router: Router, metrics: Metrics,
                 audit: AuditLog | None = None):
        self.config = config
        self.audit = audit or AuditLog(None, metrics)
        self.fleet = fleet
        self.router = router
        self.metrics = metrics
        self.connections: set[FrontConnection] = set()
        self.connections_changed = trio.Event()
        self.no_keys: frozenset[bytes] = frozenset()
        self.host_keys = [asyncssh.read_private_key(str(p)) for p in config.gateway.host_keys]
        self.limiter = PreauthLimiter(config.limits or LimitsConfig(),
                                      count=lambda reason: metrics.preauth_refusals.labels(reason).inc())
        self.grace = GraceClock(config.gateway.login_grace)
        self._sweeper: asyncio.Task | None = None
        self.apply(config, router)
        self._servers: list[asyncssh.SSHAcceptor] = []
        self.ports: list[int] = []
        self.inherited_sockets: list[socket.socket] = []

    def apply(self, config: Config, router: Router) -> None:
        """Take a (re)loaded config for new connections; live connections keep what they have."""
        self.config = config
        self.router = router
        self.grace.grace = config.gateway.login_grace
        self.user_keys = {
            name: frozenset(asyncssh.import_public_key(k).public_data for k in u.authorized_keys)
            for name, u in config.users.items()
        }
        self.ca_keys = frozenset(asyncssh.import_public_key(k).public_data for k in config.user_ca_keys)
        ca = config.gateway.upstream_ca_key
        self.upstream_ca = asyncssh.read_private_key(str(ca)) if ca is not None else None
        limits = config.limits or LimitsConfig()
        if limits != self.limiter.config:
            self.limiter = PreauthLimiter(limits, count=self.limiter._count)
        self.password_machines = any(m.password_passthrough for m in config.machines.values())
        if getattr(self, "_password_limits", None) != (limits.password_per_source_per_minute,
                                                       limits.password_per_user_per_minute):
            self._password_limits = (limits.password_per_source_per_minute, limits.password_per_user_per_minute)
            self.password_sources = RateLimiter(limits.password_per_source_per_minute)
            self.password_users = RateLimiter(limits.password_per_user_per_minute)

    async def start(self) -> None:
        """asyncio side: open every listener."""
        g = self.config.gateway
        self._sweeper = asyncio.ensure_future(self.grace.run())
        # systemd socket activation hands us the listening sockets; otherwise we open our own.
        places = [{"sock": sock} for sock in self.inherited_sockets] or \
                 [{"host": hp.host, "port": hp.port} for hp in g.listen]
        for place in places:
            server = await asyncssh.create_server(
                lambda: FrontConnection(self), **place,
                server_host_keys=self.host_keys,
                # Our GraceClock bounds pre-auth time (asyncssh's timer per connection would
                # leave a cancelled timer behind each); a verified client waiting for a boot
                # is bounded by the machine's boot_timeout instead.
                login_timeout=0, backlog=1024, **algorithms.front_options(g),
                keepalive_interval=g.keepalive_interval, keepalive_count_max=3,
                line_editor=False, encoding=None, allow_pty=True, agent_forwarding=True,
                x11_forwarding=False, password_auth=True, kbdint_auth=False, gss_host=None,
                host_based_auth=False, **({} if "sock" in place else {"reuse_address": True}),
            )
            self._servers.append(server)
            for sock in server.sockets:
                self.ports.append(sock.getsockname()[1])
        log.info("ssh listening ports=%s", self.ports)

    def add_connection(self, c: FrontConnection) -> None:
        self.connections.add(c)

    def remove_connection(self, c: FrontConnection) -> None:
        self.connections.discard(c)
        self.connections_changed.set()
        self.connections_changed = trio.Event()

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    def notify_all(self, text: str) -> None:
        """A line on the stderr of every open session (and a banner to anyone still logging in)."""
        for c in list(self.connections):
            c.notify(text)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
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
    passthrough_ports: dict[str, int] = field(default_factory=dict)


def inherited_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_FDS, sd_listen_fds(3))."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # not for our children
    return [socket.socket(fileno=3 + i) for i in range(count)]


class App:
    def __init__(self, config: Config, *, stop_machines_on_exit: bool = False,
                 sockets: list[socket.socket] | None = None):
        self.config = config
        self.stop_machines_on_exit = stop_machines_on_exit
        self.sockets = sockets or []
        self.metrics = Metrics()
        self._backends: dict[str, Backend] = {}

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). New users, machines and routes apply to new
        connections; live sessions continue. A broken file changes nothing."""
        running = self._running
        assert running is not None
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("reload rejected, old config stays in force: %s", issue)
            self.metrics.config_reloads.labels("failure").inc()
            self.metrics.config_last_reload_ok.set(0)
            return False
        if new.gateway.listen != self.config.gateway.listen or new.metrics != self.config.metrics:
            log.warning("reload: listen addresses changed; they apply after a restart")
        backends = build_backends(new, self._backends)
        old = set(self._backends.values())
        for b in backends.values():
            if b not in old:
                self._nursery.start_soon(b.run)
        running.fleet.apply(new.machines, backends)
        running.gateway.apply(new, TableRouter(new.users, new.machines))
        self._backends = backends
        self.config = new
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload_ok.set(1)
        log.info("config reloaded users=%d machines=%d", len(new.users), len(new.machines))
        return True

    async def drain(self) -> None:
        """SIGTERM: stop accepting, tell users, let sessions finish up to drain_timeout."""
        running = self._running
        assert running is not None
        gw = running.gateway
        gw.stop_listening()
        timeout = self.config.gateway.drain_timeout
        log.info("draining connections=%d timeout=%.0fs", len(gw.connections), timeout)
        gw.notify_all(f"fleetgate: the gateway is shutting down; this session will be closed within {timeout:.0f} s")
        with trio.move_on_after(timeout):
            while gw.connections:
                await gw.connections_changed.wait()
        if gw.connections:
            log.warning("drain timeout: closing connections=%d", len(gw.connections))
        running.shutdown.set()

    async def handle_signals(self) -> None:
        """SIGHUP reloads; SIGTERM or SIGINT drains, then shuts down; a second one shuts down at once."""
        draining = False
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading %s", self.config.path)
                        self.reload()
                    elif not draining:
                        log.info("%s: draining, then shutting down (again to stop now)", signal.Signals(signum).name)
                        draining = True
                        nursery.start_soon(self.drain)
                    else:
                        log.warning("%s again: shutting down now", signal.Signals(signum).name)
                        assert self._running is not None
                        self._running.shutdown.set()

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
        if self.config.gateway.relay_tuning:
            internals.apply_relay_tuning()
        backends = self._backends = build_backends(self.config)
        async with trio_asyncio.open_loop():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for b in backends.values():
                    await nursery.start(b.run)
                fleet = Fleet(self.config.machines, backends, self.metrics, nursery)
                await fleet.reconcile()
                audit = AuditLog(self.config.audit_file, self.metrics)
                gateway = Gateway(self.config, fleet, TableRouter(self.config.users, self.config.machines),
                                  self.metrics, audit)
                gateway.inherited_sockets = self.sockets
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
                    passthrough_ports = await nursery.start(passthrough.serve, self.config, fleet, self.metrics)
                    running = self._running = Running(gateway, fleet, self.metrics, gateway.ports, metrics_port,
                                                     passthrough_ports=passthrough_ports)
                    task_status.started(running)
                    await running.shutdown.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await trio_asyncio.aio_as_trio(gateway.close)()
                        if self.stop_machines_on_exit:
                            with trio.move_on_after(30):
                                await fleet.stop_all()
                        for b in {*backends.values(), *self._backends.values()}:
                            await b.aclose()
                        audit.close()
                    nursery.cancel_scope.cancel()
