"""Every metric fleetgate exports, defined once.

Labels are bounded on purpose: backend, reason, result, op, cause, status_class, kind, direction,
wake, and a machine label only on per-machine series. Never a user, an address or a session id:
those belong in the audit log, not in a time series per value.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from typing import Callable, Iterator
from pathlib import Path

import prometheus_client
import trio
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

log = logging.getLogger(__name__)

prometheus_client.disable_created_metrics()

BOOT_BUCKETS = (0.5, 1, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
# Up to 5 min: a start call may legitimately take as long as a boot (issue 14).
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Authentication to a session: instant for a running machine, a boot for a stopped one.
SHELL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SESSION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 8 * 3600, 24 * 3600)

# fleetgate_state_write_errors_total{kind}: a machine's files (config, key copies) or its pid file.
STATE_WRITE_KINDS = ("machine_files", "pid_file")
WAKE_FAILURE_REASONS = ("start_error", "boot_timeout", "backend_unreachable", "backend_error", "stop_failed",
                        "cooldown",
                        "store_unavailable",
                        # libvirt / ec2: the API's rate limit, no capacity, the machine no longer exists
                        "throttled", "no_capacity", "machine_gone")
UPSTREAM_FAILURE_REASONS = ("host_key_mismatch", "upstream_auth", "upstream_error")
MACHINE_STATES = ("stopped", "starting", "running", "stopping", "failed", "unknown")
CONNECTION_RESULTS = ("authenticated", "auth_failed", "preauth_timeout", "routing_refused", "wake_failed",
                      "upstream_failed", "closed_preauth", "user_limit", "budget")
CHANNEL_KINDS = ("session", "jump", "forward", "remote_forward")
CHANNEL_RESULTS = ("ok", "refused", "wake_failed", "connect_failed", "limit", "budget")
BUDGET_KINDS = ("fds", "buffer", "channels")  # fleetgate/budget.py
BUDGET_SCOPES = ("user", "gateway")
BACKEND_OPS = ("start", "stop", "status", "address")
# Why a wake was started (fleetgate_wakes_total{cause}); the first is the default.
WAKE_CAUSES = ("login", "keep_awake", "schedule", "passthrough")
# HTTP backends: the class of an error answer; "none" for calls that got no HTTP answer.
STATUS_CLASSES = ("none", "2xx", "3xx", "4xx", "5xx")


def _revision() -> str:
    """The git commit of a source checkout, or "unknown" (installed from a wheel)."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def _version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


BUILD_INFO: dict[str, str] = {}


def build_labels() -> dict[str, str]:
    if not BUILD_INFO:
        BUILD_INFO.update(version=__version__, revision=_revision(), python=platform.python_version(),
                          asyncssh=_version_of("asyncssh"))
    return BUILD_INFO
STORE_OPS = ("range", "txn", "lease_grant", "lease_keepalive", "lease_revoke")
WEBHOOK_KINDS = ("route", "keys")
WEBHOOK_RESULTS = ("ok", "refused", "timeout", "error", "bad_answer")
STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# -- per-machine series (issue 15) ----------------------------------------------------------------
#
# With 10 000 machines, one prometheus_client child per machine and label set made a scrape take
# ~0.8 s of the event loop (90 000 series through generate_latest) and every reaper pass update
# 50 000 children. Instead each machine has one small record the Fleet writes into when
# something changes (through the same `.labels(machine).set()` calls as before), and the series
# are produced from the records at scrape time: rendered directly as text (the same bytes
# generate_latest would write, checked by tests/test_scale_metrics.py) in slices, with a
# checkpoint between slices so that logins and /healthz are served meanwhile. Five series per
# machine: its current state only (value 1; the other states are absent, not 0), sessions,
# keep-awake leases, last activity and running seconds.

SCRAPE_SLICE = 2000  # machines rendered between two checkpoints (~1 ms of the event loop)
# A scrape within this many render durations of the last one gets the last body: scrapers
# back to back (a broken scraper, a loop of curl) take at most ~1/(1+RENDER_REUSE) of the event
# loop from logins, whatever the fleet's size. Prometheus, every 15 s or more, always gets a
# fresh one (a render takes ~5 ms, ~15 ms at 10 000 machines).
RENDER_REUSE = 4

