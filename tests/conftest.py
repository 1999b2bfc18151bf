import os
import signal
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


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
