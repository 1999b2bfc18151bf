"""TOML configuration → frozen, typed config.

Every problem is collected (not just the first) and reported with the file, the dotted
key and what to do, so that `fleetgate check` can list them all at once and a broken
config never starts a half-configured gateway.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .schedule import ScheduleError, parse_rule
from .settings import (
    HostPort,
    GatewayConfig,
    MetricsConfig,
    UserConfig,
    BackendConfig,
    MachineConfig,
    PassthroughConfig,
    RoutingConfig,
    Config,
    parse_host_port,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

USER_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}$")
MACHINE_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
TARGET_SEPARATOR = "+"

# Keys holding a duration: a number of seconds or "90s", "15m", "2h", "1d" (as `fleetgate
# keep-awake` takes them, and as operators write them for Prometheus and systemd), with the
# largest value that makes sense (a typo like "2000d" or TOML's `inf` is an error, not forever;
# math.inf: the key has its own range check).
DAY = 86400.0
DURATION_MAX = {
    "login_grace": 3600.0, "keepalive_interval": 3600.0, "kexinit_wait": math.inf, "reconcile_interval": DAY,
    "drain_timeout": DAY, "boot_timeout": DAY, "idle_timeout": 365 * DAY, "min_uptime": 365 * DAY,
    "stop_timeout": DAY, "cert_validity": math.inf, "penalty_window": 30 * DAY, "penalty_duration": 30 * DAY,
    "timeout": math.inf, "cache_ttl": DAY,
}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([smhd]?)\s*$")


def duration_seconds(value: Any) -> float:
    """Seconds from 90, 90.5, "90", "90s", "15m", "2h" or "1d"; ValueError (a sentence) otherwise."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 90, \"90s\", \"15m\" or \"2h\", got a boolean")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value.lower())):
        seconds = float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1.0)
    else:
        raise ValueError(f"{value!r} is not a duration such as 90, \"90s\", \"15m\", \"2h\" or \"1d\"")
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration, got {value!r}")
    return seconds


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        key = f"key '{self.key}': " if self.key else ""
        return f"{where}{key}{self.message}"


