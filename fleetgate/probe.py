"""Readiness: a machine is ready when its own SSH server sends its banner.

Not "the API says running", not "the port accepts": a NAT or QEMU hostfwd accepts TCP
long before the guest's sshd answers.

How often to ask (issue 15). A wake costs the user the machine's boot plus the time from
"sshd answers" to "we noticed", so the cadence decides that lag. A fixed 100–250 ms poll
made a 28 ms process-backend boot cost ~200 ms; polling every few ms forever would hammer
a VM that takes a minute. So the cadence follows the boot (`Pacing`):

- early, attempts come every `floor` (5 ms): a local sshd is caught within a few ms;
- then the gap grows with the time waited (`growth` × elapsed, 10 %), so the lag stays a
  small fraction of the boot, up to `cap` (250 ms, what the old poll did): a 60 s boot is
  asked about 4 times a second, not hammered;
- around the machine's usual boot (the Fleet passes the median of its last boots), attempts
  come faster again (`near` × usual boot, 2 %), since that is when the banner is due.

Attempts are never closer than `floor`. The cadence is of attempt *starts* and is kept apart
from each attempt's own connect and banner timeouts (1 s, 2 s), which are not derived from
it. A refused connect (ECONNREFUSED) ends its attempt at once, so the schedule alone paces
a machine that is not listening yet. One attempt at a time: an attempt that hangs (a NAT or
QEMU hostfwd that accepts and then waits for a guest not up yet) is itself what sees the
banner when the guest answers, and the next starts as soon as it gives up, with no gap
added. Side-by-side attempts would open several unauthenticated connections at the moment
the sshd comes up, all from one address behind a NAT, and servers cap those (dropbear: 5
per source address, OpenSSH: MaxStartups), which then drop the gateway's real login.
The caller bounds the whole wait (the machine's boot_timeout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio

from . import transport
from .backends.base import Address

CONNECT_TIMEOUT = 1.0
BANNER_TIMEOUT = 2.0


@dataclass(frozen=True)
class Pacing:
    """When to start the next readiness attempt: `gap(elapsed, expected)` seconds after this one.

    A pure function of the time waited so far and the expected time still to wait, so the
    schedule can be read (and tested) without sockets or a clock."""

    floor: float = 0.005       # never two attempt starts closer than this
    cap: float = 0.25          # the slowest cadence, reached on long boots
    growth: float = 0.1        # backoff: gap = growth × elapsed, a lag of ~10 % of the boot so far
    near: float = 0.02         # around the expected ready time: gap = near × expected
    near_from: float = 0.7     # "around" = from near_from × expected ...
    near_until: float = 1.5    # ... to near_until × expected

    def gap(self, elapsed: float, expected: float | None = None) -> float:
        """Seconds from the attempt started at `elapsed` (seconds into the wait) to the next one.

        `expected`: when the banner is expected, counted from the start of the wait (None:
        unknown, e.g. a machine's first boot)."""
        g = self.growth * max(0.0, elapsed)
        if expected is not None and math.isfinite(expected) and expected > 0 \
                and self.near_from * expected <= elapsed <= self.near_until * expected:
            g = min(g, self.near * expected)
        return min(self.cap, max(self.floor, g))

    def schedule(self, until: float, expected: float | None = None) -> list[float]:
        """The attempt start times (seconds into the wait) up to `until`, when every attempt
        ends at once: what `wait_for_banner` does against a refusing port. For reading, tests
        and docs."""
        out, t = [], 0.0
        while t <= until:
            out.append(t)
            t += self.gap(t, expected)
        return out


DEFAULT_PACING = Pacing()


async def read_banner(address: Address) -> bytes | None:
    """One attempt: the server's SSH banner line if it sends one, else None.

    A refused or failed connect returns None at once; `CONNECT_TIMEOUT` bounds a connect
    that gets no answer and `BANNER_TIMEOUT` a server that accepts but does not speak."""
    stream = None
    with trio.move_on_after(CONNECT_TIMEOUT):
        try:
            stream = await transport.open_trio_stream(address, CONNECT_TIMEOUT)   # TCP or VSOCK
        except OSError:
            return None
    if stream is None:
        return None
    async with stream:
        buf = b""
        with trio.move_on_after(BANNER_TIMEOUT):
            while len(buf) < 8192:
                try:
                    chunk = await stream.receive_some(1024)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return None
                if not chunk:
                    return None
                buf += chunk
                *lines, _partial = buf.split(b"\n")
                # RFC 4253 lets a server send other lines before its banner.
                for line in lines:
                    if line.startswith(b"SSH-"):
                        return line.rstrip(b"\r")
    return None


Attempt = Callable[[Address], Awaitable["bytes | None"]]


async def wait_for_banner(address: Address, expected: float | None = None, *,
                          pacing: Pacing = DEFAULT_PACING, attempt: Attempt = read_banner) -> bytes:
    """Ask until the SSH banner answers, paced by `pacing`; the caller's cancel scope bounds the wait.

    `expected`: seconds from now until the machine usually answers (the Fleet's median of
    its recent boots, less the time already spent starting it), or None. `attempt` is one
    try (`read_banner`); tests pass a fake to read the schedule under a MockClock."""
    t0 = trio.current_time()
    while True:
        started = trio.current_time()
        banner = await attempt(address)
        if banner is not None:
            return banner
        # Until the next start on the schedule; at once if this attempt outlasted its gap.
        await trio.sleep_until(started + pacing.gap(started - t0, expected))
