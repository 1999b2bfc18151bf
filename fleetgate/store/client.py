"""A small etcd v3 client over etcd's JSON gateway (httpx, so it runs natively on trio).

Only what fleetgate needs: range, txn (puts and deletes under compares), lease grant and
keep-alive (one-shot POSTs), and a watch stream. Keys and values travel base64-encoded;
int64s come back as strings and zero values are omitted, so every read defaults them.

Every call has a timeout shorter than etcd's own stalls (a write without quorum hangs for
~7 s before etcd answers "request timed out"): a slow or leaderless cluster is reported as
StoreUnavailable quickly, and callers decide nothing on it.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import httpx
import trio

from .. import logsetup
from .base import StoreConfig, StoreUnavailable

log = logging.getLogger(__name__)
logsetup.redact_http_logs()  # httpx logs request URLs: never their query secrets


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with prefix."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return b.decode()


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class Compare:
    key: str
    target: str          # "CREATE" | "MOD" | "VALUE"
    result: str          # "EQUAL" | "NOT_EQUAL" | "GREATER" | "LESS"
    value: int | bytes


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    range_end: str | None = None


def _kv(d: dict) -> KV:
    return KV(_unb64(d.get("key")).decode(), _unb64(d.get("value")), int(d.get("create_revision", 0)),
              int(d.get("mod_revision", 0)), int(d.get("lease", 0)))


class EtcdClient:
    """The JSON gateway of one etcd cluster; fails over between endpoints on connection errors."""

    OPS = ("range", "txn", "lease_grant", "lease_keepalive", "watch")

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 2.0, verify: Any = True,
                 cert: Any = None, observe=None):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._current = 0
        self._http = httpx.AsyncClient(timeout=timeout, verify=verify, cert=cert,
                                       limits=httpx.Limits(max_connections=64, max_keepalive_connections=16))
        self.observe = observe  # callable(op, seconds, ok) for metrics

    @classmethod
    def from_config(cls, sc: StoreConfig) -> "EtcdClient":
        import ssl

        verify: Any = True
        if sc.ca_file is not None or sc.cert_file is not None:
            verify = ssl.create_default_context(cafile=str(sc.ca_file) if sc.ca_file else None)
            if sc.cert_file is not None:  # TLS client certificate (etcd --client-cert-auth)
                verify.load_cert_chain(str(sc.cert_file), str(sc.key_file) if sc.key_file else None)
        return cls(sc.endpoints, timeout=sc.timeout, verify=verify)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, op: str, path: str, body: dict) -> dict:
        t0 = trio.current_time()
        ok = False
        last: Exception | None = None
        try:
            for i in range(len(self.endpoints)):
                idx = (self._current + i) % len(self.endpoints)
                url = self.endpoints[idx].rstrip("/") + path
                try:
                    with trio.fail_after(self.timeout + 0.5):
                        r = await self._http.post(url, content=json.dumps(body))
                except (httpx.TransportError, trio.TooSlowError) as exc:
                    last = exc
                    continue
                try:
                    data = r.json()
                except ValueError:
                    last = StoreUnavailable(f"{url}: HTTP {r.status_code}")
                    continue
                if r.status_code != 200 or "error" in data or ("code" in data and data.get("code")):
                    msg = data.get("message") or data.get("error") or r.text
                    last = StoreUnavailable(f"{url}: {msg}")
                    # no leader / timed out / unavailable: another endpoint may have a quorum view
                    continue
                self._current = idx
                ok = True
                return data
            raise StoreUnavailable(f"etcd {op} failed on every endpoint: {last}")
        finally:
            if self.observe is not None:
                self.observe(op, trio.current_time() - t0, ok)

    async def range(self, key: str, range_end: str | None = None, *, serializable: bool = False) -> tuple[int, list[KV]]:
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if serializable:
            body["serializable"] = True
        data = await self._post("range", "/v3/kv/range", body)
        return int(data.get("header", {}).get("revision", 0)), [_kv(k) for k in data.get("kvs", [])]

    async def txn(self, compares: Sequence[Compare], success: Sequence[Put | Delete],
                  failure: Sequence[Put | Delete] = ()) -> tuple[bool, int]:
        def cmp(c: Compare) -> dict:
            d: dict[str, Any] = {"key": _b64(c.key), "target": c.target, "result": c.result}
            field = {"CREATE": "create_revision", "MOD": "mod_revision", "VALUE": "value", "VERSION": "version"}[c.target]
            d[field] = _b64(c.value) if c.target == "VALUE" else str(c.value)
            return d

        def op(o: Put | Delete) -> dict:
            if isinstance(o, Put):
                p: dict[str, Any] = {"key": _b64(o.key), "value": _b64(o.value)}
                if o.lease:
                    p["lease"] = str(o.lease)
                return {"request_put": p}
            d: dict[str, Any] = {"key": _b64(o.key)}
            if o.range_end is not None:
                d["range_end"] = _b64(o.range_end)
            return {"request_delete_range": d}

        data = await self._post("txn", "/v3/kv/txn", {"compare": [cmp(c) for c in compares],
                                                      "success": [op(o) for o in success],
                                                      "failure": [op(o) for o in failure]})
        return bool(data.get("succeeded", False)), int(data.get("header", {}).get("revision", 0))

    async def lease_grant(self, ttl: int) -> int:
        data = await self._post("lease_grant", "/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """The lease's remaining TTL after this keep-alive; 0 if the lease no longer exists."""
        data = await self._post("lease_keepalive", "/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        await self._post("lease_revoke", "/v3/lease/revoke", {"ID": str(lease)})

    async def watch(self, key: str, range_end: str, start_revision: int) -> AsyncIterator[list[tuple[str, KV]]]:
        """Batches of (PUT|DELETE, kv) from start_revision on; ends (raises) when the stream breaks."""
        url = self.endpoints[self._current].rstrip("/") + "/v3/watch"
        body = {"create_request": {"key": _b64(key), "range_end": _b64(range_end),
                                   "start_revision": str(start_revision)}}
        timeout = httpx.Timeout(self.timeout, read=None)
        try:
            async with self._http.stream("POST", url, content=json.dumps(body), timeout=timeout,
                                         headers={"Grpc-Metadata-hasleader": "true"}) as r:
                if r.status_code != 200:
                    raise StoreUnavailable(f"watch: HTTP {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise StoreUnavailable(f"watch: {msg['error'].get('message', msg['error'])}")
                    res = msg.get("result", {})
                    if res.get("canceled"):
                        raise StoreUnavailable(f"watch cancelled: {res.get('cancel_reason', '')}")
                    if res.get("compact_revision"):
                        raise StoreUnavailable("watch: revision compacted")
                    events = [(e.get("type", "PUT"), _kv(e["kv"])) for e in res.get("events", [])]
                    if events or res.get("created"):
                        yield events
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"watch: {exc}") from exc
