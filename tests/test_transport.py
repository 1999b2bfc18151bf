"""The VSOCK transport (fleetgate/transport.py), down to the socket calls.

No host here has vhost-vsock, so `socket.socket` is replaced by a recorder: each test
checks the exact calls (family, sockaddr, non-blocking connect, SO_ERROR) and that no
socket is left open on failure. The real thing runs in tests/test_backend_libvirt.py
wherever /dev/vhost-vsock exists.
"""

from __future__ import annotations

import errno
import socket
from types import MappingProxyType

import pytest
import trio
import trio_asyncio

from fleetgate import probe, transport
from fleetgate.backends.base import TCP, VSOCK, Address
from fleetgate.config import GatewayConfig, MachineConfig
from fleetgate.ssh import upstream

FAKE_AF_VSOCK = 40  # Linux's value; used when this Python lacks the constant


class FakeSocket:
    """Records what transport does with a socket; connect behaves as told."""

    def __init__(self, family: int, type_: int, *, so_error: int = 0, immediate: bool = False,
                 peer: socket.socket | None = None, hang: bool = False):
        self.family, self.type = family, type_
        self.calls: list[tuple] = []
        self.so_error = so_error
        self.immediate = immediate
        self.closed = False
        self.peer = peer  # a real socketpair end, to let trio read and write through it

    def setblocking(self, flag: bool) -> None:
        self.calls.append(("setblocking", flag))

    def connect(self, sockaddr: tuple) -> None:
        self.calls.append(("connect", sockaddr))
        if not self.immediate:
            raise BlockingIOError(errno.EINPROGRESS, "in progress")

    def getsockopt(self, level: int, name: int) -> int:
        self.calls.append(("getsockopt", level, name))
        return self.so_error

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:
        return self.peer.fileno() if self.peer else -1


@pytest.fixture
def fake_vsock(monkeypatch):
    """Replace socket.socket for AF_VSOCK only; the test sets how connect behaves."""
    made: list[FakeSocket] = []
    behaviour: dict = {}
    family = getattr(socket, "AF_VSOCK", FAKE_AF_VSOCK)
    monkeypatch.setattr(socket, "AF_VSOCK", family, raising=False)
    real_socket = socket.socket

    def factory(fam=-1, type_=-1, proto=-1, fileno=None):
        if fam == family:
            s = FakeSocket(fam, type_, **behaviour)
            made.append(s)
            return s
        return real_socket(fam, type_, proto, fileno)

    writable: list[object] = []

    async def wait_writable(sock) -> None:
        writable.append(sock)
        if behaviour.get("hang"):
            await trio.sleep_forever()

    monkeypatch.setattr(socket, "socket", factory)
    monkeypatch.setattr(trio.lowlevel, "wait_writable", wait_writable)
    behaviour_setter = behaviour
    return made, behaviour_setter, writable


def test_address_kinds():
    a = Address.vsock(42)
    assert (a.kind, a.cid, a.port, str(a)) == (VSOCK, 42, 22, "vsock:42:22")
    t = Address("10.0.0.5", 22)
    assert t.kind == TCP and str(t) == "10.0.0.5:22"
    with pytest.raises(ValueError):
        t.cid


async def test_vsock_connect_is_af_vsock_nonblocking_to_cid_and_port(fake_vsock):
    made, behaviour, writable = fake_vsock
    sock = await transport.open_stream(Address.vsock(42, 2222))
    assert made == [sock]
    assert sock.family == socket.AF_VSOCK and sock.type == socket.SOCK_STREAM
    assert sock.calls == [("setblocking", False), ("connect", (42, 2222)),
                          ("getsockopt", socket.SOL_SOCKET, socket.SO_ERROR)]
    assert writable == [sock]   # waited for the non-blocking connect to finish, in trio
    assert not sock.closed


async def test_vsock_immediate_connect_does_not_wait(fake_vsock):
    made, behaviour, writable = fake_vsock
    behaviour["immediate"] = True
    sock = await transport.open_stream(Address.vsock(3))
    assert sock.calls == [("setblocking", False), ("connect", (3, 22))]
    assert writable == []


async def test_vsock_refused_raises_oserror_and_closes(fake_vsock):
    made, behaviour, _ = fake_vsock
    behaviour["so_error"] = errno.ECONNRESET   # what vsock says when nothing listens on the port
    with pytest.raises(OSError) as err:
        await transport.open_stream(Address.vsock(42))
    assert err.value.errno == errno.ECONNRESET
    assert made[0].closed


async def test_vsock_timeout_is_timeouterror_and_closes(fake_vsock):
    made, behaviour, _ = fake_vsock
    behaviour["hang"] = True
    with pytest.raises(TimeoutError) as err:
        await transport.open_stream(Address.vsock(42), timeout=0.05)
    assert isinstance(err.value, OSError) and "vsock:42:22" in str(err.value)
    assert made[0].closed


async def test_vsock_host_cids_are_refused_before_any_socket(fake_vsock):
    made, _, _ = fake_vsock
    for cid in (0, 1, 2):
        with pytest.raises(OSError) as err:
            await transport.open_stream(Address.vsock(cid))
        assert err.value.errno == errno.EINVAL
    assert made == []


async def test_no_af_vsock_on_this_platform(monkeypatch):
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    with pytest.raises(OSError) as err:
        await transport.open_stream(Address.vsock(42))
    assert err.value.errno == errno.EAFNOSUPPORT
    assert transport.vsock_supported() == (False, "this Python has no socket.AF_VSOCK (Linux only)")


