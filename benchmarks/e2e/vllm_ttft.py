"""`kvstore bench e2e`: TTFT inside real vLLM, side by side in one run, each configuration in
its own process: recompute (no connector), vLLM's native CPU offload (kv_offloading_size), and
kvstore (our connector by module path), at the same DRAM budget.

Per prompt length (k*chunk + 1 tokens, so a reload and a GPU prefix hit both compute only the
last token over the same cached tokens), for each of N random prompts:
  first   = TTFT of the prompt never seen before (0 % hit)
  gpu_hit = the same prompt again (vLLM's own GPU prefix cache: the floor)
  reload  = again after reset_prefix_cache() (from the offload tier; recomputed without one)
Correctness in the same run: the reload's greedy token and top-5 logprobs must equal the GPU
hit's, bit for bit, with weights re-drawn at a realistic scale (vLLM's dummy weights are too
flat to tell). Transfer ceiling: one pinned cudaMemcpy of the same KV bytes, same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("recompute", "native", "kvstore")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=False, default=None, help="config-only model folder (Llama-3.1-8B shape)")
    p.add_argument("--lengths", default="8192,32768", help="prompt lengths in tokens (each gets +1)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per length (median reported)")
    p.add_argument("--dram-gib", type=int, default=16, help="offload DRAM budget, same for native and kvstore")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=33024)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _realistic_weights(model) -> None:
    import torch
    g = torch.Generator(device="cuda").manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty_like(p, dtype=torch.float32).normal_(0, 0.02, generator=g).to(p.dtype))


def _child(args) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.max_model_len,
              gpu_memory_utilization=0.80, seed=0, enable_prefix_caching=True)
    if args.child == "native":
        kw["kv_offloading_size"] = args.dram_gib
        kw["kv_offloading_backend"] = "native"
    elif args.child == "kvstore":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.connectors.vllm", kv_role="kv_both",
            kv_connector_extra_config={"chunk_tokens": args.chunk_tokens, "store": {
                "dram_capacity_bytes": f"{args.dram_gib}GiB", "ssd_path": "none", "dram_slab_bytes": "1GiB"}})
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup_s = time.perf_counter() - t0
    llm.apply_model(_realistic_weights)
    sp = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)

    def ttft(ids):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        o = out.outputs[0]
        top = sorted(((int(tok), float(lp.logprob)) for tok, lp in o.logprobs[0].items()), key=lambda x: -x[1])
        return dt * 1e3, [int(o.token_ids[0])] + [v for pair in top for v in pair]

    import random
    rng = random.Random(7)
    result = {"config": args.child, "startup_s": startup_s, "lengths": {}}
    for length in [int(x) for x in args.lengths.split(",")]:
        n = length + 1
        ttft([rng.randrange(100, 120000) for _ in range(n)])  # warm-up: shapes, graphs
        rows = []
        for _ in range(args.prompts):
            ids = [rng.randrange(100, 120000) for _ in range(n)]
            first, _ = ttft(ids)
            hit, hit_out = ttft(ids)
            llm.reset_prefix_cache()
            time.sleep(0.05)
            reload, reload_out = ttft(ids)
            rows.append({"first_ms": first, "gpu_hit_ms": hit, "reload_ms": reload, "exact": reload_out == hit_out})
        result["lengths"][str(length)] = rows
        print(f"[{args.child}] {length}: " + ", ".join(f"{k}={statistics.median(r[k] for r in rows):.1f}"
                                                       for k in ("first_ms", "gpu_hit_ms", "reload_ms"))
              + f", exact {sum(r['exact'] for r in rows)}/{len(rows)}", flush=True)
    return result


def _pinned_ceiling_gbps(nbytes: int) -> float:
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def run(args) -> dict:
    if args.child:
        result = _child(args)
        Path(args.out).write_text(json.dumps(result))
        return result
    model = args.model or str(Path(__file__).resolve().parent / "llama31_8b")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for config in args.configs.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            child_out = f.name
        cmd = [sys.executable, "-m", "kvstore.benchmarks.e2e.vllm_ttft", "--child", config, "--model", model,
               "--lengths", args.lengths, "--prompts", str(args.prompts), "--dram-gib", str(args.dram_gib),
               "--chunk-tokens", str(args.chunk_tokens), "--max-model-len", str(args.max_model_len), "--out", child_out]
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        print(f"== {config}", flush=True)
        done = subprocess.run(cmd, env=env, timeout=900)
        if done.returncode != 0:
            print(f"{config} failed with exit code {done.returncode}", flush=True)
            results[config] = {"error": done.returncode}
            continue
        results[config] = json.loads(Path(child_out).read_text())
        (out_dir / f"e2e_vllm_{config}.json").write_text(json.dumps(results[config], indent=2))  # kept if cut off
    kv_bytes_per_token = 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B bf16
    lengths = [int(x) for x in args.lengths.split(",")]
    ceilings = {str(n): _pinned_ceiling_gbps(n * kv_bytes_per_token) for n in lengths}
    print("\nTTFT ms (median) | ceiling = one pinned memcpy of the prompt's KV bytes, this run")
    print("tokens | config | first | gpu hit | reload | reload-hit | transfer at ceiling | exact")
    for n in lengths:
        t_ceiling = n * kv_bytes_per_token / (ceilings[str(n)] * 1e9) * 1e3
        for config, res in results.items():
            rows = res.get("lengths", {}).get(str(n))
            if not rows:
                continue
            med = {k: statistics.median(r[k] for r in rows) for k in ("first_ms", "gpu_hit_ms", "reload_ms")}
            print(f"{n} | {config} | {med['first_ms']:.1f} | {med['gpu_hit_ms']:.1f} | {med['reload_ms']:.1f} | "
                  f"{med['reload_ms'] - med['gpu_hit_ms']:.1f} | {t_ceiling:.1f} ({ceilings[str(n)]:.1f} GB/s) | "
                  f"{sum(r['exact'] for r in rows)}/{len(rows)}")
    payload = {"results": results, "pinned_ceiling_gbps": ceilings, "kv_bytes_per_token": kv_bytes_per_token}
    (out_dir / "e2e_vllm.json").write_text(json.dumps(payload, indent=2))
    return payload


def main() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args())


if __name__ == "__main__":
    main()
