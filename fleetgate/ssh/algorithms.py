"""Which SSH algorithms the front offers a client, in one place.

The listener asks `front_options()` for every new connection's algorithm settings, so a
reload (SIGHUP) that changes them applies to the next connection without reopening the
listening sockets.
"""

from __future__ import annotations

from typing import Any

import asyncssh

from ..config import GatewayConfig

# asyncssh's own list without finite-field Diffie-Hellman and GSS, so an unauthenticated
# client cannot make each handshake cost 5x the CPU (diffie-hellman-group18: ~14 ms
# against ~3 ms for curve25519).
FRONT_KEX_ALGS = [a.decode() for a in asyncssh.kex.get_kex_algs()
                  if not a.startswith((b"gss-", b"diffie-hellman", b"rsa"))]


def front_options(g: GatewayConfig) -> dict[str, Any]:
    """asyncssh connection options for the algorithms the front offers."""
    return {"encryption_algs": list(g.ciphers), "kex_algs": FRONT_KEX_ALGS, "compression_algs": None}
