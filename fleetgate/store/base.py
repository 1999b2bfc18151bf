"""What the Fleet needs from a shared store, and the config that selects one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class StoreUnavailable(Exception):
    """The store could not answer in time (unreachable, no quorum, timeout): decide nothing."""


@dataclass(frozen=True)
class StoreConfig:
    type: str = "memory"
    endpoints: tuple[str, ...] = ()
    prefix: str = "/fleetgate/"
    lease_ttl: int = 10
    timeout: float = 2.0
    ca_file: Any = None
    cert_file: Any = None
    key_file: Any = None
    replica: str | None = None
    wake_without_store: tuple[str, ...] = ()


@dataclass
class MachineView:
    """One machine as the store sees it (a snapshot at `revision`)."""

    name: str
    revision: int = 0
    holds: dict[str, int] = field(default_factory=dict)   # replica -> sessions it holds
    start: str | None = None                              # replica holding a live start claim
    stop: str | None = None                               # replica holding a live stop claim
    start_rev: int = 0                                    # mod revision of the start key (0: none; may be stale)
    stop_rev: int = 0                                     # mod revision of the stop key (0: none; may be stale)
    state: Mapping[str, Any] | None = None                # {"state": running|stopped|failed, "at": t, ...}
    state_rev: int = 0                                    # mod revision of the state key (0: none)
    gen_rev: int = 0                                      # mod revision of the hold generation key
    keep_until: float = 0.0                               # keep-awake lease expiry (store clock)

    @property
    def sessions(self) -> int:
        return sum(self.holds.values())

    @property
    def fleet_state(self) -> str:
        if self.stop:
            return "stopping"
        if self.start:
            return "starting"
        return (self.state or {}).get("state", "unknown")


class Store:
    """The interface; MemoryStore implements none of the coordination (shared = False)."""

    shared = False
    replica = "local"
    healthy = True

    async def run(self, *, task_status=None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def now(self) -> float:
        import time

        return time.time()
