"""The gateway's SSH client leg to a machine: host key verified, gateway key, nothing ambient.

No ~/.ssh/config, no agent, no default identities: what the gateway presents and trusts
upstream is exactly what the config says, so a stray file on the gateway host cannot
change who it logs in as or which host keys it accepts.
"""

from __future__ import annotations

import asyncssh

from .. import transport
from ..backends.base import TCP, Address
from ..errors import UpstreamError
from ..config import UPSTREAM_CIPHERS, GatewayConfig, MachineConfig
from . import bridge, internals
from .certs import CertPolicy, sign_session_key

CONNECT_TIMEOUT = 15.0


def _known_hosts(mc: MachineConfig):
    """Pinned keys and host CAs from the config, else the known_hosts file (which may hold @cert-authority lines)."""
    if mc.host_keys or mc.host_ca_keys:
        return ([asyncssh.import_public_key(k) for k in mc.host_keys],
                [asyncssh.import_public_key(k) for k in mc.host_ca_keys], [])
    return str(mc.known_hosts)


def _client_keys(mc: MachineConfig, upstream_user: str, login: str, ca: asyncssh.SSHKey | None) -> list:
    if mc.upstream_auth == "certificate":
        assert ca is not None
        key, cert = sign_session_key(ca, upstream_user, f"fleetgate:{login}@{mc.name}",
                                     CertPolicy(mc.cert_validity, mc.cert_source_address))
        return [(key, cert)]
    assert mc.identity is not None
    return [str(mc.identity)]


# Prepared client options per (machine config, address, account): asyncssh.connect() builds
# its options in a worker thread on every call (reading the key file, parsing known hosts,
# expanding algorithm lists), which was most of a login's CPU and two thread hand-offs.
# Built once and copied per connection instead; a config reload makes new MachineConfig
# objects, so a reload (SIGHUP) picks up a rotated key file, as it does every other file.
_PREPARED: dict[tuple, tuple[MachineConfig, asyncssh.SSHClientConnectionOptions]] = {}
PREPARED_MAX = 4096


async def _options(mc: MachineConfig, host: str, port: int, upstream_user: str, gw: GatewayConfig,
                   login: str, ca: asyncssh.SSHKey | None, password: str | None) -> asyncssh.SSHClientConnectionOptions:
    """The options for one upstream login: prepared once, unless they differ per login (a
    certificate signed for this login, or the user's password)."""
    per_login = password is not None or mc.upstream_auth == "certificate"
    key = (mc.name, host, port, upstream_user)
    if not per_login:
        hit = _PREPARED.get(key)
        if hit is not None and hit[0] is mc:
            return hit[1]
    options = await asyncssh.SSHClientConnectionOptions.construct(
        None, host=host, port=port,
        username=upstream_user,
        client_keys=None if password is not None else _client_keys(mc, upstream_user, login, ca),
        password=password,
        known_hosts=_known_hosts(mc),
        config=None, agent_path=None, agent_forwarding=False,
        password_auth=password is not None, kbdint_auth=False, gss_auth=False, host_based_auth=False,
        encryption_algs=list(UPSTREAM_CIPHERS), compression_algs=None,
        keepalive_interval=gw.keepalive_interval, keepalive_count_max=3,
        connect_timeout=CONNECT_TIMEOUT,
    )
    if not per_login:
        if len(_PREPARED) >= PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = (mc, options)
    return options


async def connect(mc: MachineConfig, address: Address, upstream_user: str, gw: GatewayConfig,
                  login: str = "", ca: asyncssh.SSHKey | None = None,
                  password: str | None = None) -> asyncssh.SSHClientConnection:
    """Open the upstream connection or raise UpstreamError with a sentence for the user.

    With a password (opt-in password passthrough) it is the only credential offered."""
    sock = None
    host = address.host
    if address.kind != TCP:
        # VSOCK, or TCP inside a machine's network namespace: asyncssh takes an already
        # connected socket; host then only names the machine for known_hosts lookups, so a
        # known_hosts file lists such a machine by its name.
        host = mc.name
        try:
            sock = await bridge.run_trio(transport.open_stream, address, CONNECT_TIMEOUT)
        except OSError as exc:
            raise UpstreamError("upstream_error", f"fleetgate: cannot reach {mc.name} at {address}: "
                                                  f"{exc.strerror or exc}") from None
    try:
        options = await _options(mc, host, address.port, upstream_user, gw, login, ca, password)
        return await internals.connect_prepared(options, sock)
    except asyncssh.HostKeyNotVerifiable:
        raise UpstreamError("host_key_mismatch", f"fleetgate: host key of {mc.name} changed; refusing to connect") from None
    except asyncssh.PermissionDenied:
        if password is not None:
            raise UpstreamError("upstream_auth", "fleetgate: permission denied") from None
        raise UpstreamError("upstream_auth", f"fleetgate: {mc.name} refused the gateway's key for {upstream_user}") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise UpstreamError("upstream_error", f"fleetgate: cannot reach {mc.name}: {exc}") from None
