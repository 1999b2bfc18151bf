"""The one module that touches asyncssh's private names, guarded for the pinned version.

Everything fleetgate needs from asyncssh beyond its public API lives here, so that an
asyncssh upgrade is checked in one place (tests/test_internals.py fails loudly if a
bump breaks a hook):

- `apply_relay_tuning()`: per-packet costs of asyncssh that a relay pays twice per byte,
  and per-login ones (no server config reload, KEXINIT payloads dropped after the
  exchange hash); it also installs `apply_fast_path()`: AES-GCM packets decrypted from the
  input buffer and data between two channels paired by `pair_channels()` sent on as one
  packet (see the section below);
- `connect_prepared()`: an upstream connection from client options prepared once;
- `set_agent_forward_path()`: agent forwarding decided per session, not per connection;
- `hook_verified_publickey()`: a callback after asyncssh has verified a user's signature;
- `send_exit_status()`, `send_exit_signal()`, `has_unread_data()`: what a relay needs to
  pass a channel's exit, EOF and close on in the order the machine sent them;
- `create_session_channel()`: a session channel that answers the user's CLOSE only after
  the machine's channel closed, as sshd does (OpenSSH ControlMaster depends on it);
- `watch_transport()`: the user's TCP back-pressure, which asyncssh itself ignores;
- `create_remote_listener()`: `-R` registered before the machine listens, as OpenSSH does;
- `register_sntrup761()`: the post-quantum key exchange OpenSSH 9.0-9.8 prefer, without liboqs;
- `set_kex_budget()`: every key exchange a client starts, re-exchanges too, asks the pre-auth
  limiter's budgets (limits.py) first;
- `_prompt_close()` (with the relay tuning): a relayed machine channel's CLOSE goes to the user
  in the same write as the exit status that came with it (Paramiko's rekey race, issue 25).

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

import asyncio
import copy
import functools
import logging
import weakref
from typing import Any, Awaitable, Callable

import asyncssh
from asyncssh import auth as _auth
from asyncssh import channel as _channel_mod
from asyncssh import connection as _connection
from asyncssh import kex as _kex
from asyncssh import kex_dh as _kex_dh
from asyncssh import packet as _packet
from asyncssh import listener as _listener
from asyncssh.constants import MSG_CHANNEL_CLOSE, MSG_IGNORE, MSG_KEXINIT, MSG_REQUEST_SUCCESS
from asyncssh.packet import Boolean, String, UInt32

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
    _drop_kexinits(C)
    _no_config_reload(_connection.SSHServerConnection)
    _prompt_close(_channel_mod.SSHChannel)
    _applied = True
    apply_fast_path()
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


def _drop_kexinits(C: type) -> None:
    """Once the exchange hash is computed, the two KEXINIT payloads (about 3 KiB a connection,
    kept by asyncssh until the next key exchange replaces them) are not needed again."""
    send_newkeys = C.send_newkeys

    def patched(self, k, h):
        send_newkeys(self, k, h)
        self._client_kexinit = self._server_kexinit = b""

    C.send_newkeys = patched


def _prompt_close(Ch: type) -> None:
    """A relayed machine channel's CLOSE reaches the relay in the step it arrives in.

    asyncssh tells a channel's session about a CLOSE a loop turn later (call_soon), so the
    relay wrote the machine's exit-status (and EOF) to the user in one TCP write and the
    CLOSE in another. sshd and a bare asyncssh server send them together, and Paramiko
    depends on it: its reader thread answers a CLOSE, and if the application thread started
    a key re-exchange (`renegotiate_keys()`) on seeing the exit status in between, that
    answer waits for a key exchange only the blocked reader could finish — 30 s, then
    "Key-exchange timed out" (issue 25, item 10). Cleaning up at once puts the CLOSE in the
    same write as what came with it (the write cork, `_cork`), as the machine sent them.
    Only for channels to a machine that the relay paired (`pair_channels`); others unchanged.
    """
    handlers = Ch._packet_handlers
    process_close = handlers[MSG_CHANNEL_CLOSE]

    def patched(self, pkttype, pktid, packet):
        process_close(self, pkttype, pktid, packet)
        if (getattr(self, "_fg_to", None) is not None and self._recv_state == "closed"
                and self._conn is not None and not self._conn.is_server()):
            self._cleanup()  # what asyncssh scheduled with call_soon; that later call finds nothing to do

    handlers[MSG_CHANNEL_CLOSE] = patched


def _no_config_reload(S: type) -> None:
    """asyncssh re-reads the server's OpenSSH-style config for the user name at the start of
    authentication, building new options in a worker thread. fleetgate's front loads no such
    file, so the result would equal what it has: skipped (a thread hand-off and the cost of
    an options object per login)."""
    reload = S.reload_config

    async def reload_config(self):
        if self._options.config.loaded or self._rdns_lookup:
            await reload(self)

    S.reload_config = reload_config


async def connect_prepared(options: asyncssh.SSHClientConnectionOptions, sock: Any = None) -> asyncssh.SSHClientConnection:
    """asyncssh.connect() with options prepared once (asyncssh.SSHClientConnectionOptions.construct):
    each connection gets a shallow copy (asyncssh keeps per-connection state such as the
    auth waiter on it), not options rebuilt in a worker thread."""
    if not _applied or not hasattr(_connection, "_connect"):  # untested asyncssh: its public way
        return await asyncssh.connect(options.host, options.port, options=options, sock=sock, config=None)
    opts = copy.copy(options)
    loop = asyncio.get_event_loop()

    def factory() -> asyncssh.SSHClientConnection:
        return _connection.SSHClientConnection(loop, opts, wait="auth")

    conn = await asyncio.wait_for(
        _connection._connect(opts, None, loop, 0, sock, factory, "Opening SSH connection to"),
        timeout=opts.connect_timeout)
    conn._options = options  # the copy only carried this connect's waiter: share the original
    # The machine's signature algorithms, one set per distinct list (asyncssh only tests membership).
    sig_algs = frozenset(conn._server_sig_algs)
    conn._server_sig_algs = _SIG_ALGS.setdefault(sig_algs, sig_algs)
    if len(_SIG_ALGS) > 256:
        _SIG_ALGS.clear()
    return conn


_SIG_ALGS: dict = {}


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


def send_exit_status(chan: asyncssh.SSHServerChannel, status: int) -> None:
    """Send `exit-status` now, without closing the channel.

    asyncssh's public exit() also closes, which would drop data and an EOF that the
    machine sends after its exit status; a relay must pass each message on in the order
    the machine sent it (OpenSSH's ControlMaster closes a channel as soon as it has seen
    EOF both ways, so an exit status held back until CLOSE is lost).
    """
    if chan._send_state not in {"close_pending", "closed"}:  # noqa: SLF001
        chan._send_request(b"exit-status", UInt32(status & 0xFF))  # noqa: SLF001


def send_exit_signal(chan: asyncssh.SSHServerChannel, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
    """Send `exit-signal` now, without closing the channel (see send_exit_status)."""
    if chan._send_state not in {"close_pending", "closed"}:  # noqa: SLF001
        chan._send_request(b"exit-signal", String(signal), Boolean(core_dumped), String(msg),  # noqa: SLF001
                           String(lang))


def has_unread_data(chan: asyncssh.SSHClientChannel) -> bool:
    """Whether asyncssh holds received data the session has not been handed yet.

    asyncssh delivers channel requests (exit-status) at once, but data only while reading
    is not paused: a relay that paused a channel must hold such a request back until the
    data the machine sent before it has been delivered.
    """
    return bool(chan._recv_buf)  # noqa: SLF001


# -- key exchange: the client's KEXINIT first -------------------------------------------
#
# asyncssh sends its KEXINIT as soon as it has read the client's version line. For a
# server, RFC 4253 7.1 allows waiting for the client's KEXINIT instead, and the front's
# policy (algorithms.FrontPolicy) then answers with lists made for that client: the
# cheapest ciphers it supports, its own key exchange and host key choices first. A client
# that waits for the server's KEXINIT gets the full lists after `policy.wait` seconds.
#
# It also fixes what asyncssh 2.24 does differently from OpenSSH's sshd as a server:
# - a guessed first kex packet (first_kex_packet_follows, sent by Dropbear's dbclient) is
#   kept only if both sides' first kex and host key algorithms agree (RFC 4253 7.1);
#   asyncssh compared the negotiated kex with the client's first only, so it answered a
#   packet Dropbear had discarded, and failed with "Key exchange not in progress";
# - a user signature must use an algorithm of the connection's `signature_algs`, which
#   asyncssh only advertised (server-sig-algs) but did not enforce;
# - group exchange never hands out a group under 2048 bits (asyncssh starts at 1024 and
#   ignores the client's minimum; OpenSSH's sshd clamps to 2048 and refuses a lower maximum).
#
# These apply to every asyncssh *server* connection in the process once installed (in
# fleetgate, the SSH front is the only asyncssh server); clients are untouched.

_kex_policy: Any = None  # an algorithms.FrontPolicy (not imported: algorithms imports this module)
_kex_installed = False


def available_kex_algs() -> list[str]:
    """Key exchange algorithms this asyncssh (and its crypto backend) can do."""
    return [a.decode() for a in _kex.get_kex_algs()]


def install_kexinit_policy(policy: Any) -> bool:
    """Make asyncssh server connections follow `policy` from their next connection on.

    False (and a warning) on an asyncssh this was not tested with: then the front sends
    the full lists first, as asyncssh does, and Dropbear's guessed kex packet may fail."""
    global _kex_policy, _kex_installed
    _kex_policy = policy
    if _kex_installed:
        return True
    version = asyncssh.__version__
    S = _connection.SSHServerConnection
    attrs_ok = all(hasattr(S, n) for n in ("_recv_version", "_send_kexinit", "choose_server_host_key"))
    handlers = getattr(_connection.SSHConnection, "_packet_handlers", None)
    start = getattr(getattr(_auth, "_ServerPublicKeyAuth", None), "_start", None)
    gex = getattr(getattr(_kex_dh, "_KexDHGex", None), "_packet_handlers", None)
    if not version.startswith(TESTED) or not attrs_ok or not isinstance(handlers, dict) \
            or MSG_KEXINIT not in handlers or start is None or not isinstance(gex, dict) \
            or not {_GEX_REQUEST_OLD, _GEX_REQUEST} <= set(gex):
        log.warning("asyncssh %s is not one fleetgate's KEXINIT handling was tested with; the front offers "
                    "its full lists first and does not steer ciphers", version)
        return False
    _patch_recv_version(S)
    _patch_process_kexinit(handlers)
    _patch_userauth_signatures(_auth._ServerPublicKeyAuth)  # noqa: SLF001
    _patch_gex_minimum(gex)
    _kex_installed = True
    return True


