"""GPU movers (DESIGN.md §3): engine paged KV blocks on a CUDA device <-> layer-major stored objects
in pinned (page-locked, device-mapped) host memory, by the KVLayout stride descriptor.

- gather / scatter: move whole chunks (all layers or a layer range). With no `stream` they run on
  a private per-thread stream that is first ordered after all work already issued to the
  device's legacy default stream (torch's default stream), and return once the data has arrived.
  With `stream` (an int cudaStream_t or anything with `.cuda_stream`) they are only enqueued.
- LayerwiseLoad: one launch per layer on a load stream, each followed by an event; wait_layer(l,
  stream) makes `stream` wait on that event (no host synchronisation, capturable in CUDA graphs).
- LayerwiseSave: save_layer(l, compute_stream) records an event on the compute stream; the store
  stream waits on it and gathers layer l.

Streams and events are plain integers; torch is never imported here (a torch stream object is
accepted wherever a stream is, through its `.cuda_stream`).

Paths (kvstore._C.GPU_PATH_*): direct = the kernel reads/writes pinned memory zero-copy over
PCIe; staged = DMA of whole contiguous object slices into a small device ring plus an on-GPU
kernel with few CTAs; dma = no kernel and no ring: batched DMA straight between each engine unit
and its place in the object, consecutive block ids merged into one segment (layouts whose
per-block unit is contiguous, else it runs as staged). PATH_AUTO picks per
call by the rule measured in benchmarks/gpu.py: dma when its mean segment is >= 512 KiB, else staged
(objects in device memory: direct).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np

from . import trace
from ._native import C
from .errors import GPUUnavailableError, InvalidArgumentError, KVTimeoutError
from .layout import KVLayout

PATH_AUTO, PATH_DIRECT, PATH_STAGED, PATH_DMA = 0, 1, 2, 4  # 3 was staged_ce (csrc/cuda/gpu_movers.h)
PATH_NAMES = {PATH_DIRECT: "direct", PATH_STAGED: "staged", PATH_DMA: "dma"}

_local = threading.local()
_sm_counts: dict[int, int] = {}


def sm_count(device: int) -> int:
    if device not in _sm_counts:
        _sm_counts[device] = int(C.cuda_device_info(device)["sm_count"])
    return _sm_counts[device]


def stream_handle(stream: Any) -> int:
    """An int cudaStream_t from an int, None (the legacy default stream) or a torch stream."""
    if stream is None:
        return 0
    if isinstance(stream, (int, np.integer)):
        return int(stream)
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise InvalidArgumentError(f"expected a CUDA stream handle (int or object with .cuda_stream), got {stream!r}")
    return int(handle)


def device_index(layout: KVLayout) -> int:
    dev = layout.device
    if not dev.startswith("cuda"):
        raise InvalidArgumentError(f"layout lives on {dev}, not on a CUDA device")
    _, _, idx = dev.partition(":")
    return int(idx) if idx else 0


def check_gpu(layout: KVLayout) -> int:
    if not C.built_with_cuda():
        raise GPUUnavailableError("kvstore._C was built without CUDA (nvcc was not found at build time)")
    if C.cuda_device_count() == 0:
        raise GPUUnavailableError(f"layout lives on {layout.device} but no CUDA device is available")
    return device_index(layout)


def _private_stream(device: int) -> tuple[int, int]:
    """(stream, event) owned by this thread for `device`; never destroyed (one per worker thread)."""
    cache = getattr(_local, "streams", None)
    if cache is None:
        cache = _local.streams = {}
    if device not in cache:
        cache[device] = (C.cuda_stream_create(device, 0), C.cuda_event_create(device, False))
    return cache[device]


def _batch(block_ids, object_ptrs, blocks_per_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(np.asarray(block_ids), dtype=np.int64)
    objs = np.ascontiguousarray(np.asarray(object_ptrs, dtype=np.uint64))
    if ids.ndim != 1 or objs.ndim != 1:
        raise InvalidArgumentError("block_ids and object_ptrs must be 1-D")
    if blocks_per_chunk <= 0 or ids.size != objs.size * blocks_per_chunk:
        raise InvalidArgumentError(f"{objs.size} objects of {blocks_per_chunk} blocks need "
                                   f"{objs.size * blocks_per_chunk} block ids, got {ids.size}")
    return ids, objs


def _move(fn, layout: KVLayout, block_ids, object_ptrs, blocks_per_chunk: int, layers, stream, path: int,
          ctas: int) -> int:
    device = check_gpu(layout)
    ids, objs = _batch(block_ids, object_ptrs, blocks_per_chunk)
    lb, le = layers or (0, layout.num_layers)
    if stream is not None:
        return fn(layout.native, ids, objs, blocks_per_chunk, lb, le, stream=stream_handle(stream), path=path,
                  ctas=ctas)
    s, ev = _private_stream(device)
    C.cuda_event_record(ev, 0)          # after everything issued so far to the legacy default stream
    C.cuda_stream_wait_event(s, ev)
    used = fn(layout.native, ids, objs, blocks_per_chunk, lb, le, stream=s, path=path, ctas=ctas)
    C.cuda_stream_synchronize(s)
    return used


def gather(layout: KVLayout, block_ids, object_ptrs: Sequence[int], blocks_per_chunk: int,
           layers: tuple[int, int] | None = None, *, stream: Any = None, path: int = PATH_AUTO, ctas: int = 0) -> int:
    """Engine blocks -> objects. Returns the path used. Synchronous unless `stream` is given."""
    return _move(C.gpu_gather, layout, block_ids, object_ptrs, blocks_per_chunk, layers, stream, path, ctas)


def scatter(layout: KVLayout, block_ids, object_ptrs: Sequence[int], blocks_per_chunk: int,
            layers: tuple[int, int] | None = None, *, stream: Any = None, path: int = PATH_AUTO, ctas: int = 0) -> int:
    """Objects -> engine blocks. Returns the path used. Synchronous unless `stream` is given."""
    return _move(C.gpu_scatter, layout, block_ids, object_ptrs, blocks_per_chunk, layers, stream, path, ctas)


def _wait_event(event: int, timeout_s: float | None, what: str) -> None:
    if timeout_s is None:
        C.cuda_event_synchronize(event)
        return
    deadline = time.monotonic() + timeout_s
    delay = 20e-6
    while not C.cuda_event_query(event):
        if time.monotonic() > deadline:
            raise KVTimeoutError(f"{what} not finished after {timeout_s} s")
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)


class _Layerwise:
    default_priority = 0

    @staticmethod
    def default_ctas(device: int) -> int:
        return 0  # the path's own default
    def __init__(self, layout: KVLayout, block_ids, object_ptrs, blocks_per_chunk: int, *, stream: Any = None,
                 layers: tuple[int, int] | None = None, path: int = PATH_AUTO, ctas: int = 0, piece_bytes: int = 0,
                 keepalive: Any = None, priority: int | None = None, events: Sequence[int] | None = None):
        check_path(path)
        self.device = check_gpu(layout)
        self.layout = layout
        self.layers = layers or (0, layout.num_layers)
        lb, le = self.layers
        if not 0 <= lb < le <= layout.num_layers:
            raise InvalidArgumentError(f"layer range [{lb}, {le}) outside [0, {layout.num_layers})")
        if events is not None and len(events) != le - lb:
            raise InvalidArgumentError(f"{len(events)} events for {le - lb} layers")
        ids, objs = _batch(block_ids, object_ptrs, blocks_per_chunk)
        self._own_stream = stream is None
        # priority (own stream only): CUDA's scale, 0 = lowest (the default), negative = higher
        # (clamped to the device's range); None = the class's default.
        if priority is None:
            priority = self.default_priority
        self.stream = C.cuda_stream_create(self.device, priority) if stream is None else stream_handle(stream)
        self.path, self.ctas = path, ctas or self.default_ctas(self.device)
        # One staging piece per layer (capped): one DMA + one kernel per layer keeps the host cost
        # of enqueueing small; successive layers still overlap (DMA of l+1 with the kernel of l).
        self.piece_bytes = piece_bytes or int(min(64 << 20, max(1 << 20, layout.layer_nbytes(
            blocks_per_chunk * layout.block_size) * (objs.size or 1))))
        self._keepalive = keepalive  # object memory must outlive the transfer
        # events: the caller's, one per layer of the range, reused across handles and never
        # destroyed here (a captured CUDA graph may wait on them: see cuda_stream_wait_event).
        self._own_events = events is None
        self._events: list[int] = []
        self._plan = None
        try:
            self._plan = C.GpuPlan(layout.native, ids, objs, blocks_per_chunk, self.stream)
            self._events = ([C.cuda_event_create(self.device, False) for _ in range(le - lb)] if events is None
                            else [int(e) for e in events])
        except BaseException:
            self.close()
            raise
        self._issued: set[int] = set()

    def _event(self, layer: int) -> int:
        lb, le = self.layers
        if not lb <= layer < le:
            raise InvalidArgumentError(f"layer {layer} outside [{lb}, {le})")
        return self._events[layer - lb]

    @property
    def nbytes(self) -> int:
        return self._plan.nbytes(*self.layers)

    @property
    def path_name(self) -> str:
        """The path the transfers take ("dma", "staged", ...): PATH_AUTO resolved by the plan's
        rule; dma falls back to staged on layouts without contiguous units."""
        if self.path == PATH_AUTO:
            return PATH_NAMES[self._plan.choose(isinstance(self, LayerwiseSave), *self.layers)]
        if self.path == PATH_DMA and self._plan.dma_segment_bytes() == 0:
            return PATH_NAMES[PATH_STAGED]
        return PATH_NAMES[self.path]

    def done(self) -> bool:
        return all(C.cuda_event_query(self._events[l - self.layers[0]]) for l in self._issued)

    def close(self) -> None:
        """Frees the events and the plan (stream-ordered: safe while work is in flight)."""
        if getattr(self, "_own_events", True):
            for e in self._events:
                C.cuda_event_destroy(e)
        self._events = []
        if self._plan is not None:
            self._plan.close()
            self._plan = None
        if self._own_stream and self.stream:
            C.cuda_stream_destroy(self.stream)
            self.stream = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.wait()
        self.close()


def check_path(path: int) -> None:
    if path != PATH_AUTO and path not in PATH_NAMES:
        raise InvalidArgumentError(f"unknown path {path}: 0 (auto), " + ", ".join(
            f"{k} ({v})" for k, v in PATH_NAMES.items()) + "; 3 (staged_ce) was removed")


def check_start_options(background: bool, lookahead: int | None, callers_events: bool) -> None:
    """The combinations LayerwiseLoad.start refuses, before it enqueues anything."""
    if lookahead is not None and (background or lookahead < 1):
        raise InvalidArgumentError("lookahead must be >= 1 and cannot be combined with background")
    if background and callers_events:
        # A CUDA graph waiting on the caller's events binds, at each launch, to their latest
        # record: a helper thread may record them after the graph launched, and the graph then
        # waits on the previous step's records (vLLM e2e run 18: stale KV, 0 of 6 reloads exact).
        raise InvalidArgumentError("background=True cannot be combined with the caller's events: every layer's "
                                   "event must be recorded before anything waiting on it launches")


class LayerwiseLoad(_Layerwise):
    """Objects -> engine blocks, layer by layer on the load stream (DESIGN.md §3).

    Defaults measured on H100 (benchmarks/gpu.py layer-wise part, results/gpu_H100-80GB-HBM3.md):
    the per-layer scatter kernel gets SMs only between the forward's kernels (a running GEMM
    holds them all), i.e. it sits on the critical path once per layer; so it runs as one short
    burst on every SM (ctas = SM count: ~13 us for 16 MiB instead of ~80 us with 8 CTAs), on a
    high-priority stream so that it is dispatched first in that gap. Overhead of a 32-layer
    forward with compute ~1.1x the transfer: 32-35 % -> 6.5-8.7 % (layer 0 exposed; floor 2.8 %).
    With no SMs at all: path=PATH_DMA and start(background=True) measured lower on scattered
    blocks when the forward has compute to hide the load (layer 0 prefetched: 1.4-2.6 % against
    2.7-5.0 %, runs L-R), but only with the handle's own events (see start). Recording every
    event up front behind device flags that the helper thread opens (cuStreamWaitValue32, run T)
    made it exact inside vLLM but slower (~12 us a layer) and it hangs when streams share a
    hardware queue (CUDA_DEVICE_MAX_CONNECTIONS=1 or 2): not kept."""
    default_priority = -5  # the highest; CUDA clamps it to the device's range

    @staticmethod
    def default_ctas(device: int) -> int:
        return sm_count(device)

    def start(self, after_stream: Any = None, background: bool = False,
              lookahead: int | None = None, after_events: Sequence[int] = ()) -> "LayerwiseLoad":
        """Enqueues the layers: layer l of every chunk is one launch, then event_l. With
        `after_stream`, the loads start only after the work already issued to that stream.
        background=True enqueues from a helper thread (the native calls drop the GIL), so the
        caller goes on enqueueing its forward at once; wait_layer(l) then blocks the host only
        until layer l has been *enqueued* (microseconds), never until it has arrived. Not with the
        caller's `events` (a CUDA graph waiting on them must find them recorded when it launches).
        lookahead=k (not with background): start() enqueues only the first k layers and
        wait_layer(l) enqueues up to layer l+k, so the host's enqueue cost (~25 us a layer) is
        spread over the forward instead of delaying its first kernel; wait() enqueues the rest.
        after_events: CUDA events the loads also wait for (on the device)."""
        if self._issued or getattr(self, "_thread", None) is not None:
            raise InvalidArgumentError("LayerwiseLoad.start called twice")
        check_start_options(background, lookahead, callers_events=not self._own_events)
        lb, le = self.layers
        self._enqueued = {layer: threading.Event() for layer in range(lb, le)}
        self._error: BaseException | None = None
        self._next = lb
        self._lookahead = lookahead
        if after_stream is not None:
            C.cuda_event_record(self._events[0], stream_handle(after_stream))
            C.cuda_stream_wait_event(self.stream, self._events[0])
        for event in after_events:
            C.cuda_stream_wait_event(self.stream, event)

        if background:
            self._thread = threading.Thread(target=self._enqueue_upto, args=(le,), name="kvstore-layerwise-load",
                                            daemon=True)
            self._thread.start()
        else:
            self._thread = None
            self._enqueue_upto(le if lookahead is None else min(le, lb + lookahead))
            if self._error is not None:
                raise self._error
        return self

    def _enqueue_upto(self, stop: int) -> None:
        try:
            while self._next < stop:
                layer = self._next
                self._plan.scatter(layer, layer + 1, path=self.path, ctas=self.ctas, piece_bytes=self.piece_bytes)
                C.cuda_event_record(self._event(layer), self.stream)
                if layer == self.layers[0]:
                    trace.mark("load.first_layer_enqueued")
                self._issued.add(layer)
                self._next = layer + 1
                self._enqueued[layer].set()
        except BaseException as e:  # surfaced by wait_layer / wait
            self._error = e
            for ev in self._enqueued.values():
                ev.set()

    def _lazy_enqueue(self, stop: int) -> None:
        if getattr(self, "_lookahead", None) is not None and self._error is None:
            self._enqueue_upto(min(self.layers[1], stop))

    def _enqueued_or_raise(self, layer: int, timeout_s: float | None) -> None:
        ev = getattr(self, "_enqueued", {}).get(layer)
        if ev is None:
            raise InvalidArgumentError(f"layer {layer} was not started")
        if not ev.wait(timeout_s):
            raise KVTimeoutError(f"layer {layer} not enqueued after {timeout_s} s")
        if self._error is not None:
            raise self._error

    def wait_layer(self, layer: int, stream: Any = 0, timeout_s: float | None = 60.0) -> None:
        """`stream` waits (on the device) until layer `layer` has arrived. No host synchronisation."""
        self._lazy_enqueue(layer + 1 + (getattr(self, "_lookahead", None) or 0))
        self._enqueued_or_raise(layer, timeout_s)
        C.cuda_stream_wait_event(stream_handle(stream), self._event(layer))

    def wait(self, timeout_s: float | None = 60.0) -> None:
        """Host wait for every layer. If enqueueing failed, the layers already enqueued still read
        the objects: they are waited for too before the error is raised, so that the caller may
        free the objects once this returns or raises."""
        self._lazy_enqueue(self.layers[1])
        try:
            for layer in sorted(getattr(self, "_enqueued", {})):
                self._enqueued_or_raise(layer, timeout_s)
                _wait_event(self._event(layer), timeout_s, f"layer-wise load of layer {layer}")
        except BaseException:
            if getattr(self, "_error", None) is not None:  # (a timeout has nothing more to wait for)
                t = getattr(self, "_thread", None)
                if t is not None:
                    t.join(timeout_s)
                for layer in sorted(self._issued):
                    _wait_event(self._event(layer), timeout_s, f"layer-wise load of layer {layer}")
            raise

    def close(self) -> None:
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join()
            self._thread = None
        super().close()


class LayerwiseSave(_Layerwise):
    """Engine blocks -> objects, layer by layer, each after the compute stream finished it."""

    last_event: int | None = None  # recorded after the latest gather: completes with every gather so far

    def save_layer(self, layer: int, compute_stream: Any = 0) -> None:
        """Records an event on `compute_stream`; the store stream waits on it, then gathers `layer`."""
        self.save_layers(layer, layer + 1, compute_stream)

    def save_layers(self, first: int, last: int, compute_stream: Any = 0) -> None:
        """Layers [first, last) in one gather after the work issued to `compute_stream` so far:
        one host call instead of one per layer (for saves enqueued after the forward)."""
        if any(layer in self._issued for layer in range(first, last)):
            raise InvalidArgumentError(f"a layer of [{first}, {last}) was already saved")
        ev = self._event(first)
        self._event(last - 1)  # range check
        C.cuda_event_record(ev, stream_handle(compute_stream))
        C.cuda_stream_wait_event(self.stream, ev)
        self._plan.gather(first, last, path=self.path, ctas=self.ctas, piece_bytes=self.piece_bytes)
        for layer in range(first, last):  # each re-recorded: now marks the end of the gathers
            C.cuda_event_record(self._event(layer), self.stream)
            self._issued.add(layer)
        self.last_event = self._event(last - 1)

    def wait(self, timeout_s: float | None = 60.0) -> None:
        """Host wait until every saved layer is in the objects."""
        for layer in sorted(self._issued):
            _wait_event(self._event(layer), timeout_s, f"layer-wise save of layer {layer}")


def warm_up(layout: KVLayout, blocks_per_chunk: int, device_buffer_ptr: int = 0) -> None:
    """One round trip of one chunk (blocks 0..blocks_per_chunk-1, all layers): gathered into a
    pinned object, scattered back (the same bytes), and, with a device buffer of at least one
    object, scattered back from there too. Loads the kernels and grows the memory pools at
    start-up, so the first request does not pay for it (~35 ms on H100). The blocks end as they
    were; call before the engine runs requests."""
    if layout.num_blocks < blocks_per_chunk:
        return
    nbytes = layout.chunk_nbytes(blocks_per_chunk * layout.block_size)
    memory, _ = C.host_alloc(nbytes, True)
    ids = np.arange(blocks_per_chunk, dtype=np.int64)
    with LayerwiseSave(layout, ids, [memory.ctypes.data], blocks_per_chunk, keepalive=memory) as save:
        for layer in range(layout.num_layers):
            save.save_layer(layer, 0)
    sources = [memory.ctypes.data]
    if device_buffer_ptr:
        C.cuda_memcpy_async(device_buffer_ptr, memory.ctypes.data, nbytes, 0)
        sources.append(device_buffer_ptr)
    for src in sources:
        with LayerwiseLoad(layout, ids, [src], blocks_per_chunk, keepalive=memory) as load:
            load.start(after_stream=0)
    C.cuda_stream_synchronize(0)
