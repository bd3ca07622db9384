"""One embedded Store per process and configuration, shared by every connector instance in it.

vLLM with TP=1 runs its scheduler-side and worker-side connectors in one process; SGLang builds
a backend per rank and may rebuild it. Both must see the same cache with no configuration, so
instances ask here instead of constructing Store themselves. Stores live until process exit.
"""
from __future__ import annotations

import atexit
import threading

from kvstore import Config, Store

_lock = threading.Lock()
_stores: dict[Config, Store] = {}


def shared_store(config: Config) -> Store:
    with _lock:
        store = _stores.get(config)
        if store is None:
            store = _stores[config] = Store(config)
        return store


@atexit.register
def _close_all() -> None:
    with _lock:
        for store in _stores.values():
            store.close(timeout_s=30)
        _stores.clear()
