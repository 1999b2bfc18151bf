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


# -- issue 25, item 8: what `check` passed and `serve` (or a login) then failed on -----------

def test_admin_socket_path_must_fit_a_unix_socket(d):
    long = "/tmp/" + "s" * 120 + ".sock"
    got = issues(d, doc(gateway={"admin_socket": long}))
    assert got == [("gateway.admin_socket", f"{long} is {len(long)} bytes; a Unix socket path must be at most "
                                            f"107 bytes; give a shorter path")]
    # The default, under a deep state_dir: the error says which key to set.
    deep = "/tmp/" + "d" * 100
    got = issues(d, doc(gateway={"state_dir": deep}))
    assert [k for k, _ in got] == ["gateway.admin_socket"], got
    assert "gateway.state_dir + /admin.sock" in got[0][1] and "set gateway.admin_socket" in got[0][1]
    cfg = parse(d, doc(gateway={"state_dir": deep, "admin_socket": "/tmp/fg-admin.sock"}))
    assert str(cfg.gateway.admin_socket) == "/tmp/fg-admin.sock"


@pytest.mark.parametrize("value", [1e-7, 0.5, "0.2s"])
def test_keepalive_interval_is_at_least_a_second(d, value):
    got = issues(d, doc(gateway={"keepalive_interval": value}))
    assert len(got) == 1 and got[0][0] == "gateway.keepalive_interval", got
    assert got[0][1].startswith("must be at least 1 second"), got
    assert parse(d, doc(gateway={"keepalive_interval": 1})).gateway.keepalive_interval == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="the account check compares with the gateway's account (root in CI)")
def test_isolated_process_machine_refuses_a_privileged_account(d):
    user = "root"
    got = issues(d, doc(machines__box2={"user": user}))
    assert [k for k, _ in got] == ["machines.box2.user"], got
    assert "root or the gateway's own account" in got[0][1] and 'user = "fg-box2"' in got[0][1]
    # An account that does not exist yet is created at start: fine. With isolation = "none"
    # the machine runs as the gateway's account anyway, so its user is not checked.
    parse(d, doc(machines__box2={"user": "fg-not-there-yet"}))
    parse(d, doc(backends__local={"isolation": "none"}, machines__box2={"user": user}))


def test_audit_file_must_be_appendable_or_creatable(d):
    got = issues(d, doc(audit={"file": "/proc/fleetgate-audit.log"}))
    assert len(got) == 1 and got[0][0] == "audit.file", got
    assert got[0][1].startswith("cannot create /proc/fleetgate-audit.log (in /proc)"), got
    got = issues(d, doc(audit={"file": str(d / "no-such-dir" / "audit.log")}))
    assert got == [("audit.file", f"cannot create {d / 'no-such-dir' / 'audit.log'}: {d / 'no-such-dir'} is not a "
                                  f"directory (the gateway creates the file, not its directory)")]
    got = issues(d, doc(audit={"file": str(d)}))
    assert got[0][0] == "audit.file" and "is a directory" in got[0][1]
    assert parse(d, doc(audit={"file": "audit.log"})).audit_file == d / "audit.log"
    assert not (d / "audit.log").exists()   # check creates nothing
    # In the state dir, which `serve` creates before it opens the audit log: fine before it exists.
    cfg = parse(d, doc(gateway={"state_dir": "state/deeper"}, audit={"file": "state/deeper/audit.log"}))
    assert cfg.audit_file == d / "state/deeper/audit.log" and not (d / "state").exists()
    assert parse(d, doc(audit={"file": "-"})).audit_file == "-"
    assert parse(d, doc(audit={"file": "/dev/full"})).audit_file == Path("/dev/full")  # opens; writes fail later


def test_check_command_refuses_each_of_them(d, capsys):
    for extra, key in ((f'\n[audit]\nfile = "/proc/fleetgate-audit.log"\n', "audit.file"),
                       ('', "gateway.keepalive_interval")):
        path = _write(d, extra)
        if not extra:
            path.write_text(path.read_text().replace('upstream_key = "upstream_key"\n',
                                                     'upstream_key = "upstream_key"\nkeepalive_interval = 1e-7\n'))
        assert cli.main(["check", "-c", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"error: {path}: key '{key}': " in err, err
