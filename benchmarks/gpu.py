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
import math
import os
import platform
import random
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from .common import gpu_label

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
    p.add_argument("--part", default="all", choices=["all", "interference", "layerwise"],
                   help="which extras to run on the first case (unless --quick)")
    p.add_argument("--block-ids", default="random,runs",
                   help="comma list: random = a random permutation (the worst case), runs = each chunk's 16 "
                        "blocks consecutive at a random place (a fresh engine hands out runs like these)")
    p.add_argument("--rounds", type=int, default=7,
                   help="interleaved rounds of the matmul-interference variants (layer-wise: 2*rounds+1)")
    p.add_argument("--variants", default="",
                   help="comma list: run only these interference / layer-wise variants (with their baselines), "
                        "so that more rounds fit in the same time")


def make_batch(torch, gen, shape: str, tokens: int, pattern: str = "random"):
    """The benchmarks' batch: a cache of `shape` with random bf16 contents and 1.25x the request's
    blocks, and the request's block ids -> (caches, layout, ids). pattern "random": a random
    permutation; "runs": chunk-sized runs at random chunk-aligned places. Either way the last id
    is the cache's last block."""
    from kvstore.layout import KVLayout

    L, H, D, mla = SHAPES[shape]
    n_blocks_req = tokens // BLOCK
    num_blocks = n_blocks_req + n_blocks_req // 4 + 1
    bpc, n_chunks = CHUNK // BLOCK, tokens // CHUNK
    shape_of_layer = (num_blocks, BLOCK, D) if mla else (2, num_blocks, BLOCK, H, D)
    caches = [torch.randint(-2**15, 2**15 - 1, shape_of_layer, dtype=torch.int16, device="cuda", generator=gen)
              .view(torch.bfloat16) for _ in range(L)]
    layout = KVLayout.from_mla(caches) if mla else KVLayout.from_flash_attn(caches)
    rng = np.random.default_rng(tokens)
    if pattern == "random":
        ids = rng.permutation(num_blocks)[:n_blocks_req].astype(np.int64)
        ids[-1] = num_blocks - 1
    else:
        slots = rng.permutation(num_blocks // bpc)[:n_chunks]
        ids = (slots[:, None] * bpc + np.arange(bpc)[None, :]).reshape(-1).astype(np.int64)
        ids[-bpc:] = np.arange(num_blocks - bpc, num_blocks)
    return caches, layout, ids


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


class Timer:
    def __init__(self, torch, stream):
        self.torch, self.stream = torch, stream

    def __call__(self, fn, reps: int, warmup: int = 1, before=None) -> float:
        """Median ms of fn() enqueued on self.stream, timed with events; `before()`, if given, is
        enqueued ahead of each timed call, outside the timing."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            if before is not None:
                before()
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

    if C.cuda_device_count() == 0 or not torch.cuda.is_available():
        raise SystemExit("kvstore bench gpu needs a CUDA device")
    dev = args.device
    torch.cuda.set_device(dev)
    info = C.cuda_device_info(dev)
    gpu_name = gpu_label(info["name"])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    token_list = [int(t) for t in args.tokens.split(",") if t]
    stream = torch.cuda.Stream()
    sh = stream.cuda_stream
    timer = Timer(torch, stream)
    gen = torch.Generator(device="cuda").manual_seed(0)

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

    patterns = [p for p in args.block_ids.split(",") if p]
    if not set(patterns) <= {"random", "runs"}:
        raise SystemExit(f"--block-ids: unknown pattern in {args.block_ids!r} (random, runs)")
    cases = [(s, t, p) for p in patterns for s in shapes for t in token_list]
    bar = tqdm(total=len(cases), desc="gpu bench", unit="case")
    for shape, tokens, pattern in cases:
        L, H, D, mla = SHAPES[shape]
        planes = 1 if mla else 2
        caches, layout, ids = make_batch(torch, gen, shape, tokens, pattern)
        n_blocks_req, bpc, n_chunks = len(ids), CHUNK // BLOCK, tokens // CHUNK
        chunk_bytes = layout.chunk_nbytes(CHUNK)
        total = chunk_bytes * n_chunks
        objs = np.array([arena_ptr + i * chunk_bytes for i in range(n_chunks)], np.uint64)
        plan = C.GpuPlan(layout.native, ids, objs, bpc, sh)
        case = {"shape": shape, "tokens": tokens, "block_ids": pattern, "bytes": total, "chunk_bytes": chunk_bytes,
                "segment_bytes": BLOCK * H * D * 2, "dma_segment_bytes": plan.dma_segment_bytes(),
                "layout": "mla [B,N,D]" if mla else "flash_attn [2,B,N,H,D]"}
        plan.close()
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
        configs = [("auto", 0, 0), ("staged", 2, 0), ("dma", 4, 0)]
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

        case["ours_staged_save"], case["ours_staged_load"] = variants["save:staged"], variants["load:staged"]
        case["ours_dma_save"], case["ours_dma_load"] = variants["save:dma"], variants["load:dma"]
        if not args.quick and shape == shapes[0] and tokens == token_list[0]:
            if args.part in ("all", "interference"):
                case.update(_interference(torch, C, layout, ids, objs, bpc, L, total, arena_ptr, dptr,
                                          rounds=args.rounds, only=_names(args.variants),
                                          strict=args.part == "interference"))
            if args.part in ("all", "layerwise"):
                case.update(_layerwise(torch, C, gpu_movers, layout, ids, objs, bpc, L, total, arena_ptr, dptr,
                                       ceiling_gbs=case["ceiling_h2d"], rounds=2 * args.rounds + 1,
                                       only=_names(args.variants), strict=args.part == "layerwise"))
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


def _quantile(values, q: float) -> float:
    """Linear-interpolated q-quantile. Timings under a GEMM loop are skewed by clock dips (H100 at
    its power limit): the fast quartile is steadier than the median (run M: a repeat of the same
    variant differed by 0.1-0.2 % at the quartile, 0.7-1.3 % at the median)."""
    v = sorted(values)
    i = (len(v) - 1) * q
    lo = int(i)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (i - lo)


def _names(csv: str) -> set[str] | None:
    return {n for n in csv.split(",") if n} or None


def _selected(variants: dict, only: set[str] | None, baselines: set[str], strict: bool) -> dict:
    """variants restricted to `only` plus the baselines they are compared with (all when None).
    strict: a name this part does not know is an error (else it belongs to the other part)."""
    if only is None:
        return variants
    unknown = only - set(variants)
    if strict and unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(variants)}")
    return {k: v for k, v in variants.items() if k in only or k in baselines}


def _paired(values: list[float], base: list[float]) -> dict:
    """Per-round relative differences (value / the same round's baseline - 1): rounds are
    minutes apart at most, so pairing removes the slow clock drift that the two medians keep.
    Median with a distribution-free 95 % interval (order statistics of Binomial(n, 1/2))."""
    d = sorted(v / b - 1 for v, b in zip(values, base))
    n = len(d)
    k = 0  # the largest k with P(Bin(n, 1/2) < k) <= 2.5 %: [d_(k), d_(n+1-k)] (1-based) covers >= 95 %
    while _binom_cdf(k + 1, n) <= 0.025:
        k += 1
    ci = (d[k - 1], d[n - k]) if k else (d[0], d[-1])  # k = 0 (n < 6): the range, under 95 %
    return {"median": statistics.median(d), "ci95": ci, "n": n}


def _binom_cdf(k: int, n: int) -> float:
    """P(X < k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k)) / 2 ** n


def _round_order(names: list[str], r: int) -> list[str]:
    """Round r's order of the variants: shuffled (seeded), so that no variant always follows the
    same one. A rotation did that, and in run M two variants running the same code differed by 3 %
    depending on which one came before them."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def _interference(torch, C, layout, ids, objs, bpc, L, total, arena_ptr, dptr, rounds: int = 7,
                  only: set[str] | None = None, strict: bool = True) -> dict:
    """bf16 8192^3 matmul TFLOP/s alone vs with saves / loads running on other streams.

    Every variant is measured once per round, the rounds interleave all variants (order shuffled
    each round) so that clock and temperature drift hit them alike; loss = 1 - median(with) /
    median(alone). Transfers start with the matmul loop, enqueued by another thread, enough of them
    to outlast it (checked with events: `covered`), so the matmuls run entirely under transfer
    traffic."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    dev = torch.cuda.current_device()
    comp_lo = torch.cuda.Stream()
    comp_hi = torch.cuda.Stream(priority=-1)  # high priority compute stream
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    iters = 40

    # transfer time alone per (kind, path): sizes the number enqueued per measurement
    xfer_ms = {}

    def stream_of(kind):
        return s1 if kind.startswith("save") else s2

    def enqueue(kind, path, ctas, threads, piece):
        """One transfer of the batch on its kind's stream. *_one_copy: the ceiling's contiguous pinned
        memcpy of the same bytes, the least traffic any save / load can make."""
        st = stream_of(kind)
        if kind == "load_one_copy":
            C.cuda_memcpy_async(dptr, arena_ptr, total, st.cuda_stream)
        elif kind == "save_one_copy":
            C.cuda_memcpy_async(arena_ptr, dptr, total, st.cuda_stream)
        else:
            assert kind in ("save", "load"), kind
            fn = C.gpu_gather if kind == "save" else C.gpu_scatter
            fn(layout.native, ids, objs, bpc, 0, L, stream=st.cuda_stream, path=path, ctas=ctas, threads=threads,
               piece_bytes=piece)

    def transfer_ms(kind, path, ctas, threads, piece):
        key = (kind, path, ctas, threads, piece)
        if key not in xfer_ms:
            st = stream_of(kind)
            go = lambda: enqueue(kind, path, ctas, threads, piece)
            go()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(st)
            for _ in range(3):
                go()
            e1.record(st)
            e1.synchronize()
            xfer_ms[key] = e0.elapsed_time(e1) / 3
        return xfer_ms[key]

    def measure(kinds, path=0, ctas=0, threads=0, piece=0, comp=comp_lo):
        with torch.cuda.stream(comp):
            for _ in range(2):
                torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        ends, marks, queue = [], {}, []
        for kind in kinds:
            st = stream_of(kind)
            k = int(1.5 * iters * 1.45 / transfer_ms(kind, path, ctas, threads, piece)) + 2
            marks[kind] = []
            queue.append((kind, st, k))

        # Transfers are enqueued by another thread while this one enqueues the matmuls, as an engine's
        # loads and saves are (the GIL is released inside each call): a path whose host-side
        # enqueueing is slow then shows it here instead of running ahead of the matmuls.
        failed = []

        def enqueue_transfers():
            try:
                enqueue_all()
            except BaseException as e:  # re-raised below, on the measuring thread
                failed.append(e)

        def enqueue_all():
            for i in range(max(q[2] for q in queue)):
                for kind, st, k in queue:
                    if i < k:
                        enqueue(kind, path, ctas, threads, piece)
                        m = torch.cuda.Event(enable_timing=True)
                        m.record(st)
                        marks[kind].append(m)
            for kind, st, k in queue:
                e = torch.cuda.Event(enable_timing=True)
                e.record(st)
                ends.append(e)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(comp)
        for kind, st, k in queue:
            st.wait_event(e0)
        mover = threading.Thread(target=enqueue_transfers) if queue else None
        if mover:
            mover.start()
        with torch.cuda.stream(comp):
            for _ in range(iters):
                torch.matmul(a, b, out=c)
        e1.record(comp)
        if mover:
            mover.join()
        if failed:
            raise failed[0]
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1)
        covered = all(e0.elapsed_time(e) >= ms for e in ends)
        # transfer GB/s while the matmuls ran: completions inside the window
        gbs = {}
        for kind, ms_list in marks.items():
            t = [e0.elapsed_time(m) for m in ms_list]
            inside = [x for x in t if 0 < x <= ms]
            if len(inside) >= 2:
                gbs[kind] = (len(inside) - 1) * total / ((inside[-1] - inside[0]) * 1e-3) / 1e9
            gbs[kind + "_completions_in_window"] = float(len(inside))
            gbs[kind + "_first_done_ms"] = t[0]
        return 2 * n ** 3 * iters / (ms * 1e-3) / 1e12, covered, gbs

    S, DMA = 2, 4
    variants = {
        "alone": ([], {}),
        "alone_again": ([], {}),  # the same again: its 'loss' is the noise
        "save": (["save"], {}),
        "load": (["load"], {}),
        "both": (["save", "load"], {}),
        "save_staged": (["save"], dict(path=S)),
        "load_staged": (["load"], dict(path=S)),
        "save_dma": (["save"], dict(path=DMA)),
        "load_dma": (["load"], dict(path=DMA)),
        "save_one_copy": (["save_one_copy"], {}),  # the floor: no mover's traffic can cost less
        "load_one_copy": (["load_one_copy"], {}),
        "both_dma": (["save", "load"], dict(path=DMA)),
        "alone_comp_hi": ([], dict(comp=comp_hi)),
        "save_comp_hi": (["save"], dict(comp=comp_hi)),
    }
    variants = _selected(variants, only, {"alone", "alone_again"} | (
        {"alone_comp_hi"} if only and any(k.endswith("comp_hi") for k in only) else set()), strict)
    names = list(variants)
    got = {k: [] for k in names}
    xfer_during = {k: {} for k in names}
    uncovered = set()
    for r in range(rounds):
        order = _round_order(names, r)
        for k in order:
            kinds, kw = variants[k]
            tf, ok, gbs = measure(kinds, **kw)
            got[k].append(tf)
            for kind, v in gbs.items():
                xfer_during[k].setdefault(kind, []).append(v)
            if not ok:
                uncovered.add(k)
    med = {k: statistics.median(v) for k, v in got.items()}
    out = {"matmul_rounds": rounds, "matmul_iters": iters, "matmul_tflops_all": got,
           "matmul_uncovered": sorted(uncovered),
           "matmul_transfer_gbs_during": {k: {kind: statistics.median(v) for kind, v in d.items()}
                                          for k, d in xfer_during.items() if d},
           "matmul_transfer_ms_alone": {
               f"{k[0]}:path{k[1]}:ctas{k[2]}:thr{k[3]}:piece{k[4]}": v for k, v in xfer_ms.items()}}
    out["matmul_tflops_alone"] = med["alone"]
    for k in names:
        if k == "alone":
            continue
        base = "alone_comp_hi" if k.endswith("comp_hi") else "alone"
        out[f"matmul_tflops_with_{k}"] = med[k]
        out[f"matmul_loss_with_{k}"] = 1 - med[k] / med[base]
        out[f"matmul_loss_fast_quartile_{k}"] = 1 - _quantile(got[k], 0.75) / _quantile(got[base], 0.75)
        # spread: per-round losses against the same round's alone
        per = [1 - w / al for w, al in zip(got[k], got[base])]
        out[f"matmul_loss_range_{k}"] = (min(per), max(per))
        paired = _paired(got[k], got[base])  # with/alone - 1
        out[f"matmul_loss_paired_{k}"] = {"median": -paired["median"], "ci95": (-paired["ci95"][1], -paired["ci95"][0]),
                                          "n": paired["n"]}
    # for contrast (once each): the zero-copy kernel, busy for the whole transfer
    out["matmul_tflops_with_save_direct16"] = measure(["save"], path=1, ctas=16)[0]
    out["matmul_transfer_gbs_alone"] = {k: total / (v * 1e-3) / 1e9 for k, v in out["matmul_transfer_ms_alone"].items()}
    out["matmul_loss_with_save_direct16"] = 1 - out["matmul_tflops_with_save_direct16"] / med["alone"]
    out["matmul_tflops_with_load_direct_allsm"] = measure(["load"], path=1, ctas=2 * 132)[0]
    out["matmul_loss_with_load_direct_allsm"] = 1 - out["matmul_tflops_with_load_direct_allsm"] / med["alone"]

    # bidirectional: save and load concurrently vs the bidirectional memcpy ceiling
    reps = 3
    tmp = torch.empty(total, dtype=torch.uint8, device="cuda")
    for path, key in ((0, "bidir_ours"),):
        torch.cuda.synchronize()
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record(s1)
        s2.wait_event(e0)
        for _ in range(reps):
            C.gpu_gather(layout.native, ids, objs, bpc, 0, L, stream=s1.cuda_stream, path=path)
            C.gpu_scatter(layout.native, ids, objs, bpc, 0, L, stream=s2.cuda_stream, path=path)
        e1.record(s1)
        e2.record(s2)
        torch.cuda.synchronize()
        ms = max(e0.elapsed_time(e1), e0.elapsed_time(e2))
        out[key] = 2 * total * reps / (ms * 1e-3) / 1e9
    torch.cuda.synchronize()
    e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    e0.record(s1)
    s2.wait_event(e0)
    for _ in range(reps):
        C.cuda_memcpy_async(arena_ptr, dptr, total, s1.cuda_stream)
        C.cuda_memcpy_async(tmp.data_ptr(), arena_ptr + 0, total, s2.cuda_stream)
    e1.record(s1)
    e2.record(s2)
    torch.cuda.synchronize()
    ms = max(e0.elapsed_time(e1), e0.elapsed_time(e2))
    out["bidir_ceiling"] = 2 * total * reps / (ms * 1e-3) / 1e9
    out["bidir_ratio"] = out["bidir_ours"] / out["bidir_ceiling"]
    del a, b, c, tmp
    return out


