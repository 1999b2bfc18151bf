"""The typed, frozen shapes of a loaded config: a leaf module every part may import.

Why apart from config.py: config.py parses and validates, which needs the backends'
option checks; the backends in turn need these shapes. With the shapes here, neither
imports the other's importer (no import cycle), and config.py re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class GatewayConfig:
    listen: tuple[HostPort, ...]
    host_keys: tuple[Path, ...]
    upstream_key: Path | None
    state_dir: Path
    login_grace: float = 30.0
    keepalive_interval: float = 30.0
    ciphers: tuple[str, ...] = ()  # empty: OpenSSH's list, steered to the cheapest the client has
    macs: tuple[str, ...] = ()     # empty: OpenSSH's list
    kex_algorithms: tuple[str, ...] = ()  # empty: OpenSSH's list (what asyncssh can do of it)
    kexinit_wait: float = 0.5      # wait this long for the client's KEXINIT before sending ours
    relay_tuning: bool = True
    window: int = 8 * 1024 * 1024
    max_packet: int = 256 * 1024
    forwarding: str = "local"
    admin_socket: Path | None = None
    reconcile_interval: float = 30.0
    status_concurrency: int = 16   # reconcile: status calls at once per backend (issue 15)
    upstream_ca_key: Path | None = None
    drain_timeout: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None
    # Connections at once from one address to the metrics port (slowloris from one source).
    max_connections_per_source: int = 8
    # Of the port's connection cap, slots only /healthz and /readyz may use.
    health_reserve: int = 4


@dataclass(frozen=True)
class UserConfig:
    name: str
    authorized_keys: tuple[str, ...]
    machines: tuple[str, ...]

    @property
    def default_machine(self) -> str:
        return self.machines[0]


@dataclass(frozen=True)
class BackendConfig:
    name: str
    type: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class MachineConfig:
    name: str
    backend: str
    user: str | None
    address: HostPort | None
    host_keys: tuple[str, ...]
    known_hosts: Path | None
    identity: Path | None
    boot_timeout: float
    options: Mapping[str, Any]
    idle_timeout: float = 900.0
    min_uptime: float = 60.0
    stop_timeout: float = 60.0
    warm: tuple[Any, ...] = ()
    passthrough_listen: HostPort | None = None
    upstream_auth: str = "key"
    cert_validity: float = 300.0
    cert_source_address: tuple[str, ...] = ()
    host_ca_keys: tuple[str, ...] = ()
    password_passthrough: bool = False


@dataclass(frozen=True)
class PassthroughConfig:
    """The opt-in raw TCP passthrough wakes before authentication, hence a per-source rate limit."""

    per_source_per_minute: int = 10


@dataclass(frozen=True)
class RoutingConfig:
    """[routing]: the TOML table (type "table") or the team's own HTTP service (type "webhook"),
    and optionally users' authorized keys from that service (keys_url). docs/webhooks.md."""

    type: str = "table"
    url: str | None = None           # route webhook (type = "webhook")
    keys_url: str | None = None      # authorized-keys webhook (either type)
    timeout: float = 2.0
    cache_ttl: float = 60.0
    cache_size: int = 10000
    token: str | None = field(default=None, repr=False)  # read from token_file; a secret
    token_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def webhook(self) -> bool:
        return self.type == "webhook"


@dataclass(frozen=True)
class Config:
    path: Path
    base_dir: Path
    gateway: GatewayConfig
    metrics: MetricsConfig
    users: Mapping[str, UserConfig]
    user_ca_keys: tuple[str, ...]
    backends: Mapping[str, BackendConfig]
    machines: Mapping[str, MachineConfig]
    passthrough: PassthroughConfig = field(default_factory=PassthroughConfig)
    audit_file: Path | str | None = None
    limits: Any = None  # fleetgate.ssh.limits.LimitsConfig
    store: Any = None  # fleetgate.store.StoreConfig; None: the in-process store
    routing: RoutingConfig = field(default_factory=RoutingConfig)


def parse_host_port(value: str, default_host: str = "0.0.0.0") -> HostPort | None:
    """Parse 'host:port', '[v6]:port' or ':port'/'port'."""
    value = value.strip()
    host, port_s = default_host, value
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or not value[end + 1:].startswith(":"):
            return None
        host, port_s = value[1:end], value[end + 2:]
    elif ":" in value:
        host, _, port_s = value.rpartition(":")
        host = host or default_host
    if not port_s.isdigit():
        return None
    port = int(port_s)
    if not 0 <= port < 65536:
        return None
    return HostPort(host, port)
