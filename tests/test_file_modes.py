"""File modes (issue 10, item 10), socket-free: what the gateway creates is private whatever
the umask (the Docker image sets none, i.e. 022): the audit log 0600, directories 0700."""

from __future__ import annotations

import os
import stat

import pytest

from fleetgate import private
from fleetgate.audit import AuditLog
from fleetgate.keys import ensure_key
from fleetgate.metrics import Metrics


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_audit_log_is_created_0600(tmp_path, umask_022):
    audit = AuditLog(tmp_path / "audit.log", Metrics())
    audit.write("session_start", user="alice", machine="box", peer="198.51.100.7:5555")
    audit.close()
    assert mode(tmp_path / "audit.log") == 0o600
    assert '"user":"alice"' in (tmp_path / "audit.log").read_text()


def test_an_existing_audit_log_keeps_the_operators_mode(tmp_path, umask_022):
    (tmp_path / "audit.log").write_text("")
    os.chmod(tmp_path / "audit.log", 0o640)  # a log shipper's group may read it: the operator's choice
    audit = AuditLog(tmp_path / "audit.log", Metrics())
    audit.write("session_start", user="alice")
    audit.close()
    assert mode(tmp_path / "audit.log") == 0o640


def test_state_dirs_and_keys_are_private(tmp_path, umask_022):
    private.makedirs(tmp_path / "a" / "b" / "state")
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/state")] == [0o700] * 3
    ensure_key(tmp_path / "keys" / "host_key")
    assert mode(tmp_path / "keys") == 0o700 and mode(tmp_path / "keys" / "host_key") == 0o600
