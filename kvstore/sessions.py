"""Per-step transfer sessions for engines that pipeline by layer (the vLLM connector).

LoadSession pins every present chunk of a batch in DRAM (promoting SSD hits), then moves them
into the engine's blocks: at once for a host cache, layer by layer on a load stream for a CUDA
cache, where wait_layer(l, stream) makes the engine's stream wait for layer l on the device.
Chunks not found are reported in `missing` (the engine recomputes them); the others still load.

SaveSession reserves DRAM slots for the chunks not yet stored; for a CUDA cache save_layer(l,
stream) gathers layer l once the engine's stream has computed it; enqueue_rest() gathers what is
left without waiting (done_event completes with it), commit() waits, publishes the slots and
queues write-back; finish() does both.

Slots stay pinned (readers / writers) until close() or commit(), so DRAM eviction never takes
memory a transfer still uses. A session is used by one thread at a time (the engine's; the vLLM
worker hands a save to its finisher thread to wait and commit).
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


def _acquire(store, keys: list[bytes], layout: KVLayout) -> tuple[list[Slot | None], dict[str, int]]:
    """Pins every present chunk in DRAM (promoting SSD hits): a slot or None per key, hits by tier."""
    nbytes = layout.chunk_nbytes(store.config.chunk_tokens)
    slots: list[Slot | None] = []
    hits = {"dram": 0, "ssd": 0}
    try:
        for key in keys:
            try:
                slot, tier = store.acquire_for_load(key, nbytes, layout.fingerprint)
            except PoolFullError:  # DRAM holds only what this batch pinned: the rest recomputes
                slot, tier = None, ""
            slots.append(slot)
            if slot is not None:
                hits[tier] += 1
    except BaseException:  # e.g. an SSD read error: unpin what this call pinned
        for slot in slots:
            if slot is not None:
                store.dram.release(slot)
        raise
    return slots, hits


class Prefetch:
    """The first `layers` layers of a batch of chunks, copied from their DRAM slots into a device
    buffer before the engine has picked the blocks they go to: the vLLM scheduler knows a
    request's hits a few milliseconds before it allocates its blocks, and a load is bound by PCIe,
    so those milliseconds are worth moving bytes in. A LoadSession given the prefetch (same keys)
    takes its slots over and scatters those layers device to device; the rest load as usual.

    Object c's first `layers` layers lie at buffer + c * layers * layer_nbytes, so each chunk's
    device "object" is a prefix of a full object; the buffer has room for the last one's tail
    (it is never touched, but the plan checks the whole object range)."""

    @staticmethod
    def layers_that_fit(layout: KVLayout, chunk_tokens: int, chunks: int, buffer_nbytes: int) -> int:
        room = buffer_nbytes - layout.chunk_nbytes(chunk_tokens)
        return max(0, min(layout.num_layers, room // (chunks * layout.layer_nbytes(chunk_tokens)))) if chunks else 0

    def __init__(self, store: "Store", keys: list[bytes], layout: KVLayout, buffer_ptr: int, buffer_nbytes: int,
                 stream: int, copied_event: int, read_event: int):
        """Pins every key's object (raises LookupError, pinning nothing, if one is missing) and
        enqueues the copies on `stream` after `read_event` (the buffer's previous reader), then
        records `copied_event`."""
        from ._native import C
        chunk_tokens = store.config.chunk_tokens
        self.keys, self._store, self.layout = list(keys), store, layout
        self.layers = self.layers_that_fit(layout, chunk_tokens, len(keys), buffer_nbytes)
        if self.layers == 0:
            raise InvalidArgumentError(f"{len(keys)} chunks: not one layer fits a {buffer_nbytes}-byte buffer")
        slots, self.hits_by_tier = _acquire(store, self.keys, layout)
        self._slots = [s for s in slots if s is not None]
        if len(self._slots) < len(slots):
            self._release()
            raise LookupError("a chunk to prefetch is not stored")
        span = self.layers * layout.layer_nbytes(chunk_tokens)
        self.device_ptrs = [buffer_ptr + c * span for c in range(len(keys))]
        self.copied_event, self.read_event = copied_event, read_event
        try:
            C.cuda_stream_wait_event(stream, read_event)
            sources = np.array([s.ptr for s in self._slots], np.uint64)
            C.cuda_memcpy_segments(np.array(self.device_ptrs, np.uint64), sources, np.full(len(keys), span, np.int64),
                                   stream, C.cuda_batch_memcpy_supported())
            C.cuda_event_record(copied_event, stream)
        except BaseException:
            self._release()
            raise
        self._stream = stream

    @property
    def holds_slots(self) -> bool:
        return bool(self._slots)

    def take_slots(self) -> list[Slot]:
        """Hands the pinned slots to the load that uses this prefetch."""
        slots, self._slots = self._slots, []
        return slots

    def close(self, timeout_s: float = 60.0) -> None:
        """An unused prefetch: waits for its copies, then unpins the slots."""
        from .gpu_movers import _wait_event
        try:
            if self._slots:
                _wait_event(self.copied_event, timeout_s, "prefetch copy")
        finally:
            self._release()

    def _release(self) -> None:
        for slot in self._slots:
            self._store.dram.release(slot)
        self._slots = []


class LoadSession:
    def __init__(self, store: "Store", keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int,
                 layer_events=None, after_events=(), prefetch: Prefetch | None = None):
        """prefetch: the first layers of exactly these keys, already on the device (else ignored:
        the caller closes it)."""
        self._store = store
        self.layout = layout
        self.requested = len(keys)
        nbytes = layout.chunk_nbytes(store.config.chunk_tokens)
        self.invalid: list[int] = []   # chunk indices whose slot was reused while it was read (known at close)
        if prefetch is not None and (prefetch.keys != list(keys) or not layout.is_cuda):
            prefetch = None
        if prefetch is not None:
            slots, hits = prefetch.take_slots(), prefetch.hits_by_tier
        else:
            slots, hits = _acquire(store, keys, layout)
        self._slots = [s for s in slots if s is not None]
        self._slot_chunks = [c for c, s in enumerate(slots) if s is not None]  # chunk index of each slot
        self.missing = [c for c, s in enumerate(slots) if s is None]  # chunks not loaded (known at start)
        loaded = self._slot_chunks
        trace.mark("load.slots_acquired")
        self.hits_by_tier = {t: n for t, n in hits.items() if n}
        store.record_load(self.hits_by_tier, self.requested, len(loaded), nbytes)
        self._parts: list = []  # LayerwiseLoads, each over a range of layers
        if not self._slots:
            return
        chunk_ids = _chunk_ids(ids, loaded, bpc)
        ptrs = [s.ptr for s in self._slots]
        try:
            if layout.is_cuda:
                self._start_gpu(layout, chunk_ids, ptrs, bpc, layer_events, after_events, prefetch)
                _count_gpu_transfer(store, "loads", self._parts[-1].path_name, chunk_ids, bpc)
            else:
                movers.scatter(layout, chunk_ids, ptrs, bpc)
                self._release()
        except BaseException:
            self.close()
            raise

    def _start_gpu(self, layout, chunk_ids, ptrs, bpc, layer_events, after_events, prefetch) -> None:
        from ._native import C
        from .gpu_movers import LayerwiseLoad
        split = prefetch.layers if prefetch is not None else 0
        events = list(layer_events) if layer_events is not None else None
        if split:  # layers [0, split) from the device buffer, after its copies
            part = LayerwiseLoad(layout, chunk_ids, prefetch.device_ptrs, bpc, layers=(0, split), keepalive=prefetch,
                                 events=events[:split] if events else None)
            self._parts.append(part)
            part.start(after_stream=0, after_events=[*after_events, prefetch.copied_event])
            C.cuda_event_record(prefetch.read_event, part.stream)  # the buffer may be reused after this
        if split < layout.num_layers:
            part = LayerwiseLoad(layout, chunk_ids, ptrs, bpc, layers=(split, layout.num_layers),
                                 keepalive=self._slots, events=events[split:] if events else None)
            self._parts.append(part)
            trace.mark("load.plan_ready")
            part.start(after_stream=0, after_events=after_events)
        trace.mark("load.all_layers_enqueued")

    @property
    def on_gpu(self) -> bool:
        """True while a CUDA transfer holds the slots (until close)."""
        return bool(self._parts)

    @property
    def loaded_chunks(self) -> int:
        return self.requested - len(self.missing)

    def wait_layer(self, layer: int, stream: Any = 0) -> None:
        """Makes `stream` wait on the device until layer `layer` has arrived (CUDA); no-op for host
        caches, which were filled when the session started."""
        for part in self._parts:
            if part.layers[0] <= layer < part.layers[1]:
                part.wait_layer(layer, stream)
                return
        if self._parts:
            raise InvalidArgumentError(f"layer {layer} outside [0, {self.layout.num_layers})")

    def close(self, timeout_s: float = 60.0) -> None:
        """Waits for the transfer on the host and unpins the slots. Call once the engine no
        longer needs the loads in flight (after its step)."""
        try:
            for part in self._parts:
                part.wait(timeout_s)
        finally:
            for part in self._parts:
                part.close()
            self._parts = []
            self._release()

    def _release(self) -> None:
        for slot, chunk in zip(self._slots, self._slot_chunks):
            if self._store.dram.release(slot) is False:  # the agent's generation check failed
                self.invalid.append(chunk)
        self._slots, self._slot_chunks = [], []


class SaveSession:
    def __init__(self, store: "Store", keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int,
                 depths=None):
        """depths: each chunk's index in its token sequence, if known (DRAM eviction takes deep
        chunks first); one per key, checked before anything is reserved."""
        if depths is not None and len(depths) != len(keys):
            raise InvalidArgumentError(f"{len(depths)} depths for {len(keys)} keys")
        self._store = store
        self.layout = layout
        nbytes = layout.chunk_nbytes(store.config.chunk_tokens)
        reserved, self.skipped, self.failed_keys = store.reserve_for_save(keys, nbytes, layout.fingerprint, depths)
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
        trace.mark("save.layer")

    def enqueue_rest(self, stream: Any = 0) -> None:
        """Gathers the layers not saved yet after the work already issued to `stream` (by default
        the legacy default stream) and returns at once (CUDA); host caches are gathered here.
        The slots are published by commit()."""
        if not self._slots or self._gathered:
            return
        try:
            if self._gpu is not None and not self._saved_layers:  # all of them: one gather
                self._gpu.save_layers(0, self.layout.num_layers, stream)
                self._saved_layers.update(range(self.layout.num_layers))
            elif self._gpu is not None:
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
        the number of chunks stored. Call after enqueue_rest. The CUDA handle (stream, events,
        plan) stays until release_gpu(): another thread may still be making a stream wait on
        done_event."""
        if not self._slots:
            return 0
        if not self._gathered:
            raise InvalidArgumentError("SaveSession.commit before enqueue_rest")
        self.wait(timeout_s)
        slots, self._slots = self._slots, []
        self._store.commit_saved(slots)
        return len(slots)

    def release_gpu(self) -> None:
        """Frees the CUDA stream, events and plan (stream-ordered: safe with gathers in flight)."""
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def finish(self, timeout_s: float = 60.0, stream: Any = 0) -> int:
        """enqueue_rest(stream), commit(timeout_s), release_gpu(): the whole save, on the host's time."""
        self.enqueue_rest(stream)
        try:
            return self.commit(timeout_s)
        finally:
            self.release_gpu()

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
