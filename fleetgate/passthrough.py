"""Opt-in passthrough: a raw TCP port per machine that wakes it on connect and splices to its sshd.

This is the seed's systemd on-demand behaviour, kept for clients that cannot go through
the SSH front (it never terminates SSH, so the session stays end to end between the
client and the machine's own sshd, host key and all). The price, said plainly: it wakes
the machine *before* anyone has authenticated, since fleetgate never sees who connects.
So it is off unless a machine sets `passthrough_listen`, and every source address (an
IPv6 source by its /64) gets a token bucket of `[passthrough] per_source_per_minute`
connections; a refused connection is closed before it can wake anything.

A connection holds a Fleet lease for as long as it is open, so the idle reaper sees it
as a session, exactly like a login through the front.

The bytes move between the two sockets in the kernel (`fleetgate/splice.py`: splice(2)
through a pipe), since the gateway only ever sees ciphertext here; the copy through Python
remains the fallback (and `FLEETGATE_PASSTHROUGH_COPY=1` selects it, for comparison).
"""

from __future__ import annotations

import ipaddress
import logging
from functools import partial
from typing import TYPE_CHECKING

import trio

from . import splice as _splice
from . import transport
from .fleet import WakeError

if TYPE_CHECKING:
    from .config import Config
    from .fleet import Fleet
    from .metrics import Metrics

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
MAX_SOURCES = 10_000
REFUSAL_REASONS = ("rate_limited", "wake_failed", "connect_failed")


class RateLimiter:
    """A token bucket per source: `per_minute` connections at once, refilled evenly over a minute."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}

    @staticmethod
    def source_key(ip: str) -> str:
        """An IPv6 client controls its whole /64, so that is one source."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
        return str(addr)

    def allow(self, ip: str, now: float) -> bool:
        key = self.source_key(ip)
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > MAX_SOURCES:
            self._forget_full(now)
        return allowed

    def _forget_full(self, now: float) -> None:
        """Sources whose bucket has refilled carry no state worth keeping."""
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.capacity:
                del self._buckets[key]


async def serve(config: "Config", fleet: "Fleet", metrics: "Metrics", *,
                task_status: trio.TaskStatus[dict[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on every machine's passthrough_listen; task_status gets {machine: bound port}."""
    wanted = {name: mc.passthrough_listen for name, mc in config.machines.items() if mc.passthrough_listen}
    if not wanted:
        task_status.started({})
        return
    for direction in ("up", "down"):
        metrics.relayed_bytes.labels(direction, "passthrough")
    limiter = RateLimiter(config.passthrough.per_source_per_minute)
    how = _splice.zero_copy_available()[1]
    ports: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for name, hp in wanted.items():
            listeners = await trio.open_tcp_listeners(hp.port, host=hp.host)
            ports[name] = listeners[0].socket.getsockname()[1]
            log.warning("passthrough listening machine=%s address=%s:%d (wakes before authentication; "
                        "per-source limit %d/min; bytes relayed by %s)", name, hp.host, ports[name],
                        config.passthrough.per_source_per_minute, how)
            nursery.start_soon(trio.serve_listeners, partial(_connection, name, fleet, metrics, limiter), listeners)
        task_status.started(ports)


async def _connection(name: str, fleet: "Fleet", metrics: "Metrics", limiter: RateLimiter,
                      stream: trio.SocketStream) -> None:
    """One client: refuse, or wake, connect and splice; never let an error reach the listener."""
    async with stream:
        try:
            await _serve_one(name, fleet, metrics, limiter, stream)
        except Exception:
            log.exception("passthrough connection failed machine=%s", name)


async def _refuse(stream: trio.SocketStream, metrics: "Metrics", reason: str, line: str) -> None:
    """Count the refusal and say why in a line that SSH clients skip (RFC 4253 allows it before the banner)."""
    metrics.passthrough_refusals.labels(reason).inc()
    with trio.move_on_after(1):
        try:
            await stream.send_all(f"fleetgate: {line}\r\n".encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _serve_one(name: str, fleet: "Fleet", metrics: "Metrics", limiter: RateLimiter,
                     stream: trio.SocketStream) -> None:
    peer = stream.socket.getpeername()[0]
    if not limiter.allow(peer, trio.current_time()):
        log.info("passthrough refused machine=%s peer=%s reason=rate_limited", name, peer)
        await _refuse(stream, metrics, "rate_limited", "too many connections from your address; try again later")
        return
    log.info("passthrough connection machine=%s peer=%s", name, peer)
    try:
        lease = await fleet.acquire(name, cause="passthrough")
    except WakeError as exc:
        # The peer is not authenticated: it gets no detail, the log does.
        log.info("passthrough refused machine=%s peer=%s reason=wake_failed detail=%s", name, peer, exc.message)
        await _refuse(stream, metrics, "wake_failed", f"{name} could not be started")
        return
    try:
        address = fleet.machines[name].address
        assert address is not None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await transport.open_trio_stream(address)   # TCP or VSOCK
        except (OSError, trio.TooSlowError) as exc:
            log.warning("passthrough refused machine=%s peer=%s reason=connect_failed address=%s error=%s",
                        name, peer, address, exc)
            await _refuse(stream, metrics, "connect_failed", f"{name} cannot be reached")
            lease.release()
            await fleet.machine_lost(name)  # it may have died; the next connection wakes it again
            return
        async with upstream:
            up, down = await splice(stream, upstream)
        metrics.relayed_bytes.labels("up", "passthrough").inc(up)
        metrics.relayed_bytes.labels("down", "passthrough").inc(down)
        log.info("passthrough closed machine=%s peer=%s up=%d down=%d", name, peer, up, down)
    finally:
        lease.release()


async def splice(a: trio.SocketStream, b: trio.SocketStream, *, zero_copy: bool | None = None) -> tuple[int, int]:
    """Relay bytes both ways until both sides are done; returns (a→b, b→a) byte counts.

    An EOF is passed on as a half-close, so a client that shuts down its sending side still
    gets the rest of the answer; a broken side ends both directions. Zero-copy (splice(2))
    where available, else the copy through Python: see fleetgate/splice.py.
    """
    return await _splice.relay(a, b, zero_copy=zero_copy)