MACHINE_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    # (exported name, type, attribute of MachineSeries, help)
    ("fleetgate_machine_state", "gauge", "state",
     "1 for the machine's current state (only that state's series is exported)."),
    ("fleetgate_active_sessions", "gauge", "sessions",
     "Connections and channels currently holding a machine awake."),
    ("fleetgate_keep_awake_leases", "gauge", "leases", "Keep-awake leases currently held, per machine."),
    ("fleetgate_machine_last_activity_timestamp_seconds", "gauge", "last_activity",
     "Unix time a machine's last session ended, or now while sessions hold it (0 until known); idle time is "
     "time() minus this."),
    ("fleetgate_machine_running_seconds_total", "counter", "running",
     "Seconds the machine has been running (starting to stopped), as seen by this gateway: the cost the idle "
     "reaper saves."),
)
SERIES_PER_MACHINE = len(MACHINE_FAMILIES)


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _number(v: float) -> str:
    """floatToGoString, with the two values nearly every per-machine series has precomputed."""
    if v == 0:
        return "0.0"
    if v == 1:
        return "1.0"
    return floatToGoString(v)


class MachineSeries:
    """One machine's series values; written by the Fleet on changes, read at scrape time."""

    __slots__ = ("name", "label", "state", "sessions", "leases", "last_activity", "running")

    def __init__(self, name: str):
        self.name = name
        self.label = f'machine="{_escape_label(name)}"'  # escaped once, not at every scrape
        self.state: str | None = None
        self.sessions = 0.0
        self.leases = 0.0
        self.last_activity = 0.0
        self.running = 0.0


class _MachineValue:
    """What `.labels(machine)` returns: the small part of a prometheus_client child the Fleet uses."""

    __slots__ = ("_series", "_attr", "_state")

    def __init__(self, series: MachineSeries, attr: str, state: str | None = None):
        self._series, self._attr, self._state = series, attr, state

    def set(self, value: float) -> None:
        if self._attr == "state":  # fleetgate_machine_state{state}: 1 makes it the current state
            if value:
                self._series.state = self._state
            elif self._series.state == self._state:
                self._series.state = None
            return
        setattr(self._series, self._attr, float(value))

    def inc(self, amount: float = 1.0) -> None:
        setattr(self._series, self._attr, getattr(self._series, self._attr) + amount)

    def set_to_current_time(self) -> None:
        self.set(time.time())

    def get(self) -> float:
        if self._attr == "state":
            return 1.0 if self._series.state == self._state else 0.0
        return getattr(self._series, self._attr)


class _MachineFamily:
    """`metrics.active_sessions.labels(name).set(n)` and friends, as before issue 15, on the records."""

    def __init__(self, machines: "MachineCollector", attr: str):
        self._machines, self._attr = machines, attr
        # What prometheus_client's families carry, for the docs test (tests/test_alerts.py).
        name, kind, _, _ = next(f for f in MACHINE_FAMILIES if f[2] == attr)
        self._name, self._type = name.removesuffix("_total"), kind
        self._labelnames = ("machine", "state") if attr == "state" else ("machine",)

    def labels(self, machine: str, state: str | None = None) -> _MachineValue:
        return _MachineValue(self._machines.series(machine), self._attr, state)

    def remove(self, machine: str, *_: str) -> None:
        self._machines.remove(machine)


