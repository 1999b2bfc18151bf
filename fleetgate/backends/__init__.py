"""Registry of backend types by the name used in `[backends.NAME] type = ...`."""

from __future__ import annotations

from .base import Address, Backend, BackendError, PowerState
from .process import ProcessBackend
from .qemu import QemuBackend
from .http import HttpBackend
from .command import CommandBackend
from .libvirt import LibvirtBackend
from .ec2 import Ec2Backend
from .device import DeviceBackend

BACKEND_TYPES: dict[str, type[Backend]] = {
    ProcessBackend.TYPE: ProcessBackend,
    QemuBackend.TYPE: QemuBackend,
    HttpBackend.TYPE: HttpBackend,
    CommandBackend.TYPE: CommandBackend,
    LibvirtBackend.TYPE: LibvirtBackend,
    Ec2Backend.TYPE: Ec2Backend,
    DeviceBackend.TYPE: DeviceBackend,
}

__all__ = ["Address", "Backend", "BackendError", "PowerState", "BACKEND_TYPES", "ProcessBackend"]
