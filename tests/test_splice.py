"""The passthrough's byte relay (fleetgate/splice.py): zero-copy splice(2) and the copy it falls back to.

Every test runs the relay between two real socket pairs, client ⇄ [a | relay | b] ⇄ server,
over loopback TCP (what the passthrough port and a TCP machine give it) and, where the
behaviour does not depend on TCP, over AF_UNIX socketpairs too; and each runs with
`zero_copy=True` and with the copy, which must behave the same. The zero-copy runs also
count what os.splice delivered, so a silent fallback to the copy would fail them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import struct
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing

from fleetgate import splice as splice_mod
from fleetgate.splice import relay, zero_copy_available

pytestmark = pytest.mark.e2e   # real sockets, even the socketpairs

MIB = 1024 * 1024
WAIT = 30   # bound on every wait: a hang fails, it does not stall the suite

needs_splice = pytest.mark.skipif(not hasattr(os, "splice") or os.uname().sysname != "Linux",
                                  reason="os.splice needs Linux and Python >= 3.10")
MODES = [pytest.param(True, id="splice", marks=needs_splice), pytest.param(False, id="copy")]


@asynccontextmanager
async def pairs(kind: str) -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream, trio.SocketStream,
                                                  trio.SocketStream]]:
    """(client, a, b, server): client⇄a and b⇄server are connected; the relay joins a and b."""
    if kind == "tcp":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        streams = []
        for _ in range(2):
            out = await trio.open_tcp_stream("127.0.0.1", port)
            streams += [out, await listeners[0].accept()]
        await listeners[0].aclose()
        client, a, b, server = streams
    else:
        s1, s2 = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        s3, s4 = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        client, a, b, server = (trio.SocketStream(s) for s in (s1, s2, s3, s4))
    try:
        yield client, a, b, server
    finally:
        for s in (client, a, b, server):
            await s.aclose()


def counting_splice(monkeypatch) -> dict[str, int]:
    """Wrap os.splice to add up the bytes it moved into sockets (i.e. delivered zero-copy)."""
    real = os.splice
    seen = {"calls": 0, "to_socket": 0}

    def spy(src: int, dst: int, count: int, *args, **kwargs) -> int:
        n = real(src, dst, count, *args, **kwargs)
        seen["calls"] += 1
        if not _is_pipe(dst):
            seen["to_socket"] += n
        return n

    monkeypatch.setattr(splice_mod.os, "splice", spy)
    return seen


def _is_pipe(fd: int) -> bool:
    import stat

    return stat.S_ISFIFO(os.fstat(fd).st_mode)


def blob(n: int, seed: int) -> bytes:
    # Patterned, not random: cheap to make, and an offset or reordering changes the digest.
    block = hashlib.sha256(str(seed).encode()).digest() * 2048   # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def send_then_eof(stream: trio.SocketStream, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(data), 1 * MIB):
        await stream.send_all(view[i:i + MIB])
    await stream.send_eof()


async def read_to_eof(stream: trio.SocketStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(MIB):
        into += chunk


async def exchange(client: Any, a: Any, b: Any, server: Any, up_data: bytes, down_data: bytes,
                   zero_copy: bool) -> tuple[bytes, bytes, tuple[int, int]]:
    """Both ends send their data and EOF at once through the relay; what each end read, and
    the relay's byte counts."""
    got_up, got_down = bytearray(), bytearray()
    result: list[tuple[int, int]] = []

    async def run_relay() -> None:
        result.append(await relay(a, b, zero_copy=zero_copy))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as n:
            n.start_soon(run_relay)
            n.start_soon(send_then_eof, client, up_data)
            n.start_soon(send_then_eof, server, down_data)
            n.start_soon(read_to_eof, server, got_up)
            n.start_soon(read_to_eof, client, got_down)
    return bytes(got_up), bytes(got_down), result[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("zero_copy", MODES)
async def test_exact_bytes_both_ways_at_once_with_counts(kind, zero_copy, monkeypatch):
    seen = counting_splice(monkeypatch) if zero_copy else None
    up_data, down_data = blob(48 * MIB + 12345, 1), blob(40 * MIB + 777, 2)
    async with pairs(kind) as (client, a, b, server):
        fds = open_fds()
        got_up, got_down, result = await exchange(client, a, b, server, up_data, down_data, zero_copy)
        assert open_fds() == fds   # the pipes are closed
    assert got_up == up_data and got_down == down_data
    assert result == (len(up_data), len(down_data))
    if seen is not None:
        assert seen["to_socket"] == len(up_data) + len(down_data)   # every byte went by splice
        # A pipe's worth per call, not a page: this is what makes it cheap.
        assert seen["calls"] < (len(up_data) + len(down_data)) // (16 * 1024)


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize("zero_copy", MODES)
async def test_half_close_delivers_eof_one_way_while_the_other_keeps_flowing(kind, zero_copy):
    result: list[tuple[int, int]] = []
    answer = blob(8 * MIB + 3, 3)
    async with pairs(kind) as (client, a, b, server):
        async with trio.open_nursery() as n:
            async def run_relay() -> None:
                result.append(await relay(a, b, zero_copy=zero_copy))
            n.start_soon(run_relay)
            with trio.fail_after(WAIT):
                # The client asks and shuts down its sending side, as `ssh host cmd < file` does.
                await client.send_all(b"question")
                await client.send_eof()
                got = bytearray()
                await read_to_eof(server, got)           # EOF arrives after every byte of it
                assert bytes(got) == b"question"
                # Only then does the server answer, at length: the other direction still flows.
                n.start_soon(send_then_eof, server, answer)
                rest = bytearray()
                await read_to_eof(client, rest)
                assert bytes(rest) == answer
    assert result == [(len(b"question"), len(answer))]


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.mark.parametrize("who", ["server_reset_while_idle", "client_reset_while_receiving"])
@pytest.mark.parametrize("zero_copy", MODES)
async def test_a_reset_ends_both_directions_without_an_error(who, zero_copy):
    result: list[tuple[int, int]] = []
    async with pairs("tcp") as (client, a, b, server):
        fds = open_fds()
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as n:
                async def run_relay() -> None:
                    result.append(await relay(a, b, zero_copy=zero_copy))
                    # Then the passthrough closes both of its sockets (its `async with`).
                    await a.aclose()
                    await b.aclose()
                n.start_soon(run_relay)
                await client.send_all(b"hello")
                got = await server.receive_some(100)
                assert got == b"hello"
                if who == "server_reset_while_idle":
                    # Nothing flows either way: the relay learns of the reset by reading b.
                    reset(server)
                    with pytest.raises(trio.BrokenResourceError):
                        assert await client.receive_some(100) == b""   # the client sees the end
                        raise trio.BrokenResourceError   # EOF is as good as a reset here
                else:
                    # The server streams; the client reads a little and resets: the relay's
                    # write to a fails (EPIPE / ECONNRESET), and its wait on a for the client's
                    # next bytes must end too, which closes b under the server.
                    async def stream_down() -> None:
                        try:
                            while True:
                                await server.send_all(b"x" * 65536)
                        except trio.BrokenResourceError:
                            pass
                    n.start_soon(stream_down)
                    first = await client.receive_some(65536)
                    assert first
                    reset(client)
        # The relay returned on its own: no exception, no cancel from the test.
        assert result and result[0][0] == 5
        if who == "server_reset_while_idle":
            assert result[0][1] == 0
        elif zero_copy:
            assert result[0][1] >= len(first)   # splice counts what reached the client
        # (The copy counts a chunk once send_all has sent all of it, so a chunk cut short by
        # the reset is not counted: it under-reports by up to 256 KiB, as it always did.)
        assert open_fds() == fds - 3   # a, b and the reset socket; no pipe left behind


@pytest.mark.parametrize("zero_copy", MODES)
async def test_cancellation_interrupts_a_blocked_relay_and_closes_its_pipes(zero_copy):
    async with pairs("tcp") as (client, a, b, server):
        fds = open_fds()
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as n:
                async def run_relay() -> None:
                    await relay(a, b, zero_copy=zero_copy)
                    raise AssertionError("the relay returned instead of being cancelled")

                async def flood() -> None:
                    with trio.move_on_after(WAIT):   # bounded; cancelled below
                        while True:
                            await client.send_all(b"y" * MIB)
                n.start_soon(run_relay)
                n.start_soon(flood)
                # The server reads nothing: the relay fills its pipe and waits on b, the client
                # on a. Once every task is parked on the kernel, cancel (the gateway shutting down).
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                n.cancel_scope.cancel()
        assert open_fds() == fds


@needs_splice
@pytest.mark.parametrize("fail_on", ["first_call", "pipe_to_socket"])
async def test_a_socket_the_kernel_cannot_splice_falls_back_to_the_copy_without_losing_bytes(fail_on, monkeypatch):
    """EINVAL from splice (a socket family without splice support) hands over to the copy,
    including bytes already in the pipe."""
    real = os.splice
    state = {"refused": 0}

    def picky(src: int, dst: int, count: int, *args, **kwargs) -> int:
        into_socket = not _is_pipe(dst)
        if fail_on == "first_call" or into_socket:
            state["refused"] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(splice_mod.os, "splice", picky)
    up_data, down_data = blob(6 * MIB + 1, 4), blob(5 * MIB + 9, 5)
    async with pairs("tcp") as (client, a, b, server):
        got_up, got_down, result = await exchange(client, a, b, server, up_data, down_data, True)
    assert got_up == up_data and got_down == down_data
    assert result == (len(up_data), len(down_data))
    assert state["refused"] == 2   # once per direction, then the copy


def test_the_copy_is_selected_by_the_environment_or_a_missing_os_splice(monkeypatch):
    monkeypatch.delenv("FLEETGATE_PASSTHROUGH_COPY", raising=False)
    if hasattr(os, "splice") and os.uname().sysname == "Linux":
        assert zero_copy_available() == (True, "splice(2) through a pipe")
    monkeypatch.setenv("FLEETGATE_PASSTHROUGH_COPY", "1")
    assert zero_copy_available()[0] is False
    monkeypatch.setenv("FLEETGATE_PASSTHROUGH_COPY", "0")
    monkeypatch.delattr(splice_mod.os, "splice", raising=False)
    ok, why = zero_copy_available()
    assert not ok and "Python 3.10" in why
