"""The Backend protocol: the small surface every kind of machine provider implements.

Backends know how to power a machine on and off and where its SSH server listens;
everything about waiting, single flight and idleness lives in the Fleet, so a backend
stays a thin adapter that is easy to fake in tests and easy to add.
"""

from __future__ import annotations

import enum
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from ..settings import BackendConfig, HostPort, MachineConfig

PathResolver = Callable[[str | None], Path | None]


def is_port(value: Any) -> bool:
    """A TCP port number (TOML booleans are ints in Python, and are not ports)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def is_seconds(value: Any, *, allow_zero: bool) -> bool:
    """A duration in seconds: a number, > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False  # TOML's inf and nan are numbers, not durations
    return value >= 0 if allow_zero else value > 0


class PowerState(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    STARTING = "starting"
    STOPPING = "stopping"
    UNKNOWN = "unknown"


class BackendError(Exception):
    """A backend call failed; `reason` is a short bounded code for metrics.

    `message` is shown to the user (it must carry no secret: no URL query, no API answer,
    no command output). What only operators may read goes in `detail`: the error then gets
    an `error_id`, shown to the user after the message and logged with the detail, so a
    user's report and the log line meet.
    """

    def __init__(self, message: str, reason: str = "start_error", detail: str | None = None):
        self.error_id = secrets.token_hex(4) if detail else None
        super().__init__(f"{message} (error id {self.error_id})" if self.error_id else message)
        self.reason = reason
        self.detail = detail


TCP = "tcp"
VSOCK = "vsock"
NETNS = "netns"   # TCP host:port inside another network namespace (the process backend's isolated machines)


@dataclass(frozen=True)
class Address:
    """Where a machine's SSH server answers: TCP host:port, or VSOCK cid:port (kind="vsock").

    For VSOCK, `host` holds the guest's context id as a decimal string (see `cid`), so code
    that only logs an address keeps working; code that connects goes through
    fleetgate.transport, which knows both kinds.
    """

    host: str
    port: int
    kind: str = TCP
    netns: str = ""   # kind="netns": a path to the namespace (/proc/PID/ns/net or /run/netns/NAME)

    @classmethod
    def of(cls, hp: HostPort) -> "Address":
        return cls(hp.host, hp.port)

    @classmethod
    def vsock(cls, cid: int, port: int = 22) -> "Address":
        return cls(str(int(cid)), port, VSOCK)

    @classmethod
    def in_netns(cls, netns: str, host: str, port: int) -> "Address":
        """host:port as seen from inside the network namespace at `netns` (e.g. its own loopback)."""
        return cls(host, port, NETNS, netns)

    @property
    def cid(self) -> int:
        if self.kind != VSOCK:
            raise ValueError(f"{self} is not a VSOCK address")
        return int(self.host)

    def __str__(self) -> str:
        if self.kind == VSOCK:
            return f"vsock:{self.host}:{self.port}"
        if self.kind == NETNS:
            return f"{self.host}:{self.port} in netns {self.netns}"
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
        # Set by the Fleet: backends that make several requests per call (HTTP retries) report
        # each one with the class of its answer (2xx..5xx, or none), for fleetgate_backend_requests_total.
        self.on_request: Callable[[str, str], None] = lambda op, status_class: None
        # Set by the Fleet: a backend that could not write its state (a full disk) reports the
        # kind of file (STATE_WRITE_KINDS in metrics.py), for fleetgate_state_write_errors_total.
        self.on_state_write_error: Callable[[str], None] = lambda kind: None

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

    @classmethod
    def check_machine(cls, machine: MachineConfig, backend_options: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        """Yield (key, problem) for a machine's common keys as this backend will use them (e.g. its
        `user`), so that `fleetgate check` refuses what start() would refuse at a login."""
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

    def can_status_all(self) -> bool:
        """Whether status_all() answers for many machines in one call (one command, one API request).

        The reconcile pass asks such a backend once per pass instead of once per machine: at
        10 000 machines that is the difference between one call and 10 000 (issue 15)."""
        return False

    async def status_all(self, machines: Sequence[MachineConfig]) -> Mapping[str, PowerState]:
        """The power state of `machines` in one call, by machine name (only if can_status_all()).

        A machine left out of the answer is asked with status() on its own; an exception fails
        the whole pass for this backend (logged; the next pass asks again)."""
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
