"""HostPages: where the bytes of one SGLang host-pool page live, and the copies between such a
page and one stored object (a pinned DRAM slot). No decisions, no store access.

One stored object per page holds K and V together and is byte-for-byte the pool's *flat data
page* (`get_data_page(index)`): MHA `[K,V][layer][token][head][dim]` for layer_first,
`[K,V][token][layer][head][dim]` for page_first, `[K,V][layer][token][head][dim]` for
page_first_direct, `[K,V][head][token][layer][dim]` for page_head; MLA `[layer][token][dim]`
(layer_first) or `[token][layer][dim]` (page_first, page_first_direct). So the zero-copy
`batch_*_v1` path and the tensor `get`/`set` fallback read and write the same objects.

`get_page_buffer_meta(indices)` gives, per page, the contiguous pieces of that page in the
pool (MHA: K and V alternating, per layer for layer_first; MLA: one plane). The object is the K
pieces in order, then the V pieces. Copies are `ctypes.memmove` of whole pieces (GIL released,
no Python bytes), after every piece has been checked to lie inside the pool's buffer.
"""
from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvstore import InvalidArgumentError, LayoutError

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


@dataclass(frozen=True)
class HostPages:
    pool: Any                  # SGLang HostKVCache (kept alive: its memory is what we copy)
    host_layout: str
    dtype: str
    page_tokens: int
    planes: int                # 2: K and V pieces alternate in the meta; 1: MLA
    piece_nbytes: tuple[int, ...]  # one page's pieces, in meta order
    object_nbytes: int
    fingerprint: int           # 64-bit digest of the geometry (stored with each object)
    buffer_lo: int             # the pool's buffer [lo, hi): every piece must lie inside
    buffer_hi: int

    @classmethod
    def of(cls, pool: Any) -> "HostPages":
        from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        kind = type(pool)
        if kind is MHATokenToKVPoolHost:
            planes, layouts = 2, MHA_LAYOUTS
        elif kind is MLATokenToKVPoolHost:
            planes, layouts = 1, MLA_LAYOUTS
        else:
            raise LayoutError(f"KVStoreHiCacheStorage supports MHATokenToKVPoolHost and MLATokenToKVPoolHost, "
                              f"got {kind.__name__}")
        layout = getattr(pool, "layout", None)
        if layout not in layouts:
            raise LayoutError(f"{kind.__name__} layout {layout!r} is not supported (supported: {', '.join(layouts)})")
        buf = getattr(pool, "kv_buffer", None)
        if buf is None or buf.device.type != "cpu" or not buf.is_contiguous():
            raise LayoutError(f"{kind.__name__}.kv_buffer must be one contiguous host tensor")
        page_tokens = int(getattr(pool, "logical_page_size", None) or pool.page_size)
        import torch
        ptrs, sizes = pool.get_page_buffer_meta(torch.arange(page_tokens, dtype=torch.int64))
        if not sizes or len(ptrs) != len(sizes) or len(sizes) % planes:
            raise LayoutError(f"{kind.__name__}.get_page_buffer_meta gave {len(ptrs)} pointers and {len(sizes)} sizes "
                              f"for one page")
        object_nbytes = int(sum(sizes))
        flat_nbytes = int(pool.get_size_per_token()) * int(pool.page_size)
        if object_nbytes != flat_nbytes:
            raise LayoutError(f"{kind.__name__}: a page's buffer pieces hold {object_nbytes} bytes but its flat data "
                              f"page has {flat_nbytes} (unequal K/V head dims are not supported)")
        dtype = str(pool.dtype).replace("torch.", "")
        geometry = (f"{kind.__name__}|{layout}|{dtype}|layers={pool.layer_num}|page={pool.page_size}|"
                    f"pieces={','.join(map(str, sizes))}")
        fingerprint = int.from_bytes(hashlib.blake2b(geometry.encode(), digest_size=8).digest(), "little")
        lo = buf.data_ptr()
        return cls(pool, layout, dtype, page_tokens, planes, tuple(int(s) for s in sizes), object_nbytes,
                   fingerprint, lo, lo + buf.numel() * buf.element_size())

    # ---- addressing --------------------------------------------------------------------------
    def pieces(self, host_indices: Any, num_pages: int) -> np.ndarray:
        """(num_pages, pieces per page) source addresses in OBJECT order, bounds-checked.
        host_indices holds num_pages * page_tokens token slots, page i from [i * page_tokens]."""
        n = len(host_indices) if host_indices is not None else -1
        if n != num_pages * self.page_tokens:
            raise InvalidArgumentError(f"{num_pages} pages need {num_pages * self.page_tokens} host indices, got {n}")
        if num_pages == 0:
            return np.zeros((0, len(self.piece_nbytes)), dtype=np.uint64)
        firsts = np.asarray(host_indices[::self.page_tokens].tolist(), dtype=np.int64)
        if (firsts % self.page_tokens).any():
            bad = int(firsts[(firsts % self.page_tokens) != 0][0])
            raise InvalidArgumentError(f"host index {bad} does not start a page of {self.page_tokens} tokens")
        try:
            ptrs, sizes = self.pool.get_page_buffer_meta(host_indices)
        except (AssertionError, IndexError, ValueError) as e:
            raise InvalidArgumentError(f"host indices rejected by the pool: {e}") from None
        per_page = len(self.piece_nbytes)
        if len(ptrs) != num_pages * per_page or tuple(sizes[:per_page]) != self.piece_nbytes:
            raise LayoutError("the host pool's page geometry changed after register_mem_pool_host")
        addrs = np.asarray(ptrs, dtype=np.uint64).reshape(num_pages, per_page)
        ends = addrs + np.asarray(self.piece_nbytes, dtype=np.uint64)
        if int(addrs.min()) < self.buffer_lo or int(ends.max()) > self.buffer_hi:
            raise InvalidArgumentError("host indices address memory outside the host pool")
        return addrs[:, self._object_order()]

    def _object_order(self) -> list[int]:
        n = len(self.piece_nbytes)
        return [i for plane in range(self.planes) for i in range(plane, n, self.planes)]

    def _object_piece_nbytes(self) -> list[int]:
        return [self.piece_nbytes[i] for i in self._object_order()]

    # ---- copies ------------------------------------------------------------------------------
    def page_to_object(self, page_addrs: Sequence[int], object_ptr: int) -> None:
        offset = 0
        for addr, nbytes in zip(page_addrs, self._object_piece_nbytes()):
            ctypes.memmove(object_ptr + offset, int(addr), nbytes)
            offset += nbytes

    def object_to_page(self, object_ptr: int, page_addrs: Sequence[int]) -> None:
        offset = 0
        for addr, nbytes in zip(page_addrs, self._object_piece_nbytes()):
            ctypes.memmove(int(addr), object_ptr + offset, nbytes)
            offset += nbytes

    def check_flat_page(self, tensor: Any, what: str) -> int:
        """Address of a flat-page tensor (the fallback path's value/target), after checking it."""
        if tensor is None or not hasattr(tensor, "data_ptr"):
            raise InvalidArgumentError(f"{what} must be a torch tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise InvalidArgumentError(f"{what} must be a contiguous host tensor")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != self.object_nbytes:
            raise InvalidArgumentError(f"{what} holds {nbytes} bytes, a page object is {self.object_nbytes}")
        return tensor.data_ptr()

    def empty_flat_page(self) -> Any:
        import torch
        return torch.empty(self.object_nbytes // self.pool.dtype.itemsize, dtype=self.pool.dtype)
