"""Unit tests of fleetgate.config.parse(): defaults, paths, ciphers, forwarding, user CAs, timeouts.

Each test starts from tests/configs/valid.toml (with real key files generated in tmp)
and changes one thing, so a failure points at one rule.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetgate import config as C
from fleetgate.keys import ensure_key, public_line

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cli_check import CONFIGS, write_keys  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VALID = tomllib.loads((CONFIGS / "valid.toml").read_text())


@pytest.fixture
def d(tmp_path: Path) -> Path:
    write_keys(tmp_path)
    return tmp_path


def parse(d: Path, doc: dict[str, Any]) -> C.Config:
    return C.parse(doc, file=str(d / "fleetgate.toml"), base_dir=d)


def issues(d: Path, doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) of every issue; fails if the doc was accepted."""
    with pytest.raises(C.ConfigError) as info:
        parse(d, doc)
    assert all(i.file == str(d / "fleetgate.toml") for i in info.value.issues)
    return [(i.key, i.message) for i in info.value.issues]


def doc(**tables: dict[str, Any]) -> dict[str, Any]:
    """valid.toml with some keys changed: doc(gateway={"window": 1}) merges into [gateway]."""
    out = copy.deepcopy(VALID)
    for path, changes in tables.items():
        node = out
        for part in path.split("__"):
            node = node.setdefault(part, {})
        node.update(changes)
    return out


# -- defaults ----------------------------------------------------------------------------

def test_defaults(d: Path) -> None:
    cfg = parse(d, doc())
    g = cfg.gateway
    assert g.listen == (C.HostPort("127.0.0.1", 2222),)
    assert g.host_keys == (d / "gateway_host_key",)
    assert g.upstream_key == d / "upstream_key"
    assert g.state_dir == d / "state"
    assert (g.login_grace, g.keepalive_interval) == (30.0, 30.0)
    assert (g.window, g.max_packet) == (8 * 1024 * 1024, 256 * 1024)
    assert g.forwarding == "local"
    assert g.ciphers == C.DEFAULT_CIPHERS
    assert g.ciphers == ()  # OpenSSH's list, each client steered to its cheapest (ssh/algorithms.py)
    assert (g.macs, g.kex_algorithms, g.kexinit_wait) == ((), (), 0.5)
    assert cfg.metrics.listen is None
    assert cfg.user_ca_keys == ()
    box1, box2 = cfg.machines["box1"], cfg.machines["box2"]
    assert (box1.boot_timeout, box1.idle_timeout, box1.min_uptime, box1.stop_timeout) == (120.0, 900.0, 60.0, 60.0)
    assert box1.user is None and box2.user == "dev"
    assert box1.identity == d / "upstream_key"  # the gateway's key unless the machine has its own
    assert box1.address is None
    assert box1.host_keys == ((d / "machines/box1/ssh_host_ed25519_key.pub").read_text().strip(),)
    assert box2.host_keys == () and box2.known_hosts == d / "machines/box2/known_hosts"
    assert dict(box1.options) == {"port": 2301, "host_key_file": "machines/box1/ssh_host_ed25519_key",
                                  "authorized_keys_file": "machines/box1/authorized_keys"}
    assert cfg.users["alice"].machines == ("box1", "box2")
    assert cfg.users["alice"].default_machine == "box1"
    assert cfg.users["alice"].authorized_keys == ((d / "client_key.pub").read_text().strip(),)


def test_config_is_frozen(d: Path) -> None:
    cfg = parse(d, doc())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gateway.window = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.users["mallory"] = cfg.users["alice"]  # type: ignore[index]


# -- addresses ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:2222", C.HostPort("127.0.0.1", 2222)),
    (":2222", C.HostPort("0.0.0.0", 2222)),
    ("2222", C.HostPort("0.0.0.0", 2222)),
    ("[::1]:2222", C.HostPort("::1", 2222)),
    ("gw.example:0", C.HostPort("gw.example", 0)),
])
def test_listen_forms(d: Path, value: str, expected: C.HostPort) -> None:
    assert parse(d, doc(gateway={"listen": value})).gateway.listen == (expected,)


