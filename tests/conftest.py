import logging
import os
import signal
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import logsecrets  # noqa: E402  (tests/ is on the path only from here)


# -- nothing runs at collection ----------------------------------------------------------------
# A test module that runs a program or asks the machine something when it is imported sees the
# machine as it is before any fixture set it up: on a fresh machine that differs from the second
# run (`sshd -T` printed nothing before host keys existed). While pytest collects, starting a
# process is refused; fixtures ask the machine when the tests run.
_collecting = False
_SPAWNERS = [(subprocess.Popen, "__init__"), (os, "system"), (os, "popen"), (os, "posix_spawn"),
             (os, "posix_spawnp"), (os, "fork"), (os, "execv"), (os, "execve")]


_STDLIB = sysconfig.get_paths()["stdlib"]
_LIBRARIES = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])


def _spawned_by_our_code() -> bool:
    """Whether the innermost caller outside the standard library is ours (tests/, fleetgate/)
    rather than a library that looks itself up at import (asyncssh asks ldconfig for liboqs)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_STDLIB) or path.startswith(_LIBRARIES):
            return not path.startswith(_LIBRARIES) and not path.startswith("<")
        frame = frame.f_back
    return False


def _refuse_at_collection(name: str, real):
    def guarded(*args, **kwargs):
        if _collecting and _spawned_by_our_code():
            raise AssertionError(f"{name} called while pytest collects tests (at a test module's import); "
                                 "run it from a fixture instead")
        return real(*args, **kwargs)
    guarded.__wrapped__ = real
    return guarded


for _owner, _name in _SPAWNERS:
    if hasattr(_owner, _name):
        setattr(_owner, _name, _refuse_at_collection(f"{getattr(_owner, '__name__', _owner)}.{_name}",
                                                     getattr(_owner, _name)))


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    global _collecting
    _collecting = True
    try:
        return (yield)
    finally:
        _collecting = False


def _no_network(*args, **kwargs):
    raise AssertionError("a test outside the e2e tier opened a network connection or listener; "
                         "mark its module `pytestmark = pytest.mark.e2e` or fake the network")


@pytest.fixture(autouse=True)
def fast_tier_has_no_sockets(request, monkeypatch):
    """The fast tier (`pytest -m "not e2e"`) runs without sockets: connect and bind are refused
    there, so a test that needs the network must say so with the e2e marker."""
    if request.node.get_closest_marker("e2e") is None:
        for name in ("connect", "connect_ex", "bind"):
            monkeypatch.setattr(socket.socket, name, _no_network)
    yield


class _SecretWatch(logging.Handler):
    """Every log record the in-process gateways emit, checked for the tests' secrets."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            return
        if logsecrets.TOKENS and logsecrets.found_in(text):
            self.leaks.append(f"{record.name}: {text}")


_SECRET_WATCH = _SecretWatch()
logging.getLogger().addHandler(_SECRET_WATCH)


@pytest.fixture(autouse=True)
def no_secret_in_logs(tmp_path):
    """No configured secret in any log line: in-process records, and logs left in tmp_path."""
    _SECRET_WATCH.leaks.clear()
    yield
    leaks = list(_SECRET_WATCH.leaks)
    for path in tmp_path.rglob("*.log"):
        try:
            for line in path.read_text(errors="replace").splitlines():
                if logsecrets.found_in(line):
                    leaks.append(f"{path.relative_to(tmp_path)}: {line}")
        except OSError:
            continue
    assert not leaks, "a configured secret reached a log line:\n" + "\n".join(leaks[:5])


@pytest.fixture
def many_fds():
    """The test process itself holds ~1,200 descriptors (a gateway under prlimit 1024 and its
    attackers): its soft limit raised for the test, then put back."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the test process needs ~1,200 descriptors; its hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(autouse=True)
def reap_strays(tmp_path):
    """After each test, kill whatever still runs from its tmp dir (sshds, QEMU guests left
    by a gateway that was SIGKILLed on purpose): tests never leak processes into later ones."""
    yield
    mark = str(tmp_path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if mark in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
