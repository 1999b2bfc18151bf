"""Files the gateway writes are private to its account, whatever the umask.

The Docker image and many service managers set no umask (so 022): a file created with
open() would be world-readable. The audit log names users, machines and source
addresses; the state dir holds the admin socket and the backends' state. So the places
that create them say their mode explicitly (`open_append_fd`: 0600, `makedirs`: 0700), and
the umask cannot widen it.

Not a process-wide umask: a backend may create files for another account on purpose
(the process backend's machines run as their own users and must read their
authorized_keys), and says their modes itself.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def makedirs(path: str | os.PathLike) -> Path:
    """mkdir -p with 0700 for the directories it creates (existing ones keep their mode)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # mkdir's mode is masked by the umask
    return path


def open_append_fd(path: str | os.PathLike) -> int:
    """A descriptor for appending (O_APPEND); created 0600 (an existing file keeps its mode)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.fchmod(fd, FILE_MODE)  # ours: whatever the umask masked, make it private
    except FileExistsError:
        fd = os.open(path, flags)
    return fd


def write_text(path: str | os.PathLike, text: str, mode: int = FILE_MODE) -> None:
    """Write a whole file with exactly `mode` (an existing file gets it too), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, mode)
        f.write(text)


def restrict_dir(path: str | os.PathLike) -> int | None:
    """Make an existing directory of ours 0700; return its old mode if that changed it."""
    st = os.stat(path)
    old = st.st_mode & 0o7777
    if st.st_uid != os.geteuid() or old == DIR_MODE:
        return None
    os.chmod(path, DIR_MODE)
    return old
