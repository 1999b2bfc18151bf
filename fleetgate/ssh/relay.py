"""One user session channel (shell, exec, subsystem) relayed to one channel on the machine.

Why callbacks and not coroutines: the relay is the hot path, and asyncssh's session
callbacks let one data_received() call hand a whole SSH packet's payload to the other
channel's write() with no task switch, no queue and no copy of ours.

Why an outbox: what the machine sends on a channel (data, exit-status or exit-signal,
EOF, CLOSE) must reach the user in the same order. asyncssh queues data behind the
user's channel window but sends requests at once, and its public exit() also closes
the channel; so control messages wait in the outbox until the user's side has sent
every byte before them, and data that arrives after one waits behind it. OpenSSH's
ControlMaster closes a channel as soon as it has seen EOF both ways: an exit status
held back until CLOSE was lost there (exit 255, no message).

Flow control is the transports' own: when the user's side stops taking data, asyncssh
calls pause_writing() and we stop reading the machine's side, so what the gateway
buffers per channel is bounded by its own window and buffer limits, not the client's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import asyncssh

from . import internals

log = logging.getLogger(__name__)

EXIT_LOST = 255  # what OpenSSH's client reports when the connection to the server is lost


class Bytes:
    """Bytes relayed in each direction, in plain ints: the hot path adds, nothing else.

    The counters are fed from here at each /metrics scrape and when the channel ends
    (take()), so a long session shows its traffic as it flows, not as one spike at the end,
    and no Prometheus call runs per packet."""

    __slots__ = ("up", "down", "_taken_up", "_taken_down")

    def __init__(self) -> None:
        self.up = 0    # user → machine
        self.down = 0  # machine → user
        self._taken_up = 0
        self._taken_down = 0

    def take(self) -> tuple[int, int]:
        """What was relayed since the last take()."""
        up, down = self.up - self._taken_up, self.down - self._taken_down
        self._taken_up, self._taken_down = self.up, self.down
        return up, down


class RelayOwner(Protocol):
    """What a session relay needs from the connection that owns it."""

    upstream: Any
    window: int
    max_packet: int
    machine: str

    def spawn(self, coro_fn: Callable[[], Any]) -> Any: ...
    def session_closed(self, relay: "SessionRelay") -> None: ...
    def session_ended(self, relay: "SessionRelay") -> None: ...
    def channel_result(self, kind: str, result: str) -> None: ...
    def ended_reason(self) -> str: ...


class AnySession(asyncssh.SSHServerSession):
    """A session that takes whatever the user asks for (pty, shell, exec, subsystem): the
    machine, not the gateway, decides what it runs."""

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True


class _Unbudgeted:
    """A relay made without a budget hold (tests with fake owners): the owner's window, nothing to give back."""

    window = 0

    def close(self) -> None:
        pass


