"""`kvstore bench agent`: the node agent against the embedded store, in the same run.

- lookup round trip (client -> agent -> client) p50/p99 for batches of 1/64/1024 keys, next to
  the embedded Store.lookup of the same batch;
- save / load GB/s of a host KV cache through the agent (this process gathers into / scatters
  from the agent's shared pool) vs the embedded store, per object size. Both run with the SSD
  tier off so the figures compare the DRAM paths alone (write-back would compete for the CPU).
The agent is a subprocess on a socket in a temp directory, stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import kvstore
from kvstore.config import parse_size

from .common import GB, machine, plot_lines, print_table, write_json

MiB = 1 << 20
CHUNK_TOKENS, BLOCK, HEADS, HEAD_DIM = 256, 16, 8, 128   # 1 MiB per layer per chunk in bf16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mib", default="4,16", help="object (chunk) sizes in MiB, comma separated")
    p.add_argument("--total", default="256MiB", help="bytes saved and loaded per size")
    p.add_argument("--lookup-batches", default="1,64,1024", help="keys per lookup, comma separated")
    p.add_argument("--lookups", type=int, default=2000, help="round trips timed per batch size")
    p.add_argument("--repeats", type=int, default=3, help="keep the best of this many save/load rounds")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the KV cache lives (cuda: the GPU movers read/write the agent's pool)")
    p.add_argument("--out", default="bench-out", help="directory for agent.json and agent.png")


def _percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples) * 1e6
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _start_agent(work: Path, dram_bytes: int) -> tuple[subprocess.Popen, str]:
    sock = str(work / "agent.sock")
    cmd = [sys.executable, "-m", "kvstore.agent", "--socket", sock, "--dram-capacity", str(dram_bytes),
           "--ssd-path", "none", "--set", f"dram_slab_bytes={min(dram_bytes, 256 * MiB)}", "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"agent did not start: {line}")
    return proc, sock


def _cache(size: int, count: int, device: str):
    layers = size // MiB
    blocks = count * (CHUNK_TOKENS // BLOCK)
    shape = (2, blocks, BLOCK, HEADS, HEAD_DIM)
    if device == "cuda":
        import torch
        g = torch.Generator(device="cuda").manual_seed(size)
        caches = [torch.randint(-(1 << 15), 1 << 15, shape, dtype=torch.int16, device="cuda", generator=g)
                  for _ in range(layers)]
    else:
        rng = np.random.default_rng(size)
        caches = [rng.integers(0, 1 << 16, size=shape, dtype=np.uint16) for _ in range(layers)]
    return caches, kvstore.KVLayout.from_flash_attn(caches)


def _copy(c):
    return c.clone() if hasattr(c, "clone") else c.copy()


def _same(a, b) -> bool:
    return bool(a.equal(b)) if hasattr(a, "equal") else bool(np.array_equal(a, b))


def _zero(c) -> None:
    c.zero_() if hasattr(c, "zero_") else c.fill(0)


def _lookup_rows(agent_store, embedded, batches: list[int], n: int, bar) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        keys = [rng.bytes(16) for _ in range(batch)]
        row = {"keys": batch}
        for name, store in (("agent", agent_store), ("embedded", embedded)):
            times = []
            for _ in range(max(10, n // max(1, batch // 64))):
                t = time.perf_counter()
                store.lookup(keys)
                times.append(time.perf_counter() - t)
            row[f"{name}_p50_us"], row[f"{name}_p99_us"] = _percentiles(times)
        rows.append(row)
        bar.update(1)
    return rows


def _transfer_row(agent_store, embedded, size: int, total: int, repeats: int, bar, device: str) -> dict:
    count = max(4, total // size)
    caches, layout = _cache(size, count, device)
    bpc = CHUNK_TOKENS // BLOCK
    keys = kvstore.chunk_keys(np.arange(count * CHUNK_TOKENS), kvstore.namespace(model=f"bench-{size}"),
                              CHUNK_TOKENS)
    ids = np.arange(count * bpc)
    row = {"size_mib": size // MiB, "count": count}
    want = [_copy(c) for c in caches]
    for name, store in (("agent", agent_store), ("embedded", embedded)):
        best_save = best_load = float("inf")
        for _ in range(repeats):
            store.evict()
            t = time.perf_counter()
            r = store.save(keys, layout, ids).wait(300)
            best_save = min(best_save, time.perf_counter() - t)
            if r.stored != count:
                raise RuntimeError(f"{name}: stored {r.stored} of {count} chunks ({len(r.failed_keys)} failed)")
            for c in caches:
                _zero(c)
            t = time.perf_counter()
            res = store.load(keys, layout, ids).wait(300)
            best_load = min(best_load, time.perf_counter() - t)
            if not res.complete or not all(_same(a, b) for a, b in zip(caches, want)):
                raise RuntimeError(f"{name}: load did not restore the cache bit-exact")
            bar.update(1)
        row[f"{name}_save_gbps"] = count * size / best_save / GB
        row[f"{name}_load_gbps"] = count * size / best_load / GB
        store.evict()
    row["save_ratio"] = row["agent_save_gbps"] / row["embedded_save_gbps"]
    row["load_ratio"] = row["agent_load_gbps"] / row["embedded_load_gbps"]
    return row


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    batches = [int(b) for b in args.lookup_batches.split(",")]
    total = parse_size(args.total, "--total")
    pool_bytes = max(total, 4 * max(sizes)) + max(sizes)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    proc, sock = _start_agent(work, pool_bytes)
    common = dict(chunk_tokens=CHUNK_TOKENS, ssd_path=None, dram_capacity_bytes=pool_bytes,
                  dram_slab_bytes=min(pool_bytes, 256 * MiB), pin_memory=True)
    try:
        agent_store = kvstore.Store(agent=f"unix://{sock}", agent_timeout_ms=60_000, **common)
        embedded = kvstore.Store(**common)
        with tqdm(total=len(batches) + 2 * args.repeats * len(sizes), desc="bench agent", unit="step") as bar:
            lookups = _lookup_rows(agent_store, embedded, batches, args.lookups, bar)
            transfers = [_transfer_row(agent_store, embedded, s, total, args.repeats, bar, args.device) for s in sizes]
        agent_store.close()
        embedded.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("lookup round trip (microseconds)")
    t1 = print_table(["keys", "agent p50", "agent p99", "embedded p50", "embedded p99"],
                     [[r["keys"], r["agent_p50_us"], r["agent_p99_us"], r["embedded_p50_us"], r["embedded_p99_us"]]
                      for r in lookups])
    print(f"save / load through the agent vs the embedded store (GB/s, {args.device} cache, SSD off)")
    t2 = print_table(["MiB", "chunks", "agent save", "embedded save", "save ratio", "agent load", "embedded load",
                      "load ratio"],
                     [[r["size_mib"], r["count"], r["agent_save_gbps"], r["embedded_save_gbps"], r["save_ratio"],
                       r["agent_load_gbps"], r["embedded_load_gbps"], r["load_ratio"]] for r in transfers])
    out = Path(args.out)
    result = {"benchmark": "agent", "machine": machine(), "cpu_threads": kvstore.Config().cpu_threads,
              "gpu": kvstore.gpu_available(), "device": args.device, "lookups": lookups, "transfers": transfers, "table": t1 + "\n\n" + t2}
    json_path = write_json(out, "agent", result)
    xs = [r["size_mib"] for r in transfers]
    png = plot_lines(out, "agent", f"kvstore agent vs embedded store ({args.device} cache)", "object size (MiB)", "GB/s", xs, {
        "agent save": [r["agent_save_gbps"] for r in transfers],
        "embedded save": [r["embedded_save_gbps"] for r in transfers],
        "agent load": [r["agent_load_gbps"] for r in transfers],
        "embedded load": [r["embedded_load_gbps"] for r in transfers]})
    print(f"wrote {json_path} and {png}")
    return result