@pytest.mark.parametrize("value", ["127.0.0.1:65536", "127.0.0.1:", "[::1]2222", "::1:ssh", "host:-1"])
def test_bad_listen(d: Path, value: str) -> None:
    assert issues(d, doc(gateway={"listen": [value]})) == [
        ("gateway.listen[0]", f"'{value}' is not HOST:PORT (for example 127.0.0.1:2222 or [::1]:2222)")]


def test_empty_listen_and_host_keys_are_errors(d: Path) -> None:
    assert issues(d, doc(gateway={"listen": [], "host_keys": []})) == [
        ("gateway.listen", "empty; list at least one HOST:PORT to accept SSH on, e.g. [\"0.0.0.0:2222\"]"),
        ("gateway.host_keys", "empty; list at least one private key file; create one with 'fleetgate keygen PATH'"),
    ]


def test_metrics_listen_defaults_to_loopback(d: Path) -> None:
    cfg = parse(d, doc(metrics={"listen": ":9180"}))
    assert cfg.metrics.listen == C.HostPort("127.0.0.1", 9180)


# -- paths -------------------------------------------------------------------------------

def test_paths_are_relative_to_the_config_file(d: Path, tmp_path_factory, monkeypatch) -> None:
    """Not to the working directory: systemd, containers and shells start in different places."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    path = d / "fleetgate.toml"
    path.write_text((CONFIGS / "valid.toml").read_text())
    cfg = C.load(path)
    assert cfg.base_dir == d
    assert cfg.gateway.host_keys == (d / "gateway_host_key",)
    assert cfg.machines["box2"].known_hosts == d / "machines/box2/known_hosts"


def test_absolute_and_home_paths(d: Path, tmp_path_factory, monkeypatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    ensure_key(home / "keys" / "host")
    cfg = parse(d, doc(gateway={"host_keys": ["~/keys/host", str(d / "gateway_host_key")],
                                "state_dir": "/var/lib/fleetgate"}))
    assert cfg.gateway.host_keys == (home / "keys/host", d / "gateway_host_key")
    assert cfg.gateway.state_dir == Path("/var/lib/fleetgate")


@pytest.mark.parametrize("value", ["machines/box1/ssh_host_ed25519_key.pub",
                                   "./machines/box1/ssh_host_ed25519_key.pub",
                                   "{d}/machines/box1/ssh_host_ed25519_key.pub"])
def test_host_key_as_a_path(d: Path, value: str) -> None:
    cfg = parse(d, doc(machines__box1={"host_key": value.format(d=d)}))
    assert cfg.machines["box1"].host_keys == ((d / "machines/box1/ssh_host_ed25519_key.pub").read_text().strip(),)


def test_host_key_inline_and_several(d: Path) -> None:
    line = (d / "machines/box1/ssh_host_ed25519_key.pub").read_text().strip()
    other = public_line(ensure_key(d / "rotated_host_key"))
    cfg = parse(d, doc(machines__box1={"host_key": [line, "rotated_host_key.pub"]}))
    assert cfg.machines["box1"].host_keys == (line, other)


def test_bad_host_key_line_and_missing_pub(d: Path) -> None:
    assert issues(d, doc(machines__box1={"host_key": ["ssh-ed25519 AAAA", "gone.pub"]})) == [
        ("machines.box1.host_key", f"cannot read {d}/gone.pub: No such file or directory"),
        ("machines.box1.host_key", "'ssh-ed25519 AAAA' is not an OpenSSH public key (Invalid public key)"),
    ]


def test_private_keys_must_be_private_keys(d: Path) -> None:
    """A .pub where a private key belongs would otherwise pass check and crash serve."""
    msg = "{} is not an unencrypted OpenSSH private key (Invalid private key); " \
          "point at the private key (not the .pub) or create one with 'fleetgate keygen PATH'"
    got = issues(d, doc(gateway={"host_keys": ["gateway_host_key.pub"]},
                        machines__box1={"identity": "client_key.pub"}))
    assert got == [("gateway.host_keys[0]", msg.format(d / "gateway_host_key.pub")),
                   ("machines.box1.identity", msg.format(d / "client_key.pub"))]


def test_encrypted_private_key_is_refused(d: Path) -> None:
    """The gateway runs unattended: a key that needs a passphrase would fail at serve time."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(d / "locked")],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    [(k, m)] = issues(d, doc(gateway={"upstream_key": "locked"}))
    assert k == "gateway.upstream_key"
    assert m.startswith(f"{d}/locked is not an unencrypted OpenSSH private key (")