def test_vsock_supported_names_the_missing_device(monkeypatch):
    monkeypatch.setattr(transport, "VHOST_VSOCK", "/nonexistent/vhost-vsock")
    monkeypatch.setattr(socket, "AF_VSOCK", getattr(socket, "AF_VSOCK", FAKE_AF_VSOCK), raising=False)
    ok, why = transport.vsock_supported()
    assert not ok and "/nonexistent/vhost-vsock does not exist" in why and "vhost_vsock" in why


async def test_probe_reads_the_banner_over_vsock(monkeypatch):
    """The readiness probe goes through transport: a socketpair stands in for the guest."""
    guest, host_end = socket.socketpair()
    guest.sendall(b"a line before the banner\r\nSSH-2.0-dropbear_2022.83\r\n")
    opened: list[Address] = []

    async def fake_open_stream(address, timeout=transport.CONNECT_TIMEOUT):
        opened.append(address)
        host_end.setblocking(False)
        return host_end

    monkeypatch.setattr(transport, "open_stream", fake_open_stream)
    try:
        assert await probe.read_banner(Address.vsock(42)) == b"SSH-2.0-dropbear_2022.83"
    finally:
        guest.close()
    assert opened == [Address.vsock(42)]


def _machine() -> MachineConfig:
    return MachineConfig(name="vm-v", backend="lv", user="root", address=None,
                         host_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x",),
                         known_hosts=None, identity=None, boot_timeout=10, options=MappingProxyType({}))


def _gateway() -> GatewayConfig:
    return GatewayConfig(listen=(), host_keys=(), upstream_key=None, state_dir=None)  # type: ignore[arg-type]


async def test_upstream_connect_passes_the_vsock_socket_to_asyncssh(monkeypatch):
    sentinel = object()
    seen: dict = {}

    async def fake_open_stream(address, timeout=transport.CONNECT_TIMEOUT):
        seen["address"] = address
        return sentinel

    async def fake_connect(options, sock):
        seen.update(host=options.host, port=options.port, sock=sock)
        return "connection"

    monkeypatch.setattr(transport, "open_stream", fake_open_stream)
    monkeypatch.setattr(upstream.internals, "connect_prepared", fake_connect)
    monkeypatch.setattr(upstream, "_client_keys", lambda *a: [])
    async with trio_asyncio.open_loop():
        conn = await trio_asyncio.aio_as_trio(upstream.connect)(_machine(), Address.vsock(42), "root", _gateway())
    assert conn == "connection"
    assert seen == {"address": Address.vsock(42), "host": "vm-v", "port": 22, "sock": sentinel}


async def test_upstream_vsock_failure_is_a_sentence(monkeypatch):
    async def refused(address, timeout=transport.CONNECT_TIMEOUT):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(transport, "open_stream", refused)
    async with trio_asyncio.open_loop():
        with pytest.raises(upstream.UpstreamError) as err:
            await trio_asyncio.aio_as_trio(upstream.connect)(_machine(), Address.vsock(42), "root", _gateway())
    assert err.value.reason == "upstream_error"
    assert err.value.message == "fleetgate: cannot reach vm-v at vsock:42:22: Connection reset by peer"


async def test_upstream_tcp_is_unchanged(monkeypatch):
    seen: dict = {}

    async def fake_connect(options, sock):
        seen.update(host=options.host, port=options.port, sock=sock)
        return "c"

    monkeypatch.setattr(upstream.internals, "connect_prepared", fake_connect)
    monkeypatch.setattr(upstream, "_client_keys", lambda *a: [])
    async with trio_asyncio.open_loop():
        await trio_asyncio.aio_as_trio(upstream.connect)(_machine(), Address("10.1.2.3", 2200), "root", _gateway())
    assert seen == {"host": "10.1.2.3", "port": 2200, "sock": None}


async def test_upstream_options_are_prepared_once_per_machine_config_and_account(monkeypatch):
    """Options are built (in asyncssh's worker thread) once, then copied per connection; a
    reload's new MachineConfig, another account or a password login builds new ones."""
    import dataclasses

    built = []
    construct = upstream.asyncssh.SSHClientConnectionOptions.construct

    async def counting(options=None, **kw):
        built.append(kw["username"])
        return await construct(options, **kw)

    used = []

    async def fake_connect(options, sock):
        used.append(options)
        return "c"

    monkeypatch.setattr(upstream.asyncssh.SSHClientConnectionOptions, "construct", counting)
    monkeypatch.setattr(upstream.internals, "connect_prepared", fake_connect)
    monkeypatch.setattr(upstream, "_client_keys", lambda *a: [])
    upstream._PREPARED.clear()
    mc = _machine()
    address = Address("10.1.2.3", 2200)
    async with trio_asyncio.open_loop():
        connect = trio_asyncio.aio_as_trio(upstream.connect)
        for _ in range(3):
            await connect(mc, address, "root", _gateway())
        await connect(mc, address, "alice", _gateway())
        await connect(dataclasses.replace(mc), address, "root", _gateway())   # after a reload
        await connect(mc, address, "root", _gateway(), password="hunter2")
        await connect(mc, address, "root", _gateway(), password="hunter2")
    assert built == ["root", "alice", "root", "root", "root"]
    assert used[0] is used[1] is used[2]
