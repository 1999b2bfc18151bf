"""Registry of backend types by the name used in `[backends.NAME] type = ...`."""

from __future__ import annotations

from .base import Address, Backend, BackendError, PowerState
from .process import ProcessBackend
from .qemu import QemuBackend
from .http import HttpBackend
from .command import CommandBackend

BACKEND_TYPES: dict[str, type[Backend]] = {
    ProcessBackend.TYPE: ProcessBackend,
    QemuBackend.TYPE: QemuBackend,
    HttpBackend.TYPE: HttpBackend,
    CommandBackend.TYPE: CommandBackend,
}

__all__ = ["Address", "Backend", "BackendError", "PowerState", "BACKEND_TYPES", "ProcessBackend"]
