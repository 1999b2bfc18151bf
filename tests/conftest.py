import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


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
