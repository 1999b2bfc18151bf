"""Relays between the user's channels and the machine's.

Why callbacks and not coroutines: the relay is the hot path, and asyncssh's session
callbacks let one data_received() call hand a whole SSH packet's payload to the other
channel's write() with no task switch, no queue and no copy of ours. Flow control is
the transports' own: when one side's send window is full, asyncssh calls pause_writing()
and we stop reading the other side, so memory stays bounded by the channel windows.

Bytes are counted in plain ints and added to the Prometheus counters when a channel
closes, not per packet.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

import asyncssh

from . import internals

if TYPE_CHECKING:
    from .front import FrontConnection

log = logging.getLogger(__name__)


class _Bytes:
    __slots__ = ("up", "down")

    def __init__(self) -> None:
        self.up = 0    # user → machine
        self.down = 0  # machine → user


class SessionRelay(asyncssh.SSHServerSession):
    """One user session channel (shell, exec or subsystem) ↔ one upstream session channel."""

    def __init__(self, owner: "FrontConnection"):
        self._owner = owner
        self._front: asyncssh.SSHServerChannel | None = None
        self._up: asyncssh.SSHClientChannel | None = None
        self._task: asyncio.Task | None = None
        self._exit: tuple[Any, ...] | None = None
        self._bytes = _Bytes()
        self._closed = False
        self._up_paused = False
        # Data (and EOF) the user sends before the upstream channel is open; bounded by
        # our channel window, since we send no window adjust while reading is paused.
        self._early: list[bytes] | None = []
        self._early_eof = False

    # -- user side (asyncssh server session callbacks) ------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._front = chan

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        assert self._front is not None
        self._task = asyncio.ensure_future(self._open_upstream())

    async def _open_upstream(self) -> None:
        front = self._front
        assert front is not None
        owner = self._owner
        upstream = owner.upstream
        if upstream is None:
            self._fail("fleetgate: no connection to the machine")
            return
        term_type = front.get_terminal_type()
        kwargs: dict[str, Any] = {
            "command": front.get_command(),
            "subsystem": front.get_subsystem(),
            "env": front.get_environment(),
            "encoding": None,
            "window": owner.gateway.config.gateway.window,
            "max_pktsize": owner.gateway.config.gateway.max_packet,
        }
        if term_type:
            kwargs.update(request_pty="force", term_type=term_type, term_size=front.get_terminal_size(),
                          term_modes=front.get_terminal_modes())
        else:
            kwargs["request_pty"] = False
        internals.set_agent_forward_path(upstream, front.get_agent_path())
        try:
            up, _ = await upstream.create_session(lambda: _UpstreamSession(self), **kwargs)
        except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
            owner.gateway.metrics.channels.labels("session", "refused").inc()
            self._fail(f"fleetgate: {owner.target_machine} refused the session: {exc}")
            return
        owner.gateway.metrics.channels.labels("session", "ok").inc()
        if self._closed:
            up.close()
            return
        self._up = up
        early, self._early = self._early, None
        for data in early or ():
            up.write(data)
        if self._early_eof:
            up.write_eof()
        if self._up_paused:
            up.pause_reading()
        front.resume_reading()

    def notice(self, message: str) -> None:
        """A line from the gateway itself on the user's stderr (e.g. shutdown)."""
        if self._front is not None and not self._closed:
            self._front.write_stderr(("\r\n" + message + "\r\n").encode())

    def _fail(self, message: str) -> None:
        if self._front is not None and not self._closed:
            self._front.write_stderr((message + "\r\n").encode())
            self._front.exit(255)

    def data_received(self, data: bytes, datatype) -> None:
        self._bytes.up += len(data)
        if self._early is None:
            self._up.write(data)  # type: ignore[union-attr]
        else:
            self._early.append(data)
            self._front.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        if self._up is not None:
            self._up.write_eof()
        else:
            self._early_eof = True
        return True

    def pause_writing(self) -> None:
        if self._up is not None:
            self._up.pause_reading()
        self._up_paused = True

    def resume_writing(self) -> None:
        self._up_paused = False
        if self._up is not None:
            self._up.resume_reading()

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._up is not None:
            self._up.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self._up is not None:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is not None:
            self._up.send_break(msec)
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._owner.sessions.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._up is not None:
            self._up.close()
        self._owner.count_bytes("relay", self._bytes)

    # -- machine side (called by _UpstreamSession) ----------------------------------------

    def _upstream_data(self, data: bytes, datatype) -> None:
        self._bytes.down += len(data)
        self._front.write(data, datatype)  # type: ignore[union-attr]

    def _upstream_closed(self) -> None:
        front = self._front
        if front is None or self._closed:
            return
        if self._exit is None:
            front.close()
        elif self._exit[0] == "status":
            front.exit(self._exit[1])
        else:
            front.exit_with_signal(*self._exit[1:])


