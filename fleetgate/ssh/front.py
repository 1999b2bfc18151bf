"""One user's connection to the SSH front: authentication, then channels.

Authenticate, then wake: asyncssh asks SSHServer.validate_public_key() for the client's
unsigned key query too, so anyone who knows alice's public key could trigger it. The
wake hangs off a hook that runs after asyncssh verified the signature
(internals.hook_verified_publickey), and the whole login (route, wake, upstream) is
fleetgate/login.py, plain trio, called once through the bridge. USERAUTH_SUCCESS is
held back meanwhile, which is what lets us show progress as SSH auth banners: OpenSSH
prints them on stderr, where they never mix with the data of scp, sftp or rsync.

The upstream SSH login is lazy for key and certificate logins (upstream_connection()):
the wake finishes before USERAUTH_SUCCESS as before (the machine runs and its sshd
answered), but the gateway logs in to the machine only when a channel first needs it (a
session, -L, -R). A jump (`ssh -J`) needs only the machine's TCP port, so a jump-only
connection costs the machine's sshd one SSH login instead of two. A password login
stays eager: only the machine's sshd can check the password, before the user is let in.
The connection's outcome (fleetgate_connections_total, time-to-shell) is counted when it
is known: the lazy login succeeded or failed, the first jump, or the connection's end.

The callbacks here stay thin: they translate asyncssh's questions into calls on the
login flow, the relays (relay.py, pipe.py) and the forwards (forwards.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncssh

from .. import login as login_mod
from ..budget import FDS_PER_CONNECTION, BudgetExceeded, Hold, HoldGroup
from ..fleet import Lease, State
from ..routing import LoginInfo, RoutingError, split_login
from ..webhook import WebhookError
from . import bridge, devices, forwards, internals
from . import upstream as upstream_mod
from .context import FrontContext
from .pipe import Pipe
from .relay import EXIT_LOST, AnySession, SessionRelay

log = logging.getLogger(__name__)


class FrontConnection(asyncssh.SSHServer):
    """One user's connection to the gateway (asyncssh server callbacks)."""

    def __init__(self, ctx: FrontContext):
        self.ctx = ctx
        self.conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.ip = "?"
        self.login = ""
        self.target: login_mod.Target | None = None
        self.upstream: asyncssh.SSHClientConnection | None = None
        self.lease: Lease | None = None     # the login's hold on its machine (dropped by a pure jump)
        self.holds: set[Lease] = set()      # each jump channel's hold on its machine
        self.pipes: set[Pipe] = set()
        self.sessions: set[SessionRelay] = set()
        self.jump_only = True
        self.write_paused = False  # the user's TCP socket is not taking data (see _transport_paused)
        self.closed = False
        self.authorized = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._t0 = time.monotonic()
        self._admitted = False
        self._auth_failures = 0
        self._counted = False  # the connection's outcome went into fleetgate_connections_total
        self._user: str | None = None  # the user whose per-user connection slot this holds
        self._looked_up_keys: frozenset[bytes] = frozenset()  # from the keys webhook, for this login
        self._key: asyncssh.SSHKey | None = None  # the key (or certificate's CA key) last judged
        self._key_is_cert = False
        self.device: str | None = None  # a device's connection (device:NAME): only its own tunnel
        self.tunnel: devices.DeviceTunnel | None = None
        self._session: login_mod.Session | None = None  # timings of the login, for the lazy upstream
        self._upstream_task: asyncio.Task | None = None  # the lazy upstream login in progress
        self._outcome_pending = False  # authenticated; connections_total waits for the lazy upstream
        # What this connection took from the budgets (fleetgate/budget.py): its own descriptors
        # (_connection_hold) and each channel's; all of it is given back when the connection ends.
        self.budget_holds = HoldGroup()
        self._connection_hold: Hold | None = None

    # -- what relays and forwards read ----------------------------------------------------

    @property
    def machine(self) -> str:
        return self.target.machine if self.target else ""

    @property
    def window(self) -> int:
        return self.ctx.config.gateway.window

    @property
    def max_packet(self) -> int:
        return self.ctx.config.gateway.max_packet

    def spawn(self, coro_fn: Any) -> Any:
        return self.ctx.tasks.spawn(coro_fn)

    def channel_result(self, kind: str, result: str) -> None:
        self.ctx.metrics.channels.labels(kind, result).inc()

    def session_closed(self, relay: SessionRelay) -> None:
        self.sessions.discard(relay)

    def session_ended(self, relay: SessionRelay) -> None:
        self.sessions.discard(relay)
        relay.budget.close()
        self.count_bytes("relay", relay.bytes)

    def ended_reason(self) -> str:
        """Why the machine's side of a session went away, for the user's stderr."""
        m = self.ctx.fleet.machines.get(self.machine)
        if m is not None and getattr(m.backend, "tunnel_lost", lambda name: False)(m.name):
            return f"fleetgate: the tunnel of {self.machine} closed (the device went offline); this session has ended"
        if m is not None and m.state in (State.STOPPING, State.STOPPED):
            return f"fleetgate: {self.machine} was stopped (fleetgate stop --force); this session has ended"
        return f"fleetgate: lost the connection to {self.machine}; the machine stopped answering"

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ip = peer[0] if peer else "?"
        if not self.ctx.limiter.admit(self.ip, conn):
            conn.abort()
            return
        self._admitted = True
        self.ctx.grace.start(self)
        internals.hook_verified_publickey(conn, lambda username: split_login(username)[0], self._key_verified)
        internals.watch_transport(conn, lambda: self._transport_paused(True), lambda: self._transport_paused(False))
        self.ctx.add_connection(self)

    async def _key_verified(self, username: str, msg: bytes, ok: bool) -> bool:
        if not ok:
            self._failed_attempt("publickey")
            return False
        if msg:  # the signature over the session id has been verified
            self.ctx.limiter.authenticated(self.ip, self.conn)
            if devices.device_name(username) is not None:
                return self._device_verified(username)
            return await self._after_auth(username)
        return True

    def _transport_paused(self, paused: bool) -> None:
        """The user's socket is full (or drained): stop (or resume) reading every machine side.

        Resuming one channel can fill the socket again at once (asyncssh hands over what it
        buffered), and then the transport pauses us re-entrantly: the rest stay paused."""
        self.write_paused = paused
        for channel in [*self.sessions, *self.pipes]:
            if self.write_paused != paused:
                return
            channel.transport_paused(paused)

    def _failed_attempt(self, method: str) -> None:
        self.ctx.metrics.auth_failures.labels(method).inc()
        self._auth_failures += 1
        if self._auth_failures >= self.ctx.limiter.config.max_auth_tries:
            self.ctx.limiter.refuse(self.ip, "max_auth_tries")
            raise asyncssh.PermissionDenied("fleetgate: too many authentication failures")

    def grace_expired(self) -> None:
        """Called by the GraceClock when login_grace passed without authentication."""
        if not self.authorized and self.conn is not None:
            self.ctx.limiter.refuse(self.ip, "preauth_timeout")
            self._count("preauth_timeout")
            self.conn.abort()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._admitted:
            self.ctx.limiter.closed(self.ip, self.conn, failed_auth=self._auth_failures > 0)
        self.ctx.grace.stop(self)
        self._give_user_slot()
        self.ctx.remove_connection(self)
        if self._upstream_task is not None:
            self._upstream_task.cancel()  # its trio side lets the lease go (login.connect_upstream)
        for pipe in list(self.pipes):
            pipe.abort()
        if self.tunnel is not None:
            self.tunnel.close()
        bridge.call_trio_sync(self._drop_login)
        for lease in self.holds:
            bridge.call_trio_sync(lease.release)
        self.holds.clear()
        self.budget_holds.close()  # whatever a channel's own end did not give back yet
        if self.authorized:
            self.settle_login("authenticated")  # nothing needed the upstream: the login worked
            seconds = time.monotonic() - self._t0
            self.ctx.metrics.session_duration.observe(seconds)
            log.info("connection closed user=%s machine=%s peer=%s seconds=%.1f",
                     self.target.user if self.target else "?", self.machine, self.peer, seconds)
            self.audit("session_end", mode="relay", bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                       seconds=round(seconds, 3), result="error" if exc else "closed")
        elif not self._counted:
            self._count("auth_failed" if self._auth_failures else "closed_preauth")

    def audit(self, event: str, **fields: Any) -> None:
        self.ctx.audit.write(event, user=self.target.user if self.target else split_login(self.login)[0],
                             login=self.login, machine=fields.pop("machine", self.machine),
                             source=self.peer, **fields)

    def _count(self, result: str) -> None:
        self._counted = True
        self.ctx.metrics.connections.labels(result).inc()

    # -- authentication -------------------------------------------------------------------

    def begin_auth(self, username: str) -> Any:
        """With a keys webhook, look the user's keys up once per login name, before any key
        is judged: asyncssh asks validate_public_key() synchronously, but awaits this."""
        if self.ctx.keys_lookup is None or devices.device_name(username) is not None:
            return True
        return self._look_up_keys(split_login(username)[0])

    async def _look_up_keys(self, user: str) -> bool:
        try:
            self._looked_up_keys = await bridge.run_trio(self.ctx.keys_lookup.keys_for, user)
        except WebhookError as exc:
            # Keys from the config still work; the user reads why theirs may not.
            self._looked_up_keys = frozenset()
            self._banner(exc.message)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Same work for unknown users and wrong keys: one set lookup either way.
        self._key, self._key_is_cert = key, False
        device = devices.device_name(username)
        if device is not None:  # devices: their own keys only, never a user's
            return key.public_data in self.ctx.device_keys.get(device, self.ctx.no_keys)
        return key.public_data in self.ctx.user_keys.get(username, self.ctx.no_keys) \
            or key.public_data in self._looked_up_keys

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh then checks the certificate's validity period and that `username`
        # (the base user, without +target) is one of its principals.
        self._key, self._key_is_cert = key, True
        if devices.device_name(username) is not None:
            return False
        return (username in self.ctx.config.users or self.ctx.open_users) and key.public_data in self.ctx.ca_keys

    def _device_verified(self, login: str) -> bool:
        """A device proved who it is: nothing to route or wake; it may register its tunnel."""
        self.ctx.grace.stop(self)
        self.login = login
        self.device = devices.device_name(login)
        self.authorized = True
        self._count("authenticated")
        log.info("device connected machine=%s peer=%s", self.device, self.peer)
        return True

    def _login_info(self, login: str, password: str | None) -> LoginInfo:
        key = self._key if password is None else None
        return LoginInfo(login=login, source=self.ip, key_type=key.get_algorithm() if key else None,
                         key_fingerprint=key.get_fingerprint("sha256") if key else None,
                         certificate=self._key_is_cert and key is not None)

    def _banner(self, line: str) -> None:
        if self.conn is not None and not self.closed and not self.authorized:
            self.conn.send_auth_banner(line + "\n")

    async def _connect_upstream(self, target: login_mod.Target, address: Any, password: str | None) -> Any:
        ctx = self.ctx
        machine = ctx.config.machines[target.machine]
        return await upstream_mod.connect(machine, address, target.upstream_user, ctx.config.gateway,
                                          login=target.user, ca=ctx.upstream_ca, password=password)

    async def _log_in(self, login: str, password: str | None) -> None:
        """The login flow (plain trio), run from this asyncio callback through the bridge.

        The session is taken here, in the trio task and with no checkpoint after log_in()
        returns: asyncssh cancels an auth callback when the client sends another
        USERAUTH_REQUEST, and a result still crossing the bridge then would be lost, with
        its machine held for ever. What a cancelled earlier attempt left is let go first.
        """
        ctx = self.ctx
        session = await login_mod.log_in(
            login, router=ctx.router, fleet=ctx.fleet, progress=self._banner, password=password,
            connect=lambda target, address, pw: bridge.run_aio(self._connect_upstream, target, address, pw),
            still_wanted=lambda: not self.closed,
            upstream_failed=lambda reason: ctx.metrics.upstream_failures.labels(reason).inc(),
            info=self._login_info(login, password),
            connected=ctx.metrics.upstream_handshake.observe,
            ready=lambda woke, seconds: ctx.metrics.time_to_shell.labels("yes" if woke else "no").observe(seconds),
            lazy=True)
        self._drop_login()
        self._session = session
        self.target, self.lease, self.upstream = session.target, session.lease, session.upstream
        self._outcome_pending = session.upstream is None

    def settle_login(self, result: str, upstream_seconds: float | None = None) -> None:
        """Count the outcome of a lazy login once it is known (see the module doc).

        time-to-shell is the gateway's own work: from authentication to the machine held,
        plus the upstream login when one was needed; the time the client took to ask for its
        first channel is not ours and is not counted."""
        if not self._outcome_pending:
            return
        self._outcome_pending = False
        self._count(result)
        session = self._session
        if result == "authenticated" and session is not None:
            seconds = session.waited + (upstream_seconds or 0.0)
            self.ctx.metrics.time_to_shell.labels("yes" if session.woke else "no").observe(seconds)

    async def upstream_connection(self) -> asyncssh.SSHClientConnection:
        """The upstream login, opened the first time a channel needs it and shared after.

        Concurrent channels (a session and -L opened together) wait for the same login.
        Raises ChannelOpenError with the sentence for the user when it cannot be had."""
        if self.upstream is not None:
            return self.upstream
        if self.closed or self._session is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "fleetgate: no connection to the machine")
        task = self._upstream_task
        if task is None:
            task = self._upstream_task = asyncio.ensure_future(self._open_upstream())
        try:
            message = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this channel's own open was cancelled
            message = "fleetgate: the connection closed"  # the login was cancelled (connection_lost)
        if self.upstream is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, message)
        return self.upstream

    async def _open_upstream(self) -> str:
        """Run the lazy login (trio side); '' when it worked, else the user's sentence."""
        try:
            await bridge.run_trio(self._connect_lazily)
        except login_mod.Refused as refused:
            return refused.message
        finally:
            self._upstream_task = None
        return ""

    async def _connect_lazily(self) -> None:
        """login.connect_upstream for this connection, in trio.

        The login's lease is handed to connect_upstream (which lets it go on failure: a
        connection that cannot reach its machine keeps nothing awake) and taken back, with
        the upstream, in the same step with no checkpoint: connection_lost() either sees both
        or cancels the attempt, so nothing is leaked."""
        ctx = self.ctx
        session = self._session
        assert session is not None
        session.lease, self.lease = self.lease, None
        handshake: list[float] = []

        def connected(seconds: float) -> None:
            handshake.append(seconds)
            ctx.metrics.upstream_handshake.observe(seconds)

        try:
            await login_mod.connect_upstream(
                session, fleet=ctx.fleet,
                connect=lambda target, address, pw: bridge.run_aio(self._connect_upstream, target, address, pw),
                still_wanted=lambda: not self.closed,
                upstream_failed=lambda reason: ctx.metrics.upstream_failures.labels(reason).inc(),
                connected=connected)
        except login_mod.Refused as refused:
            if self.lease is not None:  # a channel's hold() taken meanwhile: nothing to hold it for
                self.lease.release()
                self.lease = None
            if refused.reason != "gone":
                self.settle_login(refused.reason)
                self.audit("session_refused", mode="relay", result=refused.reason, reason=refused.message)
            raise
        if self.closed:
            session.upstream.close()
            session.upstream = None
            if session.lease is not None:
                session.lease.release()
                session.lease = None
            raise login_mod.Refused("gone", "fleetgate: the client left")
        if self.lease is not None:  # a channel held the machine (hold()) while we logged in
            self.lease.release()
        self.lease, self.upstream = session.lease, session.upstream
        session.lease = None
        self.settle_login("authenticated", handshake[-1] if handshake else 0.0)

    def _drop_login(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _take_user_slot(self, login: str) -> None:
        """limits.max_connections_per_user, counted from the first verified request (a login
        in progress holds a slot too, so a burst cannot overshoot), before anything wakes."""
        if self._user is not None:
            return
        user = split_login(login)[0]
        limit = self.ctx.limiter.config.max_connections_per_user
        held = self.ctx.user_connections.get(user, 0)
        if held >= limit:
            log.info("per-user connection limit user=%s connections=%d peer=%s", user, held, self.peer)
            message = f"fleetgate: {user} already has {held} connections open (limit {limit}); close one and retry"
            self._count("user_limit")
            self._banner(message)
            raise asyncssh.ServiceNotAvailable(message)
        try:
            hold = self.ctx.budgets.take(user, fds=FDS_PER_CONNECTION, what="connection", context=f"peer={self.peer}")
        except BudgetExceeded as exc:
            self._count("budget")
            self._banner(exc.message)
            raise asyncssh.ServiceNotAvailable(exc.message) from None
        self._connection_hold = self.budget_holds.add(hold)
        self.ctx.user_connections[user] = held + 1
        self._user = user

    def _give_user_slot(self) -> None:
        if self._connection_hold is not None:
            self._connection_hold.close()
            self._connection_hold = None
        if self._user is not None:
            left = self.ctx.user_connections.get(self._user, 1) - 1
            if left > 0:
                self.ctx.user_connections[self._user] = left
            else:
                self.ctx.user_connections.pop(self._user, None)
            self._user = None

    async def _after_auth(self, login: str, password: str | None = None) -> bool:
        """Route, wake and connect upstream, before USERAUTH_SUCCESS is sent."""
        self.ctx.grace.stop(self)
        self.login = login
        self._take_user_slot(login)
        try:
            await bridge.run_trio(self._log_in, login, password)
        except login_mod.Refused as refused:
            self._give_user_slot()
            if refused.reason in ("password_rejected", "gone"):
                return False
            self._count(refused.reason)
            self.audit("session_refused", mode="relay", result=refused.reason, reason=refused.message)
            self._banner(refused.message)
            raise asyncssh.ServiceNotAvailable(refused.message) from None
        if self.closed:
            bridge.call_trio_sync(self._drop_login)
            self._give_user_slot()
            return False
        self.authorized = True
        if not self._outcome_pending:
            self._count("authenticated")
        self.audit("session_start", mode="relay", method="password" if password is not None else "publickey")
        log.info("connection authenticated user=%s machine=%s peer=%s", self.target.user, self.machine, self.peer)
        return True

    def password_auth_supported(self) -> bool:
        return self.ctx.password_machines

    async def validate_password(self, username: str, password: str) -> bool:
        """Opt-in password passthrough: only the machine's own sshd can check the password,
        so the machine is woken before the user is known — rate-limited per source and user."""
        ctx = self.ctx
        user, want = split_login(username)
        if devices.device_name(username) is not None:
            self._failed_attempt("password")
            return False
        try:
            target = await bridge.run_trio(ctx.router.route, user, want, self._login_info(username, password))
        except RoutingError:
            target = None
        if target is None or not ctx.config.machines[target.machine].password_passthrough:
            self._failed_attempt("password")
            return False
        now = time.monotonic()
        account = f"{target.machine}\0{target.upstream_user}"  # never an IP address: RateLimiter keys it as is
        if (not ctx.password_sources.allow(self.ip, now) or not ctx.password_users.allow(user, now)
                or not ctx.password_accounts.allow(account, now)):
            ctx.limiter.refuse(self.ip, "password_rate")
            self._failed_attempt("password")
            return False
        # Not authenticated until the machine accepts the password: the pre-auth limits
        # still count this connection, and its login grace is only suspended meanwhile.
        deadline = ctx.grace.stop(self)
        if await self._after_auth(username, password=password):
            ctx.limiter.authenticated(self.ip, self.conn)
            return True
        if deadline is not None and not self.closed:
            ctx.grace.resume(self, deadline)
        self._failed_attempt("password")
        return False

    # -- channels -------------------------------------------------------------------------

    def hold(self) -> None:
        """A non-jump channel: the login's lease must hold its machine (again, after a jump)."""
        self.jump_only = False
        if self.lease is None and not self.closed:
            self.lease = bridge.call_trio_sync(self.ctx.fleet.try_acquire, self.machine)

    def admit_channel(self, kind: str, fds: int = 0, full_window: bool = False, both_ways: bool = True,
                      extra: int = 0) -> Hold:
        """sshd's MaxSessions for sessions, a cap on every channel of a connection, then the
        user's and the gateway's budgets (fleetgate/budget.py): the Hold returned carries the
        channel's window (hold.window) and must be closed when the channel ends (the
        connection closes what is left when it ends)."""
        limits = self.ctx.limiter.config
        if kind == "session" and len(self.sessions) >= limits.max_sessions:
            what = f"at most {limits.max_sessions} sessions per connection (limits.max_sessions)"
        elif len(self.sessions) + len(self.pipes) >= limits.max_channels:
            what = f"at most {limits.max_channels} channels per connection (limits.max_channels)"
        else:
            user = self._user or (self.target.user if self.target else self.login)
            try:
                hold = self.ctx.budgets.take_channel(user, want_window=self.window, fds=fds, what=kind,
                                                     floor=self.window if full_window else None,
                                                     both_ways=both_ways, extra=extra, context=f"peer={self.peer}")
            except BudgetExceeded as exc:
                self.ctx.metrics.channels.labels(kind, "budget").inc()
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, exc.message) from None
            return self.budget_holds.add(hold)
        self.ctx.metrics.channels.labels(kind, "limit").inc()
        log.info("channel refused user=%s kind=%s reason=limit peer=%s", self.target.user if self.target else "?",
                 kind, self.peer)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"fleetgate: {what}")

    def _device_refuses(self, what: str) -> None:
        if self.device is not None:
            log.info("device request refused machine=%s what=%s peer=%s", self.device, what, self.peer)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            "fleetgate: a device connection carries only its own tunnel")

    def session_requested(self) -> Any:
        self._device_refuses("session")
        budget = self.admit_channel("session")
        self.hold()
        chan = internals.create_session_channel(self.conn, budget.window, self.max_packet)
        relay = SessionRelay(self, budget)
        if self.write_paused:
            relay.transport_paused(True)
        self.sessions.add(relay)
        if self.upstream is not None:
            return chan, relay
        return chan, self._relay_after_upstream(relay)

    async def _relay_after_upstream(self, relay: SessionRelay) -> asyncssh.SSHServerSession:
        """The channel's confirmation waits for the lazy upstream login (the relay reads
        `upstream` when the session starts); if it fails the session still opens, so that
        the user reads why on stderr and gets exit status 255, as for a lost machine."""
        try:
            await self.upstream_connection()
        except asyncssh.ChannelOpenError as exc:
            self.sessions.discard(relay)
            relay.budget.close()
            self.channel_result("session", "connect_failed")
            return _RefusedSession(exc.reason)
        return relay

    def notify(self, text: str) -> None:
        """Tell this user something (shutdown): on each session's stderr, or as a banner before auth."""
        if not self.authorized:
            self._banner(text)
            return
        for relay in list(self.sessions):
            relay.notice(text)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        self._device_refuses("direct-tcpip")
        return forwards.direct_tcpip(self, dest_host, dest_port, orig_host, orig_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if self.device is not None:
            return self._device_tunnel(listen_host, listen_port)
        return forwards.remote_forward(self, listen_host, listen_port)

    def _device_tunnel(self, listen_host: str, listen_port: int) -> Any:
        """A device's `-R NAME:22:...`: only its own name, port 22, one at a time."""
        if listen_host != self.device.lower() or listen_port != 22 or self.tunnel is not None:
            log.info("device tunnel refused machine=%s listen=%s:%s", self.device, listen_host, listen_port)
            return False
        backend = self.ctx.fleet.machines[self.device].backend
        self.tunnel = devices.DeviceTunnel(self.conn, self.device, backend, listen_host, listen_port,
                                           self.window, self.max_packet)
        return self.tunnel.open()

    def count_bytes(self, mode: str, counted: Any) -> None:
        """Add what a channel relayed since it was last counted (counted: relay.Bytes)."""
        up, down = counted.take()
        if mode != "jump":  # a jump channel is its own audited session
            self.bytes_up += up
            self.bytes_down += down
        m = self.ctx.metrics
        if up:
            m.relayed_bytes.labels("up", mode).inc(up)
        if down:
            m.relayed_bytes.labels("down", mode).inc(down)

    def flush_bytes(self) -> None:
        """Count what every open channel relayed so far (before a /metrics scrape)."""
        for relay in list(self.sessions):
            self.count_bytes("relay", relay.bytes)
        for pipe in list(self.pipes):
            self.count_bytes(pipe.mode, pipe.bytes)


class _RefusedSession(AnySession):
    """A session whose machine could not be logged in to: it says why on stderr, exits 255.

    OpenSSH reports a session channel that fails to open only as "channel 0: open failed",
    and some clients (scp, sftp, IDEs) hide that; stderr and exit 255 is how OpenSSH
    reports a lost connection, so every client shows the sentence."""

    def __init__(self, message: str):
        self._message = message
        self._chan: asyncssh.SSHServerChannel | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._chan = chan

    def session_started(self) -> None:
        assert self._chan is not None
        self._chan.write_stderr((self._message + "\r\n").encode())
        self._chan.exit(EXIT_LOST)
