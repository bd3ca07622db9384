"""Per-step transfer sessions for engines that pipeline by layer (the vLLM connector).

LoadSession pins every present chunk of a batch in DRAM (promoting SSD hits), then moves them
into the engine's blocks: at once for a host cache, layer by layer on a load stream for a CUDA
cache, where wait_layer(l, stream) makes the engine's stream wait for layer l on the device.
Chunks not found are reported in `missing` (the engine recomputes them); the others still load.

SaveSession reserves DRAM slots for the chunks not yet stored; for a CUDA cache save_layer(l,
stream) gathers layer l once the engine's stream has computed it; enqueue_rest() gathers what is
left without waiting (done_event completes with it), commit() waits, publishes the slots and
queues write-back; finish() does both.

Slots stay pinned (readers / writers) until close() or finish(), so DRAM eviction never takes
memory a transfer still uses. Both sessions are single-threaded objects (one engine step).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import movers, trace
from .errors import InvalidArgumentError, PoolFullError
from .layout import KVLayout
from .pinned_pool import Slot

if TYPE_CHECKING:
    from .store import Store


def _chunk_ids(ids: np.ndarray, chunks: list[int], bpc: int) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([ids[c * bpc:(c + 1) * bpc] for c in chunks])


def _count_gpu_transfer(store, kind: str, path: str, ids: np.ndarray, bpc: int) -> None:
    """Counters of the GPU path a session took and of how its block ids run (consecutive ids can
    merge into long DMA segments): blocks / runs = the mean run length."""
    store.stats_counters.add(f"gpu_{kind}.{path}")
    real = ids.reshape(-1, bpc)
    starts = np.ones(real.shape, dtype=bool)
    starts[:, 1:] = real[:, 1:] != real[:, :-1] + 1
    valid = real >= 0
    store.stats_counters.add(f"gpu_{kind}_blocks", int(valid.sum()))
    store.stats_counters.add(f"gpu_{kind}_block_runs", int((starts & valid).sum()))


class LoadSession:
    def __init__(self, store: "Store", keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int,
                 layer_events=None, after_events=()):
        self._store = store
        self.layout = layout
        self.requested = len(keys)
        nbytes = layout.chunk_nbytes(store.config.chunk_tokens)
        self._slots: list[Slot] = []
        self._slot_chunks: list[int] = []  # chunk index of each held slot
        self.missing: list[int] = []   # chunk indices not loaded (known when the session starts)
        self.invalid: list[int] = []   # chunk indices whose slot was reused while it was read (known at close)
        hits = {"dram": 0, "ssd": 0}
        loaded: list[int] = []
        for c, key in enumerate(keys):
            try:
                slot, tier = store.acquire_for_load(key, nbytes, layout.fingerprint)
            except PoolFullError:  # DRAM holds only what this batch pinned: the rest recomputes
                slot, tier = None, ""
            if slot is None:
                self.missing.append(c)
                continue
            self._slots.append(slot)
            self._slot_chunks.append(c)
            loaded.append(c)
            hits[tier] += 1
        trace.mark("load.slots_acquired")
        store.record_load({t: n for t, n in hits.items() if n}, self.requested, len(loaded), nbytes)
        self.hits_by_tier = {t: n for t, n in hits.items() if n}
        self._gpu = None
        if not self._slots:
            return
        chunk_ids = _chunk_ids(ids, loaded, bpc)
        ptrs = [s.ptr for s in self._slots]
        try:
            if layout.is_cuda:
                from .gpu_movers import LayerwiseLoad
                self._gpu = LayerwiseLoad(layout, chunk_ids, ptrs, bpc, keepalive=self._slots, events=layer_events)
                trace.mark("load.plan_ready")
                self._gpu.start(after_stream=0, after_events=after_events)
                trace.mark("load.all_layers_enqueued")
                _count_gpu_transfer(store, "loads", self._gpu.path_name, chunk_ids, bpc)
            else:
                movers.scatter(layout, chunk_ids, ptrs, bpc)
                self._release()
        except BaseException:
            self.close()
            raise

    @property
    def on_gpu(self) -> bool:
        """True while a CUDA transfer holds the slots (until close)."""
        return self._gpu is not None

    @property
    def loaded_chunks(self) -> int:
        return self.requested - len(self.missing)

    def wait_layer(self, layer: int, stream: Any = 0) -> None:
        """Makes `stream` wait on the device until layer `layer` has arrived (CUDA); no-op for host
        caches, which were filled when the session started."""
        if self._gpu is not None:
            self._gpu.wait_layer(layer, stream)

    def close(self, timeout_s: float = 60.0) -> None:
        """Waits for the transfer on the host and unpins the slots. Call once the engine no
        longer needs the loads in flight (after its step)."""
        try:
            if self._gpu is not None:
                self._gpu.wait(timeout_s)
        finally:
            if self._gpu is not None:
                self._gpu.close()
                self._gpu = None
            self._release()

    def _release(self) -> None:
        for slot, chunk in zip(self._slots, self._slot_chunks):
            if self._store.dram.release(slot) is False:  # the agent's generation check failed
                self.invalid.append(chunk)
        self._slots, self._slot_chunks = [], []


class SaveSession:
    def __init__(self, store: "Store", keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int):
        self._store = store
        self.layout = layout
        nbytes = layout.chunk_nbytes(store.config.chunk_tokens)
        reserved, self.skipped, self.failed_keys = store.reserve_for_save(keys, nbytes, layout.fingerprint)
        self._slots = [slot for _, slot in reserved]
        self._ids = _chunk_ids(ids, [c for c, _ in reserved], bpc)
        self._bpc = bpc
        self._saved_layers: set[int] = set()
        self._gathered = False
        self._gpu = None
        if self._slots and layout.is_cuda:
            try:
                from .gpu_movers import LayerwiseSave
                self._gpu = LayerwiseSave(layout, self._ids, [s.ptr for s in self._slots], bpc,
                                          keepalive=self._slots)
                _count_gpu_transfer(store, "saves", self._gpu.path_name, self._ids, bpc)
            except BaseException:
                self._abort()
                raise

    @property
    def stored(self) -> int:
        return len(self._slots)

    def save_layer(self, layer: int, stream: Any = 0) -> None:
        """Gathers layer `layer` once `stream` has computed it (CUDA); host caches are gathered
        in enqueue_rest()."""
        if self._gpu is None or layer in self._saved_layers:
            return
        if not 0 <= layer < self.layout.num_layers:
            raise InvalidArgumentError(f"layer {layer} outside [0, {self.layout.num_layers})")
        self._gpu.save_layer(layer, stream)
        self._saved_layers.add(layer)

    def enqueue_rest(self, stream: Any = 0) -> None:
        """Gathers the layers not saved yet after the work already issued to `stream` (by default
        the legacy default stream) and returns at once (CUDA); host caches are gathered here.
        The slots are published by commit()."""
        if not self._slots or self._gathered:
            return
        try:
            if self._gpu is not None:
                for layer in range(self.layout.num_layers):
                    if layer not in self._saved_layers:
                        self._gpu.save_layer(layer, stream)
                        self._saved_layers.add(layer)
            else:
                movers.gather(self.layout, self._ids, [s.ptr for s in self._slots], self._bpc)
        except BaseException:
            self.abort()
            raise
        self._gathered = True

    @property
    def done_event(self) -> int | None:
        """CUDA event that completes with the last gather (after enqueue_rest), else None. A
        stream that waits on it may overwrite the saved blocks."""
        return self._gpu.last_event if self._gpu is not None else None

    def wait(self, timeout_s: float = 60.0) -> None:
        """Host wait until every gather enqueued so far has reached the slots."""
        if self._gpu is not None:
            self._gpu.wait(timeout_s)

    def commit(self, timeout_s: float = 60.0) -> int:
        """Waits for the gathers (see wait), publishes the slots and queues write-back; returns
        the number of chunks stored. Call after enqueue_rest."""
        if not self._slots:
            return 0
        if not self._gathered:
            raise InvalidArgumentError("SaveSession.commit before enqueue_rest")
        self.wait(timeout_s)
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        slots, self._slots = self._slots, []
        self._store.commit_saved(slots)
        return len(slots)

    def finish(self, timeout_s: float = 60.0, stream: Any = 0) -> int:
        """enqueue_rest(stream) then commit(timeout_s): the whole save, on the host's time."""
        self.enqueue_rest(stream)
        return self.commit(timeout_s)

    def abort(self) -> None:
        """Drops the reserved slots without publishing anything (after the gathers in flight:
        the slots are not reused while a gather may still write them)."""
        if self._gpu is not None:
            try:
                self._gpu.wait(60.0)
            finally:
                self._gpu.close()
                self._gpu = None
        self._abort()

    def _abort(self) -> None:
        for slot in self._slots:
            self._store.dram.abort(slot)
        self._slots = []