class _UpstreamSession(asyncssh.SSHClientSession):
    __slots__ = ("_relay",)

    def __init__(self, relay: SessionRelay):
        self._relay = relay

    def data_received(self, data: bytes, datatype) -> None:
        self._relay._upstream_data(data, datatype)

    def eof_received(self) -> bool:
        front = self._relay._front
        if front is not None and not self._relay._closed:
            front.write_eof()
        return True

    def exit_status_received(self, status: int) -> None:
        self._relay._exit = ("status", status)

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._relay._exit = ("signal", signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        if self._relay._front is not None:
            self._relay._front.pause_reading()

    def resume_writing(self) -> None:
        if self._relay._front is not None:
            self._relay._front.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay._upstream_closed()


class Pipe:
    """Two byte-stream ends spliced together: SSH TCP channels or asyncio transports.

    Both expose write/write_eof/pause_reading/resume_reading/close, so one class serves
    -L (user channel ↔ upstream channel), -R (upstream channel ↔ user channel) and jump
    mode (user channel ↔ TCP socket to the machine's SSH port).
    """

    def __init__(self, mode: str, on_done: Callable[["Pipe"], None]):
        self.mode = mode
        self.bytes = _Bytes()
        self.user = _Half(self, "up")       # data arriving from the user goes up
        self.machine = _Half(self, "down")  # data arriving from the machine goes down
        self.user.peer, self.machine.peer = self.machine, self.user
        self._on_done = on_done
        self._lost = 0

    def _made(self) -> None:
        if self.user.end is not None and self.machine.end is not None:
            self.user.end.resume_reading()
            self.machine.end.resume_reading()

    def _half_lost(self, half: "_Half") -> None:
        self._lost += 1
        other = half.peer
        if other.end is not None and not other.closed:
            other.closed = True
            other.end.close()
        if self._lost == 1:
            self._on_done(self)

    def abort(self) -> None:
        for half in (self.user, self.machine):
            if half.end is not None and not half.closed:
                half.closed = True
                half.end.close()


class _Half(asyncssh.SSHTCPSession, asyncio.Protocol):
    def __init__(self, pipe: Pipe, direction: str):
        self.pipe = pipe
        self.direction = direction
        self.end: Any = None
        self.peer: "_Half" = self
        self.closed = False
        self.eof = False

    def connection_made(self, end: Any) -> None:
        self.end = end
        end.pause_reading()
        self.pipe._made()

    def data_received(self, data: bytes, datatype=None) -> None:
        if self.direction == "up":
            self.pipe.bytes.up += len(data)
        else:
            self.pipe.bytes.down += len(data)
        self.peer.end.write(data)

    def eof_received(self) -> bool:
        """Pass the half-close on; once both directions have ended, close both ends
        (neither an SSH channel nor a socket closes itself after a two-way EOF)."""
        self.eof = True
        peer_end = self.peer.end
        if peer_end is not None and not self.peer.closed:
            try:
                peer_end.write_eof()
            except (OSError, RuntimeError):
                pass
        if self.peer.eof:
            for half in (self, self.peer):
                if half.end is not None and not half.closed:
                    half.closed = True
                    half.end.close()
        return True

    def pause_writing(self) -> None:
        if self.peer.end is not None:
            self.peer.end.pause_reading()

    def resume_writing(self) -> None:
        if self.peer.end is not None:
            self.peer.end.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pipe._half_lost(self)