class ConfigError(Exception):
    """Raised with every issue found; str() lists them one per line."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# Cipher names asyncssh knows; a typo here would otherwise surface as a failed handshake.
KNOWN_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "chacha20-poly1305@openssh.com",
)
# Empty: the front offers what OpenSSH's sshd offers, and steers each client to the
# cheapest cipher it supports (AES-GCM), see fleetgate/ssh/algorithms.py. A list pins the
# ciphers offered, in that order, to every client.
DEFAULT_CIPHERS: tuple[str, ...] = ()
# MAC and key exchange names an operator may list (gateway.macs, gateway.kex_algorithms):
# what a default OpenSSH 9 sshd offers and asyncssh implements.
KNOWN_MACS = (
    "umac-64-etm@openssh.com", "umac-128-etm@openssh.com", "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com", "hmac-sha1-etm@openssh.com", "umac-64@openssh.com", "umac-128@openssh.com",
    "hmac-sha2-256", "hmac-sha2-512", "hmac-sha1",
)
KNOWN_KEX_ALGORITHMS = (
    "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384", "ecdh-sha2-nistp521", "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
)
# The gateway's own leg to machines: its preference decides, and machines' SSH servers
# (dropbear builds without GCM, for one) may lack AES-GCM, so everything stays on offer.
UPSTREAM_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


class _Reader:
    """Walks a TOML document, recording issues instead of raising on the first one."""

    def __init__(self, file: str, base_dir: Path):
        self.file = file
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []

    def error(self, key: str, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, key, message))

    def table(self, doc: Mapping[str, Any], key: str, prefix: str, required: bool = False) -> dict[str, Any]:
        full = f"{prefix}{key}"
        if key not in doc:
            if required:
                self.error(full, f"missing table; add a [{full}] section")
            return {}
        value = doc[key]
        if not isinstance(value, dict):
            self.error(full, f"must be a table, got {type(value).__name__}")
            return {}
        return value

    def unknown_keys(self, doc: Mapping[str, Any], allowed: set[str], prefix: str) -> None:
        for key in doc:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.error(f"{prefix}{key}", f"unknown key; allowed here: {hint}")

    def get(
        self,
        doc: Mapping[str, Any],
        key: str,
        prefix: str,
        kind: type | tuple[type, ...],
        default: Any = None,
        required: bool = False,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        full = f"{prefix}{key}"
        if key not in doc:
            if required:
                self.error(full, "missing; this key is required")
            return default
        value = doc[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and key in DURATION_MAX and isinstance(value, (str, int, float)) \
                and not isinstance(value, bool):
            try:
                value = duration_seconds(value)
            except ValueError as exc:
                self.error(full, str(exc))
                return default
            if value > DURATION_MAX[key]:
                self.error(full, f"must be at most {DURATION_MAX[key]:g} seconds, got {value:g}")
                return default
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            self.error(full, f"must be a finite number, got {value!r}")
            return default
        if isinstance(value, bool) and bool not in kinds:
            self.error(full, f"must be {_kind_name(kinds)}, got a boolean")
            return default
        if not isinstance(value, kinds):
            self.error(full, f"must be {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.error(full, problem)
                return default
        return value

    def str_list(self, doc: Mapping[str, Any], key: str, prefix: str, required: bool = False) -> tuple[str, ...]:
        value = self.get(doc, key, prefix, (list, str), default=[], required=required)
        if isinstance(value, str):
            value = [value]
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.error(f"{prefix}{key}[{i}]", f"must be a string, got {type(item).__name__}")
            else:
                out.append(item)
        return tuple(out)

    def path(self, value: str | None) -> Path | None:
        return resolve_path(self.base_dir, value)

    def host_port(self, value: str, key: str, default_host: str = "0.0.0.0") -> HostPort | None:
        hp = parse_host_port(value, default_host)
        if hp is None:
            self.error(key, f"'{value}' is not HOST:PORT (for example 127.0.0.1:2222 or [::1]:2222)")
        return hp


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def _check_key_line(line: str) -> str | None:
    """Return a problem with an OpenSSH public key line, or None."""
    import asyncssh

    try:
        asyncssh.import_public_key(line)
    except (asyncssh.KeyImportError, ValueError) as exc:
        short = line if len(line) < 40 else line[:37] + "..."
        return f"'{short}' is not an OpenSSH public key ({exc})"
    return None


def _read_key_file(reader: _Reader, path: Path | None, key: str) -> list[str]:
    if path is None:
        return []
    try:
        text = path.read_text()
    except OSError as exc:
        reader.error(key, f"cannot read {path}: {exc.strerror}")
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _check_private_key(reader: _Reader, path: Path | None, key: str) -> None:
    """A .pub or passphrase-protected file here would pass a file check and then crash `serve`."""
    if path is None or not path.is_file():
        return
    import asyncssh

    try:
        asyncssh.read_private_key(str(path))
    except (asyncssh.KeyImportError, ValueError, OSError) as exc:
        reader.error(key, f"{path} is not an unencrypted OpenSSH private key ({exc}); "
                          f"point at the private key (not the .pub) or create one with 'fleetgate keygen PATH'")
        return
    _check_private_mode(reader, path, key)


def _check_private_mode(reader: _Reader, path: Path, key: str) -> None:
    """sshd's StrictModes: a private key others can read or write is refused, not used."""
    try:
        st = path.stat()
    except OSError:
        return
    if st.st_mode & 0o077:
        reader.error(key, f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"a private key must be readable only by the gateway's account: chmod 600 {path}")


def _check_state_dir(reader: _Reader, path: Path, key: str) -> None:
    """The state dir must be a writable directory, or creatable (`serve` creates it 0700).

    Tried for real (a temporary file or directory, removed at once): permission bits say
    nothing for root, nor on a read-only file system."""
    import tempfile

    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        reader.error(key, f"cannot create {path}: {p} is not a directory")
        return
    try:
        if p == path:
            with tempfile.TemporaryFile(dir=p):
                pass
        else:
            os.rmdir(tempfile.mkdtemp(dir=p))
    except OSError as exc:
        what = f"write to {path}" if p == path else f"create {path} (in {p})"
        reader.error(key, f"cannot {what}: {exc.strerror}; the gateway keeps its admin socket and "
                          f"backends' state there")


# A Unix socket's path goes in sockaddr_un.sun_path: 108 bytes on Linux, with the terminating NUL.
UNIX_PATH_MAX = 107


def _admin_socket(r: _Reader, g: Mapping[str, Any], state_dir: Path) -> Path:
    """gateway.admin_socket, or state_dir/admin.sock; a path bind() would refuse is an error now."""
    given = r.path(r.get(g, "admin_socket", "gateway.", str))
    path = given or (state_dir / "admin.sock")
    size = len(os.fsencode(str(path)))
    if size > UNIX_PATH_MAX:
        fix = ("give a shorter path" if given else
               f"it is gateway.state_dir + /admin.sock; set gateway.admin_socket to a shorter path (e.g. "
               f"/run/fleetgate/admin.sock) or shorten gateway.state_dir")
        r.error("gateway.admin_socket", f"{path} is {size} bytes; a Unix socket path must be at most "
                                        f"{UNIX_PATH_MAX} bytes; {fix}")
    return path


