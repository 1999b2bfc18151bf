"""What happens between "alice proved who she is" and "alice has a session": plain trio.

route → hold the machine (waking it if needed) → log in upstream → on a dead machine,
once: tell the fleet and try again. A lazy login (publickey and certificate logins) stops
after the hold and logs in upstream only when a channel first needs it (connect_upstream):
a jump-only connection (`ssh -J`) then costs the machine's sshd one login, not two.
The result is a `Session` or a `Refused` with the outcome label for
`fleetgate_connections_total` and the sentence for the user.

Why here and not in the SSH front: this is the product's policy, and it is easier to
read, change and test (fake backend, MockClock, no sockets) when it knows nothing of
SSH packets or asyncio. The SSH front calls `log_in()` once per login, through the
bridge, and turns the answer into USERAUTH_SUCCESS or a disconnect with the message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import trio

from .errors import FleetgateError, RoutingError, UpstreamError, WakeError
from .routing import LoginInfo, Router, Target, split_login

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class Refused(FleetgateError):
    """The login ends here. `reason` is the connections_total result: routing_refused,
    wake_failed, upstream_failed, password_rejected (the machine's sshd said no) or
    gone (the client left while we worked)."""


class Lease(Protocol):
    def release(self) -> None: ...


class Fleet(Protocol):
    machines: Any

    async def acquire(self, name: str, progress: Progress | None = None) -> Lease: ...
    async def machine_lost(self, name: str) -> None: ...


# connect(target, address, password) → an open upstream connection, or UpstreamError.
Connect = Callable[[Target, Any, "str | None"], Awaitable[Any]]


@dataclass
class Session:
    """A login's hold on its machine and, once opened, its upstream SSH connection.

    `upstream` is None for a lazy login until something needs it (connect_upstream()):
    a jump (`ssh -J`) only needs the machine's TCP port, so it never makes the machine's
    sshd do a second handshake and an idle login. `woke` and `waited` are kept for the
    time-to-shell metric, observed when the session is ready."""

    target: Target
    lease: Lease | None
    upstream: Any = None
    woke: bool = False     # the machine was not running when the login asked for it
    waited: float = 0.0    # seconds from authentication to the machine held


async def log_in(login: str, *, router: Router, fleet: Fleet, connect: Connect,
                 progress: Progress | None = None, password: str | None = None,
                 still_wanted: Callable[[], bool] = lambda: True,
                 upstream_failed: Callable[[str], None] = lambda reason: None,
                 info: LoginInfo | None = None,
                 connected: Callable[[float], None] = lambda seconds: None,
                 ready: Callable[[bool, float], None] = lambda woke, seconds: None,
                 lazy: bool = False) -> Session:
    """Route, wake and (unless `lazy`) connect upstream for an authenticated `login` (`alice` or `alice+box2`).

    With a password (opt-in passthrough) the machine's sshd is the judge of it, so its
    refusal is `password_rejected`, a failed attempt like any other, not an error; such a
    login is never lazy (the password must be checked before the user is let in).
    `lazy`: stop once the machine is held (awake, its SSH banner seen): the caller opens the
    upstream with connect_upstream() when the first channel needs it, and observes `ready`.
    `still_wanted()` is asked after each wait: a client that left gets nothing held.
    `info` (source address, key) is passed to the router: a webhook router sends it on.
    Timings for the metrics: `connected(seconds)` after each successful upstream login, and
    `ready(woke, seconds)` once, from authentication to the session being ready, with whether
    the machine was not running when we asked for it (a wake was, or was already being, needed).
    """
    t0 = trio.current_time()
    user, want = split_login(login)
    try:
        target = await router.route(user, want, info)
    except RoutingError as exc:
        log.info("routing refused user=%s target=%s", user, want)
        raise Refused("routing_refused", exc.message) from None
    session = Session(target, None)
    await _hold(session, fleet, progress, still_wanted)
    session.waited = trio.current_time() - t0
    if lazy and password is None:
        return session
    await connect_upstream(session, fleet=fleet, connect=connect, progress=progress, password=password,
                           still_wanted=still_wanted, upstream_failed=upstream_failed, connected=connected)
    ready(session.woke, trio.current_time() - t0)
    return session


async def _hold(session: Session, fleet: Fleet, progress: Progress | None, still_wanted: Callable[[], bool]) -> None:
    """Hold the session's machine, waking it if needed (its SSH banner seen when this returns)."""
    name = session.target.machine
    session.woke = session.woke or getattr(fleet.machines[name].state, "value", None) != "running"
    try:
        lease = await fleet.acquire(name, progress)
    except WakeError as exc:
        log.info("wake refused user=%s machine=%s reason=%s", session.target.user, name, exc.reason)
        raise Refused("wake_failed", exc.message) from None
    if not still_wanted():
        lease.release()
        raise Refused("gone", "fleetgate: the client left")
    session.lease = lease


async def connect_upstream(session: Session, *, fleet: Fleet, connect: Connect, progress: Progress | None = None,
                           password: str | None = None, still_wanted: Callable[[], bool] = lambda: True,
                           upstream_failed: Callable[[str], None] = lambda reason: None,
                           connected: Callable[[float], None] = lambda seconds: None) -> Any:
    """Log in to the session's machine (holding it first if the session holds nothing);
    on a dead machine, once: tell the fleet and wake it again. Sets and returns `session.upstream`.

    On any failure (or cancellation) the session's lease is released and set to None, so a
    login that cannot reach its machine never keeps it awake; Refused says why
    (upstream_failed, password_rejected, wake_failed, gone).
    """
    target = session.target
    for attempt in (1, 2):
        if session.lease is None:
            await _hold(session, fleet, progress, still_wanted)
        lease = session.lease
        assert lease is not None
        address = fleet.machines[target.machine].address
        t_connect = trio.current_time()
        try:
            upstream = await connect(target, address, password)
        except BaseException as exc:
            session.lease = None
            lease.release()  # cancelled (the client sent another request, or left) or refused
            if not isinstance(exc, UpstreamError):
                raise
            if password is not None and exc.reason == "upstream_auth":
                log.info("password refused by machine user=%s machine=%s", target.user, target.machine)
                raise Refused("password_rejected", exc.message) from None
            upstream_failed(exc.reason)
            if exc.reason == "upstream_error" and attempt == 1:
                # The machine may have died since we last saw it: ask, and wake it again if so.
                await fleet.machine_lost(target.machine)
                continue
            log.warning("upstream failed user=%s machine=%s reason=%s detail=%s",
                        target.user, target.machine, exc.reason, exc.message)
            raise Refused("upstream_failed", exc.message) from None
        connected(trio.current_time() - t_connect)
        session.upstream = upstream
        return upstream
    raise AssertionError("unreachable")  # pragma: no cover
