"""Prometheus metrics (one `kvstore_` namespace, DESIGN.md §6) and the per-store counters behind
`Store.stats()`. Every count goes through StoreStats.add so the two never disagree."""
from __future__ import annotations

import threading
from collections import Counter as _Counter

from prometheus_client import Counter, Gauge, Histogram, start_http_server

HITS = Counter("kvstore_hits_total", "Chunks found, by tier", ["tier"])
MISSES = Counter("kvstore_misses_total", "Chunks asked for and found in no tier")
BYTES = Counter("kvstore_bytes_total", "Bytes moved, by source and destination tier", ["src", "dst"])
EVICTIONS = Counter("kvstore_evictions_total", "Objects evicted, by tier", ["tier"])
CORRUPT = Counter("kvstore_corrupt_objects_total", "Objects dropped on a checksum or size mismatch", ["tier"])
DROPPED = Counter("kvstore_dropped_total", "Objects not stored (tier full, all slots busy), by tier", ["tier"])
POOL_BYTES = Gauge("kvstore_pool_bytes", "Tier bytes, by state", ["tier", "state"])
TRANSFER_SECONDS = Histogram("kvstore_transfer_seconds", "Save/load job latency", ["op"],
                             buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
LOOKUP_SECONDS = Histogram("kvstore_lookup_seconds", "Store.lookup latency",
                           buckets=(1e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.1))

_METRIC_OF = {"hits": HITS, "evictions": EVICTIONS, "corrupt": CORRUPT, "dropped": DROPPED}
_server_lock = threading.Lock()
_server_port: int | None = None


class StoreStats:
    """Thread-safe counters of one store, mirrored into the process-wide Prometheus metrics."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: _Counter[str] = _Counter()

    def add(self, name: str, n: int = 1, *, tier: str | None = None, dst: str | None = None) -> None:
        if n == 0:
            return
        label = name if tier is None else f"{name}.{tier}" if dst is None else f"{name}.{tier}->{dst}"
        with self._lock:
            self._counts[label] += n
        if name == "misses":
            MISSES.inc(n)
        elif name == "bytes":
            BYTES.labels(src=tier, dst=dst).inc(n)
        elif name in _METRIC_OF:
            _METRIC_OF[name].labels(tier=tier).inc(n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def serve(port: int) -> None:
    """Starts the Prometheus HTTP endpoint once per process (loopback only)."""
    global _server_port
    with _server_lock:
        if _server_port is None:
            start_http_server(port, addr="127.0.0.1")
            _server_port = port
