"""Randomized interleavings of connect / disconnect / give-up / keep-awake / reaper ticks /
backend delays and failures, each case a seeded, reproducible trio run on a MockClock.

Invariants checked in every case:
- no machine is ever stopped while it has a session (the fake backend records it);
- every session that got in saw a running machine, and it stayed running until released;
- start is never called twice concurrently for one machine (the fake backend records it).

FLEETGATE_RANDOM_CASES raises the count (CI runs 10 000); a failure prints its seed.
"""

from __future__ import annotations

import logging
import os
import random

import trio
import trio.testing

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.backends.base import PowerState
from fleetgate.fleet import State, WakeError
from fleetgate.metrics import Metrics
from fleetgate.reaper import Reaper

CASES = int(os.environ.get("FLEETGATE_RANDOM_CASES", "10000"))
METRICS = Metrics()  # shared: building a registry per case would dominate the run time


async def one_case(rng: random.Random) -> list[str]:
    problems: list[str] = []
    backend = FakeBackend()
    backend.start_delay = rng.choice([0.0, 0.5, 2.0, 7.0])
    backend.stop_delay = rng.choice([0.0, 1.0, 4.0])
    names = ["m0", "m1"][: rng.randint(1, 2)]
    configs = [machine_config(n, idle_timeout=rng.choice([1.0, 5.0, 20.0]), min_uptime=rng.choice([0.0, 3.0, 10.0]),
                              boot_timeout=rng.choice([5.0, 30.0]), stop_timeout=5.0) for n in names]
    for n in names:
        if rng.random() < 0.2:
            backend.power[n] = PowerState.RUNNING  # left running by a previous gateway
    async with trio.open_nursery() as nursery:
        fleet = make_fleet(nursery, backend, *configs, metrics=METRICS)
        await fleet.reconcile()
        await nursery.start(Reaper(fleet, interval=rng.choice([0.5, 1.0, 3.0])).run)

        async def client(i: int) -> None:
            name = rng.choice(names)
            await trio.sleep(rng.uniform(0, 60))
            if rng.random() < 0.1:
                fleet.keep_awake(name, rng.uniform(1, 30))
            if rng.random() < 0.15:
                backend.fail_start.add(name)
            elif rng.random() < 0.3:
                backend.fail_start.discard(name)
            if rng.random() < 0.1:
                backend.fail_stop.add(name)
            elif rng.random() < 0.3:
                backend.fail_stop.discard(name)
            give_up = rng.uniform(0.1, 5) if rng.random() < 0.2 else None
            with trio.move_on_after(give_up if give_up is not None else float("inf")):
                try:
                    lease = await fleet.acquire(name)
                except WakeError:
                    return
                try:
                    m = fleet.machines[name]
                    if m.state is not State.RUNNING or backend.power.get(name) is not PowerState.RUNNING:
                        problems.append(f"client {i} got {name} in state {m.state} power {backend.power.get(name)}")
                    hold = rng.choice([0.0, 0.5, 3.0, 15.0])
                    with trio.CancelScope(shield=True):
                        await trio.sleep(hold)
                    if backend.power.get(name) is not PowerState.RUNNING:
                        problems.append(f"client {i}: {name} was stopped under its session")
                finally:
                    lease.release()

        async with trio.open_nursery() as clients:
            for i in range(rng.randint(1, 12)):
                clients.start_soon(client, i)
        await trio.sleep(70)  # let the reaper finish what it will
        nursery.cancel_scope.cancel()
    return problems + backend.violations


def test_random_interleavings_keep_the_invariants():
    logging.getLogger("fleetgate").setLevel(logging.ERROR)  # thousands of cases: keep the log quiet
    failures = []
    for seed in range(CASES):
        rng = random.Random(seed)
        problems = trio.run(one_case, rng, clock=trio.testing.MockClock(autojump_threshold=0))
        if problems:
            failures.append((seed, problems))
            if len(failures) >= 5:
                break
    assert not failures, f"invariants broken (seed, problems): {failures}"
