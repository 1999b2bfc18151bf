"""libvirt backend: named libvirt domains, started and stopped through libvirtd.

Why it looks like this:
- It talks to libvirtd with the official Python binding (`libvirt-python`), the same C
  library virsh uses: every libvirt URI works (qemu:///system, qemu+ssh://host/system,
  a custom socket), errors come back as codes rather than text to parse, and there is no
  process per call. The binding is blocking, so every call runs in a trio worker thread
  (one small CapacityLimiter per backend), bounded by `call_timeout`; a hung libvirtd
  costs a thread, never the gateway's event loop.
- The domain's own state is the truth: status() asks libvirt every time, so a domain
  started or stopped with `virsh` is picked up by the Fleet's reconcile.
- Stop is the ACPI power button (`virDomainShutdownFlags(ACPI_POWER_BTN)`); if the guest
  is not shut off after the machine's `stop_timeout`, `virDomainDestroy` pulls the plug.
- The address comes from the machine's `address`, else the domain's configuration: a
  QEMU user-net port forward (`hostfwd=tcp:HOST:PORT-:22` in `<qemu:commandline>`), or the
  DHCP lease of its libvirt network. With `transport = "vsock"` it is the guest's VSOCK
  CID (from the domain's `<vsock>` device or `vsock_cid`) and needs no network at all.
"""

from __future__ import annotations

import logging
import re
import threading
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlsplit, urlunsplit

import trio

from ..settings import BackendConfig, MachineConfig
from .base import Address, Backend, BackendError, PathResolver, PowerState, TCP, VSOCK, is_port, is_seconds

try:  # optional: pip install 'fleetgate[libvirt]' (builds against Debian's libvirt-dev)
    import libvirt
except ImportError:  # pragma: no cover - depends on the host
    libvirt = None  # type: ignore[assignment]
else:
    # libvirt prints every error to stderr by default; we report them ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URI = "qemu:///system"
DEFAULT_CALL_TIMEOUT = 30.0
DEFAULT_POLL_INTERVAL = 0.25
TRANSPORTS = (TCP, VSOCK)
ADDRESS_FROM = ("auto", "forward", "lease")
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
HOSTFWD_RE = re.compile(r"hostfwd=tcp:(?P<host>[^:,]*):(?P<port>\d+)-(?P<ghost>[^:,]*):(?P<gport>\d+)")
MAX_THREADS = 4
MISSING_BINDING = ("the libvirt backend needs the libvirt Python binding: pip install 'fleetgate[libvirt]' "
                   "(building it needs the Debian packages libvirt-dev and pkg-config)")


def redact_uri(uri: str) -> str:
    """The URI without user:password@ (libvirt URIs may carry a user name; never a secret in logs)."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable uri>"
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def hostfwd_address(xml: str, guest_port: int = 22) -> Address | None:
    """The host side of a QEMU user-net port forward to guest_port, from a domain's XML."""
    root = ET.fromstring(xml)
    for arg in root.iter(f"{{{QEMU_NS}}}arg"):
        for m in HOSTFWD_RE.finditer(arg.get("value", "")):
            if int(m["gport"]) == guest_port:
                host = m["host"] or "127.0.0.1"
                return Address("127.0.0.1" if host == "0.0.0.0" else host, int(m["port"]))
    return None


def vsock_cid(xml: str) -> int | None:
    """The guest CID of the domain's <vsock> device (the live XML has it even when auto='yes')."""
    root = ET.fromstring(xml)
    cid = root.find("./devices/vsock/cid")
    if cid is None or not cid.get("address", "").isdigit():
        return None
    return int(cid.get("address", "0")) or None


