"""The one error shape fleetgate shows users: a bounded reason and a sentence.

Why one base class: routing, waking and the upstream login each refuse a user for
their own reasons, and the session core must turn any of them into the same three
things (a metric label, a log line, a message for the user) without knowing which
module raised it. `reason` is a metric label value, so it comes from a fixed set per
subclass; `message` is shown to the user and must carry no secret.
"""

from __future__ import annotations


class FleetgateError(Exception):
    """A refusal with a bounded `reason` (a metric label) and a `message` for the user."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class RoutingError(FleetgateError):
    """The user authenticated but may not go where they asked."""

    def __init__(self, message: str, reason: str = "routing_refused"):
        super().__init__(reason, message)


class WakeError(FleetgateError):
    """A client could not be given a ready machine."""


class UpstreamError(FleetgateError):
    """The gateway's own SSH login to the machine failed (host_key_mismatch, upstream_auth, upstream_error)."""
