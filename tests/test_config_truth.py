"""`fleetgate check` is the whole truth (issue 10, item 3), socket-free: what `serve` or a
SIGHUP would trip over later is an error of `check` now."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from fleetgate import cli, fdlimit
from fleetgate.keys import ensure_key
from test_cli_check import write_keys
from test_config import doc, issues, parse


@pytest.fixture
def d(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    return tmp_path


def test_upstream_ca_key_must_be_a_private_key(d):
    # It used to pass check and kill the process at the next SIGHUP (KeyImportError).
    got = issues(d, doc(gateway={"upstream_ca_key": "upstream_key.pub"}))
    assert [k for k, _ in got] == ["gateway.upstream_ca_key"]
    assert "is not an unencrypted OpenSSH private key" in got[0][1]
    ensure_key(d / "ca")
    assert parse(d, doc(gateway={"upstream_ca_key": "ca"})).gateway.upstream_ca_key == d / "ca"


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_durations_are_finite(d, value):
    # TOML's `login_grace = inf` kept unauthenticated connections forever.
    got = issues(d, doc(gateway={"login_grace": value}))
    assert got[0][0] == "gateway.login_grace" and "finite" in got[0][1], got


def test_durations_are_in_range(d):
    assert issues(d, doc(gateway={"login_grace": "2h"})) == [
        ("gateway.login_grace", "must be at most 3600 seconds, got 7200")]
    assert issues(d, doc(machines__box1={"idle_timeout": "400d"}))[0][0] == "machines.box1.idle_timeout"


def test_backend_durations_are_finite(d):
    got = issues(d, doc(backends__local={"start_delay": math.inf}))
    assert got[0][0] == "backends.local.start_delay", got


def test_durations_take_units(d):
    cfg = parse(d, doc(gateway={"login_grace": "90s", "drain_timeout": "2m", "reconcile_interval": 45},
                       machines__box1={"idle_timeout": "15m", "min_uptime": "2h", "boot_timeout": "1.5m"},
                       limits={"penalty_window": "1d"}))
    box1 = cfg.machines["box1"]
    assert (cfg.gateway.login_grace, cfg.gateway.drain_timeout, cfg.gateway.reconcile_interval) == (90, 120, 45)
    assert (box1.idle_timeout, box1.min_uptime, box1.boot_timeout) == (900, 7200, 90)
    assert cfg.limits.penalty_window == 86400


def test_demo_flags_take_units():
    args = cli.build_parser().parse_args(["demo", "--boot-delay", "2s", "--idle-timeout", "15m",
                                          "--min-uptime", "0"])
    assert (args.boot_delay, args.idle_timeout, args.min_uptime) == (2, 900, 0)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--idle-timeout", "forever"])


@pytest.mark.parametrize("key_path", ["gateway_host_key", "upstream_key"])
def test_private_keys_others_can_read_are_refused(d, key_path):
    os.chmod(d / key_path, 0o644)
    got = issues(d, doc())
    assert len(got) == 1 and "accessible by group or others (mode 0644)" in got[0][1]
    assert f"chmod 600 {d / key_path}" in got[0][1]


def test_state_dir_must_be_creatable(d):
    (d / "afile").write_text("")
    got = issues(d, doc(gateway={"state_dir": "afile/state"}))
    assert got == [("gateway.state_dir", f"cannot create {d / 'afile/state'}: {d / 'afile'} is not a directory")]
    got = issues(d, doc(gateway={"state_dir": "/proc/fleetgate-state"}))  # not writable, even for root
    assert got[0][0] == "gateway.state_dir" and got[0][1].startswith("cannot create /proc/fleetgate-state"), got
    assert not (d / "state").exists()
    parse(d, doc())  # the default (next to the config) is creatable; check creates nothing
    assert not (d / "state").exists()


def test_limit_defaults_follow_the_descriptor_budget(d):
    assert fdlimit.default_max_unauthenticated(1024) == 240
    assert fdlimit.default_max_unauthenticated(1 << 20) == 1024
    assert fdlimit.default_http_connections(1024) == 60
    assert parse(d, doc()).limits.max_unauthenticated == fdlimit.default_max_unauthenticated()
    assert fdlimit.check(240, 60, 1024) == []
    assert "more than the open-file limit (1024" in fdlimit.check(1024, 60, 1024)[0]



def _write(d: Path, extra: str) -> Path:
    text = (Path(__file__).parent / "configs" / "valid.toml").read_text() + extra
    path = d / "fleetgate.toml"
    path.write_text(text)
    return path


def test_check_warns_about_the_descriptor_budget(d, capsys):
    path = _write(d, "\n[limits]\nmax_unauthenticated = 1000000\n")
    assert cli.main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: limits.max_unauthenticated (1000000)" in err and "open-file limit" in err


def test_serve_reports_a_bad_config_in_lines_without_traceback(d, capsys):
    path = _write(d, '\n[audit]\nfile = "audit.log"\n')
    os.chmod(d / "upstream_key", 0o640)
    assert cli.main(["serve", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: {path}: key 'gateway.upstream_key': {d / 'upstream_key'} is accessible by group or others "
        f"(mode 0640); a private key must be readable only by the gateway's account: chmod 600 {d / 'upstream_key'}"]
