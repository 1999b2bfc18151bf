"""Which SSH algorithms the front offers a client, in one place.

The policy: accept every client a default OpenSSH 9.x sshd accepts and refuse what it
refuses (the lists below are `sshd -T` of Debian's OpenSSH 9.2, minus what asyncssh cannot
do, plus the ML-KEM hybrid of OpenSSH 9.9+), without letting the widened list cost the
relay speed with the OpenSSH majority.

In SSH the client's preference decides, and OpenSSH prefers chacha20-poly1305, which
costs the relay 13-27 % more CPU per byte than AES-GCM (docs/benchmarks.md). RFC 4253
does not fix which side sends KEXINIT first, so the front waits briefly for the client's
KEXINIT (`gateway.kexinit_wait`) and answers with the cheapest cipher set that client
supports: only AES-GCM to a client that offers it, the full list otherwise. A client that
waits for the server's list first gets the full list when the wait ends. The mechanics
(holding asyncssh's KEXINIT back, answering it) live in `internals.py`; this module
only decides, from plain name-lists, and is tested without sockets.

Finite-field Diffie-Hellman with big groups (group16, group18, group exchange, which a
client can ask to be 8192 bits) costs the gateway 1.3-4 times the CPU of a whole
curve25519 handshake (bench/preauth_cpu.py), while a client need not compute its own side
at all; so such a key exchange draws on a budget (`limits.expensive_kex_per_second` and
`limits.expensive_kex_per_source_per_minute`, in `limits.py`); when the budget is spent
the front stops offering them and refuses a client that can do nothing else. Key
re-exchanges the client starts draw on the same budget (`FrontPolicy.rekey_kex`), and on a
re-exchange rate budget of their own (limits.py).
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..settings import GatewayConfig
from . import internals

# What a default OpenSSH 9.x sshd offers (`sshd -T`, OpenSSH 9.2p1 Debian), in its order.
# sntrup761x25519-sha512 needs liboqs in asyncssh, so it is not offered: such a client
# negotiates the next one on its list (curve25519-sha256 or mlkem768x25519-sha256).
OPENSSH_KEX = (
    "mlkem768x25519-sha256",  # OpenSSH 9.9+ default; asyncssh drops it if its crypto cannot do it
    "sntrup761x25519-sha512",  # OpenSSH 9.0-9.8 default (internals.register_sntrup761, via pqcrypto)
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
OPENSSH_CIPHERS = (
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
)
OPENSSH_MACS = (
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
)
# `cryptography` deprecates finite-field DH; OpenSSH's sshd still offers it and so do we
# (within the budget): no warning in the gateway's log at the first such handshake.
warnings.filterwarnings("ignore", message="Diffie-Hellman over finite fields")
# PubkeyAcceptedAlgorithms: no SHA-1 `ssh-rsa` signatures (OpenSSH 8.8+), no DSA.
OPENSSH_USER_SIGNATURES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
# Host key signatures: the same rule (OpenSSH's HostKeyAlgorithms has no `ssh-rsa`).
REFUSED_HOST_KEY_ALGS = ("ssh-rsa", "ssh-dss", "ssh-rsa-cert-v01@openssh.com", "ssh-dss-cert-v01@openssh.com")

# Cheapest first: relay CPU per byte (docs/benchmarks.md). A tier is offered alone when the
# client supports one of its ciphers in both directions.
CIPHER_TIERS: tuple[tuple[str, ...], ...] = (
    ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com"),
)
# Key exchanges whose handshake costs the gateway clearly more than curve25519's (bench/
# preauth_cpu.py: group16 1.3-1.8x, group18 and 8192-bit group exchange 3.2-4x; group14 costs
# the same as curve25519), while a client can send a random public value for free.
EXPENSIVE_KEX = frozenset({"diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
                           "diffie-hellman-group-exchange-sha256"})
EXPENSIVE_KEX_PREFIXES = ("diffie-hellman-group-exchange-", "diffie-hellman-group15", "diffie-hellman-group16",
                          "diffie-hellman-group17", "diffie-hellman-group18", "gss-", "rsa")
KEX_PSEUDO = ("ext-info-c", "ext-info-s", "kex-strict-c-v00@openssh.com", "kex-strict-s-v00@openssh.com",
              "kexguess2@matt.ucc.asn.au")


def is_expensive_kex(name: str) -> bool:
    return name in EXPENSIVE_KEX or name.startswith(EXPENSIVE_KEX_PREFIXES)


@dataclass(frozen=True)
class Kexinit:
    """The name-lists of an SSH_MSG_KEXINIT (RFC 4253 7.1)."""

    kex: tuple[str, ...]
    host_key: tuple[str, ...]
    enc_cs: tuple[str, ...]
    enc_sc: tuple[str, ...]
    mac_cs: tuple[str, ...]
    mac_sc: tuple[str, ...]
    first_kex_follows: bool = False


class KexinitError(ValueError):
    pass


def parse_kexinit(payload: bytes) -> Kexinit:
    """Parse a KEXINIT payload after its message number: cookie, ten name-lists, flag, reserved."""
    return _parse(payload, 16)


def _parse(payload: bytes, idx: int) -> Kexinit:
    lists: list[tuple[str, ...]] = []
    for _ in range(10):
        if idx + 4 > len(payload):
            raise KexinitError("truncated KEXINIT")
        (n,) = struct.unpack_from(">I", payload, idx)
        idx += 4
        if idx + n > len(payload):
            raise KexinitError("truncated KEXINIT name-list")
        try:
            text = payload[idx:idx + n].decode("ascii")
        except UnicodeDecodeError:
            raise KexinitError("non-ASCII KEXINIT name-list") from None
        idx += n
        lists.append(tuple(text.split(",")) if text else ())
    if idx + 5 != len(payload):
        raise KexinitError("KEXINIT of the wrong length")
    return Kexinit(kex=lists[0], host_key=lists[1], enc_cs=lists[2], enc_sc=lists[3], mac_cs=lists[4],
                   mac_sc=lists[5], first_kex_follows=payload[idx] != 0)


def first_common(client: Sequence[str], server: Sequence[str]) -> str | None:
    """RFC 4253 7.1: the first algorithm on the client's list that the server supports."""
    offered = set(server)
    return next((a for a in client if a in offered), None)


