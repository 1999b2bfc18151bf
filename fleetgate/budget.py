"""Budgets that add up (issue 25): descriptors, buffered bytes and channels, per user and in total.

Why: a bound per connection is not a bound per user (64 connections × 64 channels is 4 096
sockets for one user), and a bound per user is not a bound for the gateway. Every
authenticated connection and every channel draws on a ledger kept per user and for the
gateway as a whole; when either is reached the new connection or channel is refused with a
sentence that names the limit, and nothing already open is touched. What the ledger counts:

- `fds`: an authenticated connection 2 (the user's socket and the gateway's login to the
  machine, opened or not yet), a jump channel 1 more (its socket to the machine's sshd).
  Pre-authentication connections and the metrics/admin HTTP connections have their own caps
  (`limits.max_unauthenticated`, the HTTP connection cap) and a fixed reserve is kept apart
  for everything else (accept's bursts, probes, pid files, the metrics port, the admin
  socket, logs): `resolve()` sizes `fds_total` so that the four add up to the open-file
  limit, which is what keeps accept() from failing with EMFILE;
- `buffer`: the bytes a channel can make the gateway hold, i.e. the windows it grants:
  twice the channel's window (the user's side and the machine's side may each fill the
  window the gateway granted it while the other does not read). A channel's window is
  chosen at open from what the user's and the gateway's budgets have left (full
  `gateway.window` when there is room, smaller down to WINDOW_FLOOR, else refused), so
  memory is bounded by the budget whatever the clients advertise;
- `channels`: every channel (sessions, -L, -W/jumps, -R connections).

The model is Envoy's overload manager: budgets with actions (refuse new work) at their
thresholds, and a reserve that no user can take for the control plane.

Acquire/release cannot leak: `take()` returns a Hold, released once by `close()` (idempotent,
also a context manager); a connection closes every hold it took when it ends, whatever its
channels did. tests/test_budget.py opens and closes at random and checks the ledger returns
to zero.

Memory given back: freed buffers go back to the allocator, and glibc keeps freed heap pages
in the process unless asked. `trim_due()` tells a periodic task (app.py) when enough buffer
budget was released since the last trim, and `release_memory()` then runs `malloc_trim(0)`.

Plain Python: no trio, no asyncio; the SSH front calls it from asyncio callbacks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from .fdlimit import ACCEPT_HEADROOM, RESERVE

log = logging.getLogger(__name__)

KINDS = ("fds", "buffer", "channels")
SCOPES = ("user", "gateway")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

FDS_PER_CONNECTION = 2
FDS_PER_JUMP = 1
# A user's share: a quarter of the buffer and channel budgets, an eighth of the descriptors
# (the scarcest: a 1024-descriptor gateway leaves ~600 for sessions), so no user can take
# what the others need.
USER_SHARE = 4
USER_SHARE_FDS = 8
# The smallest window a channel is opened with when the budget is tight (below, it is refused).
WINDOW_FLOOR = 32 * KiB
# A new channel's window is at most this fraction of the buffer budget left (1/16): the first
# channels get the full gateway.window, later ones less, so a user's budget holds ~100 channels
# rather than 16 full ones.
WINDOW_SHARE = 16
# A jump's machine side is a socket: what one read of it brings (asyncio reads 256 KiB at most)
# before the channel's write buffer pauses it.
JUMP_READ = 256 * KiB
BUFFER_MIN, BUFFER_MAX = 64 * MiB, 1 * GiB
MEMORY_SHARE = 16   # buffer_total: a sixteenth of the memory the gateway may use
CHANNELS_TOTAL_MAX = 16384
# Trim the allocator after this much buffer budget was given back.
TRIM_AFTER = 32 * MiB
LOG_EVERY = 10.0
MAX_LOGGED = 1000


@dataclass(frozen=True)
class BudgetLimits:
    """The resolved budgets (no zeros): gateway totals and each user's share."""

    fds_total: int
    fds_per_user: int
    buffer_total: int
    buffer_per_user: int
    channels_total: int
    channels_per_user: int
    fd_reserve: int = 0     # informational: what resolve() kept apart for the control plane
    fd_limit: int = 0       # informational: the open-file limit it was derived from

    def limit(self, kind: str, scope: str) -> int:
        return getattr(self, f"{kind}_{'per_user' if scope == 'user' else 'total'}")


CONFIG_KEYS = {  # [limits] key → what it sets, for messages
    "fds": ("limits.fds_per_user", "limits.fds_total"),
    "buffer": ("limits.buffer_per_user", "limits.buffer_total"),
    "channels": ("limits.channels_per_user", "limits.channels_total"),
}


