"""The relay tuning applies on the pinned asyncssh, and tuned connections relay exactly."""

from __future__ import annotations

import pytest

import hashlib
import os
import subprocess

import asyncssh

from fleetgate.ssh import internals
from helpers import make_fleet, run, start_gateway


def test_tuning_applies_on_the_pinned_asyncssh():
    # If a dependency bump makes this fail, re-measure (docs/benchmarks.md) before widening TESTED.
    assert internals.apply_relay_tuning(), asyncssh.__version__
    assert internals.apply_relay_tuning()  # idempotent


@pytest.mark.e2e
async def test_tuned_relay_is_byte_exact_both_ways_and_reports_disconnect_reasons(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    assert internals._applied
    blob = os.urandom(8 * 1024 * 1024)
    r = await run(fleet.ssh("alice", "cat; cat /dev/null"), stdin=blob)
    assert r.stdout == blob, r.err
    r = await run(fleet.ssh("alice", "head -c 4194304 /dev/zero | tr '\\0' x"))
    assert r.stdout == b"x" * 4194304, r.err
    # Too many failed key offers: the gateway's disconnect reason still reaches the client.
    keys = []
    for i in range(7):
        k = tmp_path / f"k{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        keys += ["-i", str(k)]
    opts = fleet.ssh_opts()
    del opts[opts.index("-i"):opts.index("-i") + 2]
    r = await run(["ssh", *opts, *keys, "alice@127.0.0.1", "true"])
    assert r.returncode == 255
    assert "fleetgate: too many authentication failures" in r.err, r.err


@pytest.mark.e2e
async def test_fast_path_carries_bulk_data_and_asyncssh_takes_over_byte_exactly_when_it_cannot(
        tmp_path, nursery, monkeypatch):
    """Data packets go from channel to channel without asyncssh's channel layer whenever
    nothing waits in between (the next test covers the way back to asyncssh's path)."""
    forwarded = []
    forward = internals._forward

    def counting(conn, data, end):
        ok = forward(conn, data, end)
        forwarded.append(ok)
        return ok

    monkeypatch.setattr(internals, "_forward", counting)
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    assert internals._fast_applied
    # Up, as scp sends it (SFTP: at most 64 requests of 32 KiB in flight, so nothing piles up
    # in the gateway): 16 MiB is 512 data packets; a quarter or more go the fast way even on a
    # busy machine (most do when the gateway is the bottleneck: see docs/benchmarks.md).
    src = tmp_path / "up.bin"
    src.write_bytes(os.urandom(16 * 1024 * 1024))
    r = await run(["scp", "-q", *fleet.scp_opts(), str(src), "alice@127.0.0.1:fastpath.bin"])
    assert r.returncode == 0, r.err
    r = await run(fleet.ssh("alice", "sha256sum fastpath.bin; rm fastpath.bin"))
    assert r.stdout.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest(), r.err
    assert sum(forwarded) >= 128, (sum(forwarded), len(forwarded))
    # Down: whenever the client's window has room and nothing waits, packets go the fast way.
    forwarded.clear()
    r = await run(fleet.ssh("alice", "head -c 25165824 /dev/zero | tr '\\0' z"))
    assert r.stdout == b"z" * 25165824, r.err
    assert sum(forwarded) >= 64, (sum(forwarded), len(forwarded))


@pytest.mark.e2e
async def test_fast_path_keeps_the_windows_with_the_smallest_window_and_packets(tmp_path, nursery):
    """The gateway's smallest window: a window adjust after every packet or two, from the fast
    path's own accounting; a wrong count stalls the channel or makes the peer disconnect."""
    def small_window(doc: dict) -> None:
        doc["gateway"]["window"] = 32768
        doc["gateway"]["max_packet"] = 16384

    fleet, cfg = make_fleet(tmp_path, patch=small_window)
    await start_gateway(nursery, fleet, cfg)
    blob = os.urandom(3 * 1024 * 1024)
    r = await run(fleet.ssh("alice", "cat; head -c 1048576 /dev/zero | tr '\\0' y"), stdin=blob)
    assert r.stdout == blob + b"y" * 1048576, r.err
