"""TCP channels: jumps to machines (`-J`/`-W machine:22`), `-L` and `-R`.

The gateway never connects to an address a user picks: a jump goes to a machine's SSH
port (by machine name, so `ssh -J gw alice@box2` stays end to end encrypted), and `-L`
is opened by the machine's own sshd (policy `local`: only to its loopback), so the
machine's sshd decides what its user may reach, as it would without the gateway.

A jump needs only a TCP connection to the machine's sshd, never the gateway's own
upstream login; -L and -R go through that login, opened on first need
(owner.upstream_connection(), see front.py), and a failure to log in reaches the user as
the channel's open failure (-L) or a refused forward (-R, logged with the reason).

The user's side of a jump or -L channel gets the gateway's window and packet size
(gateway.window, gateway.max_packet), as session channels do, not asyncssh's defaults.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import asyncssh

from .. import transport
from ..budget import FDS_PER_JUMP, JUMP_READ
from ..errors import WakeError
from . import bridge, internals
from .pipe import Pipe

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


class Owner(Protocol):
    """The front connection a channel belongs to (FrontConnection)."""

    ctx: Any
    conn: Any
    upstream: Any
    target: Any
    lease: Any
    holds: set
    pipes: set
    jump_only: bool
    closed: bool
    write_paused: bool
    peer: str
    machine: str
    window: int
    max_packet: int

    def hold(self) -> None: ...
    def settle_login(self, result: str, upstream_seconds: float | None = None) -> None: ...
    async def upstream_connection(self) -> Any: ...
    def admit_channel(self, kind: str, fds: int = 0, full_window: bool = False, both_ways: bool = True,
                      extra: int = 0) -> Any: ...
    def audit(self, event: str, **fields: Any) -> None: ...
    def count_bytes(self, mode: str, counted: Any) -> None: ...


def _add(owner: Owner, pipe: Pipe) -> Pipe:
    owner.pipes.add(pipe)
    if owner.write_paused:
        pipe.transport_paused(True)
    return pipe


def _user_channel(owner: Owner, budget: Any) -> Any:
    """The user's side of a direct-tcpip channel, with the window its budget allowed
    (gateway.window when there is room) and the gateway's packet size."""
    return owner.conn.create_tcp_channel(window=budget.window, max_pktsize=owner.max_packet)


def _new_pipe(owner: Owner, mode: str, budget: Any) -> Pipe:
    def done(pipe: Pipe) -> None:
        owner.pipes.discard(pipe)
        owner.count_bytes(mode, pipe.bytes)

    return _add(owner, Pipe(mode, done, budget=budget))


def direct_tcpip(owner: Owner, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
    """A direct-tcpip request: a jump when `dest_host` names a machine, else an `-L` forward."""
    ctx = owner.ctx
    user = owner.target.user
    jump = dest_host in ctx.config.machines
    # A jump's socket to the machine is one more descriptor (budget.FDS_PER_JUMP), and its
    # window is granted one way only (the machine's side is that socket).
    budget = owner.admit_channel("jump", fds=FDS_PER_JUMP, both_ways=False, extra=JUMP_READ) if jump \
        else owner.admit_channel("forward")
    if jump:
        if dest_port != 22 or not ctx.router.may_reach(user, dest_host):
            budget.close()
            log.info("jump refused user=%s dest=%s:%s", user, dest_host, dest_port)
            ctx.metrics.channels.labels("jump", "refused").inc()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                            f"fleetgate: {user} may not jump to {dest_host}:{dest_port}")
        return _user_channel(owner, budget), _closing_on_failure(budget, _jump(owner, dest_host, budget))
    policy = ctx.config.gateway.forwarding
    if policy == "none" or (policy == "local" and dest_host.lower() not in LOOPBACK_NAMES):
        budget.close()
        ctx.metrics.channels.labels("forward", "refused").inc()
        log.info("forward refused user=%s dest=%s:%s policy=%s", user, dest_host, dest_port, policy)
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
            f"fleetgate: forwarding to {dest_host}:{dest_port} is not allowed; jump targets are machine names")
    owner.hold()
    return _user_channel(owner, budget), _closing_on_failure(
        budget, _local_forward(owner, dest_host, dest_port, orig_host, orig_port, budget))


async def _closing_on_failure(budget: Any, opening: Any) -> Any:
    """Await a channel's opening; if it fails (or is cancelled), give its budget back at once."""
    try:
        return await opening
    except BaseException:
        budget.close()
        raise


