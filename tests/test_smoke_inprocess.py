"""The smallest end-to-end check: one exec through an in-process gateway."""

import pytest

from helpers import make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


async def test_exec_through_inprocess_gateway(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=True)
    assert fleet.machine("alice").state.value == "stopped"
    r = await run(fleet.ssh("alice", "echo hi; exit 7"))
    assert r.returncode == 7, r.err
    assert r.out == "hi\n"
    assert fleet.machine("alice").state.value == "running"
    assert fleet.backend_calls("start") == 1
    fleet.running.shutdown.set()