def _check_audit_file(r: _Reader, path: Path, state_dir: Path) -> None:
    """The audit file must be appendable, or creatable in an existing directory (the gateway
    creates the file, not its directory; except the state dir, which `serve` creates first and
    _check_state_dir checked). Tried for real, writing nothing: permission bits say nothing for
    root, nor about /proc or a read-only file system."""
    import tempfile

    key = "audit.file"
    if path.exists():
        if path.is_dir():
            r.error(key, f"{path} is a directory; give a file path (one JSON line per session is appended)")
            return
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError as exc:
            r.error(key, f"cannot append to {path}: {exc.strerror}")
        return
    parent = path.parent
    if not parent.exists() and (parent == state_dir or parent in state_dir.parents):
        return
    if not parent.is_dir():
        r.error(key, f"cannot create {path}: {parent} is not a directory (the gateway creates the file, "
                     f"not its directory)")
        return
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        r.error(key, f"cannot create {path} (in {parent}): {exc.strerror}; the gateway appends one JSON "
                     f"line per session there")


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(file, "", f"cannot read config: {exc.strerror}")]) from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(file, "", f"not UTF-8 text ({exc})")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue(file, "", f"TOML syntax error: {exc}")]) from None
    return parse(doc, file=file, base_dir=path.resolve().parent)