# -- ciphers -----------------------------------------------------------------------------

def test_known_ciphers_are_ones_asyncssh_implements() -> None:
    from asyncssh.encryption import get_encryption_algs

    available = {a.decode() for a in get_encryption_algs()}
    assert set(C.KNOWN_CIPHERS) <= available
    assert set(C.DEFAULT_CIPHERS) <= set(C.KNOWN_CIPHERS)


def test_ciphers_keep_their_order(d: Path) -> None:
    cfg = parse(d, doc(gateway={"ciphers": ["aes256-ctr", "aes128-gcm@openssh.com"]}))
    assert cfg.gateway.ciphers == ("aes256-ctr", "aes128-gcm@openssh.com")
    assert parse(d, doc(gateway={"ciphers": "aes192-ctr"})).gateway.ciphers == ("aes192-ctr",)
    assert parse(d, doc(gateway={"ciphers": []})).gateway.ciphers == C.DEFAULT_CIPHERS


def test_macs_and_kex_algorithms_are_checked(d: Path) -> None:
    cfg = parse(d, doc(gateway={"macs": ["hmac-sha2-256"], "kex_algorithms": ["curve25519-sha256"],
                                "kexinit_wait": 0}))
    assert (cfg.gateway.macs, cfg.gateway.kex_algorithms, cfg.gateway.kexinit_wait) == \
        (("hmac-sha2-256",), ("curve25519-sha256",), 0.0)
    assert issues(d, doc(gateway={"macs": ["hmac-md5"], "kex_algorithms": ["diffie-hellman-group1-sha1"],
                                  "kexinit_wait": 60})) == [
        ("gateway.macs", "unknown MAC 'hmac-md5'; known: " + ", ".join(C.KNOWN_MACS)),
        ("gateway.kex_algorithms", "unknown key exchange 'diffie-hellman-group1-sha1'; known: "
         + ", ".join(C.KNOWN_KEX_ALGORITHMS)),
        ("gateway.kexinit_wait", "must be between 0 and 10 seconds"),
    ]


def test_unknown_cipher(d: Path) -> None:
    assert issues(d, doc(gateway={"ciphers": ["aes128-gcm@openssh.com", "arcfour", 3]})) == [
        ("gateway.ciphers[2]", "must be a string, got int"),
        ("gateway.ciphers", "unknown cipher 'arcfour'; known: " + ", ".join(C.KNOWN_CIPHERS)),
    ]


# -- relay sizes and forwarding ---------------------------------------------------------

def test_window_and_packet_bounds(d: Path) -> None:
    cfg = parse(d, doc(gateway={"window": 32768, "max_packet": 1 << 20}))
    assert (cfg.gateway.window, cfg.gateway.max_packet) == (32768, 1 << 20)
    assert issues(d, doc(gateway={"window": 32767, "max_packet": 2.5})) == [
        ("gateway.window", "must be between 32768 and 1073741824"),
        ("gateway.max_packet", "must be an integer, got float 2.5"),
    ]


@pytest.mark.parametrize("policy", ["local", "any", "none"])
def test_forwarding_policies(d: Path, policy: str) -> None:
    assert parse(d, doc(gateway={"forwarding": policy})).gateway.forwarding == policy


def test_forwarding_policy_typo(d: Path) -> None:
    assert issues(d, doc(gateway={"forwarding": "Local"})) == [
        ("gateway.forwarding", "must be 'local' (-L to the machine's own services), 'any' (the machine's sshd "
                               "decides) or 'none', got 'Local'")]
    assert issues(d, doc(gateway={"forwarding": False})) == [
        ("gateway.forwarding", "must be a string, got a boolean")]