def set_kex_budget(conn: Any, allow: Callable[[str], bool], allow_rekey: Callable[[], bool] | None = None) -> None:
    """`allow(kex_name)` is asked before an expensive key exchange (algorithms.is_expensive_kex)
    runs on this server connection, the first one or a re-exchange the client starts; False
    takes it off the offer, or refuses the client. `allow_rekey()` is asked before each key
    re-exchange the client starts; False disconnects it (a re-exchange cannot be declined)."""
    if isinstance(conn, _connection.SSHServerConnection):
        conn._fg_kex_budget = allow  # noqa: SLF001
        conn._fg_rekey_budget = allow_rekey  # noqa: SLF001


def _patch_recv_version(S: type) -> None:
    recv_version = S._recv_version

    def patched(self) -> bool:
        policy = _kex_policy
        if policy is None:
            return recv_version(self)
        self._fg_policy = policy
        # The policy's lists, not the listener's options: a reload that installs a new
        # policy (algorithms.apply) reaches the next connection without a new listener.
        self._kex_algs = [a.encode() for a in policy.kex]
        self._enc_algs = [a.encode() for a in policy.ciphers]
        self._mac_algs = [a.encode() for a in policy.macs]
        if self._server_host_key_algs:
            kept = [a.encode() for a in policy.host_keys([a.decode() for a in self._server_host_key_algs])]
            self._server_host_key_algs = kept
            if len(kept) < len(self._server_host_keys):  # asyncssh picks from this, offered or not
                self._server_host_keys = {a: k for a, k in self._server_host_keys.items() if a in kept}
        if policy.wait <= 0:
            return recv_version(self)
        # Let asyncssh accept the version line without sending its KEXINIT.
        self._send_kexinit = _no_kexinit
        try:
            result = recv_version(self)
        finally:
            del self._send_kexinit
        if self._kexinit_sent:  # the version was accepted: now wait for the client's KEXINIT
            self._kexinit_sent = False
            _KexinitClock.of(self._loop).add(self, policy.wait)
        return result

    S._recv_version = patched


