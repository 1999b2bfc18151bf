"""The SSH front: asyncssh server, authentication, routing, waking, and channel dispatch.

Authenticate, then wake: asyncssh asks the server's validate_public_key() for the
client's unsigned key query and again before checking the signature, so anyone who
knows alice's public key could trigger it. We therefore hook the connection's own
validate_public_key(), let asyncssh verify the signature, and only then route, wake the
machine and connect upstream, all before answering USERAUTH_SUCCESS. Holding the answer
is what lets us show progress as SSH auth banners, which OpenSSH prints on stderr and
which never mix with the data of scp, sftp or rsync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import asyncssh
import trio_asyncio

from ..fleet import Lease, WakeError
from ..routing import RoutingError, Target, split_login
from . import internals
from . import upstream as upstream_mod
from .relay import Pipe, SessionRelay

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


class FrontConnection(asyncssh.SSHServer):
    """One user's connection to the gateway."""

    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.login = ""
        self.target: Target | None = None
        self.target_machine = ""
        self.upstream: asyncssh.SSHClientConnection | None = None
        self._lease: Lease | None = None
        self._closed = False
        self._authorized = False
        self._t0 = time.monotonic()
        self._jump_only = True
        self._pipes: set[Pipe] = set()
        self._leases: set[Lease] = set()
        self.sessions: set[SessionRelay] = set()
        self.bytes_up = 0
        self.bytes_down = 0
        self.ip = "?"
        self._admitted = False
        self._auth_failures = 0
        self._closed_counted = False  # the connection's outcome went into fleetgate_connections_total

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ip = peer[0] if peer else "?"
        if not self.gateway.limiter.admit(self.ip, conn):
            conn.abort()
            return
        self._admitted = True
        self.gateway.grace.start(self)
        async def verified(username: str, msg: bytes, ok: bool) -> bool:
            if not ok:
                self._failed_attempt("publickey")
                return False
            if msg:  # the signature over the session id has been verified
                self.gateway.limiter.authenticated(self.ip, conn)
                await self._after_auth(username)
            return True

        internals.hook_verified_publickey(conn, lambda username: split_login(username)[0], verified)
        self.gateway.add_connection(self)

    def _failed_attempt(self, method: str) -> None:
        self.gateway.metrics.auth_failures.labels(method).inc()
        self._auth_failures += 1
        if self._auth_failures >= self.gateway.config.limits.max_auth_tries:
            self.gateway.limiter.refuse(self.ip, "max_auth_tries")
            raise asyncssh.PermissionDenied("fleetgate: too many authentication failures")

    def grace_expired(self) -> None:
        """Called by the gateway's GraceClock when login_grace passed without authentication."""
        if not self._authorized and self.conn is not None:
            self.gateway.limiter.refuse(self.ip, "preauth_timeout")
            self._count("preauth_timeout")
            self.conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._admitted:
            self.gateway.limiter.closed(self.ip, self.conn, failed_auth=self._auth_failures > 0)
        self.gateway.grace.stop(self)
        self.gateway.remove_connection(self)
        for pipe in list(self._pipes):
            pipe.abort()
        if self.upstream is not None:
            self.upstream.close()
        for lease in list(self._leases):
            lease.release()
        self._leases.clear()
        if self._lease is not None:
            self._lease.release()
        if self._authorized:
            seconds = time.monotonic() - self._t0
            self.gateway.metrics.session_duration.observe(seconds)
            log.info("connection closed user=%s machine=%s peer=%s seconds=%.1f",
                     self.target.user if self.target else "?", self.target_machine, self.peer, seconds)
            self._audit("session_end", mode="relay", bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                        seconds=round(seconds, 3), result="error" if exc else "closed")
        elif not self._closed_counted:
            self._count("auth_failed" if self._auth_failures else "closed_preauth")

    def _audit(self, event: str, **fields: Any) -> None:
        self.gateway.audit.write(event, user=self.target.user if self.target else split_login(self.login)[0],
                                 login=self.login, machine=fields.pop("machine", self.target_machine),
                                 source=self.peer, **fields)

    def _count(self, result: str) -> None:
        self._closed_counted = True
        self.gateway.metrics.connections.labels(result).inc()

    # -- authentication -------------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Same work for unknown users and wrong keys: one set lookup either way.
        return key.public_data in self.gateway.user_keys.get(username, self.gateway.no_keys)

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh then checks the certificate's validity period and that `username`
        # (the base user, without +target) is one of its principals.
        return username in self.gateway.config.users and key.public_data in self.gateway.ca_keys

    def _banner(self, line: str) -> None:
        if self.conn is not None and not self._closed and not self._authorized:
            self.conn.send_auth_banner(line + "\n")

    def _refuse(self, result: str, message: str) -> None:
        """Tell the (authenticated) user why, then disconnect."""
        self._count(result)
        self._audit("session_refused", mode="relay", result=result, reason=message)
        self._banner(message)
        raise asyncssh.ServiceNotAvailable(message)

    async def _after_auth(self, login: str, password: str | None = None) -> bool:
        """Route, wake and connect upstream, before USERAUTH_SUCCESS is sent.

        With a password (passthrough), the machine's sshd is the judge: a refusal there
        returns False, a failed password attempt like any other."""
        gw = self.gateway
        self.gateway.grace.stop(self)
        self.login = login
        user, want = split_login(login)
        try:
            target = await trio_asyncio.trio_as_aio(gw.router.route)(user, want)
        except RoutingError as exc:
            log.info("routing refused user=%s target=%s peer=%s", user, want, self.peer)
            self._refuse("routing_refused", str(exc))
        self.target = target
        self.target_machine = target.machine
        machine = gw.config.machines[target.machine]
        for attempt in (1, 2):
            try:
                lease = await trio_asyncio.trio_as_aio(gw.fleet.acquire)(target.machine, self._banner)
            except WakeError as exc:
                log.info("wake refused user=%s machine=%s reason=%s peer=%s", user, target.machine, exc.reason, self.peer)
                self._refuse("wake_failed", exc.message)
            if self._closed:
                lease.release()
                return False
            self._lease = lease
            address = gw.fleet.machines[target.machine].address
            assert address is not None
            try:
                self.upstream = await upstream_mod.connect(machine, address, target.upstream_user, gw.config.gateway,
                                                           login=target.user, ca=gw.upstream_ca, password=password)
            except upstream_mod.UpstreamError as exc:
                lease.release()
                self._lease = None
                if password is not None and exc.reason == "upstream_auth":
                    log.info("password refused by machine user=%s machine=%s peer=%s", user, target.machine, self.peer)
                    return False
                gw.metrics.upstream_failures.labels(exc.reason).inc()
                if exc.reason == "upstream_error" and attempt == 1:
                    # The machine may have died since we last saw it: ask, and wake it again if so.
                    await trio_asyncio.trio_as_aio(gw.fleet.machine_lost)(target.machine)
                    continue
                log.warning("upstream failed user=%s machine=%s reason=%s detail=%s",
                            user, target.machine, exc.reason, exc.message)
                self._refuse("upstream_failed", exc.message)
            break
        if self._closed:
            self.upstream.close()
            return False
        self._authorized = True
        self._count("authenticated")
        self._audit("session_start", mode="relay", method="password" if password is not None else "publickey")
        log.info("connection authenticated user=%s machine=%s peer=%s", user, target.machine, self.peer)
        return True

    def password_auth_supported(self) -> bool:
        return self.gateway.password_machines

    async def validate_password(self, username: str, password: str) -> bool:
        """Opt-in password passthrough: only the machine's own sshd can check the password,
        so the machine is woken before the user is known — rate-limited per source and user."""
        gw = self.gateway
        user, want = split_login(username)
        try:
            target = await trio_asyncio.trio_as_aio(gw.router.route)(user, want)
        except RoutingError:
            target = None
        if target is None or not gw.config.machines[target.machine].password_passthrough:
            self._failed_attempt("password")
            return False
        now = time.monotonic()
        if not gw.password_sources.allow(self.ip, now) or not gw.password_users.allow(user, now):
            gw.limiter.refuse(self.ip, "password_rate")
            self._failed_attempt("password")
            return False
        gw.limiter.authenticated(self.ip, self.conn)  # waking: the grace timer no longer applies
        if await self._after_auth(username, password=password):
            return True
        self._failed_attempt("password")
        return False

    # -- channels -------------------------------------------------------------------------

    def _hold(self) -> None:
        """A non-jump channel: the connection's lease must hold its machine (again, after a jump)."""
        self._jump_only = False
        if self._lease is None and not self._closed:
            self._lease = self.gateway.fleet.try_acquire(self.target_machine)

    def session_requested(self) -> Any:
        self._hold()
        gw = self.gateway.config.gateway
        chan = self.conn.create_server_channel(encoding=None, window=gw.window, max_pktsize=gw.max_packet)
        relay = SessionRelay(self)
        self.sessions.add(relay)
        return chan, relay

    def notify(self, text: str) -> None:
        """Tell this user something (shutdown): on each session's stderr, or as a banner before auth."""
        if not self._authorized:
            self._banner(text)
            return
        for relay in list(self.sessions):
            relay.notice(text)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        gw = self.gateway
        assert self.target is not None
        if dest_host in gw.config.machines:
            if dest_port != 22 or not gw.router.may_reach(self.target.user, dest_host):
                log.info("jump refused user=%s dest=%s:%s", self.target.user, dest_host, dest_port)
                gw.metrics.channels.labels("jump", "refused").inc()
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                                f"fleetgate: {self.target.user} may not jump to {dest_host}:{dest_port}")
            return self._jump(dest_host)
        policy = gw.config.gateway.forwarding
        if policy == "none" or (policy == "local" and dest_host.lower() not in LOOPBACK_NAMES):
            gw.metrics.channels.labels("forward", "refused").inc()
            log.info("forward refused user=%s dest=%s:%s policy=%s", self.target.user, dest_host, dest_port, policy)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"fleetgate: forwarding to {dest_host}:{dest_port} is not allowed; jump targets are machine names")
        self._hold()
        return self._local_forward(dest_host, dest_port, orig_host, orig_port)

    def _new_pipe(self, mode: str) -> Pipe:
        def done(pipe: Pipe) -> None:
            self._pipes.discard(pipe)
            self.count_bytes(mode, pipe.bytes)

        pipe = Pipe(mode, done)
        self._pipes.add(pipe)
        return pipe

    async def _jump(self, machine: str) -> Any:
        """Splice the channel to the machine's SSH port: the inner session stays end to end."""
        gw = self.gateway
        if self._jump_only and self._lease is not None:
            # A pure jump connection should not keep the login's default machine awake.
            self._lease.release()
            self._lease = None
        try:
            lease = await trio_asyncio.trio_as_aio(gw.fleet.acquire)(machine, None)
        except WakeError as exc:
            gw.metrics.channels.labels("jump", "wake_failed").inc()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
        address = gw.fleet.machines[machine].address
        assert address is not None
        pipe = self._new_pipe("jump")
        try:
            await asyncio.get_running_loop().create_connection(lambda: pipe.machine, address.host, address.port)
        except OSError as exc:
            lease.release()
            self._pipes.discard(pipe)
            gw.metrics.channels.labels("jump", "connect_failed").inc()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                            f"fleetgate: cannot reach {machine}: {exc.strerror}") from None
        if self._closed:
            lease.release()
            pipe.abort()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "connection closed")
        self._leases.add(lease)
        original_done = pipe._on_done
        t0 = time.monotonic()
        self._audit("session_start", mode="jump", machine=machine)

        def done(p: Pipe) -> None:
            original_done(p)
            self._leases.discard(lease)
            lease.release()
            self._audit("session_end", mode="jump", machine=machine, bytes_up=p.bytes.up, bytes_down=p.bytes.down,
                        seconds=round(time.monotonic() - t0, 3), result="closed")

        pipe._on_done = done
        gw.metrics.channels.labels("jump", "ok").inc()
        log.info("jump user=%s machine=%s peer=%s", self.target.user if self.target else "?", machine, self.peer)
        return pipe.user

    async def _local_forward(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        """-L: open the same direct-tcpip on the machine, so its sshd decides and connects."""
        gw = self.gateway
        pipe = self._new_pipe("forward")
        g = gw.config.gateway
        try:
            await self.upstream.create_connection(lambda: pipe.machine, dest_host, dest_port, orig_host, orig_port,
                                                  window=g.window, max_pktsize=g.max_packet)
        except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
            self._pipes.discard(pipe)
            gw.metrics.channels.labels("forward", "refused").inc()
            reason = getattr(exc, "reason", str(exc))
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"{self.target_machine}: {reason}") from None
        gw.metrics.channels.labels("forward", "ok").inc()
        return pipe.user

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """-R: ask the machine to listen; its connections come back to the user as forwarded-tcpip."""
        if self.gateway.config.gateway.forwarding == "none":
            return False
        self._hold()
        return self._remote_forward(listen_host, listen_port)

    async def _remote_forward(self, listen_host: str, listen_port: int) -> Any:
        g = self.gateway.config.gateway
        assert self.upstream is not None and self.conn is not None
        actual: dict[str, int] = {}

        async def on_connection(orig_host: str, orig_port: int) -> Any:
            pipe = self._new_pipe("forward")
            try:
                await self.conn.create_connection(lambda: pipe.user, listen_host, actual["port"], orig_host, orig_port,
                                                  window=g.window, max_pktsize=g.max_packet)
            except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
                self._pipes.discard(pipe)
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
            return pipe.machine

        try:
            listener = await self.upstream.create_server(on_connection, listen_host, listen_port,
                                                         window=g.window, max_pktsize=g.max_packet)
        except (asyncssh.ChannelListenError, asyncssh.Error, OSError) as exc:
            log.info("remote forward refused machine=%s listen=%s:%s error=%s", self.target_machine, listen_host,
                     listen_port, exc)
            return False
        actual["port"] = listener.get_port() or listen_port
        self.gateway.metrics.channels.labels("remote_forward", "ok").inc()
        return listener

    def count_bytes(self, mode: str, counted: Any) -> None:
        if mode != "jump":  # a jump channel is its own audited session
            self.bytes_up += counted.up
            self.bytes_down += counted.down
        m = self.gateway.metrics
        if counted.up:
            m.relayed_bytes.labels("up", mode).inc(counted.up)
        if counted.down:
            m.relayed_bytes.labels("down", mode).inc(counted.down)
