"""`kvstore bench gpu`: GPU gather (save) / scatter (load) between a paged KV cache on the GPU and
layer-major objects in pinned host memory, each figure next to its ceiling measured in the same
run (DESIGN.md §8, issue 3):

- ceiling: one pinned contiguous cudaMemcpyAsync of the same bytes (per direction; both at once
  for the bidirectional ceiling)
- naive: one cudaMemcpyAsync per block per layer per K/V plane (issued from C++)
- torch: per layer and plane torch.index_select into a contiguous device buffer + one copy to
  pinned memory (load: the copy then index_copy_), i.e. the same bytes without our kernels
- ours: kvstore._C.gpu_gather / gpu_scatter, each path and CTA count swept, and `auto`
- SM interference: bf16 8192^3 matmul TFLOP/s alone vs while save/load run back to back on
  another stream
- layer-wise: a synthetic 32-layer forward (one matmul per layer sized to ~ the per-layer transfer
  time) with LayerwiseLoad vs compute only

Writes JSON + PNG to --out and prints a table. Needs torch and a CUDA device.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # name: (layers, kv heads, head dim, mla)
    "llama3.1-8b": (32, 8, 128, False),
    "llama-70b-tp4": (80, 2, 128, False),
    "deepseek-v3-mla": (61, 1, 576, True),
}
BLOCK = 16
CHUNK = 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench-out", help="directory for gpu_<name>.json/.png/.md")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    p.add_argument("--tokens", default="4096,32768", help="request lengths in tokens")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--sweep", action="store_true", help="sweep paths and CTA counts (slower)")
    p.add_argument("--quick", action="store_true", help="skip interference, bidirectional and layer-wise parts")
    p.add_argument("--device", type=int, default=0)


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


class Timer:
    def __init__(self, torch, stream):
        self.torch, self.stream = torch, stream

    def __call__(self, fn, reps: int, warmup: int = 1) -> float:
        """Median ms of fn() enqueued on self.stream, timed with events."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record(self.stream)
            fn()
            b.record(self.stream)
            b.synchronize()
            out.append(a.elapsed_time(b))
        return statistics.median(out)