def _no_kexinit() -> None:
    pass


class _KexinitClock:
    """One timer per event loop for every connection waiting for the client's KEXINIT.

    A timer per connection would keep each connection (or, cancelled, its handle) in
    memory for the whole wait after the client has gone; here a connection is held only
    weakly and leaves as soon as its KEXINIT arrives or it is collected."""

    _clocks: "weakref.WeakKeyDictionary[Any, _KexinitClock]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, loop: Any) -> "_KexinitClock":
        clock = cls._clocks.get(loop)
        if clock is None:
            clock = cls._clocks[loop] = cls(loop)
        return clock

    def __init__(self, loop: Any):
        self._loop = weakref.ref(loop)
        self._pending: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()
        self._handle: Any = None
        self._when = 0.0

    def add(self, conn: Any, wait: float) -> None:
        loop = self._loop()
        if loop is None:
            return
        deadline = loop.time() + wait
        self._pending[conn] = deadline
        if self._handle is None or deadline < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._when = deadline
            self._handle = loop.call_at(deadline, self._fire)

    def discard(self, conn: Any) -> None:
        self._pending.pop(conn, None)

    def _fire(self) -> None:
        self._handle = None
        loop = self._loop()
        if loop is None:
            return
        now = loop.time()
        due = [c for c, t in list(self._pending.items()) if t <= now]
        for conn in due:
            self._pending.pop(conn, None)
            _send_full_kexinit(conn)
        if self._pending:  # at most 20 passes a second, however many connections wait
            self._when = max(min(self._pending.values()), now + 0.05)
            self._handle = loop.call_at(self._when, self._fire)


def _send_full_kexinit(conn: Any) -> None:
    """The client did not send its KEXINIT in time: send ours with the full lists."""
    if conn._transport is None or conn._kexinit_sent or conn._kex or conn._client_kexinit:
        return
    log.debug("kexinit: no client KEXINIT in time, sending the full lists")
    try:
        conn._send_kexinit()
        conn._kexinit_sent = True
    except Exception:  # noqa: BLE001 - report like asyncssh's own receive path does
        conn.internal_error()


