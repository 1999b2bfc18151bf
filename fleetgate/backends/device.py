"""Device backend: machines behind NAT that dial in with a reverse tunnel when asked (seed 003).

A device keeps no tunnel open. To wake it, fleetgate asks it to dial in (`wake_url`: an HTTP
POST, e.g. to a carrier's metadata API that sets a flag the device polls; or `wake_command`),
then waits until the device's `ssh -R NAME:22:localhost:22 device:NAME@gateway` is registered
at the SSH front (fleetgate/ssh/devices.py, which tells this backend the loopback port that
leads through the tunnel). Ready is then, as for every machine, the device's own sshd
answering, through that port. To stop it, fleetgate asks it to close the tunnel (`sleep_url`
/ `sleep_command`) and closes the device's connection from its side.

A tunnel that drops while fleetgate thinks the device is up is a machine that died by itself
(`on_machine_exited`): its sessions end with a message and the next login wakes it again.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import trio

from .. import logsetup
from ..settings import MachineConfig
from .base import Address, Backend, BackendError, PathResolver, PowerState

log = logging.getLogger(__name__)
logsetup.redact_http_logs()  # httpx logs request URLs: never their query secrets

CALL_TIMEOUT = 30.0


def _check_keys(value: Any) -> str | None:
    import asyncssh

    lines = [value] if isinstance(value, str) else value
    if not isinstance(lines, list) or not lines or not all(isinstance(x, str) for x in lines):
        return "must be the device's public key line (or a list of them)"
    for line in lines:
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            return f"'{line[:37]}...' is not an OpenSSH public key ({exc})"
    return None


class DeviceBackend(Backend):
    TYPE = "device"
    BACKEND_OPTIONS = ()
    MACHINE_OPTIONS = ("device_keys", "wake_url", "sleep_url", "wake_command", "sleep_command")
    PROVIDES_ADDRESS = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._tunnels: dict[str, tuple[int, Callable[[], None]]] = {}
        self._stopping: set[str] = set()
        self._lost: set[str] = set()  # tunnels that dropped without being asked to
        self._changed = trio.Event()

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        if "device_keys" not in opts:
            yield "device_keys", "missing; the device's public key (it logs in as device:NAME with it)"
        else:
            problem = _check_keys(opts["device_keys"])
            if problem:
                yield "device_keys", problem
        for op in ("wake", "sleep"):
            url, cmd = opts.get(f"{op}_url"), opts.get(f"{op}_command")
            if url is not None and cmd is not None:
                yield f"{op}_command", f"give {op}_url or {op}_command, not both"
            if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
                yield f"{op}_url", f"must be an http:// or https:// URL, got {url!r}"
            if cmd is not None and (not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd)):
                yield f"{op}_command", "must be a list of strings (argv; {machine} is replaced by the machine's name)"
        if opts.get("wake_url") is None and opts.get("wake_command") is None:
            yield "wake_url", "missing; give wake_url or wake_command (how to ask the device to dial in)"

    # -- from the SSH front (fleetgate/ssh/devices.py), in trio ------------------------------

    def tunnel_up(self, name: str, port: int, disconnect: Callable[[], None]) -> None:
        old = self._tunnels.get(name)
        self._tunnels[name] = (port, disconnect)
        self._lost.discard(name)
        if old is not None:
            old[1]()  # one tunnel per device: the newest wins (a re-dial before the old one timed out)
        self._notify()

    def tunnel_down(self, name: str, port: int) -> None:
        current = self._tunnels.get(name)
        if current is None or current[0] != port:
            return
        del self._tunnels[name]
        self._notify()
        if name not in self._stopping:
            log.warning("device tunnel lost machine=%s", name)
            self._lost.add(name)
            self.on_machine_exited(name)

    def tunnel_lost(self, name: str) -> bool:
        """The device's tunnel dropped by itself (for the message sessions end with)."""
        return name in self._lost

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- the Backend calls ---------------------------------------------------------------

    async def _ask(self, machine: MachineConfig, op: str) -> None:
        url, cmd = machine.options.get(f"{op}_url"), machine.options.get(f"{op}_command")
        if url is not None:
            import httpx

            try:
                with trio.fail_after(CALL_TIMEOUT):
                    async with httpx.AsyncClient(timeout=CALL_TIMEOUT) as client:
                        r = await client.post(url, json={"machine": machine.name, "op": op})
            except (httpx.HTTPError, trio.TooSlowError) as exc:
                raise BackendError(f"asking {machine.name} to {op} failed", "backend_unreachable",
                                   detail=f"POST {url}: {type(exc).__name__}: {exc}") from None
            if not 200 <= r.status_code < 300:
                raise BackendError(f"asking {machine.name} to {op} failed (HTTP {r.status_code})", "start_error",
                                   detail=f"POST {url} answered {r.status_code}: {r.text[:200]}")
        elif cmd is not None:
            argv = [a.replace("{machine}", machine.name) for a in cmd]
            with trio.move_on_after(CALL_TIMEOUT) as scope:
                p = await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True,
                                           stdin=b"")
            if scope.cancelled_caught or p.returncode != 0:
                raise BackendError(f"asking {machine.name} to {op} failed", "start_error",
                                   detail=f"{argv[0]}: {'timeout' if scope.cancelled_caught else p.returncode}: "
                                          f"{p.stderr[-400:] if not scope.cancelled_caught else b''!r}")

    async def start(self, machine: MachineConfig) -> None:
        """Ask the device to dial in and wait for its tunnel (the fleet bounds this by boot_timeout)."""
        self._stopping.discard(machine.name)
        if machine.name not in self._tunnels:
            await self._ask(machine, "wake")
        while machine.name not in self._tunnels:
            await self._changed.wait()

    async def stop(self, machine: MachineConfig) -> None:
        self._stopping.add(machine.name)
        try:
            await self._ask(machine, "sleep")
        finally:
            tunnel = self._tunnels.get(machine.name)
            if tunnel is not None:
                tunnel[1]()  # close the device's connection from our side too
            while machine.name in self._tunnels:
                await self._changed.wait()

    async def status(self, machine: MachineConfig) -> PowerState:
        return PowerState.RUNNING if machine.name in self._tunnels else PowerState.STOPPED

    async def address(self, machine: MachineConfig) -> Address:
        tunnel = self._tunnels.get(machine.name)
        if tunnel is None:
            raise BackendError(f"{machine.name} has no tunnel open", "backend_error")
        return Address("127.0.0.1", tunnel[0])
