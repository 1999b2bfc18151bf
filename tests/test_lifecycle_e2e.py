"""Issue 3 acceptance with the process backend and the real OpenSSH client."""

from __future__ import annotations

import pytest

import signal
import subprocess

import trio

from fleetgate.fleet import State
from helpers import make_fleet, run, start_gateway

pytestmark = pytest.mark.e2e


async def wait_state(machine, state: State, timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while machine.state is not state:
            await machine.changed.wait()


def slow_start(seconds: float):
    def patch(doc):
        doc["backends"]["local"]["start_delay"] = seconds
    return patch


async def test_fifty_clients_one_start_and_a_quitter_does_not_cancel_the_boot(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=slow_start(3))
    await start_gateway(nursery, fleet, cfg)
    alice = fleet.machine("alice")
    results: list = []

    async def client(i: int) -> None:
        results.append(await run(fleet.ssh("alice", f"echo shell-{i}"), timeout=120))

    async with trio.open_nursery() as clients:
        quitter = await trio.lowlevel.open_process(fleet.ssh("alice", "echo quitter"), stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL)
        for i in range(50):
            clients.start_soon(client, i)
        await wait_state(alice, State.STARTING)
        quitter.send_signal(signal.SIGINT)  # Ctrl-C while the machine boots
        with trio.fail_after(10):
            await quitter.wait()
        assert alice.state is State.STARTING  # the boot goes on for the others
    assert quitter.returncode != 0
    assert sorted(r.out for r in results) == sorted(f"shell-{i}\n" for i in range(50))
    assert all(r.returncode == 0 for r in results)
    assert fleet.backend_calls("start") == 1
    assert alice.start_calls == 1


async def test_idle_stop_and_connect_while_stopping(tmp_path, nursery):
    def patch(doc):
        doc["backends"]["local"]["stop_delay"] = 3
        for m in doc["machines"].values():
            m["idle_timeout"] = 2
            m["min_uptime"] = 0

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    alice = fleet.machine("alice")
    r = await run(fleet.ssh("alice", "true"))
    assert r.returncode == 0, r.err
    assert alice.state is State.RUNNING
    t_disconnect = trio.current_time()
    await wait_state(alice, State.STOPPING)
    assert trio.current_time() - t_disconnect >= 2 - 0.1  # not before idle_timeout
    r = await run(fleet.ssh("alice", "echo back"))
    assert (r.returncode, r.out) == (0, "back\n"), r.err
    assert "alice is stopping; it will be started again for you" in r.err
    assert alice.start_calls == 2
    assert alice.stop_calls == 1
    assert fleet.metric("fleetgate_reaper_stops_total", backend="local", result="success") == 1


async def test_failed_start_is_explained_within_boot_timeout(tmp_path, nursery):
    def patch(doc):
        doc["backends"]["local"]["sshd"] = "/bin/false"
        doc["machines"]["alice"]["boot_timeout"] = 5

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    t0 = trio.current_time()
    r = await run(fleet.ssh("alice", "true"))
    assert trio.current_time() - t0 < 5 + 1
    assert r.returncode == 255
    assert "fleetgate: alice could not be started: sshd rejected its config" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="local", reason="start_error") == 1
    # The next connection within the cool-down is told so, without a second start.
    r = await run(fleet.ssh("alice", "true"))
    assert "fleetgate retries in" in r.err
    assert fleet.backend_calls("start") == 1


async def _silent_server(task_status=trio.TASK_STATUS_IGNORED):
    """Accepts TCP and never says a word: a NAT or hostfwd in front of a guest that never boots."""
    async def handle(stream):
        async with stream:
            await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_never_ready_is_explained_within_boot_timeout(tmp_path, nursery):
    silent = await nursery.start(_silent_server)

    def patch(doc):
        doc["machines"]["alice"]["address"] = f"127.0.0.1:{silent}"
        doc["machines"]["alice"]["boot_timeout"] = 3

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    t0 = trio.current_time()
    r = await run(fleet.ssh("alice", "true"))
    assert trio.current_time() - t0 < 3 + 1
    assert r.returncode == 255
    assert "fleetgate: alice did not answer within 3 s" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="local", reason="boot_timeout") == 1


async def test_progress_banner_during_slow_start(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path, patch=slow_start(5))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "echo landed"))
    assert (r.returncode, r.out) == (0, "landed\n"), r.err
    lines = r.err.splitlines()
    assert lines[0] == "fleetgate: starting alice (process)"
    assert "fleetgate: starting alice (process) ... 2 s" in lines
    assert "fleetgate: starting alice (process) ... 4 s" in lines
    # scp stays clean: the banner goes to stderr, never into the data.
    await fleet.running.fleet.stop("alice")
    src = tmp_path / "f"
    src.write_bytes(b"x" * 100_000)
    r = await run(["scp", *fleet.scp_opts(), str(src), "alice@127.0.0.1:/tmp/g"])  # no -q: it hides banners
    assert r.returncode == 0, r.err
    assert "usually ~5 s" in r.err
    r = await run(fleet.ssh("alice", "cat /tmp/g"))  # the machine's own /tmp
    assert r.stdout == src.read_bytes()


async def test_machine_killed_outside_is_reported_and_woken_again(tmp_path, nursery):
    fleet, cfg = make_fleet(tmp_path)
    await start_gateway(nursery, fleet, cfg)
    alice = fleet.machine("alice")
    assert (await run(fleet.ssh("alice", "true"))).returncode == 0
    pid = int((cfg.gateway.state_dir / "process" / ".pids" / "alice").read_text().split()[0])
    import os

    os.killpg(pid, signal.SIGKILL)  # the machine dies behind the gateway's back
    r = await run(fleet.ssh("alice", "echo again"))
    assert (r.returncode, r.out) == (0, "again\n"), r.err
    assert alice.start_calls == 2
    assert fleet.metric("fleetgate_machine_lost_total", backend="local") == 1
