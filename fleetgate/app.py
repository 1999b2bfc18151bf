"""Builds the main trio nursery and wires the parts; owns start-up and shutdown order.

Start-up: backends → fleet (reconcile: adopt what already runs) → SSH listeners →
metrics. Shutdown runs in reverse under a shielded scope: stop accepting, close user
connections (so asyncio prints no unclosed-transport warnings), then, only if asked
(the demo), stop the machines.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from functools import partial

import trio

from . import fdlimit, http, logsetup, passthrough, private
from .admin import AdminAPI
from .audit import AuditLog
from .backends import BACKEND_TYPES, Backend
from .config import Config, ConfigError, load, resolve_path
from .fleet import Fleet
from .metrics import Metrics
from .reaper import Reaper
from .store import build_store
from .routing import Router, TableRouter
from .webhook import Webhooks
from .ssh import bridge, internals
from .ssh.server import Gateway

log = logging.getLogger(__name__)

TRIM_CHECK_INTERVAL = 1.0  # seconds between checks whether freed buffer memory should go back


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
        self._webhooks: Webhooks | None = None
        self._old_webhooks: list[Webhooks] = []  # replaced by a reload; closed at shutdown

    def build_router(self, config: Config) -> Router:
        """[routing]: the TOML table or the webhook service (fleetgate/webhook.py); the webhook
        client and its caches are kept across reloads while [routing] is unchanged."""
        rc = config.routing
        if rc.url is None and rc.keys_url is None:
            return TableRouter(config.users, config.machines)
        if self._webhooks is None or self._webhooks.config != rc:
            if self._webhooks is not None:
                self._old_webhooks.append(self._webhooks)
            self._webhooks = Webhooks(rc, lambda kind, result, seconds:
                                      self.metrics.webhook_calls.labels(kind, result).observe(seconds))
        if rc.webhook:
            return self._webhooks.router(config.machines)
        return TableRouter(config.users, config.machines, keys=self._webhooks.keys)

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP). New users, machines and routes apply to new
        connections; live sessions continue. All or nothing: everything new (backends, keys,
        the front's options) is built first; if any of it fails, nothing changed and the old
        config stays whole. Only then are the parts swapped, with nothing left that can fail."""
        running = self._running
        assert running is not None
        self._read_fd_limit()  # the budgets follow a changed open-file limit (prlimit --pid, issue 25)
        try:
            new = load(self.config.path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("reload rejected, old config stays in force: %s", issue)
            return self._reload_failed()
        audit_fd = None
        try:
            backends = build_backends(new, self._backends)
            prepared = running.gateway.prepare(new, self.build_router(new))
            if new.audit_file != self.config.audit_file:
                audit_fd = self._audit.prepare(new.audit_file)   # a destination that cannot be opened: refused
        except Exception as exc:  # a file changed under check's feet, a key that parses but does not load...
            log.error("reload rejected at apply time, old config stays in force: error=%s: %s",
                      type(exc).__name__, exc)
            return self._reload_failed()
        if new.gateway.listen != self.config.gateway.listen or new.metrics != self.config.metrics:
            log.warning("reload: listen addresses changed; they apply after a restart")
        if new.gateway.admin_socket != self.config.gateway.admin_socket:
            log.warning("reload: gateway.admin_socket changed; the admin socket stays at %s until a restart",
                        self.config.gateway.admin_socket)
        if new.audit_file != self.config.audit_file:
            self._audit.switch(new.audit_file, audit_fd)
            log.info("reload: audit log now at %s", new.audit_file)
        old = set(self._backends.values())
        for b in backends.values():
            if b not in old:
                self._nursery.start_soon(b.run)
        running.fleet.apply(new.machines, backends)
        running.gateway.commit(prepared)
        self._backends = backends
        self.config = new
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_last_reload_ok.set(1)
        self.metrics.config_last_reload_success.set_to_current_time()
        log.info("config reloaded users=%d machines=%d", len(new.users), len(new.machines))
        return True

    def _read_fd_limit(self) -> None:
        """Raise the soft limit to the hard one again and export it; the budgets are derived
        from it when the config is (re)applied (FrontContext.budget_limits)."""
        before, after = fdlimit.raise_soft_limit()
        if after != self._fd_limit:
            log.info("open-file limit changed limit=%d (was %d, soft limit was %d)", after, self._fd_limit, before)
        self._fd_limit = after
        self.metrics.fd_limit.set(after)

    async def _trim_loop(self, gateway: Gateway) -> None:
        """Give freed buffer memory back to the system once enough budget was released
        (budget.Budgets.trim_due: glibc keeps freed heap pages otherwise)."""
        while True:
            await trio.sleep(TRIM_CHECK_INTERVAL)
            if gateway.budgets.trim_due():
                t0 = trio.current_time()
                gateway.budgets.release_memory()
                log.debug("released freed memory seconds=%.3f", trio.current_time() - t0)

    def _reload_failed(self) -> bool:
        self.metrics.config_reloads.labels("failure").inc()
        self.metrics.config_last_reload_ok.set(0)
        return False

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

    async def handle_signals(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """SIGHUP reloads; SIGTERM or SIGINT drains, then shuts down; a second one shuts down at once."""
        draining = False
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP: reloading %s", self.config.path)
                        try:
                            self.reload()
                        except Exception:  # a bug in reload must not end every session
                            log.exception("reload failed unexpectedly; the gateway keeps running")
                            self._reload_failed()
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
            return 200, http.CONTENT_TYPE_METRICS, await self.metrics.exposition_async()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready = self._running is not None
            return (200, "text/plain", b"ready\n") if ready else (503, "text/plain", b"starting\n")
        return 404, "text/plain", b"not found\n"

    _running: Running | None = None
    _fd_limit = 0

    def _http_refused(self, reason: str) -> None:
        self.metrics.http_refusals.labels(reason).inc()

    async def _reconcile_loop(self, fleet: Fleet) -> None:
        """Adopt machines started or stopped outside fleetgate, and notice ones that died.

        Each pass spreads its status calls over the interval (Fleet.reconcile), so a status
        command per machine is a steady load, not a burst every interval; the next pass starts
        one interval after the previous one started (at once if a pass took longer)."""
        next_pass = trio.current_time() + self.config.gateway.reconcile_interval
        while True:
            await trio.sleep_until(next_pass)
            g = self.config.gateway  # a reload may change them
            started = trio.current_time()
            await fleet.reconcile(concurrency=g.status_concurrency, spread=g.reconcile_interval)
            next_pass = started + g.reconcile_interval

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled or until `Running.shutdown` is set."""
        if self.config.gateway.relay_tuning:
            internals.apply_relay_tuning()
        logsetup.quiet_libraries()  # httpx's per-request INFO lines (URLs with their secrets) off
        before, after = fdlimit.raise_soft_limit()  # descriptors are the budget every connection draws on
        self._fd_limit = after
        self.metrics.fd_limit.set(after)
        log.info("open-file limit=%d (soft limit was %d) max_unauthenticated=%d", after, before,
                 self.config.limits.max_unauthenticated if self.config.limits else 0)
        private.makedirs(self.config.gateway.state_dir)  # 0700; `fleetgate check` checked it can be created
        widened = private.restrict_dir(self.config.gateway.state_dir)  # ... and one that exists: 0700 too
        if widened is not None:
            log.warning("state dir %s was mode %04o; made it 0700 (the gateway's alone)",
                        self.config.gateway.state_dir, widened)
        backends = self._backends = build_backends(self.config)
        async with bridge.open_loop(on_error=lambda kind: self.metrics.loop_errors.labels(kind).inc()):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for b in backends.values():
                    await nursery.start(b.run)
                store = self.store = build_store(self.config, self.metrics)  # [store]: memory or etcd (docs/ha.md)
                await nursery.start(store.run)
                fleet = Fleet(self.config.machines, backends, self.metrics, nursery, store=store)
                await fleet.reconcile(concurrency=self.config.gateway.status_concurrency)
                audit = self._audit = AuditLog(self.config.audit_file, self.metrics)
                gateway = Gateway(self.config, fleet, self.build_router(self.config),
                                  self.metrics, audit)
                gateway.inherited_sockets = self.sockets
                metrics_port = None
                try:
                    await bridge.run_aio(gateway.start)
                    nursery.start_soon(self._reconcile_loop, fleet)
                    nursery.start_soon(self._trim_loop, gateway)
                    await nursery.start(Reaper(fleet).run)
                    if self.config.gateway.admin_socket is not None:
                        await nursery.start(partial(http.serve_unix, on_refusal=self._http_refused),
                                            str(self.config.gateway.admin_socket), AdminAPI(fleet))
                    if self.config.metrics.listen is not None:
                        hp = self.config.metrics.listen
                        metrics_port = await nursery.start(partial(http.serve, on_refusal=self._http_refused,
                                                                   limits=http.Limits(
                                                                       share_for=1.0,
                                                                       max_per_source=self.config.metrics
                                                                       .max_connections_per_source,
                                                                       health_reserve=self.config.metrics
                                                                       .health_reserve)),
                                                           hp.host, hp.port, self._http)
                    passthrough_ports = await nursery.start(passthrough.serve, self.config, fleet, self.metrics)
                    running = self._running = Running(gateway, fleet, self.metrics, gateway.ports, metrics_port,
                                                     passthrough_ports=passthrough_ports)
                    task_status.started(running)
                    await running.shutdown.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await bridge.run_aio(gateway.close)
                        if self.stop_machines_on_exit:
                            with trio.move_on_after(30):
                                await fleet.stop_all()
                        for b in {*backends.values(), *self._backends.values()}:
                            await b.aclose()
                        for w in [*self._old_webhooks, *([self._webhooks] if self._webhooks else [])]:
                            await w.aclose()
                        audit.close()
                    nursery.cancel_scope.cancel()
