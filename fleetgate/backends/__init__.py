"""Registry of backend types by the name used in `[backends.NAME] type = ...`."""

from __future__ import annotations

from .base import Address, Backend, BackendError, PowerState
from .process import ProcessBackend
from .qemu import QemuBackend

BACKEND_TYPES: dict[str, type[Backend]] = {
    ProcessBackend.TYPE: ProcessBackend,
    QemuBackend.TYPE: QemuBackend,
}

__all__ = ["Address", "Backend", "BackendError", "PowerState", "BACKEND_TYPES", "ProcessBackend"]
