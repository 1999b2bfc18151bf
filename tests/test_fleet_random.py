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
import functools
import os
import random

import pytest
import trio
import trio.testing

from fakes import FakeBackend, machine_config, make_fleet
from fleetgate.backends.base import PowerState
from fleetgate.fleet import State, WakeError
from fleetgate.metrics import Metrics
from fleetgate.reaper import Reaper

# The fast tier runs 800 seeded cases (~10 s on our 2-core machines); CI (.ci/run) runs 10 000 and more replica cases.
CASES = int(os.environ.get("FLEETGATE_RANDOM_CASES", "800"))
@functools.cache
def shared_metrics() -> Metrics:
    """One registry for all cases (building one per case would dominate the run time), made
    on first use: Metrics() asks git for the build revision, which must not run at collection."""
    return Metrics()


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
        fleet = make_fleet(nursery, backend, *configs, metrics=shared_metrics())
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


@pytest.fixture
def quiet_log():
    """Thousands of cases: keep the log quiet, and give the level back for the tests after."""
    logger = logging.getLogger("fleetgate")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_random_interleavings_keep_the_invariants(quiet_log):
    failures = []
    for seed in range(CASES):
        rng = random.Random(seed)
        problems = trio.run(one_case, rng, clock=trio.testing.MockClock(autojump_threshold=0))
        if problems:
            failures.append((seed, problems))
            if len(failures) >= 5:
                break
    assert not failures, f"invariants broken (seed, problems): {failures}"


# -- several replicas over one (fake) etcd ---------------------------------------------------
#
# The same invariants across 2-3 replicas sharing the fleet through the etcd store: clients
# land on a random replica, every replica's reaper competes for the stop claim, and etcd
# loses quorum at random moments for random lengths (shorter and longer than the lease TTL).

SHARED_CASES = int(os.environ.get("FLEETGATE_RANDOM_SHARED_CASES", "60"))


async def one_shared_case(rng: random.Random) -> list[str]:
    from fake_etcd import FakeCluster
    from store_helpers import SharedFakeBackend, ready_address, start_replica

    problems: list[str] = []
    backend = SharedFakeBackend()
    ready_address(backend)
    backend.start_delay = rng.choice([0.0, 0.5, 2.0, 7.0])
    backend.stop_delay = rng.choice([0.0, 1.0, 4.0])
    names = ["m0", "m1"][: rng.randint(1, 2)]
    configs = [machine_config(n, idle_timeout=rng.choice([1.0, 5.0, 20.0]), min_uptime=rng.choice([0.0, 3.0]),
                              boot_timeout=rng.choice([5.0, 30.0]), stop_timeout=5.0) for n in names]
    async with trio.open_nursery() as nursery:
        cluster = FakeCluster()
        nursery.start_soon(cluster.expiry_loop)
        replicas = [await start_replica(nursery, cluster, backend, f"r{i}", *configs, ttl=rng.choice([3, 10]),
                                        reaper_interval=rng.choice([0.5, 1.0, 3.0]), metrics=shared_metrics())
                    for i in range(rng.randint(2, 3))]

        async def outages() -> None:
            for _ in range(rng.randint(0, 3)):
                await trio.sleep(rng.uniform(0, 60))
                cluster.up = False
                await trio.sleep(rng.choice([0.5, 2.0, 15.0]))
                cluster.up = True

        async def client(i: int) -> None:
            name = rng.choice(names)
            replica = rng.choice(replicas)
            fleet = replica.fleet
            await trio.sleep(rng.uniform(0, 60))
            if rng.random() < 0.1:
                fleet.keep_awake(name, rng.uniform(1, 30))
            if rng.random() < 0.1:
                backend.fail_start.add(name)
            elif rng.random() < 0.3:
                backend.fail_start.discard(name)
            give_up = rng.uniform(0.1, 5) if rng.random() < 0.2 else None
            with trio.move_on_after(give_up if give_up is not None else float("inf")):
                try:
                    lease = await fleet.acquire(name)
                except WakeError:
                    return
                try:
                    if backend.power.get(name) is not PowerState.RUNNING:
                        problems.append(f"client {i} got {name} on {replica.name} at {trio.current_time():.2f} "
                                        f"with power {backend.power.get(name)}")
                    with trio.CancelScope(shield=True):
                        await trio.sleep(rng.choice([0.0, 0.5, 3.0, 15.0]))
                    if backend.power.get(name) is not PowerState.RUNNING:
                        problems.append(f"client {i}: {name} was stopped under its session")
                finally:
                    lease.release()

        nursery.start_soon(outages)
        async with trio.open_nursery() as clients:
            for i in range(rng.randint(1, 12)):
                clients.start_soon(client, i)
        await trio.sleep(90)
        nursery.cancel_scope.cancel()
    return problems + backend.violations


def test_random_interleavings_across_replicas_keep_the_invariants(quiet_log):
    failures = []
    for seed in range(SHARED_CASES):
        rng = random.Random(seed)
        problems = trio.run(one_shared_case, rng, clock=trio.testing.MockClock(autojump_threshold=0))
        if problems:
            failures.append((seed, problems))
            if len(failures) >= 5:
                break
    assert not failures, f"invariants broken (seed, problems): {failures}"