class SessionRelay(AnySession):
    """The user's session channel (asyncssh server session callbacks) and its relay state."""

    def __init__(self, owner: RelayOwner, budget: Any = None):
        self._owner = owner
        # What this channel took from the budgets (fleetgate/budget.py): its window, given back
        # by the owner when the channel ends (session_ended).
        self.budget = budget if budget is not None else _Unbudgeted()
        self._front: asyncssh.SSHServerChannel | None = None
        self._up: asyncssh.SSHClientChannel | None = None
        self._task: Any = None
        self.bytes = Bytes()
        self._closed = False
        # Why the machine's side is not read: "channel" (the user's channel buffer is full) and/or
        # "transport" (the user's TCP socket is); read again once there is no reason left.
        self._pauses: set[str] = set()
        self._exited = False      # an exit status or signal went to the user
        self._peer_closed = False  # the user sent CLOSE; we answer once the machine's side closed
        # Data (and EOF) the user sends before the upstream channel is open; bounded by
        # our channel window, since we send no window adjust while reading is paused.
        self._early: list[bytes] | None = []
        self._early_eof = False
        # Machine → user, in order, once a control message has to wait (see module doc).
        self._outbox: list[tuple] = []
        self._held: list[tuple] = []  # control messages behind data asyncssh still holds

    # -- user side ------------------------------------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self._front = chan

    def session_started(self) -> None:
        self._task = self._owner.spawn(self._open_upstream)

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
            "window": self.budget.window or owner.window,
            "max_pktsize": owner.max_packet,
        }
        if term_type:
            kwargs.update(request_pty="force", term_type=term_type, term_size=front.get_terminal_size(),
                          term_modes=front.get_terminal_modes())
        else:
            kwargs["request_pty"] = False
        internals.set_agent_forward_path(upstream, front.get_agent_path())
        try:
            up, _ = await upstream.create_session(lambda: UpstreamSession(self), **kwargs)
        except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
            owner.channel_result("session", "refused")
            self._fail(f"fleetgate: {owner.machine} refused the session: {exc}")
            return
        owner.channel_result("session", "ok")
        if self._closed:
            up.close()
            return
        self._up = up
        early, self._early = self._early, None
        for data in early or ():
            up.write(data)
        if self._early_eof:
            up.write_eof()
        if self._pauses:
            up.pause_reading()
        # Steady state: each data packet goes from one channel straight to the other (internals).
        internals.pair_channels(up, front, self._may_forward_down, self._count_down)
        internals.pair_channels(front, up, self._may_forward_up, self._count_up)
        front.resume_reading()

    def _may_forward_down(self) -> bool:
        return not (self._closed or self._peer_closed or self._outbox or self._held)

    def _may_forward_up(self) -> bool:
        return not self._closed

    def _count_down(self, n: int) -> None:
        self.bytes.down += n

    def _count_up(self, n: int) -> None:
        self.bytes.up += n

    def notice(self, message: str) -> None:
        """A line from the gateway itself on the user's stderr (e.g. shutdown)."""
        if self._front is not None and not self._closed:
            self._front.write_stderr(("\r\n" + message + "\r\n").encode())

    def _fail(self, message: str) -> None:
        if self._front is not None and not self._closed:
            self._front.write_stderr((message + "\r\n").encode())
            self._front.exit(EXIT_LOST)

    def data_received(self, data: bytes, datatype) -> None:
        self.bytes.up += len(data)
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
        self._pause("channel")

    def resume_writing(self) -> None:
        if self._outbox:
            self._drain_outbox()
            if self._outbox:
                return  # still waiting for the user's side; stay paused
            self._front.set_write_buffer_limits()  # type: ignore[union-attr]
        self._resume("channel")

    def transport_paused(self, paused: bool) -> None:
        """The user's TCP connection stopped (or resumed) taking data: every channel on it waits."""
        if paused:
            self._pause("transport")
        else:
            self._resume("transport")

    def _pause(self, why: str) -> None:
        self._pauses.add(why)
        if self._up is not None:
            self._up.pause_reading()

    def _resume(self, why: str) -> None:
        self._pauses.discard(why)
        if self._pauses:
            return
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

    def close_received(self) -> None:
        """The user's CLOSE arrived: this session no longer counts against limits.max_sessions
        (sshd frees it at once too; a client may open the next one in the same packet chunk)."""
        self._owner.session_closed(self)

    def peer_closed(self) -> None:
        """The user closed the channel first: close the machine's side, then pass on what it
        still sends (its exit status) before our CLOSE, as sshd does; data no longer goes."""
        self._peer_closed = True
        self._outbox = [m for m in self._outbox if m[0] != "data"]
        if self._up is not None:
            self._up.close()
        else:
            self._front.close()  # type: ignore[union-attr]
        if self._outbox:
            self._drain_outbox()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._outbox.clear()
        self._held.clear()
        if self._task is not None:
            self._task.cancel()
        if self._up is not None:
            self._up.close()
        self._owner.session_ended(self)

    # -- machine side, in the order the machine sent it ------------------------------------

    def to_user_data(self, data: bytes, datatype) -> None:
        self.bytes.down += len(data)
        if self._closed or self._peer_closed:
            return
        if self._outbox:
            self._outbox.append(("data", data, datatype))
        else:
            self._front.write(data, datatype)  # type: ignore[union-attr]
        if self._held and not internals.has_unread_data(self._up):  # type: ignore[arg-type]
            held, self._held = self._held, []
            for message in held:
                self._to_user_control(message)

    def to_user_control(self, message: tuple) -> None:
        """exit / signal / eof / close from the machine's channel."""
        if self._closed:
            return
        if self._held or (self._up is not None and self._pauses and internals.has_unread_data(self._up)):
            self._held.append(message)  # data the machine sent before it is still in asyncssh's buffer
            return
        self._to_user_control(message)

    def _to_user_control(self, message: tuple) -> None:
        front = self._front
        assert front is not None
        if self._outbox or front.get_write_buffer_size():
            self._outbox.append(message)
            # Be told (resume_writing) when the user's side has sent everything before it.
            front.set_write_buffer_limits(high=0, low=0)
        else:
            self._send_control(message)

    def _drain_outbox(self) -> None:
        front = self._front
        assert front is not None
        while self._outbox:
            message = self._outbox[0]
            if message[0] == "data":
                front.write(message[1], message[2])
            elif front.get_write_buffer_size():
                return
            else:
                self._send_control(message)
            self._outbox.pop(0)

    def _send_control(self, message: tuple) -> None:
        front = self._front
        assert front is not None
        kind = message[0]
        if kind == "exit":
            self._exited = True
            internals.send_exit_status(front, message[1])
        elif kind == "signal":
            self._exited = True
            internals.send_exit_signal(front, *message[1:])
        elif kind == "eof":
            front.write_eof()
        else:  # close
            lost = message[1]
            if not self._exited and lost is not None:
                # The machine went away under the session: say why, like sshd's clients expect
                # a reason on stderr, and exit non-zero.
                front.write_stderr(("\r\n" + self._owner.ended_reason() + "\r\n").encode())
                internals.send_exit_status(front, EXIT_LOST)
            front.close()


class UpstreamSession(asyncssh.SSHClientSession):
    """The machine's session channel: hands each message to the relay, in arrival order."""

    __slots__ = ("_relay",)

    def __init__(self, relay: SessionRelay):
        self._relay = relay

    def data_received(self, data: bytes, datatype) -> None:
        self._relay.to_user_data(data, datatype)

    def eof_received(self) -> bool:
        self._relay.to_user_control(("eof",))
        return True

    def exit_status_received(self, status: int) -> None:
        self._relay.to_user_control(("exit", status))

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._relay.to_user_control(("signal", signal, core_dumped, msg, lang))

    def pause_writing(self) -> None:
        if self._relay._front is not None:
            self._relay._front.pause_reading()

    def resume_writing(self) -> None:
        if self._relay._front is not None:
            self._relay._front.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.to_user_control(("close", exc))