def _patch_process_kexinit(handlers: dict) -> None:
    process_kexinit = handlers[MSG_KEXINIT]

    async def patched(self, pkttype: int, pktid: int, packet: Any) -> None:
        policy = getattr(self, "_fg_policy", None)
        if policy is None or not self.is_server() or self._kex:
            return await process_kexinit(self, pkttype, pktid, packet)
        _KexinitClock.of(self._loop).discard(self)
        try:
            client = policy.parse(packet.get_remaining_payload())
        except policy.Malformed as exc:
            raise asyncssh.ProtocolError(str(exc)) from None
        allow = getattr(self, "_fg_kex_budget", None) or _always
        if self._session_id:
            # A re-exchange: it keeps the connection's ciphers, but every one the client starts
            # is counted (issue 25: a client could re-run key exchanges before authentication,
            # group18 ones too, outside every budget). Ours (asyncssh's rekey after 1 GiB or an
            # hour) went out first and costs what we chose: not charged.
            if not self._kexinit_sent:
                allow_rekey = getattr(self, "_fg_rekey_budget", None)
                if allow_rekey is not None and not allow_rekey():
                    raise asyncssh.KeyExchangeFailed("fleetgate: key re-exchanges far more often than any client "
                                                     "needs; disconnecting")
                self._kex_algs = _encoded(policy.rekey_kex(client, allow))
        else:  # the first key exchange
            try:
                if not self._kexinit_sent:
                    hk = [a.decode() for a in (self._server_host_key_algs or ())]
                    offer = policy.answer(client, hk, allow)
                    log.debug("kexinit: answering the client's (ciphers %s)", ",".join(offer.ciphers))
                    self._kex_algs = _encoded(tuple(offer.kex))
                    self._enc_algs = _encoded(tuple(offer.ciphers))
                    self._mac_algs = _encoded(tuple(offer.macs))
                    if self._server_host_key_algs:
                        self._server_host_key_algs = _encoded(tuple(offer.host_key))
                else:
                    policy.check_sent(client, policy.parse(self._server_kexinit[1:]), allow)
            except policy.Refused as exc:
                raise asyncssh.KeyExchangeFailed(str(exc)) from None
        await process_kexinit(self, pkttype, pktid, packet)
        if client.first_kex_follows:
            server = policy.parse(self._server_kexinit[1:])
            self._ignore_first_kex = not policy.guessed_right(client, server)
        return None

    handlers[MSG_KEXINIT] = patched


def _always(_name: str) -> bool:
    return True


@functools.lru_cache(maxsize=256)
def _encoded(names: tuple[str, ...]) -> list[bytes]:
    """One list per distinct offer, shared by the connections that get it (asyncssh only
    reads these lists): a few KiB less per connection."""
    return [a.encode() for a in names]


_CERT_SUFFIX = b"-cert-v01@openssh.com"


def _patch_userauth_signatures(A: type) -> None:
    start = A._start

    async def patched(self, packet: Any) -> None:
        allowed = getattr(self._conn, "_sig_algs", None)
        if allowed:
            try:
                peek = _packet.SSHPacket(packet.get_remaining_payload())
                signed = peek.get_boolean()
                algorithm = peek.get_string()
                peek.get_string()  # key
                signature = peek.get_string() if signed else b""
            except _packet.PacketDecodeError:
                pass  # asyncssh reports the malformed request itself
            else:
                sig_alg = algorithm[:-len(_CERT_SUFFIX)] if algorithm.endswith(_CERT_SUFFIX) else algorithm
                if sig_alg not in allowed or (signed and not _signature_named(signature, sig_alg)):
                    self.logger.info("Refused public key algorithm %s", algorithm.decode("ascii", "replace"))
                    self.send_failure()
                    return
        await start(self, packet)

    A._start = patched


def _signature_named(signature: bytes, sig_alg: bytes) -> bool:
    try:
        return _packet.SSHPacket(signature).get_string() == sig_alg
    except _packet.PacketDecodeError:
        return False


class _RelayServerChannel(asyncssh.SSHServerChannel):
    """A user's session channel whose CLOSE answer follows the machine's, as sshd's does.

    OpenSSH's ControlMaster sends CLOSE as soon as it has seen EOF both ways, often before
    the exit status, and sshd answers such a CLOSE only after it has sent the exit status
    (it waits for the child). asyncssh answers at once and drops what comes later; this
    channel instead discards unsent data, tells the session (`peer_closed()`), and sends
    its CLOSE when the relay calls close() once the machine's channel has closed.
    """

    def _process_close(self, pkttype: int, pktid: int, packet: Any) -> None:
        session = self._session
        closing = getattr(session, "close_received", None)
        if closing is not None:
            closing()  # now, not at asyncssh's later cleanup: the next CHANNEL_OPEN may be in this chunk
        if (self._send_state in {"close_pending", "closed"} or self._recv_state not in {"open", "eof_pending", "eof"}
                or not hasattr(session, "peer_closed")):
            return asyncssh.SSHServerChannel._process_close(self, pkttype, pktid, packet)
        packet.check_end()
        self._send_buf = []
        self._send_buf_len = 0
        self._recv_buf = []
        self._recv_state = "close_pending"  # close() below finishes the cleanup
        session.peer_closed()

    _packet_handlers = {**asyncssh.SSHServerChannel._packet_handlers, MSG_CHANNEL_CLOSE: _process_close}


def create_session_channel(conn: asyncssh.SSHServerConnection, window: int,
                           max_pktsize: int) -> asyncssh.SSHServerChannel:
    """A binary session channel for the relay, with sshd's CLOSE ordering (see above)."""
    chan = conn.create_server_channel(encoding=None, window=window, max_pktsize=max_pktsize)
    chan.__class__ = _RelayServerChannel
    return chan


