"""The process backend's pid file: only "no such file" means stopped (issue 25).

Under descriptor exhaustion, reading the pid file failed with EMFILE and machines with hundreds
of live sessions were logged as "stopped outside fleetgate". Any other read error must make
the status call fail (the fleet then keeps the machine's state and logs the failure).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio

from fleetgate.backends.base import PowerState
from fleetgate.backends.process import ProcessBackend
from fleetgate.settings import BackendConfig, MachineConfig


def _backend_and_machine(tmp_path: Path) -> tuple[ProcessBackend, MachineConfig]:
    backend = ProcessBackend(BackendConfig("local", "process", {"isolation": "none"}), lambda p: Path(p),
                             tmp_path)
    machine = MachineConfig(name="box", backend="local", user=None, address=None, host_keys=(), known_hosts=None,
                            identity=None, boot_timeout=30.0, options={"port": 2301})
    return backend, machine


def test_no_pid_file_is_stopped(tmp_path):
    backend, machine = _backend_and_machine(tmp_path)
    assert trio.run(backend.status, machine) is PowerState.STOPPED


def test_a_pid_file_that_cannot_be_read_is_not_stopped(tmp_path, monkeypatch):
    backend, machine = _backend_and_machine(tmp_path)
    pidfile = backend._pidfile(machine)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text("12345 6789\n")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == pidfile:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(OSError) as exc:
        trio.run(backend.status, machine)
    assert exc.value.errno == errno.EMFILE


def test_a_proc_read_that_fails_for_lack_of_descriptors_is_not_stopped(tmp_path, monkeypatch):
    """Without a pid file the machine is looked for in /proc: EMFILE there must not read as gone."""
    backend, machine = _backend_and_machine(tmp_path)
    real = Path.read_bytes

    def read_bytes(self, *args, **kwargs):
        if str(self).startswith("/proc/") and str(self).endswith("/cmdline"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(OSError) as exc:
        trio.run(backend.status, machine)
    assert exc.value.errno == errno.EMFILE
