"""`fleetgate status | wake | stop | keep-awake` against a running `fleetgate demo`, over its admin socket."""

from __future__ import annotations

import pytest

import json
import sys

from helpers import DemoProcess, run, sample

pytestmark = pytest.mark.e2e


async def test_keep_awake_wake_stop_and_status_from_the_cli(tmp_path):
    async with DemoProcess(tmp_path / "demo", "--idle-timeout", "1", "--min-uptime", "0") as demo:
        cli = [sys.executable, "-m", "fleetgate"]
        cfg = ["-c", str(demo.state_dir / "fleetgate.toml")]
        r = await run([*cli, "keep-awake", "bob", "1h", *cfg])
        assert r.returncode == 0, r.err
        r = await run([*cli, "wake", "bob", *cfg])  # returns once bob answers
        assert r.returncode == 0, r.err
        r = await run([*cli, "status", "--json", *cfg])
        bob = {m["machine"]: m for m in json.loads(r.out)}["bob"]
        assert bob["state"] == "running" and bob["keep_awake_seconds"] > 3500
        # Idle for well past its 1 s idle timeout, bob stays up: the lease holds it.
        r = await run(["ssh", *demo.ssh_opts(), "alice@127.0.0.1", "sleep 3"])
        assert r.returncode == 0, r.err
        metrics = await demo.metrics()
        assert sample(metrics, "fleetgate_machine_state", machine="bob", state="running") == 1.0
        assert sample(metrics, "fleetgate_keep_awake_leases", machine="bob") == 1.0
        r = await run([*cli, "stop", "bob", *cfg])
        assert r.returncode == 0, r.err
        r = await run([*cli, "status", *cfg])
        assert "bob" in r.out and "stopped" in r.out.split("bob", 1)[1].splitlines()[0]
        r = await run([*cli, "keep-awake", "nosuch", "1h", *cfg])
        assert r.returncode == 1 and "no machine named nosuch" in r.err
        r = await run([*cli, "keep-awake", "bob", "soon", *cfg])
        assert r.returncode == 2 and "not a duration" in r.err
