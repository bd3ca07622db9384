"""When does each layer of a layer-wise load arrive, as seen by the stream that waits for it?

A stream sleeps on the GPU (the gate, long enough for the host to enqueue everything), then a
LayerwiseLoad of the Llama-3.1-8B batch starts after it; the waiting stream does nothing but
wait_layer(l) and record a timing event, so each event's time is the arrival of layer l. Printed
per variant: host ms of start() and of the 32 waits, and the arrivals (first, median gap, last)
next to the time the same bytes take at the pinned memcpy ceiling. A load that delivers layers in
order arrives every ~1/32 of the transfer; one whose later layers hold back earlier ones does not.

    python -m benchmarks.layer_arrival [--tokens 4096] [--gate-ms 40] [--reps 3] [--out DIR]

Found (results/gpu_H100-80GB-HBM3.md, runs M-Q): the DMA path's copies must stay fenced layer
by layer (unfenced, layer 0 often arrived with the last layer); the staged path's layers arrived
sooner when its DMA ran ahead of the scatters (chained), yet inside vLLM that made reloads
slower (e2e run 16), so neither is chained.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from .common import gpu_label, write_json

SHAPE = "llama3.1-8b"

# name: (path, LayerwiseLoad.start options)
VARIANTS = {
    "dma": ("dma", {}),
    "dma_background": ("dma", {"background": True}),  # enqueued by a helper thread
    "staged": ("staged", {}),  # the default for scattered blocks
}


def run(args) -> dict:
    import torch

    from kvstore import gpu_movers
    from kvstore._native import C

    from .gpu import BLOCK, CHUNK, SHAPES, make_batch

    if C.cuda_device_count() == 0 or not torch.cuda.is_available():
        raise SystemExit("benchmarks.layer_arrival needs a CUDA device")
    tokens = args.tokens
    L = SHAPES[SHAPE][0]
    n_chunks, bpc = tokens // CHUNK, CHUNK // BLOCK
    gen = torch.Generator(device="cuda").manual_seed(0)
    caches, layout, ids = make_batch(torch, gen, SHAPE, tokens)
    chunk_bytes = layout.chunk_nbytes(CHUNK)
    arena, pinned = C.host_alloc(n_chunks * chunk_bytes, True)
    arena[:] = 0x5A
    objs = [arena.ctypes.data + i * chunk_bytes for i in range(n_chunks)]
    total = n_chunks * chunk_bytes
    paths = {"dma": gpu_movers.PATH_DMA, "staged": gpu_movers.PATH_STAGED}
    comp = torch.cuda.Stream()
    dev_buf = torch.empty(total, dtype=torch.uint8, device="cuda")

    def ceiling_ms() -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(comp)
        C.cuda_memcpy_async(dev_buf.data_ptr(), arena.ctypes.data, total, comp.cuda_stream)
        b.record(comp)
        b.synchronize()
        return a.elapsed_time(b)

    gate_cycles = int(2e9 * args.gate_ms * 1e-3)

    def once(name: str) -> dict:
        path, opts = VARIANTS[name]
        torch.cuda.synchronize()
        h = gpu_movers.LayerwiseLoad(layout, ids, objs, bpc, path=paths[path], keepalive=arena)
        with torch.cuda.stream(comp):
            torch.cuda._sleep(gate_cycles)
            e0 = torch.cuda.Event(enable_timing=True)
            e0.record(comp)
            t0 = time.perf_counter()
            h.start(after_stream=comp, **opts)
            t_start = time.perf_counter() - t0
            marks = []
            for layer in range(L):
                h.wait_layer(layer, comp)
                m = torch.cuda.Event(enable_timing=True)
                m.record(comp)
                marks.append(m)
            t_waits = time.perf_counter() - t0
        marks[-1].synchronize()
        h.wait(timeout_s=60)
        h.close()
        arrivals = [e0.elapsed_time(m) for m in marks]
        return {"start_host_ms": 1e3 * t_start, "waits_host_ms": 1e3 * t_waits, "arrival_ms": arrivals,
                "host_done_before_gate": t_waits * 1e3 < args.gate_ms}

    for name in VARIANTS:  # warm-up
        once(name)
    ceil = statistics.median(ceiling_ms() for _ in range(3))
    out = {"gpu": C.cuda_device_info(0)["name"], "tokens": tokens, "bytes": total, "gate_ms": args.gate_ms,
           "ceiling_ms": ceil, "ceiling_gbs": total / (ceil * 1e-3) / 1e9, "variants": {}}
    print(f"{total / 2**20:.0f} MiB in {L} layers, random block ids; one pinned memcpy of it: {ceil:.2f} ms "
          f"({out['ceiling_gbs']:.1f} GB/s); ideal arrival of layer l: (l+1)/{L} of that")
    print(f"{'variant':26s} {'start ms':>9s} {'waits ms':>9s} {'layer0':>8s} {'gap med':>8s} {'last':>8s} "
          f"{'last/ceil':>9s}  host done before the gate")
    for name in VARIANTS:
        runs = [once(name) for _ in range(args.reps)]
        arr = [statistics.median(r["arrival_ms"][i] for r in runs) for i in range(L)]
        gaps = [b - a for a, b in zip(arr, arr[1:])]
        row = {"start_host_ms": statistics.median(r["start_host_ms"] for r in runs),
               "waits_host_ms": statistics.median(r["waits_host_ms"] for r in runs),
               "arrival_ms": arr, "gap_median_ms": statistics.median(gaps), "last_over_ceiling": arr[-1] / ceil,
               "host_done_before_gate": all(r["host_done_before_gate"] for r in runs)}
        out["variants"][name] = row
        print(f"{name:26s} {row['start_host_ms']:9.2f} {row['waits_host_ms']:9.2f} {arr[0]:8.3f} "
              f"{row['gap_median_ms']:8.3f} {arr[-1]:8.3f} {row['last_over_ceiling']:9.3f}  {row['host_done_before_gate']}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--gate-ms", type=float, default=40.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    out = run(args)
    if args.out:
        print("wrote", write_json(Path(args.out), f"layer_arrival_{gpu_label(out['gpu'])}", out))


if __name__ == "__main__":
    main()
