"""Unix sockets at any path length.

sun_path holds ~108 bytes, and deep state directories (tests' tmp dirs, long machine
names) go past it; the kernel resolves /proc/self/fd/N/NAME through an O_PATH fd of the
directory, so any path works for bind and connect.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

UNIX_PATH_MAX = 100


@contextmanager
def reachable(path: Path | str) -> Iterator[str]:
    """A name for path that fits in sun_path, valid inside the with block."""
    path = Path(path)
    target = str(path)
    if len(target.encode()) <= UNIX_PATH_MAX:
        yield target
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dir_fd}/{path.name}"
    finally:
        os.close(dir_fd)


def bind_listening(path: Path | str, backlog: int = 8, mode: int | None = None) -> socket.socket:
    """A listening unix socket at path (replacing a stale one), optionally chmod'ed before listen."""
    path = Path(path)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with reachable(path) as target:
            if mode is not None:
                old = os.umask(0o777 & ~mode)
            try:
                sock.bind(target)
            finally:
                if mode is not None:
                    os.umask(old)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
