"""Short-lived upstream certificates: the gateway as an SSH user CA for its machines.

Machines then trust one line (`TrustedUserCAKeys`) instead of a gateway key each, and
what the gateway presents upstream is a fresh key per session with a certificate for
exactly one upstream user, valid for minutes: a stolen one is worth little and soon
worth nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncssh

CLOCK_SKEW = 60  # seconds of validity before "now", for machines whose clocks lag


@dataclass(frozen=True)
class CertPolicy:
    validity: float = 300.0
    source_address: tuple[str, ...] = ()


def sign_session_key(ca: asyncssh.SSHKey, upstream_user: str, key_id: str, policy: CertPolicy,
                     now: float | None = None) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A fresh ed25519 key and a certificate for `upstream_user` only, valid policy.validity seconds."""
    now = time.time() if now is None else now
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_user_certificate(
        key, key_id, principals=[upstream_user],
        valid_after=int(now - CLOCK_SKEW), valid_before=int(now + policy.validity),
        source_address=list(policy.source_address) or None,
        permit_x11_forwarding=False, permit_user_rc=False,
    )
    return key, cert