class MachineCollector(Collector):
    """The per-machine families, from MachineSeries records, for the registry and for fast rendering."""

    def __init__(self) -> None:
        self.machines: dict[str, MachineSeries] = {}

    def series(self, machine: str) -> MachineSeries:
        s = self.machines.get(machine)
        if s is None:
            s = self.machines[machine] = MachineSeries(machine)
        return s

    def remove(self, machine: str) -> None:
        self.machines.pop(machine, None)

    def collect(self) -> Iterator[Metric]:
        """The families as prometheus_client objects: get_sample_value(), tests, other exporters."""
        records = list(self.machines.values())
        for name, kind, attr, doc in MACHINE_FAMILIES:
            if kind == "counter":
                fam: Metric = CounterMetricFamily(name.removesuffix("_total"), doc, labels=["machine"])
            elif attr == "state":
                fam = GaugeMetricFamily(name, doc, labels=["machine", "state"])
            else:
                fam = GaugeMetricFamily(name, doc, labels=["machine"])
            for s in records:
                if attr == "state":
                    if s.state is not None:
                        fam.add_metric([s.name, s.state], 1.0)
                else:
                    fam.add_metric([s.name], getattr(s, attr))
            yield fam

    def render_slices(self) -> Iterator[str]:
        """The families in the text format, a slice of SCRAPE_SLICE machines at a time.

        Byte for byte what generate_latest() writes for collect() (tests/test_scale_metrics.py).
        The records are listed first: machines added or removed meanwhile do not disturb a scrape.
        """
        records = list(self.machines.values())
        for name, kind, attr, doc in MACHINE_FAMILIES:
            help_text = doc.replace("\\", r"\\").replace("\n", r"\n")
            head = f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"
            for i in range(0, max(len(records), 1), SCRAPE_SLICE):
                chunk = records[i:i + SCRAPE_SLICE]
                if attr == "state":
                    body = "".join(f'{name}{{{s.label},state="{_escape_label(s.state)}"}} 1.0\n'
                                   for s in chunk if s.state is not None)
                elif attr == "sessions":
                    body = "".join(f"{name}{{{s.label}}} {_number(s.sessions)}\n" for s in chunk)
                elif attr == "leases":
                    body = "".join(f"{name}{{{s.label}}} {_number(s.leases)}\n" for s in chunk)
                elif attr == "last_activity":
                    body = "".join(f"{name}{{{s.label}}} {_number(s.last_activity)}\n" for s in chunk)
                else:
                    body = "".join(f"{name}{{{s.label}}} {_number(s.running)}\n" for s in chunk)
                yield head + body
                head = ""

    def render(self) -> str:
        return "".join(self.render_slices())


