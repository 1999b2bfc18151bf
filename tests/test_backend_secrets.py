"""Backend secrets never reach users (issue 10, item 8); socket-free.

A failed HTTP start used to show the user the URL with its query string (`?api_key=...`)
and the API's answer; a failed command its stderr; and commands ran with the gateway's
whole environment. Now users get a short reason and an error id, the log line has the id
and the detail (query values redacted), and commands get a minimal environment.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest
import trio

from logsecrets import token
from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.backends.base import BackendError
from fleetgate.backends.command import CommandBackend
from fleetgate.backends.http import HttpBackend
from fleetgate.config import BackendConfig
from fleetgate.errors import WakeError

SECRET = token("sk-live-0123456789abcdef")  # configuration: never in a log line
BACKEND_SAID = "backend-said-0123456789"  # a backend's own output: the operator's log gets it
ERROR_ID = re.compile(r"\(error id ([0-9a-f]{8})\)")


def _command_backend(tmp_path: Path, **options) -> CommandBackend:
    return CommandBackend(BackendConfig("cmd", "command", MappingProxyType(options)),
                          lambda p: None if p is None else tmp_path / p, tmp_path)


async def test_command_stderr_goes_to_the_log_only_and_env_is_minimal(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETGATE_OTHER_BACKEND_TOKEN", SECRET)
    monkeypatch.setenv("AWS_PROFILE", "fleet")
    env_file = tmp_path / "env"
    script = tmp_path / "start.sh"
    script.write_text(f'#!/bin/sh\nenv > "{env_file}"\necho "auth failed for token {BACKEND_SAID}" >&2\nexit 3\n')
    script.chmod(0o700)
    b = _command_backend(tmp_path, start=[str(script), "{machine}"], pass_env=["AWS_PROFILE"])
    with pytest.raises(BackendError) as info:
        await b.start(machine_config("vm", backend="cmd"))
    shown = str(info.value)
    assert BACKEND_SAID not in shown and "auth failed" not in shown
    assert shown.startswith("start command exited with status 3 (error id ")
    assert ERROR_ID.search(shown).group(1) == info.value.error_id
    assert BACKEND_SAID in info.value.detail  # the operator's log gets the stderr tail
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    assert "FLEETGATE_OTHER_BACKEND_TOKEN" not in env
    assert env["FLEETGATE_MACHINE"] == "vm" and env["FLEETGATE_OP"] == "start"
    assert env["AWS_PROFILE"] == "fleet" and "PATH" in env


def test_command_pass_env_is_checked(tmp_path):
    problems = dict(CommandBackend.check_backend_options({"start": ["true"], "pass_env": ["OK", "not a name"]},
                                                         lambda p: tmp_path / p))
    assert "pass_env" in problems


async def test_http_start_failure_shows_no_query_string_nor_answer(tmp_path):
    seen = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(403, text='{"error": "key revoked", "account": "acme-prod"}')

    b = HttpBackend(BackendConfig("api", "http", MappingProxyType({
        "start_url": f"http://10.0.0.1:5000/start_vm?api_key={SECRET}&vm={{machine}}", "retries": 0})),
        lambda p: None, tmp_path)
    b._client = httpx.AsyncClient(transport=httpx.MockTransport(api))
    try:
        with pytest.raises(BackendError) as info:
            await b.start(machine_config("vm", backend="api"))
    finally:
        await b.aclose()
    assert SECRET in seen[0]  # the API did get its key
    shown = str(info.value)
    assert shown.startswith("POST http://10.0.0.1:5000/start_vm answered HTTP 403 (error id ")
    assert SECRET not in shown and "acme-prod" not in shown and "api_key" not in shown
    assert SECRET not in info.value.detail and "api_key=REDACTED" in info.value.detail
    assert "acme-prod" in info.value.detail


async def test_user_message_and_log_line_share_the_error_id(nursery, autojump_clock, caplog):
    class Leaky(FakeBackend):
        async def start(self, machine):
            raise BackendError("the API refused the start", "start_error", detail=f"token {BACKEND_SAID} revoked")

    fleet = make_fleet(nursery, Leaky(), machine_config("alice"))
    with caplog.at_level(logging.WARNING, logger="fleetgate.fleet"), pytest.raises(WakeError) as info:
        with trio.fail_after(60):
            await fleet.acquire("alice")
    message = info.value.message
    assert BACKEND_SAID not in message
    error_id = ERROR_ID.search(message).group(1)
    lines = [r.getMessage() for r in caplog.records if "wake failed" in r.getMessage()]
    assert len(lines) == 1 and f"error_id={error_id}" in lines[0] and BACKEND_SAID in lines[0]
