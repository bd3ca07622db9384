"""Per-batch page counts and bandwidths for SGLang's storage metrics (`get_stats`, read only
when SGLang runs with --enable-hicache-storage-metrics). Drained on every read, like SGLang's
own backends; bounded so that a caller that never reads cannot grow it. Thread-safe."""
from __future__ import annotations

import threading
from collections import deque

_MAX_SAMPLES = 4096


class StorageMetricsRecorder:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._samples = {name: deque(maxlen=_MAX_SAMPLES)
                         for name in ("prefetch_pgs", "backup_pgs", "prefetch_bandwidth", "backup_bandwidth")}

    def record(self, op: str, pages: int, nbytes: int, seconds: float) -> None:
        """op: "prefetch" (storage -> host pool) or "backup" (host pool -> storage)."""
        if not self.enabled or pages <= 0:
            return
        with self._lock:
            self._samples[f"{op}_pgs"].append(pages)
            self._samples[f"{op}_bandwidth"].append(nbytes / 1e9 / max(seconds, 1e-9))  # GB/s

    def drain(self):
        """An SGLang StorageMetrics holding every sample since the last drain."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        metrics = StorageMetrics()
        with self._lock:
            for name, samples in self._samples.items():
                getattr(metrics, name).extend(samples)
                samples.clear()
        return metrics
