"""One lock of every Python dependency, used everywhere (issue 19).

A fresh machine once resolved the newest cryptography and failed 13 tests that the CI
machine, with an older cryptography left installed, passed. Now scripts/setup.sh builds .venv
from requirements.lock alone; these check that the venv the tests run in is exactly the lock,
and that pyproject.toml and the lock cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import lockcheck  # noqa: E402


def lock_pins(path: Path) -> dict[str, str]:
    return lockcheck.read_lock(path)[0]


def test_pyproject_and_the_locks_agree():
    assert lockcheck.problems() == []


def test_the_venv_is_exactly_the_lock():
    """What pip says the interpreter running the tests has: the lock's pins, plus fleetgate
    itself installed editable from this checkout, nothing else (`pip freeze --all` to the letter)."""
    out = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    installed: dict[str, str] = {}
    editable: dict[str, str] = {}
    for dist in json.loads(out):
        name = lockcheck.normalize(dist["name"])
        if "editable_project_location" in dist:
            editable[name] = dist["editable_project_location"]
        else:
            installed[name] = dist["version"]
    assert {n: Path(p).resolve() for n, p in editable.items()} == {"fleetgate": REPO}
    assert installed == lock_pins(REPO / "requirements.lock")


def test_lockcheck_finds_a_dependency_missing_from_the_lock(tmp_path):
    text = (REPO / "pyproject.toml").read_text().replace('"h11>=0.14",', '"h11>=0.14",\n    "left-pad>=1.0",', 1)
    (tmp_path / "pyproject.toml").write_text(text)
    found = lockcheck.problems(tmp_path / "pyproject.toml", REPO / "requirements.lock")
    assert found == ["pyproject.toml needs left-pad>=1.0, which requirements.lock does not pin",
                     "requirements-runtime.lock lacks the runtime dependency left-pad"]


def test_lockcheck_finds_a_pin_outside_the_range_and_a_leftover(tmp_path):
    lock = (REPO / "requirements.lock").read_text()
    trio_version = lock_pins(REPO / "requirements.lock")["trio"]
    lock = lock.replace(f"trio=={trio_version} ", "trio==0.1.0 ", 1)
    lock += "left-pad==1.3.0 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via nothing-here\n"
    (tmp_path / "requirements.lock").write_text(lock)
    (tmp_path / "requirements-runtime.lock").write_text((REPO / "requirements-runtime.lock").read_text())
    found = lockcheck.problems(REPO / "pyproject.toml", tmp_path / "requirements.lock")
    assert "pyproject.toml needs trio>=0.35, requirements.lock pins trio==0.1.0" in found
    assert any("left-pad==1.3.0, which nothing in pyproject.toml needs" in f for f in found)
    assert any(f.startswith("requirements-runtime.lock pins trio==") for f in found)


@pytest.mark.parametrize("script", ["setup.sh", "lock.sh"])
def test_setup_installs_from_the_lock_only(script):
    """No resolver run at set-up: the lock with hashes, and fleetgate without its dependencies."""
    text = (REPO / "scripts" / script).read_text()
    if script == "setup.sh":
        assert "--require-hashes" in text and "-r requirements.lock" in text
        assert re.search(r"pip install[^\n]*--no-deps[^\n]*-e \.", text)
        assert "lockcheck.py" in text
    else:
        assert "--generate-hashes" in text and "pytest -m \"not e2e\"" in text
