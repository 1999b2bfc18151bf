"""GraceClock: deadlines in admission order, popped when due, stopped ones forgotten."""

from fleetgate.ssh.grace import GraceClock


class C:
    def grace_expired(self):
        pass


def test_expired_in_order_and_stopped_ones_never():
    now = {"t": 0.0}
    g = GraceClock(10, clock=lambda: now["t"])
    a, b, c = C(), C(), C()
    g.start(a)
    now["t"] = 3
    g.start(b)
    now["t"] = 5
    g.start(c)
    g.stop(b)  # authenticated
    now["t"] = 9.9
    assert g.expired() == []
    now["t"] = 15
    assert g.expired() == [a, c]
    assert len(g) == 0
