"""The file-descriptor budget: every connection, session and HTTP client draws on RLIMIT_NOFILE.

Why it is one module: the pre-auth limits, the HTTP server's connection cap and
`fleetgate check` must agree on the same number. At start the gateway raises its soft
limit to the hard one (systemd's and Docker's default soft limit is 1024, the hard one
often 500k+); the defaults of the limits are then fractions of that budget, so a flood
reaches a limit, which refuses one connection, long before accept() fails with EMFILE.

Per unit: an unauthenticated connection holds 1 descriptor; an authenticated session
2 (user and machine) plus a few while it connects; an HTTP client 1.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

# When the hard limit is unlimited, do not ask for more than this (a kernel's nr_open is 1M).
CEILING = 1 << 20
# Descriptors the process needs besides connections: logs, listeners, backends' processes.
RESERVE = 64
MAX_UNAUTHENTICATED_CAP = 1024
HTTP_CONNECTIONS_CAP = 256


# fds: what no user can take. RESERVE (64: logs, listeners, epoll, backends' processes,
# probes, pid files, the admin socket, HTTP clients of webhooks) plus what accept() may take in
# one pass beyond the pre-auth cap before an eviction frees a descriptor (bridge.ACCEPT_BATCH
# per listener, two listeners' worth).
ACCEPT_HEADROOM = 32


def _hard() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CEILING if hard == resource.RLIM_INFINITY else min(hard, CEILING)


def raise_soft_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; (before, after)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = _hard()
    if soft == resource.RLIM_INFINITY:
        return CEILING, CEILING
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
            return soft, soft
        return soft, hard
    return soft, soft


def budget() -> int:
    """The descriptors the gateway will have: the hard limit (serve raises the soft one to it)."""
    return _hard()


def default_max_unauthenticated(fds: int | None = None) -> int:
    """A quarter of the budget, at most 1024: a pre-auth flood at the limit leaves room for sessions."""
    fds = budget() if fds is None else fds
    return max(16, min(MAX_UNAUTHENTICATED_CAP, (fds - RESERVE) // 4))


def default_http_connections(fds: int | None = None) -> int:
    """Concurrent HTTP (metrics, health, admin) connections: 1/16 of the budget, 8..256."""
    fds = budget() if fds is None else fds
    return max(8, min(HTTP_CONNECTIONS_CAP, (fds - RESERVE) // 16))


def check(max_unauthenticated: int, http_connections: int, fds: int | None = None, fds_total: int = 0) -> list[str]:
    """Warnings for `fleetgate check` when the configured limits do not fit the budget
    (`fds_total`: an explicit limits.fds_total; 0 when derived, which always fits)."""
    fds = budget() if fds is None else fds
    out = []
    reserve = RESERVE + ACCEPT_HEADROOM
    if fds_total and fds_total + max_unauthenticated + http_connections + reserve > fds:
        out.append(f"limits.fds_total ({fds_total}) + limits.max_unauthenticated ({max_unauthenticated}) + the HTTP "
                   f"connection cap ({http_connections}) + {reserve} reserved = "
                   f"{fds_total + max_unauthenticated + http_connections + reserve} descriptors, more than the "
                   f"open-file limit ({fds}): authenticated users could take the descriptors accept() and the "
                   f"control plane need; leave fds_total out (derived: "
                   f"{max(16, fds - reserve - max_unauthenticated - http_connections)} here) or raise the limit")
    need = max_unauthenticated + http_connections + RESERVE
    if need > fds:
        out.append(f"limits.max_unauthenticated ({max_unauthenticated}) + the HTTP connection cap "
                   f"({http_connections}) + {RESERVE} reserved = {need} descriptors, more than the open-file "
                   f"limit ({fds}, RLIMIT_NOFILE hard limit of this process): a flood would exhaust descriptors "
                   f"before the limits refuse it; lower max_unauthenticated (default here "
                   f"{default_max_unauthenticated(fds)}) or raise the limit (systemd LimitNOFILE, docker --ulimit)")
    elif max_unauthenticated > (fds - RESERVE) // 2:
        out.append(f"limits.max_unauthenticated ({max_unauthenticated}) is more than half of the open-file limit "
                   f"({fds}): unauthenticated connections can crowd out sessions (each session needs 2 "
                   f"descriptors); the default here is {default_max_unauthenticated(fds)}")
    return out


def current() -> int:
    """The open-file limit in force now (the soft limit; serve raised it to the hard one)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return CEILING if soft == resource.RLIM_INFINITY else min(soft, CEILING)
