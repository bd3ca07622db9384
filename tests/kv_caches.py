"""Engine KV caches in every layout kvstore supports, built from random numpy data, each with a
plain-indexing view `planes[l][p] -> [num_blocks, block_size, H, D]` that serves as the reference
for what a stored object must contain. Shared by the CPU mover tests (and usable by GPU tests)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvstore import KVLayout

VLLM_PERMUTATIONS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


@dataclass
class Cache:
    name: str
    layout: KVLayout
    buffers: list[np.ndarray]                      # what a test poisons / compares
    planes: Callable[[int, int], np.ndarray]       # (layer, plane) -> [B, N, H, D] view
    num_layers: int
    num_planes: int


def _random(rng, shape, dtype):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def vllm(rng, order: str, L=3, B=11, H=2, N=4, D=8, dtype=np.uint16, mla=False) -> Cache:
    """vLLM >= 0.33: one buffer in physical order `order` (a permutation of LBHNC); per-layer
    logical [B,H,N,C] views, C = 2*D (K|V) or D (MLA, H=1)."""
    C = D if mla else 2 * D
    H = 1 if mla else H
    sizes = dict(L=L, B=B, H=H, N=N, C=C)
    flat = _random(rng, [sizes[d] for d in order], dtype)
    logical = flat.transpose([order.index(d) for d in "LBHNC"])
    views = [logical[l] for l in range(L)]
    layout = KVLayout.from_vllm(views, mla=mla)
    planes = lambda l, p: views[l].transpose(0, 2, 1, 3)[..., p * D:(p + 1) * D]
    return Cache(f"vllm-{order}{'-mla' if mla else ''}", layout, [flat], planes, L, 1 if mla else 2)


def flash_attn(rng, L=3, B=9, N=8, H=3, D=16, dtype=np.uint16) -> Cache:
    layers = [_random(rng, (2, B, N, H, D), dtype) for _ in range(L)]
    return Cache("flash_attn", KVLayout.from_flash_attn(layers), layers, lambda l, p: layers[l][p], L, 2)


def flashinfer(rng, L=2, B=7, N=16, H=2, D=8, dtype=np.uint8) -> Cache:
    layers = [_random(rng, (B, 2, N, H, D), dtype) for _ in range(L)]
    return Cache("flashinfer", KVLayout.from_flashinfer(layers), layers, lambda l, p: layers[l][:, p], L, 2)


def mla(rng, L=4, B=6, N=16, D=36, dtype=np.uint16) -> Cache:
    layers = [_random(rng, (B, N, D), dtype) for _ in range(L)]
    return Cache("mla", KVLayout.from_mla(layers), layers, lambda l, p: layers[l][:, :, None, :], L, 1)


def sglang(rng, L=3, pages=10, page=4, H=2, D=8, dtype=np.uint16, pad_tokens=3) -> Cache:
    """Token-indexed per-layer K and V buffers; pad_tokens trailing rows are not a full page."""
    rows = pages * page + pad_tokens
    ks = [_random(rng, (rows, H, D), dtype) for _ in range(L)]
    vs = [_random(rng, (rows, H, D), dtype) for _ in range(L)]
    layout = KVLayout.from_sglang(ks, vs, page_size=page)

    def planes(l, p):
        return (ks if p == 0 else vs)[l][:pages * page].reshape(pages, page, H, D)

    return Cache("sglang", layout, ks + vs, planes, L, 2)


def all_caches(rng) -> list[Cache]:
    caches = [vllm(rng, order) for order in VLLM_PERMUTATIONS]
    caches += [vllm(rng, "LBNHC", mla=True), vllm(rng, "BLNHC", dtype=np.uint8, D=16),
               flash_attn(rng), flashinfer(rng), mla(rng), sglang(rng)]
    return caches


def expected_object(cache: Cache, block_ids: np.ndarray, layers: range | None = None) -> np.ndarray:
    """The layer-major object [L][P][T][H][D] (as bytes) of one chunk made of block_ids."""
    layers = layers if layers is not None else range(cache.num_layers)
    parts = []
    for l in layers:
        for p in range(cache.num_planes):
            blocks = cache.planes(l, p)[block_ids]           # [nb, N, H, D]
            parts.append(np.ascontiguousarray(blocks).reshape(-1).view(np.uint8))
    return np.concatenate(parts)


def snapshot(cache: Cache) -> list[np.ndarray]:
    return [b.copy() for b in cache.buffers]
