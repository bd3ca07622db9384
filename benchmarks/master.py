"""`kvstore bench master`: the cluster master (a `python -m kvstore.master` subprocess on loopback)
under simulated agents streaming deltas, then batched Match lookups against the full index.

For each --keys count, a fresh master: --agents simulated nodes register and stream their keys
(one DRAM replica each) through ReportDeltas in MAX_KEYS-sized batches, --streams at a time
(ingest keys/s). Lookups start once the kernel has written back the bulk load's dirty LMDB
pages (that writeback otherwise runs on the same cores). Then, for each count of concurrent
callers (--clients: separate processes, one channel each) and each batch size, Match calls of
packed keys that all lie on one node, for --seconds per round, --rounds rounds: the best round
(keys/s) is reported with its p50/p99 per call and the master's CPU time per call (/proc); all
rounds are in the JSON. A batch is capped at the keys one agent holds (a run lies on one node).
The master's RSS (and its anonymous / file-backed parts: the index vs the LMDB map) is read from
/proc before and after ingest and after the lookups. Writes master.json and master.png to --out.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .common import machine, print_table, write_json

GOAL = ">= 1M key lookups/s in batches, p99 <= 2 ms, with 1M and 10M keys indexed"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", default="1000000,10000000", help="keys indexed, one master per count (comma list; "
                   "one DRAM replica each)")
    p.add_argument("--agents", type=int, default=1000, help="simulated agents the keys are spread over")
    p.add_argument("--streams", type=int, default=4, help="agents streaming deltas at once")
    p.add_argument("--batches", default="64,256,1024,4096", help="keys per Match call (capped at keys / agents: "
                   "a run lies on one node)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed round per batch size")
    p.add_argument("--rounds", type=int, default=3, help="rounds per batch size; the best is reported")
    p.add_argument("--clients", default="1,2", help="concurrent Match callers (comma list: each is measured)")
    p.add_argument("--out", default="bench-out", help="directory for master.json and master.png")


def _packed_keys(ids: np.ndarray) -> bytes:
    raw = np.zeros((len(ids), 2), dtype="<u8")
    raw[:, 0] = ids
    raw[:, 1] = 0x6B7673746F7265
    return raw.tobytes()


def _memory(pid: int) -> dict:
    """The process's resident memory from /proc (bytes): rss, anon (heap: the index), file (LMDB map), hwm."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "hwm"}
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            out[fields[name] + "_bytes"] = int(value.split()[0]) * 1024
    return out


