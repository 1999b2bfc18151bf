"""Several Fleet replicas over one in-memory etcd (tests/fake_etcd.py), on trio's MockClock."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from fake_etcd import FakeCluster, FakeEtcd
from fakes import FakeBackend
from fleetgate.backends.base import Address, PowerState
from fleetgate.fleet import Fleet
from fleetgate.metrics import Metrics
from fleetgate.reaper import Reaper
from fleetgate.store.base import StoreConfig
from fleetgate.store.etcd import EtcdStore


class SharedFakeBackend(FakeBackend):
    """One machine provider behind every replica: checks 'no stop under a session' fleet-wide."""

    def __init__(self) -> None:
        super().__init__()
        self.fleets: list[Fleet] = []

    async def stop(self, machine):
        held = sum(f.machines[machine.name].sessions for f in self.fleets)
        if held:
            self.calls.append(("stop", machine.name))
            self._broken(f"stop of {machine.name} with {held} session(s) across replicas")
        return await super().stop(machine)


@dataclass
class Replica:
    name: str
    store: EtcdStore
    fleet: Fleet
    client: FakeEtcd
    scope: trio.CancelScope
    reaper: Reaper | None = None


async def start_replica(nursery: trio.Nursery, cluster: FakeCluster, backend: SharedFakeBackend, name: str,
                        *configs, ttl: int = 10, reaper_interval: float | None = 1.0,
                        metrics: Metrics | None = None) -> Replica:
    """A replica in its own cancel scope (cancel it to 'SIGKILL' the replica: its lease is left to expire)."""
    client = cluster.client()
    metrics = metrics or Metrics()
    store = EtcdStore(client, StoreConfig(type="etcd", endpoints=("fake",), lease_ttl=ttl, timeout=1.0, replica=name),
                      metrics=metrics, clock=trio.current_time)

    async def ready(address: Address) -> None:
        if backend.power.get(address.host) is not PowerState.RUNNING:
            raise OSError("connection refused")

    box: dict = {}

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(store.run)
                fleet = Fleet({c.name: c for c in configs}, {backend.name: backend}, metrics, inner,
                              ready_probe=ready, store=store)
                backend.fleets.append(fleet)
                reaper = None
                if reaper_interval is not None:
                    reaper = Reaper(fleet, interval=reaper_interval)
                    await inner.start(reaper.run)
                box["r"] = Replica(name, store, fleet, client, scope, reaper)
                task_status.started()
                await trio.sleep_forever()

    await nursery.start(run)
    return box["r"]


def ready_address(backend: FakeBackend):
    """Make FakeBackend.address name the machine, so the readiness probe can look its power up."""

    async def address(machine) -> Address:
        return Address(machine.name, 22)

    backend.address = address
