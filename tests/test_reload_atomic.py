"""Reloads are all or nothing, and `check` tells the truth about them (issue 10, item 3).

(A reload with a config that only fails at apply time is a row of the fault matrix,
tests/test_faults.py.) A property test: valid configs mutated at random (durations with and without units,
  inf/nan, key files of the wrong kind or mode, uncreatable state dirs, unknown names...):
  `check` ok ⇒ a gateway starts with it and a running gateway's reload applies it;
  `check` fails ⇒ the reload is refused and the old config stays in force.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fleetgate.app import App
from fleetgate.config import ConfigError, load
from helpers import make_fleet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.e2e


# -- the property test ---------------------------------------------------------------------

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else "inf" if v == math.inf else "-inf" if v == -math.inf else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def dump(doc: dict, prefix: str = "") -> str:
    out = [f"{k} = {_toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}{k}"
            if any(not isinstance(x, dict) for x in v.values()) or not v:
                out.append(f"\n[{name}]")
            out.append(dump(v, f"{name}."))
    return "\n".join(out) + "\n"


def _set(path: str, value):
    def apply(doc: dict, d) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return apply


def _chmod(name: str, mode: int):
    def apply(doc: dict, d) -> None:
        os.chmod(d / name, mode)
    return apply


MUTATIONS = [
    *(_set("gateway.login_grace", v) for v in (30, "90s", "15m", "1h", "2h", math.inf, math.nan, -1, 0, "soon")),
    *(_set("gateway.upstream_ca_key", v) for v in ("client_key", "upstream_key.pub", "missing_key")),
    *(_set("gateway.state_dir", v) for v in ("state", "state2", "/proc/fleetgate-state", "upstream_key/state")),
    *(_set("gateway.host_keys", v) for v in (["gateway_host_key"], ["gateway_host_key.pub"], [])),
    *(_set("gateway.ciphers", v) for v in (["aes128-gcm@openssh.com"], ["rot13"])),
    *(_set("gateway.keepalive_interval", v) for v in (15, "1m", math.inf)),
    *(_set("machines.alice.idle_timeout", v) for v in (60, "15m", math.inf, "400d", 0, "x")),
    *(_set("machines.alice.min_uptime", v) for v in (0, "2h", -5, math.nan)),
    *(_set("machines.bob.boot_timeout", v) for v in (30, "1m", math.inf)),
    *(_set("backends.local.start_delay", v) for v in (0, 0.5, math.inf, -1)),
    *(_set("limits.max_unauthenticated", v) for v in (1, 100, 0, "many")),
    *(_set("limits.penalty_window", v) for v in ("10m", "1d", math.nan)),
    _set("users.carol", {"authorized_keys_file": "client_key.pub", "machines": ["alice"]}),
    _set("users.carol", {"authorized_keys_file": "client_key.pub", "machines": ["nope"]}),
    _set("users.carol", {"authorized_keys": ["not a key"], "machines": ["alice"]}),
    *(_chmod(name, mode) for name in ("gateway_host_key", "upstream_key", "client_key")
      for mode in (0o600, 0o400, 0o640, 0o644)),
    # issue 25, item 8: each passed check and failed at run time
    _set("gateway.keepalive_interval", 1e-7),
    _set("gateway.admin_socket", "/tmp/" + "a" * 110 + ".sock"),
    _set("audit.file", "/proc/fleetgate-audit.log"),
    _set("machines.alice.user", "root"),
]
KEYS = ("gateway_host_key", "upstream_key", "client_key")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(range(len(MUTATIONS))), min_size=1, max_size=3))
def test_check_ok_means_serve_starts_and_reload_applies(tmp_path, mutations):
    d = tmp_path / "fleet"
    if not d.exists():
        make_fleet(tmp_path)
    base_text = (d / "fleetgate.toml.base").read_text() if (d / "fleetgate.toml.base").exists() else None
    if base_text is None:
        base_text = (d / "fleetgate.toml").read_text()
        (d / "fleetgate.toml.base").write_text(base_text)
    path = d / "fleetgate.toml"
    path.write_text(base_text)
    for name in KEYS:
        os.chmod(d / name, 0o600)
    base = load(path)
    doc = tomllib.loads(base_text)
    for i in mutations:
        MUTATIONS[i](doc, d)
    mutated = dump(doc)

    async def scenario() -> None:
        app = App(base, stop_machines_on_exit=True)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                running = await nursery.start(app.run)
            path.write_text(mutated)
            try:
                new = load(path)
            except ConfigError:
                new = None
            before = app.config
            applied = app.reload()
            event(f"check {'ok' if new is not None else 'fails'}")
            if new is None:
                assert applied is False, mutated
                assert app.config is before and running.gateway.config is before
            else:
                assert applied is True, mutated
                assert app.config is not before and running.gateway.config is app.config
                assert app.config.gateway.login_grace == new.gateway.login_grace
                assert set(running.fleet.machines) >= set(new.machines)
                # ... and a gateway starts with it (its own admin socket beside the first one's)
                second = App(dataclasses.replace(new, gateway=dataclasses.replace(
                    new.gateway, admin_socket=d / "second.sock")))
                async with trio.open_nursery() as inner:
                    with trio.fail_after(30):
                        started = await inner.start(second.run)
                    assert started.ssh_ports
                    started.shutdown.set()
            running.shutdown.set()

    trio.run(scenario)


async def test_serve_reports_a_start_failure_in_one_line(tmp_path):
    """A listen address already taken (something `check` cannot know) ends `serve` with one
    `error:` line and exit status 1, not a traceback."""
    import subprocess

    fleet, _ = make_fleet(tmp_path)
    taken = trio.socket.socket()
    await taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    text = fleet.config_path.read_text()
    assert 'listen = ["127.0.0.1:0"]' in text
    fleet.config_path.write_text(text.replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]'))
    with trio.fail_after(30):
        r = await trio.run_process([sys.executable, "-m", "fleetgate", "serve", "-c", str(fleet.config_path)],
                                   capture_stdout=True, capture_stderr=True, check=False)
    taken.close()
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"fleetgate cannot start with {fleet.config_path}: OSError" in errors[0], err


@pytest.mark.parametrize("change", [
    ("keepalive_interval = 30\n", "keepalive_interval = 1e-7\n"),
    ('state_dir = "state"\n', 'state_dir = "state"\nadmin_socket = "/tmp/' + "a" * 110 + '.sock"\n'),
    ("[backends.local]", '[audit]\nfile = "/proc/fleetgate-audit.log"\n\n[backends.local]'),
    ('user = "fg-alice"', 'user = "root"'),
], ids=["keepalive", "admin_socket", "audit_file", "root_user"])
async def test_a_reload_that_would_fail_at_run_time_is_refused(tmp_path, nursery, change):
    """Issue 25, item 8: each of these passed `check`, and a reload reported `reloaded`; the
    gateway then reset every login, could not bind its admin socket, lost its audit lines or
    refused alice's login. Now check fails, and so the reload is refused whole."""
    from helpers import run

    fleet, _ = make_fleet(tmp_path)
    path = fleet.config_path
    text = path.read_text()
    if "keepalive_interval" not in text:
        text = text.replace('state_dir = "state"\n', 'state_dir = "state"\nkeepalive_interval = 30\n')
        path.write_text(text)
    old, new = change
    if old == 'user = "fg-alice"' and old not in text:
        pytest.skip("machines are not isolated on this host")
    assert old in text
    app = App(load(path), stop_machines_on_exit=True)
    with trio.fail_after(30):
        fleet.running = await nursery.start(app.run)
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError):
        load(path)
    before = app.config
    assert app.reload() is False
    assert app.config is before and fleet.running.gateway.config is before
    r = await run(fleet.ssh("alice", "echo still-serving"))
    assert (r.returncode, r.out) == (0, "still-serving\n"), r.err
    fleet.running.shutdown.set()
