"""The idle reaper: stops running machines nobody uses, and pre-wakes warm ones.

It is its own task in the main nursery and owns a nursery for the stops it starts, so
one slow stop never delays the decision for the other machines. Every rule lives in
Fleet.stop_blocker() and is applied again, atomically, inside Fleet.stop(), so the
reaper's view can be stale without ever stopping a machine that just got a session.

A pass looks only at what can change with time (issue 15): the Fleet's `awake` machines
(powered, in use, kept awake, maybe running), the machines with a warm schedule, and
machines removed from the config. A stopped machine costs a pass nothing, so an idle
gateway with 10 000 machines does ~nothing each second. The per-machine gauges that move
with time alone are brought up to date at scrape time (Fleet.refresh_series), not here.
With several replicas (a shared store) another replica may start any machine, so every
machine is looked at, as before.
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
        self._warm_for: object = None        # the fleet's `configured` set the list below is for
        self._warm_names: list[str] = []     # machines with a warm schedule
        self._warm_cache: dict[tuple, bool] = {}  # rules -> warm, for the wall-clock minute below
        self._warm_minute: tuple | None = None

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
        """Whether the machine's warm schedule holds it now; rules are minute-grained, so each set
        of rules is evaluated once per wall-clock minute, not once per machine per pass."""
        rules = self.fleet.machines[name].config.warm
        if not rules:
            return False
        now = self.wall_clock()
        minute = (now.year, now.month, now.day, now.hour, now.minute)
        if minute != self._warm_minute:
            self._warm_minute, self._warm_cache = minute, {}
        warm = self._warm_cache.get(rules)
        if warm is None:
            warm = self._warm_cache[rules] = is_warm(rules, now)
        return warm

    def candidates(self) -> list[str]:
        """The machines this pass must look at; see the module docstring."""
        fleet = self.fleet
        if fleet.shared:
            return list(fleet.machines)
        if self._warm_for is not fleet.configured:  # a (re)load: who has a warm schedule
            self._warm_for = fleet.configured
            self._warm_names = [n for n, m in fleet.machines.items() if m.config.warm]
        names = {m.name for m in fleet.awake}
        names.update(self._warm_names)
        if len(fleet.machines) > len(fleet.configured):  # some were removed from the config
            names.update(n for n in fleet.machines if n not in fleet.configured)
        return list(names)

    def tick(self, stops: trio.Nursery) -> None:
        """One pass: pre-wake warm machines, start stops that are due, forget removed machines."""
        fleet = self.fleet
        for name in self.candidates():
            m = fleet.machines.get(name)
            if m is None:
                continue
            if name not in fleet.configured and m.state.value in ("stopped", "failed") and not m.sessions:
                fleet.forget(name)  # removed from the config and stopped since: its series go too
                continue
            warm = self.warm(name)
            if warm and m.state in (State.STOPPED, State.UNKNOWN, State.FAILED):
                log.info("warm schedule pre-wakes machine=%s", name)
                fleet.wake_in_background(name)
                continue
            if name not in self._stopping and fleet.stop_blocker(m, warm) is None:
                self._stopping.add(name)
                stops.start_soon(self._stop, name, warm)
            elif m in fleet.awake and not fleet.awake_needed(m):
                fleet.account_running(m)  # its series' last word before scrapes stop refreshing it
                fleet._update_lease_gauge(m)
                fleet.awake.discard(m)

    async def _stop(self, name: str, warm: bool) -> None:
        try:
            m = self.fleet.machines[name]
            log.info("reaper stops machine=%s idle_seconds=%.0f", name, self.fleet.idle_for(m))
            await self.fleet.stop(name, reaper=True, warm=warm)
        finally:
            self._stopping.discard(name)