def resolve_path(base_dir: Path, value: str | None) -> Path | None:
    """Paths in the config are relative to the config file's directory."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _existing_file(r: _Reader, t: Mapping[str, Any], key: str, prefix: str) -> Path | None:
    p = r.path(r.get(t, key, prefix, str))
    if p is not None and not p.is_file():
        r.error(f"{prefix}{key}", f"no such file {p}; create one with 'fleetgate keygen {p}'")
    return p


def _parse_limits(r: _Reader, doc: Mapping[str, Any]) -> Any:
    import ipaddress

    from . import fdlimit
    from .ssh.limits import LimitsConfig

    t = r.table(doc, "limits", "")
    d = LimitsConfig()
    r.unknown_keys(t, {"max_unauthenticated", "per_source_startups", "max_auth_tries", "penalty_after",
                       "penalty_window", "penalty_duration", "exempt", "password_per_source_per_minute",
                       "password_per_user_per_minute", "expensive_kex_per_second",
                       "expensive_kex_per_source_per_minute", "max_sessions", "max_channels",
                       "max_connections_per_user", "password_per_account_per_minute",
                       "rekey_per_connection_per_minute", "rekey_per_source_per_minute", "rekey_per_second",
                       *BUDGET_KEYS}, "limits.")
    start, rate, full = d.per_source_start, d.per_source_rate, d.per_source_full
    startups = r.get(t, "per_source_startups", "limits.", str)
    if startups is not None:
        try:
            start, rate, full = (int(x) for x in startups.split(":"))
            if not (0 < start <= full and 0 <= rate <= 100):
                raise ValueError
        except ValueError:
            r.error("limits.per_source_startups", f"'{startups}' is not START:RATE:FULL with 0 < START <= FULL "
                    f"and RATE a percentage (sshd's MaxStartups form, e.g. \"64:30:128\")")
            start, rate, full = d.per_source_start, d.per_source_rate, d.per_source_full
    exempt = r.str_list(t, "exempt", "limits.")
    for i, cidr in enumerate(exempt):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            r.error(f"limits.exempt[{i}]", f"'{cidr}' is not an address or network (e.g. 10.0.0.0/8)")
    positive_int = (lambda v: None if v >= 1 else f"must be 1 or more, got {v}")
    return LimitsConfig(
        # The default is a share of the descriptor budget (fleetgate/fdlimit.py), not a constant.
        max_unauthenticated=r.get(t, "max_unauthenticated", "limits.", int, fdlimit.default_max_unauthenticated(),
                                  check=positive_int),
        per_source_start=start, per_source_rate=rate, per_source_full=full,
        max_auth_tries=r.get(t, "max_auth_tries", "limits.", int, d.max_auth_tries, check=positive_int),
        penalty_after=r.get(t, "penalty_after", "limits.", int, d.penalty_after, check=positive_int),
        penalty_window=r.get(t, "penalty_window", "limits.", float, d.penalty_window, check=_positive),
        penalty_duration=r.get(t, "penalty_duration", "limits.", float, d.penalty_duration, check=_non_negative),
        exempt=tuple(exempt),
        password_per_source_per_minute=r.get(t, "password_per_source_per_minute", "limits.", int,
                                             d.password_per_source_per_minute, check=positive_int),
        password_per_user_per_minute=r.get(t, "password_per_user_per_minute", "limits.", int,
                                           d.password_per_user_per_minute, check=positive_int),
        password_per_account_per_minute=r.get(t, "password_per_account_per_minute", "limits.", int,
                                              d.password_per_account_per_minute, check=positive_int),
        rekey_per_connection_per_minute=r.get(t, "rekey_per_connection_per_minute", "limits.", int,
                                              d.rekey_per_connection_per_minute, check=positive_int),
        rekey_per_source_per_minute=r.get(t, "rekey_per_source_per_minute", "limits.", int,
                                          d.rekey_per_source_per_minute, check=positive_int),
        rekey_per_second=r.get(t, "rekey_per_second", "limits.", float, d.rekey_per_second, check=_positive),
        expensive_kex_per_second=r.get(t, "expensive_kex_per_second", "limits.", float,
                                       d.expensive_kex_per_second, check=_positive),
        expensive_kex_per_source_per_minute=r.get(t, "expensive_kex_per_source_per_minute", "limits.", int,
                                                  d.expensive_kex_per_source_per_minute, check=positive_int),
        max_sessions=r.get(t, "max_sessions", "limits.", int, d.max_sessions, check=positive_int),
        max_channels=r.get(t, "max_channels", "limits.", int, d.max_channels, check=positive_int),
        max_connections_per_user=r.get(t, "max_connections_per_user", "limits.", int, d.max_connections_per_user,
                                       check=positive_int),
        **{key: _budget_value(r, t, key) for key in BUDGET_KEYS},
    )


# [limits] budgets (fleetgate/budget.py): unset means derived from the fd limit and the memory.
BUDGET_KEYS = ("fds_total", "fds_per_user", "buffer_total", "buffer_per_user", "channels_total", "channels_per_user")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
               "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _budget_value(r: _Reader, t: Mapping[str, Any], key: str) -> int:
    """A count, or for buffer_* a size in bytes (an integer or a string such as "256 MiB")."""
    full = f"limits.{key}"
    if key not in t:
        return 0
    value = t[key]
    is_size = key.startswith("buffer_")
    if is_size and isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            r.error(full, f"'{value}' is not a size; write bytes as an integer or a string such as \"256 MiB\" "
                          f"(units KiB, MiB, GiB), or leave it out for the default derived from memory")
            return 0
        value = int(m.group(1)) * _SIZE_UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, int):
        what = "an integer number of bytes or a size string such as \"256 MiB\"" if is_size else "an integer"
        r.error(full, f"must be {what}, got {value!r}")
        return 0
    least = 1 << 20 if is_size else 1
    if value < least:
        r.error(full, f"must be at least {'1 MiB' if is_size else '1'}, got {value}; leave it out for the "
                      f"default derived from the {'memory' if is_size else 'open-file limit'}")
        return 0
    return value


ROUTING_KEYS = {"type", "url", "keys_url", "timeout", "cache_ttl", "cache_size", "token_file", "ca_file",
                "cert_file", "key_file"}


def _check_url(value: str) -> str | None:
    from urllib.parse import urlsplit

    u = urlsplit(value)
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"'{value}' is not an http:// or https:// URL"
    if u.username or u.password:
        return "must not carry credentials; give the service's bearer token in token_file instead"
    return None


def _parse_routing(r: _Reader, doc: Mapping[str, Any]) -> RoutingConfig:
    """[routing]: the TOML table, or the team's own HTTP service (docs/webhooks.md)."""
    t = r.table(doc, "routing", "")
    r.unknown_keys(t, ROUTING_KEYS, "routing.")
    p = "routing."
    rtype = r.get(t, "type", p, str, "table", check=lambda v: None if v in ("table", "webhook") else
                  f"must be 'table' (the [users.NAME] tables) or 'webhook' (ask the service at routing.url), got '{v}'")
    url = r.get(t, "url", p, str, check=_check_url)
    keys_url = r.get(t, "keys_url", p, str, check=_check_url)
    if rtype == "webhook" and url is None and "url" not in t:
        r.error("routing.url", "missing; type = \"webhook\" needs the routing service's URL "
                               "(e.g. \"https://inventory.example.org/fleetgate/route\")")
    if rtype == "table" and url is not None:
        r.error("routing.url", "given with type = \"table\"; set type = \"webhook\" to ask this service, "
                               "or remove it")
    files = {}
    for key in ("token_file", "ca_file", "cert_file", "key_file"):
        path = r.path(r.get(t, key, p, str))
        if path is not None and not path.is_file():
            r.error(f"{p}{key}", f"no such file {path}")
            path = None
        files[key] = path
    if files["key_file"] is not None and files["cert_file"] is None:
        r.error("routing.key_file", "given without routing.cert_file (the TLS client certificate it belongs to)")
    for key in ("token_file", "key_file"):
        if files[key] is not None:
            _check_private_mode(r, files[key], f"{p}{key}")
    token = None
    if files["token_file"] is not None:
        try:
            token = files["token_file"].read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            r.error("routing.token_file", f"cannot read {files['token_file']}: {exc}")
        else:
            if not token or any(c.isspace() or not c.isprintable() for c in token):
                r.error("routing.token_file", f"{files['token_file']} must hold one bearer token "
                                              f"(printable, no spaces) on one line")
                token = None
    uses_tls_files = any(files[k] is not None for k in ("ca_file", "cert_file"))
    if uses_tls_files and not any(u and u.startswith("https://") for u in (url, keys_url)):
        r.error("routing.ca_file" if files["ca_file"] else "routing.cert_file",
                "TLS files given but neither routing.url nor routing.keys_url is https://")
    if "url" not in t and "keys_url" not in t and any(k in t for k in ROUTING_KEYS - {"type"}):
        r.error("routing", "webhook options given but no routing.url nor routing.keys_url to use them with")
    positive_int = (lambda v: None if v >= 1 else f"must be 1 or more, got {v}")
    return RoutingConfig(
        type=rtype or "table", url=url, keys_url=keys_url,
        timeout=r.get(t, "timeout", p, float, 2.0, check=lambda v: None if 0.1 <= v <= 30 else
                      f"must be between 0.1 and 30 seconds (a login waits this long for the service), got {v:g}"),
        cache_ttl=r.get(t, "cache_ttl", p, float, 60.0, check=_non_negative),
        cache_size=r.get(t, "cache_size", p, int, 10000, check=positive_int),
        token=token, token_file=files["token_file"], ca_file=files["ca_file"], cert_file=files["cert_file"],
        key_file=files["key_file"],
    )


