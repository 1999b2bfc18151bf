"""A tiny trio-native HTTP server for /metrics, /healthz, /readyz and the admin API.

prometheus-client's own server runs in a thread; this one is a task of the main
nursery like everything else, so it starts and stops with the gateway. Requests are
bounded in size and time; bodies are not read (the admin API takes query parameters).
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import trio

from . import unixsock

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"

Response = tuple[int, str, bytes]
Handler = Callable[[str, str, dict[str, list[str]]], Awaitable[Response]]
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           500: "Internal Server Error", 503: "Service Unavailable"}


def _response(status: int, ctype: str, body: bytes, head: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode() + (b"" if head else body)


async def _handle(stream: trio.abc.Stream, handler: Handler) -> None:
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
        url = urlsplit(target)
        try:
            status, ctype, body = await handler(method, url.path, parse_qs(url.query))
        except Exception:
            log.exception("http handler failed method=%s path=%s", method, url.path)
            status, ctype, body = 500, "text/plain", b"internal error\n"
        out = _response(status, ctype, body, method == "HEAD")
    try:
        await stream.send_all(out)
    except (trio.BrokenResourceError, OSError):
        pass


async def _serve(listeners: list, handler: Handler) -> None:
    async def one(stream: trio.abc.Stream) -> None:
        async with stream:
            await _handle(stream, handler)

    await trio.serve_listeners(one, listeners)


async def serve(host: str, port: int, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve TCP until cancelled; task_status.started() gets the bound port (for port 0)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("http listening address=%s:%s", host, bound)
    task_status.started(bound)
    await _serve(listeners, handler)


async def serve_unix(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on a unix socket only its owner can use (mode 0600): the admin API."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = trio.socket.from_stdlib_socket(unixsock.bind_listening(path, backlog=64, mode=0o600))
    log.info("admin api listening socket=%s", path)
    task_status.started(path)
    try:
        await _serve([trio.SocketListener(sock)], handler)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
