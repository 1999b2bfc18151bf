"""`fleetgate check` and `serve`, run as a user runs them, on broken configs and on the documented example.

Each broken config in tests/configs/ differs from valid.toml in one way (or, for
broken-several.toml, many). The expected output is exact: an operator reads these lines,
so the file, the dotted key and the advice are the product, not an implementation detail.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleetgate.backends import BACKEND_TYPES
from fleetgate.config import load
from fleetgate.keys import ensure_key, public_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
EXAMPLE = REPO / "docs" / "config.example.toml"
REFERENCE = REPO / "docs" / "config.md"


def fleetgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh interpreter, bounded in time."""
    return subprocess.run([sys.executable, "-m", "fleetgate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def write_keys(d: Path) -> None:
    """The key files every config in tests/configs/ refers to, relative to the config."""
    upstream = public_line(ensure_key(d / "upstream_key"))
    ensure_key(d / "gateway_host_key")
    ensure_key(d / "client_key")
    for name, port in (("box1", 2301), ("box2", 2302)):
        host = public_line(ensure_key(d / "machines" / name / "ssh_host_ed25519_key"))
        (d / "machines" / name / "authorized_keys").write_text(upstream + "\n")
        (d / "machines" / name / "known_hosts").write_text(f"[127.0.0.1]:{port} {host}\n")


@pytest.fixture
def keyed(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    return tmp_path


def place(d: Path, name: str) -> Path:
    path = d / name
    shutil.copyfile(CONFIGS / name, path)
    return path


# name → the exact error lines, with {d} for the config's directory and {f} for its path.
BROKEN: dict[str, list[str]] = {
    "broken-syntax.toml": [
        "{f}: TOML syntax error: Expected ']' at the end of a table declaration (at line 7, column 16)",
    ],
    "broken-unknown-key.toml": [
        "{f}: key 'users.bob.machine': unknown key; allowed here: authorized_keys, authorized_keys_file, machines",
        "{f}: key 'users.bob.machines': missing; this key is required",
    ],
    "broken-unknown-machine.toml": [
        "{f}: key 'users.alice.machines': no machine named 'box3'; known: box1, box2",
    ],
    "broken-unpinned-machine.toml": [
        "{f}: key 'machines.box2.host_key': missing; pin the machine's SSH host key "
        "(host_key = \"ssh-ed25519 AAAA...\" or a .pub path) or give known_hosts = PATH "
        "or host_ca_key = \"ssh-ed25519 AAAA...\" (a host CA); fleetgate never connects to an unverified machine",
    ],
    "broken-bad-listen.toml": [
        "{f}: key 'gateway.listen[0]': '127.0.0.1:99999' is not HOST:PORT "
        "(for example 127.0.0.1:2222 or [::1]:2222)",
    ],
    "broken-missing-host-key-file.toml": [
        "{f}: key 'gateway.host_keys[0]': no such file {d}/keys/gateway_host_key; "
        "create one with 'fleetgate keygen {d}/keys/gateway_host_key'",
    ],
    "broken-wrong-type.toml": [
        "{f}: key 'machines.box1.port': must be a TCP port number, got '2301'",
        "{f}: key 'machines.box1.boot_timeout': '2 min' is not a duration such as 90, \"90s\", \"15m\", "
        "\"2h\" or \"1d\"",
    ],
    "broken-public-as-private.toml": [
        "{f}: key 'gateway.upstream_key': {d}/upstream_key.pub is not an unencrypted OpenSSH private key "
        "(Invalid private key); point at the private key (not the .pub) or create one with 'fleetgate keygen PATH'",
    ],
    "broken-several.toml": [
        "{f}: key 'gateway.listen[1]': 'nowhere' is not HOST:PORT (for example 127.0.0.1:2222 or [::1]:2222)",
        "{f}: key 'gateway.window': must be between 32768 and 1073741824",
        "{f}: key 'gateway.forwarding': must be 'local' (-L to the machine's own services), "
        "'any' (the machine's sshd decides) or 'none', got 'all'",
        "{f}: key 'metrics.listen': 'localhost:http' is not HOST:PORT (for example 127.0.0.1:2222 or [::1]:2222)",
        "{f}: key 'backends.cloud.type': unknown backend type 'ec3'; known: {types}",
        "{f}: key 'machines.box1.idle_timeout': must be greater than 0, got 0.0",
        "{f}: key 'machines.box2.known_hosts': no such file {d}/machines/box2/known_hosts_missing",
        "{f}: key 'users.alice.authorized_keys[0]': 'ssh-ed25519 not-base64' is not an OpenSSH public key "
        "(Invalid public key)",
        "{f}: key 'users.alice.machines': no machine named 'box9'; known: box1, box2",
        "{f}: key 'users.Bob+x': user names are lower-case letters, digits, '_', '.' and '-' (no '+')",
    ],
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_check_prints_every_error_precisely_and_fails(keyed: Path, name: str) -> None:
    path = place(keyed, name)
    r = fleetgate("check", "-c", str(path), cwd=keyed)
    assert r.returncode == 1, r
    types = ", ".join(sorted(BACKEND_TYPES))
    expected = [f"error: {line.format(d=keyed, f=path, types=types)}" for line in BROKEN[name]]
    expected.append(f"{path}: {len(expected)} error(s); nothing was started")
    assert r.stderr.splitlines() == expected
    assert r.stdout == ""


def test_check_accepts_the_valid_config(keyed: Path) -> None:
    path = place(keyed, "valid.toml")
    r = fleetgate("check", "-c", str(path), cwd=keyed)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{path}: ok (2 users, 2 machines, 1 backends)\n", "")


def test_check_resolves_paths_against_the_config_not_the_working_directory(keyed: Path, tmp_path_factory) -> None:
    path = place(keyed, "valid.toml")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    r = fleetgate("check", "-c", str(path.relative_to(keyed.parent)), cwd=keyed.parent)
    assert r.returncode == 0, r.stderr
    r = fleetgate("check", "-c", str(path), cwd=elsewhere)
    assert r.returncode == 0, r.stderr


def test_check_on_a_missing_file(tmp_path: Path) -> None:
    r = fleetgate("check", "-c", "nope.toml", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: nope.toml: cannot read config: No such file or directory",
        "nope.toml: 1 error(s); nothing was started",
    ]


def test_serve_refuses_a_broken_config_before_listening(keyed: Path) -> None:
    path = place(keyed, "broken-unpinned-machine.toml")
    r = fleetgate("serve", "-c", str(path), cwd=keyed)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"error: {line.format(d=keyed, f=path)}" for line in
                                     BROKEN["broken-unpinned-machine.toml"]]
    assert not (keyed / "state").exists()  # no backend was built, nothing was written


# -- the documented example ----------------------------------------------------------------

def materialize_example(d: Path) -> Path:
    """Copy docs/config.example.toml into d and create every file it refers to."""
    path = d / "fleetgate.toml"
    shutil.copyfile(EXAMPLE, path)
    doc = tomllib.loads(path.read_text())
    g = doc["gateway"]
    for p in g["host_keys"]:
        ensure_key(d / p)
    upstream = public_line(ensure_key(d / g["upstream_key"]))
    ca = doc["user_ca"]["keys_file"]
    (d / ca).write_text("# extra CA\n" + public_line(ensure_key(d / "ca_private")) + "\n")
    for m in doc["machines"].values():
        host = public_line(ensure_key(d / m["host_key_file"]))
        auth = upstream
        if "identity" in m:
            auth = public_line(ensure_key(d / m["identity"]))
        (d / m["authorized_keys_file"]).write_text(auth + "\n")
        if "known_hosts" in m:
            (d / m["known_hosts"]).write_text(f"[127.0.0.1]:{m['port']} {host}\n")
    for u in doc["users"].values():
        if "authorized_keys_file" in u:
            f = d / u["authorized_keys_file"]
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("# alice's laptop\n" + public_line(ensure_key(d / "alice_key")) + "\n")
    return path


def test_documented_example_passes_check(tmp_path: Path) -> None:
    path = materialize_example(tmp_path)
    r = fleetgate("check", "-c", str(path), cwd=tmp_path)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"{path}: ok (3 users, 2 machines, 1 backends)\n"
    cfg = load(path)
    assert cfg.machines["dev-alice"].host_keys == ((tmp_path / "machines/dev-alice/ssh_host_ed25519_key.pub")
                                                   .read_text().strip(),)
    assert cfg.machines["box2"].identity == tmp_path / "machines/box2/identity_ed25519"
    assert len(cfg.user_ca_keys) == 2


def _allowed_keys(doc: dict, where: str) -> set[str]:
    """The keys the parser accepts at `where`, read from its own 'unknown key' error."""
    from fleetgate.config import ConfigError, parse

    try:
        parse(doc, file="probe")
    except ConfigError as exc:
        for issue in exc.issues:
            if issue.key == f"{where}zz_probe" and "allowed here: " in issue.message:
                return set(issue.message.split("allowed here: ", 1)[1].split(", "))
    raise AssertionError(f"no unknown-key error for {where}")


@pytest.mark.e2e
def test_every_key_is_in_the_reference_and_the_example() -> None:
    """A key the parser accepts but the docs omit is a key nobody finds.

    The accepted keys come from the parser itself (its "unknown key; allowed here" error),
    so a key added to config.py or to a backend without documentation fails here.
    """
    reference = REFERENCE.read_text()
    example = EXAMPLE.read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", reference, re.M))
    in_example = set(re.findall(r"^#?\s*([a-z_]+) = ", example, re.M))
    tables = _allowed_keys({"zz_probe": 1}, "")
    sections = set(re.findall(r"^## `\[([a-z_]+)[.\]]", reference, re.M))
    assert tables <= sections, f"add a '## `[TABLE]`' section to docs/config.md for {sorted(tables - sections)}"
    probe: dict = {t: {"zz_probe": 1} for t in tables - {"backends", "machines", "users"}}
    probe |= {"backends": {"b": {"type": "process", "zz_probe": 1}},
              "machines": {"m": {"backend": "b", "zz_probe": 1}},
              "users": {"u": {"zz_probe": 1}}}
    for where in sorted(probe.keys() - {"backends", "machines", "users"} | {"backends.b", "machines.m", "users.u"}):
        keys = _allowed_keys(probe, where + ".")
        assert keys, where
        assert keys <= documented, (f"[{where}]: add a '| `KEY` |' row to docs/config.md for "
                                    f"{sorted(keys - documented)}")
        assert keys <= in_example, (f"[{where}]: add 'KEY = ...' (commented if off by default) to "
                                    f"docs/config.example.toml for {sorted(keys - in_example)}")


@pytest.mark.parametrize("btype", sorted(set(BACKEND_TYPES) - {"process"}))
def test_every_backend_key_is_documented(btype: str) -> None:
    """Backend types other than process are documented in docs/*.md (backends.md and friends)."""
    rows = set()
    for md in (REPO / "docs").glob("*.md"):
        rows |= set(re.findall(r"^\| `([a-z_]+)`", md.read_text(), re.M))
    cls = BACKEND_TYPES[btype]
    missing = sorted((set(cls.BACKEND_OPTIONS) | set(cls.MACHINE_OPTIONS)) - rows)
    assert not missing, f"backend type {btype!r}: document {missing} in docs/ (a '| `KEY` |' row)"


def test_check_warns_when_this_host_cannot_isolate_process_machines(keyed: Path) -> None:
    """serve would refuse such a backend; check says so (a warning: it may run elsewhere)."""
    path = place(keyed, "valid.toml")
    text = path.read_text()
    assert '[backends.local]\ntype = "process"\n' in text
    path.write_text(text.replace('[backends.local]\ntype = "process"\n',
                                 '[backends.local]\ntype = "process"\nunshare = "/bin/false"\n', 1))
    r = fleetgate("check", "-c", str(path), cwd=keyed)
    assert r.returncode == 0, r.stderr
    assert "warning: backends.local: its machines cannot be isolated here" in r.stderr
    assert 'isolation = "none" opts out' in r.stderr


def test_check_reads_process_machine_key_files_as_their_kind(keyed: Path) -> None:
    """A public key where the machine's host key belongs failed only when the machine started."""
    path = place(keyed, "valid.toml")
    path.write_text(path.read_text().replace('host_key_file = "machines/box1/ssh_host_ed25519_key"',
                                             'host_key_file = "machines/box1/ssh_host_ed25519_key.pub"', 1))
    r = fleetgate("check", "-c", str(path), cwd=keyed)
    assert r.returncode == 1, r.stderr
    assert "key 'machines.box1.host_key_file'" in r.stderr and "is not an OpenSSH private key" in r.stderr
