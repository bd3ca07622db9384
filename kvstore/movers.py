"""Moves chunks between an engine's paged KV cache and stored objects. Routes by where the
cache lives: the C++ reference movers for host memory, the GPU movers for CUDA tensors.
Callers must not hold a lock: the native calls release the GIL and may take milliseconds."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ._native import C
from .errors import GPUUnavailableError
from .layout import KVLayout


def _check_host(layout: KVLayout) -> None:
    if layout.is_cuda:
        if C.cuda_device_count() == 0:
            raise GPUUnavailableError(f"layout lives on {layout.device} but no CUDA device is available")
        raise GPUUnavailableError("CUDA KV caches need the GPU movers, which this build does not provide yet")


def gather(layout: KVLayout, block_ids: np.ndarray, object_ptrs: Sequence[int], blocks_per_chunk: int,
           layers: tuple[int, int] | None = None) -> None:
    """Engine blocks -> objects (one object per chunk of blocks_per_chunk block ids)."""
    _check_host(layout)
    lb, le = layers or (0, layout.num_layers)
    C.gather(layout.native, block_ids, np.asarray(object_ptrs, dtype=np.uint64), blocks_per_chunk, lb, le)


def scatter(layout: KVLayout, block_ids: np.ndarray, object_ptrs: Sequence[int], blocks_per_chunk: int,
            layers: tuple[int, int] | None = None) -> None:
    """Objects -> engine blocks."""
    _check_host(layout)
    lb, le = layers or (0, layout.num_layers)
    C.scatter(layout.native, block_ids, np.asarray(object_ptrs, dtype=np.uint64), blocks_per_chunk, lb, le)