class Metrics:
    """A registry per gateway, so tests can run several gateways in one process.

    `registry` holds everything (tests read it with get_sample_value); a scrape renders the
    fixed-size metrics (`_base`, through generate_latest) and the per-machine series
    (`machines`, MachineCollector) separately, the latter in slices (exposition_async).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self._base = CollectorRegistry()
        self.machines = MachineCollector()
        self.registry = registry or CollectorRegistry()
        self.registry.register(self._base)
        self.registry.register(self.machines)
        self.before_scrape: list[Callable[[], None]] = []  # called by exposition(), in the event loop
        self._backends: set[str] = set()
        self._scrape: tuple[trio.Event, list[bytes]] | None = None  # the render in flight, shared
        self._last: tuple[float, float, bytes] | None = None  # (trio time done, render seconds, body)
        self.build_info = Info("fleetgate_build", "Version of the running fleetgate.", registry=r)
        self.build_info.info(build_labels())
        # process_* (CPU, RSS, open descriptors, start time) and python_info, as a default registry has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.boot_latency = Histogram(
            "fleetgate_boot_latency_seconds", "Time from the backend start call to the machine's SSH banner "
            "(wakes that timed out are observed at their timeout).",
            ["backend"], buckets=BOOT_BUCKETS, registry=r)
        self.active_sessions = _MachineFamily(self.machines, "sessions")
        self.wake_failures = Counter(
            "fleetgate_wake_failures", "Wakes that did not give the user a ready machine, by reason.",
            ["backend", "reason"], registry=r)
        self.wakes = Counter(
            "fleetgate_wakes", "Backend start attempts (one per wake, however many clients wait), by result "
            "and cause (login, keep_awake, schedule, passthrough).",
            ["backend", "result", "cause"], registry=r)
        self.reaper_stops = Counter(
            "fleetgate_reaper_stops", "Machines stopped by the idle reaper, by result.",
            ["backend", "result"], registry=r)
        self.machine_state = _MachineFamily(self.machines, "state")
        self.connections = Counter(
            "fleetgate_connections", "Incoming SSH connections by outcome.", ["result"], registry=r)
        self.auth_failures = Counter(
            "fleetgate_auth_failures", "Failed authentication attempts by method.", ["method"], registry=r)
        self.backend_calls = Histogram(
            "fleetgate_backend_call_duration_seconds", "Duration of backend calls by backend, operation and result.",
            ["backend", "op", "result"], buckets=CALL_BUCKETS, registry=r)
        self.backend_requests = Counter(
            "fleetgate_backend_requests", "HTTP requests sent by HTTP backends, retries included, by op and the "
            "class of the answer (none: no answer, connect error or timeout).",
            ["backend", "op", "status_class"], registry=r)
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
            "fleetgate_preauth_refusals", "Unauthenticated connections refused or closed by the pre-auth limits, "
            "and key exchanges refused by the key-exchange budgets (kex_budget, rekey_rate; before or after "
            "authentication).", ["reason"], registry=r)
        for reason in ("per_source", "evicted", "penalty", "max_auth_tries", "preauth_timeout", "password_rate",
                       "kex_budget", "rekey_rate"):
            self.preauth_refusals.labels(reason)
        self.reaper_last_run = Gauge(
            "fleetgate_reaper_last_run_timestamp_seconds", "Unix time of the idle reaper's last completed pass.",
            registry=r)
        self.reaper_errors = Counter(
            "fleetgate_reaper_errors", "Idle reaper passes that raised instead of completing.", registry=r)
        self.audit_failures = Counter(
            "fleetgate_audit_write_failures", "Audit log lines that could not be written.", registry=r)
        self.state_write_errors = Counter(
            "fleetgate_state_write_errors", "Writes to the state dir that failed (full disk, unwritable), by kind "
            "of file; the machine concerned was not started.", ["kind"], registry=r)
        for kind in STATE_WRITE_KINDS:
            self.state_write_errors.labels(kind)
        self.machine_lost = Counter(
            "fleetgate_machine_lost", "Machines found stopped or unreachable while fleetgate thought them running.",
            ["backend"], registry=r)
        self.leases = _MachineFamily(self.machines, "leases")
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
        for reason in ("connection_cap", "read_timeout", "write_timeout", "bad_request", "accept_descriptors",
                       "per_source", "evicted", "health_reserve"):
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
        # Routing and authorized keys from the team's own service (docs/webhooks.md).
        self.webhook_calls = Histogram(
            "fleetgate_webhook_request_duration_seconds", "Requests to the routing / authorized-keys webhook, by "
            "kind and result (ok, refused, timeout, error: unreachable or not HTTP 200, bad_answer).",
            ["kind", "result"], buckets=CALL_BUCKETS, registry=r)
        for kind in WEBHOOK_KINDS:
            for result in WEBHOOK_RESULTS:
                self.webhook_calls.labels(kind, result)
        self.replica_info = Info("fleetgate_replica", "This gateway replica's identity in the shared store.",
                                 registry=r)
        self.replica_info.info({"replica": "local", "store": "memory"})

        # Issue 14: what operators asked for after a live Prometheus run.
        self.machine_last_activity = _MachineFamily(self.machines, "last_activity")
        self.machine_running_seconds = _MachineFamily(self.machines, "running")
        self.time_to_shell = Histogram(
            "fleetgate_time_to_shell_seconds", "Time from a user's authentication to the session being ready "
            "(machine held and upstream logged in), by whether a wake was needed.", ["wake"],
            buckets=SHELL_BUCKETS, registry=r)
        for wake in ("yes", "no"):
            self.time_to_shell.labels(wake)
        self.upstream_handshake = Histogram(
            "fleetgate_upstream_handshake_seconds", "Duration of successful SSH logins from the gateway to "
            "machines (connect, key exchange, authentication).", [], buckets=HANDSHAKE_BUCKETS, registry=r)
        self.unauthenticated = Gauge(
            "fleetgate_unauthenticated_connections", "SSH connections open that have not authenticated yet.",
            registry=r)
        self.unauthenticated_limit = Gauge(
            "fleetgate_unauthenticated_connections_limit", "The configured limits.max_unauthenticated: when "
            "reached, new connections evict the oldest unauthenticated ones.", registry=r)
        # Issue 25: budgets that add up (fleetgate/budget.py); the labels are the budget and the scope,
        # never the user.
        self.budget_used = Gauge(
            "fleetgate_budget_used", "What authenticated connections and channels hold of each budget, all users "
            "together (fds: descriptors; buffer: bytes of channel windows; channels).", ["budget"], registry=r)
        self.budget_user_max = Gauge(
            "fleetgate_budget_user_max", "The most any one user holds of each budget (no user label).",
            ["budget"], registry=r)
        self.budget_limit = Gauge(
            "fleetgate_budget_limit", "Each budget's limit, for the gateway as a whole and for each user "
            "(limits.*_total, limits.*_per_user).", ["budget", "scope"], registry=r)
        self.budget_refusals = Counter(
            "fleetgate_budget_refusals", "Connections and channels refused because a budget was reached, by "
            "budget and by whose budget (a user's share or the gateway's total).", ["budget", "scope"],
            registry=r)
        for kind in BUDGET_KINDS:
            for scope in BUDGET_SCOPES:
                self.budget_refusals.labels(kind, scope)
        self.config_last_reload_success = Gauge(
            "fleetgate_config_last_reload_success_timestamp_seconds", "Unix time of the last successful config "
            "load or reload.", registry=r)
        self.config_last_reload_success.set_to_current_time()  # a gateway's Metrics come with its first load

    def add_machine(self, machine: str, backend: str) -> None:
        """Start a machine's series (and, the first time, its backend's counters) at 0."""
        self.machines.series(machine)
        if backend in self._backends:
            return
        self._backends.add(backend)
        self.boot_latency.labels(backend)
        self.machine_lost.labels(backend)
        for op in BACKEND_OPS:
            for result in ("ok", "error"):
                self.backend_calls.labels(backend, op, result)
        for reason in WAKE_FAILURE_REASONS:
            self.wake_failures.labels(backend, reason)
        for result in ("success", "failure"):
            for cause in WAKE_CAUSES:
                self.wakes.labels(backend, result, cause)
            self.reaper_stops.labels(backend, result)

    def remove_machine(self, machine: str) -> None:
        """Delete a machine's per-machine series (it left the config and stopped)."""
        self.machines.remove(machine)

    def set_state(self, machine: str, state: str) -> None:
        """The machine's fleetgate_machine_state series is now the one of `state`."""
        self.machines.series(machine).state = state

    def _run_hooks(self) -> None:
        for hook in list(self.before_scrape):  # e.g. bytes relayed by open channels so far
            try:
                hook()
            except Exception:  # a scrape must never fail for it
                log.exception("metrics: a before-scrape hook failed")

    def exposition(self) -> bytes:
        """The whole scrape at once (tests, tools); the HTTP server uses exposition_async."""
        self._run_hooks()
        return prometheus_client.generate_latest(self._base) + self.machines.render().encode()

    async def exposition_async(self) -> bytes:
        """A scrape that never holds the event loop for long, whatever the number of machines.

        The fixed-size part is rendered at once (a few ms); the per-machine part a slice of
        SCRAPE_SLICE machines at a time with a checkpoint between slices. Scrapes that arrive
        while one is being rendered wait for it and share its body (one render per burst of
        scrapers, not one each). A scrape that arrives within RENDER_REUSE render durations of
        the last render gets its body too; otherwise a lone scraper gets a fresh one.
        """
        if self._last is not None:
            done_at, took, body = self._last
            if trio.current_time() - done_at < RENDER_REUSE * took:
                return body
        if self._scrape is not None:
            done, out = self._scrape
            await done.wait()
            if out:
                return out[0]
            # the render we waited for was cancelled: render our own
        done, out = self._scrape = (trio.Event(), [])
        took = 0.0  # CPU of this task only: time spent in other tasks between slices is not the render's
        try:
            t = time.perf_counter()
            self._run_hooks()
            parts = [prometheus_client.generate_latest(self._base)]
            for text in self.machines.render_slices():  # each slice is made here, counted from t
                parts.append(text.encode())
                took += time.perf_counter() - t
                await trio.lowlevel.checkpoint()
                t = time.perf_counter()
            out.append(b"".join(parts))
            took += time.perf_counter() - t
            self._last = (trio.current_time(), took, out[0])
            return out[0]
        finally:
            self._scrape = None
            done.set()
