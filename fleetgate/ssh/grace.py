"""The login grace time of every unauthenticated connection, kept by one sweeper.

Why not a timer per connection: under trio-asyncio a cancelled asyncio timer stays in
the loop until its deadline, so a scanner opening thousands of connections would pin a
timer object each for the whole grace period (measured: ~0.4 KiB per ended connection).
All deadlines are admission time plus the same grace, so insertion order is deadline
order: the sweeper pops expired connections from the front, O(1) each.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Protocol

SWEEP_INTERVAL = 0.25


class Expirable(Protocol):
    def grace_expired(self) -> None: ...


class GraceClock:
    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic):
        self.grace = grace  # a reload may change it; it applies to connections admitted later
        self._clock = clock
        self._deadlines: dict[Expirable, float] = {}

    def start(self, conn: Expirable) -> None:
        self._deadlines[conn] = self._clock() + self.grace

    def stop(self, conn: Expirable) -> float | None:
        """No longer time this connection; returns its deadline (None if it had none)."""
        return self._deadlines.pop(conn, None)

    def resume(self, conn: Expirable, deadline: float) -> None:
        """Time a connection again against the deadline stop() returned (password passthrough:
        the clock is suspended while the machine judges a password, not reset by a wrong one).

        It goes to the end of the order although its deadline is earlier than some there, so
        the sweep may close it up to one grace period late: bounded, and rare.
        """
        if deadline <= self._clock():
            conn.grace_expired()
        else:
            self._deadlines[conn] = deadline

    def expired(self) -> list[Expirable]:
        now = self._clock()
        out = []
        for conn, deadline in self._deadlines.items():
            if deadline > now:
                break
            out.append(conn)
        for conn in out:
            del self._deadlines[conn]
        return out

    def __len__(self) -> int:
        return len(self._deadlines)

    async def run(self) -> None:
        """asyncio task: close connections whose grace has passed, a few times a second."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            for conn in self.expired():
                conn.grace_expired()
