"""A tiny trio-native HTTP server for /metrics, /healthz and /readyz.

prometheus-client's own server runs in a thread; this one is a task of the main
nursery like everything else, so it starts and stops with the gateway. Requests are
bounded in size and time, and only GET/HEAD of three paths is understood.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"

Handler = Callable[[str, str], tuple[int, str, bytes]]


def _response(status: int, ctype: str, body: bytes, head: bool) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}
    lines = [f"HTTP/1.1 {status} {reason.get(status, 'Error')}", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + (b"" if head else body)


async def _handle(stream: trio.SocketStream, handler: Handler) -> None:
    buf = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST:
            try:
                chunk = await stream.receive_some(4096)
            except (trio.BrokenResourceError, OSError):
                return
            if not chunk:
                break
            buf += chunk
    try:
        method, target, _ = buf.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
    except (ValueError, UnicodeDecodeError):
        out = _response(400, "text/plain", b"bad request\n", False)
    else:
        if method not in ("GET", "HEAD"):
            out = _response(405, "text/plain", b"only GET\n", False)
        else:
            status, ctype, body = handler(method, target.split("?", 1)[0])
            out = _response(status, ctype, body, method == "HEAD")
    try:
        await stream.send_all(out)
    except (trio.BrokenResourceError, OSError):
        pass


async def serve(host: str, port: int, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; task_status.started() gets the bound port (for port 0)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics listening address=%s:%s", host, bound)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            await _handle(stream, handler)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, one, listeners)
        task_status.started(bound)
