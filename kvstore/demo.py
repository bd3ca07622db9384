"""`kvstore demo`: one realistic offload/reload round on the embedded store.

A Llama-3.1-8B-shaped paged KV cache (32 layers, 8 KV heads x 128, bf16, 16-token blocks, vLLM's
per-layer [B,H,N,C] views) holds a prompt of random tokens. The demo saves its chunks, lets
write-back put them on SSD, evicts DRAM, poisons the cache, reloads from SSD, reloads again from
DRAM, checks every byte, and prints hits per tier and GB/s. It uses the GPU when one is present
(and the GPU movers are built), the CPU otherwise.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from . import Store, chunk_keys, namespace
from ._native import gpu_available
from .config import Config
from .errors import KVStoreError
from .layout import KVLayout

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=4096, help="prompt length (full chunks are stored)")
    p.add_argument("--ssd-path", default=None, help="SSD tier directory (default: a temporary one)")
    p.add_argument("--cpu", action="store_true", help="use host memory even when a GPU is present")


def _make_cache(num_blocks: int, use_gpu: bool, seed: int):
    """vLLM LBNHC: one buffer, per-layer [B,H,N,C] views with K|V packed along C."""
    shape = (LAYERS, num_blocks, BLOCK, KV_HEADS, 2 * HEAD_DIM)
    if use_gpu:
        import torch
        g = torch.Generator(device="cuda").manual_seed(seed)
        flat = torch.randn(shape, dtype=torch.bfloat16, device="cuda", generator=g)
        return flat, [flat[l].permute(0, 2, 1, 3) for l in range(LAYERS)]
    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)  # bf16 bit patterns
    return flat, [flat[l].transpose(0, 2, 1, 3) for l in range(LAYERS)]


def _copy(flat):
    return flat.clone() if hasattr(flat, "clone") else flat.copy()


def _equal(a, b) -> bool:
    if hasattr(a, "equal"):
        return bool(a.view(dtype=__import__("torch").int16).equal(b.view(dtype=__import__("torch").int16)))
    return bool(np.array_equal(a, b))


def _sync(use_gpu: bool) -> None:
    if use_gpu:
        import torch
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> int:
    use_gpu = gpu_available() and not args.cpu
    if use_gpu:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("a GPU is present but torch is not installed: running on the CPU")
            use_gpu = False
    defaults = Config.load()
    chunk = defaults.chunk_tokens
    chunks = args.tokens // chunk
    if chunks < 1:
        print(f"--tokens must be at least one chunk ({chunk} tokens)")
        return 2
    blocks_needed = chunks * (chunk // BLOCK)
    num_blocks = blocks_needed + 37  # spare blocks so ids are scattered, not 0..n-1
    flat, views = _make_cache(num_blocks, use_gpu, seed=1)
    layout = KVLayout.from_vllm(views)
    nbytes = chunks * layout.chunk_nbytes(chunk)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 128_000, size=args.tokens)
    keys = chunk_keys(tokens, namespace(model="meta-llama/Llama-3.1-8B", dtype="bfloat16", shard="tp1",
                                        chunk_tokens=chunk, format=1), chunk)
    block_ids = rng.permutation(num_blocks)[:blocks_needed]
    where = "GPU (" + str(layout.device) + ")" if use_gpu else "CPU"
    print(f"kvstore demo: Llama-3.1-8B KV shape, {args.tokens} tokens = {chunks} chunks of {chunk} tokens, "
          f"{nbytes / 2**20:.0f} MiB, on the {where}")

    with tempfile.TemporaryDirectory(prefix="kvstore-demo-") as tmp:
        store = Store(Config.load(ssd_path=args.ssd_path or tmp))
        try:
            if use_gpu:  # as the vLLM connector does at start-up: pin once, off the data path
                t0 = time.perf_counter()
                pinned = store.preallocate(layout)
                print(f"  DRAM tier pinned       : {pinned / 2**30:.1f} GiB in {time.perf_counter() - t0:.1f} s")
            reference = _copy(flat)
            t0 = time.perf_counter()
            saved = store.save(keys, layout, block_ids).wait(timeout_s=300)
            _sync(use_gpu)
            t_save = time.perf_counter() - t0
            if not store.flush(timeout_s=300):
                print("write-back did not finish in 300 s")
                return 1
            t_flush = time.perf_counter() - t0
            print(f"  save    engine -> DRAM : {saved.stored} stored, {saved.skipped} already present, "
                  f"{nbytes / t_save / 1e9:6.2f} GB/s")
            print(f"  write-back DRAM -> SSD : {nbytes / t_flush / 1e9:6.2f} GB/s (from the save call)")
            print(f"  lookup                 : {store.lookup(keys)} of {chunks} chunks present")
            evicted = store.evict("dram")
            print(f"  evicted from DRAM      : {evicted} objects")
            rounds = [("load    SSD -> engine  ", "ssd"), ("load    DRAM -> engine ", "dram")]
            for label, tier in rounds:
                flat.fill_(0) if use_gpu else flat.fill(0xDEAD)  # poison: the load must rewrite every byte
                t0 = time.perf_counter()
                result = store.load(keys, layout, block_ids).wait(timeout_s=300)
                _sync(use_gpu)
                dt = time.perf_counter() - t0
                ok = result.complete and _equal(flat[:, block_ids], reference[:, block_ids])
                print(f"  {label}: {result.loaded_chunks}/{chunks} chunks, hits {result.hits_by_tier}, "
                      f"{nbytes / dt / 1e9:6.2f} GB/s, bytes {'verified' if ok else 'WRONG'}")
                if not ok:
                    return 1
            stats = store.stats()
            print("  tiers:", {k: v for k, v in stats["counters"].items() if k.startswith(("hits", "evictions"))})
            print(f"  DRAM {stats['dram']['used_bytes'] / 2**20:.0f} MiB used (pinned: {stats['dram']['pinned']}), "
                  f"SSD {stats['ssd']['objects']} objects in {stats['ssd']['path']}")
            print("demo OK")
            return 0
        except KVStoreError as e:
            print(f"demo failed: {type(e).__name__}: {e}")
            return 1
        finally:
            store.close()
