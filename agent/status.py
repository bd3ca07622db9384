"""`kvstore status`: asks the node agent for its STATUS and prints it (human table or --json)."""
from __future__ import annotations

import argparse
import json

from kvstore.agent_client import AgentClient, default_socket_path, parse_address
from kvstore.config import Config


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def format_status(s: dict) -> str:
    d = s["dram"]
    lines = [f"kvstore agent pid {s['pid']}, up {s['uptime_s']} s, pool {s['instance_id']:x}",
             f"DRAM  {d['objects']} objects, used {_gib(d['used_bytes'])}, allocated {_gib(d['allocated_bytes'])} "
             f"of {_gib(d['capacity_bytes'])}"]
    if s["ssd"] is None:
        lines.append("SSD   off")
    else:
        ssd = s["ssd"]
        lines.append(f"SSD   {ssd['objects']} objects, files {_gib(ssd['file_bytes'])} of {_gib(ssd['capacity_bytes'])} "
                     f"in {ssd['path']}")
    c = s["counters"]
    rate = "n/a" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.1f} %"
    lines.append(f"hits  DRAM {c.get('hits.dram', 0)}, SSD {c.get('hits.ssd', 0)}, misses {c.get('misses', 0)} "
                 f"(hit rate {rate}); lookups {c.get('lookups', 0)} of {c.get('lookup_keys', 0)} keys")
    lines.append(f"clients {len(s['clients'])}")
    for cl in s["clients"]:
        lines.append(f"  #{cl['id']} pid {cl['pid']} {cl['name'] or '?'}: {cl['leases']} leases, "
                     f"{cl['reservations']} reservations, {cl['requests']} requests, {cl['connected_s']} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    path = args.socket
    if path is None:
        agent = Config.load().agent
        path = parse_address(agent)[0] if agent else default_socket_path()
    client = AgentClient(path, timeout_s=args.timeout_s, name="kvstore-status")
    try:
        status = client.status()
    finally:
        client.close()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0
