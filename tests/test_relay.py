"""The session relay's ordering and flow control, without sockets: fake channels on both sides.

What the machine sends on a channel (data, exit-status, EOF, CLOSE) must reach the user in
the same order, whatever the user's side does in between (a full window, a CLOSE of its own).
"""

from __future__ import annotations

import pytest

from fleetgate.ssh import internals, relay as relay_mod
from fleetgate.ssh.relay import SessionRelay, UpstreamSession


class FrontChannel:
    """The user's channel: records what the relay sends, in order; `buffered` is asyncssh's send buffer."""

    def __init__(self, log: list):
        self.log = log
        self.buffered = 0
        self.limits: tuple | None = None
        self.reading = True

    def write(self, data, datatype=None):
        self.log.append(("data", data))

    def write_stderr(self, data):
        self.log.append(("stderr", data))

    def write_eof(self):
        self.log.append(("eof",))

    def exit(self, status):
        self.log.append(("exit", status))
        self.log.append(("close",))

    def close(self):
        self.log.append(("close",))

    def get_write_buffer_size(self):
        return self.buffered

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


class UpChannel:
    def __init__(self):
        self.reading = True
        self.unread = False
        self.closed = False
        self.sent: list = []

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def close(self):
        self.closed = True

    def write(self, data):
        self.sent.append(data)

    def write_eof(self):
        self.sent.append(None)


class Owner:
    upstream = None
    window = 1 << 20
    max_packet = 1 << 15
    machine = "box1"

    def __init__(self):
        self.ended: list = []

    def spawn(self, fn):
        return None

    def session_closed(self, relay):
        pass

    def session_ended(self, relay):
        self.ended.append(relay)

    def channel_result(self, kind, result):
        pass

    def ended_reason(self):
        return "fleetgate: box1 was stopped"


@pytest.fixture
def wired(monkeypatch):
    log: list = []
    monkeypatch.setattr(internals, "send_exit_status", lambda chan, status: log.append(("exit", status)))
    monkeypatch.setattr(internals, "send_exit_signal", lambda chan, *a: log.append(("signal", a[0])))
    up = UpChannel()
    monkeypatch.setattr(internals, "has_unread_data", lambda chan: chan.unread)
    owner = Owner()
    relay = SessionRelay(owner)
    front = FrontChannel(log)
    relay.connection_made(front)
    relay._up, relay._early = up, None
    return relay, UpstreamSession(relay), front, up, log


def test_eof_exit_close_pass_in_order(wired):
    relay, machine, front, up, log = wired
    machine.data_received(b"out", None)
    machine.eof_received()
    machine.exit_status_received(3)
    machine.connection_lost(None)
    assert log == [("data", b"out"), ("eof",), ("exit", 3), ("close",)]


def test_exit_waits_for_data_the_user_has_not_taken_and_later_data_waits_behind_it(wired):
    relay, machine, front, up, log = wired
    machine.data_received(b"a", None)
    front.buffered = 100  # the user's window is full: "a" still sits in asyncssh's buffer
    machine.exit_status_received(0)
    machine.data_received(b"b", None)
    machine.eof_received()
    machine.connection_lost(None)
    assert log == [("data", b"a")]
    assert front.limits == (0, 0)  # asks to be told when the buffer is empty
    relay.pause_writing()
    assert not up.reading
    front.buffered = 0
    relay.resume_writing()
    assert log == [("data", b"a"), ("exit", 0), ("data", b"b"), ("eof",), ("close",)]
    assert front.limits == (None, None) and up.reading


def test_exit_waits_behind_data_asyncssh_holds_on_a_paused_machine_channel(wired):
    relay, machine, front, up, log = wired
    relay.pause_writing()
    up.unread = True  # the machine sent data before its exit status; asyncssh holds it while paused
    machine.exit_status_received(1)
    machine.eof_received()
    assert log == []
    up.unread = False
    machine.data_received(b"last", None)  # delivered on resume, before the held messages
    assert log == [("data", b"last"), ("exit", 1), ("eof",)]


def test_exit_signal_is_passed_on(wired):
    relay, machine, front, up, log = wired
    machine.exit_signal_received("TERM", False, "", "")
    machine.connection_lost(None)
    assert log == [("signal", "TERM"), ("close",)]


def test_user_close_first_still_gets_the_exit_status_before_our_close(wired):
    relay, machine, front, up, log = wired
    machine.eof_received()
    relay.peer_closed()  # ControlMaster: CLOSE after EOF both ways, before the exit status
    assert up.closed
    machine.data_received(b"late", None)  # dropped: the user no longer reads
    machine.exit_status_received(0)
    machine.connection_lost(None)
    assert log == [("eof",), ("exit", 0), ("close",)]


def test_a_machine_lost_under_the_session_is_said_on_stderr_with_a_failing_status(wired):
    relay, machine, front, up, log = wired
    machine.data_received(b"x", None)
    machine.connection_lost(ConnectionResetError("connection lost"))
    assert log[0] == ("data", b"x")
    assert log[1][0] == "stderr" and b"box1 was stopped" in log[1][1]
    assert log[2:] == [("exit", relay_mod.EXIT_LOST), ("close",)]


def test_flow_control_pauses_the_other_side(wired):
    relay, machine, front, up, log = wired
    relay.pause_writing()
    assert not up.reading
    relay.resume_writing()
    assert up.reading
    machine.pause_writing()
    assert not front.reading
    machine.resume_writing()
    assert front.reading


def test_user_data_before_the_machine_channel_opens_is_kept_and_paused(monkeypatch):
    owner = Owner()
    relay = SessionRelay(owner)
    front = FrontChannel([])
    relay.connection_made(front)
    relay.data_received(b"early", None)
    relay.eof_received()
    assert not front.reading and relay._early == [b"early"] and relay._early_eof
    relay.connection_lost(None)
    assert owner.ended == [relay]
