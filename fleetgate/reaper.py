"""The idle reaper: stops running machines nobody uses, and pre-wakes warm ones.

It is its own task in the main nursery and owns a nursery for the stops it starts, so
one slow stop never delays the decision for the other machines. Every rule lives in
Fleet.stop_blocker() and is applied again, atomically, inside Fleet.stop(), so the
reaper's view can be stale without ever stopping a machine that just got a session.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Callable

import trio

from .fleet import Fleet, State
from .schedule import is_warm

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0


class Reaper:
    def __init__(self, fleet: Fleet, *, interval: float = DEFAULT_INTERVAL,
                 wall_clock: Callable[[], dt.datetime] = dt.datetime.now):
        self.fleet = fleet
        self.interval = interval
        self.wall_clock = wall_clock
        self._stopping: set[str] = set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as stops:
            task_status.started()
            while True:
                try:
                    self.tick(stops)
                except Exception:  # a reaper bug must not take the gateway down; it is counted and alerted on
                    log.exception("reaper pass failed")
                    self.fleet.metrics.reaper_errors.inc()
                else:
                    self.fleet.metrics.reaper_last_run.set(time.time())
                await trio.sleep(self.interval)

    def warm(self, name: str) -> bool:
        rules = self.fleet.machines[name].config.warm
        return bool(rules) and is_warm(rules, self.wall_clock())

    def tick(self, stops: trio.Nursery) -> None:
        """One pass: update per-machine gauges, pre-wake warm machines, start stops that are due."""
        metrics = self.fleet.metrics
        for name, m in list(self.fleet.machines.items()):
            if name not in self.fleet.configured and m.state.value in ("stopped", "failed") and not m.sessions:
                self.fleet.forget(name)  # removed from the config and stopped since: its series go too
                continue
            self.fleet.account_running(m)
            self.fleet._update_lease_gauge(m)
            warm = self.warm(name)
            if warm and m.state in (State.STOPPED, State.UNKNOWN, State.FAILED):
                log.info("warm schedule pre-wakes machine=%s", name)
                self.fleet.wake_in_background(name)
                continue
            if name not in self._stopping and self.fleet.stop_blocker(m, warm) is None:
                self._stopping.add(name)
                stops.start_soon(self._stop, name, warm)

    async def _stop(self, name: str, warm: bool) -> None:
        try:
            m = self.fleet.machines[name]
            log.info("reaper stops machine=%s idle_seconds=%.0f", name, self.fleet.idle_for(m))
            await self.fleet.stop(name, reaper=True, warm=warm)
        finally:
            self._stopping.discard(name)
