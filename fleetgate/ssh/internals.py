"""The one module that touches asyncssh's private names, guarded for the pinned version.

Everything fleetgate needs from asyncssh beyond its public API lives here, so that an
asyncssh upgrade is checked in one place (tests/test_internals.py fails loudly if a
bump breaks a hook):

- `apply_relay_tuning()`: per-packet costs of asyncssh that a relay pays twice per byte;
- `set_agent_forward_path()`: agent forwarding decided per session, not per connection;
- `hook_verified_publickey()`: a callback after asyncssh has verified a user's signature.

Relay tuning: per-packet costs of asyncssh that a relay pays twice per byte, removed.

Measured with py-spy and paired benchmarks (docs/benchmarks.md): the gateway's CPU per
GiB relayed fell by a fifth to a third with these four changes together, and none of
them changes what goes over the wire beyond dropping padding packets:

- asyncssh sends an empty SSH_MSG_IGNORE before every packet after key exchange, a
  countermeasure for CBC ciphers (RFC 4251 9.3.1). fleetgate negotiates only AEAD and
  CTR modes, where it buys nothing and doubles encryptions and send() calls;
- it formats a log record for every packet even when packet logging is off;
- it cancels and re-arms the keepalive timer for every chunk received; marking the
  connection active and letting the rare timer callback re-arm itself is enough;
- it calls transport.write() once per packet; writes made while one received chunk is
  handled are joined into one write per connection.

These touch asyncssh internals, so they apply only to the versions they were measured
and tested on (the whole test suite runs with them), and fleetgate runs without them,
with a warning, on any other version.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import asyncssh
from asyncssh import connection as _connection
from asyncssh import packet as _packet
from asyncssh.constants import MSG_IGNORE

log = logging.getLogger(__name__)

TESTED = ("2.24.",)  # the versions measured and tested; pyproject.toml pins asyncssh to them
_EMPTY_STRING = b"\x00\x00\x00\x00"
_applied = False


def apply_relay_tuning() -> bool:
    """Install the changes once per process; False (and a warning) on an untested asyncssh."""
    global _applied
    if _applied:
        return True
    version = asyncssh.__version__
    C = _connection.SSHConnection
    needed = ("send_packet", "_send", "data_received", "_reset_keepalive_timer", "_keepalive_timer_callback",
              "_set_keepalive_timer", "_force_close")
    if not version.startswith(TESTED) or not all(hasattr(C, n) for n in needed):
        log.warning("asyncssh %s is not one fleetgate's relay tuning was tested with; running without it "
                    "(slower relay, same behaviour)", version)
        return False
    _no_ignore(C)
    _no_packet_logging()
    _lazy_keepalive(C)
    _cork(C)
    _applied = True
    return True


def _no_ignore(C: type) -> None:
    send_packet = C.send_packet

    def patched(self, pkttype, *args, handler=None):
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        send_packet(self, pkttype, *args, handler=handler)

    C.send_packet = patched


def _no_packet_logging() -> None:
    if logging.getLogger("asyncssh").isEnabledFor(logging.DEBUG):
        return  # someone is debugging the protocol: keep asyncssh's packet log

    def quiet(self, pkttype, pktid, packet, note=""):
        pass

    _packet.SSHPacketLogger.log_sent_packet = quiet
    _packet.SSHPacketLogger.log_received_packet = quiet


def _lazy_keepalive(C: type) -> None:
    callback = C._keepalive_timer_callback

    def reset(self):
        if self._auth_complete:
            self._fg_active = True
            if not self._keepalive_timer:
                self._set_keepalive_timer()

    def fired(self):
        if getattr(self, "_fg_active", False):
            self._fg_active = False
            self._keepalive_count = 0
            self._set_keepalive_timer()
            return
        callback(self)

    C._reset_keepalive_timer = reset
    C._keepalive_timer_callback = fired


def _cork(C: type) -> None:
    data_received = C.data_received
    pending: dict = {}
    depth = [0]

    def flush() -> None:
        while pending:
            conn, chunks = pending.popitem()
            if conn._transport:
                try:
                    conn._transport.write(b"".join(chunks))
                except ConnectionError:
                    pass

    def send(self, data: bytes) -> None:
        if not self._transport:
            return
        if depth[0]:
            chunks = pending.get(self)
            if chunks is None:
                pending[self] = [data]
            else:
                chunks.append(data)
            return
        chunks = pending.pop(self, None)
        if chunks:
            chunks.append(data)
            data = b"".join(chunks)
        try:
            self._transport.write(data)
        except ConnectionError:
            pass

    def received(self, data, datatype=None):
        depth[0] += 1
        try:
            data_received(self, data, datatype)
        finally:
            depth[0] -= 1
            if not depth[0]:
                flush()

    force_close = C._force_close

    def closing(self, exc):
        # A disconnect message sent while a chunk is handled must go out before the abort.
        chunks = pending.pop(self, None)
        if chunks and self._transport:
            try:
                self._transport.write(b"".join(chunks))
            except ConnectionError:
                pass
        force_close(self, exc)

    C._send = send
    C.data_received = received
    C._force_close = closing


def set_agent_forward_path(upstream: asyncssh.SSHClientConnection, path: str | None) -> None:
    """Point the upstream connection's agent channels at the user's forwarded agent.

    asyncssh fixes agent forwarding per client connection at connect time, but we only
    learn whether the user asked for it (`ssh -A`) when their session channel opens.
    The attribute is asyncssh's own (2.24); tests cover it with `ssh -A` + `ssh-add -l`.
    """
    if path:
        upstream._agent_forward_path = path  # noqa: SLF001


def hook_verified_publickey(conn: asyncssh.SSHServerConnection, account: Callable[[str], str],
                            on_result: Callable[[str, bytes, bool], Awaitable[bool]]) -> None:
    """Wrap the connection's own public-key check so `on_result(username, msg, ok)` runs
    after asyncssh judged the key (and, when `msg` is non-empty, verified the signature).
    `account(username)` is the name asyncssh checks keys and certificate principals for
    (the login without its `+target`).

    asyncssh calls SSHServer.validate_public_key() for the unsigned key query too, before
    any signature exists, so a wake must hang off this point, not off that callback.
    """
    original = conn.validate_public_key

    async def validate_public_key(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
        return await on_result(username, msg, await original(account(username), key_data, msg, signature))

    conn.validate_public_key = validate_public_key  # type: ignore[method-assign]
