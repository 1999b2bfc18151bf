"""The relay tuning applies on the pinned asyncssh, and tuned connections relay exactly."""

from __future__ import annotations

import pytest

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
