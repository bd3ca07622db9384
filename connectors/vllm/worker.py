"""Worker half of KVStoreConnector: moves the chunks the scheduler planned; decides nothing.

Per step: start_load_kv opens one LoadSession for every load of the step (one launch per layer
for all chunks) and one SaveSession for every save; wait_for_layer_load(layer) makes the current
CUDA stream wait for that layer's load; save_kv_layer gathers a layer after the stream computed
it; wait_for_save enqueues the gathers left and closes the loads. Host (CPU) caches move whole
chunks at once. Chunks that fail to load are reported by get_block_ids_with_load_errors so vLLM
recomputes them.

Transfers finish off the step (CUDA): wait_for_save waits neither for the gathers nor for the
loads (the forward waits for those on the device). A finisher thread publishes each save's
chunks once its last gather has completed; a load's slots are unpinned when the next step's
loads start (so at most one step's loads are pinned, as the scheduler's budget assumes). Until
a save is published the blocks it reads may belong to a request that finished and may be handed
to another: so a later step's forward (its stream) and loads wait on the device for the saves in
flight that read a block the step writes (the scheduler lists those: written_block_ids). The
host waits only when more than _MAX_SAVES_IN_FLIGHT saves are outstanding, for loads through the
agent, and for loads that are not layer-wise (see _finish_loads).

CUDA graphs: vLLM keeps its FULL graphs (cuda_graphs="full"). While it captures them the layer
hooks put a wait on a per-layer event into the graph; every load records those same events, so a
replay waits for the step's loads (start_load_kv enqueues them all before the forward is
launched). Layers a graph ran without calling save_kv_layer are gathered in wait_for_save, after
the forward on the current stream.

Early start: when this worker lives in the scheduler's process (one GPU, vLLM's in-process
executor), the scheduler half hands it the step's metadata as soon as it is built and the loads
start then, not at start_load_kv: the 2-6 ms vLLM spends preparing the step's inputs overlap the
transfer. The metadata carries early_load_id so start_load_kv does not load twice. Earlier still,
when the scheduler half promises a request's hits (get_num_new_matched_tokens), prefetch() copies
the first layers that fit a device buffer while vLLM allocates the blocks (sessions.Prefetch).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstore import KVLayout, KVStoreError, gpu_movers
from kvstore._native import C
from kvstore.sessions import LoadSession, Prefetch, SaveSession
from kvstore.store import Store

from .metadata import SKIP_BLOCK, ChunkTransfer, KVStoreConnectorMetadata
from .settings import ConnectorSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def layout_of_vllm_caches(tensors: list, *, head_size: int | None, mla: bool) -> KVLayout:
    """vLLM >= 0.33 hands per-layer [B,H,N,C] views (K|V packed along C); older releases hand
    FlashAttention's [2,B,N,H,D], FlashInfer's [B,2,N,H,D] or MLA's [B,N,D] per layer."""
    shape = tuple(tensors[0].shape)
    if len(shape) == 4:
        return KVLayout.from_vllm(tensors, head_size=head_size, mla=mla)
    if len(shape) == 5 and shape[0] == 2:
        return KVLayout.from_flash_attn(tensors)
    if len(shape) == 5 and shape[1] == 2:
        return KVLayout.from_flashinfer(tensors)
    if len(shape) == 3 and mla:
        return KVLayout.from_mla(tensors)
    raise KVStoreError(f"unrecognised vLLM KV cache tensor shape {shape}")


# Workers that live in the scheduler's process (one GPU, in-process executor), by engine id: the
# scheduler half starts a step's loads through them as soon as it has planned the step.
_IN_PROCESS: dict[str, "ConnectorWorker"] = {}


def in_process_worker(engine_id: str | None) -> "ConnectorWorker | None":
    return _IN_PROCESS.get(engine_id) if engine_id else None


_MAX_SAVES_IN_FLIGHT = 8     # saves the finisher has yet to publish; more block the step
_TRANSFER_TIMEOUT_S = 60.0   # a save not gathered by then is dropped (never published)


