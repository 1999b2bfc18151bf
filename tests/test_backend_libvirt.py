"""Issue 12: the libvirt backend against a real libvirtd and real TCG guests.

One private libvirtd per module (tests/libvirt_helpers.py: `virtlogd -d`, `libvirtd -d`
in their own mount namespace, stopped at the end). Each test defines its own domain from
the test guest image (type qemu = TCG, direct kernel boot, user-mode network with a
hostfwd to guest port 22 in <qemu:commandline>) and drives it through a real in-process
gateway with the real OpenSSH client; states are confirmed through libvirt itself.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import libvirt
import pytest
import trio

from fleetgate import probe, transport
from fleetgate.backends.base import Address
from fleetgate.fleet import State
from guest_helpers import GuestImage, build_guest
from helpers import free_port, make_fleet, run, start_gateway
from libvirt_helpers import Libvirtd, domain_xml

pytestmark = pytest.mark.e2e

BOOT_TIMEOUT = 90
STOP_TIMEOUT = 20
_names = itertools.count()


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory):
    d = Libvirtd(tmp_path_factory.mktemp("lv")).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def conn(libvirtd):
    """The test's own libvirt connection, to confirm what the gateway did."""
    c = libvirt.open(libvirtd.uri)
    yield c
    c.close()


def define(conn, libvirtd: Libvirtd, img: GuestImage, *, port: int | None = None, vsock: bool = False,
           cmdline: str = "") -> tuple[str, object]:
    name = f"fg-lv-{os.getpid()}-{next(_names)}"
    xml = domain_xml(name, img.kernel, img.initrd, libvirtd.root / "console" / f"{name}.log", port=port, vsock=vsock,
                     cmdline=f"console=ttyS0 quiet fleetvm.hostname=vm-alice {cmdline}".strip())
    return name, conn.defineXML(xml)


def lv_patch(libvirtd: Libvirtd, img: GuestImage, domain: str, **machine: object):
    def patch(doc: dict) -> None:
        doc["backends"]["lv"] = {"type": "libvirt", "uri": libvirtd.uri, "poll_interval": 0.1, "call_timeout": 30}
        doc["machines"]["vm-alice"] = {
            "backend": "lv", "domain": domain, "user": "root", "host_key": str(img.host_key_pub),
            "identity": str(img.client_key), "boot_timeout": BOOT_TIMEOUT, "stop_timeout": STOP_TIMEOUT, **machine}
        doc["users"]["alice"]["machines"] = ["vm-alice"]
    return patch


async def wait_state(fleet, name: str, state: State, timeout: float) -> None:
    m = fleet.machine(name)
    with trio.fail_after(timeout):
        while m.state is not state:
            await m.changed.wait()


def shut_off(dom) -> bool:
    return dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF


