"""`kvstore bench master`: the cluster master (a `python -m kvstore.master` subprocess on loopback)
under simulated agents streaming deltas, then batched Match lookups against the full index.

Reports delta ingest (keys/s, through ReportDeltas streams of MAX_KEYS-sized batches from
--agents simulated nodes, --streams at a time) and, per lookup batch size, keys looked up per
second and p50/p99 latency per call (--clients concurrent callers). Writes master.json and
master.png to --out.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import machine, print_table, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=int, default=1_000_000, help="keys indexed (one replica each, DRAM tier)")
    p.add_argument("--agents", type=int, default=1000, help="simulated agents the keys are spread over")
    p.add_argument("--streams", type=int, default=4, help="agents streaming deltas at once")
    p.add_argument("--batches", default="16,64,256,1000", help="keys per Match call (at most keys / agents: a run lies on one node)")
    p.add_argument("--calls", type=int, default=300, help="Match calls timed per batch size")
    p.add_argument("--clients", type=int, default=2, help="concurrent Match callers")
    p.add_argument("--out", default="bench-out", help="directory for master.json and master.png")


def _key(i: np.ndarray) -> list[bytes]:
    raw = np.zeros((len(i), 2), dtype="<u8")
    raw[:, 0] = i
    raw[:, 1] = 0x6B7673746F7265
    return [bytes(r) for r in raw.view(np.uint8).reshape(len(i), 16)]


def run(args: argparse.Namespace) -> dict:
    from kvstore.master import kvstore_master_pb2 as pb
    from kvstore.master.client import MasterClient, delta_batches
    from kvstore.master.server import MAX_KEYS

    work = Path(tempfile.mkdtemp(prefix="bench-master-"))
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.master", "--port", "0", "--data-dir", str(work / "m"),
                             "--deadline-s", "600", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        raise RuntimeError(f"master did not start: {line}")
    address = m.group(1).rstrip(";")
    try:
        client = MasterClient(address, timeout_s=120)
        per_agent = args.keys // args.agents
        epochs = {}
        for a in range(args.agents):
            epochs[a] = client.register(f"sim-{a}", f"127.0.0.1:{10000 + a % 50000}", (1 << 34, 1 << 33, 0)).master_epoch

        def stream(a: int) -> int:
            c = MasterClient(address, timeout_s=300)
            ids = np.arange(a * per_agent, (a + 1) * per_agent, dtype=np.uint64)
            keys = _key(ids)
            admits = [pb.Replica(key=k, tier=pb.DRAM, nbytes=2 << 20, checksum=int(i) * 2654435761 % (1 << 64),
                                 generation=1) for k, i in zip(keys, ids)]
            reply = c.report(delta_batches(f"sim-{a}", epochs[a], admits, [], per_batch=MAX_KEYS))
            c.close()
            return reply.admitted

        start = time.perf_counter()
        admitted = 0
        with ThreadPoolExecutor(args.streams) as pool, tqdm(total=args.agents, desc="agents streaming deltas",
                                                             unit="agent") as bar:
            for n in pool.map(stream, range(args.agents)):
                admitted += n
                bar.update(1)
        ingest_s = time.perf_counter() - start
        status = client.status()
        indexed = status.keys
        results = []
        rng = np.random.default_rng(0)
        for batch in [int(b) for b in args.batches.split(",")]:
            batch = min(batch, MAX_KEYS, per_agent)
            lat: list[float] = []
            lock = threading.Lock()

            def caller(calls: int) -> None:
                c = MasterClient(address, timeout_s=60)
                mine = []
                for _ in range(calls):
                    a = int(rng.integers(0, args.agents))
                    off = int(rng.integers(0, per_agent - batch + 1))
                    keys = _key(np.arange(a * per_agent + off, a * per_agent + off + batch, dtype=np.uint64))
                    t0 = time.perf_counter()
                    r = c.match(keys)
                    mine.append(time.perf_counter() - t0)
                    if r.best is None or r.best.length != batch:
                        raise RuntimeError(f"lookup of {batch} present keys found {r.best}")
                c.close()
                with lock:
                    lat.extend(mine)
            t0 = time.perf_counter()
            threads = [threading.Thread(target=caller, args=(args.calls // args.clients,)) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            a = np.asarray(lat) * 1e3
            results.append({"batch": batch, "calls": len(lat), "keys_per_s": len(lat) * batch / wall,
                            "calls_per_s": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
                            "p99_ms": float(np.percentile(a, 99))})
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\nmaster: {indexed} keys indexed from {args.agents} simulated agents in {ingest_s:.1f} s "
          f"({admitted / ingest_s:,.0f} keys/s through ReportDeltas, {args.streams} streams at a time)")
    table = print_table(["keys/call", "calls", "keys/s", "calls/s", "p50 ms", "p99 ms"],
                        [[r["batch"], r["calls"], f"{r['keys_per_s']:,.0f}", f"{r['calls_per_s']:,.0f}",
                          r["p50_ms"], r["p99_ms"]] for r in results])
    payload = {"machine": machine(), "args": vars(args), "indexed_keys": indexed, "ingest_s": ingest_s,
               "ingest_keys_per_s": admitted / ingest_s, "lookups": results, "table": table,
               "goal": ">= 1M key lookups/s in batches, p99 <= 2 ms"}
    out = Path(args.out)
    write_json(out, "master", payload)
    _plot(out, results, indexed)
    return payload


def _plot(out: Path, results: list[dict], indexed: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["batch"] for r in results]
    ax[0].plot(xs, [r["keys_per_s"] / 1e6 for r in results], marker="o", label="Match keys/s")
    ax[0].axhline(1.0, linestyle="--", color="gray", label="goal 1 M keys/s")
    ax[0].set_ylabel("M keys / s")
    ax[1].plot(xs, [r["p50_ms"] for r in results], marker="o", label="p50")
    ax[1].plot(xs, [r["p99_ms"] for r in results], marker="o", label="p99")
    ax[1].axhline(2.0, linestyle="--", color="gray", label="goal p99 2 ms")
    ax[1].set_ylabel("ms per call")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("keys per Match call")
        a.legend()
    fig.suptitle(f"kvstore master, {indexed:,} keys indexed")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "master.png", dpi=120)
    plt.close(fig)
