"""User name → target machine.

`alice` lands on alice's first machine, `alice+box2` on box2 if alice may use it. The
Router is an interface so a webhook or database router can replace the TOML table
without touching the SSH front; the front only ever asks `route()` and `may_reach()`
(and, before authentication, the router's `keys` lookup if it has one). The webhook
router is fleetgate/webhook.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from .errors import RoutingError
from .config import TARGET_SEPARATOR, MachineConfig, UserConfig


@dataclass(frozen=True)
class Target:
    user: str            # the gateway user who authenticated
    machine: str         # the machine to land on
    upstream_user: str   # the account on that machine


def split_login(login: str) -> tuple[str, str | None]:
    """'alice+box2' → ('alice', 'box2'); 'alice' → ('alice', None)."""
    user, sep, target = login.partition(TARGET_SEPARATOR)
    return user, (target if sep else None)


@dataclass(frozen=True)
class LoginInfo:
    """What the SSH front knows of a login besides the user and target (for a webhook router)."""

    login: str
    source: str | None = None           # the client's IP address
    key_type: str | None = None         # e.g. ssh-ed25519; for a certificate, its CA key's
    key_fingerprint: str | None = None  # SHA256:...; for a certificate, its CA key's
    certificate: bool = False


class Router(Protocol):
    # A user's authorized keys from elsewhere (fleetgate.webhook.KeysWebhook), or None.
    keys: Any

    async def route(self, user: str, target: str | None, info: LoginInfo | None = None) -> Target: ...

    def may_reach(self, user: str, machine: str) -> bool: ...


class TableRouter:
    """The routing table from the config: each user's `machines`, the first being the default."""

    def __init__(self, users: Mapping[str, UserConfig], machines: Mapping[str, MachineConfig], keys: Any = None):
        self._users = users
        self._machines = machines
        self.keys = keys

    def may_reach(self, user: str, machine: str) -> bool:
        u = self._users.get(user)
        return u is not None and machine in u.machines

    async def route(self, user: str, target: str | None, info: LoginInfo | None = None) -> Target:
        u = self._users.get(user)
        if u is None:
            raise RoutingError(f"fleetgate: no machine for {user}")
        if target == "":
            # `alice+` is most likely an empty variable in a script: say so rather than guess.
            raise RoutingError(f"fleetgate: no machine name after '{TARGET_SEPARATOR}' in {user}{TARGET_SEPARATOR}")
        machine = target or u.default_machine
        if machine not in u.machines or machine not in self._machines:
            raise RoutingError(f"fleetgate: {user} may not use {machine}")
        return Target(user, machine, self._machines[machine].user or user)
