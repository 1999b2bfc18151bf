"""Where fleet-wide coordination state lives: in this process (memory) or in etcd (several replicas).

`build_store(config)` returns the store for a config: a MemoryStore without a [store]
section (one gateway, every decision in the Fleet's own memory, exactly as before) or an
EtcdStore for `[store] type = "etcd"`. See docs/ha.md.
"""

from __future__ import annotations

from .base import MachineView, Store, StoreConfig, StoreUnavailable
from .memory import MemoryStore

__all__ = ["MachineView", "MemoryStore", "Store", "StoreConfig", "StoreUnavailable", "build_store"]


def build_store(config, metrics=None) -> Store:
    sc = getattr(config, "store", None)
    if sc is None or sc.type == "memory":
        return MemoryStore()
    from .client import EtcdClient
    from .etcd import EtcdStore

    return EtcdStore(EtcdClient.from_config(sc), sc, metrics=metrics)