def steer_ciphers(client: Kexinit, full: Sequence[str]) -> list[str]:
    """The cheapest tier of `full` the client supports in both directions, else `full`."""
    for tier in CIPHER_TIERS:
        mine = [c for c in full if c in tier]
        if mine and first_common(client.enc_cs, mine) and first_common(client.enc_sc, mine):
            return mine
    return list(full)


def guessed_right(client: Kexinit, server: Kexinit) -> bool:
    """RFC 4253 7.1: a guessed first kex packet is right if both sides' first key exchange
    and first host key algorithms are the same (what OpenSSH and Dropbear check; Dropbear's
    `kexguess2` relaxes this only when the server offers it too, which we do not)."""
    return (bool(client.kex) and bool(server.kex) and client.kex[0] == server.kex[0]
            and bool(client.host_key) and bool(server.host_key) and client.host_key[0] == server.host_key[0])


class KexRefused(Exception):
    """The key exchange this client needs is over its budget (message for the log)."""


@dataclass(frozen=True)
class Offer:
    """What the front puts in its KEXINIT (asyncssh algorithm names)."""

    kex: tuple[str, ...]
    host_key: tuple[str, ...]
    ciphers: tuple[str, ...]
    macs: tuple[str, ...]


@dataclass(frozen=True)
class FrontPolicy:
    """The front's algorithm policy for one listener (rebuilt by `front_options`)."""

    kex: tuple[str, ...]
    ciphers: tuple[str, ...]
    macs: tuple[str, ...]
    steer: bool              # ciphers not pinned by the operator: answer the client's KEXINIT
    wait: float              # how long to wait for the client's KEXINIT before sending ours

    # For internals.py, which must not import this module (it is imported from here).
    Malformed = KexinitError
    Refused = KexRefused
    parse = staticmethod(parse_kexinit)
    guessed_right = staticmethod(guessed_right)

    def host_keys(self, algs: Sequence[str]) -> list[str]:
        """Our host key algorithms without SHA-1 RSA (kept if it is all we have)."""
        kept = [a for a in algs if a not in REFUSED_HOST_KEY_ALGS]
        return kept or list(algs)

    def answer(self, client: Kexinit, host_keys: Sequence[str],
               allow_expensive: Callable[[str], bool]) -> Offer:
        """Our KEXINIT when we answer the client's: its cheapest ciphers; its own choices
        of key exchange and host key first, so a guessed first kex packet is right exactly
        when it named what will be negotiated; expensive kex only within the budget."""
        kex = list(self.kex)
        chosen = first_common(client.kex, kex)
        if chosen is not None and is_expensive_kex(chosen) and not allow_expensive(chosen):
            kex = [k for k in kex if not is_expensive_kex(k)]
            chosen = first_common(client.kex, kex)
        if chosen is not None:
            kex.remove(chosen)
            kex.insert(0, chosen)
        hk = list(host_keys)
        chosen_hk = first_common(client.host_key, hk)
        if chosen_hk is not None:
            hk.remove(chosen_hk)
            hk.insert(0, chosen_hk)
        ciphers = steer_ciphers(client, self.ciphers) if self.steer else list(self.ciphers)
        return Offer(kex=tuple(kex), host_key=tuple(hk), ciphers=tuple(ciphers), macs=self.macs)

    def rekey_kex(self, client: Kexinit, allow_expensive: Callable[[str], bool]) -> tuple[str, ...]:
        """Our key exchange list when we answer a client's re-exchange: the same budget as the
        first exchange (an expensive one over it is taken off the list)."""
        kex = list(self.kex)
        chosen = first_common(client.kex, kex)
        if chosen is not None and is_expensive_kex(chosen) and not allow_expensive(chosen):
            kex = [k for k in kex if not is_expensive_kex(k)]
        return tuple(kex)

    def check_sent(self, client: Kexinit, sent: Kexinit, allow_expensive: Callable[[str], bool]) -> None:
        """Our KEXINIT went out first (the client waited for it): refuse an expensive key
        exchange over budget, as we can no longer take it off the list."""
        chosen = first_common(client.kex, sent.kex)
        if chosen is not None and is_expensive_kex(chosen) and not allow_expensive(chosen):
            raise KexRefused(f"key exchange {chosen} is over the pre-authentication CPU budget")