async def _jump(owner: Owner, machine: str, budget: Any) -> Any:
    """Splice the channel to the machine's SSH port: the inner session stays end to end."""
    ctx = owner.ctx
    owner.settle_login("authenticated")  # a jump needs no upstream login: this one worked
    if owner.jump_only and owner.lease is not None:
        # A pure jump connection should not keep the login's default machine awake.
        bridge.call_trio_sync(owner.lease.release)
        owner.lease = None
    try:
        lease = await bridge.run_trio(ctx.fleet.acquire, machine, None)
    except WakeError as exc:
        ctx.metrics.channels.labels("jump", "wake_failed").inc()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
    address = ctx.fleet.machines[machine].address
    assert address is not None
    t0 = time.monotonic()

    def done(p: Pipe) -> None:
        owner.pipes.discard(p)
        owner.count_bytes("jump", p.bytes)
        owner.holds.discard(lease)
        bridge.call_trio_sync(lease.release)
        owner.audit("session_end", mode="jump", machine=machine, bytes_up=p.bytes.up, bytes_down=p.bytes.down,
                    seconds=round(time.monotonic() - t0, 3), result="closed")

    pipe = _add(owner, Pipe("jump", done, batch_machine=True, budget=budget))
    try:
        sock = await bridge.run_trio(transport.open_stream, address)  # TCP or VSOCK, bounded
        await asyncio.get_running_loop().create_connection(lambda: pipe.machine, sock=sock)
    except OSError as exc:
        bridge.call_trio_sync(lease.release)
        owner.pipes.discard(pipe)
        ctx.metrics.channels.labels("jump", "connect_failed").inc()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED,
                                        f"fleetgate: cannot reach {machine}: {exc.strerror}") from None
    if owner.closed:
        pipe.on_done = lambda p: None
        bridge.call_trio_sync(lease.release)
        pipe.abort()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "connection closed")
    owner.holds.add(lease)
    owner.audit("session_start", mode="jump", machine=machine)
    ctx.metrics.channels.labels("jump", "ok").inc()
    log.info("jump user=%s machine=%s peer=%s", owner.target.user if owner.target else "?", machine, owner.peer)
    return pipe.user


async def _local_forward(owner: Owner, dest_host: str, dest_port: int, orig_host: str, orig_port: int,
                         budget: Any) -> Any:
    """-L: open the same direct-tcpip on the machine, so its sshd decides and connects."""
    ctx = owner.ctx
    try:
        upstream = await owner.upstream_connection()
    except asyncssh.ChannelOpenError:
        ctx.metrics.channels.labels("forward", "connect_failed").inc()
        raise
    pipe = _new_pipe(owner, "forward", budget)
    try:
        await upstream.create_connection(lambda: pipe.machine, dest_host, dest_port, orig_host, orig_port,
                                         window=budget.window, max_pktsize=owner.max_packet)
    except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
        owner.pipes.discard(pipe)
        ctx.metrics.channels.labels("forward", "refused").inc()
        reason = getattr(exc, "reason", str(exc))
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"{owner.machine}: {reason}") from None
    ctx.metrics.channels.labels("forward", "ok").inc()
    return pipe.user


def remote_forward(owner: Owner, listen_host: str, listen_port: int) -> Any:
    """-R: ask the machine to listen; its connections come back to the user as forwarded-tcpip."""
    if owner.ctx.config.gateway.forwarding == "none":
        return False
    owner.hold()
    return _remote_forward(owner, listen_host, listen_port)


async def _remote_forward(owner: Owner, listen_host: str, listen_port: int) -> Any:
    assert owner.conn is not None
    actual: dict[str, int] = {}
    try:
        upstream = await owner.upstream_connection()
    except asyncssh.ChannelOpenError as exc:
        # A global request carries no message: the reason goes to the log (and the metrics).
        log.info("remote forward refused machine=%s listen=%s:%s error=%s", owner.machine, listen_host,
                 listen_port, exc.reason)
        return False

    async def on_connection(orig_host: str, orig_port: int) -> Any:
        # The machine's side of the channel has the listener's window (owner.window): the
        # budget must hold that much, not a smaller window.
        budget = owner.admit_channel("remote_forward", full_window=True)
        pipe = _new_pipe(owner, "forward", budget)
        try:
            await owner.conn.create_connection(lambda: pipe.user, listen_host, actual.get("port", listen_port),
                                               orig_host, orig_port,
                                               window=budget.window, max_pktsize=owner.max_packet)
        except BaseException as exc:
            budget.close()
            owner.pipes.discard(pipe)
            if isinstance(exc, (asyncssh.ChannelOpenError, asyncssh.Error, OSError)):
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, str(exc)) from None
            raise
        return pipe.machine

    try:
        listener = await internals.create_remote_listener(upstream, on_connection, listen_host, listen_port,
                                                          owner.window, owner.max_packet)
    except (asyncssh.ChannelListenError, asyncssh.Error, OSError) as exc:
        log.info("remote forward refused machine=%s listen=%s:%s error=%s", owner.machine, listen_host,
                 listen_port, exc)
        return False
    actual["port"] = listener.get_port() or listen_port
    owner.ctx.metrics.channels.labels("remote_forward", "ok").inc()
    return listener