_GEX_REQUEST_OLD = 30
_GEX_REQUEST = 34
GEX_MIN_BITS = 2048  # OpenSSH's DH_GRP_MIN


def _patch_gex_minimum(handlers: dict) -> None:
    process_request = handlers[_GEX_REQUEST]

    def patched(self, pkttype: int, pktid: int, packet: Any) -> None:
        if not self._conn.is_server():
            return process_request(self, pkttype, pktid, packet)
        raw = packet.get_remaining_payload()
        try:
            if pkttype == _GEX_REQUEST_OLD:
                sizes = [int.from_bytes(raw[0:4], "big")]
            else:
                sizes = [int.from_bytes(raw[i:i + 4], "big") for i in (0, 4, 8)]
        except ValueError:
            return process_request(self, pkttype, pktid, packet)
        if len(raw) != 4 * len(sizes):
            return process_request(self, pkttype, pktid, packet)  # asyncssh reports it
        if len(sizes) == 3 and sizes[2] < GEX_MIN_BITS:
            raise asyncssh.KeyExchangeFailed(f"group exchange asked for at most {sizes[2]} bits; "
                                             f"the minimum is {GEX_MIN_BITS}")
        preferred = 0 if len(sizes) == 1 else 1
        if sizes[preferred] >= GEX_MIN_BITS:
            return process_request(self, pkttype, pktid, packet)
        sizes[preferred] = GEX_MIN_BITS
        clamped = b"".join(n.to_bytes(4, "big") for n in sizes)
        result = process_request(self, pkttype, pktid, _packet.SSHPacket(clamped))
        # The exchange hash covers what the client sent, not our clamped copy.
        self._gex_data = raw + self._gex_data[len(clamped):]
        return result

    handlers[_GEX_REQUEST_OLD] = patched
    handlers[_GEX_REQUEST] = patched


def _transport_pause(self: Any) -> None:
    hooks = getattr(self, "_fg_transport_hooks", None)
    if hooks is not None:
        hooks[0]()


def _transport_resume(self: Any) -> None:
    hooks = getattr(self, "_fg_transport_hooks", None)
    if hooks is not None:
        hooks[1]()


def watch_transport(conn: asyncssh.SSHServerConnection, pause: Callable[[], None],
                    resume: Callable[[], None]) -> None:
    """Be told when the user's TCP connection stops taking data, and when it takes it again.

    asyncssh ignores asyncio's pause_writing() (2.24: "Do nothing with this for now"): a
    client that advertises a 2 GiB window and never reads its socket made the gateway
    buffer everything the machine sent, gigabytes in seconds. With this, the front stops
    reading the machines' side of that connection until the socket drains.
    """
    C = _connection.SSHConnection
    if C.pause_writing is not _transport_pause:
        C.pause_writing = _transport_pause
        C.resume_writing = _transport_resume
    conn._fg_transport_hooks = (pause, resume)  # noqa: SLF001


async def create_remote_listener(conn: asyncssh.SSHClientConnection, session_factory: Any, listen_host: str,
                                 listen_port: int, window: int, max_pktsize: int) -> Any:
    """`-R` on the machine: like conn.create_server(), but ready before the machine listens.

    asyncssh registers a remote listener only once the machine has answered the
    tcpip-forward request, while the machine's sshd listens before it answers: a connection
    arriving in between was refused ("No such listener") and reset. OpenSSH's client
    registers first; so does this, for a fixed port (a dynamic port is unknown until the
    answer, and nobody can connect to it before then either).
    """
    if not listen_port:
        return await conn.create_server(session_factory, listen_host, listen_port, window=window,
                                        max_pktsize=max_pktsize)
    host = listen_host.lower()
    key = (host, listen_port)
    listeners = conn._remote_listeners  # noqa: SLF001
    if key in listeners:
        raise asyncssh.ChannelListenError("Failed to create remote TCP listener")
    listener = _listener.SSHTCPClientListener(conn, session_factory, host, listen_port, None, "strict", window,
                                              max_pktsize)
    listeners[key] = listener
    try:
        pkttype, packet = await conn._make_global_request(b"tcpip-forward", String(host),  # noqa: SLF001
                                                          UInt32(listen_port))
    except BaseException:
        listeners.pop(key, None)
        raise
    if pkttype != MSG_REQUEST_SUCCESS:
        listeners.pop(key, None)
        raise asyncssh.ChannelListenError("Failed to create remote TCP listener")
    return listener


# -- sntrup761x25519-sha512 without liboqs ----------------------------------------------
#
# OpenSSH 9.0–9.8 clients prefer sntrup761x25519-sha512 (9.9+ prefer mlkem768x25519, which
# asyncssh does with `cryptography`). asyncssh does sntrup761 only through liboqs, which
# Debian 12 does not ship; so a client that allows nothing else was refused although its own
# sshd accepts it. pqcrypto (PyPI, PQClean's reference sntrup761) provides the KEM; asyncssh's
# own hybrid handler does the rest, exactly as it would with liboqs.

