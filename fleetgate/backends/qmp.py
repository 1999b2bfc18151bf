"""A minimal QMP (QEMU Machine Protocol) client on a trio unix socket.

QMP is line-delimited JSON: a greeting, `qmp_capabilities`, then one command at a time,
with asynchronous events interleaved. The maintained Python client (qemu.qmp) is built on
asyncio; the backend is plain trio, so the few commands it needs are spoken here.
"""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from .. import unixsock

MAX_LINE = 1 << 20


class QMPError(Exception):
    """QEMU answered with an error, or the socket closed or spoke something else."""


class QMP:
    """One negotiated QMP connection; commands are answered in order, events are kept."""

    def __init__(self, stream: trio.SocketStream):
        self._stream = stream
        self._buf = b""
        self._next_id = 0
        self.greeting: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise QMPError("QMP message too long")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise QMPError(f"QMP connection lost: {exc}") from exc
            if not chunk:
                raise QMPError("QMP connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise QMPError(f"QMP sent something that is not JSON: {line[:80]!r}") from exc
        if not isinstance(msg, dict):
            raise QMPError(f"QMP sent a non-object: {line[:80]!r}")
        return msg

    async def _handshake(self) -> None:
        msg = await self._read()
        if "QMP" not in msg:
            raise QMPError(f"not a QMP greeting: {msg!r:.80}")
        self.greeting = msg["QMP"]
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command and return its `return` value; QMPError on an `error` answer."""
        self._next_id += 1
        req: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            req["arguments"] = arguments
        try:
            await self._stream.send_all(json.dumps(req).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise QMPError(f"QMP connection lost: {exc}") from exc
        while True:
            msg = await self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._next_id:
                continue
            if "error" in msg:
                err = msg["error"]
                raise QMPError(f"QMP {command}: {err.get('class', '?')}: {err.get('desc', '')}")
            return msg.get("return")

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def connect(path: Path) -> AsyncIterator[QMP]:
    """Connect and negotiate; the caller bounds the time (QEMU answers once initialised)."""
    with unixsock.reachable(path) as target:
        try:
            stream = await trio.open_unix_socket(target)
        except OSError as exc:
            raise QMPError(f"cannot connect to QMP socket {path}: {exc.strerror}") from exc
    qmp = QMP(stream)
    try:
        await qmp._handshake()
        yield qmp
    finally:
        with trio.CancelScope(shield=True):
            await qmp.aclose()


def bind_listening(path: Path) -> socket.socket:
    """A listening unix socket to hand to QEMU (-chardev socket,fd=N,server=on).

    Bound by us before QEMU runs, so a connect never races QEMU's start-up: the client
    waits in the backlog until QEMU is ready, and sees EOF if QEMU dies first.
    """
    return unixsock.bind_listening(path, backlog=8)
