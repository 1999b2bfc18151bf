"""Issue 13: routing and authorized keys from the team's own HTTP service (docs/webhooks.md).

A real HTTP service on loopback, started by each test (stdlib http.server in a thread),
the real OpenSSH client through a real gateway to real sshd machines. The user `carol`
is in no [users] table: her keys come from the keys webhook and her machine from the
route webhook, so every login here is decided by the service.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import trio

from logsecrets import token
from helpers import REPO, make_fleet, run, spawn_until, start_gateway

pytestmark = pytest.mark.e2e

TOKEN = token("s3cret-token-for-tests")
Answer = tuple[int, bytes]


def ok(doc: Any) -> Answer:
    return 200, json.dumps(doc).encode()


class Service:
    """The team's service: answers from `route` and `keys` (payload → (status, body)); counts calls."""

    def __init__(self) -> None:
        self.route: Callable[[dict], Answer] = lambda p: ok({"allow": True, "machine": "alice"})
        self.keys: Callable[[dict], Answer] = lambda p: ok({"keys": []})
        self.calls: dict[str, list[dict]] = {"/route": [], "/keys": []}
        self.release = threading.Event()  # a hanging answer waits for this (set at teardown)
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    status, out = 401, b"no token"
                elif self.path not in service.calls:
                    status, out = 404, b"no such path"
                else:
                    payload = json.loads(body)
                    service.calls[self.path].append(payload)
                    status, out = (service.route if self.path == "/route" else service.keys)(payload)
                    if status == 0:  # hang: a service that does not answer in time
                        service.release.wait(20)
                        status, out = 200, b"{}"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:
                    pass  # the gateway gave up waiting

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


async def webhook_gateway(tmp_path: Path, nursery, service: Service, **routing: Any):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)

    def patch(doc: dict) -> None:
        doc["routing"] = {"type": "webhook", "url": f"{service.url}/route", "keys_url": f"{service.url}/keys",
                          "timeout": 1, "token_file": str(token), **routing}

    fleet, cfg = make_fleet(tmp_path, patch=patch)
    client_pub = (fleet.dir / "client_key.pub").read_text().strip()
    service.keys = lambda p: ok({"keys": [client_pub]} if p["user"] == "carol" else {"keys": []})
    await start_gateway(nursery, fleet, cfg)
    return fleet


async def fingerprint(pub: Path) -> str:
    r = await run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)])
    return r.out.split()[1]


async def test_service_routes_a_user_the_config_does_not_know(tmp_path, nursery, service):
    fleet = await webhook_gateway(tmp_path, nursery, service)
    r = await run(fleet.ssh("carol", "echo hi from $(whoami); exit 3"))
    assert r.returncode == 3, r.err
    assert r.out.startswith("hi from ")
    assert fleet.backend_calls("start") == 1
    assert service.calls["/keys"] == [{"user": "carol"}]
    (payload,) = service.calls["/route"]
    assert payload == {"login": "carol", "user": "carol", "target": None, "source": "127.0.0.1",
                       "key": {"type": "ssh-ed25519", "fingerprint": await fingerprint(fleet.dir / "client_key.pub"),
                               "certificate": False}}
    assert fleet.metric("fleetgate_webhook_request_duration_seconds_count", kind="route", result="ok") == 1
    assert fleet.metric("fleetgate_webhook_request_duration_seconds_count", kind="keys", result="ok") == 1
    # An unknown user gets no keys from the service: refused like a wrong key, nothing asked of routing.
    r = await run(fleet.ssh("dave", "true"))
    assert r.returncode == 255 and "Permission denied" in r.err
    assert len(service.calls["/route"]) == 1


async def test_refusal_shows_the_services_message_and_wakes_nothing(tmp_path, nursery, service):
    fleet = await webhook_gateway(tmp_path, nursery, service)
    service.route = lambda p: ok({"allow": False, "message": "carol is on leave until Monday\x1b[2J"})
    r = await run(fleet.ssh("carol+bob", "true"))
    assert r.returncode == 255
    assert "fleetgate: carol is on leave until Monday" in r.err
    assert "\x1b" not in r.err  # the service's words are made printable
    assert service.calls["/route"][0]["target"] == "bob"
    assert fleet.backend_calls("start") == 0
    assert fleet.metric("fleetgate_webhook_request_duration_seconds_count", kind="route", result="refused") == 1
    assert fleet.metric("fleetgate_connections_total", result="routing_refused") == 1


