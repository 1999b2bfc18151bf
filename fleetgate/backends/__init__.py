"""Registry of backend types by the name used in `[backends.NAME] type = ...`."""

from __future__ import annotations

from .base import Address, Backend, BackendError, PowerState
from .process import ProcessBackend

BACKEND_TYPES: dict[str, type[Backend]] = {
    ProcessBackend.TYPE: ProcessBackend,
}

__all__ = ["Address", "Backend", "BackendError", "PowerState", "BACKEND_TYPES", "ProcessBackend"]