# -- user CA keys ------------------------------------------------------------------------

def test_user_ca_keys_inline_and_from_file(d: Path) -> None:
    inline = public_line(ensure_key(d / "ca1"))
    from_file = public_line(ensure_key(d / "ca2"))
    (d / "cas").write_text(f"# our CAs\n\n{from_file}\n")
    cfg = parse(d, doc(user_ca={"keys": inline, "keys_file": "cas"}))
    assert cfg.user_ca_keys == (inline, from_file)


def test_a_ca_lets_users_have_no_keys(d: Path) -> None:
    ca = public_line(ensure_key(d / "ca"))
    carol = {"machines": ["box2"]}
    assert issues(d, doc(users__carol=carol)) == [
        ("users.carol.authorized_keys", "missing; give the user's public keys, or configure [user_ca] keys")]
    cfg = parse(d, doc(users__carol=carol, user_ca={"keys": [ca]}))
    assert cfg.users["carol"].authorized_keys == ()


def test_bad_user_ca(d: Path) -> None:
    assert issues(d, doc(user_ca={"keys": ["ssh-rsa nope"], "keys_file": "missing.pub", "key": "x"})) == [
        ("user_ca.key", "unknown key; allowed here: keys, keys_file"),
        ("user_ca.keys_file", f"cannot read {d}/missing.pub: No such file or directory"),
        ("user_ca.keys[0]", "'ssh-rsa nope' is not an OpenSSH public key (Invalid public key)"),
    ]


def test_a_bad_line_in_a_key_file_names_the_file_key(d: Path) -> None:
    """The operator must look in the file, not at an inline list index that does not exist."""
    good = public_line(ensure_key(d / "ca"))
    (d / "cas").write_text(f"{good}\nssh-ed25519 broken\n")
    (d / "alice.keys").write_text("ssh-rsa AAAA\n")
    got = issues(d, doc(user_ca={"keys": [good], "keys_file": "cas"},
                        users__alice={"authorized_keys": [good], "authorized_keys_file": "alice.keys"}))
    assert got == [
        ("user_ca.keys_file", "'ssh-ed25519 broken' is not an OpenSSH public key (Invalid public key)"),
        ("users.alice.authorized_keys_file", "'ssh-rsa AAAA' is not an OpenSSH public key (Invalid public key)"),
    ]


# -- machines' timeouts -------------------------------------------------------------------

def test_machine_timeouts(d: Path) -> None:
    cfg = parse(d, doc(machines__box1={"boot_timeout": 5, "idle_timeout": 0.5, "min_uptime": 0,
                                       "stop_timeout": 12.5}))
    m = cfg.machines["box1"]
    assert (m.boot_timeout, m.idle_timeout, m.min_uptime, m.stop_timeout) == (5.0, 0.5, 0.0, 12.5)
    assert isinstance(m.boot_timeout, float)
    assert cfg.machines["box2"].boot_timeout == 120.0  # per machine, not global


def test_bad_machine_timeouts(d: Path) -> None:
    got = issues(d, doc(machines__box1={"boot_timeout": 0, "idle_timeout": -1, "min_uptime": -0.5,
                                        "stop_timeout": True}))
    assert got == [
        ("machines.box1.boot_timeout", "must be greater than 0, got 0.0"),
        ("machines.box1.idle_timeout", "must be greater than 0, got -1.0"),
        ("machines.box1.min_uptime", "must be 0 or more, got -0.5"),
        ("machines.box1.stop_timeout", "must be a number, got a boolean"),
    ]


# -- structure and names -----------------------------------------------------------------

def test_every_problem_is_reported_at_once(d: Path) -> None:
    got = issues(d, doc(gateway={"login_grace": "30 seconds", "colour": "blue"},
                        machines__box1={"backend": "nope"}, users__alice={"machines": ["box7"]}))
    # box1's process options are not reported as unknown: its backend name is the one mistake.
    assert got[0][0] == "gateway.colour" and got[0][1].startswith("unknown key; allowed here: ")
    assert ", login_grace, " in got[0][1]
    assert got[1:] == [
        ("gateway.login_grace", "'30 seconds' is not a duration such as 90, \"90s\", \"15m\", \"2h\" or \"1d\""),
        ("machines.box1.backend", "no backend named 'nope'; known: local"),
        ("users.alice.machines", "no machine named 'box7'; known: box1, box2"),
    ]


