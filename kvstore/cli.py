"""The `kvstore` command: demo, config, agent, status, bench (DESIGN.md §6)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import KVStoreError

# `kvstore bench NAME` runs a module of kvstore.benchmarks: add_arguments(parser) and run(args).
BENCHMARKS = {
    "tiers": ("tiers", "DRAM and SSD tier GB/s vs memcpy and dd O_DIRECT ceilings"),
    "gpu": ("gpu", "GPU gather/scatter vs the pinned memcpy ceiling (needs a GPU)"),
    "worker": ("worker_gpu", "vLLM worker path on CUDA: layer-wise save/load GB/s and per-layer waits (needs a GPU)"),
    "e2e": ("e2e.vllm_ttft", "TTFT in real vLLM: recompute vs native CPU offload vs kvstore (needs a GPU)"),
    "agent": ("agent", "node agent: lookup round trips, save/load GB/s vs the embedded store"),
    "master": ("master", "cluster master: batched Match lookups/s and p50/p99 with 1M and 10M keys, streamed deltas"),
    "remote": ("remote", "remote tier: agent-to-agent fetch GB/s vs a raw TCP stream on loopback"),
}


def _bench_module(name: str):
    return importlib.import_module(f"kvstore.benchmarks.{BENCHMARKS[name][0]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache offload and transfer engine")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import demo
    demo.add_arguments(sub.add_parser("demo", help="offload/reload round on the embedded store"))

    cfg = sub.add_parser("config", help="print the effective config")
    cfg.add_argument("--show", action="store_true", help="print every key with its effective value")
    cfg.add_argument("--config-file", default=None, help="YAML file (default: $KVSTORE_CONFIG)")

    from .agent import daemon
    daemon.add_arguments(sub.add_parser("agent", help="run the node agent daemon (shared DRAM pool + SSD tier)"))
    try:
        from .master import server as master_server
        master_server.add_arguments(sub.add_parser("master", help="run the cluster master (gRPC + LMDB)"))
    except Exception as e:  # noqa: BLE001 - grpc missing or older than the generated code
        sub.add_parser("master", help=f"run the cluster master (unavailable: {e})").set_defaults(unavailable=str(e))
    status = sub.add_parser("status", help="print the node agent's pool/SSD occupancy, clients and hit counts")
    status.add_argument("--socket", default=None, help="agent socket (default: the `agent` config key's, else "
                        "the default agent socket)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--timeout-s", type=float, default=5.0)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    for name, (_, text) in BENCHMARKS.items():
        p = bench.add_parser(name, help=text)
        try:
            _bench_module(name).add_arguments(p)
        except Exception as e:  # noqa: BLE001 - a missing or mismatched optional dependency (grpc, torch)
            p.set_defaults(unavailable=f"{type(e).__name__}: {e}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from . import demo
            return demo.run(args)
        if args.command == "config":
            from .config import Config
            print(Config.load(args.config_file).describe())
            return 0
        if args.command == "agent":
            from .agent import daemon
            return daemon.run(args)
        if args.command == "master":
            if getattr(args, "unavailable", None):
                print(f"kvstore master is unavailable: {args.unavailable}", file=sys.stderr)
                return 2
            from .master import server as master_server
            return master_server.run(args)
        if args.command == "status":
            from .agent.status import run as status_run
            return status_run(args)
        if args.command == "bench":
            if getattr(args, "unavailable", None):
                print(f"benchmark {args.benchmark} is unavailable: {args.unavailable}", file=sys.stderr)
                return 2
            _bench_module(args.benchmark).run(args)
            return 0
    except KVStoreError as e:
        print(f"kvstore: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
