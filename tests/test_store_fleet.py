"""Several replicas, one fleet: the etcd store's rules on trio's MockClock (tests/fake_etcd.py).

The same EtcdStore and Fleet code that runs against real etcd in tests/test_ha_e2e.py, here
with deterministic time so the timing rules (lease TTL, idle timeout, recovery grace) are
checked exactly.
"""

from __future__ import annotations

import pytest
import trio

from fake_etcd import FakeCluster
from fakes import machine_config
from fleetgate.backends.base import PowerState
from fleetgate.fleet import State, WakeError
from store_helpers import SharedFakeBackend, ready_address, start_replica


@pytest.fixture
def cluster(nursery):
    c = FakeCluster()
    nursery.start_soon(c.expiry_loop)
    return c


async def until(store, predicate, timeout: float = 30) -> None:
    """Until the store's mirror satisfies predicate (bounded; woken by mirror changes)."""
    with trio.fail_after(timeout):
        while not predicate():
            await store.wait_change(1.0)


def backend_fixture():
    b = SharedFakeBackend()
    ready_address(b)
    return b


async def test_memory_store_is_the_default(nursery):
    from fakes import FakeBackend, make_fleet

    fleet = make_fleet(nursery, FakeBackend(), machine_config("alice"))
    assert fleet.shared is False and fleet.store.shared is False


