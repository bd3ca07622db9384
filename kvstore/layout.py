"""KVLayout: the stride descriptor of an engine's paged KV cache (DESIGN.md §2, csrc/layout.h).

Address of one head row (head_nbytes contiguous bytes) of layer l, plane p, block b, token t,
head h:  plane_ptrs[l][p] + b*block_stride + t*token_stride + h*head_stride.
Plane 0 is K and plane 1 is V (MLA: one plane). A base pointer per (layer, plane) rather than
one per layer plus fixed K/V offsets, because SGLang keeps K and V of a layer in separate
buffers whose distance differs per layer.

One constructor per engine layout turns tensors (torch or numpy, CPU or CUDA) into this
descriptor; the movers never know which engine a layout came from. A KVLayout holds references
to the tensors it describes so their memory outlives it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ._native import C
from .errors import LayoutError


@dataclass(frozen=True)
class _View:
    """A tensor reduced to what a layout needs: address, shape, byte strides."""
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # bytes
    itemsize: int
    dtype: str
    device: str


def _view(t: Any) -> _View:
    if isinstance(t, np.ndarray):
        return _View(t.ctypes.data, tuple(t.shape), tuple(t.strides), t.itemsize, str(t.dtype), "cpu")
    if hasattr(t, "data_ptr") and hasattr(t, "stride") and hasattr(t, "element_size"):  # torch.Tensor
        es = t.element_size()
        return _View(t.data_ptr(), tuple(t.shape), tuple(s * es for s in t.stride()), es,
                     str(t.dtype).replace("torch.", ""), str(t.device))
    raise LayoutError(f"expected a torch.Tensor or numpy.ndarray, got {type(t).__name__}")


def _layer_views(tensors: Sequence[Any] | Mapping[str, Any], rank: int, what: str) -> list[_View]:
    if isinstance(tensors, Mapping):
        tensors = list(tensors.values())
    tensors = list(tensors)
    if not tensors:
        raise LayoutError(f"{what}: no layer tensors given")
    views = [_view(t) for t in tensors]
    first = views[0]
    if len(first.shape) != rank:
        raise LayoutError(f"{what}: expected {rank}-D per-layer tensors, got shape {first.shape}")
    for i, v in enumerate(views[1:], start=1):
        if (v.shape, v.strides, v.dtype, v.device) != (first.shape, first.strides, first.dtype, first.device):
            raise LayoutError(
                f"{what}: layer {i} differs from layer 0 (shape {v.shape} vs {first.shape}, strides {v.strides} vs "
                f"{first.strides}, dtype {v.dtype} vs {first.dtype}, device {v.device} vs {first.device})")
    if any(s == 0 for s in first.shape):
        raise LayoutError(f"{what}: empty dimension in shape {first.shape}")
    if first.strides[-1] != first.itemsize:
        raise LayoutError(f"{what}: the last dim must be contiguous (stride {first.strides[-1]} bytes, "
                          f"element {first.itemsize} bytes)")
    return views


@dataclass(frozen=True)
class KVLayout:
    plane_ptrs: tuple[tuple[int, ...], ...]  # [num_layers][num_planes]
    num_heads: int
    head_nbytes: int
    elem_size: int
    block_size: int
    num_blocks: int
    block_stride: int
    token_stride: int
    head_stride: int
    dtype: str
    device: str
    owners: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self):
        if not self.plane_ptrs or len({len(p) for p in self.plane_ptrs}) != 1 or len(self.plane_ptrs[0]) not in (1, 2):
            raise LayoutError("plane_ptrs must be [num_layers][1 or 2] pointers")
        for name in ("num_heads", "head_nbytes", "elem_size", "block_size", "num_blocks"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.head_nbytes % self.elem_size:
            raise LayoutError(f"head_nbytes {self.head_nbytes} is not a multiple of elem_size {self.elem_size}")
        if self.num_heads > 1 and abs(self.head_stride) < self.head_nbytes:
            raise LayoutError(f"head_stride {self.head_stride} overlaps head rows of {self.head_nbytes} bytes")

    # ---- geometry ------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.plane_ptrs)

    @property
    def num_planes(self) -> int:
        return len(self.plane_ptrs[0])

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def blocks_per_chunk(self, chunk_tokens: int) -> int:
        if chunk_tokens <= 0 or chunk_tokens % self.block_size:
            raise LayoutError(f"chunk_tokens {chunk_tokens} is not a positive multiple of block_size {self.block_size}")
        return chunk_tokens // self.block_size

    def layer_nbytes(self, chunk_tokens: int) -> int:
        """Bytes of one layer of one stored chunk: [plane][token][head][head_nbytes]."""
        self.blocks_per_chunk(chunk_tokens)
        return self.num_planes * chunk_tokens * self.num_heads * self.head_nbytes

    def chunk_nbytes(self, chunk_tokens: int) -> int:
        """Payload bytes of one stored chunk object (layer-major, DESIGN.md §2)."""
        return self.num_layers * self.layer_nbytes(chunk_tokens)

    @property
    def fingerprint(self) -> int:
        """64-bit id of the object format this layout produces (geometry and dtype, not addresses)."""
        desc = struct.pack("<6q", self.num_layers, self.num_planes, self.num_heads, self.head_nbytes,
                           self.elem_size, self.block_size) + self.dtype.encode()
        return int.from_bytes(hashlib.blake2b(desc, digest_size=8).digest(), "little")

    @property
    def native(self):
        """The csrc Layout (built once)."""
        cached = self.__dict__.get("_native")
        if cached is None:
            cached = C.Layout(
                plane_ptrs=[p for layer in self.plane_ptrs for p in layer], num_layers=self.num_layers,
                num_planes=self.num_planes, num_heads=self.num_heads, block_size=self.block_size,
                num_blocks=self.num_blocks, head_nbytes=self.head_nbytes, block_stride=self.block_stride,
                token_stride=self.token_stride, head_stride=self.head_stride)
            object.__setattr__(self, "_native", cached)
        return cached

    def with_layers(self, start: int, stop: int) -> "KVLayout":
        """The same cache restricted to layers [start, stop) (a pipeline-parallel stage)."""
        if not 0 <= start < stop <= self.num_layers:
            raise LayoutError(f"layer range [{start}, {stop}) outside [0, {self.num_layers})")
        return dataclasses.replace(self, plane_ptrs=self.plane_ptrs[start:stop])

    # ---- constructors, one per engine layout ----------------------------------------------
    @classmethod
    def from_vllm(cls, kv_caches: Sequence[Any] | Mapping[str, Any], *, head_size: int | None = None,
                  mla: bool = False) -> "KVLayout":
        """vLLM >= 0.33 per-layer views of logical shape [B, H, N, C] in any stride permutation
        (LBHNC, LBNHC, LHBNC, BLHNC, BLNHC, BHLNC). Standard attention packs K|V along C
        (C = 2*head_size); MLA has one plane of C = kv_lora_rank + rope_dim with H = 1."""
        views = _layer_views(kv_caches, 4, "vLLM [B,H,N,C]")
        v = views[0]
        B, H, N, Cdim = v.shape
        if mla:
            if H != 1:
                raise LayoutError(f"vLLM MLA cache must have H=1, got shape {v.shape}")
            planes, head_elems = [(0,)], Cdim
        else:
            head_elems = head_size if head_size is not None else Cdim // 2
            if head_elems <= 0 or 2 * head_elems != Cdim:
                raise LayoutError(f"vLLM cache packs K|V along C: C={Cdim} must equal 2*head_size ({head_elems})")
            planes = [(0, head_elems * v.itemsize)]
        return cls._build(views, planes[0], num_heads=H, head_nbytes=head_elems * v.itemsize, block_size=N,
                          num_blocks=B, block_stride=v.strides[0], token_stride=v.strides[2],
                          head_stride=v.strides[1], owners=kv_caches)

    @classmethod
    def from_flash_attn(cls, kv_caches: Sequence[Any] | Mapping[str, Any]) -> "KVLayout":
        """Classic FlashAttention per-layer [2, num_blocks, block_size, num_heads, head_size]."""
        return cls._from_kv_split(kv_caches, kv_dim=0, what="FlashAttention [2,B,N,H,D]")

    @classmethod
    def from_flashinfer(cls, kv_caches: Sequence[Any] | Mapping[str, Any]) -> "KVLayout":
        """FlashInfer (and vLLM <= 0.2x FlashAttention) per-layer [num_blocks, 2, block_size, num_heads, head_size]."""
        return cls._from_kv_split(kv_caches, kv_dim=1, what="FlashInfer [B,2,N,H,D]")

    @classmethod
    def _from_kv_split(cls, kv_caches, *, kv_dim: int, what: str) -> "KVLayout":
        """Per-layer 5-D caches whose dims 0 and 1 are K/V (size 2) and blocks, in either order."""
        views = _layer_views(kv_caches, 5, what)
        v = views[0]
        block_dim = 1 - kv_dim
        if v.shape[kv_dim] != 2:
            raise LayoutError(f"{what} cache must have K/V dim 2 {'first' if kv_dim == 0 else 'second'}, "
                              f"got shape {v.shape}")
        _, _, N, H, D = v.shape
        return cls._build(views, (0, v.strides[kv_dim]), num_heads=H, head_nbytes=D * v.itemsize, block_size=N,
                          num_blocks=v.shape[block_dim], block_stride=v.strides[block_dim], token_stride=v.strides[2],
                          head_stride=v.strides[3], owners=kv_caches)

    @classmethod
    def from_mla(cls, kv_caches: Sequence[Any] | Mapping[str, Any]) -> "KVLayout":
        """Classic MLA per-layer [num_blocks, block_size, latent_dim]: one plane, one head."""
        views = _layer_views(kv_caches, 3, "MLA [B,N,D]")
        v = views[0]
        B, N, D = v.shape
        return cls._build(views, (0,), num_heads=1, head_nbytes=D * v.itemsize, block_size=N, num_blocks=B,
                          block_stride=v.strides[0], token_stride=v.strides[1], head_stride=D * v.itemsize,
                          owners=kv_caches)

    @classmethod
    def from_sglang(cls, k_buffers: Sequence[Any], v_buffers: Sequence[Any] | None, *, page_size: int) -> "KVLayout":
        """SGLang device pools: per-layer token-indexed K and V buffers [num_tokens, H, D] (MHA), or
        K buffers only [num_tokens, 1, D] for MLA (v_buffers=None). A block is one page of
        page_size token rows; a trailing partial page is not addressable."""
        if page_size <= 0:
            raise LayoutError(f"page_size must be > 0, got {page_size}")
        k_views = _layer_views(k_buffers, 3, "SGLang K buffer [tokens,H,D]")
        k = k_views[0]
        if k.shape[0] < page_size:
            raise LayoutError(f"SGLang buffer of {k.shape[0]} tokens holds no full page of {page_size}")
        geometry = dict(num_heads=k.shape[1], head_nbytes=k.shape[2] * k.itemsize, block_size=page_size,
                        num_blocks=k.shape[0] // page_size, block_stride=k.strides[0] * page_size,
                        token_stride=k.strides[0], head_stride=k.strides[1])
        if v_buffers is None:
            return cls._build(k_views, (0,), owners=(k_buffers,), **geometry)
        v_views = _layer_views(v_buffers, 3, "SGLang V buffer [tokens,H,D]")
        if len(v_views) != len(k_views) or (v_views[0].shape, v_views[0].strides, v_views[0].dtype) != (
                k.shape, k.strides, k.dtype):
            raise LayoutError("SGLang K and V buffers must have the same layer count, shape, strides and dtype")
        ptrs = tuple((kv.ptr, vv.ptr) for kv, vv in zip(k_views, v_views))
        return cls(plane_ptrs=ptrs, elem_size=k.itemsize, dtype=k.dtype, device=k.device,
                   owners=(k_buffers, v_buffers), **geometry)

    @classmethod
    def _build(cls, views: list[_View], plane_offsets: tuple[int, ...], *, owners, **geometry) -> "KVLayout":
        first = views[0]
        ptrs = tuple(tuple(v.ptr + off for off in plane_offsets) for v in views)
        return cls(plane_ptrs=ptrs, elem_size=first.itemsize, dtype=first.dtype, device=first.device,
                   owners=(owners,), **geometry)
