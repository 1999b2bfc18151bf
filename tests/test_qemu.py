"""Issue 5: real QEMU guests (the image from tests/guest/build.sh) woken through a real gateway.

KVM is detected, not assumed; on our machines guests run under TCG (~3 s to the banner).
The guest image is built once per session and cached between runs (tests/guest_helpers.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import signal
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import trio

from fleetgate.backends import PowerState
from fleetgate.config import ConfigError
from fleetgate.fleet import State
from guest_helpers import GuestImage, build_guest
from helpers import Fleet, make_fleet, run, start_gateway

BOOT_TIMEOUT = 90   # generous: the machine is shared with other test runs
STOP_TIMEOUT = 20

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture
def qemu_reaper():
    """Kill any guest a failed test left behind (a passing test stops its own)."""
    backends: list = []
    yield backends
    for b in backends:
        for guest in list(b.live.values()):
            try:
                os.kill(guest.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def qemu_patch(img: GuestImage, *, delay: dict[str, float] | None = None, gateway: dict | None = None,
               **machine: object) -> Callable[[dict], None]:
    """alice → vm-alice and bob → vm-bob, both QEMU guests of one backend named "qemu"."""
    def patch(doc: dict) -> None:
        doc["gateway"].update(gateway or {})
        doc["backends"]["qemu"] = {"type": "qemu", "accel": "auto", "max_concurrent_starts": 1}
        for user in ("alice", "bob"):
            name = f"vm-{user}"
            append = f"console=ttyS0 quiet fleetvm.hostname={name}"
            if delay and user in delay:
                append += f" fleetvm.delay={delay[user]:g}"
            doc["machines"][name] = {
                "backend": "qemu", "user": "root", "host_key": str(img.host_key_pub),
                "identity": str(img.client_key), "kernel": str(img.kernel), "initrd": str(img.initrd),
                "append": append, "memory": 128, "boot_timeout": BOOT_TIMEOUT, "stop_timeout": STOP_TIMEOUT,
                **machine,
            }
            doc["users"][user]["machines"] = [name]
    return patch


async def start_qemu_gateway(nursery: trio.Nursery, tmp_path: Path, img: GuestImage, reaper: list,
                             stop_machines_on_exit: bool = True, **kw: object):
    fleet, cfg = make_fleet(tmp_path, patch=qemu_patch(img, **kw))
    running = await start_gateway(nursery, fleet, cfg, stop_machines_on_exit=stop_machines_on_exit)
    backend = running.fleet.machines["vm-alice"].backend
    reaper.append(backend)
    assert backend.running  # the App starts every backend's own task
    return fleet, backend


async def wait_state(fleet: Fleet, name: str, state: State, timeout: float = 30) -> None:
    m = fleet.machine(name)
    with trio.fail_after(timeout):
        while m.state is not state:
            await m.changed.wait()


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


# -- configuration (no guest booted) ------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path, guest_image):
    def patch(doc: dict) -> None:
        qemu_patch(guest_image)(doc)
        doc["backends"]["qemu"].update(accel="xen", max_concurrent_starts=0)
        doc["machines"]["vm-alice"].update(kernel=str(tmp_path / "nope"), memory="lots")
        del doc["machines"]["vm-bob"]["kernel"]
        doc["machines"]["vm-bob"]["extra_args"] = "-snapshot"

    with pytest.raises(ConfigError) as err:
        make_fleet(tmp_path, patch=patch)
    text = str(err.value)
    for key in ("backends.qemu.accel", "backends.qemu.max_concurrent_starts", "machines.vm-alice.kernel",
                "machines.vm-alice.memory", "machines.vm-bob.kernel", "machines.vm-bob.initrd",
                "machines.vm-bob.extra_args"):
        assert f"key '{key}'" in text, text
    assert "no such file" in text and "auto, kvm, tcg" in text


# -- real guests --------------------------------------------------------------------------------


async def test_login_wakes_guest_and_runs_on_its_kernel(tmp_path, nursery, guest_image, qemu_reaper):
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper)
    assert fleet.machine("vm-alice").state is State.STOPPED
    assert not backend.live
    r = await run(fleet.ssh("alice", "uname -a"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    assert r.out.startswith(f"Linux vm-alice {guest_image.kernel_version} "), r.out
    assert "fleetgate: starting vm-alice (qemu)" in r.err
    assert fleet.machine("vm-alice").state is State.RUNNING
    assert fleet.metric("fleetgate_boot_latency_seconds_count", backend="qemu") == 1
    assert fleet.metric("fleetgate_boot_latency_seconds_sum", backend="qemu") > 0
    assert fleet.backend_calls("start") == 1
    guest = backend.live["vm-alice"]
    argv = cmdline(guest.pid)
    assert argv[argv.index("-accel") + 1] == guest.accel and guest.accel in ("kvm", "tcg")
    assert f"hostfwd=tcp:127.0.0.1:{guest.port}-:22" in " ".join(argv)
    # scp speaks SFTP with OpenSSH 9: the guest's sftp-server must be there.
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(256 * 1024))
    r = await run(["scp", *fleet.scp_opts(), str(src), "alice@127.0.0.1:/tmp/blob"])
    assert r.returncode == 0, r.err
    r = await run(fleet.ssh("alice", "md5sum /tmp/blob"))
    assert r.out.split()[0] == hashlib.md5(src.read_bytes()).hexdigest()
    assert fleet.backend_calls("start") == 1


async def test_stop_powers_guest_down_cleanly(tmp_path, nursery, guest_image, qemu_reaper):
    # A state directory deeper than a unix socket path may be (108 bytes), on purpose.
    deep = tmp_path / ("a-rather-long-state-directory-name/" * 3)
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper, gateway={
        "state_dir": str(deep), "admin_socket": str(tmp_path / "admin.sock")})
    r = await run(fleet.ssh("alice", "true"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    guest = backend.live["vm-alice"]
    assert len(str(guest.dir / "qmp.sock")) > 108
    assert await backend.status(fleet.machine("vm-alice").config) is PowerState.RUNNING   # QMP answers
    t0 = trio.current_time()
    with trio.fail_after(STOP_TIMEOUT + 30):
        assert await fleet.running.fleet.stop("vm-alice")
    seconds = trio.current_time() - t0
    assert guest.proc.returncode == 0            # QEMU exited by itself, not killed
    assert guest.stop_outcome == "powerdown"     # ... because the guest powered off
    assert seconds < STOP_TIMEOUT
    assert backend.last_exit["vm-alice"] is guest and "vm-alice" not in backend.live
    assert fleet.machine("vm-alice").state is State.STOPPED
    assert fleet.metric("fleetgate_machine_lost_total", backend="qemu") == 0
    assert not (guest.dir / "guest.json").exists()


async def test_guest_ignoring_the_power_button_is_quit_after_stop_timeout(tmp_path, nursery, guest_image,
                                                                          qemu_reaper):
    # acpi=off: the guest kernel never sees the power button, like a hung or ACPI-less guest.
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper,
                                              append="console=ttyS0 quiet acpi=off", stop_timeout=3.0)
    r = await run(fleet.ssh("alice", "true"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    guest = backend.live["vm-alice"]
    t0 = trio.current_time()
    with trio.fail_after(30):
        assert await fleet.running.fleet.stop("vm-alice")
    assert trio.current_time() - t0 >= 3.0
    assert guest.stop_outcome == "quit" and guest.proc.returncode == 0
    assert fleet.machine("vm-alice").state is State.STOPPED


async def test_restarted_gateway_adopts_running_guest(tmp_path, nursery, guest_image, qemu_reaper):
    async with trio.open_nursery() as first:
        fleet, backend = await start_qemu_gateway(first, tmp_path, guest_image, qemu_reaper,
                                                  stop_machines_on_exit=False)
        r = await run(fleet.ssh("alice", "true"), timeout=BOOT_TIMEOUT + 30)
        assert r.returncode == 0, r.err
        pid = backend.live["vm-alice"].pid
        first.cancel_scope.cancel()   # the gateway goes away; its guests keep running
    assert Path(f"/proc/{pid}").exists()
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper)
    assert fleet.machine("vm-alice").state is State.RUNNING   # adopted at start-up
    r = await run(fleet.ssh("alice", "hostname"), timeout=60)
    assert r.out == "vm-alice\n", r.err
    assert fleet.backend_calls("start") == 0
    guest = backend.live["vm-alice"]
    assert guest.pid == pid and guest.proc is None
    with trio.fail_after(STOP_TIMEOUT + 30):
        assert await fleet.running.fleet.stop("vm-alice")
    assert guest.stop_outcome == "powerdown" and not Path(f"/proc/{pid}/cwd").exists()
    assert fleet.metric("fleetgate_machine_lost_total", backend="qemu") == 0


async def test_two_guests_at_once_each_user_on_their_own(tmp_path, nursery, guest_image, qemu_reaper):
    # alice's guest waits 3 s before its sshd starts, so bob's wake, queued behind it by
    # max_concurrent_starts = 1, reaches a progress line while still queued, KVM or not.
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper, delay={"alice": 3})
    results = {}

    async def login(user: str) -> None:
        results[user] = await run(fleet.ssh(user, "hostname"), timeout=2 * BOOT_TIMEOUT + 30)

    async with trio.open_nursery() as n:
        n.start_soon(login, "alice")
        await wait_state(fleet, "vm-alice", State.STARTING)
        n.start_soon(login, "bob")
    for user in ("alice", "bob"):
        assert results[user].returncode == 0, results[user].err
        assert results[user].out == f"vm-{user}\n"
    assert "queued: 1 boot ahead" in results["bob"].err, results["bob"].err
    assert "queued" not in results["alice"].err
    a, b = backend.live["vm-alice"], backend.live["vm-bob"]
    assert a.pid != b.pid and a.port != b.port
    assert a.proc.returncode is None and b.proc.returncode is None   # both run at once
    assert b.launched_at >= a.ready_at   # the cap held: bob's QEMU started after alice's booted
    assert fleet.metric("fleetgate_boot_latency_seconds_count", backend="qemu") == 2


async def test_killed_guest_is_reported_and_woken_again(tmp_path, nursery, guest_image, qemu_reaper):
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper)
    session = await trio.lowlevel.open_process(fleet.ssh("alice", "echo up; exec sleep 600"),
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(BOOT_TIMEOUT + 30):
            assert await session.stdout.receive_some(64) == b"up\n"
        assert fleet.machine("vm-alice").sessions == 1
        guest = backend.live["vm-alice"]
        os.kill(guest.pid, signal.SIGKILL)
        await wait_state(fleet, "vm-alice", State.STOPPED)
        assert fleet.metric("fleetgate_machine_lost_total", backend="qemu") == 1
        assert fleet.metric("fleetgate_machine_state", machine="vm-alice", state="stopped") == 1
        assert backend.last_exit["vm-alice"].returncode == -signal.SIGKILL
        assert backend.last_exit["vm-alice"].stop_outcome is None   # not stopped by fleetgate
        with trio.fail_after(30):   # the user's session ends with its machine
            await session.wait()
        assert session.returncode != 0
    finally:
        if session.returncode is None:
            session.kill()
    r = await run(fleet.ssh("alice", "cat /proc/uptime"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    assert float(r.out.split()[0]) < 60   # a fresh boot
    assert fleet.backend_calls("start") == 2
    assert backend.live["vm-alice"].pid != guest.pid
    assert fleet.metric("fleetgate_boot_latency_seconds_count", backend="qemu") == 2


async def test_launch_failure_is_a_clear_wake_failure(tmp_path, nursery, guest_image, qemu_reaper):
    # A fixed forwarded port that is taken: QEMU exits at launch, and the user is told why.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper, port=port)
        r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert "vm-alice could not be started: qemu exited at launch" in r.err, r.err
    assert "forward" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="qemu", reason="start_error") == 1
    assert not backend.live


async def test_idle_guest_is_powered_down_by_the_reaper(tmp_path, nursery, guest_image, qemu_reaper):
    fleet, backend = await start_qemu_gateway(nursery, tmp_path, guest_image, qemu_reaper,
                                              idle_timeout=2.0, min_uptime=0.0)
    r = await run(fleet.ssh("alice", "true"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    guest = backend.live["vm-alice"]
    await wait_state(fleet, "vm-alice", State.STOPPED, timeout=2.0 + STOP_TIMEOUT + 15)
    assert guest.proc.returncode == 0 and guest.stop_outcome == "powerdown"
    assert fleet.metric("fleetgate_machine_lost_total", backend="qemu") == 0