async def test_login_starts_domain_then_idle_reaper_shuts_it_down(tmp_path, nursery, libvirtd, conn, guest_image):
    name, dom = define(conn, libvirtd, guest_image, port=free_port())
    assert shut_off(dom)
    fleet, cfg = make_fleet(tmp_path, patch=lv_patch(libvirtd, guest_image, name, idle_timeout=2.0, min_uptime=0.0))
    await start_gateway(nursery, fleet, cfg)
    backend = fleet.machine("vm-alice").backend
    assert fleet.machine("vm-alice").state is State.STOPPED   # reconciled from libvirt at start-up

    r = await run(fleet.ssh("alice", "uname -n; echo to-stderr >&2; exit 3"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 3, r.err                  # exec with its exit status, through the gateway
    assert r.out == "vm-alice\n"
    assert "fleetgate: starting vm-alice (libvirt)" in r.err and "to-stderr" in r.err
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert fleet.backend_calls("start") == 1
    assert fleet.metric("fleetgate_boot_latency_seconds_count", backend="lv") == 1
    assert fleet.metric("fleetgate_wakes_total", backend="lv", result="success") == 1

    # Nobody on it: the reaper stops it after idle_timeout, with the ACPI power button.
    await wait_state(fleet, "vm-alice", State.STOPPED, timeout=2.0 + STOP_TIMEOUT + 20)
    assert shut_off(dom)                              # confirmed by libvirt itself
    assert dom.state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN   # the guest powered off (not destroyed)
    assert backend.last_stop["vm-alice"] == "shutdown"
    assert fleet.metric("fleetgate_reaper_stops_total", backend="lv", result="success") == 1
    assert fleet.metric("fleetgate_machine_lost_total", backend="lv") == 0


async def test_guest_ignoring_acpi_is_destroyed_after_stop_timeout(tmp_path, nursery, libvirtd, conn, guest_image):
    # acpi=off: the guest never sees the power button, like a hung or ACPI-less guest.
    name, dom = define(conn, libvirtd, guest_image, port=free_port(), cmdline="acpi=off")
    fleet, cfg = make_fleet(tmp_path, patch=lv_patch(libvirtd, guest_image, name, stop_timeout=3.0))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "true"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0, r.err
    t0 = trio.current_time()
    with trio.fail_after(30):
        assert await fleet.running.fleet.stop("vm-alice")
    assert trio.current_time() - t0 >= 3.0
    assert fleet.machine("vm-alice").backend.last_stop["vm-alice"] == "destroy"
    assert shut_off(dom) and dom.state()[1] == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED


async def test_domains_started_and_stopped_with_virsh_are_reconciled(tmp_path, nursery, libvirtd, conn, guest_image):
    port = free_port()
    name, dom = define(conn, libvirtd, guest_image, port=port)
    fleet, cfg = make_fleet(tmp_path, patch=lv_patch(libvirtd, guest_image, name))
    await start_gateway(nursery, fleet, cfg)
    assert fleet.machine("vm-alice").state is State.STOPPED

    libvirtd.virsh("start", name)                     # behind the gateway's back
    with trio.fail_after(BOOT_TIMEOUT):
        await probe.wait_for_banner(Address("127.0.0.1", port))
    await fleet.running.fleet.reconcile()
    m = fleet.machine("vm-alice")
    assert m.state is State.RUNNING                   # adopted, with the forwarded port from the domain XML
    assert m.address == Address("127.0.0.1", port)
    r = await run(fleet.ssh("alice", "uname -n"), timeout=60)
    assert r.returncode == 0 and r.out == "vm-alice\n", r.err
    assert fleet.backend_calls("start") == 0          # nothing started it but virsh

    libvirtd.virsh("destroy", name)
    await fleet.running.fleet.reconcile()
    assert m.state is State.STOPPED
    assert fleet.metric("fleetgate_machine_lost_total", backend="lv") == 1


async def test_unknown_domain_is_a_clear_wake_failure(tmp_path, nursery, libvirtd, guest_image):
    fleet, cfg = make_fleet(tmp_path, patch=lv_patch(libvirtd, guest_image, "no-such-domain"))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert "vm-alice could not be started: libvirt (qemu:///system?socket=" in r.err, r.err
    assert "has no domain named 'no-such-domain'" in r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="lv", reason="machine_gone") == 1


async def test_unreachable_libvirtd_is_backend_unreachable(tmp_path, nursery, libvirtd, guest_image):
    def patch(doc: dict) -> None:
        lv_patch(libvirtd, guest_image, "whatever")(doc)
        doc["backends"]["lv"]["uri"] = f"qemu:///system?socket={tmp_path}/no-libvirtd-here"
    fleet, cfg = make_fleet(tmp_path, patch=patch)
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert "cannot reach libvirtd at qemu:///system?socket=" in r.err, r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="lv", reason="backend_unreachable") == 1


VSOCK_OK, VSOCK_WHY = transport.vsock_supported()


@pytest.mark.skipif(not VSOCK_OK, reason=f"VSOCK end to end needs vhost-vsock on the host: {VSOCK_WHY}")
async def test_vsock_transport_end_to_end(tmp_path, nursery, libvirtd, conn, guest_image):
    """A guest with no network at all: readiness and the session go over AF_VSOCK to its CID."""
    name, dom = define(conn, libvirtd, guest_image, vsock=True)
    fleet, cfg = make_fleet(tmp_path, patch=lv_patch(libvirtd, guest_image, name, transport="vsock"))
    await start_gateway(nursery, fleet, cfg)
    r = await run(fleet.ssh("alice", "uname -n"), timeout=BOOT_TIMEOUT + 30)
    assert r.returncode == 0 and r.out == "vm-alice\n", r.err
    address = fleet.machine("vm-alice").address
    assert address is not None and address.kind == "vsock" and address.cid >= 3
    with trio.fail_after(STOP_TIMEOUT + 30):
        assert await fleet.running.fleet.stop("vm-alice")
    assert shut_off(dom)
