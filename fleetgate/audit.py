"""The audit log: one JSON line per session start and end.

Users, addresses and byte counts belong here, not in metric labels. Losing the audit
destination (disk full, file unwritable, deleted directory) is logged at most once a
minute and counted, and it never breaks a session: the gateway keeps serving and tries
to reopen the file on the next line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import IO, Any

from . import private
from .metrics import Metrics

log = logging.getLogger(__name__)

COMPLAIN_EVERY = 60.0


class AuditLog:
    def __init__(self, destination: Path | str | None, metrics: Metrics):
        """destination: a file path, "-" for stdout, or None for no audit log."""
        self.destination = destination
        self.metrics = metrics
        self._file: IO[str] | None = None
        self._last_complaint = -COMPLAIN_EVERY

    def _open(self) -> IO[str] | None:
        if self.destination is None:
            return None
        if str(self.destination) == "-":
            return sys.stdout
        if self._file is None:
            self._file = private.open_append(self.destination)  # 0600: it names users and addresses
        return self._file

    def write(self, event: str, **fields: Any) -> None:
        if self.destination is None:
            return
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        try:
            f = self._open()
            if f is not None:
                f.write(line)
                f.flush()
        except (OSError, ValueError) as exc:
            self.metrics.audit_failures.inc()
            self._drop_file()
            now = time.monotonic()
            if now - self._last_complaint >= COMPLAIN_EVERY:
                self._last_complaint = now
                log.error("audit log write failed destination=%s error=%s (sessions continue; counted in "
                          "fleetgate_audit_write_failures_total)", self.destination, exc)

    def _drop_file(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def close(self) -> None:
        self._drop_file()