def policy(g: GatewayConfig) -> FrontPolicy:
    pinned = tuple(g.ciphers)
    available = set(internals.available_kex_algs())
    return FrontPolicy(
        kex=tuple(k for k in (g.kex_algorithms or OPENSSH_KEX) if k in available),
        ciphers=pinned or OPENSSH_CIPHERS,
        macs=tuple(g.macs or OPENSSH_MACS),
        steer=not pinned,
        wait=float(g.kexinit_wait) if not pinned else 0.0,
    )


OPENSSH_KEX_AVAILABLE = tuple(k for k in OPENSSH_KEX if k in internals.available_kex_algs())


def apply(g: GatewayConfig) -> FrontPolicy:
    """Install the front's algorithm policy for every connection from now on.

    The front's connections take their lists from the installed policy (internals.py),
    so calling this on a config reload (SIGHUP) is enough for new connections to get the
    new `gateway.ciphers`, `macs`, `kex_algorithms` and `kexinit_wait`; listeners need not
    be reopened."""
    p = policy(g)
    internals.install_kexinit_policy(p)
    return p


def front_options(g: GatewayConfig) -> dict[str, Any]:
    """asyncssh connection options for the algorithms the front offers.

    The same lists as the policy, for asyncssh's own checks and for the case where the
    KEXINIT hooks are not installed (untested asyncssh). Installs nothing: the listener
    calls apply() when it takes a config (start, or a reload that passed every check).
    """
    p = policy(g)
    return {
        "kex_algs": list(p.kex),
        "encryption_algs": list(p.ciphers),
        "mac_algs": list(p.macs),
        "compression_algs": None,
        "signature_algs": list(OPENSSH_USER_SIGNATURES),
    }


__all__ = ["FrontPolicy", "Kexinit", "KexRefused", "Offer", "front_options", "guessed_right", "is_expensive_kex",
           "parse_kexinit", "policy", "steer_ciphers"]
