"""Every metric fleetgate exports, defined once.

Labels are bounded on purpose: backend, reason, result, op, phase, kind, direction, and
a machine label only on per-machine gauges. Never a user, an address or a session id:
those belong in the audit log, not in a time series per value.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__

prometheus_client.disable_created_metrics()

BOOT_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SESSION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 8 * 3600, 24 * 3600)

WAKE_FAILURE_REASONS = ("start_error", "boot_timeout", "backend_unreachable", "stop_failed", "cooldown",
                        "store_unavailable",
                        # libvirt / ec2: the API's rate limit, no capacity, the machine no longer exists
                        "throttled", "no_capacity", "machine_gone")
UPSTREAM_FAILURE_REASONS = ("host_key_mismatch", "upstream_auth", "upstream_error")
MACHINE_STATES = ("stopped", "starting", "running", "stopping", "failed", "unknown")
CONNECTION_RESULTS = ("authenticated", "auth_failed", "preauth_timeout", "routing_refused", "wake_failed",
                      "upstream_failed", "closed_preauth", "user_limit")
CHANNEL_KINDS = ("session", "jump", "forward", "remote_forward")
CHANNEL_RESULTS = ("ok", "refused", "wake_failed", "connect_failed", "limit")
BACKEND_OPS = ("start", "stop", "status", "address")
STORE_OPS = ("range", "txn", "lease_grant", "lease_keepalive", "lease_revoke")
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """A registry per gateway, so tests can run several gateways in one process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.build_info = Info("fleetgate_build", "Version of the running fleetgate.", registry=r)
        self.build_info.info({"version": __version__})
        self.boot_latency = Histogram(
            "fleetgate_boot_latency_seconds", "Time from the backend start call to the machine's SSH banner.",
            ["backend"], buckets=BOOT_BUCKETS, registry=r)
        self.active_sessions = Gauge(
            "fleetgate_active_sessions", "Connections and channels currently holding a machine awake.",
            ["machine"], registry=r)
        self.wake_failures = Counter(
            "fleetgate_wake_failures", "Wakes that did not give the user a ready machine, by reason.",
            ["backend", "reason"], registry=r)
        self.wakes = Counter(
            "fleetgate_wakes", "Backend start attempts (one per wake, however many clients wait), by result.",
            ["backend", "result"], registry=r)
        self.reaper_stops = Counter(
            "fleetgate_reaper_stops", "Machines stopped by the idle reaper, by result.",
            ["backend", "result"], registry=r)
        self.machine_state = Gauge(
            "fleetgate_machine_state", "1 for the machine's current state, 0 for the others.",
            ["machine", "state"], registry=r)
        self.machine_idle = Gauge(
            "fleetgate_machine_idle_seconds", "Seconds since a running machine's last session ended (0 while in use).",
            ["machine"], registry=r)
        self.connections = Counter(
            "fleetgate_connections", "Incoming SSH connections by outcome.", ["result"], registry=r)
        self.auth_failures = Counter(
            "fleetgate_auth_failures", "Failed authentication attempts by method.", ["method"], registry=r)
        self.backend_calls = Histogram(
            "fleetgate_backend_call_duration_seconds", "Duration of backend calls by backend, operation and result.",
            ["backend", "op", "result"], buckets=CALL_BUCKETS, registry=r)
        self.relayed_bytes = Counter(
            "fleetgate_relayed_bytes", "Bytes relayed between users and machines.", ["direction", "mode"], registry=r)
        self.channels = Counter(
            "fleetgate_channels", "Channels opened through the gateway by kind and result.", ["kind", "result"],
            registry=r)
        self.config_reloads = Counter(
            "fleetgate_config_reloads", "Config reloads (SIGHUP) by result; a failed one keeps the old config.",
            ["result"], registry=r)
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.config_last_reload_ok = Gauge(
            "fleetgate_config_last_reload_successful",
            "1 if the last config (re)load succeeded, 0 if the file on disk was rejected and an older one is in force.",
            registry=r)
        self.config_last_reload_ok.set(1)
        self.preauth_refusals = Counter(
            "fleetgate_preauth_refusals", "Unauthenticated connections refused or closed by the pre-auth limits.",
            ["reason"], registry=r)
        for reason in ("per_source", "evicted", "penalty", "max_auth_tries", "preauth_timeout", "password_rate",
                       "kex_budget"):
            self.preauth_refusals.labels(reason)
        self.reaper_last_run = Gauge(
            "fleetgate_reaper_last_run_timestamp_seconds", "Unix time of the idle reaper's last completed pass.",
            registry=r)
        self.reaper_errors = Counter(
            "fleetgate_reaper_errors", "Idle reaper passes that raised instead of completing.", registry=r)
        self.audit_failures = Counter(
            "fleetgate_audit_write_failures", "Audit log lines that could not be written.", registry=r)
        self.machine_lost = Counter(
            "fleetgate_machine_lost", "Machines found stopped or unreachable while fleetgate thought them running.",
            ["backend"], registry=r)
        self.leases = Gauge(
            "fleetgate_keep_awake_leases", "Keep-awake leases currently held, per machine.", ["machine"], registry=r)
        self.upstream_failures = Counter(
            "fleetgate_upstream_failures", "Failed SSH connections from the gateway to machines, by reason.",
            ["reason"], registry=r)
        for reason in UPSTREAM_FAILURE_REASONS:
            self.upstream_failures.labels(reason)
        self.passthrough_refusals = Counter(
            "fleetgate_passthrough_refusals", "Passthrough connections closed without reaching the machine, by reason.",
            ["reason"], registry=r)
        for reason in ("rate_limited", "wake_failed", "connect_failed"):
            self.passthrough_refusals.labels(reason)
        # Descriptor exhaustion and per-connection errors (issue 10): counted, never fatal.
        self.loop_errors = Counter(
            "fleetgate_loop_errors", "Errors the SSH listeners' event loop reported and survived, by kind "
            "(accept_descriptors: accept() failed for lack of file descriptors or memory).", ["kind"], registry=r)
        for kind in ("accept_descriptors", "accept", "other"):
            self.loop_errors.labels(kind)
        self.http_refusals = Counter(
            "fleetgate_http_refusals", "HTTP (metrics/admin) connections closed without an answer, by reason.",
            ["reason"], registry=r)
        for reason in ("connection_cap", "read_timeout", "write_timeout", "bad_request", "accept_descriptors"):
            self.http_refusals.labels(reason)
        self.fd_limit = Gauge(
            "fleetgate_fd_limit", "The gateway's open-file limit (RLIMIT_NOFILE soft, raised to the hard limit "
            "at start): the budget connections draw on.", registry=r)
        self.session_duration = Histogram(
            "fleetgate_session_duration_seconds", "Duration of authenticated connections.", [],
            buckets=SESSION_BUCKETS, registry=r)
        for reason in ("publickey", "password"):
            self.auth_failures.labels(reason)
        for result in CONNECTION_RESULTS:
            self.connections.labels(result)
        for kind in CHANNEL_KINDS:
            for result in CHANNEL_RESULTS:
                self.channels.labels(kind, result)
        for direction in ("up", "down"):
            for mode in ("relay", "jump", "forward"):
                self.relayed_bytes.labels(direction, mode)

        # The shared store (etcd, several replicas; docs/ha.md). Every replica exports its own.
        self.store_ops = Histogram(
            "fleetgate_store_op_duration_seconds", "Duration of requests to the shared store (etcd), by op and result.",
            ["op", "result"], buckets=STORE_BUCKETS, registry=r)
        for op in STORE_OPS:
            for result in ("ok", "error"):
                self.store_ops.labels(op, result)
        self.store_up = Gauge(
            "fleetgate_store_up", "1 if this replica's shared store (etcd) answers and its lease is alive; "
            "1 with the in-process store.", registry=r)
        self.store_up.set(1)
        self.store_lease_lost = Counter(
            "fleetgate_store_lease_lost", "Times this replica's etcd lease expired (its holds vanished and were "
            "registered again).", registry=r)
        self.store_claims = Counter(
            "fleetgate_store_claims", "Fleet-wide start/stop claims by this replica: won, lost to another "
            "replica, and performed (the backend call was made here).", ["kind", "result"], registry=r)
        for kind in ("start", "stop"):
            for result in ("won", "lost", "performed"):
                self.store_claims.labels(kind, result)
        self.replica_info = Info("fleetgate_replica", "This gateway replica's identity in the shared store.",
                                 registry=r)
        self.replica_info.info({"replica": "local", "store": "memory"})

    def add_machine(self, machine: str, backend: str) -> None:
        """Start a machine's series (and its backend's counters) at 0."""
        for state in MACHINE_STATES:
            self.machine_state.labels(machine, state).set(0)
        self.active_sessions.labels(machine).set(0)
        self.machine_idle.labels(machine).set(0)
        self.boot_latency.labels(backend)
        self.machine_lost.labels(backend)
        for op in BACKEND_OPS:
            for result in ("ok", "error"):
                self.backend_calls.labels(backend, op, result)
        for reason in WAKE_FAILURE_REASONS:
            self.wake_failures.labels(backend, reason)
        for result in ("success", "failure"):
            self.wakes.labels(backend, result)
            self.reaper_stops.labels(backend, result)

    def set_state(self, machine: str, state: str) -> None:
        for s in MACHINE_STATES:
            self.machine_state.labels(machine, s).set(1 if s == state else 0)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