def test_machines_not_a_table_is_reported_once(d: Path) -> None:
    bad = doc()
    bad["machines"] = 3
    assert issues(d, bad) == [
        ("machines", "must be a table, got int"),
        ("users.alice.machines", "no machine named 'box1'; known: none defined"),
        ("users.alice.machines", "no machine named 'box2'; known: none defined"),
        ("users.bob.machines", "no machine named 'box2'; known: none defined"),
    ]


@pytest.mark.parametrize("name", ["Alice", "alice+x", "-alice", "a" * 33])
def test_bad_user_names(d: Path, name: str) -> None:
    assert (f"users.{name}", "user names are lower-case letters, digits, '_', '.' and '-' (no '+')") in \
        issues(d, doc(**{f"users__{name}": {"authorized_keys_file": "client_key.pub", "machines": ["box1"]}}))


def test_bad_machine_name(d: Path) -> None:
    bad = doc()
    bad["machines"]["box+1"] = copy.deepcopy(bad["machines"]["box1"])
    assert ("machines.box+1", "machine names use letters, digits, '.', '_' and '-' only") in issues(d, bad)


def test_missing_required_tables(d: Path) -> None:
    assert issues(d, {}) == [
        ("gateway", "missing table; add a [gateway] section"),
        ("gateway.listen", "missing; this key is required"),
        ("gateway.host_keys", "missing; this key is required"),
        ("users", "no users; add a [users.NAME] table with authorized_keys and machines"),
    ]


def test_identity_needed_without_upstream_key(d: Path) -> None:
    bad = doc()
    del bad["gateway"]["upstream_key"]
    bad["machines"]["box2"]["identity"] = "upstream_key"
    assert issues(d, bad) == [("machines.box1.identity", "missing; set gateway.upstream_key or this machine's "
                                                         "identity (the key fleetgate logs in with)")]


def test_issue_text_names_file_and_key() -> None:
    assert str(C.ConfigIssue("/etc/fg.toml", "gateway.window", "too small")) == \
        "/etc/fg.toml: key 'gateway.window': too small"
    assert str(C.ConfigIssue("/etc/fg.toml", "", "TOML syntax error")) == "/etc/fg.toml: TOML syntax error"


def test_key_exchange_budgets_and_metrics_port_caps(d: Path) -> None:
    """Issue 25: [limits] rekey_* and password_per_account_per_minute, [metrics] caps."""
    cfg = parse(d, doc(limits={"rekey_per_connection_per_minute": 12, "rekey_per_source_per_minute": 40,
                               "rekey_per_second": 2.5, "password_per_account_per_minute": 3},
                       metrics={"listen": ":9180", "max_connections_per_source": 3, "health_reserve": 0}))
    assert (cfg.limits.rekey_per_connection_per_minute, cfg.limits.rekey_per_source_per_minute,
            cfg.limits.rekey_per_second, cfg.limits.password_per_account_per_minute) == (12, 40, 2.5, 3)
    assert (cfg.metrics.max_connections_per_source, cfg.metrics.health_reserve) == (3, 0)
    default = parse(d, doc())
    assert (default.metrics.max_connections_per_source, default.metrics.health_reserve) == (8, 4)
    assert (default.limits.rekey_per_connection_per_minute, default.limits.rekey_per_second) == (30, 30.0)
    assert issues(d, doc(limits={"rekey_per_connection_per_minute": 0, "rekey_per_second": -1},
                         metrics={"max_connections_per_source": 0, "health_reserve": 100})) == [
        ("metrics.max_connections_per_source", "must be 1 or more, got 0"),
        ("metrics.health_reserve", "must be 0 to 64, got 100"),
        ("limits.rekey_per_connection_per_minute", "must be 1 or more, got 0"),
        ("limits.rekey_per_second", "must be greater than 0, got -1.0"),
    ]
