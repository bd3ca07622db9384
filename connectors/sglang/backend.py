"""KVStoreHiCacheStorage: SGLang's HiCache L3 storage (`HiCacheStorage`) on kvstore's Store.

SGLang builds it through `--hicache-storage-backend dynamic` as `cls(storage_config, kwargs)`,
then calls register_mem_pool_host(host_pool) before any I/O, then drives it from its prefetch
and backup threads (so every method is thread-safe; the Store and its tiers are).

- One stored object per SGLang page: K and V together, byte-for-byte the pool's flat data page
  (see host_pages.py). Key = wrap_key(namespace, SGLang's page hash), the namespace naming the
  model, the rank's KV shard, the host layout and the page geometry (settings.py).
- batch_set_v1 copies pages from the host pool straight into reserved DRAM slots and commits
  them (write-back to SSD follows off the caller's thread); batch_get_v1 copies the leading run
  of present pages from DRAM (SSD hits are promoted, checksum verified: a corrupt page is a
  miss) into the host pool. Pages after the first miss are not read.
- MLA: ranks that are not `is_storage_writer` store nothing and report success (the writer
  rank stores the same replicated KV), as SGLang's own backends do.
- Backends built in one process with the same kvstore config share one Store
  (connectors/shared_store.py): two ranks or a re-attached backend see each other's pages.
- Bad input (wrong index counts, indices outside the pool, tensors of the wrong size) raises a
  kvstore error and changes nothing; a store that cannot take or give a page answers False.
"""
from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any, List, Optional

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from kvstore import InvalidArgumentError
from kvstore.connectors.shared_store import shared_store
from kvstore.keys import wrap_key

from .host_pages import HostPages
from .settings import BackendSettings, page_namespace
from .storage_metrics import StorageMetricsRecorder

log = logging.getLogger(__name__)


class KVStoreHiCacheStorage(HiCacheStorage):
    def __init__(self, storage_config: Any, extra_kwargs: Optional[dict] = None):
        self.settings = BackendSettings.from_storage_config(storage_config, extra_kwargs)
        self.storage_config = storage_config
        self.store = shared_store(self.settings.store)
        self.pages: HostPages | None = None
        self._namespace: bytes | None = None
        self._metrics = StorageMetricsRecorder(self.settings.enable_metrics)
        self._lock = threading.Lock()  # guards registration only; I/O never holds it
        self._closed = False
        if not self.settings.zero_copy:
            log.info("KVStoreHiCacheStorage: interface_v1 is not set, SGLang will use the slower tensor-copy path")

    # ---- set-up ------------------------------------------------------------------------------
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        pages = HostPages.of(mem_pool_host)
        ns = page_namespace(self.settings, dtype=pages.dtype, host_layout=pages.host_layout,
                            page_tokens=pages.page_tokens, fingerprint=pages.fingerprint)
        with self._lock:
            super().register_mem_pool_host(mem_pool_host)
            self.pages, self._namespace = pages, ns

    # ---- zero-copy path (interface_v1) --------------------------------------------------------
    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        return self.store.lookup(self._keys(keys))

    def batch_set_v1(self, keys: List[str], host_indices: Any, extra_info: Any = None) -> List[bool]:
        pages = self._registered()
        addrs = pages.pieces(host_indices, len(keys))  # validate before anything is written
        if not self.settings.is_storage_writer or not keys:
            return [True] * len(keys)
        start = time.perf_counter()
        ok = self._store_pages(self._keys(keys), [lambda ptr, a=a: pages.page_to_object(a, ptr) for a in addrs])
        self._metrics.record("backup", sum(ok), sum(ok) * pages.object_nbytes, time.perf_counter() - start)
        return ok

    def batch_get_v1(self, keys: List[str], host_indices: Any, extra_info: Any = None) -> List[bool]:
        pages = self._registered()
        addrs = pages.pieces(host_indices, len(keys))
        start = time.perf_counter()
        ok = self._load_pages(self._keys(keys), [lambda ptr, a=a: pages.object_to_page(ptr, a) for a in addrs])
        self._metrics.record("prefetch", sum(ok), sum(ok) * pages.object_nbytes, time.perf_counter() - start)
        return ok

    # ---- tensor fallbacks (SGLang's generic path; same objects as the v1 path) ---------------
    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> Any:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Any = None, target_sizes: Any = None) -> List[Any]:
        pages = self._registered()
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        if len(targets) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(targets)} target locations")
        targets = [pages.empty_flat_page() if t is None else t for t in targets]
        ptrs = [pages.check_flat_page(t, "target location") for t in targets]
        copies = [lambda src, dst=dst: _memmove(dst, src, pages.object_nbytes) for dst in ptrs]
        ok = self._load_pages(self._keys(keys), copies)
        return [t if hit else None for t, hit in zip(targets, ok)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        pages = self._registered()
        values = list(values) if values is not None else []
        if len(values) != len(keys):
            raise InvalidArgumentError(f"{len(keys)} keys but {len(values)} values")
        ptrs = [pages.check_flat_page(v, "value") for v in values]
        if not self.settings.is_storage_writer:
            return True
        copies = [lambda dst, src=src: _memmove(dst, src, pages.object_nbytes) for src in ptrs]
        return all(self._store_pages(self._keys(keys), copies))

    # ---- maintenance -------------------------------------------------------------------------
    def clear(self) -> None:
        """Drops every idle page from the DRAM tier (SGLang's POST /hicache/storage-backend/clear).
        The SSD tier keeps its copies (it is the node's cache, shared with other users)."""
        self.store.evict("dram")

    def get_stats(self):
        return self._metrics.drain()

    def close(self) -> None:
        """Detach: the shared Store stays open for other backends in this process and is closed
        at exit; pending write-back is flushed so a restarted engine finds the pages on SSD."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.store.flush(timeout_s=30)

    # ---- helpers -----------------------------------------------------------------------------
    def _registered(self) -> HostPages:
        pages = self.pages
        if pages is None:
            raise InvalidArgumentError("KVStoreHiCacheStorage: register_mem_pool_host must be called before page I/O")
        return pages

    def _keys(self, keys: List[str]) -> list[bytes]:
        self._registered()
        return [wrap_key(self._namespace, k) for k in keys]

    def _store_pages(self, keys: list[bytes], fill) -> List[bool]:
        """Stores each key not stored yet (fill[i](object_ptr) writes it); per key: stored or
        already present. Works on the embedded store and through the node agent alike."""
        pages = self.pages
        return self.store.write_objects(keys, pages.object_nbytes, pages.fingerprint, lambda i, ptr: fill[i](ptr))

    def _load_pages(self, keys: list[bytes], drain) -> List[bool]:
        """Copies the leading run of present pages out (drain[i](object_ptr)); False from the
        first miss on, pages after it are not read."""
        pages = self.pages
        loaded = self.store.read_objects(keys, pages.object_nbytes, pages.fingerprint, lambda i, ptr: drain[i](ptr))
        return [i < loaded for i in range(len(keys))]


def _memmove(dst: int, src: int, nbytes: int) -> None:
    ctypes.memmove(dst, src, nbytes)
