"""Where the DMA path loses time on scattered units: the pinned memory's backing, the host, or
the copy engines?

The same Llama-3.1-8B batch (random block ids, 32 KiB units) is moved through pinned arenas made
four ways (the project's host_alloc, 2 MiB-aligned huge pages, no huge pages, the driver's
cudaHostAlloc), each printed next to the one-shot memcpy ceiling on the same arena, with the
arena's share of 2 MiB pages; "gated" rates hold the stream on a GPU spin until every copy is
enqueued (the copy engines' own rate), and "enqueue ms" is the host time of one call. Found
(results/gpu_H100-80GB-HBM3.md, run L): the backing does not matter, gated copies run at the
ceiling, and enqueueing costs about as long as the copies take.

    python -m benchmarks.host_pages [--tokens 4096] [--rounds 2] [--reps 5] [--arenas ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import time
from pathlib import Path

import numpy as np

from .common import write_json

SHAPE = "llama3.1-8b"
HUGE = 2 << 20


def huge_share(addr: int, nbytes: int) -> float:
    """Share of [addr, addr+nbytes) backed by transparent huge pages (from /proc/self/smaps)."""
    huge, cur = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            cur = (lo, hi) if lo < addr + nbytes and hi > addr else None
        elif cur and head == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
    return huge / nbytes


class Arena:
    """nbytes of pinned, device-mapped host memory, backed as `how` says; filled with non-zero bytes."""

    def __init__(self, how: str, nbytes: int, C, torch):
        self.how, self.nbytes, self._keep = how, nbytes, None
        if how == "host_alloc":  # the project's allocator (mmap + MADV_HUGEPAGE + cudaHostRegister)
            self._keep, _ = C.host_alloc(nbytes, True)
            self.ptr = self._keep.ctypes.data
        elif how == "cuda_host_alloc":  # the driver's pinned allocation (torch's pinned allocator)
            self._keep = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.ptr = self._keep.data_ptr()
        else:  # "thp_aligned" / "no_thp": anonymous mmap, 2 MiB aligned, huge pages asked for or refused
            self._map = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
            off = (-base) % HUGE
            self._map.madvise(mmap.MADV_HUGEPAGE if how == "thp_aligned" else mmap.MADV_NOHUGEPAGE, off, nbytes)
            self.ptr = base + off
            C.host_register(self.ptr, nbytes)
        np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.ptr))[:] = 0x5A
        self.huge = huge_share(self.ptr, nbytes)

    def close(self, C):
        if self.how in ("thp_aligned", "no_thp"):
            C.host_unregister(self.ptr)
        self._keep = None


def run(args) -> dict:
    import torch

    from kvstore._native import C

    from .gpu import BLOCK, CHUNK, SHAPES, Timer, _gbs, make_batch

    if C.cuda_device_count() == 0 or not torch.cuda.is_available():
        raise SystemExit("benchmarks.host_pages needs a CUDA device")
    stream = torch.cuda.Stream()
    sh = stream.cuda_stream
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = args.tokens
    L = SHAPES[SHAPE][0]
    bpc, n_chunks = CHUNK // BLOCK, tokens // CHUNK
    caches, layout, ids = make_batch(torch, gen, SHAPE, tokens)
    chunk_bytes = layout.chunk_nbytes(CHUNK)
    total = chunk_bytes * n_chunks
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")

    timer = Timer(torch, stream)

    def spin():  # holds the stream ~20-30 ms on the GPU while fn enqueues everything
        with torch.cuda.stream(stream):
            torch.cuda._sleep(30_000_000)

    def timed(fn, reps, gate=False) -> float:
        """GB/s of fn on the stream (median of reps). gate: the stream first spins on the GPU, so
        everything fn enqueues is in place before the copies start (the GPU-side rate alone)."""
        return _gbs(total, timer(fn, reps, before=spin if gate else None))

    rows = []
    for rnd in range(args.rounds):
        for how in args.arenas.split(","):
            a = Arena(how, total, C, torch)
            objs = np.array([a.ptr + i * chunk_bytes for i in range(n_chunks)], np.uint64)
            row = {"round": rnd, "arena": how, "huge_page_share": a.huge,
                   "ceiling_d2h": timed(lambda: C.cuda_memcpy_async(a.ptr, dev.data_ptr(), total, sh), args.reps),
                   "ceiling_h2d": timed(lambda: C.cuda_memcpy_async(dev.data_ptr(), a.ptr, total, sh), args.reps)}
            for name, path in (("dma", 4), ("staged", 2)):
                save = lambda: C.gpu_gather(layout.native, ids, objs, bpc, 0, L, stream=sh, path=path)
                load = lambda: C.gpu_scatter(layout.native, ids, objs, bpc, 0, L, stream=sh, path=path)
                row[f"{name}_save"] = timed(save, args.reps)
                row[f"{name}_load"] = timed(load, args.reps)
                row[f"{name}_save_gated"] = timed(save, args.reps, gate=True)
                row[f"{name}_load_gated"] = timed(load, args.reps, gate=True)
                t0 = time.perf_counter()
                load()
                row[f"{name}_load_enqueue_ms"] = (time.perf_counter() - t0) * 1e3
                torch.cuda.synchronize()
            torch.cuda.synchronize()
            a.close(C)
            rows.append(row)
            print(f"| {rnd} | {how} | {row['huge_page_share']:.2f} | {row['ceiling_d2h']:.1f} / {row['ceiling_h2d']:.1f} | "
                  f"{row['dma_save']:.1f} ({row['dma_save'] / row['ceiling_d2h']:.2f}) / "
                  f"{row['dma_load']:.1f} ({row['dma_load'] / row['ceiling_h2d']:.2f}) | "
                  f"{row['staged_save']:.1f} / {row['staged_load']:.1f} | "
                  f"{row['dma_save_gated']:.1f} / {row['dma_load_gated']:.1f} | {row['dma_load_enqueue_ms']:.2f} | "
                  f"{row['staged_save_gated']:.1f} / {row['staged_load_gated']:.1f} | {row['staged_load_enqueue_ms']:.2f} |",
                  flush=True)
    out = {"gpu": C.cuda_device_info(0)["name"], "tokens": tokens, "bytes": total, "rows": rows}
    if args.out:
        write_json(Path(args.out), "host_pages", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="")
    ap.add_argument("--arenas", default="host_alloc,thp_aligned,no_thp,cuda_host_alloc")
    args = ap.parse_args()
    print("| round | arena | 2 MiB pages | ceiling save / load GB/s | dma save / load (ratio) | staged save / load "
          "| dma gated save / load | dma load enqueue ms | staged gated save / load | staged load enqueue ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    run(args)


if __name__ == "__main__":
    main()
