"""An in-memory backend for deterministic Fleet and reaper tests (MockClock-driven).

It is a fake only of the machine provider; it checks the invariants a real backend
would suffer from if broken: no concurrent start of one machine, no stop of a machine
that has sessions.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import trio

from fleetgate.backends.base import Address, Backend, BackendError, PowerState
from fleetgate.config import BackendConfig, MachineConfig
from fleetgate.fleet import Fleet
from fleetgate.metrics import Metrics


class InvariantBroken(AssertionError):
    pass


class FakeBackend(Backend):
    TYPE = "fake"

    def __init__(self, name: str = "fake"):
        super().__init__(BackendConfig(name, "fake", MappingProxyType({})), lambda p: None, Path("/nonexistent"))
        self.power: dict[str, PowerState] = {}
        self.start_delay = 1.0
        self.stop_delay = 0.5
        self.fail_start: set[str] = set()
        self.hang_start: set[str] = set()
        self.fail_stop: set[str] = set()
        self.starting: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.fleet: Fleet | None = None
        self.violations: list[str] = []

    def _broken(self, what: str) -> None:
        self.violations.append(what)
        raise InvariantBroken(what)

    async def start(self, machine: MachineConfig) -> None:
        name = machine.name
        self.calls.append(("start", name))
        if name in self.starting:
            self._broken(f"concurrent start of {name}")
        self.starting.add(name)
        try:
            if name in self.hang_start:
                await trio.sleep_forever()
            await trio.sleep(self.start_delay)
            if name in self.fail_start:
                raise BackendError("the fake API said no", "start_error")
            self.power[name] = PowerState.RUNNING
        finally:
            self.starting.discard(name)

    async def stop(self, machine: MachineConfig) -> None:
        name = machine.name
        self.calls.append(("stop", name))
        if self.fleet is not None and self.fleet.machines[name].sessions:
            self._broken(f"stop of {name} with {self.fleet.machines[name].sessions} session(s)")
        await trio.sleep(self.stop_delay)
        if name in self.fail_stop:
            raise BackendError("the fake API failed to stop", "stop_failed")
        self.power[name] = PowerState.STOPPED

    async def status(self, machine: MachineConfig) -> PowerState:
        self.calls.append(("status", machine.name))
        return self.power.get(machine.name, PowerState.STOPPED)

    async def address(self, machine: MachineConfig) -> Address:
        return Address("fake", hash(machine.name) % 60000 + 1)

    def count(self, op: str, name: str | None = None) -> int:
        return sum(1 for o, n in self.calls if o == op and (name is None or n == name))


def machine_config(name: str, **kw) -> MachineConfig:
    base = dict(name=name, backend="fake", user=None, address=None, host_keys=("x",), known_hosts=None,
                identity=None, boot_timeout=30.0, options=MappingProxyType({}), idle_timeout=60.0,
                min_uptime=10.0, stop_timeout=5.0)
    base.update(kw)
    return MachineConfig(**base)


def make_fleet(nursery: trio.Nursery, backend: FakeBackend, *configs: MachineConfig,
               metrics: Metrics | None = None) -> Fleet:
    """A Fleet over the fake backend whose readiness is the fake's power state."""

    async def ready(address: Address) -> None:
        return None

    fleet = Fleet({c.name: c for c in configs}, {backend.name: backend}, Metrics(), nursery, ready_probe=ready) if metrics is None else \
        Fleet({c.name: c for c in configs}, {backend.name: backend}, metrics, nursery, ready_probe=ready)
    backend.fleet = fleet
    return fleet
