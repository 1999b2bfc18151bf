"""Key files: fleetgate writes OpenSSH-format keys so sshd and ssh read them as they are."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from . import private


def ensure_key(path: Path, comment: str = "") -> asyncssh.SSHKey:
    """Load the ed25519 private key at path, creating it (0600, with a .pub beside it) if missing."""
    path = Path(path)
    if path.exists():
        return asyncssh.read_private_key(str(path))
    private.makedirs(path.parent)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment or path.name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(key.export_private_key("openssh"))
    # Public, but nobody else's to change (under umask 000 write_bytes() would make it 0666).
    private.write_text(f"{path}.pub", key.export_public_key("openssh").decode(), 0o644)
    return key


def public_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()