def _parse_passthrough(r: _Reader, doc: Mapping[str, Any]) -> PassthroughConfig:
    t = r.table(doc, "passthrough", "")
    r.unknown_keys(t, {"per_source_per_minute"}, "passthrough.")
    n = r.get(t, "per_source_per_minute", "passthrough.", int, 10, check=lambda v: None if v >= 1 else
              f"must be 1 or more (connections one source address may open per minute), got {v}")
    return PassthroughConfig(per_source_per_minute=n)


def _parse_passthrough_listen(r: _Reader, mc: Mapping[str, Any], prefix: str) -> HostPort | None:
    value = r.get(mc, "passthrough_listen", prefix, str)
    return r.host_port(value, f"{prefix}passthrough_listen", "127.0.0.1") if value else None


def parse(doc: Mapping[str, Any], file: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document (a dict); raise ConfigError listing every problem."""
    from .backends import BACKEND_TYPES

    r = _Reader(file, base_dir or Path.cwd())
    r.unknown_keys(doc, {"gateway", "metrics", "users", "user_ca", "backends", "machines", "passthrough", "audit",
                         "limits", "store", "routing"}, "")

    # [gateway]
    g = r.table(doc, "gateway", "", required=True)
    r.unknown_keys(g, {"listen", "host_keys", "upstream_key", "state_dir", "login_grace",
                       "keepalive_interval", "ciphers", "macs", "kex_algorithms", "kexinit_wait",
                       "window", "max_packet", "forwarding", "relay_tuning",
                       "admin_socket", "reconcile_interval", "upstream_ca_key",
                       "drain_timeout", "status_concurrency"}, "gateway.")
    listen = []
    for i, item in enumerate(r.str_list(g, "listen", "gateway.", required=True)):
        hp = r.host_port(item, f"gateway.listen[{i}]")
        if hp:
            listen.append(hp)
    if g.get("listen") == []:
        r.error("gateway.listen", "empty; list at least one HOST:PORT to accept SSH on, e.g. [\"0.0.0.0:2222\"]")
    host_keys = []
    for i, item in enumerate(r.str_list(g, "host_keys", "gateway.", required=True)):
        p = r.path(item)
        assert p is not None
        if not p.is_file():
            r.error(f"gateway.host_keys[{i}]", f"no such file {p}; create one with 'fleetgate keygen {p}'")
        _check_private_key(r, p, f"gateway.host_keys[{i}]")
        host_keys.append(p)
    if g.get("host_keys") == []:
        r.error("gateway.host_keys", "empty; list at least one private key file; create one with 'fleetgate keygen PATH'")
    upstream_key = r.path(r.get(g, "upstream_key", "gateway.", str))
    if upstream_key is not None and not upstream_key.is_file():
        r.error("gateway.upstream_key", f"no such file {upstream_key}; create one with 'fleetgate keygen {upstream_key}'")
    _check_private_key(r, upstream_key, "gateway.upstream_key")
    state_dir = r.path(r.get(g, "state_dir", "gateway.", str)) or (r.base_dir / "state")
    _check_state_dir(r, state_dir, "gateway.state_dir")
    upstream_ca_key = _existing_file(r, g, "upstream_ca_key", "gateway.")
    _check_private_key(r, upstream_ca_key, "gateway.upstream_ca_key")  # a .pub here used to fail only at SIGHUP
    ciphers = r.str_list(g, "ciphers", "gateway.") or DEFAULT_CIPHERS
    for c in ciphers:
        if c not in KNOWN_CIPHERS:
            r.error("gateway.ciphers", f"unknown cipher '{c}'; known: {', '.join(KNOWN_CIPHERS)}")
    macs = r.str_list(g, "macs", "gateway.")
    for m in macs:
        if m not in KNOWN_MACS:
            r.error("gateway.macs", f"unknown MAC '{m}'; known: {', '.join(KNOWN_MACS)}")
    kex_algorithms = r.str_list(g, "kex_algorithms", "gateway.")
    for k in kex_algorithms:
        if k not in KNOWN_KEX_ALGORITHMS:
            r.error("gateway.kex_algorithms", f"unknown key exchange '{k}'; known: {', '.join(KNOWN_KEX_ALGORITHMS)}")
    gateway = GatewayConfig(
        listen=tuple(listen),
        host_keys=tuple(host_keys),
        upstream_key=upstream_key,
        state_dir=state_dir,
        login_grace=r.get(g, "login_grace", "gateway.", float, 30.0, check=_positive),
        keepalive_interval=r.get(g, "keepalive_interval", "gateway.", float, 30.0, check=lambda v: None if v >= 1 else
                                 f"must be at least 1 second (a keepalive is a request the client must answer; "
                                 f"every {v:g} s ends every session), got {v:g}"),
        ciphers=tuple(ciphers),
        macs=tuple(macs),
        kex_algorithms=tuple(kex_algorithms),
        kexinit_wait=r.get(g, "kexinit_wait", "gateway.", float, 0.5,
                           check=lambda v: None if 0 <= v <= 10 else "must be between 0 and 10 seconds"),
        relay_tuning=r.get(g, "relay_tuning", "gateway.", bool, True),
        window=r.get(g, "window", "gateway.", int, 8 * 1024 * 1024,
                     check=lambda v: None if 32768 <= v <= (1 << 30) else "must be between 32768 and 1073741824"),
        max_packet=r.get(g, "max_packet", "gateway.", int, 256 * 1024,
                         check=lambda v: None if 4096 <= v <= (1 << 20) else "must be between 4096 and 1048576"),
        forwarding=r.get(g, "forwarding", "gateway.", str, "local",
                         check=lambda v: None if v in ("local", "any", "none") else
                         f"must be 'local' (-L to the machine's own services), 'any' (the machine's sshd decides) "
                         f"or 'none', got '{v}'"),
        admin_socket=_admin_socket(r, g, state_dir),
        reconcile_interval=r.get(g, "reconcile_interval", "gateway.", float, 30.0, check=_positive),
        status_concurrency=r.get(g, "status_concurrency", "gateway.", int, 16,
                                 check=lambda v: None if 1 <= v <= 1024 else "must be between 1 and 1024"),
        upstream_ca_key=upstream_ca_key,
        drain_timeout=r.get(g, "drain_timeout", "gateway.", float, 60.0, check=_non_negative),
    )

    # [metrics]
    m = r.table(doc, "metrics", "")
    r.unknown_keys(m, {"listen", "max_connections_per_source", "health_reserve"}, "metrics.")
    mlisten = r.get(m, "listen", "metrics.", str)
    md = MetricsConfig(listen=None)
    metrics = MetricsConfig(
        listen=r.host_port(mlisten, "metrics.listen", "127.0.0.1") if mlisten else None,
        max_connections_per_source=r.get(m, "max_connections_per_source", "metrics.", int,
                                         md.max_connections_per_source,
                                         check=lambda v: None if v >= 1 else f"must be 1 or more, got {v}"),
        health_reserve=r.get(m, "health_reserve", "metrics.", int, md.health_reserve,
                             check=lambda v: None if 0 <= v <= 64 else f"must be 0 to 64, got {v}"))

    # [user_ca]
    ca = r.table(doc, "user_ca", "")
    r.unknown_keys(ca, {"keys", "keys_file"}, "user_ca.")
    ca_keys = list(r.str_list(ca, "keys", "user_ca."))
    n_inline = len(ca_keys)
    ca_keys += _read_key_file(r, r.path(r.get(ca, "keys_file", "user_ca.", str)), "user_ca.keys_file")
    for i, line in enumerate(ca_keys):
        problem = _check_key_line(line)
        if problem:  # name the key the bad line came from: the inline list or the file
            r.error(f"user_ca.keys[{i}]" if i < n_inline else "user_ca.keys_file", problem)

    # [backends.NAME]
    backends: dict[str, BackendConfig] = {}
    for name, b in r.table(doc, "backends", "").items():
        prefix = f"backends.{name}."
        if not isinstance(b, dict):
            r.error(f"backends.{name}", "must be a table")
            continue
        btype = r.get(b, "type", prefix, str, required=True)
        if btype is None:
            continue
        cls = BACKEND_TYPES.get(btype)
        if cls is None:
            r.error(f"{prefix}type", f"unknown backend type '{btype}'; known: {', '.join(sorted(BACKEND_TYPES))}")
            continue
        opts = {k: v for k, v in b.items() if k != "type"}
        r.unknown_keys(opts, set(cls.BACKEND_OPTIONS), prefix)
        for problem_key, problem in cls.check_backend_options(opts, r.path):
            r.error(f"{prefix}{problem_key}", problem)
        backends[name] = BackendConfig(name, btype, MappingProxyType(opts))

    # [machines.NAME]
    machines: dict[str, MachineConfig] = {}
    common = {"backend", "user", "address", "host_key", "known_hosts", "identity", "boot_timeout",
              "idle_timeout", "min_uptime", "stop_timeout", "warm",
              "passthrough_listen", "upstream_auth", "cert_validity", "cert_source_address", "host_ca_key",
              "password_passthrough"}
    for name, mc in r.table(doc, "machines", "").items():
        prefix = f"machines.{name}."
        if not isinstance(mc, dict):
            r.error(f"machines.{name}", "must be a table")
            continue
        if not MACHINE_NAME_RE.match(name) or TARGET_SEPARATOR in name:
            r.error(f"machines.{name}", "machine names use letters, digits, '.', '_' and '-' only")
        bname = r.get(mc, "backend", prefix, str, required=True)
        bconf = backends.get(bname) if bname else None
        if bname and bconf is None:
            known = ", ".join(sorted(backends)) or "none defined; add a [backends.NAME] table"
            r.error(f"{prefix}backend", f"no backend named '{bname}'; known: {known}")
        extra = set(BACKEND_TYPES[bconf.type].MACHINE_OPTIONS) if bconf else set()
        # With an unknown backend, its options are not typos: only the backend name is wrong.
        known_anywhere = {o for cls in BACKEND_TYPES.values() for o in cls.MACHINE_OPTIONS}
        r.unknown_keys(mc, common | (extra if bconf else known_anywhere), prefix)
        address = None
        if "address" in mc:
            a = r.get(mc, "address", prefix, str)
            address = r.host_port(a, f"{prefix}address", "127.0.0.1") if a else None
        host_keys_m = list(r.str_list(mc, "host_key", prefix))
        for i, line in enumerate(host_keys_m):
            # A key line is "TYPE BASE64 [comment]"; a value without spaces is a .pub path.
            if line.startswith(("/", "~", ".")) or not any(ch.isspace() for ch in line.strip()):
                host_keys_m[i:i + 1] = _read_key_file(r, r.path(line), f"{prefix}host_key")
        for line in host_keys_m:
            problem = _check_key_line(line)
            if problem:
                r.error(f"{prefix}host_key", problem)
        known_hosts = r.path(r.get(mc, "known_hosts", prefix, str))
        if known_hosts is not None and not known_hosts.is_file():
            r.error(f"{prefix}known_hosts", f"no such file {known_hosts}")
        host_ca_m = list(r.str_list(mc, "host_ca_key", prefix))
        for line in host_ca_m:
            problem = _check_key_line(line)
            if problem:
                r.error(f"{prefix}host_ca_key", problem)
        if not host_keys_m and known_hosts is None and not host_ca_m:
            r.error(f"{prefix}host_key",
                    "missing; pin the machine's SSH host key (host_key = \"ssh-ed25519 AAAA...\" or a .pub path) "
                    "or give known_hosts = PATH or host_ca_key = \"ssh-ed25519 AAAA...\" (a host CA); "
                    "fleetgate never connects to an unverified machine")
        identity = r.path(r.get(mc, "identity", prefix, str))
        if identity is not None and not identity.is_file():
            r.error(f"{prefix}identity", f"no such file {identity}")
        _check_private_key(r, identity, f"{prefix}identity")
        upstream_auth = r.get(mc, "upstream_auth", prefix, str, "key",
                              check=lambda v: None if v in ("key", "certificate") else
                              f"must be 'key' (the gateway's key) or 'certificate' (a short-lived certificate "
                              f"signed by gateway.upstream_ca_key), got '{v}'")
        if upstream_auth == "certificate" and gateway.upstream_ca_key is None:
            r.error(f"{prefix}upstream_auth", "'certificate' needs gateway.upstream_ca_key (the CA fleetgate signs with)")
        if upstream_auth == "key" and identity is None and gateway.upstream_key is None:
            r.error(f"{prefix}identity", "missing; set gateway.upstream_key or this machine's identity (the key fleetgate logs in with)")
        warm_rules = []
        for i, rule in enumerate(r.str_list(mc, "warm", prefix)):
            try:
                warm_rules.append(parse_rule(rule))
            except ScheduleError as exc:
                r.error(f"{prefix}warm[{i}]", str(exc))
        opts = {k: v for k, v in mc.items() if k in extra}
        if bconf:
            for problem_key, problem in BACKEND_TYPES[bconf.type].check_machine_options(opts, r.path):
                r.error(f"{prefix}{problem_key}", problem)
            if address is None and not BACKEND_TYPES[bconf.type].PROVIDES_ADDRESS:
                r.error(f"{prefix}address", f"missing; backend type '{bconf.type}' needs the machine's SSH HOST:PORT")
        machines[name] = MachineConfig(
            name=name,
            backend=bname or "",
            user=r.get(mc, "user", prefix, str),
            address=address,
            host_keys=tuple(host_keys_m),
            known_hosts=known_hosts,
            identity=identity or upstream_key,
            boot_timeout=r.get(mc, "boot_timeout", prefix, float, 120.0, check=_positive),
            options=MappingProxyType(opts),
            idle_timeout=r.get(mc, "idle_timeout", prefix, float, 900.0, check=_positive),
            min_uptime=r.get(mc, "min_uptime", prefix, float, 60.0, check=_non_negative),
            stop_timeout=r.get(mc, "stop_timeout", prefix, float, 60.0, check=_positive),
            warm=tuple(warm_rules),
            passthrough_listen=_parse_passthrough_listen(r, mc, prefix),
            upstream_auth=upstream_auth or "key",
            cert_validity=r.get(mc, "cert_validity", prefix, float, 300.0,
                                check=lambda v: None if 30 <= v <= 86400 else "must be between 30 and 86400 seconds"),
            cert_source_address=r.str_list(mc, "cert_source_address", prefix),
            host_ca_keys=tuple(host_ca_m),
            password_passthrough=r.get(mc, "password_passthrough", prefix, bool, False),
        )
        if bconf:
            for problem_key, problem in BACKEND_TYPES[bconf.type].check_machine(machines[name], bconf.options):
                r.error(f"{prefix}{problem_key}", problem)

    routing = _parse_routing(r, doc)

    # [users.NAME]
    users: dict[str, UserConfig] = {}
    machines_doc = doc.get("machines") if isinstance(doc.get("machines"), dict) else {}
    for name, u in r.table(doc, "users", "").items():
        prefix = f"users.{name}."
        if not isinstance(u, dict):
            r.error(f"users.{name}", "must be a table")
            continue
        if not USER_NAME_RE.match(name):
            r.error(f"users.{name}", "user names are lower-case letters, digits, '_', '.' and '-' (no '+')")
        r.unknown_keys(u, {"authorized_keys", "authorized_keys_file", "machines"}, prefix)
        keys = list(r.str_list(u, "authorized_keys", prefix))
        n_inline = len(keys)
        keys += _read_key_file(r, r.path(r.get(u, "authorized_keys_file", prefix, str)), f"{prefix}authorized_keys_file")
        for i, line in enumerate(keys):
            problem = _check_key_line(line)
            if problem:  # name the key the bad line came from: the inline list or the file
                r.error(f"{prefix}authorized_keys[{i}]" if i < n_inline else f"{prefix}authorized_keys_file", problem)
        ms = r.str_list(u, "machines", prefix, required=True)
        password_only = bool(ms) and all(machines[m].password_passthrough for m in ms if m in machines)
        if not keys and not ca_keys and not password_only and routing.keys_url is None:
            r.error(f"{prefix}authorized_keys", "missing; give the user's public keys, or configure [user_ca] keys")
        if "machines" in u and not ms:
            r.error(f"{prefix}machines", "must name at least one machine (the first is the default)")
        for mname in ms:
            if mname not in machines and mname not in machines_doc:
                known = ", ".join(sorted(machines)) or "none defined"
                r.error(f"{prefix}machines", f"no machine named '{mname}'; known: {known}")
        users[name] = UserConfig(name, tuple(keys), ms)

    if not users and not routing.webhook:
        r.error("users", "no users; add a [users.NAME] table with authorized_keys and machines")

    passthrough = _parse_passthrough(r, doc)
    limits = _parse_limits(r, doc)
    from .store.config import parse_store

    store = parse_store(r, doc)
    audit = r.table(doc, "audit", "")
    r.unknown_keys(audit, {"file"}, "audit.")
    audit_value = r.get(audit, "file", "audit.", str)
    audit_file = audit_value if audit_value in (None, "-") else r.path(audit_value)
    if isinstance(audit_file, Path):
        _check_audit_file(r, audit_file, gateway.state_dir)
    if r.issues:
        raise ConfigError(r.issues)
    return Config(
        path=Path(file),
        base_dir=r.base_dir,
        gateway=gateway,
        metrics=metrics,
        users=MappingProxyType(users),
        user_ca_keys=tuple(ca_keys),
        backends=MappingProxyType(backends),
        machines=MappingProxyType(machines),
        passthrough=passthrough,
        audit_file=audit_file,
        limits=limits,
        store=store,
        routing=routing,
    )
