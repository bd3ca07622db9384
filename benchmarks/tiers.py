"""`kvstore bench tiers`: DRAM and SSD tier put/get GB/s per object size, each next to its
ceiling measured in the same run: a one-shot memcpy for DRAM, `dd oflag=direct` / `iflag=direct`
of the same object size in the same directory for the SSD."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvstore import _C_module as C
from kvstore.config import default_ssd_path, parse_size
from kvstore.pinned_pool import PinnedPool
from kvstore.ssd_tier import SsdTier

from .common import GB, best_seconds, machine, plot_lines, print_table, write_json

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mib", default="1,4,16,64", help="object sizes in MiB, comma separated")
    p.add_argument("--total", default="1GiB", help="bytes moved per size and direction")
    p.add_argument("--dir", default=None, help="directory on the SSD to test (default: a temp dir beside "
                   "the default ssd_path)")
    p.add_argument("--repeats", type=int, default=3, help="keep the best of this many runs of each figure")
    p.add_argument("--out", default="bench-out", help="directory for tiers.json and tiers.png")


def _dd_gbps(args: list[str]) -> float:
    done = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    m = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", done.stderr)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {done.stderr!r}")
    return int(m.group(1)) / float(m.group(2)) / GB


def _dram_row(size: int, count: int, repeats: int) -> dict:
    rng = np.random.default_rng(size)
    src = rng.integers(0, 255, size=size, dtype=np.uint8)
    dst = np.empty(size, dtype=np.uint8)
    pool = PinnedPool(capacity_bytes=count * size, slab_bytes=count * size, pin=True)
    keys = [i.to_bytes(16, "little") for i in range(count)]
    # Ceiling: one memcpy of all the bytes between two ordinary (numpy) buffers that do not fit in
    # any cache: what a plain host copy of the same bytes costs, outside any pool.
    big_src = rng.integers(0, 255, size=count * size, dtype=np.uint8)
    big_dst = np.zeros(count * size, dtype=np.uint8)

    def put():
        pool.evict_all()
        for k in keys:
            slot = pool.reserve(k, size)
            np.copyto(slot.payload, src)
            pool.commit(slot)

    def get():
        for k in keys:
            slot = pool.acquire(k)
            np.copyto(dst, slot.payload)
            pool.release(slot)

    put()  # first call allocates the slab
    t_put, t_get = best_seconds(put, repeats), best_seconds(get, repeats)
    t_ceiling = best_seconds(lambda: np.copyto(big_dst, big_src), repeats)
    assert np.array_equal(dst, src)
    total = count * size
    return {"put_gbps": total / t_put / GB, "get_gbps": total / t_get / GB, "ceiling_gbps": total / t_ceiling / GB}


def _ssd_row(size: int, count: int, directory: Path, repeats: int) -> dict:
    """Our put/get and dd's write/read alternate, `repeats` rounds, best of each: the shared
    disk of a VM varies by tens of percent from second to second."""
    tier_dir = directory / f"tier-{size}"
    rng = np.random.default_rng(size)
    buf, _ = C.host_alloc(size, False)
    buf[:] = rng.integers(0, 255, size=size, dtype=np.uint8)
    out, _ = C.host_alloc(size, False)
    keys = [i.to_bytes(16, "little") for i in range(count)]
    batch = 16
    dd_file = directory / "dd.bin"
    put = get = dd_write = dd_read = 0.0
    total = count * size
    for _ in range(repeats):
        tier = SsdTier(tier_dir, capacity_bytes=count * size, slab_bytes=count * size)
        tier.write_many([(keys[0], buf, size, 0)])  # preallocates the file: time writes, not fallocate
        tier.delete(keys[0])
        t_put = best_seconds(lambda: [tier.write_many([(k, buf, size, 0) for k in keys[i:i + batch]])
                                      for i in range(0, count, batch)], 1)
        dd_write = max(dd_write, _dd_gbps(["if=/dev/zero", f"of={dd_file}", f"bs={size}", f"count={count}",
                                           "oflag=direct", "conv=fdatasync"]))
        t_get = best_seconds(lambda: [tier.read(k, out) for k in keys], 1)
        dd_read = max(dd_read, _dd_gbps([f"if={dd_file}", "of=/dev/null", f"bs={size}", f"count={count}",
                                         "iflag=direct"]))
        assert np.array_equal(out, buf), "SSD read returned different bytes"
        put, get = max(put, total / t_put / GB), max(get, total / t_get / GB)
        tier.close()
        shutil.rmtree(tier_dir)
        dd_file.unlink()
    return {"put_gbps": put, "get_gbps": get, "dd_write_gbps": dd_write, "dd_read_gbps": dd_read}


def run(args: argparse.Namespace) -> dict:
    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    total = parse_size(args.total, "--total")
    base = Path(args.dir) if args.dir else Path(default_ssd_path()).parent
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-tiers-", dir=base))
    rows = []
    try:
        for size in tqdm(sizes, desc="tiers", unit="size"):
            count = max(4, total // size)
            rows.append({"size_mib": size // MiB, "count": count, "dram": _dram_row(size, count, args.repeats),
                         "ssd": _ssd_row(size, count, work, args.repeats)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = print_table(
        ["MiB", "DRAM put", "DRAM get", "memcpy", "put/ceil", "get/ceil",
         "SSD put", "dd write", "put/dd", "SSD get", "dd read", "get/dd"],
        [[r["size_mib"], r["dram"]["put_gbps"], r["dram"]["get_gbps"], r["dram"]["ceiling_gbps"],
          r["dram"]["put_gbps"] / r["dram"]["ceiling_gbps"], r["dram"]["get_gbps"] / r["dram"]["ceiling_gbps"],
          r["ssd"]["put_gbps"], r["ssd"]["dd_write_gbps"], r["ssd"]["put_gbps"] / r["ssd"]["dd_write_gbps"],
          r["ssd"]["get_gbps"], r["ssd"]["dd_read_gbps"], r["ssd"]["get_gbps"] / r["ssd"]["dd_read_gbps"]]
         for r in rows])
    print("(GB/s; ceilings measured in this run: one memcpy of all the bytes for DRAM, dd O_DIRECT in the same directory "
          f"{base} for SSD)")
    out = Path(args.out)
    result = {"benchmark": "tiers", "machine": machine(), "directory": str(base), "rows": rows, "table": table}
    json_path = write_json(out, "tiers", result)
    xs = [r["size_mib"] for r in rows]
    png = plot_lines(out, "tiers", "kvstore tiers vs ceilings", "object size (MiB)", "GB/s", xs, {
        "DRAM put": [r["dram"]["put_gbps"] for r in rows], "DRAM get": [r["dram"]["get_gbps"] for r in rows],
        "memcpy ceiling": [r["dram"]["ceiling_gbps"] for r in rows],
        "SSD put": [r["ssd"]["put_gbps"] for r in rows], "SSD get": [r["ssd"]["get_gbps"] for r in rows],
        "dd write ceiling": [r["ssd"]["dd_write_gbps"] for r in rows],
        "dd read ceiling": [r["ssd"]["dd_read_gbps"] for r in rows]})
    print(f"wrote {json_path} and {png}")
    return result
