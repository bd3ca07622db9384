"""kvstore's SGLang HiCache L3 storage backend (SGLang 0.5.23 `HiCacheStorage`).

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "kvstore.connectors.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "store": {"dram_capacity_bytes": "32GiB", "ssd_path": "/nvme/kvstore"}}'

Extra config keys: see settings.py. Importing this package imports SGLang.
"""
from .backend import KVStoreHiCacheStorage

__all__ = ["KVStoreHiCacheStorage"]
