"""The command line prints only what fleetgate means to say (issue 19).

cryptography 51 deprecated DSA, and asyncssh touches DSA when it is imported: without the
entry point's filter (fleetgate/warnpolicy.py) every command began with ten lines of
CryptographyDeprecationWarning. These run the installed `fleetgate` script, as a user does,
in a fresh interpreter each, and read its stderr.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trio

from fleetgate.cli import build_parser
from fleetgate.warnpolicy import quiet_dependencies
from helpers import DemoProcess
from test_cli_check import materialize_example

FLEETGATE = Path(sys.executable).parent / "fleetgate"
SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLEETGATE), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_every_subcommand_is_listed():
    assert {"serve", "check", "demo", "status", "keygen"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("args", [["--help"], ["--version"]] + [[c, "--help"] for c in SUBCOMMANDS],
                         ids=lambda a: " ".join(a))
def test_help_prints_nothing_on_stderr(args, tmp_path):
    r = cli(*args, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.strip()


def test_keygen_and_check_print_nothing_on_stderr(tmp_path):
    r = cli("keygen", str(tmp_path / "key"), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.startswith("ssh-ed25519 ")
    path = materialize_example(tmp_path)
    r = cli("check", "-c", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")


def test_the_dependency_warning_is_real_and_only_the_entry_point_hides_it(tmp_path):
    """Without the filter the same interpreter prints the warnings: the tests above can fail."""
    code = "import asyncssh"
    loud = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "DeprecationWarning" in loud.stderr
    quiet = subprocess.run([sys.executable, "-W", "default", "-c",
                            f"from fleetgate.warnpolicy import quiet_dependencies; quiet_dependencies(); {code}"],
                           capture_output=True, text=True, timeout=60)
    assert quiet.stderr == ""


def test_fleetgate_own_warnings_still_show():
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_dependencies()
        exec(compile("import warnings; warnings.warn('ours', DeprecationWarning)", "fleetgate/x.py", "exec"),
             {"__name__": "fleetgate.x"})
        exec(compile("import warnings; warnings.warn('theirs', DeprecationWarning)", "lib/x.py", "exec"),
             {"__name__": "somelib.x"})
    assert [str(w.message) for w in seen] == ["ours"]


# A log record of ours: "2026-12-08 01:02:03,456 INFO fleetgate.app: ..." (logfmt.TEXT_FORMAT).
OWN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ fleetgate(\.[a-z_.]+)?: ")


@pytest.mark.e2e
async def test_demo_first_screen_has_no_warning(tmp_path):
    async with DemoProcess(tmp_path / "demo") as demo:
        assert "ssh " in demo.banner
        assert "Warning" not in demo.banner
    log = demo.log.read_text().splitlines()
    assert log, "the demo logged nothing at all"
    strangers = [line for line in log if not OWN_LINE.match(line)]
    assert strangers == [], "\n".join(log)


# -- the suite's own rules: checked by running pytest on probe modules --------------------------

REPO = Path(__file__).resolve().parent.parent


def _pytest_on(tmp_path: Path, module: str, *, conftest: bool = False) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(module)
    if conftest:
        for helper in ("conftest.py", "logsecrets.py"):
            (tmp_path / helper).write_text((REPO / "tests" / helper).read_text())
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_a_warning_from_fleetgate_fails_the_test(tmp_path):
    r = _pytest_on(tmp_path, "def test_x():\n    exec(compile(\"import warnings; warnings.warn('ours', "
                             "DeprecationWarning)\", 'fleetgate/x.py', 'exec'), {'__name__': 'fleetgate.x'})\n")
    assert r.returncode == 1 and "DeprecationWarning: ours" in r.stdout, r.stdout


def test_a_module_that_runs_a_program_at_import_is_refused(tmp_path):
    r = _pytest_on(tmp_path, "import subprocess\nsubprocess.run(['true'])\ndef test_x():\n    pass\n", conftest=True)
    assert r.returncode != 0 and "called while pytest collects tests" in r.stdout, r.stdout
    # A library that runs ldconfig while it is imported (asyncssh looks for liboqs) is not refused.
    r = _pytest_on(tmp_path, "import asyncssh\ndef test_x():\n    import subprocess\n"
                             "    subprocess.run(['true'], check=True)\n", conftest=True)
    assert r.returncode == 0, r.stdout
