"""Issue 12: the EC2 backend against moto's server mode (the standard EC2 emulator).

moto (`python -m moto.server`, started by this module on loopback) answers the real EC2
Query API that boto3 speaks: instances are created, found by tag, started, stopped and
terminated there, and every state the tests assert is read back from moto.

What moto cannot do is run an operating system: its instances have addresses (172.31.x.x)
that lead nowhere. So the SSH side is honest in a different way: each test instance gets
a real sshd (fleetgate's ProcessBackend code on a loopback port) that an "instance host"
task in the test runs exactly while moto says the instance is `running`, and the machine's
`address` (the documented override for NATs and port forwards) points there. Readiness is
therefore a real SSH banner that appears only after EC2 started the instance.

Throttling and capacity errors are injected by `AwsFaults`, a loopback HTTP proxy in front
of moto that answers chosen actions with the EC2 error document AWS sends, so botocore
parses and retries them as it would for real.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs

import boto3
import h11
import httpx
import pytest
import trio

from fleetgate.backends.base import Address, BackendError, PowerState
from fleetgate.backends.ec2 import Ec2Backend
from fleetgate.backends.process import ProcessBackend
from fleetgate.config import BackendConfig, MachineConfig
from fleetgate.fleet import State
from helpers import free_port, make_fleet, run, start_gateway
from logsecrets import token

pytestmark = pytest.mark.e2e

REGION = "eu-west-1"
ACCESS_KEY = "AKIAFLEETGATETEST0001"
SECRET_KEY = token("fleetgate-test-secret-key-never-logged")
MOTO_START_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory):
    """moto's server mode on a loopback port, for the whole module."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    ready = threading.Event()

    def pump() -> None:   # keep draining (moto logs every request), note when it listens
        assert proc.stdout is not None
        with open(log, "ab") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                if b"Running on" in line:
                    ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not ready.wait(MOTO_START_TIMEOUT) or proc.poll() is not None:
            raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """Credentials only through the standard chain (here: the environment); no host AWS files."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


def ec2_client(moto_url: str):
    return boto3.client("ec2", region_name=REGION, endpoint_url=moto_url)


def new_instance(moto_url: str, tag: str, *, stopped: bool = True) -> str:
    """An instance in moto tagged Name=tag (stopped, as the gateway expects to find it)."""
    ec2 = ec2_client(moto_url)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro",
                            TagSpecifications=[{"ResourceType": "instance",
                                                "Tags": [{"Key": "Name", "Value": tag}]}])["Instances"][0]["InstanceId"]
    if stopped:
        ec2.stop_instances(InstanceIds=[iid])
    return iid


def instance_state(moto_url: str, iid: str) -> str:
    r = ec2_client(moto_url).describe_instances(InstanceIds=[iid])
    return r["Reservations"][0]["Instances"][0]["State"]["Name"]


@dataclass
class InstanceHost:
    """Runs the instance's sshd exactly while moto says the instance is running."""

    moto_url: str
    iid: str
    machine: MachineConfig
    provider: ProcessBackend
    changes: list[str] = field(default_factory=list)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        ec2 = ec2_client(self.moto_url)
        up = False
        task_status.started()
        try:
            while True:
                r = await trio.to_thread.run_sync(lambda: ec2.describe_instances(InstanceIds=[self.iid]))
                running = r["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
                if running and not up:
                    await self.provider.start(self.machine)
                    self.changes.append("sshd up")
                elif up and not running:
                    await self.provider.stop(self.machine)
                    self.changes.append("sshd down")
                up = running
                await trio.sleep(0.1)   # a simulated hypervisor: moto has no event stream to wait on
        finally:
            with trio.CancelScope(shield=True):
                await self.provider.stop(self.machine)


async def ec2_gateway(tmp_path: Path, nursery: trio.Nursery, moto_url: str, *, endpoint: str | None = None,
                      instance: dict | None = None, host_iid: str | None = None, **machine: object):
    """A gateway with machine vm-alice on backend "aws" (type ec2); alice logs in to it."""
    sshd_port = free_port()

    def patch(doc: dict) -> None:
        alice = doc["machines"]["alice"]
        doc["backends"]["aws"] = {"type": "ec2", "region": REGION, "endpoint_url": endpoint or moto_url,
                                  "poll_interval": 0.1, "call_timeout": 20, "max_attempts": 2}
        doc["machines"]["vm-alice"] = {"backend": "aws", "user": alice["user"], "host_key": alice["host_key"],
                                       "address": f"127.0.0.1:{sshd_port}", "boot_timeout": 60,
                                       "stop_timeout": 20, **(instance or {}), **machine}
        doc["users"]["alice"]["machines"] = ["vm-alice"]

    fleet, cfg = make_fleet(tmp_path, patch=patch, isolation="none")  # the instance is a host sshd
    host = None
    if host_iid is not None:
        mdir = fleet.dir / "machines" / "alice"
        sshd = MachineConfig(name="instance-sshd", backend="instance-host", user=None, address=None, host_keys=(),
                             known_hosts=None, identity=None, boot_timeout=30.0, options=MappingProxyType({
                                 "port": sshd_port, "host_key_file": str(mdir / "ssh_host_ed25519_key"),
                                 "authorized_keys_file": str(mdir / "authorized_keys")}))
        provider = ProcessBackend(BackendConfig("instance-host", "process", MappingProxyType({"isolation": "none"})), Path,
                                  tmp_path / "instance-host")
        host = InstanceHost(moto_url, host_iid, sshd, provider)
        await nursery.start(host.run)
    await start_gateway(nursery, fleet, cfg)
    return fleet, host


async def wait_state(fleet, name: str, state: State, timeout: float) -> None:
    m = fleet.machine(name)
    with trio.fail_after(timeout):
        while m.state is not state:
            await m.changed.wait()


def no_secret_anywhere(caplog, *texts: str) -> None:
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (logged, *texts):
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text


# -- the whole path ----------------------------------------------------------------------------


async def test_login_starts_instance_found_by_tag_then_idle_stop(tmp_path, nursery, moto_url, caplog):
    caplog.set_level(logging.DEBUG)
    tag = f"dev-alice-{os.getpid()}-{time.monotonic_ns()}"
    iid = new_instance(moto_url, tag)
    fleet, host = await ec2_gateway(tmp_path, nursery, moto_url, instance={"tags": {"Name": tag}}, host_iid=iid,
                                    idle_timeout=2.0, min_uptime=0.0)
    assert fleet.machine("vm-alice").state is State.STOPPED   # reconciled from EC2 at start-up

    r = await run(fleet.ssh("alice", "echo on-the-instance; exit 7"), timeout=90)
    assert r.returncode == 7, r.err
    assert r.out == "on-the-instance\n"
    assert "fleetgate: starting vm-alice (ec2)" in r.err
    assert instance_state(moto_url, iid) == "running"
    assert host.changes == ["sshd up"]                  # the banner appeared only once EC2 ran it
    assert fleet.backend_calls("start") == 1
    assert fleet.metric("fleetgate_wakes_total", backend="aws", result="success") == 1

    await wait_state(fleet, "vm-alice", State.STOPPED, timeout=2.0 + 20 + 20)
    assert instance_state(moto_url, iid) == "stopped"   # confirmed by EC2 (moto)
    assert fleet.metric("fleetgate_reaper_stops_total", backend="aws", result="success") == 1
    no_secret_anywhere(caplog, r.err)


async def test_instances_started_and_stopped_elsewhere_are_reconciled(tmp_path, nursery, moto_url):
    iid = new_instance(moto_url, f"recon-{time.monotonic_ns()}")
    fleet, _ = await ec2_gateway(tmp_path, nursery, moto_url, instance={"instance_id": iid})
    m = fleet.machine("vm-alice")
    assert m.state is State.STOPPED
    ec2 = ec2_client(moto_url)
    ec2.start_instances(InstanceIds=[iid])              # the console, the CLI, another tool
    await fleet.running.fleet.reconcile()
    assert m.state is State.RUNNING
    ec2.stop_instances(InstanceIds=[iid])
    await fleet.running.fleet.reconcile()
    assert m.state is State.STOPPED
    assert fleet.metric("fleetgate_machine_lost_total", backend="aws") == 1
    assert fleet.backend_calls("start") == 0


async def test_address_choice_reads_the_instance(tmp_path, moto_url):
    iid = new_instance(moto_url, f"addr-{time.monotonic_ns()}")
    backend = Ec2Backend(BackendConfig("aws", "ec2", MappingProxyType(
        {"region": REGION, "endpoint_url": moto_url, "poll_interval": 0.1})), Path, tmp_path)

    def machine(**opts: object) -> MachineConfig:
        return MachineConfig(name="m", backend="aws", user=None, address=None, host_keys=(), known_hosts=None,
                             identity=None, boot_timeout=30, options=MappingProxyType({"instance_id": iid, **opts}))

    assert await backend.status(machine()) is PowerState.STOPPED
    with trio.fail_after(30):
        await backend.start(machine())
    assert await backend.status(machine()) is PowerState.RUNNING
    info = ec2_client(moto_url).describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert await backend.address(machine()) == Address(info["PrivateIpAddress"], 22)
    assert await backend.address(machine(address_type="public_ip", ssh_port=2222)) == Address(info["PublicIpAddress"], 2222)
    assert await backend.address(machine(address_type="private_dns")) == Address(info["PrivateDnsName"], 22)
    assert info["PrivateIpAddress"] and info["PublicIpAddress"] and info["PrivateDnsName"]
    with trio.fail_after(30):
        await backend.stop(machine())
    assert instance_state(moto_url, iid) == "stopped"
    await backend.aclose()


# -- failures: clear words, bounded reasons ---------------------------------------------------


@dataclass
class AwsFaults:
    """A loopback proxy in front of moto that fails chosen EC2 actions the way AWS does."""

    moto_url: str
    fail: dict[str, tuple[int, str, str]] = field(default_factory=dict)   # Action -> (status, code, message)
    seen: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(base_url=self.moto_url) as client:
            self.client = client
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._connection, listeners)
                task_status.started(self)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                request, body = None, b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                    elif isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                action = parse_qs(body.decode()).get("Action", [""])[0]
                self.seen.append(action)
                if action in self.fail:
                    status, code, message = self.fail[action]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                               f'<Message>{message}</Message></Error></Errors>'
                               f'<RequestID>11111111-2222-3333-4444-555555555555</RequestID></Response>').encode()
                    headers = [("content-type", "text/xml;charset=UTF-8")]
                else:
                    fwd = {k.decode(): v.decode() for k, v in request.headers if k.lower() != b"host"}
                    resp = await self.client.request(request.method.decode(), request.target.decode(),
                                                     headers=fwd, content=body)
                    status, payload = resp.status_code, resp.content
                    headers = [("content-type", resp.headers.get("content-type", "text/xml"))]
                headers.append(("content-length", str(len(payload))))
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()