def memory_bytes() -> int:
    """The memory this process may use: MemTotal, or a smaller cgroup (v2 or v1) limit."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if not total:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            total = 4 * GiB
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and 0 < int(raw) < total:
            total = int(raw)
    return total


def resolve(*, fd_limit: int, memory: int, max_unauthenticated: int, http_connections: int,
            max_connections_per_user: int, max_channels: int, fds_total: int = 0, fds_per_user: int = 0,
            buffer_total: int = 0, buffer_per_user: int = 0, channels_total: int = 0,
            channels_per_user: int = 0) -> BudgetLimits:
    """The budgets from the config (0: derived) and the machine: docs/security.md's table.

    fds_total = the open-file limit − the reserve − max_unauthenticated − the HTTP cap, so
    that the four add up; each user gets an eighth (and no more than its connections and
    channels could ever hold). buffer_total = a sixteenth of memory, 64 MiB..1 GiB; each user
    a quarter. channels_total = what buffer_total holds at the smallest window, at most 16 384;
    each user a quarter, at most max_connections_per_user × max_channels."""
    reserve = RESERVE + ACCEPT_HEADROOM
    ft = fds_total or max(16, fd_limit - reserve - max_unauthenticated - http_connections)
    implied_fds = max_connections_per_user * (FDS_PER_CONNECTION + max_channels * FDS_PER_JUMP)
    fu = fds_per_user or max(FDS_PER_CONNECTION, min(ft // USER_SHARE_FDS, implied_fds))
    bt = buffer_total or max(BUFFER_MIN, min(BUFFER_MAX, memory // MEMORY_SHARE))
    bu = buffer_per_user or max(2 * WINDOW_FLOOR, bt // USER_SHARE)
    ct = channels_total or max(64, min(CHANNELS_TOTAL_MAX, bt // (2 * WINDOW_FLOOR)))
    cu = channels_per_user or max(1, min(ct // USER_SHARE, max_connections_per_user * max_channels))
    return BudgetLimits(fds_total=ft, fds_per_user=min(fu, ft), buffer_total=bt, buffer_per_user=min(bu, bt),
                        channels_total=ct, channels_per_user=min(cu, ct), fd_reserve=reserve, fd_limit=fd_limit)


class BudgetExceeded(Exception):
    """A budget would be exceeded: `kind` (fds, buffer, channels), `scope` (user, gateway), a sentence."""

    def __init__(self, kind: str, scope: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.scope = scope
        self.message = message


class Hold:
    """What one connection or channel took from the budgets; close() gives it back, once."""

    __slots__ = ("_budgets", "user", "fds", "buffer", "channels", "window", "closed", "_group")

    def __init__(self, budgets: "Budgets", user: str, fds: int, buffer: int, channels: int, window: int = 0):
        self._budgets = budgets
        self.user = user
        self.fds, self.buffer, self.channels = fds, buffer, channels
        self.window = window
        self.closed = False
        self._group: set | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._group is not None:
            self._group.discard(self)
            self._group = None
        self._budgets._give_back(self)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HoldGroup:
    """Every hold of one connection: closed together when it ends (nothing can outlive it)."""

    def __init__(self) -> None:
        self._holds: set[Hold] = set()

    def add(self, hold: Hold) -> Hold:
        if not hold.closed:
            hold._group = self._holds
            self._holds.add(hold)
        return hold

    def close(self) -> None:
        for hold in list(self._holds):
            hold.close()
        self._holds.clear()

    def __len__(self) -> int:
        return len(self._holds)


class Budgets:
    """The ledger: use per user and in total for each kind, against BudgetLimits."""

    def __init__(self, limits: BudgetLimits, on_refusal: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.on_refusal = on_refusal
        self._clock = clock
        self.used = {k: 0 for k in KINDS}
        self.users: dict[str, dict[str, int]] = {}
        self._released = 0  # buffer bytes given back since the last trim
        self._logged: dict[tuple, float] = {}

    def apply(self, limits: BudgetLimits) -> None:
        """New limits (a reload, a changed fd limit): for new work only; nothing held is dropped."""
        if limits != self.limits:
            log.info("budgets fds=%d/%d per user buffer=%d/%d MiB per user channels=%d/%d per user "
                     "(open-file limit %d, reserve %d)", limits.fds_total, limits.fds_per_user,
                     limits.buffer_total >> 20, limits.buffer_per_user >> 20, limits.channels_total,
                     limits.channels_per_user, limits.fd_limit, limits.fd_reserve)
        self.limits = limits

    # -- taking -----------------------------------------------------------------------------

    def _over(self, user: str, need: dict[str, int]) -> tuple[str, str] | None:
        mine = self.users.get(user)
        for kind in KINDS:
            n = need.get(kind, 0)
            if not n:
                continue
            if (mine.get(kind, 0) if mine else 0) + n > self.limits.limit(kind, "user"):
                return kind, "user"
            if self.used[kind] + n > self.limits.limit(kind, "gateway"):
                return kind, "gateway"
        return None

    def take(self, user: str, *, fds: int = 0, buffer: int = 0, channels: int = 0, what: str = "",
             context: str = "") -> Hold:
        """Take from both the user's and the gateway's budgets, or raise BudgetExceeded."""
        over = self._over(user, {"fds": fds, "buffer": buffer, "channels": channels})
        if over is not None:
            raise self._refuse(user, *over, what=what, context=context)
        return self._book(user, fds, buffer, channels, 0)

    def take_channel(self, user: str, *, want_window: int, fds: int = 0, floor: int | None = None,
                     both_ways: bool = True, extra: int = 0, what: str = "channel", context: str = "") -> Hold:
        """A channel: 1 channel, `fds`, and its window in buffer bytes: twice the window when the
        gateway grants it both ways (an SSH channel on each side), once plus `extra` when the
        other side is a socket (a jump: what one read of it can bring). hold.window is the window
        to open the channel with: `want_window` while what is left is plenty, then a sixteenth
        of what is left (so many channels still fit), never less than `floor` (default
        WINDOW_FLOOR); refused when not even that fits."""
        over = self._over(user, {"fds": fds, "channels": 1})
        if over is not None:
            raise self._refuse(user, *over, what=what, context=context)
        mine = self.users.get(user, {}).get("buffer", 0)
        user_left = self.limits.buffer_per_user - mine
        gateway_left = self.limits.buffer_total - self.used["buffer"]
        ways = 2 if both_ways else 1
        windows_left = (min(user_left, gateway_left) - extra) // ways
        least = min(WINDOW_FLOOR if floor is None else floor, want_window)
        window = max(least, min(want_window, windows_left // WINDOW_SHARE) // 4096 * 4096)
        if window > windows_left:
            raise self._refuse(user, "buffer", "user" if user_left <= gateway_left else "gateway", what=what,
                               context=context)
        return self._book(user, fds, ways * window + extra, 1, window)

    def _book(self, user: str, fds: int, buffer: int, channels: int, window: int) -> Hold:
        mine = self.users.setdefault(user, {k: 0 for k in KINDS})
        for kind, n in (("fds", fds), ("buffer", buffer), ("channels", channels)):
            mine[kind] += n
            self.used[kind] += n
        return Hold(self, user, fds, buffer, channels, window)

    def _give_back(self, hold: Hold) -> None:
        mine = self.users.get(hold.user)
        for kind, n in (("fds", hold.fds), ("buffer", hold.buffer), ("channels", hold.channels)):
            self.used[kind] -= n
            if mine is not None:
                mine[kind] -= n
        if mine is not None and not any(mine.values()):
            del self.users[hold.user]
        self._released += hold.buffer

    # -- refusing ---------------------------------------------------------------------------

    def _refuse(self, user: str, kind: str, scope: str, what: str, context: str) -> BudgetExceeded:
        limit = self.limits.limit(kind, scope)
        key = CONFIG_KEYS[kind][0 if scope == "user" else 1]
        if scope == "user":
            held = self.users.get(user, {}).get(kind, 0)
            amount = f"{held >> 20} of {limit >> 20} MiB" if kind == "buffer" else f"{held} of {limit}"
            noun = {"fds": "descriptors", "buffer": "of buffers", "channels": "channels"}[kind]
            message = (f"fleetgate: {user} holds {amount} {noun} allowed per user ({key}); "
                       f"close a connection or channel and retry")
        else:
            noun = {"fds": "descriptor", "buffer": "buffer memory", "channels": "channel"}[kind]
            message = f"fleetgate: the gateway is at its {noun} budget ({key}); try again later"
        if self.on_refusal is not None:
            self.on_refusal(kind, scope)
        now = self._clock()
        logkey = (kind, scope, user)
        if now - self._logged.get(logkey, -LOG_EVERY) >= LOG_EVERY:
            if len(self._logged) >= MAX_LOGGED:
                self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_EVERY}
            self._logged[logkey] = now
            log.warning("budget refusal budget=%s scope=%s user=%s what=%s limit=%d user_used=%d gateway_used=%d %s"
                        "(further ones for this user and budget are counted, not logged, for %.0f s)",
                        kind, scope, user, what or "-", limit, self.users.get(user, {}).get(kind, 0),
                        self.used[kind], f"{context} " if context else "", LOG_EVERY)
        return BudgetExceeded(kind, scope, message)

    # -- reading ----------------------------------------------------------------------------

    def user_max(self, kind: str) -> int:
        """The most any one user holds (a gauge with no user label)."""
        return max((u[kind] for u in self.users.values()), default=0)

    def user_used(self, user: str, kind: str) -> int:
        return self.users.get(user, {}).get(kind, 0)

    # -- memory given back ------------------------------------------------------------------

    def trim_due(self) -> bool:
        return self._released >= TRIM_AFTER

    def release_memory(self) -> bool:
        """Hand freed heap pages back to the system (glibc malloc_trim)."""
        self._released = 0
        return malloc_trim()


_libc: object = None


def malloc_trim() -> bool:
    """glibc's malloc_trim(0); False where there is none (musl, other systems)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    return bool(_libc.malloc_trim(0))  # type: ignore[attr-defined]
