"""`kvstore agent`: runs the node agent in the foreground until SIGTERM / SIGINT.

The agent's config is the ordinary typed Config (file, KVSTORE_* variables, --set KEY=VALUE,
and the flags below); its `agent*` keys are client-side and ignored here. It prints one line
`kvstore agent listening on PATH (pid N)` once clients can connect.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from kvstore.config import Config, parse_size
from kvstore.errors import ConfigError

from .core import AgentCore
from .server import AgentServer

log = logging.getLogger("kvstore.agent")


def default_socket_path() -> str:
    from kvstore.agent_client import default_socket_path as path
    return path()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None, help="unix socket path (default: $XDG_RUNTIME_DIR/kvstore/agent.sock "
                   "or /tmp/kvstore-$UID/agent.sock)")
    p.add_argument("--shm", default="memfd", help="backing of the DRAM pool: 'memfd' (default) or a new file path "
                   "under /dev/shm or a hugetlbfs mount (unlinked once mapped)")
    p.add_argument("--dram-capacity", default=None, help="DRAM pool size, e.g. 8GiB (config: dram_capacity_bytes)")
    p.add_argument("--ssd-path", default=None, help="SSD tier directory, 'none' to disable (config: ssd_path)")
    p.add_argument("--ssd-capacity", default=None, help="SSD tier cap (config: ssd_capacity_bytes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config key")
    p.add_argument("--config-file", default=None, help="YAML config file (default: $KVSTORE_CONFIG)")
    p.add_argument("--drain-s", type=float, default=2.0, help="on SIGTERM, how long clients holding "
                   "reservations or leases may still commit / release")
    p.add_argument("--master", default=None, help="cluster master host:port (config: master)")
    p.add_argument("--node-id", default=None, help="node id in the cluster (config: node_id)")
    p.add_argument("--remote-listen", default=None, help="host:port for peers' fetches (config: remote_listen)")
    p.add_argument("--debug-serve-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests only
    p.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    for flag, key in (("dram_capacity", "dram_capacity_bytes"), ("ssd_path", "ssd_path"),
                      ("ssd_capacity", "ssd_capacity_bytes"), ("master", "master"), ("node_id", "node_id"),
                      ("remote_listen", "remote_listen")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if "dram_slab_bytes" not in overrides and "dram_capacity_bytes" in overrides:
        cap = parse_size(overrides["dram_capacity_bytes"], "dram_capacity_bytes")
        overrides["dram_slab_bytes"] = min(Config.__dataclass_fields__["dram_slab_bytes"].default, cap)
    overrides.pop("agent", None)
    overrides.pop("agent_timeout_ms", None)
    return Config.load(args.config_file, env={k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_AGENT")}, **overrides)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s kvstore-agent %(levelname)s %(message)s")
    config = config_from_args(args)
    socket_path = args.socket or default_socket_path()
    core = AgentCore(config, shm_path=None if args.shm == "memfd" else args.shm)
    try:
        server = AgentServer(core, socket_path, drain_s=args.drain_s)
        if config.master is not None:
            from .cluster import ClusterLink
            core.attach_cluster(ClusterLink(core, master=config.master, token=config.master_token,
                                            node_id=config.node_id, listen=config.remote_listen,
                                            serve_delay_s=getattr(args, "debug_serve_delay_ms", 0.0) / 1000,
                                            timeout_s=config.master_timeout_ms / 1000).start())
    except BaseException:
        core.close()
        raise
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    print(f"kvstore agent listening on {socket_path} (pid {os.getpid()}); "
          f"DRAM {config.dram_capacity_bytes} bytes, SSD {config.ssd_path}"
          + ("" if core.cluster is None else f"; node {core.cluster.node_id} serving peers on "
             f"{core.cluster.address}, master {config.master}"), flush=True)
    server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.agent", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
