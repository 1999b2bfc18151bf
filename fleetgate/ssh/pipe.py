"""Two byte streams spliced together: -L, -R and jump channels.

Both ends expose write/write_eof/pause_reading/resume_reading/close (an SSH TCP
channel or an asyncio transport), so one class serves -L (user channel ↔ upstream
channel), -R (upstream channel ↔ user channel) and jump mode (user channel ↔ TCP
socket to the machine's SSH port). Flow control is the ends' own: when one end cannot
take more, we stop reading the other.

Why jump writes to the machine's socket are batched: asyncssh hands over each SSH packet
(at most 32 KiB from OpenSSH) as it decrypts one read from the user's socket, often a
dozen packets per read. Written one by one, each is a send() and, worse, a wakeup of the
machine's sshd for a small segment (its CPU per GiB rose by 70 % over a direct login).
Joined until asyncssh has handled the whole read (one loop callback later), it is one
send() per read. Writes into an SSH channel need no such thing: asyncssh's writes made
while it handles a read are already joined per connection (internals.apply_relay_tuning).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import asyncssh

from .relay import Bytes


class Pipe:
    """Two byte-stream ends spliced together: SSH TCP channels or asyncio transports.

    Both expose write/write_eof/pause_reading/resume_reading/close, so one class serves
    -L (user channel ↔ upstream channel), -R (upstream channel ↔ user channel) and jump
    mode (user channel ↔ TCP socket to the machine's SSH port).
    """

    def __init__(self, mode: str, on_done: Callable[["Pipe"], None], batch_machine: bool = False,
                 budget: Any = None):
        self.mode = mode
        # What the channel took from the budgets (fleetgate/budget.py), given back when the first
        # side goes; the owner's connection gives back whatever is left when it ends.
        self.budget = budget
        self.bytes = Bytes()
        self.user = _Half(self, "up")       # data arriving from the user goes up
        self.machine = _Half(self, "down")  # data arriving from the machine goes down
        # Writes to the machine's end joined per loop pass (a socket: jump mode; see above).
        self.machine.batched = batch_machine
        self.user.peer, self.machine.peer = self.machine, self.user
        self.on_done = on_done
        self._lost = 0

    def _made(self) -> None:
        if self.user.end is not None and self.machine.end is not None:
            self.user.resume("start")
            self.machine.resume("start")

    def transport_paused(self, paused: bool) -> None:
        """The user's TCP connection stopped (or resumed) taking data: stop reading the machine."""
        if paused:
            self.machine.pause("transport")
        else:
            self.machine.resume("transport")

    def _half_lost(self, half: "_Half") -> None:
        self._lost += 1
        other = half.peer
        if other.end is not None and not other.closed:
            other.flush()  # what the lost side sent before it went still goes (close() drains it)
            other.closed = True
            other.end.close()
        if self._lost == 1:
            if self.budget is not None:
                self.budget.close()
            self.on_done(self)

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
        self.pauses: set[str] = {"start"}  # why this end is not read: start, peer (its buffer), transport
        self.batched = False  # writes to this end wait in `pending` until flush() (see module doc)
        self.pending: list[bytes] = []

    def pause(self, why: str) -> None:
        self.pauses.add(why)
        if self.end is not None:
            self.end.pause_reading()

    def resume(self, why: str) -> None:
        self.pauses.discard(why)
        if not self.pauses and self.end is not None:
            self.end.resume_reading()

    def connection_made(self, end: Any) -> None:
        self.end = end
        end.pause_reading()
        self.pipe._made()

    def data_received(self, data: bytes, datatype=None) -> None:
        if self.direction == "up":
            self.pipe.bytes.up += len(data)
        else:
            self.pipe.bytes.down += len(data)
        peer = self.peer
        if peer.batched:
            pending = peer.pending
            pending.append(data)
            if len(pending) == 1:
                asyncio.get_running_loop().call_soon(peer.flush)
            return
        peer.end.write(data)

    def flush(self) -> None:
        """Write what waited for the end of the read it came in (batched ends only)."""
        pending = self.pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if self.end is not None and not self.closed:
            self.end.write(data)

    def eof_received(self) -> bool:
        """Pass the half-close on; once both directions have ended, close both ends
        (neither an SSH channel nor a socket closes itself after a two-way EOF)."""
        self.eof = True
        peer_end = self.peer.end
        self.peer.flush()  # the data before the EOF goes first
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
        self.peer.pause("peer")

    def resume_writing(self) -> None:
        self.peer.resume("peer")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        self.pipe._half_lost(self)