class ConnectorWorker:
    def __init__(self, vllm_config, settings: ConnectorSettings, store: Store):
        self._settings = settings
        self._store = store
        self._engine_id = getattr(vllm_config.kv_transfer_config, "engine_id", None)
        self._single_gpu = vllm_config.parallel_config.world_size == 1
        self._block_size = vllm_config.cache_config.block_size
        self._mla = bool(getattr(vllm_config.model_config, "use_mla", False))
        self._head_size = None if self._mla else vllm_config.model_config.get_head_size()
        self.layout: KVLayout | None = None
        self._layer_index: dict[str, int] = {}
        self._kernel_blocks_per_block = 1
        self._load: LoadSession | None = None
        self._load_ids: list[int] = []  # scheduler block ids of the step's loads, chunk-major
        self._load_chunks = 0
        self._save: SaveSession | None = None
        self._save_blocks = np.zeros(0, dtype=np.int64)  # scheduler block ids the step's save reads
        # Saves whose gathers were enqueued, until the finisher has published them, with the
        # (sorted) block ids they read. Their CUDA handles are freed on this (the engine's)
        # thread only (_saves_to_release), since it may still be making a stream wait on them.
        self._saves_in_flight: dict[SaveSession, np.ndarray] = {}
        self._saves_to_release: list[SaveSession] = []
        self._in_flight_lock = threading.Lock()
        self._to_finish: queue.Queue = queue.Queue(maxsize=_MAX_SAVES_IN_FLIGHT)
        self._finisher: threading.Thread | None = None
        # The last step's layer-wise load, unpinned when the next loads start (its forward waited
        # for it on the device; the host need not wait for it on the step).
        self._done_load: LoadSession | None = None
        # The agent checks a slot's generation after it was read (reused slot -> recompute): that
        # check needs the loads done before the step reports its load errors.
        self._loads_checked_after_read = not isinstance(store, Store)
        self._load_errors: set[int] = set()
        # One CUDA event per layer, recorded by every step's layer-wise load when that layer has
        # arrived. FULL CUDA graphs captured by vLLM wait on them (external-event nodes made in
        # wait_for_layer_load during capture), so a replay waits for the step's loads, if any.
        self._layer_events: list[int] = []
        self.captured_waits = 0
        self._told_captures = False
        self._early_id = 0
        # Prefetch (same process as the scheduler only): one at a time, into a buffer kept for it.
        self._prefetch: Prefetch | None = None
        self._prefetch_lock = threading.Lock()
        self._prefetch_buffer = None  # torch uint8 tensor on the cache's device
        self._prefetch_stream = 0
        self._prefetch_events: tuple[int, int] | None = None  # (copied, read)
        self.captures_waits = settings.layerwise and settings.cuda_graphs == "full"

    # ---- set-up ------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        self.layout = layout_of_vllm_caches(list(kv_caches.values()), head_size=self._head_size, mla=self._mla)
        if self._block_size % self.layout.block_size:
            raise KVStoreError(f"vLLM block size {self._block_size} is not a multiple of the kernel block size "
                               f"{self.layout.block_size}")
        # Views are at kernel-block granularity when --block-size exceeds the kernel's block.
        self._kernel_blocks_per_block = self._block_size // self.layout.block_size
        if self.layout.is_cuda:  # pin the DRAM tier now, not during the first saves
            self._store.preallocate(self.layout)
            if self.captures_waits:
                device = gpu_movers.device_index(self.layout)
                self._layer_events = [C.cuda_event_create(device, False) for _ in range(self.layout.num_layers)]
        else:
            self.captures_waits = False
        if self._single_gpu and self._engine_id and self._settings.layerwise:
            _IN_PROCESS[self._engine_id] = self
            if self.layout.is_cuda and self._settings.prefetch_mib and not self._loads_checked_after_read:
                self._allocate_prefetch(next(iter(kv_caches.values())).device)
        if self.layout.is_cuda:
            bpc = self._settings.chunk_tokens // self.layout.block_size
            buffer = self._prefetch_buffer
            gpu_movers.warm_up(self.layout, bpc, buffer.data_ptr() if buffer is not None else 0)

    def _allocate_prefetch(self, device) -> None:
        import torch
        chunk = self.layout.chunk_nbytes(self._store.config.chunk_tokens)
        self._prefetch_buffer = torch.empty((self._settings.prefetch_mib << 20) + chunk, dtype=torch.uint8,
                                            device=device)
        index = gpu_movers.device_index(self.layout)
        self._prefetch_stream = C.cuda_stream_create(index, 0)
        self._prefetch_events = (C.cuda_event_create(index, False), C.cuda_event_create(index, False))

    def _kernel_ids(self, block_ids: list[int]) -> np.ndarray:
        ids = np.asarray(block_ids, dtype=np.int64)
        r = self._kernel_blocks_per_block
        if r == 1:
            return ids
        expanded = ids[:, None] * r + np.arange(r)[None, :]
        expanded[ids == SKIP_BLOCK] = SKIP_BLOCK
        return expanded.reshape(-1)

    @staticmethod
    def _batch(transfers: list[ChunkTransfer]) -> tuple[list[bytes], list[int]]:
        keys = [k for t in transfers for k in t.keys]
        ids = [b for t in transfers for b in t.block_ids]
        return keys, ids

    # ---- per step ----------------------------------------------------------------------------
    def start_loads_early(self, meta: KVStoreConnectorMetadata) -> None:
        """Called in the scheduler's process right after it built `meta` (this worker lives in that
        process: one GPU, in-process executor): the loads start now instead of at start_load_kv,
        about the time vLLM takes to prepare the step's inputs earlier. Not while an earlier
        step's loads are still open (asynchronous scheduling): start() then does it as usual."""
        if not meta.loads:
            self._take_prefetch([])  # the request it was for was not scheduled: drop it
        if self.layout is None or not self._settings.layerwise or not meta.loads or self._load is not None:
            return
        self._begin_loads(meta)
        self._early_id += 1
        meta.early_load_id = self._early_id

    def prefetch(self, keys: list[bytes]) -> None:
        """Called by the scheduler half in this process when it is about to promise `keys` (one
        request's hits) to vLLM, before vLLM allocates their blocks: the first layers that fit
        the prefetch buffer start crossing PCIe now (sessions.Prefetch). Used if the step's loads
        are exactly these keys; otherwise dropped when the step's loads start."""
        if self._prefetch_buffer is None or not keys:
            return
        with self._prefetch_lock:
            if self._prefetch is not None:
                return
            buf = self._prefetch_buffer
            if not Prefetch.layers_that_fit(self.layout, self._store.config.chunk_tokens, len(keys), buf.numel()):
                return
            try:
                self._prefetch = Prefetch(self._store, keys, self.layout, buf.data_ptr(), buf.numel(),
                                          self._prefetch_stream, *self._prefetch_events)
            except LookupError:
                pass  # not every chunk is stored: the step's load will say which
            except KVStoreError:
                log.exception("kvstore: prefetch of %d chunks failed", len(keys))

    def _take_prefetch(self, keys: list[bytes]) -> Prefetch | None:
        """The prefetch if it holds exactly `keys`; any other is dropped (its slots are unpinned
        once its copies are done: a few milliseconds at most, and rare)."""
        with self._prefetch_lock:
            prefetch, self._prefetch = self._prefetch, None
        if prefetch is None or prefetch.keys == keys:
            return prefetch
        self._close_quietly(prefetch)
        return None

    @staticmethod
    def _close_quietly(session: "LoadSession | Prefetch") -> None:
        try:
            session.close(_TRANSFER_TIMEOUT_S)
        except KVStoreError:
            log.exception("kvstore: a load did not complete")

    def start(self, meta: KVStoreConnectorMetadata, stream: Any = 0) -> None:
        """Starts the step's loads (unless started early) and saves; `stream` is the one the
        step's forward runs on: it waits for the saves of earlier steps still in flight."""
        if self.layout is None or not isinstance(meta, KVStoreConnectorMetadata):
            return
        self._release_published_saves()
        if self._save is not None:  # a previous step's save that vLLM did not finish
            self._retire_save(stream)
        self._after_saves_in_flight(stream, meta.written_block_ids)
        if meta.loads and meta.early_load_id and meta.early_load_id == self._early_id:
            pass  # this step's loads are running since the scheduler built meta
        else:
            self._finish_loads()  # a previous step's loads, if vLLM skipped wait_for_save
            if meta.loads:
                self._begin_loads(meta)
        if meta.saves:
            keys, ids = self._batch(meta.saves)
            depths = [t.first_chunk + i for t in meta.saves for i in range(len(t.keys))]
            try:
                self._save = self._store.begin_save(keys, self.layout, self._kernel_ids(ids), depths=depths)
                self._save_blocks = np.unique(np.asarray(ids, dtype=np.int64))
            except KVStoreError:
                log.exception("kvstore: could not start saving %d chunks", len(keys))
                self._save = None

    def _begin_loads(self, meta: KVStoreConnectorMetadata) -> None:
        if self.captures_waits and not self._told_captures:
            self._told_captures = True
            log.info("kvstore: %d layer-load waits were captured into vLLM's CUDA graphs", self.captured_waits)
        keys, ids = self._batch(meta.loads)
        self._load_ids, self._load_chunks = ids, len(keys)
        self._unpin_done_load()  # at most one step's loads pinned (the scheduler's step budget)
        self._release_published_saves()
        prefetch = self._take_prefetch(keys)
        try:
            self._load = self._store.begin_load(keys, self.layout, self._kernel_ids(ids),
                                                layer_events=self._layer_events or None,
                                                after_events=self._in_flight_events(meta.written_block_ids),
                                                prefetch=prefetch)
            missing = self._load.missing
        except KVStoreError:
            log.exception("kvstore: load of %d chunks failed; vLLM will recompute them", len(keys))
            self._load, missing = None, list(range(len(keys)))
        finally:
            if prefetch is not None and prefetch.holds_slots:  # not taken over by the load
                self._close_quietly(prefetch)
        self._report_failed(missing)
        if not self._settings.layerwise:  # everything arrives before the forward starts
            self._finish_loads(wait=True)

    def wait_for_layer_load(self, layer_name: str, stream: Any) -> None:
        if self._load is not None:
            self._load.wait_layer(self._layer_index[layer_name], stream)
        elif self._layer_events and C.cuda_stream_is_capturing(stream):
            # vLLM is capturing a CUDA graph: its replays wait on this layer's event as last
            # recorded before the replay (this step's load, or an earlier, finished one).
            C.cuda_stream_wait_event(stream, self._layer_events[self._layer_index[layer_name]])
            self.captured_waits += 1

    def save_kv_layer(self, layer_name: str, stream: Any) -> None:
        if self._save is not None and self._settings.layerwise:
            self._save.save_layer(self._layer_index[layer_name], stream)

    def wait_for_save(self, stream: Any = 0) -> None:
        if self._save is not None:
            self._retire_save(stream)  # layers a CUDA graph ran without save_kv_layer: after `stream`
        self._finish_loads()

    def _retire_save(self, stream: Any) -> None:
        """Enqueues the rest of the step's save and hands it to the finisher (CUDA) or commits it
        (host caches, gathered synchronously)."""
        save, self._save = self._save, None
        try:
            save.enqueue_rest(stream)
            if save.done_event is None:
                save.commit()
                return
        except KVStoreError:
            log.exception("kvstore: save failed; the chunks are not stored")
            return
        with self._in_flight_lock:
            self._saves_in_flight[save] = self._save_blocks
        self._hand_off(save)

    def _finish_loads(self, wait: bool = False) -> None:
        """Ends the step's loads. Layer-wise, the forward already waits for them on the device, so
        the host does not: their slots are unpinned when the next loads start. The host waits
        where slots are checked after the reads (the agent's generations: a chunk read from a
        reused slot is reported for recompute), and with `wait` (loads that are not layer-wise:
        the forward has no waits of its own)."""
        if self._load is None:
            return
        load, self._load = self._load, None
        self._unpin_done_load()
        if load.on_gpu and not wait and not self._loads_checked_after_read:
            self._done_load = load
            return
        load.close()
        self._report_failed(load.invalid)

    def _unpin_done_load(self) -> None:
        load, self._done_load = self._done_load, None
        if load is not None:
            self._close_quietly(load)  # long arrived, as a rule: the forward that needed it ran

    def _hand_off(self, save: SaveSession) -> None:
        if self._finisher is None:
            self._finisher = threading.Thread(target=self._finish_loop, name="kvstore-finisher", daemon=True)
            self._finisher.start()
        try:  # blocks while _MAX_SAVES_IN_FLIGHT are outstanding
            self._to_finish.put(save, timeout=_TRANSFER_TIMEOUT_S)
        except queue.Full:
            log.warning("kvstore: the finisher is stuck; publishing a save on the step")
            self._finish_one(save)

    def _finish_loop(self) -> None:
        while (save := self._to_finish.get()) is not None:
            try:
                self._finish_one(save)
            except Exception:  # the thread must outlive any one save
                log.exception("kvstore: finishing a save failed")

    def _finish_one(self, save: SaveSession) -> None:
        """Waits for the save's gathers, publishes it (or, if they never completed, leaves its
        slots reserved: a gather may still write them) and queues its CUDA handle for release on
        the engine's thread."""
        try:
            save.wait(_TRANSFER_TIMEOUT_S)
            ok = True
        except KVStoreError:
            log.exception("kvstore: a save did not complete in %d s; its chunks are dropped", _TRANSFER_TIMEOUT_S)
            ok = False
        with self._in_flight_lock:  # from here on no stream is made to wait on its event
            del self._saves_in_flight[save]
            self._saves_to_release.append(save)
        if ok:
            try:
                save.commit()
            except KVStoreError:
                log.exception("kvstore: could not publish a save")

    def _release_published_saves(self) -> None:
        """Frees the CUDA handles of published saves (engine thread: no wait on them is pending)."""
        with self._in_flight_lock:
            saves, self._saves_to_release = self._saves_to_release, []
        for save in saves:
            save.release_gpu()

    def _in_flight_events(self, written_block_ids: list[int]) -> list[int]:
        """Events of the saves in flight that read a block this step writes: a block a finished
        request freed may be handed to a new one at once. (Blocks a save reads are full, so no
        running request writes them again; only a newly allocated block can be one of them.)
        The handles stay valid until this thread calls _release_published_saves."""
        with self._in_flight_lock:
            if not self._saves_in_flight or not written_block_ids:
                return []
            written = np.asarray(written_block_ids, dtype=np.int64)
            return [save.done_event for save, blocks in self._saves_in_flight.items()
                    if np.isin(written, blocks, assume_unique=False).any()]

    def _after_saves_in_flight(self, stream: Any, written_block_ids: list[int]) -> None:
        """`stream` (the step's forward) waits on the device for the saves in flight that read a
        block it writes."""
        if not self._saves_in_flight or C.cuda_stream_is_capturing(stream):
            return
        for event in self._in_flight_events(written_block_ids):
            C.cuda_stream_wait_event(stream, event)

    def _report_failed(self, chunks: list[int]) -> None:
        """Blocks of chunks that did not load (or loaded from a reused slot): vLLM recomputes them."""
        ids = self._load_ids
        bpc = len(ids) // max(1, self._load_chunks)
        for c in chunks:
            self._load_errors.update(b for b in ids[c * bpc:(c + 1) * bpc] if b != SKIP_BLOCK)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        if _IN_PROCESS.get(self._engine_id) is self:
            del _IN_PROCESS[self._engine_id]
        if self._save is not None:
            self._save.abort()
            self._save = None
        self._finish_loads()
        self._unpin_done_load()
        self._take_prefetch([])  # drops any prefetch (one is never of no keys)
        finisher, self._finisher = self._finisher, None
        if finisher is not None:  # publish what is in flight, then stop
            try:
                self._to_finish.put(None, timeout=_TRANSFER_TIMEOUT_S)
            except queue.Full:
                pass
            finisher.join(_TRANSFER_TIMEOUT_S)
            if finisher.is_alive():  # stuck on the GPU: leave its CUDA objects alone
                log.error("kvstore: the finisher did not stop; CUDA objects are left to the process exit")
                return
        self._release_published_saves()
        for e in self._layer_events + list(self._prefetch_events or ()):
            C.cuda_event_destroy(e)
        self._layer_events, self._prefetch_events = [], None
        if self._prefetch_stream:
            C.cuda_stream_destroy(self._prefetch_stream)
            self._prefetch_stream = 0
        self._prefetch_buffer = None