def run(args) -> dict:
    import torch
    from tqdm import tqdm

    from kvstore._native import C
    from kvstore import gpu_movers
    from kvstore.layout import KVLayout

    if C.cuda_device_count() == 0 or not torch.cuda.is_available():
        raise SystemExit("kvstore bench gpu needs a CUDA device")
    dev = args.device
    torch.cuda.set_device(dev)
    info = C.cuda_device_info(dev)
    gpu_name = info["name"].replace("NVIDIA ", "").replace(" ", "-")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    token_list = [int(t) for t in args.tokens.split(",") if t]
    stream = torch.cuda.Stream()
    sh = stream.cuda_stream
    timer = Timer(torch, stream)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def layer_shape(L, H, D, mla, num_blocks):
        return [(num_blocks, BLOCK, D)] * L if mla else [(2, num_blocks, BLOCK, H, D)] * L

    # One pinned host arena and one device "contiguous" buffer, sized for the largest case.
    def obj_bytes(shape, tokens):
        L, H, D, mla = SHAPES[shape]
        return L * (1 if mla else 2) * tokens * H * D * 2
    max_bytes = max(obj_bytes(s, t) for s in shapes for t in token_list)
    t0 = time.perf_counter()
    arena, pinned = C.host_alloc(max_bytes, True)
    if not pinned:
        raise SystemExit("could not pin host memory")
    arena_ptr = arena.ctypes.data
    arena[:] = 0x5A  # touched (and never zeros in what we time)
    pin_s = time.perf_counter() - t0
    dev_buf = torch.empty(max_bytes, dtype=torch.uint8, device="cuda")
    results = {"gpu": info, "torch": torch.__version__, "cuda_runtime": C.cuda_runtime_version(),
               "host": platform.node(), "pin_seconds": pin_s, "cases": [], "notes": []}

    cases = [(s, t) for s in shapes for t in token_list]
    bar = tqdm(total=len(cases), desc="gpu bench", unit="case")
    for shape, tokens in cases:
        L, H, D, mla = SHAPES[shape]
        planes = 1 if mla else 2
        n_blocks_req = tokens // BLOCK
        num_blocks = n_blocks_req + n_blocks_req // 4 + 1
        caches = [torch.randint(-2**15, 2**15 - 1, s, dtype=torch.int16, device="cuda", generator=gen)
                  .view(torch.bfloat16) for s in layer_shape(L, H, D, mla, num_blocks)]
        layout = KVLayout.from_mla(caches) if mla else KVLayout.from_flash_attn(caches)
        bpc = CHUNK // BLOCK
        n_chunks = tokens // CHUNK
        rng = np.random.default_rng(tokens)
        ids = rng.permutation(num_blocks)[:n_blocks_req].astype(np.int64)
        ids[-1] = num_blocks - 1
        chunk_bytes = layout.chunk_nbytes(CHUNK)
        total = chunk_bytes * n_chunks
        objs = np.array([arena_ptr + i * chunk_bytes for i in range(n_chunks)], np.uint64)
        case = {"shape": shape, "tokens": tokens, "bytes": total, "chunk_bytes": chunk_bytes,
                "segment_bytes": BLOCK * H * D * 2, "layout": "mla [B,N,D]" if mla else "flash_attn [2,B,N,H,D]"}
        reps = args.reps if total < (1 << 31) else max(3, args.reps // 2)

        # ceilings
        dptr = dev_buf.data_ptr()
        case["ceiling_d2h"] = _gbs(total, timer(lambda: C.cuda_memcpy_async(arena_ptr, dptr, total, sh), reps))
        case["ceiling_h2d"] = _gbs(total, timer(lambda: C.cuda_memcpy_async(dptr, arena_ptr, total, sh), reps))

        # naive: one cudaMemcpyAsync per block per layer per plane (segments are contiguous here)
        seg = BLOCK * H * D * 2
        eng, objp = [], []
        for c in range(n_chunks):
            for li in range(L):
                for p in range(planes):
                    for k in range(bpc):
                        b = int(ids[c * bpc + k])
                        eng.append(layout.plane_ptrs[li][p] + b * layout.block_stride)
                        objp.append(int(objs[c]) + ((li * planes + p) * bpc + k) * seg)
        eng = np.array(eng, np.uint64)
        objp = np.array(objp, np.uint64)
        sizes = np.full(len(eng), seg, np.int64)
        nreps = 1 if len(eng) > 20000 else 3
        case["naive_save"] = _gbs(total, timer(lambda: C.cuda_memcpy_segments(objp, eng, sizes, sh, False), nreps, 0))
        case["naive_load"] = _gbs(total, timer(lambda: C.cuda_memcpy_segments(eng, objp, sizes, sh, False), nreps, 0))
        case["batched_dma_save"] = _gbs(total, timer(lambda: C.cuda_memcpy_segments(objp, eng, sizes, sh, True), nreps))
        case["batched_dma_load"] = _gbs(total, timer(lambda: C.cuda_memcpy_segments(eng, objp, sizes, sh, True), nreps))

        # torch: index_select per layer/plane into a device buffer + one copy to pinned (and back)
        host_t = torch.from_numpy(arena[:total])
        tids = torch.from_numpy(ids).cuda()
        stage = dev_buf[:total]

        def torch_save():
            with torch.cuda.stream(stream):
                off = 0
                for li in range(L):
                    for p in range(planes):
                        src = caches[li] if mla else caches[li][p]
                        n = n_blocks_req * seg
                        torch.index_select(src, 0, tids, out=stage[off:off + n].view(torch.bfloat16).view(
                            n_blocks_req, *src.shape[1:]))
                        off += n
                host_t.copy_(stage, non_blocking=True)

        def torch_load():
            with torch.cuda.stream(stream):
                stage.copy_(host_t, non_blocking=True)
                off = 0
                for li in range(L):
                    for p in range(planes):
                        dst = caches[li] if mla else caches[li][p]
                        n = n_blocks_req * seg
                        dst.index_copy_(0, tids, stage[off:off + n].view(torch.bfloat16).view(n_blocks_req, *dst.shape[1:]))
                        off += n
        case["torch_save"] = _gbs(total, timer(torch_save, reps))
        case["torch_load"] = _gbs(total, timer(torch_load, reps))

        # ours
        def ours(direction, path, ctas=0):
            fn = C.gpu_gather if direction == "save" else C.gpu_scatter
            return lambda: fn(layout.native, ids, objs, bpc, 0, L, stream=sh, path=path, ctas=ctas)
        variants = {}
        configs = [("auto", 0, 0)]
        if args.sweep:
            configs += [("direct", 1, c) for c in (4, 8, 16, 32, 132)] + [("staged", 2, c) for c in (2, 4, 8, 16)]
        for direction in ("save", "load"):
            for name, path, ctas in configs:
                key = f"{name}" + (f"/{ctas}" if ctas else "")
                variants[f"{direction}:{key}"] = _gbs(total, timer(ours(direction, path, ctas), reps))
        fn = C.gpu_gather
        case["auto_path_save"] = gpu_movers.PATH_NAMES[fn(layout.native, ids[:bpc], objs[:1], bpc, 0, L, stream=sh)]
        case["auto_path_load"] = gpu_movers.PATH_NAMES[C.gpu_scatter(layout.native, ids[:bpc], objs[:1], bpc, 0, L,
                                                                     stream=sh)]
        torch.cuda.synchronize()
        # the ceiling again after our runs: the better of the two medians is the ceiling
        case["ceiling_d2h"] = max(case["ceiling_d2h"], _gbs(total, timer(
            lambda: C.cuda_memcpy_async(arena_ptr, dptr, total, sh), reps)))
        case["ceiling_h2d"] = max(case["ceiling_h2d"], _gbs(total, timer(
            lambda: C.cuda_memcpy_async(dptr, arena_ptr, total, sh), reps)))
        case["ours"] = variants
        case["ours_save"] = variants["save:auto"]
        case["ours_load"] = variants["load:auto"]
        for d in ("save", "load"):
            ceil = case["ceiling_d2h" if d == "save" else "ceiling_h2d"]
            case[f"ratio_{d}"] = case[f"ours_{d}"] / ceil
            case[f"ratio_naive_{d}"] = case[f"naive_{d}"] / ceil
            case[f"ratio_torch_{d}"] = case[f"torch_{d}"] / ceil

        # correctness spot check of this big case: round trip through the objects
        ref = [c.clone() for c in caches]
        C.gpu_gather(layout.native, ids, objs, bpc, 0, L, stream=sh)
        for c in caches:
            c.view(torch.int16).random_(generator=gen)
        C.gpu_scatter(layout.native, ids, objs, bpc, 0, L, stream=sh)
        torch.cuda.synchronize()
        tid = torch.from_numpy(ids).cuda()
        ok = all(torch.equal((c if mla else c.transpose(0, 1)).index_select(0, tid).view(torch.int16),
                             (r if mla else r.transpose(0, 1)).index_select(0, tid).view(torch.int16))
                 for c, r in zip(caches, ref))
        case["roundtrip_ok"] = bool(ok)
        del ref

        if not args.quick and shape == shapes[0] and tokens == token_list[0]:
            case.update(_interference(torch, C, layout, ids, objs, bpc, L, total, arena_ptr, dptr))
            case.update(_layerwise(torch, C, gpu_movers, layout, ids, objs, bpc, L, total))
        results["cases"].append(case)
        bar.update(1)
        bar.set_postfix(shape=shape, tokens=tokens, save=f"{case['ratio_save']:.2f}", load=f"{case['ratio_load']:.2f}")
        del caches, layout
        torch.cuda.empty_cache()
    bar.close()

    stem = out_dir / f"gpu_{gpu_name}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = _table(results)
    Path(f"{stem}.md").write_text(table)
    _plot(results, f"{stem}.png")
    print(table)
    print(f"wrote {stem}.json, {stem}.md, {stem}.png")
    return results


def _interference(torch, C, layout, ids, objs, bpc, L, total, arena_ptr, dptr) -> dict:
    """bf16 8192^3 matmul TFLOP/s alone vs with save / load / both running on other streams."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    comp = torch.cuda.Stream()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    iters = 40

    def mm_tflops(background):
        with torch.cuda.stream(comp):
            for _ in range(3):
                torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        # estimate how many transfers cover the matmul loop
        background(4)  # enqueue some transfers first so they are running when the matmuls start
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(comp):
            e0.record(comp)
            for _ in range(iters):
                torch.matmul(a, b, out=c)
            e1.record(comp)
        background(-1)  # keep transfers going until the matmuls finish
        e1.synchronize()
        ms = e0.elapsed_time(e1)
        torch.cuda.synchronize()
        return 2 * n ** 3 * iters / (ms * 1e-3) / 1e12

    def make_bg(kinds, path=0, ctas=0):
        def bg(k):
            if k < 0:  # top up until the compute stream is done
                k = 0
                e = torch.cuda.Event()
                e.record(comp)
                while not e.query() and k < 200:
                    for kind in kinds:
                        fn = C.gpu_gather if kind == "save" else C.gpu_scatter
                        fn(layout.native, ids, objs, bpc, 0, L, stream=(s1 if kind == "save" else s2).cuda_stream,
                           path=path, ctas=ctas)
                    k += 1
                    (s1 if kinds[0] == "save" else s2).synchronize()
                return
            for _ in range(k):
                for kind in kinds:
                    fn = C.gpu_gather if kind == "save" else C.gpu_scatter
                    fn(layout.native, ids, objs, bpc, 0, L, stream=(s1 if kind == "save" else s2).cuda_stream,
                       path=path, ctas=ctas)
        return bg

    out = {"matmul_tflops_alone": mm_tflops(lambda k: None)}
    for name, kinds in (("save", ["save"]), ("load", ["load"]), ("both", ["save", "load"])):
        out[f"matmul_tflops_with_{name}"] = mm_tflops(make_bg(kinds))
        out[f"matmul_loss_with_{name}"] = 1 - out[f"matmul_tflops_with_{name}"] / out["matmul_tflops_alone"]
    # for contrast: the zero-copy kernel (16 CTAs, busy for the whole transfer), and with all SMs
    out["matmul_tflops_with_save_direct16"] = mm_tflops(make_bg(["save"], 1, 16))
    out["matmul_loss_with_save_direct16"] = 1 - out["matmul_tflops_with_save_direct16"] / out["matmul_tflops_alone"]
    out["matmul_tflops_with_load_direct_allsm"] = mm_tflops(make_bg(["load"], 1, 2 * 132))
    out["matmul_loss_with_load_direct_allsm"] = 1 - out["matmul_tflops_with_load_direct_allsm"] / out["matmul_tflops_alone"]
    # bidirectional: save and load concurrently vs the bidirectional memcpy ceiling
    torch.cuda.synchronize()
    half = total
    t = time.perf_counter()
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    reps = 3
    torch.cuda.synchronize()
    e0.record(s1)
    s2.wait_event(e0)
    for _ in range(reps):
        C.gpu_gather(layout.native, ids, objs, bpc, 0, L, stream=s1.cuda_stream)
        C.gpu_scatter(layout.native, ids, objs, bpc, 0, L, stream=s2.cuda_stream)
    e1.record(s1)
    e2.record(s2)
    torch.cuda.synchronize()
    ms = max(e0.elapsed_time(e1), e0.elapsed_time(e2))
    out["bidir_ours"] = 2 * half * reps / (ms * 1e-3) / 1e9
    e0.record(s1)
    s2.wait_event(e0)
    # ceiling: the same bytes both ways with plain pinned memcpys (objects' arena <-> a device buffer)
    tmp = torch.empty(half, dtype=torch.uint8, device="cuda")
    for _ in range(reps):
        C.cuda_memcpy_async(arena_ptr, dptr, half, s1.cuda_stream)
        C.cuda_memcpy_async(tmp.data_ptr(), arena_ptr + 0, half, s2.cuda_stream)
    e1.record(s1)
    e2.record(s2)
    torch.cuda.synchronize()
    ms = max(e0.elapsed_time(e1), e0.elapsed_time(e2))
    out["bidir_ceiling"] = 2 * half * reps / (ms * 1e-3) / 1e9
    out["bidir_ratio"] = out["bidir_ours"] / out["bidir_ceiling"]
    del a, b, c, tmp
    _ = t
    return out


def _layerwise(torch, C, gpu_movers, layout, ids, objs, bpc, L, total) -> dict:
    """32-layer synthetic forward, one matmul per layer ~ the per-layer transfer time."""
    per_layer = total / L
    load_ms = per_layer / 50e9 * 1e3  # target: ~ the per-layer transfer at ~50 GB/s
    comp = torch.cuda.Stream()
    # calibrate a square matmul size
    n = 2048
    while True:
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        with torch.cuda.stream(comp):
            for _ in range(3):
                a @ a
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(comp)
            for _ in range(10):
                a @ a
            e1.record(comp)
        e1.synchronize()
        ms = e0.elapsed_time(e1) / 10
        if ms >= load_ms or n >= 16384:
            break
        n = int(n * max(1.05, min(1.5, (load_ms / ms) ** (1 / 3))))
        n = (n + 127) // 128 * 128
    ws = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def forward(handle):
        with torch.cuda.stream(comp):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(comp)
            if handle is not None:
                handle.start(after_stream=comp)
            y = x
            for layer in range(L):
                if handle is not None:
                    handle.wait_layer(layer, comp)
                y = torch.matmul(y, ws[layer % 2])
                y = y * 0.01
            e1.record(comp)
        e1.synchronize()
        return e0.elapsed_time(e1)

    for _ in range(3):
        forward(None)
    # interleaved so that clock drift hits all three alike; medians of 9
    base_t, times, times2 = [], [], []
    variants = {"default": {}, "ctas32": dict(ctas=32), "ctas132": dict(ctas=132),
                "pieces4MiB": dict(piece_bytes=4 << 20), "pieces2MiB_ctas132": dict(piece_bytes=2 << 20, ctas=132)}
    vt = {k: [] for k in variants}
    for _ in range(9):
        base_t.append(forward(None))
        h = gpu_movers.LayerwiseLoad(layout, ids, objs, bpc)
        times.append(forward(h))
        h.wait(timeout_s=30)
        h.close()
        # the first layer's load already in flight before the step starts (a scheduler that
        # starts loads one step ahead); overhead from then on
        h = gpu_movers.LayerwiseLoad(layout, ids, objs, bpc)
        h.start(after_stream=comp)
        h.wait_layer(0, comp)
        times2.append(forward(_Started(h)))
        h.wait(timeout_s=30)
        h.close()
        for k, kw in variants.items():
            h = gpu_movers.LayerwiseLoad(layout, ids, objs, bpc, **kw)
            vt[k].append(forward(h))
            h.wait(timeout_s=30)
            h.close()
    base = statistics.median(base_t)
    with_loads = statistics.median(times)
    with_prefetch = statistics.median(times2)
    sweep = {k: (statistics.median(v) - base) / base for k, v in vt.items()}
    return {"layerwise_matmul_n": n, "layerwise_matmul_ms": ms, "layerwise_per_layer_load_ms_at_50GBs": load_ms,
            "layerwise_compute_ms": base, "layerwise_with_loads_ms": with_loads,
            "layerwise_overhead": (with_loads - base) / base,
            "layerwise_with_loads_layer0_prefetched_ms": with_prefetch,
            "layerwise_overhead_layer0_prefetched": (with_prefetch - base) / base,
            "layerwise_overhead_sweep": sweep}


class _Started:
    """A started handle whose start() is a no-op (the prefetch variant)."""

    def __init__(self, h):
        self.h = h

    def start(self, after_stream=None):
        return self.h

    def wait_layer(self, layer, stream):
        self.h.wait_layer(layer, stream)


def _table(r) -> str:
    g = r["gpu"]
    lines = [f"# GPU movers on {g['name']} ({g['sm_count']} SMs), CUDA runtime {r['cuda_runtime']}, torch {r['torch']}",
             "", "GB/s (ratio to the pinned one-shot memcpy ceiling of the same bytes, measured in the same run)", "",
             "| shape | tokens | MiB | dir | ceiling | ours (path) | ratio | naive memcpy/block | batched DMA/block | torch index_select+copy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        for d, ceil in (("save", "ceiling_d2h"), ("load", "ceiling_h2d")):
            lines.append(
                f"| {c['shape']} | {c['tokens']} | {c['bytes'] / 2**20:.0f} | {d} | {c[ceil]:.1f} | "
                f"{c['ours_' + d]:.1f} ({c['auto_path_' + d]}) | {c['ratio_' + d]:.3f} | "
                f"{c['naive_' + d]:.1f} ({c['ratio_naive_' + d]:.2f}) | {c['batched_dma_' + d]:.1f} | "
                f"{c['torch_' + d]:.1f} ({c['ratio_torch_' + d]:.2f}) |")
    for c in r["cases"]:
        if "matmul_tflops_alone" in c:
            lines += ["", f"SM interference ({c['shape']}, {c['tokens']} tokens): bf16 8192^3 matmul "
                      f"{c['matmul_tflops_alone']:.0f} TFLOP/s alone; with save {c['matmul_tflops_with_save']:.0f} "
                      f"({100 * c['matmul_loss_with_save']:.1f} % loss), with load {c['matmul_tflops_with_load']:.0f} "
                      f"({100 * c['matmul_loss_with_load']:.1f} %), with both {c['matmul_tflops_with_both']:.0f} "
                      f"({100 * c['matmul_loss_with_both']:.1f} %); for contrast, zero-copy save kernel with 16 CTAs "
                      f"{c['matmul_tflops_with_save_direct16']:.0f} ({100 * c['matmul_loss_with_save_direct16']:.1f} %), "
                      f"zero-copy load with all SMs "
                      f"{c['matmul_tflops_with_load_direct_allsm']:.0f} ({100 * c['matmul_loss_with_load_direct_allsm']:.1f} %)",
                      "", f"Bidirectional: ours {c['bidir_ours']:.1f} GB/s vs memcpy both ways {c['bidir_ceiling']:.1f} GB/s "
                      f"({c['bidir_ratio']:.3f})",
                      "", f"Layer-wise ({layer_count(c)} layers, matmul n={c['layerwise_matmul_n']}): compute only "
                      f"{c['layerwise_compute_ms']:.2f} ms, with layer-wise loads {c['layerwise_with_loads_ms']:.2f} ms "
                      f"(overhead {100 * c['layerwise_overhead']:.2f} %), layer 0 prefetched "
                      f"{c['layerwise_with_loads_layer0_prefetched_ms']:.2f} ms "
                      f"({100 * c['layerwise_overhead_layer0_prefetched']:.2f} %); overhead by variant: " + ", ".join(
                          f"{k} {100 * v:.2f} %" for k, v in c.get("layerwise_overhead_sweep", {}).items())]
    sweep = [c for c in r["cases"] if len(c["ours"]) > 2]
    if sweep:
        lines += ["", "Sweep (GB/s): " + " ; ".join(
            f"{c['shape']}/{c['tokens']}: " + ", ".join(f"{k} {v:.1f}" for k, v in c["ours"].items()) for c in sweep)]
    return "\n".join(lines) + "\n"


def layer_count(c) -> int:
    return SHAPES[c["shape"]][0]


def _plot(r, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = r["cases"]
    labels = [f"{c['shape']}\n{c['tokens']}" for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, d, ceil in ((axes[0], "save", "ceiling_d2h"), (axes[1], "load", "ceiling_h2d")):
        xs = np.arange(len(cases))
        w = 0.2
        for i, (key, name) in enumerate(((ceil, "ceiling (1 memcpy)"), (f"ours_{d}", "ours"),
                                         (f"torch_{d}", "torch index_select+copy"),
                                         (f"naive_{d}", "memcpy per block"))):
            ax.bar(xs + (i - 1.5) * w, [c[key] for c in cases], w, label=name)
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_title(f"{d} ({'GPU->pinned' if d == 'save' else 'pinned->GPU'})")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"kvstore GPU movers on {r['gpu']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    run(ap.parse_args())
