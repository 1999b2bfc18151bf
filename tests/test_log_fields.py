"""Log field spoofing (issue 10, item 11): a client-chosen login name cannot forge fields.

`ssh 'alice+x peer=203.0.113.9:22 user=bob'@gateway` authenticates as alice and asks for a
machine named `x peer=203.0.113.9:22 user=bob`. The refusal is logged with the login's
fields; read back as logfmt (shlex.split, as Loki/Vector do) or as JSON, `user` is alice and
no `peer` field appears.
"""

from __future__ import annotations

import json
import shlex

import pytest

from helpers import ServeProcess, make_fleet, run

pytestmark = pytest.mark.e2e

SPOOF = "alice+x peer=203.0.113.9:22 user=bob"


def fields(line: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word in shlex.split(line.split(": ", 1)[1]):
        if "=" in word:
            key, value = word.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


async def _refused_line(tmp_path, nursery, *log_args: str) -> str:
    fleet, _ = make_fleet(tmp_path)
    serve = ServeProcess(fleet.config_path)
    serve.argv[serve.argv.index("serve"):serve.argv.index("serve")] = list(log_args)
    await serve.start(nursery)
    try:
        r = await run(["ssh", *fleet.ssh_opts(serve.port), "-l", SPOOF, "127.0.0.1", "true"])
        assert r.returncode == 255, r.err
        return await serve.wait_for("routing refused")
    finally:
        await serve.kill()


async def test_text_log_quotes_a_login_name_with_spaces(tmp_path, nursery):
    line = await _refused_line(tmp_path, nursery)
    f = fields(line)
    assert f["user"] == ["alice"], line
    assert f["target"] == ["x peer=203.0.113.9:22 user=bob"], line
    assert "peer" not in f, line


async def test_json_logs(tmp_path, nursery):
    line = await _refused_line(tmp_path, nursery, "--log-format", "json")
    doc = json.loads(line)
    assert doc["level"] == "INFO" and doc["logger"] == "fleetgate.login"
    assert doc["fields"] == {"user": "alice", "target": "x peer=203.0.113.9:22 user=bob"}
