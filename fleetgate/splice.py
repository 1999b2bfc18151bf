"""Relaying bytes between two sockets both ways, zero-copy where the kernel can (passthrough).

The passthrough port never terminates SSH, so all it does is move ciphertext from one
socket to the other. Copying that through Python (receive 256 KiB, send it) costs a
recv and a send of every byte, a bytes object per chunk and a trip through trio per
chunk: measured at 1.0-1.4 CPU-s per GiB and 70 % of a direct scp downwards. Linux can
move the bytes without them ever reaching user space: `splice(2)` from the source socket
into a pipe and from the pipe into the destination socket (the pipe holds references to
the socket buffers' pages), as systemd-socket-proxyd does. Python does only the
bookkeeping, so a GiB costs a few thousand system calls instead of a copy.

Shape of one direction (`_splice_one`): fill the pipe from the source as far as it goes
without blocking, drain it into the destination as far as that goes, and only when
neither moved a byte wait, with trio, on the one thing that can unblock it: the
destination being writable if the pipe still holds bytes, else the source being
readable. Waiting for one thing at a time never spins (a socket can be readable while the
pipe is full) and keeps at most one pipe of bytes (1 MiB) in flight per direction; TCP's
own window pushes back on the sender beyond that. A direction that moved bytes yields to
trio once per round (a checkpoint), so the other direction, other connections and
cancellation are never starved by a fast pair of sockets.

What the copy did and this keeps:
- an EOF is passed on as a half-close (`send_eof`, i.e. shutdown(SHUT_WR)) once every byte
  before it is delivered, while the other direction keeps flowing;
- a broken side (reset, EPIPE, a closed stream) ends both directions quietly: the peer is
  gone, and a direction waiting for it to speak would otherwise hold the machine's lease
  for ever;
- the byte counts are bytes delivered to the destination;
- cancellation (the gateway shutting down) interrupts any wait; the pipes are closed.

Where `os.splice` does not exist (not Linux, Python < 3.10), or the environment sets
`FLEETGATE_PASSTHROUGH_COPY=1` (the benchmark measures both in one run), the copy is
used. If the kernel refuses to splice a given socket (EINVAL and kin: a socket family
without splice support), that direction falls back to the copy, after delivering what
the pipe already holds.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

import trio

CHUNK = 256 * 1024          # the copy's receive size
PIPE_SIZE = 1024 * 1024     # F_SETPIPE_SZ; the default 64 KiB pipe caps each splice at 16 pages
COPY_ENV = "FLEETGATE_PASSTHROUGH_COPY"
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# The kernel cannot splice this file pair: the copy can still move the bytes.
_UNSPLICEABLE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
# Errors of a broken connection: they end the relay, quietly, like the copy's.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def zero_copy_available() -> tuple[bool, str]:
    """Whether `relay` splices by default here, and why not when it does not (for logs and docs)."""
    if os.environ.get(COPY_ENV, "") not in ("", "0"):
        return False, f"{COPY_ENV} is set: copying through Python"
    if not sys.platform.startswith("linux") or not hasattr(os, "splice"):
        return False, "os.splice needs Linux and Python 3.10 or later: copying through Python"
    return True, "splice(2) through a pipe"


async def relay(a: trio.SocketStream, b: trio.SocketStream, *, zero_copy: bool | None = None) -> tuple[int, int]:
    """Move bytes both ways until both directions are done; returns (a→b, b→a) bytes delivered.

    `zero_copy` None decides by `zero_copy_available()`; False forces the copy (the
    fallback, kept selectable so tests and the benchmark can compare the two).
    """
    if zero_copy is None:
        zero_copy = zero_copy_available()[0]
    counts = [0, 0]
    one = _splice_one if zero_copy else _copy_one

    async def direction(src: trio.SocketStream, dst: trio.SocketStream, i: int, cancel: trio.CancelScope) -> None:
        def delivered(n: int) -> None:
            counts[i] += n
        try:
            await one(src, dst, delivered)
        except _BROKEN:
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(direction, a, b, 0, nursery.cancel_scope)
        nursery.start_soon(direction, b, a, 1, nursery.cancel_scope)
    return counts[0], counts[1]


async def _copy_one(src: trio.SocketStream, dst: trio.SocketStream, delivered: Callable[[int], None],
                    pending: bytes = b"") -> None:
    """One direction through Python: receive a chunk, send it; EOF becomes a half-close."""
    if pending:
        await dst.send_all(pending)
        delivered(len(pending))
    while data := await src.receive_some(CHUNK):
        await dst.send_all(data)
        delivered(len(data))
    await dst.send_eof()


def _open_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe (read end, write end, capacity), enlarged to PIPE_SIZE where allowed.

    F_SETPIPE_SZ can be refused (an unprivileged user past fs.pipe-user-pages-soft or
    asking above fs.pipe-max-size): the pipe then keeps its size, which is slower, not wrong.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    import fcntl

    size = 65536
    try:
        size = fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        try:
            size = fcntl.fcntl(w, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        except OSError:
            pass
    return r, w, size


async def _splice_one(src: trio.SocketStream, dst: trio.SocketStream, delivered: Callable[[int], None]) -> None:
    """One direction, socket → pipe → socket in the kernel; see the module docstring for the loop's shape."""
    rfd, wfd, size = _open_pipe()
    try:
        s, d = src.socket, dst.socket
        in_pipe = 0     # bytes spliced in and not yet out
        eof = False
        while True:
            src_empty = dst_full = False
            if not eof and in_pipe < size:
                want = size - in_pipe
                try:
                    n = os.splice(s.fileno(), wfd, want, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    src_empty = True    # or the pipe has no free slot; either way drain first
                else:
                    if n == 0:
                        eof = True
                    else:
                        in_pipe += n
                        src_empty = n < want   # most likely all there was: no second try for EAGAIN
            if in_pipe:
                try:
                    n = os.splice(rfd, d.fileno(), in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    dst_full = True
                else:
                    in_pipe -= n
                    delivered(n)
                    dst_full = in_pipe > 0
            if eof and not in_pipe:
                await dst.send_eof()
                return
            # Wait for the one thing that can unblock this direction (each wait is a checkpoint);
            # a guess that the source was empty costs at most one wake-up that moves nothing.
            if dst_full:
                await trio.lowlevel.wait_writable(d)
            elif src_empty:
                await trio.lowlevel.wait_readable(s)
            else:
                await trio.lowlevel.checkpoint()   # a full pipe moved: more may be queued
    except OSError as exc:
        if exc.errno not in _UNSPLICEABLE:
            raise
        # This socket pair cannot be spliced: hand what the pipe holds to the copy, which goes on.
        held = bytearray()
        while chunk := _read_nonblocking(rfd):
            held += chunk
        os.close(rfd)
        os.close(wfd)
        rfd = wfd = -1
        if eof:
            if held:
                await dst.send_all(bytes(held))
                delivered(len(held))
            await dst.send_eof()
            return
        await _copy_one(src, dst, delivered, bytes(held))
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)


def _read_nonblocking(fd: int) -> bytes:
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return b""