class _OneCopyPerLayer:
    """The layer-wise ideal, timed like a LayerwiseLoad: layer l's bytes as one contiguous pinned
    host -> device memcpy (the ceiling's copy cut in L), an event after each. No mover loads a
    layer sooner or with less traffic, so its overhead is the floor of the measurement."""

    def __init__(self, torch, C, stream, dst: int, src: int, total: int, layers: int):
        # its own stream, made once by the caller: torch.cuda.Stream() hands out pooled streams in
        # turn, so one made per handle was the compute stream itself every 32nd time
        self._C, self._stream, self._dst, self._src, self._total = C, stream, dst, src, total
        self._events = [torch.cuda.Event() for _ in range(layers)]

    def start(self, after_stream, lookahead=None, background=False) -> None:
        self._stream.wait_stream(after_stream)
        cuts = [self._total * i // len(self._events) for i in range(len(self._events) + 1)]
        for event, a, b in zip(self._events, cuts, cuts[1:]):
            self._C.cuda_memcpy_async(self._dst + a, self._src + a, b - a, self._stream.cuda_stream)
            event.record(self._stream)

    def wait_layer(self, layer: int, stream) -> None:
        stream.wait_event(self._events[layer])

    def wait(self, timeout_s: float) -> None:
        self._events[-1].synchronize()

    def close(self) -> None:
        pass


def _layerwise(torch, C, gpu_movers, layout, ids, objs, bpc, L, total, arena_ptr: int, dptr: int,
               ceiling_gbs: float = 50.0, rounds: int = 15, only: set[str] | None = None, strict: bool = True) -> dict:
    """32-layer synthetic forward, one matmul per layer ~ the per-layer transfer time, with
    LayerwiseLoad vs compute only. overhead = (median with loads - median compute only) /
    median compute only, all timed with CUDA events on the compute stream, every variant once per
    round and the rounds interleaved (order shuffled). Ways to start the step:

    - inline: the loads are enqueued by the host inside the timed region (start() right after the
      first event), as in the first runs: includes the host's enqueue cost and layer 0's load.
    - ahead: the compute stream first sleeps on the GPU (torch.cuda._sleep) long enough for the
      host to enqueue all loads; the loads start at the first event (after_stream), so layer 0's
      load is exposed but the host's enqueue cost is not (an engine enqueues while the GPU runs
      the previous step).
    - ahead_long: as ahead with a 4x longer sleep, so that no path's enqueueing (DMA of scattered
      blocks: ~8 ms for 512 MiB) shows: what the GPU side alone costs, layer 0's load included.
    - layer0_prefetched: layer 0 has arrived before the first event: the step's first-layer load
      excluded (reported separately, not the goal's definition).
    - all_prefetched: every layer has arrived before the first event: what the 32 cross-stream
      event waits alone cost (the floor of the mechanism).
    """
    per_layer = total / L
    load_ms = per_layer / (ceiling_gbs * 1e9) * 1e3
    dev = torch.cuda.current_device()
    comp_lo = torch.cuda.Stream()
    comp = comp_lo
    sleep_cycles = int(2e9 * 6e-3)  # ~6 ms at ~2 GHz: longer than the host needs to enqueue 32 layers

    def run_layers(x, ws, before_layer=None, elementwise=True):
        """The forward's L layers on the current stream: one matmul each (+ the elementwise op)."""
        y = x
        for layer in range(L):
            if before_layer is not None:
                before_layer(layer)
            y = torch.matmul(y, ws[layer % 2])
            if elementwise:
                y = y * 0.01

    def compute_layer_ms(x, ws, elementwise):
        """ms per layer of the compute-only forward: the GPU sleeps, then the L layers run back to back."""
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(comp):
            torch.cuda._sleep(sleep_cycles)
            e0.record(comp)
            run_layers(x, ws, elementwise=elementwise)
            e1.record(comp)
        e1.synchronize()
        return e0.elapsed_time(e1) / L

    def calibrate(target_ms, elementwise):
        """The first n of a growing sequence (multiples of 128, each step >= 5 %, so up to ~16 % more
        time than target_ms) whose layer takes >= target_ms, timed as the forward runs it: a 10 ms
        burst after the sleep runs 10-15 % faster than matmuls timed back to back (runs T/U: n sized
        on a sustained loop gave 0.27 ms layers against a 0.30 ms load). The result's
        layerwise_compute_over_load says how much slack the forward got."""
        warm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.5:  # clocks up first: on a cold GPU every matmul looked slow
            with torch.cuda.stream(comp):  # (run T: n=3072 calibrated, 0.09 ms a layer once warm)
                for _ in range(20):
                    warm @ warm
            comp.synchronize()
        del warm
        n = 2048
        while True:
            x, *ws = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            if not elementwise:  # no * 0.01 between layers: keep the chain finite (bf16 inf by layer 20)
                ws = [w * n ** -0.5 for w in ws]
            ms = min(compute_layer_ms(x, ws, elementwise) for _ in range(5))  # the fastest: dips make n too small
            if ms >= target_ms or n >= 16384:
                return n, ms
            n = int(n * max(1.05, min(1.5, (target_ms / ms) ** (1 / 3))))
            n = (n + 127) // 128 * 128

    # this run's sizing: matmul + elementwise >= the per-layer load at the measured H2D ceiling;
    # the first runs' sizing (kept for comparison): matmul alone >= the per-layer load at 50 GB/s
    n, ms = calibrate(load_ms, True)
    n_old, _ = calibrate(per_layer / 50e9 * 1e3, False)
    mats = {"": (torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
                 [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]),
            "_nold": (torch.randn(n_old, n_old, device="cuda", dtype=torch.bfloat16),
                      [torch.randn(n_old, n_old, device="cuda", dtype=torch.bfloat16) for _ in range(2)])}
    enqueue_s = {}

    def forward(mode, make, comp, size=""):
        """make() -> handle or None, or (make, lookahead), or (make, dict of start() options).
        Returns event ms of the 32 layers."""
        x, ws = mats[size]
        opts = {}
        if isinstance(make, tuple):
            make, opts = make
            opts = dict(opts) if isinstance(opts, dict) else {"lookahead": opts}
        h = make() if make is not None else None
        look = opts.get("lookahead")
        bg = opts.get("background", False)
        waits = opts.get("wait_layers", True)  # False: the loads run beside the compute, unwaited
        with torch.cuda.stream(comp):
            if h is not None and mode == "all_prefetched":  # floor: only the 32 event waits remain
                h.start(after_stream=comp)
                h.wait(timeout_s=30)
            if mode != "inline":
                torch.cuda._sleep(sleep_cycles * (4 if mode == "ahead_long" else 1))
            if h is not None and mode == "layer0_prefetched":
                h.start(after_stream=comp, background=bg)
                h.wait_layer(0, comp)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(comp)
            if h is not None and mode in ("inline", "ahead", "ahead_long"):
                t = time.perf_counter()
                h.start(after_stream=comp, lookahead=look, background=bg)
                enqueue_s.setdefault(mode, []).append(time.perf_counter() - t)
            run_layers(x, ws, (lambda layer: h.wait_layer(layer, comp)) if h is not None and waits else None)
            e1.record(comp)
        e1.synchronize()
        if h is not None:
            h.wait(timeout_s=30)
            h.close()
        return e0.elapsed_time(e1)

    def loader(**kw):
        return lambda: gpu_movers.LayerwiseLoad(layout, ids, objs, bpc, **kw)

    S, DMA = gpu_movers.PATH_STAGED, gpu_movers.PATH_DMA
    copy_stream = torch.cuda.ExternalStream(C.cuda_stream_create(dev, 0))
    one_copy = lambda: _OneCopyPerLayer(torch, C, copy_stream, dptr, arena_ptr, total, L)
    sms = C.cuda_device_info(dev)["sm_count"]
    dma = loader(path=DMA)
    staged = loader(path=S)                              # the staged path with LayerwiseLoad's other defaults
    ctas16 = loader(path=S, ctas=16)                     # staged, scatter on at most 16 SMs, high priority
    default = loader()                                   # LayerwiseLoad's defaults (all SMs, high priority)
    old = loader(path=S, ctas=8, priority=0)             # the first runs' defaults
    variants = {
        # name: (mode, loader or None, compute stream, matmul size)
        "compute": ("ahead", None, comp_lo, ""),
        "compute_again": ("ahead", None, comp_lo, ""),  # the same again: its 'overhead' is the noise
        "compute_inline": ("inline", None, comp_lo, ""),
        "inline_default": ("inline", default, comp_lo, ""),
        "inline_default_lookahead2": ("inline", (default, 2), comp_lo, ""),
        "inline_old": ("inline", old, comp_lo, ""),
        "ahead_default": ("ahead", default, comp_lo, ""),
        "ahead_old": ("ahead", old, comp_lo, ""),
        "ahead_allsm_prio0": ("ahead", loader(path=S, ctas=sms, priority=0), comp_lo, ""),
        "inline_staged": ("inline", staged, comp_lo, ""),
        "inline_ctas16": ("inline", ctas16, comp_lo, ""),
        "ahead_ctas16": ("ahead", ctas16, comp_lo, ""),
        "pre0_ctas16": ("layer0_prefetched", ctas16, comp_lo, ""),
        "inline_dma": ("inline", dma, comp_lo, ""),
        "ahead_dma": ("ahead", dma, comp_lo, ""),
        "pre0_dma": ("layer0_prefetched", dma, comp_lo, ""),
        # run M: the GPU side alone (host enqueue hidden), and DMA enqueued by a helper thread
        "along_default": ("ahead_long", default, comp_lo, ""),
        "along_ctas16": ("ahead_long", ctas16, comp_lo, ""),
        "along_dma": ("ahead_long", dma, comp_lo, ""),
        "inline_dma_bg": ("inline", (dma, {"background": True}), comp_lo, ""),
        "ahead_dma_bg": ("ahead", (dma, {"background": True}), comp_lo, ""),
        "pre0_dma_bg": ("layer0_prefetched", (dma, {"background": True}), comp_lo, ""),
        # run T: more of the same (run T measured them behind gates, since reverted)
        "inline_default_bg": ("inline", (default, {"background": True}), comp_lo, ""),
        "pre0_default_bg": ("layer0_prefetched", (default, {"background": True}), comp_lo, ""),
        "inline_ctas16_bg": ("inline", (ctas16, {"background": True}), comp_lo, ""),
        "pre0_ctas16_bg": ("layer0_prefetched", (ctas16, {"background": True}), comp_lo, ""),
        "along_dma_bg": ("ahead_long", (dma, {"background": True}), comp_lo, ""),
        # the DMA path's overhead taken apart: its loads running beside the compute with no layer
        # waited on (what their traffic alone costs the matmuls), and the 32 waits once all arrived
        "pre0_dma_unwaited": ("layer0_prefetched", (dma, {"wait_layers": False}), comp_lo, ""),
        "preall_dma": ("all_prefetched", dma, comp_lo, ""),
        # the same with the ideal mover (one contiguous memcpy per layer): the floor of any path
        "pre0_one_copy": ("layer0_prefetched", one_copy, comp_lo, ""),
        "pre0_one_copy_unwaited": ("layer0_prefetched", (one_copy, {"wait_layers": False}), comp_lo, ""),
        "pre0_default": ("layer0_prefetched", default, comp_lo, ""),
        "pre0_old": ("layer0_prefetched", old, comp_lo, ""),
        "preall_default": ("all_prefetched", default, comp_lo, ""),
        "compute_nold": ("ahead", None, comp_lo, "_nold"),
        "compute_inline_nold": ("inline", None, comp_lo, "_nold"),
        "inline_default_nold": ("inline", default, comp_lo, "_nold"),
        "inline_old_nold": ("inline", old, comp_lo, "_nold"),
        "ahead_default_nold": ("ahead", default, comp_lo, "_nold"),
        "pre0_default_nold": ("layer0_prefetched", default, comp_lo, "_nold"),
        "preall_default_nold": ("all_prefetched", default, comp_lo, "_nold"),
    }
    variants = _selected(variants, only, {"compute", "compute_again", "compute_inline", "compute_nold",
                                          "compute_inline_nold", "inline_default", "ahead_default", "pre0_default"},
                         strict)
    for k, (mode, make, cs, size) in variants.items():  # warm-up: every variant once
        forward(mode, make, cs, size)
    enqueue_s.clear()
    names = list(variants)
    got = {k: [] for k in names}
    for r in range(rounds):
        for k in _round_order(names, r):
            mode, make, cs, size = variants[k]
            got[k].append(forward(mode, make, cs, size))
    torch.cuda.synchronize()
    C.cuda_stream_destroy(copy_stream.cuda_stream)
    med = {k: statistics.median(v) for k, v in got.items()}

    def base_of(k):
        sfx = "_nold" if k.endswith("_nold") else ""
        return ("compute_inline" if k.startswith("inline") else "compute") + sfx
    measured = [k for k in names if not k.startswith("compute") or k == "compute_again"]
    overhead = {k: (med[k] - med[base_of(k)]) / med[base_of(k)] for k in measured}
    fast = {k: (_quantile(got[k], 0.25) - _quantile(got[base_of(k)], 0.25)) / _quantile(got[base_of(k)], 0.25)
            for k in overhead}
    spread = {k: statistics.pstdev(v) / statistics.median(v) for k, v in got.items()}
    paired = {k: _paired(got[k], got[base_of(k)]) for k in overhead}
    per_layer_ms = med["compute"] / L
    return {"layerwise_matmul_n": n, "layerwise_matmul_ms": ms, "layerwise_matmul_n_old_sizing": n_old,
            "layerwise_compute_ms_old_sizing": med["compute_nold"], "layerwise_per_layer_load_ms_at_ceiling": load_ms,
            "layerwise_ceiling_gbs": ceiling_gbs, "layerwise_rounds": rounds,
            "layerwise_compute_ms": med["compute"], "layerwise_compute_layer_ms": per_layer_ms,
            "layerwise_compute_over_load": per_layer_ms / load_ms,
            "layerwise_first_layer_floor": load_ms / med["compute"],
            "layerwise_median_ms": med, "layerwise_rel_stdev": spread, "layerwise_overhead_by_variant": overhead,
            "layerwise_overhead_fast_quartile_by_variant": fast,
            "layerwise_overhead_paired_by_variant": paired,
            "layerwise_enqueue_ms": {k: 1e3 * statistics.median(v) for k, v in enqueue_s.items()},
            "layerwise_sleep_ms_nominal": sleep_cycles / 2e9 * 1e3,
            "layerwise_all_ms": got,
            # the headline figures (the goal's definition: the step's first-layer load included)
            "layerwise_with_loads_ms": med["inline_default"],
            "layerwise_overhead": overhead["inline_default"],
            "layerwise_overhead_ahead": overhead["ahead_default"],
            "layerwise_with_loads_layer0_prefetched_ms": med["pre0_default"],
            "layerwise_overhead_layer0_prefetched": overhead["pre0_default"]}


def _table(r) -> str:
    g = r["gpu"]
    lines = [f"# GPU movers on {g['name']} ({g['sm_count']} SMs), CUDA runtime {r['cuda_runtime']}, torch {r['torch']}",
             "", "GB/s (ratio to the pinned one-shot memcpy ceiling of the same bytes, measured in the same run). "
             "block ids: random = a random permutation; runs = each chunk's blocks consecutive. "
             "DMA segment = mean bytes per DMA-path segment (units merged across consecutive ids).", "",
             "| shape | tokens | block ids | DMA segment KiB | MiB | dir | ceiling | ours auto (path) | ratio | staged | dma (no SMs) | dma ratio "
             "| naive memcpy/block | batched DMA/block | torch index_select+copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        for d, ceil in (("save", "ceiling_d2h"), ("load", "ceiling_h2d")):
            lines.append(
                f"| {c['shape']} | {c['tokens']} | {c.get('block_ids', 'random')} | "
                f"{c.get('dma_segment_bytes', 0) / 1024:.0f} | {c['bytes'] / 2**20:.0f} | {d} | {c[ceil]:.1f} | "
                f"{c['ours_' + d]:.1f} ({c['auto_path_' + d]}) | {c['ratio_' + d]:.3f} | "
                f"{c.get('ours_staged_' + d, 0):.1f} | {c.get('ours_dma_' + d, 0):.1f} | "
                f"{c.get('ours_dma_' + d, 0) / c[ceil]:.3f} | "
                f"{c['naive_' + d]:.1f} ({c['ratio_naive_' + d]:.2f}) | {c['batched_dma_' + d]:.1f} | "
                f"{c['torch_' + d]:.1f} ({c['ratio_torch_' + d]:.2f}) |")
    for c in r["cases"]:
        if "matmul_tflops_alone" in c:
            al = c["matmul_tflops_alone"]
            lines += ["", f"SM interference ({c['shape']}, {c['tokens']} tokens, {c.get('block_ids', 'random')} block ids): bf16 8192^3 matmul, medians of "
                      f"{c['matmul_rounds']} interleaved rounds of {c['matmul_iters']} matmuls; alone {al:.0f} TFLOP/s"
                      + (f"; NOT covered by transfers for the whole loop: {c['matmul_uncovered']}"
                         if c.get("matmul_uncovered") else ""), "",
                      "| with | TFLOP/s | loss (median) | loss (fast quartile) | per-round loss range | "
                      "paired loss: median [95 % interval] | transfer GB/s during the matmuls |",
                      "|---|---|---|---|---|---|---|"]
            for k in c:
                if k.startswith("matmul_loss_with_"):
                    v = k[len("matmul_loss_with_"):]
                    rng = c.get(f"matmul_loss_range_{v}")
                    fq = c.get(f"matmul_loss_fast_quartile_{v}")
                    lines.append(f"| {v} | {c['matmul_tflops_with_' + v]:.0f} | {100 * c[k]:.1f} % | "
                                 + (f"{100 * fq:.1f} %" if fq is not None else "-") + " | "
                                 + (f"{100 * rng[0]:.1f} .. {100 * rng[1]:.1f} %" if rng else "once") + " | "
                                 + _paired_cell(c.get(f"matmul_loss_paired_{v}")) + " | "
                                 + ", ".join(f"{kind} {g:.1f}" for kind, g in
                                             c.get("matmul_transfer_gbs_during", {}).get(v, {}).items()) + " |")
            if "matmul_transfer_gbs_alone" in c:
                lines += ["", "transfer GB/s alone (3 back to back): " + ", ".join(
                    f"{k} {v:.1f}" for k, v in c["matmul_transfer_gbs_alone"].items())]
        if "bidir_ours" in c:
            lines += ["", f"Bidirectional: ours {c['bidir_ours']:.1f} GB/s vs memcpy both ways "
                      f"{c['bidir_ceiling']:.1f} GB/s ({c['bidir_ratio']:.3f})"]
        if "layerwise_overhead_by_variant" in c:
            lines += ["", f"Layer-wise ({c.get('block_ids', 'random')} block ids, {layer_count(c)} layers, matmul n={c['layerwise_matmul_n']}, "
                      f"{c['layerwise_compute_layer_ms']:.3f} ms per layer (the first runs' sizing, suffix _nold: n="
                      f"{c.get('layerwise_matmul_n_old_sizing')}, {c.get('layerwise_compute_ms_old_sizing', 0) / 32:.3f} ms) vs "
                      f"{c['layerwise_per_layer_load_ms_at_ceiling']:.3f} ms per layer's load at the H2D ceiling"
                      + (f" ({c['layerwise_compute_over_load']:.2f}x)" if "layerwise_compute_over_load" in c else "")
                      + "; "
                      f"first-layer floor {100 * c['layerwise_first_layer_floor']:.2f} %), medians of "
                      f"{c['layerwise_rounds']} interleaved rounds; compute only {c['layerwise_compute_ms']:.2f} ms; "
                      f"host enqueue of 32 layers (ms): " + ", ".join(
                          f"{k} {v:.2f}" for k, v in c["layerwise_enqueue_ms"].items()), "",
                      "| variant | median ms | overhead (median) | overhead (fast quartile) | "
                      "paired overhead: median [95 % interval] | rel. stdev |",
                      "|---|---|---|---|---|---|"]
            for k, v in c["layerwise_median_ms"].items():
                o = c["layerwise_overhead_by_variant"].get(k)
                fq = c.get("layerwise_overhead_fast_quartile_by_variant", {}).get(k)
                lines.append(f"| {k} | {v:.3f} | " + (f"{100 * o:.2f} %" if o is not None else "-") + " | "
                             + (f"{100 * fq:.2f} %" if fq is not None else "-") + " | "
                             + _paired_cell(c.get("layerwise_overhead_paired_by_variant", {}).get(k)) +
                             f" | {100 * c['layerwise_rel_stdev'][k]:.2f} % |")
    sweep = [c for c in r["cases"] if len(c["ours"]) > 8]
    if sweep:
        lines += ["", "Sweep (GB/s): " + " ; ".join(
            f"{c['shape']}/{c['tokens']}/{c.get('block_ids', 'random')}: " + ", ".join(f"{k} {v:.1f}" for k, v in c["ours"].items()) for c in sweep)]
    return "\n".join(lines) + "\n"


def _paired_cell(p) -> str:
    if not p:
        return "-"
    return f"{100 * p['median']:.2f} % [{100 * p['ci95'][0]:.2f}, {100 * p['ci95'][1]:.2f}]"


def layer_count(c) -> int:
    return SHAPES[c["shape"]][0]


def _plot(r, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = r["cases"]
    labels = [f"{c['shape']}\n{c['tokens']} {c.get('block_ids', 'random')}" for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for ax, d, ceil in ((axes[0], "save", "ceiling_d2h"), (axes[1], "load", "ceiling_h2d")):
        xs = np.arange(len(cases))
        w = 0.16
        for i, (key, name) in enumerate(((ceil, "ceiling (1 memcpy)"), (f"ours_{d}", "ours (auto)"),
                                         (f"ours_dma_{d}", "ours, dma path (no SMs)"),
                                         (f"torch_{d}", "torch index_select+copy"),
                                         (f"naive_{d}", "memcpy per block"))):
            ax.bar(xs + (i - 2) * w, [c.get(key, 0) for c in cases], w, label=name)
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