async def test_storm_across_replicas_starts_once(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    backend.start_delay = 5.0
    cfg = machine_config("alice", idle_timeout=60, min_uptime=0)
    replicas = [await start_replica(nursery, cluster, backend, f"r{i}", cfg) for i in range(3)]
    leases, lines = [], []

    async def client(i: int) -> None:
        leases.append(await replicas[i % 3].fleet.acquire("alice", lines.append))

    with trio.fail_after(60):
        async with trio.open_nursery() as clients:
            for i in range(200):
                clients.start_soon(client, i)
    assert backend.count("start") == 1
    assert len(leases) == 200
    assert all(r.fleet.machines["alice"].state is State.RUNNING for r in replicas)
    assert any("starting alice" in line for line in lines)
    view = replicas[0].store.view("alice")
    assert set(view.holds) == {"r0", "r1", "r2"}
    for lease in leases:
        lease.release()


async def test_session_on_a_holds_while_b_reaps(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg = machine_config("alice", idle_timeout=30, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg)
    b = await start_replica(nursery, cluster, backend, "b", cfg)
    lease = await a.fleet.acquire("alice")
    await trio.sleep(300)  # b's reaper runs 300 times; a's session holds the machine
    assert backend.count("stop") == 0 and backend.power["alice"] is PowerState.RUNNING
    lease.release()
    released = trio.current_time()
    await trio.sleep(25)
    assert backend.count("stop") == 0
    await trio.sleep(60)
    assert backend.count("stop") == 1 and backend.power["alice"] is PowerState.STOPPED
    assert (a.fleet.metrics.store_claims.labels("stop", "performed")._value.get()
            + b.fleet.metrics.store_claims.labels("stop", "performed")._value.get()) == 1
    assert trio.current_time() - released > 30


async def test_dead_replica_hold_expires_then_reaped(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg = machine_config("alice", idle_timeout=30, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg, ttl=10, reaper_interval=None)
    b = await start_replica(nursery, cluster, backend, "b", cfg, ttl=10)
    await a.fleet.acquire("alice")        # a session on a ...
    await trio.sleep(100)
    assert backend.power["alice"] is PowerState.RUNNING
    a.client.up = False                   # ... and a dies without releasing anything (SIGKILL:
    a.scope.cancel()                      # not even the lease revoke of a clean shutdown gets out)
    backend.fleets.remove(a.fleet)
    killed = trio.current_time()
    await trio.sleep(35)                  # lease TTL (10) not yet + idle (30) passed
    assert backend.count("stop") == 0
    await trio.sleep(20)
    assert backend.count("stop") == 1
    assert b.store.view("alice").holds == {}
    assert trio.current_time() - killed >= 40


async def test_store_down_no_stop_wake_refused_then_recovery(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg_a = machine_config("alice", idle_timeout=5, min_uptime=0)
    cfg_b = machine_config("bob", idle_timeout=5, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg_a, cfg_b)
    b = await start_replica(nursery, cluster, backend, "b", cfg_a, cfg_b)
    first = await a.fleet.acquire("alice")
    (await b.fleet.acquire("alice")).release()   # b saw it running, holds nothing
    cluster.up = False                    # quorum lost
    first.release()
    await trio.sleep(60)                  # idle far past idle_timeout
    assert backend.count("stop") == 0, "no stop without etcd"
    assert not a.store.healthy and a.fleet.metrics.store_up._value.get() == 0
    with pytest.raises(WakeError) as err:
        await b.fleet.acquire("bob")      # stopped machine: refused, nothing started
    assert err.value.reason == "store_unavailable" and "etcd" in err.value.message
    assert backend.count("start", "bob") == 0
    with pytest.raises(WakeError):        # running, but b holds nothing: a stop could be under way
        await b.fleet.acquire("alice")
    cluster.up = True
    await until(a.store, lambda: a.store.healthy and not a.store.view("alice").holds)
    held = await a.fleet.acquire("alice")  # recovered: logins work, the hold is registered
    assert "a" in a.store.view("alice").holds or await a.store.snapshot("alice")
    await trio.sleep(30)
    assert backend.count("stop") == 0
    held.release()
    lease2 = await b.fleet.acquire("bob")  # wakes work again
    lease2.release()
    await trio.sleep(60)
    assert backend.count("stop", "alice") == 1 and backend.count("stop", "bob") == 1


async def test_stop_and_keep_awake_from_any_replica(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg = machine_config("alice", idle_timeout=10, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg)
    b = await start_replica(nursery, cluster, backend, "b", cfg)
    a.fleet.keep_awake("alice", 100)      # wakes it, held fleet-wide
    await trio.sleep(60)
    assert backend.power["alice"] is PowerState.RUNNING and backend.count("stop") == 0
    assert b.store.view("alice").keep_until > trio.current_time()
    assert await b.fleet.stop("alice")    # explicit stop from the other replica ends the lease
    assert backend.power["alice"] is PowerState.STOPPED
    await until(a.store, lambda: a.store.view("alice").fleet_state == "stopped")
    assert a.store.view("alice").keep_until == 0


async def test_lost_lease_reregisters_holds(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg = machine_config("alice", idle_timeout=60, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg, ttl=6)
    await start_replica(nursery, cluster, backend, "b", cfg, ttl=6)
    lease = await a.fleet.acquire("alice")
    a.client.up = False                   # a is cut off longer than its TTL (shorter than the idle timeout)
    await trio.sleep(20)
    assert not any("/holds/a" in k for k in cluster.data), "a's hold expired with its lease"
    a.client.up = True                    # recovery: new lease, holds registered again
    await until(a.store, lambda: "a" in a.store.view("alice").holds)
    assert a.fleet.metrics.store_lease_lost._value.get() == 1
    await trio.sleep(60)
    assert backend.count("stop") == 0     # never stopped under a's session
    lease.release()


async def test_clean_shutdown_gives_holds_back_at_once(nursery, autojump_clock, cluster):
    backend = backend_fixture()
    cfg = machine_config("alice", idle_timeout=30, min_uptime=0)
    a = await start_replica(nursery, cluster, backend, "a", cfg, ttl=10, reaper_interval=None)
    b = await start_replica(nursery, cluster, backend, "b", cfg, ttl=10)
    await a.fleet.acquire("alice")
    await until(b.store, lambda: "a" in b.store.view("alice").holds)
    a.scope.cancel()                      # a shuts down (after its drain): its lease is revoked
    t0 = trio.current_time()
    await until(b.store, lambda: not b.store.view("alice").holds)
    assert trio.current_time() - t0 < 2   # not the 10 s TTL