@pytest.mark.parametrize("answer, says, result", [
    ((0, b""), "did not answer in time", "timeout"),
    ((500, b"Internal Server Error"), "failed", "error"),
    ((200, b"<html>not json</html>"), "gave an answer fleetgate cannot use", "bad_answer"),
    ((200, b'{"allow": "yes", "machine": "alice"}'), "gave an answer fleetgate cannot use", "bad_answer"),
    ((200, b'{"allow": true, "machine": "nosuch"}'), "gave an answer fleetgate cannot use", "bad_answer"),
    ((200, b'{"allow": true, "machine": "alice", "upstream_user": "root; rm -rf /"}'),
     "gave an answer fleetgate cannot use", "bad_answer"),
], ids=["timeout", "5xx", "not-json", "allow-not-bool", "unknown-machine", "bad-upstream-user"])
async def test_wrong_answers_refuse_clearly_and_never_wake(tmp_path, nursery, service, answer, says, result):
    fleet = await webhook_gateway(tmp_path, nursery, service)
    service.route = lambda p: answer
    with trio.fail_after(30):
        r = await run(fleet.ssh("carol", "true"))
    assert r.returncode == 255
    assert f"fleetgate: the routing service {says}; nothing was started, try again later (error id " in r.err, r.err
    assert fleet.backend_calls("start") == 0
    assert fleet.metric("fleetgate_webhook_request_duration_seconds_count", kind="route", result=result) == 1
    # Failures are not cached: once the service answers again, so does the gateway.
    service.route = lambda p: ok({"allow": True, "machine": "alice"})
    service.release.set()
    r = await run(fleet.ssh("carol", "echo back"))
    assert (r.returncode, r.out) == (0, "back\n"), r.err


async def test_key_service_failure_refuses_with_a_message(tmp_path, nursery, service):
    fleet = await webhook_gateway(tmp_path, nursery, service)
    service.keys = lambda p: (503, b"maintenance")
    r = await run(fleet.ssh("carol", "true"))
    assert r.returncode == 255
    assert "fleetgate: the key service failed; nothing was started, try again later (error id " in r.err, r.err
    assert "Permission denied" in r.err
    assert service.calls["/route"] == [] and fleet.backend_calls("start") == 0
    assert fleet.metric("fleetgate_webhook_request_duration_seconds_count", kind="keys", result="error") == 1
    # A malformed key list is no better.
    service.keys = lambda p: ok({"keys": ["ssh-ed25519 not-base64"]})
    r = await run(fleet.ssh("carol", "true"))
    assert r.returncode == 255 and "key service gave an answer fleetgate cannot use" in r.err, r.err
    assert fleet.backend_calls("start") == 0


async def test_login_storm_makes_one_call_per_webhook(tmp_path, nursery, service):
    # 30 key exchanges at once keep a shared 2-core machine busy: a timeout that fits it.
    fleet = await webhook_gateway(tmp_path, nursery, service, timeout=10)
    results = []

    async def login() -> None:
        results.append(await run(fleet.ssh("carol", "echo ok"), timeout=120))

    async with trio.open_nursery() as storm:
        for _ in range(30):
            storm.start_soon(login)
    assert [r.out for r in results] == ["ok\n"] * 30, [r.err for r in results if r.returncode]
    assert len(service.calls["/keys"]) == 1
    assert len(service.calls["/route"]) == 1
    assert fleet.backend_calls("start") == 1


async def test_the_documented_example_service_behind_a_gateway(tmp_path, nursery):
    """docs/examples/webhook_service.py as a user runs it: routes, jumps and refusals."""
    fleet, cfg = make_fleet(tmp_path)  # for its keys; the gateway below routes by the service
    client_pub = (fleet.dir / "client_key.pub").read_text().strip()
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"users": {
        "carol": {"keys": [client_pub], "machines": ["alice", "bob"]},
        "erin": {"keys": [client_pub], "machines": ["alice"]},
        "dave": {"keys": [client_pub], "machines": ["alice"], "disabled": "dave is on leave until Monday"},
    }}))
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    proc, out = await spawn_until([sys.executable, str(REPO / "docs" / "examples" / "webhook_service.py"),
                                   "--listen", "127.0.0.1:0", "--inventory", str(inventory),
                                   "--token-file", str(token)], b"\n", tmp_path / "service.log")
    try:
        url = "http://" + out.decode().split("listening on ", 1)[1].strip()

        def patch(doc: dict) -> None:
            doc["routing"] = {"type": "webhook", "url": f"{url}/route", "keys_url": f"{url}/keys",
                              "token_file": str(token)}
            del doc["users"]  # the service is the only source of users

        fleet, cfg = make_fleet(tmp_path, patch=patch)
        await start_gateway(nursery, fleet, cfg)
        r = await run(fleet.ssh("carol", "echo hi"))
        assert (r.returncode, r.out) == (0, "hi\n"), r.err
        assert fleet.machine("alice").state.value == "running" and fleet.machine("bob").state.value == "stopped"
        # Jumps follow the service's list of machines for the user.
        r = await run(["ssh", *fleet.ssh_opts(), "-W", "bob:22", "carol@127.0.0.1"], stdin=b"", timeout=30)
        assert r.returncode == 0 and r.out.startswith("SSH-2.0-"), r.err
        r = await run(["ssh", *fleet.ssh_opts(), "-W", "bob:22", "erin@127.0.0.1"], stdin=b"", timeout=30)
        assert r.returncode == 255 and "erin may not jump to bob:22" in r.err, r.err
        r = await run(fleet.ssh("carol+nosuch", "true"))
        assert r.returncode == 255 and "fleetgate: carol may not use nosuch" in r.err, r.err
        r = await run(fleet.ssh("dave", "true"))
        assert r.returncode == 255 and "fleetgate: dave is on leave until Monday" in r.err, r.err
        r = await run(fleet.ssh("mallory", "true"))
        assert r.returncode == 255 and "Permission denied" in r.err
    finally:
        proc.kill()
        await proc.wait()
