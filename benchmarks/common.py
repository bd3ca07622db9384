"""Shared benchmark plumbing: timing, a printed table, JSON + PNG output, machine facts."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

GB = 1e9


def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Best wall time of `repeats` calls (the least disturbed run on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[h for h in headers]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text


def gpu_label(device_name: str) -> str:
    """A GPU's name as results files carry it: "NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3"."""
    return device_name.replace("NVIDIA ", "").replace(" ", "-")


def write_json(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


def plot_lines(out_dir: Path, name: str, title: str, xlabel: str, ylabel: str, xs: Sequence,
               series: dict[str, Sequence[float]], logx: bool = True) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", linestyle="--" if "ceiling" in label else "-", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pinned_h2d_gbps(nbytes: int, repeats: int = 6) -> float:
    """The PCIe ceiling: best of `repeats` one-shot copies of nbytes from pinned host memory to the GPU."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return nbytes / best / GB
