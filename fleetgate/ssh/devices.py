"""Devices that dial in: a device's reverse tunnel (`ssh -R NAME:22:localhost:22`) at the front.

A device (an IoT or edge box behind NAT, seed 003) logs in as `device:NAME` with its own key,
in a namespace apart from users: it may only ask for a `-R` of its own name; it gets no shell,
no exec, no other forwarding. When it does, this module listens on a loopback port of the
gateway and splices each connection to it into a forwarded-tcpip channel through the device's
connection, i.e. to the device's sshd. The device backend (backends/device.py, plain trio) is
told the port, and from then on the device is a machine like any other: the readiness probe,
the upstream login, relays and jumps all connect to 127.0.0.1:PORT.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncssh

from . import bridge
from .pipe import Pipe

log = logging.getLogger(__name__)

DEVICE_PREFIX = "device:"


def device_name(login: str) -> str | None:
    """'device:box1' → 'box1'; None for a user login."""
    return login[len(DEVICE_PREFIX):] if login.startswith(DEVICE_PREFIX) else None


class DeviceTunnel:
    """The device's `-R` as asyncssh sees it (an SSHListener: get_port, close, wait_closed)."""

    def __init__(self, conn: asyncssh.SSHServerConnection, name: str, backend: Any, listen_host: str,
                 listen_port: int, window: int, max_packet: int):
        self.conn = conn
        self.name = name
        self.backend = backend
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.window = window
        self.max_packet = max_packet
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.pipes: set[Pipe] = set()
        self._closed = asyncio.Event()

    async def open(self) -> "DeviceTunnel":
        self.server = await asyncio.get_running_loop().create_server(self._accepted, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        bridge.call_trio_sync(self.backend.tunnel_up, self.name, self.port, self.conn.close)
        log.info("device tunnel up machine=%s port=%d", self.name, self.port)
        return self

    def _accepted(self) -> asyncio.Protocol:
        """A connection to the loopback port: open a channel through the tunnel for it."""
        pipe = Pipe("device", lambda p: self.pipes.discard(p))
        self.pipes.add(pipe)

        async def connect() -> None:
            try:
                await self.conn.create_connection(lambda: pipe.user, self.listen_host, self.listen_port,
                                                  "127.0.0.1", self.port, window=self.window,
                                                  max_pktsize=self.max_packet)
            except (asyncssh.Error, OSError) as exc:
                log.info("device tunnel channel refused machine=%s error=%s", self.name, exc)
                pipe.abort()

        asyncio.get_running_loop().create_task(connect())
        return pipe.machine

    def get_port(self) -> int:
        return self.listen_port

    def close(self) -> None:
        """The device left or is told to go: stop listening, cut what runs through the tunnel."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self.server is not None:
            self.server.close()
        for pipe in list(self.pipes):
            pipe.abort()
        bridge.call_trio_sync(self.backend.tunnel_down, self.name, self.port)
        log.info("device tunnel down machine=%s port=%d", self.name, self.port)

    async def wait_closed(self) -> None:
        await self._closed.wait()