_SNTRUP_SIZES = (1158, 1763, 1039, 32)  # public key, private key, ciphertext, shared secret


class _PQCleanSntrup761:
    """asyncssh's PQ key protocol over pqcrypto.kem.sntrup_761; the key pair only when asked
    for (a server only encapsulates, so pre-authentication work stays one encaps)."""

    pubkey_bytes, privkey_bytes, ciphertext_bytes, secret_bytes = _SNTRUP_SIZES

    def __init__(self, alg_name: bytes) -> None:
        from pqcrypto.kem import sntrup_761

        self._kem = sntrup_761
        self._pair: tuple[bytes, bytes] | None = None

    def _keys(self) -> tuple[bytes, bytes]:
        if self._pair is None:
            self._pair = self._kem.keygen()
        return self._pair

    def get_public(self) -> bytes:
        return self._keys()[0]

    def encaps(self, peer_public: bytes) -> tuple[bytes, bytes]:
        if len(peer_public) != self.pubkey_bytes:
            raise ValueError("Invalid public key")
        ciphertext, secret = self._kem.encaps(peer_public)
        return secret, ciphertext

    def decaps(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_bytes:
            raise ValueError("Invalid ciphertext")
        return self._kem.decaps(self._keys()[1], ciphertext)


def register_sntrup761() -> bool:
    """Offer sntrup761x25519-sha512 (both names) where asyncssh has no liboqs; True if available."""
    names = (b"sntrup761x25519-sha512", b"sntrup761x25519-sha512@openssh.com")
    if all(n in _kex.get_kex_algs() for n in names):
        return True
    try:
        from pqcrypto.kem import sntrup_761
    except ImportError:
        return False
    sizes = (sntrup_761.PUBLIC_KEY_SIZE, sntrup_761.SECRET_KEY_SIZE, sntrup_761.CIPHERTEXT_SIZE,
             sntrup_761.SHARED_SECRET_SIZE)
    hybrid = getattr(_kex_dh, "_KexHybridECDH", None)
    curve = getattr(_kex_dh, "Curve25519DH", None)
    if sizes != _SNTRUP_SIZES or hybrid is None or curve is None or not _kex_dh.curve25519_available:
        log.warning("sntrup761 key exchange not offered: pqcrypto or asyncssh %s are not as tested",
                    asyncssh.__version__)
        return False
    from hashlib import sha512

    for name in names:
        if name not in _kex.get_kex_algs():
            _kex.register_kex_alg(name, hybrid, sha512, (_PQCleanSntrup761, b"sntrup761", curve), True)
    return True


register_sntrup761()


# -- fast path: AES-GCM packets, and data between two relayed channels ----------------------
#
# Why: at ~32 KiB per SSH packet, the relay's cost per byte is asyncssh's per-packet work,
# paid twice (one packet in, one out). Measured per packet (docs/benchmarks.md): a new
# AESGCM object (its key schedule) for every packet in each direction, about a dozen copies
# of the payload (the input buffer re-sliced after the header and again after the packet,
# header + body + tag concatenated twice, payload → string → bytearray → string), and five
# Python layers from the packet to the other channel's send. The fast path keeps one AESGCM
# per key, decrypts straight out of the input buffer, and hands a CHANNEL_DATA payload from
# one channel of a pair to the other's connection as one packet; anything unusual (another
# cipher, compression, a rekey due, a paused or closing channel, a window too small for the
# whole packet, debug packet logging) takes asyncssh's own path, unchanged.

from asyncssh import channel as _channel  # noqa: E402
from asyncssh import encryption as _encryption  # noqa: E402
from asyncssh.crypto import cipher as _cipher_mod  # noqa: E402
from asyncssh.constants import (MSG_CHANNEL_DATA, MSG_CHANNEL_FIRST, MSG_CHANNEL_LAST,  # noqa: E402
                                MSG_CHANNEL_WINDOW_ADJUST, MSG_KEX_FIRST, MSG_KEX_LAST, MSG_UNIMPLEMENTED,
                                MSG_USERAUTH_FIRST, MSG_USERAUTH_LAST, MSG_DEBUG)
from asyncssh.misc import CompressionError, MACError, ProtocolError  # noqa: E402
from cryptography.exceptions import InvalidTag  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
import inspect as _inspect  # noqa: E402
import functools as _functools  # noqa: E402
import os as _os  # noqa: E402
import time as _time  # noqa: E402
from collections import OrderedDict  # noqa: E402

_fast_applied = False


def apply_fast_path() -> bool:
    """Install the AES-GCM and paired-channel fast path once (after apply_relay_tuning)."""
    global _fast_applied
    if _fast_applied:
        return True
    if not _applied or logging.getLogger("asyncssh").isEnabledFor(logging.DEBUG):
        return False  # untested asyncssh, or someone reads asyncssh's packet log: stock path
    _fast_gcm(_cipher_mod.GCMCipher)
    C = _connection.SSHConnection
    _fast_send(C)
    _fast_recv(C)
    _channel.SSHChannel._fg_to = None
    _fast_applied = True
    return True


class _AeadCache:
    """AESGCM objects (a key schedule and an OpenSSL context, ~2.3 KiB each) for the keys in
    use, least recently used first out: a busy connection keeps its two, an idle one costs
    nothing (four per relayed session would be ~9 KiB of each idle session's memory)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._aeads: OrderedDict[bytes, AESGCM] = OrderedDict()

    def get(self, key: bytes) -> AESGCM:
        aeads = self._aeads
        aead = aeads.get(key)
        if aead is None:
            aead = aeads[key] = AESGCM(key)
            if len(aeads) > self.size:
                aeads.popitem(last=False)
        else:
            aeads.move_to_end(key)
        return aead


_AEADS = _AeadCache(1024)


def _fast_gcm(G: type) -> None:
    init = G.__init__

    def __init__(self, cipher_name, key, iv):
        init(self, cipher_name, key, iv)
        self._fg_fixed = iv[:4]
        self._fg_counter = int.from_bytes(iv[4:], "big")

    def update_iv(self):  # RFC 5647 7.1: the invocation counter, kept as an int
        self._fg_counter = counter = (self._fg_counter + 1) & 0xffffffffffffffff
        self._iv = self._fg_fixed + counter.to_bytes(8, "big")

    def encrypt_and_sign(self, header, data):
        out = _AEADS.get(self._key).encrypt(self._iv, data, header)
        self._update_iv()
        return header + out[:-16], out[-16:]

    def verify_and_decrypt(self, header, data, mac):
        try:
            out = _AEADS.get(self._key).decrypt(self._iv, data + mac, header)
        except InvalidTag:
            out = None
        self._update_iv()
        return out

    G.__init__ = __init__
    G._update_iv = update_iv
    G.encrypt_and_sign = encrypt_and_sign
    G.verify_and_decrypt = verify_and_decrypt


def _fast_send(C: type) -> None:
    send_packet = C.send_packet
    GCM = _encryption.GCMEncryption
    padding = _Padding()
    aeads = _AEADS
    monotonic = _time.monotonic

    def patched(self, pkttype, *args, handler=None):
        enc = self._send_encryption
        if (pkttype > MSG_USERAUTH_LAST and enc.__class__ is GCM and self._kex_complete and self._auth_complete
                and self._compressor is None and self._rekey_bytes_sent < self._rekey_bytes
                and not (self._rekey_seconds and monotonic() >= self._rekey_time)):
            n = 1
            for a in args:
                n += len(a)
            bs = self._send_blocksize
            padlen = -(self._send_enchdrlen + n) % bs
            if padlen < 4:
                padlen += bs
            pktlen = 1 + n + padlen
            hdr = pktlen.to_bytes(4, "big")
            cipher = enc._cipher
            out = aeads.get(cipher._key).encrypt(cipher._iv, b"".join((bytes((padlen, pkttype)), *args, padding.take(padlen))),
                                          hdr)
            cipher._update_iv()
            self._send(hdr + out)
            self._send_seq = (self._send_seq + 1) & 0xffffffff
            self._rekey_bytes_sent += pktlen
            return
        send_packet(self, pkttype, *args, handler=handler)

    C.send_packet = patched


class _Padding:
    """Random padding bytes cut from a pool refilled from os.urandom, not a getrandom()
    call per packet (4-19 bytes each; under AES-GCM the padding is encrypted, and OpenSSH
    takes it from its arc4random stream in the same way)."""

    SIZE = 65536

    def __init__(self) -> None:
        self._pool = _os.urandom(self.SIZE)
        self._at = 0

    def take(self, n: int) -> bytes:
        at = self._at
        if at + n > self.SIZE:
            self._pool = _os.urandom(self.SIZE)
            at = 0
        self._at = at + n
        return self._pool[at:at + n]


def _fast_recv(C: type) -> None:
    recv_pkthdr = C._recv_pkthdr
    recv_packet = C._recv_packet
    aeads = _AEADS
    GCM = _encryption.GCMEncryption
    SSHPacket = _packet.SSHPacket
    C._fg_inplace = False

    def pkthdr(self):
        if self._recv_encryption.__class__ is not GCM:
            return recv_pkthdr(self)
        inp = self._inpbuf
        if len(inp) < self._recv_blocksize:
            return False
        pktlen = int.from_bytes(inp[:4], "big")  # GCM leaves the length in clear (it is the AAD)
        if pktlen > self._max_recv_pktlen:
            raise ProtocolError("Max packet size exceeded")
        self._pktlen = pktlen
        self._fg_inplace = True  # the header stays in _inpbuf: no copy of the rest of the buffer
        self._recv_handler = self._recv_packet
        return True

    def packet(self):
        if not self._fg_inplace:
            return recv_packet(self)
        inp = self._inpbuf
        end = 4 + self._pktlen + self._recv_macsize
        if len(inp) < end:
            return False
        cipher = self._recv_encryption._cipher
        seq = self._recv_seq
        try:
            data = aeads.get(cipher._key).decrypt(cipher._iv, memoryview(inp)[4:end], inp[:4])
        except InvalidTag:
            raise MACError("MAC verification failed") from None
        cipher._update_iv()
        self._inpbuf = inp[end:]
        self._packet = b""
        self._fg_inplace = False
        pad = data[0]
        if (len(data) > 10 and data[1] == MSG_CHANNEL_DATA and self._auth_complete and not self._decompressor
                and _forward(self, data, len(data) - pad)):
            self._finish_recv_packet(MSG_CHANNEL_DATA, seq)
            return True
        return _dispatch(self, seq, data[1:-pad], SSHPacket)

    C._recv_pkthdr = pkthdr
    C._recv_packet = packet


def _forward(conn: Any, data: bytes, end: int) -> bool:
    """CHANNEL_DATA for one channel of a relayed pair, sent on as one packet on the other's
    connection; False (nothing done) whenever asyncssh's own path has to decide."""
    if end < 10:
        return False
    chan = conn._channels.get(int.from_bytes(data[2:6], "big"))
    if chan is None:
        return False
    peer = chan._fg_to
    if peer is None:
        return False
    n = int.from_bytes(data[6:10], "big")
    if (10 + n != end or not n or chan._recv_state != "open" or n > chan._recv_window or chan._recv_paused
            or chan._recv_buf or chan._send_state in ("close_pending", "closed") or peer._send_state != "open"
            or peer._send_buf or peer._send_window < n or n > peer._send_pktsize or not chan._fg_gate()):
        return False
    window = chan._recv_window - n
    if window < chan._init_recv_window / 2:
        chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, UInt32(chan._init_recv_window - window))
        window = chan._init_recv_window
    chan._recv_window = window
    peer._send_window -= n
    peer._conn.send_packet(MSG_CHANNEL_DATA, UInt32(peer._send_chan), UInt32(n), memoryview(data)[10:end])
    chan._fg_count(n)
    return True


