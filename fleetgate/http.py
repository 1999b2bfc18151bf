"""A small trio-native HTTP server for /metrics, /healthz, /readyz and the admin API.

prometheus-client's own server runs in a thread; this one is a task of the main
nursery like everything else, so it starts and stops with the gateway. The protocol is
h11's (a maintained, sans-I/O HTTP/1.1 implementation, the one httpx uses); this module
owns only the I/O and the bounds, because a metrics port is reachable by whoever can
reach the host:

- at most `max_connections` at once (default: a share of the descriptor budget,
  fleetgate/fdlimit.py) and `max_per_source` from one address (an IPv6 /64 is one address):
  more are closed at once and counted, never queued;
- the last `health_reserve` of those slots serve only `/healthz` and `/readyz` (anything else
  gets 503), and when every slot is taken the oldest connection still sending its request is
  closed for the newcomer: a slowloris from many addresses cannot keep a container's
  HEALTHCHECK or a load balancer from the answer, which needs only a request sent at once;
- the request must arrive within `read_timeout` and be at most MAX_REQUEST bytes;
- the answer must be taken within `write_timeout`: a client that never reads cannot pin
  a descriptor;
- accept() failing for lack of descriptors pauses that listener briefly, counted, never fatal;
- with `share_for` (the metrics port), while other connections are open a 200 answer for
  the same path is reused for that long: a /metrics exposition costs ~5 ms of CPU (~15 ms
  with 10 000 machines, rendered in slices: Metrics.exposition_async), so 1,000 scrapes at
  once would otherwise take the event loop from SSH logins for seconds. A lone scraper
  always gets a fresh one.

Bodies are not read (the admin API takes query parameters); every answer closes the
connection. Handlers keep one shape: `handler(method, path, query) -> (status, type, body)`.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from . import fdlimit, unixsock

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0   # the whole request, from accept
WRITE_TIMEOUT = 10.0    # the whole answer
ACCEPT_RETRY = 0.1
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
REFUSAL_LOG_EVERY = 60.0
HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
EVICT_AFTER = 1.0  # a connection still sending its request after this long may be closed for a newcomer
REFUSAL_REASONS = ("connection_cap", "read_timeout", "write_timeout", "bad_request", "accept_descriptors",
                   "per_source", "evicted", "health_reserve")

Response = tuple[int, str, bytes]
Handler = Callable[[str, str, dict[str, list[str]]], Awaitable[Response]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           500: "Internal Server Error", 503: "Service Unavailable"}
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
               b"Connection: close\r\n\r\nbad request\n")


@dataclass
class Limits:
    max_connections: int = 0   # 0: fdlimit.default_http_connections()
    read_timeout: float = REQUEST_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    share_for: float = 0.0     # seconds a 200 answer is reused while other connections are open
    # Connections at once from one address (TCP only; 0: no cap). A Prometheus pair, a load
    # balancer and a container's HEALTHCHECK each hold one or two.
    max_per_source: int = 0
    # Of max_connections, the slots only /healthz and /readyz may use (0: none).
    health_reserve: int = 0


def source_of(stream: trio.abc.Stream) -> str | None:
    """The peer's address as one source (an IPv6 /64 is one), None for a unix socket."""
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else None
    except OSError:
        return None
    if not isinstance(peer, tuple):
        return None
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return str(peer[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class _Conn:
    __slots__ = ("source", "reserved", "reading", "since")

    def __init__(self, source: str | None, reserved: bool):
        self.source = source
        self.since = trio.current_time()
        self.reserved = reserved          # in a health_reserve slot: /healthz and /readyz only
        self.reading: trio.CancelScope | None = None  # set while the request is being read


class _Server:
    def __init__(self, handler: Handler, limits: Limits | None, on_refusal: Callable[[str], None] | None):
        self.handler = handler
        self.limits = limits or Limits()
        self.max_connections = self.limits.max_connections or fdlimit.default_http_connections()
        self.health_reserve = min(self.limits.health_reserve, self.max_connections - 1)
        self.on_refusal = on_refusal
        self.active = 0
        self._per_source: dict[str, int] = {}
        self._reading: dict[_Conn, None] = {}  # connections still reading their request, oldest first
        self._logged: dict[str, float] = {}
        self._shared: dict[str, tuple[float, str, bytes]] = {}  # path -> (when, type, body); 200 answers only

    def refuse(self, reason: str, source: str | None = None) -> None:
        if self.on_refusal is not None:
            self.on_refusal(reason)
        now = time.monotonic()
        if now - self._logged.get(reason, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
            self._logged[reason] = now
            log.warning("http connection refused reason=%s source=%s active=%d max_connections=%d sources=%d "
                        "(logged once a minute per reason; counted in fleetgate_http_refusals_total)", reason,
                        source or "-", self.active, self.max_connections, len(self._per_source))

    async def serve(self, listeners: list) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.abc.Listener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    self.refuse("accept_descriptors")
                    await trio.sleep(ACCEPT_RETRY)  # as trio.serve_listeners does: let descriptors free up
                    continue
                conn = self._admit(stream)
                if conn is None:
                    await trio.aclose_forcefully(stream)
                    continue
                nursery.start_soon(self._one, stream, conn)

    def _admit(self, stream: trio.abc.Stream) -> _Conn | None:
        """A slot for a new connection, or None (refused and counted)."""
        source = source_of(stream)
        cap = self.limits.max_per_source
        if source is not None and cap and self._per_source.get(source, 0) >= cap:
            self.refuse("per_source", source)
            return None
        general = self.max_connections - self.health_reserve
        reserved = False
        if self.active >= general:
            if self.active >= self.max_connections and not self._evict_oldest_reader():
                self.refuse("connection_cap", source)
                return None
            reserved = self.health_reserve > 0
        conn = _Conn(source, reserved)
        self.active += 1
        if source is not None:
            self._per_source[source] = self._per_source.get(source, 0) + 1
        return conn

    def _evict_oldest_reader(self) -> bool:
        """Every slot is taken: close a connection that has been sending its request for at least
        EVICT_AFTER seconds (a health probe sends its request at once; a slowloris never finishes
        one), the oldest of the address holding the most connections."""
        now = trio.current_time()
        oldest: dict[str | None, _Conn] = {}
        for conn in self._reading:  # oldest first
            if now - conn.since < EVICT_AFTER:
                break
            if conn.reading is not None and not conn.reading.cancel_called and conn.source not in oldest:
                oldest[conn.source] = conn
        if not oldest:
            return False
        victim = max(oldest.values(), key=lambda c: self._per_source.get(c.source, 0) if c.source else 0)
        victim.reading.cancel()
        self.refuse("evicted", victim.source)
        return True

    async def _one(self, stream: trio.abc.Stream, conn: _Conn) -> None:
        try:
            async with stream:
                await self._handle(stream, conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._reading.pop(conn, None)
            self.active -= 1
            if conn.source is not None:
                left = self._per_source.get(conn.source, 1) - 1
                if left > 0:
                    self._per_source[conn.source] = left
                else:
                    self._per_source.pop(conn.source, None)

    async def _read_request(self, stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None | bytes:
        """The request, None if the client went away, BAD_REQUEST if it spoke no HTTP."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return BAD_REQUEST
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(4096)
                except (trio.BrokenResourceError, OSError):
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None  # ConnectionClosed (or PAUSED before a request: cannot happen)

    async def _handle(self, stream: trio.abc.Stream, slot: _Conn) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
        with trio.move_on_after(self.limits.read_timeout) as reading:
            slot.reading = reading
            self._reading[slot] = None
            request = await self._read_request(stream, conn)
        self._reading.pop(slot, None)
        slot.reading = None
        if reading.cancelled_caught:
            if trio.current_time() < reading.deadline:
                return  # evicted for a newcomer (counted there)
            self.refuse("read_timeout")
            return
        if request is None:
            return
        if isinstance(request, bytes):
            self.refuse("bad_request")
            out = request
        elif slot.reserved and urlsplit(request.target.decode("ascii", errors="replace")).path not in HEALTH_PATHS:
            self.refuse("health_reserve", slot.source)
            out = self._busy(conn)
        else:
            out = await self._answer(conn, request)
        with trio.move_on_after(self.limits.write_timeout) as writing:
            await stream.send_all(out)
        if writing.cancelled_caught:
            self.refuse("write_timeout")

    def _busy(self, conn: h11.Connection) -> bytes:
        """503 for a request that came in on a slot kept for health checks."""
        body = b"busy: this slot is kept for /healthz and /readyz\n"
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), ("Connection", "close"),
                   ("Retry-After", "1")]
        return (conn.send(h11.Response(status_code=503, headers=headers, reason=b"Service Unavailable"))
                + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))

    async def _answer(self, conn: h11.Connection, request: h11.Request) -> bytes:
        method = request.method.decode("ascii", errors="replace")
        url = urlsplit(request.target.decode("ascii", errors="replace"))
        now = trio.current_time()
        shared = self._shared.get(url.path) if method in ("GET", "HEAD") and self.active > 1 else None
        if shared is not None and now - shared[0] < self.limits.share_for:
            status, ctype, body = 200, shared[1], shared[2]
        else:
            try:
                status, ctype, body = await self.handler(method, url.path, parse_qs(url.query))
            except Exception:
                log.exception("http handler failed method=%s path=%s", method, url.path)
                status, ctype, body = 500, "text/plain", b"internal error\n"
            if self.limits.share_for and status == 200 and method in ("GET", "HEAD"):
                self._shared[url.path] = (trio.current_time(), ctype, body)
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")]
        out = conn.send(h11.Response(status_code=status, headers=headers,
                                     reason=REASONS.get(status, "Error").encode()))
        if method != "HEAD" and body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        return out


async def serve(host: str, port: int, handler: Handler, *, limits: Limits | None = None,
                on_refusal: Callable[[str], None] | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve TCP until cancelled; task_status.started() gets the bound port (for port 0)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    server = _Server(handler, limits, on_refusal)
    log.info("http max_connections=%d max_per_source=%d health_reserve=%d read_timeout=%gs write_timeout=%gs",
             server.max_connections, server.limits.max_per_source, server.health_reserve,
             server.limits.read_timeout, server.limits.write_timeout)
    log.info("http listening address=%s:%s", host, bound)
    task_status.started(bound)
    await server.serve(listeners)


async def serve_unix(path: str, handler: Handler, *, limits: Limits | None = None,
                     on_refusal: Callable[[str], None] | None = None,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on a unix socket only its owner can use (mode 0600): the admin API."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    sock = trio.socket.from_stdlib_socket(unixsock.bind_listening(path, backlog=64, mode=0o600))
    log.info("admin api listening socket=%s", path)
    task_status.started(path)
    try:
        await _Server(handler, limits, on_refusal).serve([trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
