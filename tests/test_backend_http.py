"""The HTTP backend against a real VM API on loopback that speaks the seed's contract.

The API (`VmApi`, an h11 server under trio) answers `POST /KIND/start_vm` the way KIND
says: the seed's JSON or plain-text IP after starting a real sshd (the "VM", run by
fleetgate's own ProcessBackend code), or garbage, a hang, a 5xx. Every case goes through a
real in-process gateway and the real `ssh` client, and ends as the user (stderr) and the
metric (fleetgate_wake_failures_total{backend, reason}) say it should.
"""

from __future__ import annotations

import json
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import h11
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fleetgate.backends.base import BackendError, PowerState
from fleetgate.backends.http import HttpBackend, parse_start_answer, parse_status_answer
from fleetgate.backends.process import ProcessBackend
from fleetgate.config import BackendConfig, ConfigError, MachineConfig
from logsecrets import token
from helpers import Session, free_port, make_fleet, run, start_gateway

JSON_TOKEN = token("s3cret-json-token-6b1f")
TEXT_TOKEN = token("s3cret-text-token-91aa")
GOOD = ("json", "text", "flaky")
BAD = ("html", "empty", "badip", "nofield", "hang", "fail503", "down")


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""


@dataclass
class VmApi:
    """A VM API on loopback; the first path segment picks the behaviour."""

    provider: ProcessBackend | None = None
    vms: dict[str, MachineConfig] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self)

    def url(self, kind: str, op: str = "start_vm") -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/{op}"

    def count(self, kind: str, op: str = "start_vm") -> int:
        return sum(1 for s in self.seen if s.path == f"/{kind}/{op}")

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                await self._exchange(stream)
            except (trio.BrokenResourceError, h11.RemoteProtocolError):
                pass  # the client gave up (a timeout in the backend): nothing to answer

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if request is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        path, _, query = request.target.decode().partition("?")
        seen = Seen(request.method.decode(), path, headers, body, query)
        self.seen.append(seen)
        answer = await self._answer(seen)
        if answer is None:  # hang: say nothing until the client gives up and closes
            await stream.receive_some(1)
            return
        status, ctype, payload = answer
        out = conn.send(h11.Response(status_code=status, headers=[
            ("content-type", ctype), ("content-length", str(len(payload))), ("connection", "close")]))
        out += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        await stream.send_all(out)

    async def _answer(self, seen: Seen) -> tuple[int, str, bytes] | None:
        _, kind, op = seen.path.split("/", 2)
        want = {"json": JSON_TOKEN, "text": TEXT_TOKEN}.get(kind)
        if want and seen.headers.get("authorization") != f"Bearer {want}":
            return 401, "text/plain", b"unauthorized\n"
        if kind == "hang":
            return None
        if kind == "fail503":
            return 503, "text/html", b"<html><body><h1>503 Service Unavailable</h1></body></html>"
        if kind == "flaky" and self.count("flaky") == 1:
            return 500, "text/plain", b"hypervisor busy\n"
        if op == "start_vm":
            return await self._start(kind)
        vm = self.vms[kind]
        assert self.provider is not None
        if op == "stop_vm":
            await self.provider.stop(vm)
            return 200, "application/json", b'{"ok": true}'
        state = await self.provider.status(vm)
        return 200, "application/json", json.dumps({"status": state.value, "vm_ip": "127.0.0.1"}).encode()

    async def _start(self, kind: str) -> tuple[int, str, bytes]:
        garbage = {
            "html": (200, "text/html", b"<!DOCTYPE html><html><body>Welcome to nginx!</body></html>"),
            "empty": (200, "text/plain", b""),
            "badip": (200, "text/plain", b"192.168.0.999\n"),
            "nofield": (200, "application/json", b'{"ip": "127.0.0.1", "state": "booting"}'),
        }
        if kind in garbage:
            return garbage[kind]
        assert self.provider is not None
        await self.provider.start(self.vms[kind])
        if kind == "text":
            return 200, "text/plain", b"127.0.0.1\n"
        return 200, "application/json", b'{"vm_ip": "127.0.0.1"}'


def vm_machine(name: str, port: int, fleet_dir: Path) -> MachineConfig:
    """A "VM" for the API: a ProcessBackend sshd with the demo machine alice's keys."""
    mdir = fleet_dir / "machines" / "alice"
    return MachineConfig(name=name, backend="vm-provider", user=None, address=None, host_keys=(), known_hosts=None,
                         identity=None, boot_timeout=30.0, options=MappingProxyType({
                             "port": port, "host_key_file": str(mdir / "ssh_host_ed25519_key"),
                             "authorized_keys_file": str(mdir / "authorized_keys")}))


