"""Store: the embedded kvstore (DESIGN.md §4): the pinned DRAM tier plus the SSD tier in this
process, no services.

- lookup(keys) -> length of the leading run of keys present in any tier (pins nothing).
- save(keys, layout, block_ids) gathers chunk i from block_ids[i*bpc:(i+1)*bpc] of the engine's
  cache into a DRAM slot and commits it; write-back to SSD follows off the caller's path. The
  source blocks must stay unchanged until the handle completes.
- load(keys, layout, block_ids) scatters the leading run of present chunks into the blocks,
  promoting SSD hits into DRAM on the way; the result says how many chunks arrived, and the
  caller recomputes the rest. A block id of SKIP_BLOCK (-1) leaves that block untouched (the
  engine already holds it, e.g. a GPU prefix hit that ends inside a chunk).
Input is validated before a handle is returned: bad input raises and changes nothing.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Sequence

import numpy as np

from . import metrics, movers
from ._native import C
from .config import Config
from .errors import InvalidArgumentError, PoolFullError, StoreClosedError
from .handles import Handle, LoadResult, SaveResult, completed
from .keys import check_keys
from .layout import KVLayout
from .pinned_pool import PinnedPool, Slot
from .ssd_tier import SsdTier
from .object_io import acquire_for_load, read_leading_run, write_objects
from .writeback import WriteBack

SKIP_BLOCK = -1  # csrc/layout.h kSkipBlock


class Store:
    def __new__(cls, config: Config | None = None, *, config_file: str | None = None, **overrides):
        """With config.agent set (e.g. Store(agent="unix:///run/kvstore.sock") or KVSTORE_AGENT=auto)
        the store is the node agent's: an AgentStore with the same methods (kvstore/agent_store.py)."""
        cfg = config if config is not None else Config.load(config_file, **overrides)
        if cls is Store and cfg.agent is not None:
            from .agent_store import AgentStore
            return AgentStore(cfg)
        return super().__new__(cls)

    def __init__(self, config: Config | None = None, *, config_file: str | None = None, **overrides):
        self.config = config if config is not None else Config.load(config_file, **overrides)
        cfg = self.config
        self.stats_counters = metrics.StoreStats()
        C.configure_pools(cfg.cpu_threads, cfg.io_threads)
        self.dram = PinnedPool(cfg.dram_capacity_bytes, cfg.dram_slab_bytes, pin=cfg.pin_memory,
                               on_evict=lambda slot: self.stats_counters.add("evictions", tier="dram"))
        self.ssd = None
        if cfg.ssd_path is not None:
            self.ssd = SsdTier(cfg.ssd_path, cfg.ssd_capacity_bytes, cfg.ssd_slab_bytes, cfg.ssd_direct_io,
                               on_event=lambda name, n: self.stats_counters.add(name, n, tier="ssd"))
        self._writeback = None
        if cfg.write_back and self.ssd is not None:
            self._writeback = WriteBack(self.dram, self.ssd, on_written=lambda n: self.stats_counters.add(
                "bytes", n, tier="dram", dst="ssd"))
        self._jobs = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-job")
        self._closed = False
        self._close_lock = threading.Lock()
        if cfg.metrics_port:
            metrics.serve(cfg.metrics_port)

    # ---- queries -----------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the leading run of keys stored in DRAM or SSD (pins nothing)."""
        return self.lookup_writing(keys)[0]

    def lookup_writing(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """lookup(), and whether the run stops at a key a save is still writing (an engine may
        ask again shortly rather than recompute that prefix)."""
        self._check_open()
        start = time.perf_counter()
        keys = check_keys(keys)
        n = 0
        for key in keys:
            if not (self.dram.contains(key) or (self.ssd is not None and self.ssd.contains(key))):
                break
            n += 1
        metrics.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return n, n < len(keys) and self.dram.is_writing(keys[n])

    # ---- save --------------------------------------------------------------------------------
    def save(self, keys: Sequence[bytes], layout: KVLayout, block_ids: Sequence[int] | np.ndarray) -> Handle[SaveResult]:
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=False)
        if not keys:
            return completed(SaveResult(0, 0))
        return Handle(self._jobs.submit(self._timed, "save", self._save, keys, layout, ids, bpc))

    def _save(self, keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int) -> SaveResult:
        nbytes = layout.chunk_nbytes(self.config.chunk_tokens)
        slots, skipped, failed = self.reserve_for_save(keys, nbytes, layout.fingerprint)
        if not slots:
            return SaveResult(0, skipped, failed)
        chunk_ids = np.concatenate([ids[i * bpc:(i + 1) * bpc] for i, _ in slots])
        try:
            movers.gather(layout, chunk_ids, [s.ptr for _, s in slots], bpc)
        except BaseException:
            for _, slot in slots:
                self.dram.abort(slot)
            raise
        self.commit_saved([s for _, s in slots])
        return SaveResult(len(slots), skipped, failed)

    # ---- load --------------------------------------------------------------------------------
    def load(self, keys: Sequence[bytes], layout: KVLayout, block_ids: Sequence[int] | np.ndarray) -> Handle[LoadResult]:
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=True)
        if not keys:
            return completed(LoadResult(0, 0))
        return Handle(self._jobs.submit(self._timed, "load", self._load, keys, layout, ids, bpc))

    def _load(self, keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int) -> LoadResult:
        nbytes = layout.chunk_nbytes(self.config.chunk_tokens)
        hits = {"dram": 0, "ssd": 0}
        held: list[Slot] = []
        loaded = 0

        def scatter_held() -> None:
            nonlocal loaded
            if not held:
                return
            try:
                chunk_ids = ids[loaded * bpc:(loaded + len(held)) * bpc]
                movers.scatter(layout, chunk_ids, [s.ptr for s in held], bpc)
                loaded += len(held)
            finally:
                for s in held:
                    self.dram.release(s)
                held.clear()

        try:
            for key in keys:
                try:
                    slot, tier = self.acquire_for_load(key, nbytes, layout.fingerprint)
                except PoolFullError:  # our own held slots fill DRAM: move them out first
                    scatter_held()
                    slot, tier = self.acquire_for_load(key, nbytes, layout.fingerprint)
                if slot is None:
                    break
                held.append(slot)
                hits[tier] += 1
            scatter_held()
        finally:
            for s in held:
                self.dram.release(s)
        self.record_load(hits, len(keys), loaded, nbytes)
        return LoadResult(loaded, len(keys), {t: n for t, n in hits.items() if n})

    def acquire_for_load(self, key: bytes, nbytes: int, fingerprint: int) -> tuple[Slot | None, str]:
        """Pins key's object in DRAM for reading, promoting it from SSD if needed (object_io.py).
        Raises PoolFullError when DRAM has no room for a promotion."""
        return acquire_for_load(self.dram, self.ssd, key, nbytes, fingerprint, on_promoted=lambda n: (
            self.stats_counters.add("bytes", n, tier="ssd", dst="dram")))

    # ---- raw objects (engines that own their host pages: SGLang) -------------------------------
    def write_objects(self, keys: Sequence[bytes], nbytes: int, fingerprint: int,
                      fill: Callable[[int, int], None]) -> list[bool]:
        """Stores the keys not stored yet: fill(i, object_ptr) writes object i into its slot.
        Per key: stored now or already present (False: no room)."""
        return write_objects(self, check_keys(keys), nbytes, fingerprint, fill,
                             abort=lambda slots: [self.dram.abort(s) for s in slots])

    def read_objects(self, keys: Sequence[bytes], nbytes: int, fingerprint: int,
                     drain: Callable[[int, int], None]) -> int:
        """Copies out the leading run of present objects (drain(i, object_ptr)); returns its length."""
        keys = check_keys(keys)
        loaded, hits = read_leading_run(_PinnedReads(self), keys, nbytes, fingerprint, drain)
        self.record_load(hits, len(keys), loaded, nbytes)
        return loaded

    def begin_load(self, keys: Sequence[bytes], layout: KVLayout, block_ids,
                   layer_events: Sequence[int] | None = None, after_events: Sequence[int] = (),
                   prefetch=None) -> "LoadSession":
        """A layer-wise load of every present chunk (not only the leading run); see sessions.py.
        layer_events: the caller's CUDA events, one per layer, recorded when that layer has
        arrived (kept across sessions, e.g. waited on inside captured CUDA graphs).
        after_events: CUDA events the loads wait for on the device (e.g. saves still reading
        blocks the loads will overwrite). prefetch: a sessions.Prefetch of exactly these keys."""
        from .sessions import LoadSession
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=True)
        return LoadSession(self, keys, layout, ids, bpc, layer_events, after_events, prefetch)

    def begin_save(self, keys: Sequence[bytes], layout: KVLayout, block_ids,
                   depths: Sequence[int] | None = None) -> "SaveSession":
        """A layer-wise save of the chunks not yet stored; see sessions.py. depths: each chunk's
        index in its token sequence, if known (DRAM eviction takes deep chunks first)."""
        from .sessions import SaveSession
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=False)
        return SaveSession(self, keys, layout, ids, bpc, depths)

    def reserve_for_save(self, keys: list[bytes], nbytes: int, fingerprint: int, depths: Sequence[int] | None = None
                         ) -> tuple[list[tuple[int, Slot]], int, list[bytes]]:
        """DRAM slots for the keys not stored yet: ([(index in keys, slot)], skipped, failed)."""
        slots: list[tuple[int, Slot]] = []
        skipped, failed = 0, []
        for i, key in enumerate(keys):
            if self.ssd is not None and self.ssd.contains(key):
                skipped += 1
                continue
            try:
                slot = self.dram.reserve(key, nbytes, fingerprint, depths[i] if depths is not None else 0)
            except PoolFullError:
                failed.append(key)
                self.stats_counters.add("dropped", tier="dram")
                continue
            if slot is None:
                skipped += 1
            else:
                slots.append((i, slot))
        return slots, skipped, failed

    def commit_saved(self, slots: list[Slot]) -> None:
        """Publishes gathered slots and queues them for write-back to SSD."""
        for slot in slots:
            self.dram.commit(slot)
        if slots:
            self.stats_counters.add("bytes", sum(s.nbytes for s in slots), tier="engine", dst="dram")
        if self._writeback is not None and slots:
            self._writeback.enqueue([s.key for s in slots])

    def record_load(self, hits: dict[str, int], requested: int, loaded: int, nbytes: int) -> None:
        for tier, n in hits.items():
            self.stats_counters.add("hits", n, tier=tier)
        self.stats_counters.add("misses", requested - loaded)
        self.stats_counters.add("bytes", loaded * nbytes, tier="dram", dst="engine")

    def preallocate(self, layout: KVLayout) -> int:
        """Pins the whole DRAM tier now for this layout's chunk size (engines call it at start-up)."""
        return self.dram.preallocate(layout.chunk_nbytes(self.config.chunk_tokens))

    # ---- maintenance -------------------------------------------------------------------------
    def flush(self, timeout_s: float = 60.0) -> bool:
        """Waits until write-back has put every saved object on SSD; False on timeout."""
        return self._writeback.flush(timeout_s) if self._writeback is not None else True

    def evict(self, tier: str = "dram") -> int:
        """Drops every idle object of a tier (DRAM: those with no readers); returns the count."""
        if tier == "dram":
            return self.dram.evict_all()
        raise InvalidArgumentError(f"evict: unknown tier {tier!r} (only 'dram')")

    def stats(self) -> dict:
        return {
            "dram": {"objects": len(self.dram), "used_bytes": self.dram.used_bytes(),
                     "allocated_bytes": self.dram.allocated_bytes, "capacity_bytes": self.dram.capacity_bytes,
                     "pinned": self.dram.pinned},
            "ssd": None if self.ssd is None else {"objects": len(self.ssd), "file_bytes": self.ssd.file_bytes(),
                                                  "capacity_bytes": self.ssd.capacity_bytes,
                                                  "path": str(self.ssd.path)},
            "counters": self.stats_counters.snapshot(),
        }

    def close(self, timeout_s: float = 60.0) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.shutdown(wait=True)
        if self._writeback is not None:
            self._writeback.close(timeout_s)
        if self.ssd is not None:
            self.ssd.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("store is closed")

    def _validate(self, keys, layout: KVLayout, block_ids, *, allow_skip: bool) -> tuple[list[bytes], np.ndarray, int]:
        self._check_open()
        keys = check_keys(keys)
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentError(f"layout must be a KVLayout, got {type(layout).__name__}")
        bpc = layout.blocks_per_chunk(self.config.chunk_tokens)
        ids = np.asarray(block_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InvalidArgumentError("block_ids must be a 1-D sequence of ints")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(keys) * bpc:
            raise InvalidArgumentError(f"{len(keys)} chunks of {bpc} blocks need {len(keys) * bpc} block ids, "
                                       f"got {len(ids)}")
        low = SKIP_BLOCK if allow_skip else 0
        if ids.size and (ids.min() < low or ids.max() >= layout.num_blocks):
            bad = ids[(ids < low) | (ids >= layout.num_blocks)][0]
            raise InvalidArgumentError(f"block id {bad} out of range [{low}, {layout.num_blocks})")
        return keys, ids, bpc

    def _timed(self, op: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            metrics.TRANSFER_SECONDS.labels(op=op).observe(time.perf_counter() - start)


class _PinnedReads:
    """read_leading_run's source over the embedded tiers."""

    def __init__(self, store: Store):
        self.acquire_for_load = store.acquire_for_load
        self._dram = store.dram

    def release(self, slot: Slot) -> None:
        self._dram.release(slot)
