"""WriteBack: copies committed DRAM objects to the SSD tier on a background thread, batched so
one fdatasync and one index transaction cover many objects. The engine's path only enqueues.
While an object is being written it is held as a DRAM reader, so it cannot be evicted mid-copy;
an object evicted before its turn is simply skipped (it stays a DRAM-only loss, never wrong)."""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

from .pinned_pool import PinnedPool
from .ssd_tier import SsdTier

log = logging.getLogger(__name__)
_BATCH = 16


class WriteBack:
    def __init__(self, dram: PinnedPool, ssd: SsdTier, on_written=None):
        self._dram, self._ssd = dram, ssd
        self._on_written = on_written or (lambda nbytes: None)
        self._queue: deque[bytes] = deque()
        self._cv = threading.Condition()
        self._in_flight = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvstore-writeback", daemon=True)
        self._thread.start()

    def enqueue(self, keys: list[bytes]) -> None:
        with self._cv:
            self._queue.extend(keys)
            self._cv.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Waits until everything enqueued so far is on SSD (or skipped); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                keys = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
                self._in_flight = len(keys)
            try:
                self._write(keys)
            except Exception:  # an SSD failure must not kill write-back for later objects
                log.exception("write-back of %d objects failed", len(keys))
            finally:
                with self._cv:
                    self._in_flight = 0
                    self._cv.notify_all()

    def _write(self, keys: list[bytes]) -> None:
        slots = [s for s in (self._dram.acquire(k) for k in keys if not self._ssd.contains(k)) if s is not None]
        try:
            stored = self._ssd.write_many([(s.key, s.view, s.nbytes, s.fingerprint) for s in slots])
            for slot, ok in zip(slots, stored):
                if ok:
                    self._dram.mark_persisted(slot.key)
                    self._on_written(slot.nbytes)
        finally:
            for slot in slots:
                self._dram.release(slot)