async def api_gateway(tmp_path: Path, nursery: trio.Nursery, kinds: tuple[str, ...], monkeypatch,
                      status_query: str = ""):
    api = await nursery.start(VmApi().serve)
    (tmp_path / "api-token").write_text(JSON_TOKEN + "\n")
    monkeypatch.setenv("FLEETGATE_TEST_API_TOKEN", TEXT_TOKEN)
    vm_ports = {k: free_port() for k in kinds}

    def patch(doc: dict) -> None:
        alice = doc["machines"]["alice"]
        for kind in kinds:
            backend = {"type": "http", "start_url": api.url(kind), "timeout": 1.5, "retries": 2, "backoff": 0.05}
            if kind == "json":
                backend.update(stop_url=api.url(kind, "stop_vm"), status_url=api.url(kind, "status") + status_query,
                               token_file=str(tmp_path / "api-token"))
            if kind == "text":
                backend.update(token_env="FLEETGATE_TEST_API_TOKEN", headers={"X-Fleetgate-Test": "{machine}"})
            if kind == "hang":
                backend.update(timeout=1.0, retries=1)
            if kind == "down":
                backend["start_url"] = f"http://127.0.0.1:{free_port()}/start_vm"
            doc["backends"][f"api-{kind}"] = backend
            doc["machines"][kind] = {"backend": f"api-{kind}", "user": alice["user"], "host_key": alice["host_key"],
                                     "ssh_port": vm_ports[kind], "boot_timeout": 30}
        doc["users"]["tester"] = {"authorized_keys_file": "client_key.pub", "machines": list(kinds)}

    fleet, cfg = make_fleet(tmp_path, patch=patch, isolation="none")  # the "VMs" are host sshds
    provider = ProcessBackend(BackendConfig("vm-provider", "process", MappingProxyType({"isolation": "none"})), Path,
                              tmp_path / "vm-provider")
    api.provider = provider
    api.vms = {k: vm_machine(k, vm_ports[k], fleet.dir) for k in kinds}
    await start_gateway(nursery, fleet, cfg)
    return fleet, api


@pytest.mark.e2e
async def test_seed_contract_json_and_plain_text_and_retry_land_on_the_vm(tmp_path, nursery, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    fleet, api = await api_gateway(tmp_path, nursery, GOOD, monkeypatch)
    try:
        # The gateway asked the API for json's status at start-up (reconcile): stopped.
        assert api.count("json", "status") >= 1
        assert fleet.machine("json").state.value == "stopped"
        for kind in GOOD:
            vm_port = api.vms[kind].options["port"]
            r = await run(fleet.ssh(f"tester+{kind}", 'echo "landed on port ${SSH_CONNECTION##* }"'))
            assert (r.returncode, r.out) == (0, f"landed on port {vm_port}\n"), (kind, r.err)
            assert f"fleetgate: starting {kind} (http)" in r.err
            assert fleet.metric("fleetgate_wakes_total", backend=f"api-{kind}", result="success") == 1
            assert fleet.metric("fleetgate_boot_latency_seconds_count", backend=f"api-{kind}") == 1
            for reason in ("start_error", "backend_unreachable"):
                assert fleet.metric("fleetgate_wake_failures_total", backend=f"api-{kind}", reason=reason) == 0
        # The seed's POST, with the machine in the JSON body, the bearer token and the configured headers.
        start = next(s for s in api.seen if s.path == "/json/start_vm")
        assert start.method == "POST" and json.loads(start.body) == {"machine": "json"}
        assert start.headers["authorization"] == f"Bearer {JSON_TOKEN}"
        text = next(s for s in api.seen if s.path == "/text/start_vm")
        assert text.headers["authorization"] == f"Bearer {TEXT_TOKEN}"
        assert text.headers["x-fleetgate-test"] == "text"
        # 500 then 200: retried once, and the user never saw the hiccup as a failure.
        assert api.count("flaky") == 2

        # Stop goes to stop_url; the VM is really gone and status says so.
        running = fleet.running
        assert await running.fleet.stop("json")
        assert api.count("json", "stop_vm") == 1
        assert await api.provider.status(api.vms["json"]) is PowerState.STOPPED
        backend = running.fleet.machines["json"].backend
        assert await backend.status(running.fleet.machines["json"].config) is PowerState.STOPPED
    finally:
        for vm in api.vms.values():
            await api.provider.stop(vm)
    logged = caplog.text
    assert "http backend op=start machine=json" in logged
    assert JSON_TOKEN not in logged and TEXT_TOKEN not in logged


STATUS_KEY = token("sk-status-query-7c3e")


@pytest.mark.e2e
async def test_no_query_string_secret_in_any_log_line(tmp_path, nursery, monkeypatch, caplog):
    """Issue 25 item 5: httpx logged `HTTP Request: GET ...?api_key=SECRET` at INFO on every
    reconcile, next to fleetgate's own redacted line. The gateway now sets httpx to WARNING
    (DEBUG only when asked, then with query values redacted); conftest also checks every line."""
    caplog.set_level(logging.INFO)
    fleet, api = await api_gateway(tmp_path, nursery, ("json",), monkeypatch, status_query=f"?api_key={STATUS_KEY}")
    try:
        r = await run(fleet.ssh("tester+json", "true"))
        assert r.returncode == 0, r.err
        assert await fleet.running.fleet.stop("json")
    finally:
        for vm in api.vms.values():
            await api.provider.stop(vm)
    status = [s for s in api.seen if s.path == "/json/status"]
    assert status and all(s.query == f"api_key={STATUS_KEY}" for s in status)  # the API got its key
    assert STATUS_KEY not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))], \
        "httpx's per-request lines are off at INFO"


