"""Opening a byte stream to a machine's SSH server: TCP or AF_VSOCK.

A VSOCK address is a guest's context id (CID) and a port: the host reaches the guest's
sshd through the hypervisor's virtio-vsock device, so the guest needs no network at all
(libvirt: `<vsock model='virtio'><cid auto='no' address='42'/></vsock>`; the guest runs
`socat VSOCK-LISTEN:22,fork TCP:127.0.0.1:22` or a systemd >= 256 ssh generator).

A NETNS address is TCP host:port inside another network namespace (the process backend
runs each machine in its own, with only a loopback): the socket is created inside that
namespace and connected from the gateway, so no route, veth or port joins the two.

Everything that connects to a machine goes through here, so the kinds of address stay in
one place:

- `open_stream(address)` (trio) returns a connected, non-blocking `socket.socket`. That is
  what asyncssh.connect(sock=...) and asyncio's loop.create_connection(sock=...) accept.
- `open_trio_stream(address)` wraps it as a trio.SocketStream (readiness probe, passthrough).

Failures are OSError (a timeout is TimeoutError, itself an OSError), so callers keep one
`except OSError`. No socket is left open on any failure or cancellation.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from .backends.base import NETNS, TCP, VSOCK, Address

CONNECT_TIMEOUT = 10.0
VMADDR_CID_HOST = 2   # CIDs 0-2 are the hypervisor and the host; a guest has 3 or more
VHOST_VSOCK = "/dev/vhost-vsock"


def vsock_supported() -> tuple[bool, str]:
    """Whether this host can reach guests over VSOCK, and why not if it cannot."""
    if not hasattr(socket, "AF_VSOCK"):
        return False, "this Python has no socket.AF_VSOCK (Linux only)"
    if not os.path.exists(VHOST_VSOCK):
        return False, (f"{VHOST_VSOCK} does not exist: the host kernel has no vhost_vsock module loaded "
                       "(modprobe vhost_vsock), so no guest here can have a virtio-vsock device")
    return True, "ok"


def _vsock_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError(errno.EAFNOSUPPORT, "AF_VSOCK is not supported on this platform")
    return socket.socket(family, socket.SOCK_STREAM)


async def _connect_nonblocking(sock: socket.socket, sockaddr: tuple) -> None:
    """connect() without blocking the trio thread: EINPROGRESS, wait writable, read SO_ERROR."""
    sock.setblocking(False)
    try:
        sock.connect(sockaddr)
        return
    except (BlockingIOError, InterruptedError):
        pass
    await trio.lowlevel.wait_writable(sock)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def _open_vsock(address: Address) -> socket.socket:
    cid = address.cid
    if cid <= VMADDR_CID_HOST:
        raise OSError(errno.EINVAL, f"VSOCK CID {cid} is not a guest (guests have CID 3 or more)")
    sock = _vsock_socket()
    try:
        await _connect_nonblocking(sock, (cid, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_tcp(address: Address) -> socket.socket:
    stream = await trio.open_tcp_stream(address.host, address.port)
    try:
        fd = stream.socket.detach()
    except BaseException:
        await stream.aclose()
        raise
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


CLONE_NEWNET = 0x40000000
_libc = None
_own_netns: int | None = None


def _setns(fd: int) -> None:
    """setns(2) for a network namespace (os.setns exists only from Python 3.12)."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _socket_in_netns(path: str) -> socket.socket:
    """A TCP socket that belongs to the network namespace at `path`.

    A socket keeps the namespace it was created in, so the calling thread enters the
    namespace only for the socket() call and returns at once (a network namespace is per
    thread; nothing else runs in this thread meanwhile). Needs CAP_SYS_ADMIN (root)."""
    global _own_netns
    if _own_netns is None:
        _own_netns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)   # OSError (ENOENT) when the machine is gone
    try:
        if os.fstat(fd).st_ino == os.fstat(_own_netns).st_ino:
            # The machine's process exists but has not entered its namespace yet: connecting
            # now would reach the gateway's own loopback. Not ready; the caller retries.
            raise OSError(errno.EAGAIN, f"{path} is still the gateway's own network namespace")
        _setns(fd)
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            try:
                _setns(_own_netns)
            except OSError:  # pragma: no cover - cannot happen with an fd we opened ourselves
                os.abort()   # never keep running in a machine's namespace
    finally:
        os.close(fd)
    return sock


async def _open_netns(address: Address) -> socket.socket:
    sock = _socket_in_netns(address.netns)
    try:
        await _connect_nonblocking(sock, (address.host, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_stream(address: Address, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A connected, non-blocking socket to `address` (TCP, VSOCK or TCP in a netns), bounded by `timeout`."""
    if address.kind == VSOCK:
        opener = _open_vsock
    elif address.kind == TCP:
        opener = _open_tcp
    elif address.kind == NETNS:
        opener = _open_netns
    else:
        raise OSError(errno.EAFNOSUPPORT, f"unknown address kind {address.kind!r}")
    with trio.move_on_after(timeout):
        return await opener(address)
    raise TimeoutError(errno.ETIMEDOUT, f"connecting to {address} timed out after {timeout:g} s")


async def open_trio_stream(address: Address, timeout: float = CONNECT_TIMEOUT) -> trio.SocketStream:
    """The same, as a trio stream (for the readiness probe and the passthrough splice)."""
    if address.kind == TCP:
        # trio's own happy-eyeballs connect, exactly as before VSOCK existed.
        with trio.move_on_after(timeout):
            return await trio.open_tcp_stream(address.host, address.port)
        raise TimeoutError(errno.ETIMEDOUT, f"connecting to {address} timed out after {timeout:g} s")
    sock = await open_stream(address, timeout)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
