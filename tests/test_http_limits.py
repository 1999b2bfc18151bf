"""Issue 25 item 4: the metrics port's per-source cap and its reserve for /healthz.

A slowloris (connections that never finish their request) from one address, then from many,
against the real HTTP server on loopback; /healthz probes from another address must all be
answered, and every refusal is counted by its reason.
"""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from fleetgate import http

SLOW = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"  # never the blank line that ends the request


async def _handler(method, path, query):
    return 200, "text/plain", f"{path}\n".encode()


async def _open(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _get(port: int, path: str, source: str = "127.0.0.1") -> bytes:
    """One request, the whole answer (b'' if the server closed without one)."""
    with trio.fail_after(5):
        s = await _open(source, port)
        async with s:
            try:
                await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                out = b""
                while chunk := await s.receive_some(4096):
                    out += chunk
            except (trio.BrokenResourceError, OSError):
                return b""
            return out


async def _slowloris(port: int, sources: list[str], count: int) -> list[trio.SocketStream]:
    held = []
    for i in range(count):
        s = await _open(sources[i % len(sources)], port)
        try:
            await s.send_all(SLOW)
        except (trio.BrokenResourceError, OSError):
            pass
        held.append(s)
    await trio.sleep(0.2)  # let the server accept (or refuse) each one; the asserts below do not depend on it
    return held


async def _serve(nursery, limits: http.Limits) -> tuple[int, Counter]:
    refused: Counter = Counter()
    port = await nursery.start(lambda task_status: http.serve("127.0.0.1", 0, _handler, limits=limits,
                                                              on_refusal=lambda r: refused.update([r]),
                                                              task_status=task_status))
    return port, refused


@pytest.mark.e2e
async def test_slowloris_from_one_source_is_capped_and_healthz_answers(nursery):
    port, refused = await _serve(nursery, http.Limits(max_connections=20, max_per_source=4, health_reserve=2,
                                                      read_timeout=30))
    held = await _slowloris(port, ["127.0.0.2"], 60)
    try:
        answers = [await _get(port, "/healthz") for _ in range(25)]
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers[:3]
        assert (await _get(port, "/metrics")).startswith(b"HTTP/1.1 200")  # a scraper too: it is not the reserve
        assert refused["per_source"] == 56 and refused["connection_cap"] == 0
    finally:
        for s in held:
            await trio.aclose_forcefully(s)


@pytest.mark.e2e
async def test_slowloris_from_many_sources_leaves_healthz_its_reserve(nursery):
    port, refused = await _serve(nursery, http.Limits(max_connections=20, max_per_source=4, health_reserve=2,
                                                      read_timeout=30))
    sources = [f"127.0.3.{i}" for i in range(1, 41)]
    held = await _slowloris(port, sources, 40)
    await trio.sleep(http.EVICT_AFTER + 0.2)  # only a connection this old may be closed for a newcomer
    try:
        for i in range(25):
            a = await _get(port, "/healthz")
            assert a.startswith(b"HTTP/1.1 200"), (i, a)
            held += await _slowloris(port, sources, 2)  # the flood goes on between probes
        busy = await _get(port, "/metrics", "127.0.0.9")  # a non-health request in a reserved slot
        assert busy.startswith(b"HTTP/1.1 503"), busy
        assert refused["evicted"] > 0 and refused["health_reserve"] >= 1
    finally:
        for s in held:
            await trio.aclose_forcefully(s)


def test_source_of_groups_an_ipv6_64():
    class S:
        def __init__(self, peer):
            self.socket = type("sock", (), {"getpeername": lambda _self: peer})()
    assert http.source_of(S(("2001:db8:1:2:aaaa::1", 5, 0, 0))) == http.source_of(S(("2001:db8:1:2:bbbb::9", 6, 0, 0)))
    assert http.source_of(S(("127.0.0.5", 80))) == "127.0.0.5"
    assert http.source_of(S("/run/admin.sock")) is None
