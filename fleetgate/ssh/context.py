"""What every connection to the SSH front shares: config, keys, limits, fleet, metrics.

A reload (SIGHUP) calls apply(): new connections see the new users, keys and limits;
live connections keep what they already hold. The listeners that create connections
live in server.py; connections (front.py) see only this object.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import asyncssh
import trio

from .. import budget as budget_mod
from .. import fdlimit
from ..audit import AuditLog
from ..config import Config
from ..metrics import Metrics
from ..passthrough import RateLimiter
from ..routing import Router
from .bridge import AsyncioTasks
from .grace import GraceClock
from .limits import LimitsConfig, PreauthLimiter

if TYPE_CHECKING:
    from ..fleet import Fleet

log = logging.getLogger(__name__)


def _key_lines(value: object) -> list:
    return [value] if isinstance(value, str) else list(value or [])


class Connection:
    """What the context needs of a live connection (FrontConnection implements it)."""

    def notify(self, text: str) -> None: ...
    def close(self) -> None: ...
    def flush_bytes(self) -> None: ...


class FrontContext:
    def __init__(self, config: Config, fleet: "Fleet", router: Router, metrics: Metrics,
                 audit: AuditLog | None = None):
        self.config = config
        self.audit = audit or AuditLog(None, metrics)
        self.fleet = fleet
        self.router = router
        self.metrics = metrics
        self.tasks = AsyncioTasks("ssh-front")
        self.connections: set = set()
        metrics.before_scrape.append(self.flush_bytes)
        self.user_connections: dict[str, int] = {}  # per-user connection slots (limits.max_connections_per_user)
        self.connections_changed = trio.Event()
        self.no_keys: frozenset[bytes] = frozenset()
        self.limiter = PreauthLimiter(config.limits or LimitsConfig(),
                                      count=lambda reason: metrics.preauth_refusals.labels(reason).inc())
        self.grace = GraceClock(config.gateway.login_grace)
        # Read at scrape time, from whichever limiter a reload left in force.
        metrics.unauthenticated.set_function(lambda: self.limiter.unauthenticated)
        metrics.unauthenticated_limit.set_function(lambda: self.limiter.config.max_unauthenticated)
        self._password_limits: tuple[int, int, int] | None = None
        # Budgets that add up (fleetgate/budget.py): one ledger for the life of the process; a
        # reload (or a changed open-file limit, re-read on SIGHUP) changes its limits, not its use.
        self.budgets = budget_mod.Budgets(self.budget_limits(config.limits or LimitsConfig()),
                                          on_refusal=lambda kind, scope: metrics.budget_refusals.labels(kind,
                                                                                                        scope).inc())
        for kind in budget_mod.KINDS:
            metrics.budget_used.labels(kind).set_function(lambda kind=kind: self.budgets.used[kind])
            metrics.budget_user_max.labels(kind).set_function(lambda kind=kind: self.budgets.user_max(kind))
            for scope in budget_mod.SCOPES:
                metrics.budget_limit.labels(kind, scope).set_function(
                    lambda kind=kind, scope=scope: self.budgets.limits.limit(kind, scope))
        self.apply(config, router)

    @staticmethod
    def budget_limits(limits: LimitsConfig, fd_limit: int | None = None) -> budget_mod.BudgetLimits:
        """The budgets for `limits` under the open-file limit in force now (or `fd_limit`)."""
        fds = fdlimit.current() if fd_limit is None else fd_limit
        return budget_mod.resolve(
            fd_limit=fds, memory=budget_mod.memory_bytes(), max_unauthenticated=limits.max_unauthenticated,
            http_connections=fdlimit.default_http_connections(fds),
            max_connections_per_user=limits.max_connections_per_user, max_channels=limits.max_channels,
            fds_total=limits.fds_total, fds_per_user=limits.fds_per_user, buffer_total=limits.buffer_total,
            buffer_per_user=limits.buffer_per_user, channels_total=limits.channels_total,
            channels_per_user=limits.channels_per_user)

    def apply(self, config: Config, router: Router) -> None:
        """Take a (re)loaded config for new connections; live connections keep what they have.

        All or nothing: everything that can fail (parsing keys, reading the CA key) happens
        in prepare(), which changes nothing; commit() only assigns."""
        self.commit(self.prepare(config, router))

    def prepare(self, config: Config, router: Router) -> dict:
        """Build what a config needs, without touching the live state; raises on a bad key file."""
        ca = config.gateway.upstream_ca_key
        limits = config.limits or LimitsConfig()
        return {
            "config": config, "router": router, "limits": limits,
            "user_keys": {name: frozenset(asyncssh.import_public_key(k).public_data for k in u.authorized_keys)
                          for name, u in config.users.items()},
            # Devices (backend type "device") log in as device:NAME with these keys, apart from users.
            "device_keys": {name: frozenset(asyncssh.import_public_key(k).public_data
                                            for k in _key_lines(m.options.get("device_keys")))
                            for name, m in config.machines.items()
                            if config.backends[m.backend].type == "device"},
            "ca_keys": frozenset(asyncssh.import_public_key(k).public_data for k in config.user_ca_keys),
            "upstream_ca": asyncssh.read_private_key(str(ca)) if ca is not None else None,
            "budgets": self.budget_limits(limits),
        }

    def commit(self, new: dict) -> None:
        """Swap in what prepare() built; nothing here raises."""
        config, limits = new["config"], new["limits"]
        self.config = config
        self.router = new["router"]
        # Authorized keys looked up per login (webhook.KeysWebhook, in begin_auth), or None.
        self.keys_lookup = getattr(new["router"], "keys", None)
        # Users the config does not list may log in (their routes and keys come from a webhook).
        self.open_users = config.routing.webhook
        self.grace.grace = config.gateway.login_grace
        self.user_keys = new["user_keys"]
        self.ca_keys = new["ca_keys"]
        self.device_keys = new["device_keys"]
        self.upstream_ca = new["upstream_ca"]
        if limits != self.limiter.config:
            self.limiter = PreauthLimiter(limits, count=self.limiter.count)
        if hasattr(self, "budgets"):
            self.budgets.apply(new["budgets"])
        self.password_machines = any(m.password_passthrough for m in config.machines.values())
        wanted = (limits.password_per_source_per_minute, limits.password_per_user_per_minute,
                  limits.password_per_account_per_minute)
        if self._password_limits != wanted:
            self._password_limits = wanted
            self.password_sources = RateLimiter(limits.password_per_source_per_minute)
            self.password_users = RateLimiter(limits.password_per_user_per_minute)
            # Keyed by (machine, account): what the machine's sshd sees guessed, whoever asks.
            self.password_accounts = RateLimiter(limits.password_per_account_per_minute)

    def add_connection(self, c: Connection) -> None:
        self.connections.add(c)

    def remove_connection(self, c: Connection) -> None:
        self.connections.discard(c)
        self.connections_changed.set()
        self.connections_changed = trio.Event()

    def flush_bytes(self) -> None:
        """Bytes relayed by open channels go into the counters before each scrape."""
        for c in list(self.connections):
            c.flush_bytes()

    def notify_all(self, text: str) -> None:
        """A line on the stderr of every open session (and a banner to anyone still logging in)."""
        for c in list(self.connections):
            c.notify(text)
