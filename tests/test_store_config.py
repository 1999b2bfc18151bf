"""[store]: validated with the rest of the config; no section keeps the in-process store."""

from __future__ import annotations

import pytest

from fleetgate.store import MemoryStore, build_store
from fleetgate.store.etcd import EtcdStore
from test_config import d, doc, parse  # noqa: F401  (d is a fixture)
from test_config import issues as config_issues


def with_store(tmp_path, store: dict):
    return parse(tmp_path, doc(store=store))


def issues(tmp_path, store: dict) -> list[str]:
    return [f"{key}: {message}" for key, message in config_issues(tmp_path, doc(store=store))]


def test_no_store_section_is_the_memory_store(d):
    cfg = parse(d, doc())
    assert cfg.store is None
    assert isinstance(build_store(cfg), MemoryStore) and not build_store(cfg).shared


def test_etcd_store_parses_with_defaults(d):
    cfg = with_store(d, {"type": "etcd", "endpoints": ["http://127.0.0.1:2379"]})
    sc = cfg.store
    assert (sc.type, sc.endpoints, sc.prefix, sc.lease_ttl, sc.timeout) == \
        ("etcd", ("http://127.0.0.1:2379",), "/fleetgate/", 10, 2.0)
    store = build_store(cfg)
    assert isinstance(store, EtcdStore) and store.shared


@pytest.mark.parametrize("store,key,words", [
    ({"type": "zookeeper"}, "store.type", "must be 'memory'"),
    ({"type": "etcd"}, "store.endpoints", "required"),
    ({"type": "etcd", "endpoints": []}, "store.endpoints", "empty"),
    ({"type": "etcd", "endpoints": ["127.0.0.1:2379"]}, "store.endpoints[0]", "not an etcd client URL"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "lease_ttl": 1}, "store.lease_ttl", "between 2 and 300"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "lease_ttl": 3, "timeout": 2.0}, "store.timeout", "too long"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "prefix": "fleetgate"}, "store.prefix", "start with '/'"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "cert_file": "nope.pem"}, "store.cert_file", "no such file"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "wake_without_store": ["ec2"]}, "store.wake_without_store",
     "no backend named 'ec2'"),
    ({"type": "etcd", "endpoints": ["http://e:2379"], "ttl": 5}, "store.ttl", "unknown key"),
    ({"type": "memory", "endpoints": ["http://e:2379"]}, "store.endpoints", "only meaningful"),
])
def test_store_errors_name_the_key_and_the_fix(d, store, key, words):
    found = issues(d, store)
    assert any(f"{key}:" in i and words in i for i in found), found


def test_tls_files_with_http_endpoint_refused(d):
    (d / "ca.pem").write_text("x")
    found = issues(d, {"type": "etcd", "endpoints": ["http://e:2379"], "ca_file": "ca.pem"})
    assert any("store.endpoints" in i and "https://" in i for i in found), found