async def test_throttling_is_retried_then_a_clear_bounded_failure(tmp_path, nursery, moto_url, caplog):
    caplog.set_level(logging.DEBUG)
    faults = await nursery.start(AwsFaults(moto_url).serve)
    faults.fail["StartInstances"] = (503, "RequestLimitExceeded", "Request limit exceeded.")
    iid = new_instance(moto_url, f"throttled-{time.monotonic_ns()}")
    fleet, _ = await ec2_gateway(tmp_path, nursery, moto_url, endpoint=faults.url, instance={"instance_id": iid})
    r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert ("vm-alice could not be started: AWS is throttling EC2 API calls (RequestLimitExceeded) "
            "after 2 attempt(s); try again in a minute") in r.err, r.err
    assert faults.seen.count("StartInstances") == 2     # the SDK's own retry (max_attempts = 2), then give up
    assert fleet.metric("fleetgate_wake_failures_total", backend="aws", reason="throttled") == 1
    assert instance_state(moto_url, iid) == "stopped"
    no_secret_anywhere(caplog, r.err)


async def test_insufficient_capacity_is_a_clear_bounded_failure(tmp_path, nursery, moto_url):
    faults = await nursery.start(AwsFaults(moto_url).serve)
    faults.fail["StartInstances"] = (500, "InsufficientInstanceCapacity",
                                     "We currently do not have sufficient t3.micro capacity in the Availability "
                                     "Zone you requested (eu-west-1a).")
    iid = new_instance(moto_url, f"capacity-{time.monotonic_ns()}")
    fleet, _ = await ec2_gateway(tmp_path, nursery, moto_url, endpoint=faults.url, instance={"instance_id": iid})
    r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert (f"vm-alice could not be started: AWS has no capacity to start instance {iid} right now "
            "(InsufficientInstanceCapacity: We currently do not have sufficient t3.micro capacity") in r.err, r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="aws", reason="no_capacity") == 1


async def test_terminated_instance_and_unreachable_api(tmp_path, nursery, moto_url):
    tag = f"gone-{time.monotonic_ns()}"
    iid = new_instance(moto_url, tag, stopped=False)
    ec2_client(moto_url).terminate_instances(InstanceIds=[iid])
    fleet, _ = await ec2_gateway(tmp_path, nursery, moto_url, instance={"instance_id": iid})
    r = await run(fleet.ssh("alice", "true"), timeout=60)
    assert r.returncode == 255
    assert f"vm-alice could not be started: instance {iid} is terminated; it cannot be started again" in r.err, r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="aws", reason="machine_gone") == 1

    backend = Ec2Backend(BackendConfig("aws2", "ec2", MappingProxyType({
        "region": REGION, "endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1, "call_timeout": 5})),
        Path, tmp_path)
    m = MachineConfig(name="m", backend="aws2", user=None, address=None, host_keys=(), known_hosts=None, identity=None,
                      boot_timeout=30, options=MappingProxyType({"tags": {"Name": tag}}))
    with pytest.raises(BackendError) as err:
        await backend.start(m)
    assert err.value.reason == "backend_unreachable"
    assert str(err.value) == f"cannot reach the EC2 API in {REGION}: EndpointConnectionError"