@pytest.mark.e2e
async def test_garbage_hang_5xx_and_refused_are_clear_wake_failures(tmp_path, nursery, monkeypatch, caplog):
    fleet, api = await api_gateway(tmp_path, nursery, BAD, monkeypatch)
    bob = await Session(fleet.ssh("bob", "echo ready; cat")).open(nursery)  # another user, mid-session
    expected = {
        "html": ("start_error", "not an IP address: '<!DOCTYPE html><html><body>Welcome to nginx!"),
        "empty": ("start_error", "empty answer"),
        "badip": ("start_error", "not an IP address: '192.168.0.999'"),
        "nofield": ("start_error", "JSON answer has no string field 'vm_ip'"),
        "hang": ("backend_unreachable", "failed (2 times): no answer within 1 s"),
        # An answer, even 5xx, is not "unreachable": on-call looks at the API, not the network (issue 14).
        "fail503": ("backend_error", "answered HTTP 503 (3 times): HTTP 503: '<html><body><h1>503 Service Unavailable"),
        "down": ("backend_unreachable", "failed (3 times): ConnectError"),
    }
    results = {}

    async def attempt(kind: str) -> None:
        results[kind] = await run(fleet.ssh(f"tester+{kind}", "true"), timeout=60)

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for kind in BAD:
                clients.start_soon(attempt, kind)
    shown = {"start_error": "the API's start answer is unusable (error id ", "backend_unreachable": " failed (",
             "backend_error": " answered HTTP 503 ("}
    for kind, (reason, words) in expected.items():
        r = results[kind]
        assert r.returncode == 255, (kind, r.out, r.err)
        assert f"fleetgate: {kind} could not be started:" in r.err, (kind, r.err)
        # The user gets a short reason and an error id; the API's answer is in the log line with that id.
        assert shown[reason] in r.err and words not in r.err, (kind, r.err)
        error_id = re.search(r"\(error id ([0-9a-f]{8})\)", r.err).group(1)
        assert any(f"error_id={error_id}" in line and words in line for line in caplog.text.splitlines()), kind
        assert fleet.metric("fleetgate_wake_failures_total", backend=f"api-{kind}", reason=reason) == 1, kind
        for other in {"start_error", "backend_unreachable", "backend_error"} - {reason}:
            assert fleet.metric("fleetgate_wake_failures_total", backend=f"api-{kind}", reason=other) == 0, kind
        assert fleet.machine(kind).state.value == "failed"
    assert api.count("hang") == 2 and api.count("fail503") == 3
    # Every request is visible, retries included, by the class of its answer (none: no answer at all).
    requests = {(kind, cls): fleet.metric("fleetgate_backend_requests_total", backend=f"api-{kind}", op="start",
                                          status_class=cls) or 0 for kind in BAD for cls in ("none", "2xx", "5xx")}
    assert requests[("fail503", "5xx")] == 3 and requests[("fail503", "none")] == 0
    assert requests[("down", "none")] == 3 and requests[("hang", "none")] == 2
    assert requests[("html", "2xx")] == 1
    # A second try within the failure cooldown is told so, and does not hammer the API again.
    r = await run(fleet.ssh("tester+hang", "true"))
    assert r.returncode == 255 and "fleetgate retries in" in r.err, r.err
    assert fleet.metric("fleetgate_wake_failures_total", backend="api-hang", reason="cooldown") == 1
    assert api.count("hang") == 2
    # Nothing else was disturbed: bob's session kept flowing through all of it.
    assert await bob.echo(b"still flowing\n") == b"still flowing\n"
    assert await bob.close() == 0


# -- the parsers and the config checks, without a gateway ---------------------------------------

