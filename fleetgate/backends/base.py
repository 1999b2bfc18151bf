"""The Backend protocol: the small surface every kind of machine provider implements.

Backends know how to power a machine on and off and where its SSH server listens;
everything about waiting, single flight and idleness lives in the Fleet, so a backend
stays a thin adapter that is easy to fake in tests and easy to add.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping

from ..config import BackendConfig, HostPort, MachineConfig

PathResolver = Callable[[str | None], Path | None]


def is_port(value: Any) -> bool:
    """A TCP port number (TOML booleans are ints in Python, and are not ports)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def is_seconds(value: Any, *, allow_zero: bool) -> bool:
    """A duration in seconds: a number, > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 if allow_zero else value > 0


class PowerState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    UNKNOWN = "unknown"


class BackendError(Exception):
    """A backend call failed; `reason` is a short bounded code for metrics."""

    def __init__(self, message: str, reason: str = "start_error"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Address:
    """Where a machine's SSH server answers (TCP only for now)."""

    host: str
    port: int

    @classmethod
    def of(cls, hp: HostPort) -> "Address":
        return cls(hp.host, hp.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Backend:
    """Base class; subclasses set the option names they accept and implement the four calls."""

    TYPE: ClassVar[str] = ""
    BACKEND_OPTIONS: ClassVar[tuple[str, ...]] = ()
    MACHINE_OPTIONS: ClassVar[tuple[str, ...]] = ()
    PROVIDES_ADDRESS: ClassVar[bool] = False

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        self.config = config
        self.name = config.name
        self.resolve = resolve
        self.state_dir = state_dir
        # Set by the Fleet: a backend that notices a machine died by itself (its process
        # exited, its tunnel dropped) calls this with the machine name, from trio code.
        self.on_machine_exited: Callable[[str], None] = lambda name: None

    def progress_note(self, machine: MachineConfig) -> str | None:
        """Extra words for the user's progress line while this machine starts (e.g. a queue)."""
        return None

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        """Yield (key, problem) for bad backend-level options."""
        return ()

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        """Yield (key, problem) for bad machine-level options."""
        return ()

    async def start(self, machine: MachineConfig) -> None:
        raise NotImplementedError

    async def stop(self, machine: MachineConfig) -> None:
        raise NotImplementedError

    async def force_stop(self, machine: MachineConfig) -> None:
        """Called when a graceful stop() outlived the machine's stop_timeout; default: stop() again."""
        await self.stop(machine)

    async def status(self, machine: MachineConfig) -> PowerState:
        raise NotImplementedError

    async def address(self, machine: MachineConfig) -> Address:
        if machine.address is None:
            raise BackendError(f"machine {machine.name} has no address", "backend_error")
        return Address.of(machine.address)

    async def run(self, *, task_status=None) -> None:
        """A backend's own long-lived task (e.g. watching its processes), started by the App
        in the main nursery before anything else uses the backend. Default: nothing to do."""
        if task_status is not None:
            task_status.started()

    async def aclose(self) -> None:
        """Release resources held by the backend itself (not the machines)."""
