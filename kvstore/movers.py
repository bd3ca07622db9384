"""Moves chunks between an engine's paged KV cache and stored objects. Routes by where the
cache lives: the C++ reference movers for host memory, the GPU movers for CUDA tensors.
Callers must not hold a lock: the native calls release the GIL and may take milliseconds."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import gpu_movers
from ._native import C
from .errors import GPUUnavailableError
from .layout import KVLayout


def _on_gpu(layout: KVLayout) -> bool:
    """True when the cache is on a CUDA device (the GPU movers take it), False for host memory."""
    if layout.is_cuda:
        if C.cuda_device_count() == 0:
            raise GPUUnavailableError(f"layout lives on {layout.device} but no CUDA device is available")
        return True
    return False


def gather(layout: KVLayout, block_ids: np.ndarray, object_ptrs: Sequence[int], blocks_per_chunk: int,
           layers: tuple[int, int] | None = None) -> None:
    """Engine blocks -> objects (one object per chunk of blocks_per_chunk block ids). For a CUDA
    cache: ordered after the work already issued to the legacy default stream, done on return."""
    if _on_gpu(layout):
        gpu_movers.gather(layout, block_ids, object_ptrs, blocks_per_chunk, layers)
        return
    lb, le = layers or (0, layout.num_layers)
    C.gather(layout.native, block_ids, np.asarray(object_ptrs, dtype=np.uint64), blocks_per_chunk, lb, le)


def scatter(layout: KVLayout, block_ids: np.ndarray, object_ptrs: Sequence[int], blocks_per_chunk: int,
            layers: tuple[int, int] | None = None) -> None:
    """Objects -> engine blocks (for a CUDA cache: arrived on return)."""
    if _on_gpu(layout):
        gpu_movers.scatter(layout, block_ids, object_ptrs, blocks_per_chunk, layers)
        return
    lb, le = layers or (0, layout.num_layers)
    C.scatter(layout.native, block_ids, np.asarray(object_ptrs, dtype=np.uint64), blocks_per_chunk, lb, le)
