"""What happens between "alice proved who she is" and "alice has a session": plain trio.

route → hold the machine (waking it if needed) → log in upstream → on a dead machine,
once: tell the fleet and try again. The result is a `Session` or a `Refused` with the
outcome label for `fleetgate_connections_total` and the sentence for the user.

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
    target: Target
    lease: Lease
    upstream: Any


async def log_in(login: str, *, router: Router, fleet: Fleet, connect: Connect,
                 progress: Progress | None = None, password: str | None = None,
                 still_wanted: Callable[[], bool] = lambda: True,
                 upstream_failed: Callable[[str], None] = lambda reason: None,
                 info: LoginInfo | None = None,
                 connected: Callable[[float], None] = lambda seconds: None,
                 ready: Callable[[bool, float], None] = lambda woke, seconds: None) -> Session:
    """Route, wake and connect upstream for an authenticated `login` (`alice` or `alice+box2`).

    With a password (opt-in passthrough) the machine's sshd is the judge of it, so its
    refusal is `password_rejected`, a failed attempt like any other, not an error.
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
    woke = False
    for attempt in (1, 2):
        woke = woke or getattr(fleet.machines[target.machine].state, "value", None) != "running"
        try:
            lease = await fleet.acquire(target.machine, progress)
        except WakeError as exc:
            log.info("wake refused user=%s machine=%s reason=%s", user, target.machine, exc.reason)
            raise Refused("wake_failed", exc.message) from None
        if not still_wanted():
            lease.release()
            raise Refused("gone", "fleetgate: the client left")
        address = fleet.machines[target.machine].address
        t_connect = trio.current_time()
        try:
            upstream = await connect(target, address, password)
        except BaseException as exc:
            lease.release()  # cancelled (the client sent another request, or left) or refused
            if not isinstance(exc, UpstreamError):
                raise
            if password is not None and exc.reason == "upstream_auth":
                log.info("password refused by machine user=%s machine=%s", user, target.machine)
                raise Refused("password_rejected", exc.message) from None
            upstream_failed(exc.reason)
            if exc.reason == "upstream_error" and attempt == 1:
                # The machine may have died since we last saw it: ask, and wake it again if so.
                await fleet.machine_lost(target.machine)
                continue
            log.warning("upstream failed user=%s machine=%s reason=%s detail=%s",
                        user, target.machine, exc.reason, exc.message)
            raise Refused("upstream_failed", exc.message) from None
        now = trio.current_time()
        connected(now - t_connect)
        ready(woke, now - t0)
        return Session(target, lease, upstream)
    raise AssertionError("unreachable")  # pragma: no cover