def _state_of(code: int) -> PowerState:
    if libvirt is None:  # pragma: no cover
        return PowerState.UNKNOWN
    return {
        libvirt.VIR_DOMAIN_RUNNING: PowerState.RUNNING,
        libvirt.VIR_DOMAIN_BLOCKED: PowerState.RUNNING,
        libvirt.VIR_DOMAIN_SHUTDOWN: PowerState.STOPPING,
        libvirt.VIR_DOMAIN_SHUTOFF: PowerState.STOPPED,
        libvirt.VIR_DOMAIN_CRASHED: PowerState.STOPPED,
    }.get(code, PowerState.UNKNOWN)   # paused, pmsuspended, nostate: fleetgate leaves those alone


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class LibvirtBackend(Backend):
    TYPE = "libvirt"
    BACKEND_OPTIONS = ("uri", "call_timeout", "poll_interval")
    MACHINE_OPTIONS = ("domain", "transport", "vsock_cid", "vsock_port", "ssh_port", "address_from")
    PROVIDES_ADDRESS = True

    # -- configuration ---------------------------------------------------------------------

    @classmethod
    def check_backend_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        if libvirt is None:
            yield "type", MISSING_BINDING
        uri = opts.get("uri", DEFAULT_URI)
        if not isinstance(uri, str) or ":" not in uri:
            yield "uri", f"must be a libvirt URI such as \"qemu:///system\" or \"qemu+ssh://root@host/system\", got {uri!r}"
        v = opts.get("call_timeout")
        if v is not None and not is_seconds(v, allow_zero=False):
            yield "call_timeout", f"must be a number of seconds > 0 (each libvirt call), got {v!r}"
        v = opts.get("poll_interval")
        if v is not None and (not is_seconds(v, allow_zero=False) or v > 10):
            yield "poll_interval", f"must be a number of seconds > 0 and <= 10 (how often a stop checks the state), got {v!r}"

    @classmethod
    def check_machine_options(cls, opts: Mapping[str, Any], resolve: PathResolver) -> Iterable[tuple[str, str]]:
        d = opts.get("domain")
        if d is not None and (not isinstance(d, str) or not d):
            yield "domain", "must be the libvirt domain's name (default: the machine's name)"
        transport = opts.get("transport", TCP)
        if transport not in TRANSPORTS:
            yield "transport", f"must be \"tcp\" or \"vsock\", got {transport!r}"
        cid = opts.get("vsock_cid")
        if cid is not None:
            if transport != VSOCK:
                yield "vsock_cid", "only used with transport = \"vsock\""
            elif not _is_int(cid) or not 3 <= cid < 2 ** 32 - 1:
                yield "vsock_cid", f"must be a guest CID, an integer >= 3, got {cid!r}"
        for key in ("vsock_port", "ssh_port"):
            v = opts.get(key)
            if v is not None and not (_is_int(v) and 0 < v < 2 ** 32):
                yield key, f"must be a port number (default 22), got {v!r}"
        if "vsock_port" in opts and transport != VSOCK:
            yield "vsock_port", "only used with transport = \"vsock\""
        af = opts.get("address_from", "auto")
        if af not in ADDRESS_FROM:
            yield "address_from", f"must be one of {', '.join(ADDRESS_FROM)}, got {af!r}"
        elif "address_from" in opts and transport == VSOCK:
            yield "address_from", "not used with transport = \"vsock\" (the address is the guest's CID)"

    def __init__(self, config: BackendConfig, resolve: PathResolver, state_dir: Path):
        super().__init__(config, resolve, state_dir)
        o = config.options
        self.uri: str = o.get("uri", DEFAULT_URI)
        self.shown_uri = redact_uri(self.uri)
        self.call_timeout = float(o.get("call_timeout", DEFAULT_CALL_TIMEOUT))
        self.poll_interval = float(o.get("poll_interval", DEFAULT_POLL_INTERVAL))
        self._limiter = trio.CapacityLimiter(MAX_THREADS)
        self._conn_lock = threading.Lock()
        self._conn: Any = None
        self.last_stop: dict[str, str] = {}   # machine -> "shutdown" | "destroy" (for logs and tests)

    # -- libvirt calls, in worker threads ---------------------------------------------------

    def _connection(self) -> Any:
        """The backend's libvirt connection (thread-safe in libvirt), reopened if it broke."""
        if libvirt is None:
            raise BackendError(MISSING_BINDING, "start_error")
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                try:
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
            self._conn = libvirt.open(self.uri)
            log.info("libvirt connected backend=%s uri=%s", self.name, self.shown_uri)
            return self._conn

    async def _run(self, fn: Callable[[], T], op: str, machine: MachineConfig, failure: str) -> T:
        """One blocking libvirt call in a worker thread, bounded; failures become BackendError."""
        with trio.move_on_after(self.call_timeout):
            try:
                return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
            except Exception as exc:
                if libvirt is not None and isinstance(exc, libvirt.libvirtError):
                    raise self._error(exc, op, machine, failure) from None
                raise
        raise BackendError(f"libvirtd at {self.shown_uri} did not answer within {self.call_timeout:g} s ({op})",
                           "backend_unreachable")

    def _domain_name(self, machine: MachineConfig) -> str:
        return str(machine.options.get("domain", machine.name))

    def _error(self, exc: Any, op: str, machine: MachineConfig, failure: str) -> BackendError:
        code = exc.get_error_code()
        text = " ".join(str(exc.get_error_message() or exc).split())[:300]
        dom = self._domain_name(machine)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return BackendError(f"libvirt ({self.shown_uri}) has no domain named '{dom}'; "
                                "`virsh list --all` shows the defined ones", "machine_gone")
        if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC,
                    libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_UNAVAILABLE):
            return BackendError(f"cannot reach libvirtd at {self.shown_uri}: {text}", "backend_unreachable")
        return BackendError(f"libvirt {op} of domain '{dom}' failed: {text}", failure)

    async def _lookup(self, machine: MachineConfig, failure: str) -> Any:
        name = self._domain_name(machine)
        return await self._run(lambda: self._connection().lookupByName(name), "lookup", machine, failure)

    async def _state(self, dom: Any, machine: MachineConfig, failure: str) -> int:
        return (await self._run(dom.state, "state", machine, failure))[0]

    async def _wait_state(self, dom: Any, machine: MachineConfig, want: set[int], failure: str,
                          timeout: float) -> bool:
        """Poll the domain's state until it is one of `want`; False after `timeout`."""
        with trio.move_on_after(timeout):
            while await self._state(dom, machine, failure) not in want:
                await trio.sleep(self.poll_interval)
            return True
        return False

    # -- the four calls -------------------------------------------------------------------------

    async def start(self, machine: MachineConfig) -> None:
        dom = await self._lookup(machine, "start_error")
        state = await self._state(dom, machine, "start_error")
        name = self._domain_name(machine)
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
            log.info("libvirt domain already running machine=%s domain=%s", machine.name, name)
        elif state == libvirt.VIR_DOMAIN_PAUSED:
            await self._run(dom.resume, "resume", machine, "start_error")
            log.info("libvirt domain resumed machine=%s domain=%s", machine.name, name)
        else:
            if state == libvirt.VIR_DOMAIN_SHUTDOWN:
                # Still powering off (a stop from virsh, say): wait for it, then boot afresh.
                await self._wait_state(dom, machine, {libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED},
                                       "start_error", machine.boot_timeout)
            try:
                await self._run(dom.create, "start", machine, "start_error")
            except BackendError:
                # Someone (virsh, another gateway) started it meanwhile: that is a success.
                if await self._state(dom, machine, "start_error") != libvirt.VIR_DOMAIN_RUNNING:
                    raise
            log.info("libvirt domain started machine=%s domain=%s", machine.name, name)
        if machine.options.get("transport", TCP) == TCP and machine.address is None and \
                machine.options.get("address_from", "auto") != "forward":
            await self._wait_for_address(dom, machine)

    async def _wait_for_address(self, dom: Any, machine: MachineConfig) -> None:
        """A DHCP lease appears a few seconds after boot; the Fleet's boot_timeout bounds this."""
        while True:
            try:
                await self._tcp_address(dom, machine)
                return
            except BackendError as exc:
                if exc.reason != "no_address":
                    raise
            await trio.sleep(max(self.poll_interval, 0.5))

    async def stop(self, machine: MachineConfig) -> None:
        """ACPI power button; virDomainDestroy if the guest is still up after stop_timeout.

        The Fleet bounds stop() by stop_timeout itself and then calls force_stop(); the
        fallback here is for callers that do not.
        """
        try:
            dom = await self._lookup(machine, "stop_failed")
        except BackendError as exc:
            if exc.reason == "machine_gone":   # a transient domain disappears once shut off
                return
            raise
        if await self._state(dom, machine, "stop_failed") in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            return
        t0 = trio.current_time()
        try:
            await self._run(partial(dom.shutdownFlags, libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN), "shutdown",
                            machine, "stop_failed")
        except BackendError as exc:
            log.info("libvirt shutdown failed machine=%s error=%s; destroying", machine.name, exc)
        else:
            if await self._wait_state(dom, machine, {libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED},
                                      "stop_failed", machine.stop_timeout):
                self.last_stop[machine.name] = "shutdown"
                log.info("libvirt domain shut off machine=%s how=shutdown seconds=%.2f", machine.name,
                         trio.current_time() - t0)
                return
        await self._destroy(dom, machine, t0)

    async def force_stop(self, machine: MachineConfig) -> None:
        """virDomainDestroy: the guest did not power off within stop_timeout."""
        try:
            dom = await self._lookup(machine, "stop_failed")
        except BackendError as exc:
            if exc.reason == "machine_gone":
                return
            raise
        await self._destroy(dom, machine, trio.current_time())

    async def _destroy(self, dom: Any, machine: MachineConfig, t0: float) -> None:
        try:
            await self._run(dom.destroy, "destroy", machine, "stop_failed")
        except BackendError:
            if await self._state(dom, machine, "stop_failed") != libvirt.VIR_DOMAIN_SHUTOFF:
                raise   # "domain is not running" is fine; anything else is a failed stop
        self.last_stop[machine.name] = "destroy"
        log.info("libvirt domain shut off machine=%s how=destroy seconds=%.2f", machine.name, trio.current_time() - t0)

    async def status(self, machine: MachineConfig) -> PowerState:
        try:
            dom = await self._lookup(machine, "backend_error")
        except BackendError as exc:
            if exc.reason == "machine_gone":   # undefined, or a transient domain that shut off
                return PowerState.STOPPED
            raise
        return _state_of(await self._state(dom, machine, "backend_error"))

    async def address(self, machine: MachineConfig) -> Address:
        o = machine.options
        if o.get("transport", TCP) == VSOCK:
            port = int(o.get("vsock_port", 22))
            if o.get("vsock_cid") is not None:
                return Address.vsock(int(o["vsock_cid"]), port)
            dom = await self._lookup(machine, "start_error")
            xml = await self._run(partial(dom.XMLDesc, 0), "address", machine, "start_error")
            cid = vsock_cid(xml)
            if cid is None:
                raise BackendError(f"domain '{self._domain_name(machine)}' has no <vsock> device with a CID "
                                   "(add <vsock model='virtio'><cid auto='yes'/></vsock>, or set vsock_cid)",
                                   "start_error")
            return Address.vsock(cid, port)
        if machine.address is not None:
            return Address.of(machine.address)
        dom = await self._lookup(machine, "start_error")
        try:
            return await self._tcp_address(dom, machine)
        except BackendError as exc:
            if exc.reason == "no_address":
                exc.reason = "start_error"
            raise

    async def _tcp_address(self, dom: Any, machine: MachineConfig) -> Address:
        o = machine.options
        port = int(o.get("ssh_port", 22))
        source = o.get("address_from", "auto")
        name = self._domain_name(machine)
        if source in ("auto", "forward"):
            xml = await self._run(partial(dom.XMLDesc, 0), "address", machine, "start_error")
            fwd = hostfwd_address(xml, port)
            if fwd is not None:
                return fwd
            if source == "forward":
                raise BackendError(f"domain '{name}' has no hostfwd=tcp:HOST:PORT-:{port} in its <qemu:commandline>",
                                   "start_error")
        try:
            leases = await self._run(partial(dom.interfaceAddresses, libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE),
                                     "address", machine, "start_error")
        except BackendError as exc:
            if "not running" in str(exc):
                raise BackendError(f"domain '{name}' is not running, so it has no DHCP lease", "no_address") from None
            raise
        for iface in (leases or {}).values():
            for a in iface.get("addrs") or ():
                if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and a.get("addr"):
                    return Address(a["addr"], port)
        raise BackendError(f"domain '{name}' has no DHCP lease on a libvirt network yet (and no port forward); "
                           "give the machine an address = HOST:PORT if it is reached another way", "no_address")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and libvirt is not None:
            def close() -> None:
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass
            with trio.move_on_after(self.call_timeout):
                await trio.to_thread.run_sync(close, limiter=self._limiter, abandon_on_cancel=True)
