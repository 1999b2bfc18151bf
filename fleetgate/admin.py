"""The admin API (unix socket): machine status, wake, stop and keep-awake leases.

On a unix socket with mode 0600 rather than the metrics port, so that whoever can
scrape metrics cannot stop machines. `fleetgate status|wake|stop|keep-awake` use it.
"""

from __future__ import annotations

import json

import trio

from .fleet import Fleet, WakeError
from .http import Response


def _json(status: int, obj: object) -> Response:
    return status, "application/json", (json.dumps(obj, indent=1) + "\n").encode()


def machine_status(fleet: Fleet) -> list[dict]:
    if fleet.shared:
        return _shared_status(fleet)
    now = trio.current_time()
    return [{
        "machine": name,
        "backend": m.backend.name,
        "state": m.state.value,
        "sessions": m.sessions,
        "idle_seconds": round(fleet.idle_for(m), 1),
        "idle_timeout": m.config.idle_timeout,
        "keep_awake_seconds": round(max(0.0, m.keep_until - now), 1),
        "typical_boot_seconds": m.typical_boot(),
    } for name, m in fleet.machines.items()]


def _shared_status(fleet: Fleet) -> list[dict]:
    """Fleet-wide: state, sessions and keep-awake as etcd has them (this replica's mirror of it)."""
    now = trio.current_time()
    store = fleet.store
    out = []
    for name, m in fleet.machines.items():
        v = store.view(name)
        keep = max(m.keep_until - now, v.keep_until - store.now(), 0.0)
        out.append({
            "machine": name,
            "backend": m.backend.name,
            "state": v.fleet_state if store.healthy else m.state.value,
            "local_state": m.state.value,
            "sessions": max(v.sessions, m.sessions) if store.healthy else m.sessions,
            "local_sessions": m.sessions,
            "holds": dict(v.holds),
            "idle_seconds": round(max(0.0, now - m.last_activity) if v.fleet_state == "running" and not v.holds
                                  and not m.sessions else 0.0, 1),
            "idle_timeout": m.config.idle_timeout,
            "keep_awake_seconds": round(keep, 1),
            "typical_boot_seconds": m.typical_boot(),
            "replica": store.replica,
            "store_healthy": store.healthy,
        })
    return out


def _sessions(fleet: Fleet, name: str) -> int:
    m = fleet.machines[name]
    if fleet.shared and fleet.store.healthy:
        return max(m.sessions, fleet.store.view(name).sessions)
    return m.sessions


class AdminAPI:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    async def __call__(self, method: str, path: str, query: dict[str, list[str]]) -> Response:
        parts = [p for p in path.split("/") if p]
        if parts == ["machines"] and method == "GET":
            return _json(200, machine_status(self.fleet))
        if len(parts) == 3 and parts[0] == "machines":
            name, action = parts[1], parts[2]
            if name not in self.fleet.machines:
                return _json(404, {"error": f"no machine named {name}"})
            if method != "POST":
                return _json(405, {"error": "use POST"})
            if action == "keep-awake":
                try:
                    seconds = float(query.get("seconds", [""])[0])
                except ValueError:
                    return _json(400, {"error": "seconds=N is required (a number)"})
                if not 0 < seconds <= 30 * 86400:
                    return _json(400, {"error": "seconds must be between 0 and 30 days"})
                self.fleet.keep_awake(name, seconds)
                return _json(200, {"machine": name, "keep_awake_seconds": seconds})
            if action == "wake":
                try:
                    lease = await self.fleet.acquire(name, cause="keep_awake")  # an operator asked for it
                except WakeError as exc:
                    return _json(409, {"error": exc.message, "reason": exc.reason})
                lease.release()
                return _json(200, {"machine": name, "state": self.fleet.machines[name].state.value})
            if action == "stop":
                m = self.fleet.machines[name]
                sessions = _sessions(self.fleet, name)
                if sessions and query.get("force", ["0"])[0] != "1":
                    return _json(409, {"error": f"{name} has {sessions} session(s); stop anyway with `fleetgate stop --force` (force=1 in the admin API)"})
                stopped = await self.fleet.stop(name)
                return _json(200 if stopped else 409, {"machine": name, "state": m.state.value,
                                                       **({} if stopped else {"error": m.stop_error or "not running"})})
        return _json(404, {"error": "unknown endpoint"})