def _dispatch(self: Any, seq: int, orig_payload: bytes, SSHPacket: type) -> bool:
    """The rest of asyncssh 2.24's SSHConnection._recv_packet, after decryption (unchanged)."""
    if self._decompressor and (self._auth_complete or not self._decompress_after_auth):
        payload = self._decompressor.decompress(orig_payload)
        if payload is None:
            raise CompressionError("Decompression failed")
    else:
        payload = orig_payload
    packet = SSHPacket(payload)
    pkttype = packet.get_byte()
    handler = self
    skip_reason = ""
    exc_reason = ""
    if MSG_KEX_FIRST <= pkttype <= MSG_KEX_LAST:
        if self._kex:
            if self._ignore_first_kex:  # pragma: no cover
                skip_reason = "ignored first kex"
                self._ignore_first_kex = False
            else:
                handler = self._kex
        else:
            skip_reason = "kex not in progress"
            exc_reason = "Key exchange not in progress"
    elif self._strict_kex and not self._recv_encryption and MSG_IGNORE <= pkttype <= MSG_DEBUG:
        skip_reason = "strict kex violation"
        exc_reason = f"Strict key exchange violation: unexpected packet type {pkttype} received"
    elif MSG_USERAUTH_FIRST <= pkttype <= MSG_USERAUTH_LAST:
        if self._auth:
            handler = self._auth
        else:
            skip_reason = "auth not in progress"
            exc_reason = "Authentication not in progress"
    elif pkttype > MSG_KEX_LAST and not self._recv_encryption:
        skip_reason = "invalid request before kex complete"
        exc_reason = "Invalid request before key exchange was complete"
    elif pkttype > MSG_USERAUTH_LAST and not self._auth_complete:
        skip_reason = "invalid request before auth complete"
        exc_reason = "Invalid request before authentication was complete"
    elif MSG_CHANNEL_FIRST <= pkttype <= MSG_CHANNEL_LAST:
        try:
            recv_chan = packet.get_uint32()
        except _packet.PacketDecodeError:
            skip_reason = "incomplete channel request"
            exc_reason = "Incomplete channel request received"
        else:
            try:
                handler = self._channels[recv_chan]
            except KeyError:
                skip_reason = "invalid channel number"
                exc_reason = f"Invalid channel number {recv_chan} received"
    handler.log_received_packet(pkttype, seq, packet, skip_reason)
    if not skip_reason:
        try:
            result = handler.process_packet(pkttype, seq, packet)
        except _packet.PacketDecodeError as exc:
            raise ProtocolError(str(exc)) from None
        if _inspect.isawaitable(result):
            self._recv_handler = lambda: False
            task = self.create_task(result)
            task.add_done_callback(_functools.partial(self._finish_recv_packet, pkttype, seq, is_async=True))
            return False
        elif not result:
            if self._strict_kex and not self._recv_encryption:
                exc_reason = f"Strict key exchange violation: unexpected packet type {pkttype} received"
            else:
                self.logger.debug1("Unknown packet type %d received", pkttype)
                self.send_packet(MSG_UNIMPLEMENTED, UInt32(seq))
    if exc_reason:
        raise ProtocolError(exc_reason)
    self._finish_recv_packet(pkttype, seq)
    return True


def pair_channels(a: Any, b: Any, gate: Callable[[], bool], count: Callable[[int], None]) -> None:
    """Data arriving on channel `a` may go straight out on channel `b` while gate() says so
    (the relay has nothing queued in between); count(n) is told each payload's size."""
    a._fg_to = b
    a._fg_gate = gate
    a._fg_count = count

