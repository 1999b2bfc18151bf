"""Pre-authentication limits, in the spirit of sshd's MaxStartups and PerSourcePenalties.

Why this shape: a gateway on the internet must keep serving real users while scanners
hold connections open or guess keys. So
- each source address may hold only a few unauthenticated connections, with random
  early drop between `start` and `full` (sshd's start:rate:full, but per source, so one
  noisy address cannot starve everyone else);
- the total of unauthenticated connections is capped, and when it is reached the
  oldest unauthenticated connection of the busiest source is evicted instead of the
  newcomer being refused, so a flood from many addresses cannot lock users out;
- a source whose connections keep ending in failed authentication is blocked for a
  while (exempt networks never are);
- Diffie-Hellman key exchanges with big groups (group16, group18, group exchange), which
  cost the gateway up to ~4 times a curve25519 handshake while the client can send a
  random number for free, draw on a budget (globally per second and per source per
  minute); a connection over it is not offered them (or refused, if it can do nothing
  else), counted as `kex_budget`; re-exchanges the client starts (before or after
  authentication) draw on the same budget;
- every key re-exchange a client starts is counted per connection, per source and for the
  gateway: a client that rekeys far more often than any real one (OpenSSH, PuTTY, Dropbear
  and asyncssh rekey after 1 GiB or an hour; Paramiko after 512 MiB) is disconnected, counted
  as `rekey_rate`, and a strike towards the source's penalty like a failed login;
- every refusal is counted by reason, and logged once per source and reason a minute.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from . import internals

log = logging.getLogger(__name__)

LOG_WINDOW = 60.0
# Like sshd's PerSourcePenalties max-sources: an attacker with more addresses than this (IPv6)
# makes the oldest idle records be forgotten, never the table grow or each admission slow down.
MAX_SOURCES = 65_536
MAX_LOGGED = 10_000
REFUSAL_REASONS = ("per_source", "evicted", "penalty", "max_auth_tries", "preauth_timeout", "password_rate",
                   "kex_budget", "rekey_rate")



def _put_bucket(table: dict[str, tuple[float, float]], ip: str, tokens: float, now: float,
                cap: float) -> dict[str, tuple[float, float]]:
    """Record a source's per-minute token bucket in a table bounded at MAX_SOURCES: when full,
    the sources whose buckets have refilled are forgotten first (they would start full anyway),
    and if that frees nothing the table starts afresh. Returns the table to keep."""
    if len(table) >= MAX_SOURCES:
        table = {k: v for k, v in table.items() if v[0] + (now - v[1]) * cap / 60.0 < cap}
        if len(table) >= MAX_SOURCES:
            table = {}
    table[ip] = (tokens, now)
    return table

@dataclass(frozen=True)
class LimitsConfig:
    # Generous per source: a CI fleet or an office behind one NAT address opens dozens of
    # logins at once (50 concurrent clients from one address are a tested case).
    max_unauthenticated: int = 1024
    per_source_start: int = 64
    per_source_rate: int = 30       # percent drop probability at `start`, rising linearly to 100 at `full`
    per_source_full: int = 128
    max_auth_tries: int = 6
    penalty_after: int = 10         # connections that ended in failed authentication ...
    penalty_window: float = 600.0   # ... within this many seconds ...
    penalty_duration: float = 300.0  # ... block the source this long
    exempt: tuple[str, ...] = ()    # CIDRs never penalised nor per-source limited
    # Password passthrough wakes a machine before the user is known: a tight budget.
    password_per_source_per_minute: int = 5
    password_per_user_per_minute: int = 10
    # ... and per target account (machine and its account): several gateway users, or one
    # user's `alice+box`, can reach the same account; its guesses share one budget.
    password_per_account_per_minute: int = 10
    # Big-group DH (group16, group18, group exchange) before authentication: a group18 or
    # 8192-bit group-exchange handshake costs the gateway ~14 ms of CPU against ~4 ms for
    # curve25519 (bench/preauth_cpu.py), so 8 a second keep what a flood of them can take to
    # about a ninth of one core. Clients with curve25519 or ECDH (every OpenSSH since 6.5,
    # Dropbear, libssh2 1.9+, PuTTY) never need them.
    expensive_kex_per_second: float = 8.0
    expensive_kex_per_source_per_minute: int = 30
    # Key re-exchanges a client starts. The relay moves at most ~220 MiB/s on one connection
    # (4.5 CPU-s per GiB, docs/benchmarks.md), so a client rekeying every 512 MiB (Paramiko;
    # OpenSSH, PuTTY, Dropbear, asyncssh wait for 1 GiB or an hour) needs at most ~26 a minute.
    # A curve25519 re-exchange costs the gateway ~0.5 ms (issue 25: 36 348 in 20 s took 90 % of
    # a core), a group18 one ~14 ms: 30 a minute on one connection is at most 0.5/s of it;
    # 120 a minute per source leaves a NAT of busy users room; 30 a second for the whole
    # gateway keeps a many-source flood to ~2 % of a core with curve25519 (the expensive ones
    # are bounded by expensive_kex_* first).
    rekey_per_connection_per_minute: int = 30
    rekey_per_source_per_minute: int = 120
    rekey_per_second: float = 30.0
    # After authentication: sshd's MaxSessions (shells, commands, sftp on one connection;
    # OpenSSH ControlMaster and Ansible share one), every channel of a connection (forwards
    # and jumps too), and connections per user (each holds an upstream login and buffers).
    max_sessions: int = 10
    max_channels: int = 64
    max_connections_per_user: int = 64
    # Budgets that add up (fleetgate/budget.py, docs/security.md): per user and for the gateway
    # as a whole; 0 means derived from the open-file limit and the machine's memory (budget.resolve).
    fds_total: int = 0
    fds_per_user: int = 0
    buffer_total: int = 0       # bytes
    buffer_per_user: int = 0    # bytes
    channels_total: int = 0
    channels_per_user: int = 0


class _Rekeys:
    """One connection's token bucket for the key re-exchanges its client starts."""

    __slots__ = ("_limiter", "_ip", "_tokens", "_last")

    def __init__(self, limiter: "PreauthLimiter", ip: str):
        self._limiter = limiter
        self._ip = ip
        self._tokens = float(limiter.config.rekey_per_connection_per_minute)
        self._last = limiter._clock()

    def take(self, now: float, cap: float, rate: float) -> bool:
        self._tokens = min(cap, self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def allow(self) -> bool:
        return self._limiter.rekey(self._ip, self)


class Closable(Protocol):
    def abort(self) -> None: ...


@dataclass
class _Source:
    # Plain dict and list, not OrderedDict and deque: a quarter of the memory, and a flood
    # from many addresses keeps one of these per address.
    unauthenticated: dict = field(default_factory=dict)   # insertion order: oldest first
    failures: list = field(default_factory=list)
    blocked_until: float = 0.0


class PreauthLimiter:
    def __init__(self, config: LimitsConfig, count: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None):
        self.config = config
        # token buckets for expensive key exchanges: the global one, then one per source
        self._kex_global = (float(config.expensive_kex_per_second), clock())
        self._kex_sources: dict[str, tuple[float, float]] = {}
        # token buckets for key re-exchanges: the gateway's, then one per source (each
        # connection's own is a _Rekeys held by its connection)
        self._rekey_global = (float(config.rekey_per_second), clock())
        self._rekey_sources: dict[str, tuple[float, float]] = {}
        # unauthenticated connections that were refused an expensive key exchange
        self._kex_refused: set[int] = set()
        self.count = count
        self._clock = clock
        self._rng = rng or random.Random()
        self._sources: dict[str, _Source] = {}
        self._holding: dict[str, _Source] = {}  # the sources with unauthenticated connections
        self._total = 0
        self._exempt = [ipaddress.ip_network(c, strict=False) for c in config.exempt]
        self._logged: dict[tuple[str, str], float] = {}

    def _exempted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._exempt)

    def refuse(self, ip: str, reason: str, detail: str = "") -> None:
        """Count a refusal and log it once per source and reason per minute."""
        self.count(reason)
        now = self._clock()
        key = (ip, reason)
        if now - self._logged.get(key, -LOG_WINDOW) >= LOG_WINDOW:
            self._logged[key] = now
            log.warning("pre-auth refusal source=%s reason=%s%s (further ones from this source are counted, "
                        "not logged, for %.0f s)", ip, reason, f" {detail}" if detail else "", LOG_WINDOW)
            if len(self._logged) > MAX_LOGGED:  # bounded memory under a spoofed-source flood
                self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_WINDOW}
                if len(self._logged) > MAX_LOGGED // 2:  # still full: keep the newest half (amortised O(1))
                    self._logged = dict(list(self._logged.items())[-(MAX_LOGGED // 2):])

    def admit(self, ip: str, conn: Closable) -> bool:
        """Decide on a new connection; on True it counts as unauthenticated until settled."""
        c = self.config
        now = self._clock()
        src = self._sources.get(ip)
        exempt = self._exempted(ip)
        if src is not None and not exempt:
            if src.blocked_until > now:
                self.refuse(ip, "penalty")
                return False
            held = len(src.unauthenticated)
            if held >= c.per_source_full:
                self.refuse(ip, "per_source")
                return False
            if held >= c.per_source_start:
                span = max(1, c.per_source_full - c.per_source_start)
                p = c.per_source_rate + (100 - c.per_source_rate) * (held - c.per_source_start) / span
                if self._rng.random() * 100 < p:
                    self.refuse(ip, "per_source")
                    return False
        if self._total >= c.max_unauthenticated:
            self._evict_one()
        if src is None:
            if len(self._sources) >= MAX_SOURCES:
                self._prune(now)
            src = self._sources[ip] = _Source()
        src.unauthenticated[id(conn)] = (now, conn)
        self._holding[ip] = src
        self._total += 1
        key = id(conn)

        def allow_expensive(name: str) -> bool:
            if self.expensive_kex(ip):
                return True
            self._kex_refused.add(key)  # if it then leaves unauthenticated: a strike (closed())
            return False

        internals.set_kex_budget(conn, allow_expensive, _Rekeys(self, ip).allow)
        return True

    def rekey(self, ip: str, per_connection: "_Rekeys") -> bool:
        """May a connection from `ip` run one more key re-exchange that its client started?
        (per connection, per source unless exempt, and for the whole gateway)"""
        c = self.config
        now = self._clock()
        ok_conn = per_connection.take(now, float(c.rekey_per_connection_per_minute),
                                      c.rekey_per_connection_per_minute / 60.0)
        exempt = self._exempted(ip)
        cap = float(c.rekey_per_source_per_minute)
        s_tokens, s_last = self._rekey_sources.get(ip, (cap, now))
        s_tokens = min(cap, s_tokens + (now - s_last) * cap / 60.0)
        g_tokens, g_last = self._rekey_global
        g_tokens = min(c.rekey_per_second, g_tokens + (now - g_last) * c.rekey_per_second)
        allowed = ok_conn and g_tokens >= 1.0 and (exempt or s_tokens >= 1.0)
        if allowed:
            g_tokens -= 1.0
            s_tokens -= 1.0
        self._rekey_global = (g_tokens, now)
        if not exempt:
            self._rekey_sources = _put_bucket(self._rekey_sources, ip, s_tokens, now, cap)
        if not allowed:
            which = "connection" if not ok_conn else "gateway" if g_tokens < 1.0 else "source"
            self.refuse(ip, "rekey_rate", f"budget={which}")
            # A strike, as a failed login is: a flood that reconnects after each cut (a full
            # handshake instead of a re-exchange) gets its source blocked like a key guesser.
            self._penalise(ip)
        return allowed

    def expensive_kex(self, ip: str) -> bool:
        """May `ip` run one more finite-field DH key exchange now? (global and per-source buckets)"""
        c = self.config
        now = self._clock()
        g_tokens, g_last = self._kex_global
        g_tokens = min(c.expensive_kex_per_second, g_tokens + (now - g_last) * c.expensive_kex_per_second)
        exempt = self._exempted(ip)
        cap = float(c.expensive_kex_per_source_per_minute)
        s_tokens, s_last = self._kex_sources.get(ip, (cap, now))
        s_tokens = min(cap, s_tokens + (now - s_last) * cap / 60.0)
        if g_tokens < 1.0 or (s_tokens < 1.0 and not exempt):
            self._kex_global = (g_tokens, now)
            self.refuse(ip, "kex_budget")
            return False
        self._kex_global = (g_tokens - 1.0, now)
        if not exempt:
            self._kex_sources = _put_bucket(self._kex_sources, ip, s_tokens - 1.0, now, cap)
        return True

    def _prune(self, now: float) -> None:
        """Forget sources with nothing held, no recent failure and no block (bounded memory).

        If that is not enough (more addresses than MAX_SOURCES failed recently), forget
        the oldest idle ones, unblocked first, down to three quarters of the cap: the
        next prune is then a quarter of the cap away, so admissions stay O(1) amortised.
        """
        window = self.config.penalty_window
        self._sources = {ip: s for ip, s in self._sources.items()
                         if s.unauthenticated or s.blocked_until > now
                         or (s.failures and now - s.failures[-1] <= window)}
        excess = len(self._sources) - MAX_SOURCES * 3 // 4
        for blocked in (False, True):
            if excess <= 0:
                break
            idle = [ip for ip, s in self._sources.items()
                    if not s.unauthenticated and (s.blocked_until > now) == blocked][:excess]
            for ip in idle:
                del self._sources[ip]
            excess -= len(idle)

    def _evict_one(self) -> None:
        """Make room: the oldest unauthenticated connection of the source holding the most."""
        ip, src = max(self._holding.items(), key=lambda item: len(item[1].unauthenticated))
        key, (_, conn) = next(iter(src.unauthenticated.items()))
        self._settle(ip, key)
        self.refuse(ip, "evicted")
        conn.abort()

    def _settle(self, ip: str, key: int) -> bool:
        self._kex_refused.discard(key)
        src = self._sources.get(ip)
        if src is None or src.unauthenticated.pop(key, None) is None:
            return False
        self._total -= 1
        if not src.unauthenticated:
            self._holding.pop(ip, None)
            if not src.failures and src.blocked_until <= self._clock():
                del self._sources[ip]
        return True

    def authenticated(self, ip: str, conn: Closable) -> None:
        self._settle(ip, id(conn))

    def closed(self, ip: str, conn: Closable, failed_auth: bool) -> None:
        """An unauthenticated connection ended; a failed one counts towards the source's penalty."""
        refused_kex = id(conn) in self._kex_refused
        if not self._settle(ip, id(conn)) or not (failed_auth or refused_kex):
            return
        # A connection that left unauthenticated after being refused an expensive key exchange
        # is a strike too (sshd's PerSourcePenalties "noauth"): a flood of DH-only clients that
        # reconnects at once would otherwise cost a handshake's start each time, unbounded.
        self._penalise(ip)

    def _penalise(self, ip: str) -> None:
        """One more strike against `ip` (a failed login, or a connection cut for re-exchanging
        keys far too often); penalty_after of them within penalty_window block it."""
        if self._exempted(ip):
            return
        c = self.config
        now = self._clock()
        src = self._sources.get(ip)
        if src is None:
            src = self._sources[ip] = _Source()
        src.failures.append(now)
        stale = 0
        while stale < len(src.failures) and now - src.failures[stale] > c.penalty_window:
            stale += 1
        del src.failures[:stale]
        if len(src.failures) >= c.penalty_after:
            src.blocked_until = now + c.penalty_duration
            src.failures.clear()
            log.warning("source blocked source=%s seconds=%.0f after %d failed logins or key re-exchange floods",
                        ip, c.penalty_duration, c.penalty_after)

    @property
    def unauthenticated(self) -> int:
        return self._total