@pytest.mark.parametrize("body, ip", [
    (b'{"vm_ip": "192.168.0.57"}', "192.168.0.57"),
    (b"192.168.0.57", "192.168.0.57"),
    (b"  192.168.0.57\r\n", "192.168.0.57"),
    (b'"10.0.0.5"', "10.0.0.5"),
    (b'{"vm_ip": "fd00::5", "other": 1}', "fd00::5"),
])
def test_start_answers_the_seed_allows(body, ip):
    assert parse_start_answer(body, "vm_ip") == ip


@pytest.mark.parametrize("body, words", [
    (b"", "empty answer"),
    (b"<html>502 Bad Gateway</html>", "not an IP address"),
    (b'{"vm_ip": 5}', "no string field 'vm_ip'"),
    (b'{"vm_ip": "0.0.0.0"}', "cannot be a machine's address"),
    (b"[1, 2]", "not an IP address"),
    (b"{not json", "not valid JSON"),
])
def test_start_answers_that_are_refused(body, words):
    with pytest.raises(ValueError, match=words):
        parse_start_answer(body, "vm_ip")


@given(st.binary(max_size=200))
def test_any_start_answer_is_an_ip_or_a_value_error(body):
    try:
        ip = parse_start_answer(body, "vm_ip")
    except ValueError as exc:
        assert str(exc)
    else:
        import ipaddress

        ipaddress.ip_address(ip)


def test_status_answers():
    assert parse_status_answer(b'{"status": "running", "vm_ip": "10.0.0.7"}', "status", "vm_ip") == \
        (PowerState.RUNNING, "10.0.0.7")
    assert parse_status_answer(b"shutoff\n", "status", "vm_ip") == (PowerState.STOPPED, None)
    assert parse_status_answer(b'{"state": "weird"}', "state", "vm_ip") == (PowerState.UNKNOWN, None)
    with pytest.raises(ValueError, match="no string field 'status'"):
        parse_status_answer(b'{"state": "running"}', "status", "vm_ip")


async def test_backend_without_status_or_stop_url_is_honest(tmp_path):
    b = HttpBackend(BackendConfig("api", "http", MappingProxyType({"start_url": "http://127.0.0.1:9/start_vm"})),
                    Path, tmp_path)
    m = vm_machine("vm", 2222, tmp_path)
    assert await b.status(m) is PowerState.UNKNOWN
    await b.stop(m)  # the seed's API has no stop: nothing to call, nothing fails
    with pytest.raises(BackendError, match="has not told fleetgate vm's address") as info:
        await b.address(m)
    assert info.value.reason == "start_error"
    await b.aclose()


@pytest.mark.parametrize("options, key, words", [
    ({}, "backends.api.start_url", "missing; the URL fleetgate POSTs"),
    ({"start_url": "ftp://x/start"}, "backends.api.start_url", "must be an http:// or https:// URL"),
    ({"start_url": "http://h/s", "start_method": "FETCH"}, "backends.api.start_method", "must be one of GET"),
    ({"start_url": "http://h/s", "token_file": "nope.token"}, "backends.api.token_file", "no such file"),
    ({"start_url": "http://h/s", "token_env": "NOT A NAME"}, "backends.api.token_env", "environment variable name"),
    ({"start_url": "http://h/s", "retries": -1}, "backends.api.retries", "whole number from 0 to 20"),
    ({"start_url": "http://h/s", "timeout": 0}, "backends.api.timeout", "seconds > 0"),
    ({"start_url": "http://h/s", "headers": {"X": 1}}, "backends.api.headers", "table of header names"),
    ({"start_url": "http://h/s", "colour": "blue"}, "backends.api.colour", "unknown key"),
])
@pytest.mark.e2e
def test_config_errors_name_the_key_and_the_fix(tmp_path, options, key, words):
    def patch(doc: dict) -> None:
        doc["backends"]["api"] = {"type": "http", **options}
        doc["machines"]["alice"]["backend"] = "api"
        for k in ("port", "host_key_file", "authorized_keys_file"):
            doc["machines"]["alice"].pop(k)

    with pytest.raises(ConfigError) as info:
        make_fleet(tmp_path, patch=patch)
    text = str(info.value)
    assert f"key '{key}': " in text and words in text, text


@pytest.mark.e2e
def test_machine_ssh_port_is_checked(tmp_path):
    def patch(doc: dict) -> None:
        doc["backends"]["api"] = {"type": "http", "start_url": "http://h/start_vm"}
        m = doc["machines"]["alice"]
        m.update(backend="api", ssh_port=70000)
        for k in ("port", "host_key_file", "authorized_keys_file"):
            m.pop(k)

    with pytest.raises(ConfigError, match=r"key 'machines.alice.ssh_port': must be a TCP port number"):
        make_fleet(tmp_path, patch=patch)