def _settle(limit_s: float = 120.0, dirty_bytes: int = 64 << 20) -> float:
    """Waits until the kernel has written back the bulk load's dirty LMDB pages (Dirty + Writeback
    in /proc/meminfo under dirty_bytes), so writeback does not run on the lookups' cores.
    Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        if (int(info["Dirty"].split()[0]) + int(info["Writeback"].split()[0])) * 1024 < dirty_bytes:
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_master(data_dir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.master", "--port", "0", "--data-dir", str(data_dir),
                             "--deadline-s", "600", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"master did not start: {line}")
    return proc, m.group(1).rstrip(";")


def _ingest(address: str, n_keys: int, args: argparse.Namespace) -> dict:
    from kvstore.master import kvstore_master_pb2 as pb
    from kvstore.master.client import MasterClient, delta_batches
    from kvstore.master.server import MAX_KEYS

    per_agent = n_keys // args.agents
    client = MasterClient(address, timeout_s=120)
    epochs = {a: client.register(f"sim-{a}", f"127.0.0.1:{10000 + a % 50000}", (1 << 34, 1 << 33, 0)).master_epoch
              for a in range(args.agents)}

    def stream(a: int) -> int:
        c = MasterClient(address, timeout_s=600)
        ids = np.arange(a * per_agent, (a + 1) * per_agent, dtype=np.uint64)
        packed = _packed_keys(ids)
        admits = [pb.Replica(key=packed[j * 16:(j + 1) * 16], tier=pb.DRAM, nbytes=2 << 20,
                             checksum=int(i) * 2654435761 % (1 << 64), generation=1)
                  for j, i in enumerate(ids.tolist())]
        reply = c.report(delta_batches(f"sim-{a}", epochs[a], admits, [], per_batch=MAX_KEYS))
        c.close()
        return reply.admitted

    start = time.perf_counter()
    admitted = 0
    with ThreadPoolExecutor(args.streams) as pool, tqdm(total=args.agents, desc=f"{args.agents} agents streaming "
                                                         f"{n_keys:,} keys", unit="agent") as bar:
        for n in pool.map(stream, range(args.agents)):
            admitted += n
            bar.update(1)
    ingest_s = time.perf_counter() - start
    status = client.status()
    client.close()
    if status.keys != admitted or admitted != per_agent * args.agents:
        raise RuntimeError(f"master indexed {status.keys} keys, {admitted} admitted, {per_agent * args.agents} sent")
    return {"indexed_keys": status.keys, "replicas": status.replicas, "ingest_s": ingest_s,
            "ingest_keys_per_s": admitted / ingest_s, "per_agent": per_agent}


def _caller(address: str, batch: int, per_agent: int, agents: int, seconds: float, seed: int, go, results) -> None:
    """One Match caller (its own process): `batch` keys one agent holds, packed, from a random
    agent and offset per call, for `seconds`. Puts (latencies s, start, end, error) on results."""
    from kvstore.master.client import MasterClient

    rng = np.random.default_rng(seed)
    c = MasterClient(address, timeout_s=60)
    c.match(_packed_keys(np.arange(batch, dtype=np.uint64)))  # connected before the clock starts
    lat, error = [], None
    go.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    try:
        while time.perf_counter() < start + seconds:
            a = int(rng.integers(0, agents))
            off = a * per_agent + int(rng.integers(0, per_agent - batch + 1))
            keys = _packed_keys(np.arange(off, off + batch, dtype=np.uint64))
            t0 = time.perf_counter()
            r = c.match(keys)
            lat.append(time.perf_counter() - t0)
            if r.best is None or r.best.length != batch:
                raise RuntimeError(f"lookup of {batch} present keys found {r.best}")
    except Exception as e:  # reported by the parent
        error = repr(e)
    results.put((lat, start, time.perf_counter(), error))
    c.close()


def _lookup_round(address: str, master_pid: int, batch: int, clients: int, per_agent: int, args: argparse.Namespace,
                  seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no gRPC state forked, no shared GIL
    go = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_caller, args=(address, batch, per_agent, args.agents, args.seconds,
                                               seed * 1000 + k, go, results), daemon=True) for k in range(clients)]
    for proc in procs:
        proc.start()
    go.wait(timeout=120)
    cpu0 = _cpu_s(master_pid)
    got = [results.get(timeout=args.seconds + 120) for _ in procs]
    master_cpu_s = _cpu_s(master_pid) - cpu0
    for proc in procs:
        proc.join(30)
    errors = [e for *_, e in got if e]
    if errors:
        raise RuntimeError(f"Match caller failed: {errors[0]}")
    lat = [x for ls, *_ in got for x in ls]
    wall = max(end for _, _, end, _ in got) - min(start for _, start, _, _ in got)
    ms = np.asarray(lat) * 1e3
    return {"batch": batch, "clients": clients, "calls": len(lat), "keys_per_s": len(lat) * batch / wall,
            "calls_per_s": len(lat) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "master_cpu_us_per_call": master_cpu_s / len(lat) * 1e6}


def _run_one(n_keys: int, args: argparse.Namespace) -> dict:
    from kvstore.master.server import MAX_KEYS

    work = Path(tempfile.mkdtemp(prefix="bench-master-"))
    load_before = os.getloadavg()
    proc, address = _start_master(work / "m")
    try:
        mem_empty = _memory(proc.pid)
        ingest = _ingest(address, n_keys, args)
        mem_ingest = _memory(proc.pid)
        settle_s = _settle()
        per_agent = ingest["per_agent"]
        batches = sorted({min(int(b), MAX_KEYS, per_agent) for b in args.batches.split(",")})
        lookups = []
        for clients in [int(c) for c in args.clients.split(",")]:
            for batch in batches:
                rounds = [_lookup_round(address, proc.pid, batch, clients, per_agent, args, seed)
                          for seed in range(args.rounds)]
                best = max(rounds, key=lambda r: r["keys_per_s"])
                lookups.append(dict(best, rounds=rounds))
        mem_end = _memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return {"keys": n_keys, **ingest, "writeback_wait_s": settle_s, "memory_empty": mem_empty,
            "memory_after_ingest": mem_ingest,
            "memory_at_end": mem_end,
            "lookups": lookups, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def run(args: argparse.Namespace) -> dict:
    runs = [_run_one(int(k), args) for k in args.keys.split(",")]
    tables = []
    for r in runs:
        mem, empty = r["memory_after_ingest"], r["memory_empty"]
        per_key = (mem["anon_bytes"] - empty["anon_bytes"]) / r["indexed_keys"]
        print(f"\nmaster with {r['indexed_keys']:,} keys from {args.agents} simulated agents: ingest "
              f"{r['ingest_s']:.1f} s ({r['ingest_keys_per_s']:,.0f} keys/s through ReportDeltas, {args.streams} "
              f"streams at a time); master RSS {mem['rss_bytes'] / 2**20:,.0f} MiB (anon "
              f"{mem['anon_bytes'] / 2**20:,.0f} MiB, {per_key:.0f} B/key over the empty master's, LMDB map "
              f"{mem['file_bytes'] / 2**20:,.0f} MiB); load average {r['loadavg_before'][0]:.2f} before, "
              f"{r['loadavg_after'][0]:.2f} after")
        print(f"Match calls (after {r['writeback_wait_s']:.1f} s waiting for the bulk load's writeback), best of "
              f"{args.rounds} rounds of {args.seconds:g} s per row:")
        tables.append(print_table(
            ["callers", "keys/call", "calls", "keys/s", "calls/s", "p50 ms", "p99 ms", "master CPU us/call"],
            [[x["clients"], x["batch"], x["calls"], f"{x['keys_per_s']:,.0f}", f"{x['calls_per_s']:,.0f}",
              x["p50_ms"], x["p99_ms"], f"{x['master_cpu_us_per_call']:.0f}"] for x in r["lookups"]]))
    payload = {"machine": machine(), "args": vars(args), "runs": runs, "tables": tables, "goal": GOAL}
    out = Path(args.out)
    write_json(out, "master", payload)
    _plot(out, runs)
    return payload


def _plot(out: Path, runs: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        for clients in sorted({x["clients"] for x in r["lookups"]}):
            rows = [x for x in r["lookups"] if x["clients"] == clients]
            xs = [x["batch"] for x in rows]
            label = f"{r['indexed_keys'] / 1e6:g} M keys, {clients} caller{'s' if clients > 1 else ''}"
            ax[0].plot(xs, [x["keys_per_s"] / 1e6 for x in rows], marker="o", label=label)
            ax[1].plot(xs, [x["p99_ms"] for x in rows], marker="s", label=f"p99, {label}")
    ax[0].axhline(1.0, linestyle=":", color="gray", label="goal 1 M keys/s")
    ax[0].set_ylabel("M keys / s")
    ax[1].axhline(2.0, linestyle=":", color="gray", label="goal p99 2 ms")
    ax[1].set_ylabel("p99 ms per call")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xlabel("keys per Match call")
        a.legend(fontsize=8)
    fig.suptitle("kvstore master: batched Match lookups")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "master.png", dpi=120)
    plt.close(fig)
