"""`fleetgate demo`'s metrics port shows what just happened: a wake, a live session, a failure."""

from __future__ import annotations

import pytest

import trio

from helpers import DemoProcess, Session, run, sample

pytestmark = pytest.mark.e2e


async def test_demo_metrics_follow_a_wake_and_a_session(tmp_path, nursery):
    async with DemoProcess(tmp_path / "demo", "--boot-delay", "1") as demo:
        ssh = ["ssh", *demo.ssh_opts()]
        alice = await Session([*ssh, "alice@127.0.0.1", "echo ready; cat"]).open(nursery)
        during = await demo.metrics()
        assert sample(during, "fleetgate_active_sessions", machine="alice") == 1.0
        assert sample(during, "fleetgate_boot_latency_seconds_count", backend="local") == 1.0
        # The boot took the 1 s boot delay and more: it is not in the 0.5 s or 1 s bucket, but in 2 s.
        assert sample(during, "fleetgate_boot_latency_seconds_bucket", backend="local", le="1.0") == 0.0
        assert sample(during, "fleetgate_boot_latency_seconds_bucket", backend="local", le="5.0") == 1.0
        assert sample(during, "fleetgate_wakes_total", backend="local", result="success") == 1.0
        assert sample(during, "fleetgate_wake_failures_total", backend="local", reason="start_error") == 0.0
        assert await alice.close() == 0
        r = await run([*ssh, "-o", "User=nobody", "nobody@127.0.0.1", "true"])
        assert r.returncode == 255
        with trio.fail_after(10):  # the client has exited; the gateway sees the close a moment later
            while sample(after := await demo.metrics(), "fleetgate_session_duration_seconds_count") != 1.0:
                await trio.sleep(0.05)
        assert sample(after, "fleetgate_active_sessions", machine="alice") == 0.0
        assert sample(after, "fleetgate_connections_total", result="authenticated") == 1.0
        assert sample(after, "fleetgate_auth_failures_total", method="publickey") >= 1.0
        assert sample(after, "fleetgate_relayed_bytes_total", direction="down", mode="relay") > 0
        assert sample(after, "fleetgate_session_duration_seconds_count") == 1.0
