"""[store]: where replicas share the fleet's state (validated with the rest of the config)."""

from __future__ import annotations

import re
from typing import Any, Mapping

from .base import StoreConfig

KEYS = {"type", "endpoints", "prefix", "lease_ttl", "timeout", "ca_file", "cert_file", "key_file", "replica",
        "wake_without_store"}
ENDPOINT_RE = re.compile(r"^https?://[^/\s]+(:\d+)?/?$")


def parse_store(r: Any, doc: Mapping[str, Any]) -> StoreConfig | None:
    """None without a [store] section: the in-process store, exactly as a single gateway always was."""
    if "store" not in doc:
        return None
    t = r.table(doc, "store", "")
    p = "store."
    r.unknown_keys(t, KEYS, p)
    typ = r.get(t, "type", p, str, "memory", check=lambda v: None if v in ("memory", "etcd") else
                f"must be 'memory' (one gateway, state in its process) or 'etcd' (several replicas), got '{v}'")
    if typ == "memory":
        extra = sorted(set(t) - {"type"})
        if extra:
            r.error(f"store.{extra[0]}", "only meaningful with type = \"etcd\"")
        return StoreConfig(type="memory")
    endpoints = r.str_list(t, "endpoints", p, required=True)
    for i, e in enumerate(endpoints):
        if not ENDPOINT_RE.match(e):
            r.error(f"store.endpoints[{i}]", f"'{e}' is not an etcd client URL like http://10.0.0.1:2379 "
                                             f"or https://etcd1.example:2379")
    if "endpoints" in t and not endpoints:
        r.error("store.endpoints", "empty; list every etcd member's client URL, e.g. [\"http://10.0.0.1:2379\"]")
    prefix = r.get(t, "prefix", p, str, "/fleetgate/", check=lambda v: None if v.startswith("/") and len(v) > 1
                   else "must start with '/' and name a key prefix, e.g. \"/fleetgate/prod/\"")
    ttl = r.get(t, "lease_ttl", p, int, 10, check=lambda v: None if 2 <= v <= 300 else
                "must be between 2 and 300 seconds (how long a dead replica's sessions keep machines up)")
    timeout = r.get(t, "timeout", p, float, 2.0, check=lambda v: None if 0.1 <= v <= 10 else
                    "must be between 0.1 and 10 seconds")
    if isinstance(ttl, int) and isinstance(timeout, float) and timeout * 3 > ttl:
        r.error("store.timeout", f"{timeout:g} s is too long for lease_ttl = {ttl}: keep-alives run every "
                                 f"lease_ttl/3 s and must fit; lower timeout or raise lease_ttl")
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        path = r.path(r.get(t, key, p, str))
        if path is not None and not path.is_file():
            r.error(f"store.{key}", f"no such file {path}")
        files[key] = path
    if files["key_file"] is not None and files["cert_file"] is None:
        r.error("store.key_file", "given without store.cert_file (the TLS client certificate it belongs to)")
    tls = any(files.values())
    if tls and any(e.startswith("http://") for e in endpoints):
        r.error("store.endpoints", "TLS files are set but an endpoint is http://; use https:// URLs")
    backends = doc.get("backends") if isinstance(doc.get("backends"), dict) else {}
    wake_without = r.str_list(t, "wake_without_store", p)
    for b in wake_without:
        if b not in backends:
            r.error("store.wake_without_store", f"no backend named '{b}'; known: {', '.join(sorted(backends)) or 'none'}")
    replica = r.get(t, "replica", p, str)
    return StoreConfig(type="etcd", endpoints=tuple(endpoints), prefix=prefix, lease_ttl=ttl, timeout=timeout,
                       ca_file=files["ca_file"], cert_file=files["cert_file"], key_file=files["key_file"],
                       replica=replica, wake_without_store=tuple(wake_without))
