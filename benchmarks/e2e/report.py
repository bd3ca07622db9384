"""Table, summary JSON and plots of `kvstore bench e2e` from its per-configuration JSON files."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..common import print_table

KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
ORDER = ("recompute", "native", "kvstore", "kvstore_ssd", "kvstore_nolayerwise")


def _load(folder: Path) -> tuple[dict, dict]:
    results = {}
    for config in ORDER:
        f = folder / f"e2e_{config}.json"
        if f.exists():
            results[config] = json.loads(f.read_text())
    ceilings: dict[str, list[float]] = {}
    for f in sorted(folder.glob("e2e_ceiling_*.json")):
        for n, gbps in json.loads(f.read_text())["pinned_gbps"].items():
            ceilings.setdefault(n, []).append(gbps)
    return results, {n: statistics.median(v) for n, v in ceilings.items()}


def build_report(folder: Path) -> dict:
    results, ceilings = _load(folder)
    single_rows, summary = [], {"ceiling_gbps": ceilings, "single": {}, "concurrency": {}, "multiturn": {}}
    lengths = sorted({int(n) for r in results.values() for n in r.get("single", {})})
    for n in lengths:
        base = results.get("recompute", {}).get("single", {}).get(str(n))
        native = results.get("native", {}).get("single", {}).get(str(n))
        t_ceiling = n * KV_BYTES_PER_TOKEN / (ceilings.get(str(n), float("nan")) * 1e9) * 1e3
        for config, res in results.items():
            rows = res.get("single", {}).get(str(n))
            if not rows:
                continue
            med = {k: statistics.median(r[k] for r in rows) for k in ("first_ms", "gpu_hit_ms", "reload_ms")}
            vs_native = med["reload_ms"] / statistics.median(r["reload_ms"] for r in native) if native else float("nan")
            first_vs = med["first_ms"] / statistics.median(r["first_ms"] for r in base) if base else float("nan")
            entry = {**med, "reload_vs_native": vs_native, "first_vs_recompute": first_vs,
                     "reload_minus_hit_vs_ceiling": (med["reload_ms"] - med["gpu_hit_ms"]) / t_ceiling,
                     "exact": f"{sum(r['exact'] for r in rows)}/{len(rows)}"}
            summary["single"].setdefault(str(n), {})[config] = entry
            single_rows.append([n, config, med["first_ms"], med["gpu_hit_ms"], med["reload_ms"], vs_native, first_vs,
                                med["reload_ms"] - med["gpu_hit_ms"], t_ceiling, entry["exact"]])
    print("\nSingle prompts: TTFT ms, median (reload after reset_prefix_cache; ceiling = one pinned memcpy of "
          "the prompt's KV bytes, same machine)")
    print_table(["tokens", "config", "first", "GPU hit", "reload", "reload/native", "first/recompute",
                 "reload-hit", "ceiling xfer", "exact"], single_rows)
    conc_rows = []
    for config, res in results.items():
        for n, c in res.get("concurrency", {}).items():
            summary["concurrency"].setdefault(n, {})[config] = c
            conc_rows.append([n, config, c["ttft_p50_ms"], c["ttft_p99_ms"], c["prefill_tokens_per_s"]])
    if conc_rows:
        print("\nConcurrency (8K-token shared system prompt + 256 distinct tokens each)")
        print_table(["requests", "config", "TTFT p50 ms", "TTFT p99 ms", "prefill tok/s"], conc_rows)
    mt_rows = []
    for config, res in results.items():
        m = res.get("multiturn")
        if m:
            summary["multiturn"][config] = m
            counters = m.get("store_counters", {})
            mt_rows.append([config, m["ttft_p50_ms"], m["ttft_p99_ms"], m["total_s"], counters.get("hits.dram", "n/a"),
                            counters.get("hits.ssd", "n/a"), counters.get("misses", "n/a")])
    if mt_rows:
        print("\nMulti-turn (20 users x 8 turns, histories growing from 2K tokens; GPU cache 64K tokens)")
        print_table(["config", "TTFT p50 ms", "TTFT p99 ms", "total s", "chunk hits DRAM", "chunk hits SSD",
                     "chunk misses"], mt_rows)
    summary["vllm_prefix_cache_metrics"] = {c: r.get("vllm_prefix_cache_metrics") for c, r in results.items()}
    summary["gpu"] = next((r.get("gpu") for r in results.values() if r.get("gpu")), None)
    (folder / "e2e_summary.json").write_text(json.dumps(summary, indent=2))
    _plots(folder, summary, lengths)
    return summary


def _plots(folder: Path, summary: dict, lengths: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    configs = [c for c in ORDER if any(c in summary["single"].get(str(n), {}) for n in lengths)]
    for c in configs:
        xs = [n for n in lengths if c in summary["single"].get(str(n), {})]
        axes[0].plot(xs, [summary["single"][str(n)][c]["reload_ms"] for n in xs], marker="o", label=f"{c} reload")
        if "recompute" in summary["single"].get(str(xs[0]), {}):
            axes[1].plot(xs, [summary["single"][str(n)]["recompute"]["reload_ms"] / summary["single"][str(n)][c]["reload_ms"]
                              for n in xs], marker="o", label=c)
    xs = [n for n in lengths if "kvstore" in summary["single"].get(str(n), {})]
    if xs:
        axes[0].plot(xs, [summary["single"][str(n)]["kvstore"]["gpu_hit_ms"] for n in xs], linestyle="--",
                     label="GPU hit (floor)")
    axes[0].set_yscale("log")  # recompute and SSD reloads are 10-100x the DRAM reloads
    for ax, title, ylabel in ((axes[0], "TTFT of a reloaded prompt", "ms"),
                              (axes[1], "speed-up over recompute", "x")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mt = summary["multiturn"]
    if mt:
        names = list(mt)
        pos = range(len(names))
        axes[2].bar([p - 0.2 for p in pos], [mt[c]["ttft_p50_ms"] for c in names], width=0.4, label="p50")
        axes[2].bar([p + 0.2 for p in pos], [mt[c]["ttft_p99_ms"] for c in names], width=0.4, label="p99")
        axes[2].set_xticks(list(pos), names, rotation=15, fontsize=8)
        axes[2].set_title("multi-turn TTFT")
        axes[2].set_ylabel("ms")
        axes[2].legend()
    fig.suptitle(f"kvstore in vLLM: {summary.get('gpu') or ''}")
    fig.tight_layout()
    fig.savefig(folder / "e2e.png", dpi=110)
    plt.close(fig)
