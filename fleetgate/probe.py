"""Readiness: a machine is ready when its own SSH server sends its banner.

Not "the API says running", not "the port accepts": a NAT or QEMU hostfwd accepts TCP
long before the guest's sshd answers. The connect timeout is kept apart from the poll
interval so a black-holed address cannot stretch the cadence, and the caller bounds the
whole wait (the machine's boot_timeout).
"""

from __future__ import annotations

import random

import trio

from . import transport
from .backends.base import Address

POLL_MIN = 0.1
POLL_MAX = 0.25
CONNECT_TIMEOUT = 1.0
BANNER_TIMEOUT = 2.0


async def read_banner(address: Address) -> bytes | None:
    """One attempt: the server's SSH banner line if it sends one, else None."""
    stream = None
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            stream = await transport.open_trio_stream(address, CONNECT_TIMEOUT)   # TCP or VSOCK
        except OSError:
            return None
    if stream is None:
        return None
    async with stream:
        buf = b""
        with trio.move_on_after(BANNER_TIMEOUT):
            while len(buf) < 8192:
                try:
                    chunk = await stream.receive_some(1024)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return None
                if not chunk:
                    return None
                buf += chunk
                *lines, _partial = buf.split(b"\n")
                # RFC 4253 lets a server send other lines before its banner.
                for line in lines:
                    if line.startswith(b"SSH-"):
                        return line.rstrip(b"\r")
    return None


async def wait_for_banner(address: Address) -> bytes:
    """Poll until the SSH banner answers; the caller's cancel scope bounds the wait."""
    while True:
        banner = await read_banner(address)
        if banner is not None:
            return banner
        await trio.sleep(random.uniform(POLL_MIN, POLL_MAX))
