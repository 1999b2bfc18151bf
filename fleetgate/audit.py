"""The audit log: one JSON line per session start and end.

Users, addresses and byte counts belong here, not in metric labels. Losing the audit
destination (disk full, file unwritable, deleted directory) is logged at most once a
minute and counted, and it never breaks a session: the gateway keeps serving and tries
to reopen the file on the next line. Every line is complete JSON: a record is written
whole or not at all (see AuditLog.write).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import private
from .metrics import Metrics

log = logging.getLogger(__name__)

COMPLAIN_EVERY = 60.0


class AuditLog:
    def __init__(self, destination: Path | str | None, metrics: Metrics):
        """destination: a file path, "-" for stdout, or None for no audit log."""
        self.destination = destination
        self.metrics = metrics
        self._fd: int | None = None
        self._last_complaint = -COMPLAIN_EVERY
        self._torn = False   # a partial line could not be taken back: start the next one on a new line

    def prepare(self, destination: Path | str | None) -> int | None:
        """A reload's new destination, opened now (OSError: the reload is refused): for switch()."""
        if destination is None or str(destination) == "-":
            return None
        return private.open_append_fd(destination)

    def switch(self, destination: Path | str | None, fd: int | None) -> None:
        """Write to `destination` from now on (a reload), through fd from prepare()."""
        self._drop_file()
        self.destination, self._fd, self._torn = destination, fd, False

    def _open(self) -> int:
        if self._fd is None:
            self._fd = private.open_append_fd(self.destination)  # 0600: it names users and addresses
        return self._fd

    def write(self, event: str, **fields: Any) -> None:
        """One record, one line, written whole or not at all.

        The line goes to the file in one os.write() on an O_APPEND descriptor (no buffer that
        would keep the rest of a line and glue it onto the next one). If the write is short (a
        full disk takes part of a line), the part that was written is cut off again, and the
        record counts as lost."""
        if self.destination is None:
            return
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        if str(self.destination) == "-":
            try:
                sys.stdout.write(line.decode())
                sys.stdout.flush()
            except (OSError, ValueError) as exc:
                self._failed(exc)
            return
        try:
            fd = self._open()
            if self._torn:
                line = b"\n" + line
            n = os.write(fd, line)
            if n != len(line):
                self._take_back(fd, n)
                raise OSError(errno.ENOSPC, f"short write ({n} of {len(line)} bytes), the partial line removed")
            self._torn = False
        except OSError as exc:
            self._failed(exc)

    def _take_back(self, fd: int, written: int) -> None:
        """Cut the `written` bytes of a short write off the end of the file again."""
        try:
            end = os.lseek(fd, 0, os.SEEK_CUR)   # O_APPEND: just after what this write() wrote
            os.ftruncate(fd, end - written)
        except OSError:
            self._torn = True

    def _failed(self, exc: Exception) -> None:
        self.metrics.audit_failures.inc()
        self._drop_file()
        now = time.monotonic()
        if now - self._last_complaint >= COMPLAIN_EVERY:
            self._last_complaint = now
            log.error("audit log write failed destination=%s error=%s (sessions continue; counted in "
                      "fleetgate_audit_write_failures_total)", self.destination, exc)

    def _drop_file(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None

    def close(self) -> None:
        self._drop_file()
