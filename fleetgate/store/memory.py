"""The in-process store: one gateway owns its whole fleet.

Every decision (one start, the stop claim, sessions, keep-awake leases) is taken by the
Fleet itself in one synchronous step of the trio scheduler, so nothing needs storing
elsewhere; `shared` is False and the Fleet never calls the store's coordination methods.
This is the default when the config has no [store] section.
"""

from __future__ import annotations

import trio

from .base import Store


class MemoryStore(Store):
    shared = False
    replica = "local"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
