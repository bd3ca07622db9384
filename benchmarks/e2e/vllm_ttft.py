"""`kvstore bench e2e`: TTFT inside real vLLM, each configuration in its own process, same DRAM
budget for the offload tiers:
  recompute             no connector
  native                vLLM's own CPU offload (kv_offloading_size)
  kvstore               our connector by module path, DRAM tier only
  kvstore_ssd           our connector with a DRAM tier too small to hold a prompt: reloads come
                        from the SSD tier (write-back flushed and DRAM evicted before each reload)
  kvstore_nolayerwise   our connector with layer-wise loading off (loads finish before the forward)
Scenarios (scenarios.py): single prompts (first / GPU hit / reload, bit-exact reload check),
concurrency (N requests sharing a system prompt), multi-turn (users with growing histories).
`--report DIR` turns the per-configuration JSON files of one or more runs on the same machine
into the table, summary JSON and PNG plots.
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

from ..common import pinned_h2d_gbps

CONFIGS = ("recompute", "native", "kvstore", "kvstore_ssd", "kvstore_nolayerwise")
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B, bf16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="config-only model folder (default: the bundled Llama-3.1-8B shape)")
    p.add_argument("--configs", default=",".join(CONFIGS[:3]), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--scenarios", default="single,concurrency,multiturn")
    p.add_argument("--lengths", default="4096,8192,16384,32768", help="single-prompt lengths (each +1 token)")
    p.add_argument("--prompts", type=int, default=10, help="prompts per length (median reported)")
    p.add_argument("--dram-gib", type=int, default=8, help="offload DRAM budget for native and kvstore")
    p.add_argument("--gpu-blocks", type=int, default=4096, help="GPU KV blocks (small, so multi-turn evicts)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=33024)
    p.add_argument("--ssd-path", default="/tmp/kvstore-e2e-ssd")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--report", default=None, help="only build the report from the JSON files in this folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _llm(args):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw = dict(model=args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=args.max_model_len,
              gpu_memory_utilization=0.85, seed=0, enable_prefix_caching=True,
              num_gpu_blocks_override=args.gpu_blocks)
    store = {"dram_capacity_bytes": f"{args.dram_gib}GiB", "dram_slab_bytes": "1GiB", "ssd_path": "none"}
    extra = {"chunk_tokens": args.chunk_tokens}
    if args.child == "native":
        kw.update(kv_offloading_size=args.dram_gib, kv_offloading_backend="native")
    elif args.child.startswith("kvstore"):
        if args.child == "kvstore_ssd":
            # Same DRAM budget; every reload is forced to come from SSD (write-back flushed, DRAM evicted).
            store.update(ssd_path=args.ssd_path, ssd_capacity_bytes="40GiB", ssd_slab_bytes="4GiB")
        if args.child == "kvstore_nolayerwise":
            extra["layerwise"] = False
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVStoreConnector", kv_connector_module_path="kvstore.connectors.vllm", kv_role="kv_both",
            kv_connector_extra_config={**extra, "store": store})
    return LLM(**kw)


def _store_counters() -> dict:
    from kvstore.connectors import shared_store
    return {k: v for s in shared_store._stores.values() for k, v in s.stats()["counters"].items()}


def _child(args) -> dict:
    from . import scenarios

    t0 = time.perf_counter()
    llm = _llm(args)
    result = {"config": args.child, "startup_s": time.perf_counter() - t0}
    llm.apply_model(scenarios.realistic_weights)
    before_reload = None
    if args.child == "kvstore_ssd":
        from kvstore.connectors import shared_store

        def before_reload():  # the reload must come from SSD: finish write-back, drop DRAM
            for s in shared_store._stores.values():
                s.flush(120)
                s.evict("dram")
    wanted = args.scenarios.split(",")
    if "single" in wanted:
        result["single"] = scenarios.single_prompt(llm, [int(x) for x in args.lengths.split(",")], args.prompts,
                                                   before_reload)
    if "concurrency" in wanted:
        result["concurrency"] = scenarios.concurrency(llm, 8192, 256, [8, 32], before_reload)
    if "multiturn" in wanted:
        before = _store_counters() if args.child.startswith("kvstore") else {}
        result["multiturn"] = scenarios.multi_turn(llm, users=20, turns=8, context_tokens=2048, question_tokens=256,
                                                   answer_tokens=8)
        if args.child.startswith("kvstore"):
            after = _store_counters()
            result["multiturn"]["store_counters"] = {k: after[k] - before.get(k, 0) for k in after}
    result["vllm_prefix_cache_metrics"] = scenarios.prefix_cache_metrics(llm)
    if args.child.startswith("kvstore"):
        result["store_counters"] = _store_counters()  # whole run, e.g. which GPU path loads took
    return result


def run(args) -> dict:
    if args.report:
        from .report import build_report
        return build_report(Path(args.report))
    if args.child:
        result = _child(args)
        Path(args.out).write_text(json.dumps(result))
        return result
    args.model = args.model or str(Path(__file__).resolve().parent / "llama31_8b")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    gpu = torch.cuda.get_device_name()
    for config in args.configs.split(","):
        if config not in CONFIGS:
            raise SystemExit(f"unknown configuration {config!r} (known: {', '.join(CONFIGS)})")
        child_out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, "-m", "kvstore.benchmarks.e2e.vllm_ttft", "--child", config, "--model", args.model,
               "--scenarios", args.scenarios, "--lengths", args.lengths, "--prompts", str(args.prompts),
               "--dram-gib", str(args.dram_gib), "--gpu-blocks", str(args.gpu_blocks), "--chunk-tokens",
               str(args.chunk_tokens), "--max-model-len", str(args.max_model_len), "--ssd-path", args.ssd_path,
               "--out", child_out]
        print(f"== {config}", flush=True)
        done = subprocess.run(cmd, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0"), timeout=1200)
        if done.returncode != 0:
            print(f"{config} failed with exit code {done.returncode}", flush=True)
            continue
        result = json.loads(Path(child_out).read_text())
        result["gpu"] = gpu
        (out_dir / f"e2e_{config}.json").write_text(json.dumps(result, indent=2))  # kept if a later one dies
    lengths = [int(x) for x in args.lengths.split(",")]
    ceilings = {str(n): pinned_h2d_gbps(n * KV_BYTES_PER_TOKEN) for n in lengths}
    (out_dir / f"e2e_ceiling_{int(time.time())}.json").write_text(json.dumps({"gpu": gpu, "pinned_gbps": ceilings}))
    from .report import build_report
    return build_report(out_dir)


def main() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    run(p.parse_args())


if __name__ == "__main__":
    main()
