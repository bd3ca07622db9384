"""`kvstore bench worker`: the vLLM connector's worker-side path on CUDA tensors shaped like
Llama-3.1-8B's KV cache (32 layers, 8 KV heads x 128, bf16, 16-token blocks, vLLM 0.33's
per-layer [B,H,N,C] views), through the same Store sessions the connector drives:
begin_save + save_layer(l, stream) after each layer's compute + finish, then begin_load +
wait_layer(l, stream) before each layer's compute + close.

Prints save and load GB/s next to one pinned cudaMemcpy of the same bytes (same run), and the
per-layer wait: how long the compute stream stood still at wait_layer(l) (CUDA events around
the wait), p50 / p99 / max over layers, plus the host time of each wait_layer call. The
"compute" per layer is a bf16 matmul sized to take about the per-layer transfer time.
Checks bit-exactness of the reload before reporting.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import machine, pinned_h2d_gbps, print_table, write_json

LAYERS, HEADS, HEAD, BLOCK = 32, 8, 128, 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", default="8192,32768", help="request sizes in tokens")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench-out")


def _run_size(torch, store, tokens: int, chunk: int, repeats: int) -> dict:
    from kvstore import KVLayout

    num_blocks = tokens // BLOCK + 64
    flat = torch.randn(LAYERS, num_blocks, BLOCK, HEADS, 2 * HEAD, dtype=torch.bfloat16, device="cuda")
    views = [flat[l].permute(0, 2, 1, 3) for l in range(LAYERS)]
    layout = KVLayout.from_vllm(views)
    store.preallocate(layout)
    nbytes = tokens * LAYERS * 2 * HEADS * HEAD * 2
    rng = np.random.default_rng(tokens)
    ids = rng.permutation(num_blocks)[:tokens // BLOCK]
    stream = torch.cuda.current_stream()
    # A per-layer "forward" sized to about the per-layer transfer at ~50 GB/s.
    per_layer_s = nbytes / LAYERS / 50e9
    n = 1024
    while True:
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        a @ a  # warm-up: cuBLAS picks and loads its kernel on the first call of a shape
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        if (time.perf_counter() - t) / 10 >= per_layer_s or n >= 16384:
            break
        n += 512

    def compute():
        a @ a

    saves, loads, waits_dev, waits_host, exact = [], [], [], [], True
    for rep in range(repeats):
        keys = [rng.bytes(16) for _ in range(tokens // chunk)]
        reference = flat.clone()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session = store.begin_save(keys, layout, ids)
        for l in range(LAYERS):
            compute()
            session.save_layer(l, stream)
        session.finish()
        saves.append(time.perf_counter() - t0)

        flat.fill_(0)
        torch.cuda.synchronize()
        before = [torch.cuda.Event(enable_timing=True) for _ in range(LAYERS)]
        after = [torch.cuda.Event(enable_timing=True) for _ in range(LAYERS)]
        host = []
        t0 = time.perf_counter()
        load = store.begin_load(keys, layout, ids)
        for l in range(LAYERS):
            before[l].record(stream)
            h = time.perf_counter()
            load.wait_layer(l, stream)
            host.append(time.perf_counter() - h)
            after[l].record(stream)
            compute()
        torch.cuda.synchronize()
        loads.append(time.perf_counter() - t0)
        load.close()
        if load.loaded_chunks != len(keys):
            raise RuntimeError(f"only {load.loaded_chunks} of {len(keys)} chunks loaded")
        got = flat[:, torch.as_tensor(ids, device="cuda")]
        want = reference[:, torch.as_tensor(ids, device="cuda")]
        exact = exact and bool(torch.equal(got.view(torch.int16), want.view(torch.int16)))
        if rep:  # the first round warms streams, plans and the DRAM slots
            waits_dev += [b.elapsed_time(e) for b, e in zip(before, after)]
            waits_host += [x * 1e3 for x in host]
        store.evict("dram")
    compute_ms = per_layer_s * 1e3

    del flat, reference
    ceiling_gbps = pinned_h2d_gbps(nbytes)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]
    return {
        "tokens": tokens, "bytes": nbytes, "matmul_n": n, "compute_per_layer_ms": compute_ms,
        "save_gbps": nbytes / min(saves) / 1e9, "load_gbps": nbytes / min(loads) / 1e9,
        "ceiling_gbps": ceiling_gbps, "bit_exact": exact,
        "wait_device_ms": {"p50": statistics.median(waits_dev), "p99": q(waits_dev, 0.99), "max": max(waits_dev),
                           "layer0_median": statistics.median(waits_dev[::LAYERS])},
        "wait_host_ms": {"p50": statistics.median(waits_host), "max": max(waits_host)},
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    from kvstore import Store

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(chunk_tokens=args.chunk_tokens, dram_capacity_bytes="8GiB", dram_slab_bytes="1GiB",
                      ssd_path=None, write_back=False)
        try:
            for tokens in [int(t) for t in args.tokens.split(",")]:
                rows.append(_run_size(torch, store, tokens, args.chunk_tokens, args.repeats))
        finally:
            store.close()
    print_table(["tokens", "save GB/s", "load GB/s", "ceiling", "save/ceil", "load/ceil", "wait p50 ms", "wait p99",
                 "wait max", "layer0", "host p50", "exact"],
                [[r["tokens"], r["save_gbps"], r["load_gbps"], r["ceiling_gbps"], r["save_gbps"] / r["ceiling_gbps"],
                  r["load_gbps"] / r["ceiling_gbps"], r["wait_device_ms"]["p50"], r["wait_device_ms"]["p99"],
                  r["wait_device_ms"]["max"], r["wait_device_ms"]["layer0_median"], r["wait_host_ms"]["p50"],
                  r["bit_exact"]] for r in rows])
    print("(save/load: wall time of the whole session incl. the synthetic per-layer matmuls; wait: time the "
          "compute stream stood at wait_layer, from CUDA events; ceiling: one pinned cudaMemcpy, same run)")
    result = {"benchmark": "worker", "machine": machine(), "gpu": torch.cuda.get_device_name(), "rows": rows}
    write_json(Path(args.out), "worker", result)
    return result
