"""AgentCore: the node's cache as the agent serves it. It decides (index, leases, eviction,
write-back, promotion); clients move the bytes themselves through the shared pool.

Ownership, per connected client (a ClientState, touched only by that client's connection
thread):
- reservations: key -> WRITING slot, from BEGIN_WRITE until COMMIT or ABORT. Only this client
  writes the slot; nobody reads it; COMMIT publishes it and queues write-back to SSD.
- leases: lease id -> slots pinned by refcount (BEGIN_READ .. END_READ); a pinned slot is never
  evicted or reused.
When the client disconnects (closes, dies, times out) disconnect() aborts its reservations and
releases its leases: no partial object ever becomes visible, and nothing stays pinned.
SSD hits are promoted into DRAM inside BEGIN_READ (checksum verified by SsdTier.read), so a
client always reads DRAM.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kvstore import metrics
from kvstore._native import C
from kvstore.config import Config
from kvstore.errors import InvalidArgumentError, PoolFullError
from kvstore.pinned_pool import Slot
from kvstore.ssd_tier import SsdTier
from kvstore.object_io import acquire_for_load
from kvstore.writeback import WriteBack

from .protocol import SlotState, Slots, UnknownKeyError, UnknownLeaseError
from .shm_pool import PoolFile, SharedPool

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ClientState:
    client_id: int
    pid: int = 0
    name: str = ""
    connected_at: float = field(default_factory=time.time)
    reservations: dict[bytes, Slot] = field(default_factory=dict)
    leases: dict[int, list[Slot]] = field(default_factory=dict)
    requests: int = 0


class AgentCore:
    def __init__(self, config: Config, *, shm_path: str | None = None):
        self.config = cfg = config
        C.configure_pools(cfg.cpu_threads, cfg.io_threads)
        self.stats = metrics.StoreStats()
        self.started_at = time.time()
        self.file = PoolFile.create(cfg.dram_capacity_bytes, shm_path)
        self.cluster = None  # agent/cluster.py ClusterLink when a master is configured
        self.dram = SharedPool(self.file, cfg.dram_slab_bytes, on_evict=self._on_evict)
        self.ssd = None
        self.writeback = None
        try:
            if cfg.ssd_path is not None:
                self.ssd = SsdTier(cfg.ssd_path, cfg.ssd_capacity_bytes, cfg.ssd_slab_bytes, cfg.ssd_direct_io,
                                   on_event=lambda name, n: self.stats.add(name, n, tier="ssd"))
            if cfg.write_back and self.ssd is not None:
                self.writeback = WriteBack(self.dram, self.ssd, on_written=lambda n: self.stats.add(
                    "bytes", n, tier="dram", dst="ssd"))
        except BaseException:
            self.file.close()
            raise
        self._lock = threading.Lock()  # the client registry and lease ids
        self._clients: dict[int, ClientState] = {}
        self._ids = itertools.count(1)
        if cfg.metrics_port:
            metrics.serve(cfg.metrics_port)

    def attach_cluster(self, link) -> None:
        """Reports admits/evictions to the master and fetches local misses from peers."""
        self.cluster = link

    def _on_evict(self, slot: Slot) -> None:  # may run under the pool's lock: only queues
        self.stats.add("evictions", tier="dram")
        if self.cluster is not None:
            self.cluster.evicted(slot.key)

    # ---- clients -----------------------------------------------------------------------------
    def connect(self) -> ClientState:
        client = ClientState(next(self._ids))
        with self._lock:
            self._clients[client.client_id] = client
        return client

    def disconnect(self, client: ClientState) -> None:
        """Aborts the client's reservations and releases its leases (it closed or died)."""
        for slot in client.reservations.values():
            self.dram.abort(slot)
        for slots in client.leases.values():
            for slot in slots:
                self.dram.release(slot)
        if client.reservations or client.leases:
            log.info("client %d (pid %d) left: aborted %d reservations, released %d leases", client.client_id,
                     client.pid, len(client.reservations), len(client.leases))
            self.stats.add("reclaimed_reservations", len(client.reservations))
            self.stats.add("reclaimed_leases", len(client.leases))
        client.reservations.clear()
        client.leases.clear()
        with self._lock:
            self._clients.pop(client.client_id, None)

    # ---- queries -----------------------------------------------------------------------------
    def lookup(self, keys: list[bytes], writing: bool = False) -> np.ndarray:
        """Per key 0 (miss), 1 (DRAM), 2 (SSD) or 3 (another node, per the master: the leading
        run after the first local miss that a peer holds); with `writing`, 4 for a key a save
        is still writing into DRAM. Pins nothing."""
        out = np.zeros(len(keys), dtype=np.uint8)
        for i, key in enumerate(keys):
            if self.dram.contains(key):
                out[i] = 1
            elif self.ssd is not None and self.ssd.contains(key):
                out[i] = 2
            elif writing and self.dram.is_writing(key):
                out[i] = 4
        misses = np.flatnonzero(out == 0)
        if self.cluster is not None and len(misses):
            first = int(misses[0])
            run = self.cluster.locate(keys[first:])
            out[first:first + run][out[first:first + run] == 0] = 3
        self.stats.add("lookups")
        self.stats.add("lookup_keys", len(keys))
        return out

    # ---- reads -------------------------------------------------------------------------------
    def begin_read(self, client: ClientState, nbytes: int, fingerprint: int, keys: list[bytes]) -> tuple[int, Slots]:
        """Pins every present object of (nbytes, fingerprint); a lease id of 0 pins nothing."""
        self._check_nbytes(nbytes)
        n = len(keys)
        offsets, gens = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        states = np.full(n, SlotState.MISS, dtype=np.uint8)
        held: list[Slot] = []
        hits = {"dram": 0, "ssd": 0}
        if self.cluster is not None:
            self._fetch_remote(keys, nbytes, fingerprint)
        try:
            for i, key in enumerate(keys):
                slot, tier = self._acquire(key, nbytes, fingerprint)
                if slot is None:
                    continue
                held.append(slot)
                hits[tier] += 1
                offsets[i] = self.dram.offset(slot)
                gens[i] = self.file.generation(int(offsets[i]))
                states[i] = SlotState.HIT_DRAM if tier == "dram" else SlotState.HIT_SSD
        except BaseException:
            for slot in held:
                self.dram.release(slot)
            raise
        for tier, count in hits.items():
            self.stats.add("hits", count, tier=tier)
        self.stats.add("misses", n - len(held))
        lease = 0
        if held:
            with self._lock:
                lease = next(self._ids)
            client.leases[lease] = held
        return lease, Slots(offsets, gens, states)

    def _fetch_remote(self, keys: list[bytes], nbytes: int, fingerprint: int) -> None:
        """Fetches the run after the first local miss from peers into DRAM (a failure: a miss)."""
        first = next((i for i, k in enumerate(keys) if not (self.dram.contains(k) or (
            self.ssd is not None and self.ssd.contains(k)))), None)
        if first is None:
            return
        got = self.cluster.fetch_run(keys[first:], nbytes, fingerprint)
        if got:
            self.stats.add("hits", got, tier="remote")

    def end_read(self, client: ClientState, lease: int) -> None:
        slots = client.leases.pop(lease, None)
        if slots is None:
            raise UnknownLeaseError(f"lease {lease} is not held by this client")
        for slot in slots:
            self.dram.release(slot)

    def _acquire(self, key: bytes, nbytes: int, fingerprint: int) -> tuple[Slot | None, str]:
        try:
            slot, tier = acquire_for_load(self.dram, self.ssd, key, nbytes, fingerprint, on_promoted=lambda n: (
                self.stats.add("bytes", n, tier="ssd", dst="dram")))
            if tier == "ssd" and self.cluster is not None:
                self.cluster.admitted([key])
            return slot, tier
        except PoolFullError:  # DRAM is all pinned: a miss, the engine recomputes
            self.stats.add("dropped", tier="promotion")
            return None, ""

    # ---- writes ------------------------------------------------------------------------------
    def begin_write(self, client: ClientState, nbytes: int, fingerprint: int, keys: list[bytes],
                    depths: list[int] | None = None) -> Slots:
        self._check_nbytes(nbytes)
        n = len(keys)
        offsets, gens = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        states = np.full(n, SlotState.PRESENT, dtype=np.uint8)
        for i, key in enumerate(keys):
            if key in client.reservations or (self.ssd is not None and self.ssd.contains(key)):
                continue
            try:
                slot = self.dram.reserve(key, nbytes, fingerprint, depths[i] if depths else 0)
            except PoolFullError:
                states[i] = SlotState.FULL
                self.stats.add("dropped", tier="dram")
                continue
            if slot is None:
                continue
            client.reservations[key] = slot
            offsets[i] = self.dram.offset(slot)
            gens[i] = self.file.generation(int(offsets[i]))
            states[i] = SlotState.RESERVED
        return Slots(offsets, gens, states)

    def commit(self, client: ClientState, keys: list[bytes]) -> None:
        slots = self._reserved(client, keys)
        for slot in slots:
            del client.reservations[slot.key]
            self.dram.commit(slot)
        self.stats.add("bytes", sum(s.nbytes for s in slots), tier="engine", dst="dram")
        self.stats.add("commits", len(slots))
        if self.writeback is not None and slots:
            self.writeback.enqueue([s.key for s in slots])
        if self.cluster is not None and slots:
            self.cluster.admitted([s.key for s in slots])

    def abort(self, client: ClientState, keys: list[bytes]) -> None:
        for slot in self._reserved(client, keys):
            del client.reservations[slot.key]
            self.dram.abort(slot)
        self.stats.add("aborts", len(keys))

    def _reserved(self, client: ClientState, keys: list[bytes]) -> list[Slot]:
        """The client's reserved slots for keys; raises (changing nothing) unless every key is
        reserved by this client, once."""
        if len(set(keys)) != len(keys):
            raise InvalidArgumentError("a key appears twice in one COMMIT/ABORT")
        missing = [k for k in keys if k not in client.reservations]
        if missing:
            raise UnknownKeyError(f"{len(missing)} of {len(keys)} keys are not reserved by this client "
                                  f"(first: {missing[0].hex()})")
        return [client.reservations[k] for k in keys]

    def _check_nbytes(self, nbytes: int) -> None:
        if not 0 < nbytes <= self.dram.capacity_bytes:
            raise InvalidArgumentError(f"object size {nbytes} outside (0, {self.dram.capacity_bytes}] "
                                       f"(the DRAM pool capacity)")

    # ---- maintenance -------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        return self.writeback.flush(timeout_s) if self.writeback is not None else True

    def evict(self) -> int:
        return self.dram.evict_all()

    def status(self) -> dict:
        with self._lock:
            clients = [{"id": c.client_id, "pid": c.pid, "name": c.name, "leases": len(c.leases),
                        "reservations": len(c.reservations), "requests": c.requests,
                        "connected_s": round(time.time() - c.connected_at, 1)} for c in self._clients.values()]
        counters = self.stats.snapshot()
        hits = counters.get("hits.dram", 0) + counters.get("hits.ssd", 0)
        asked = hits + counters.get("misses", 0)
        return {
            "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1),
            "instance_id": self.file.instance_id,
            "dram": {"objects": len(self.dram), "used_bytes": self.dram.used_bytes(),
                     "allocated_bytes": self.dram.allocated_bytes, "capacity_bytes": self.dram.capacity_bytes},
            "ssd": None if self.ssd is None else {"objects": len(self.ssd), "file_bytes": self.ssd.file_bytes(),
                                                  "capacity_bytes": self.ssd.capacity_bytes,
                                                  "path": str(self.ssd.path)},
            "clients": clients, "hit_rate": (hits / asked) if asked else None, "counters": counters,
            "cluster": None if self.cluster is None else self.cluster.status(),
        }

    def close(self, timeout_s: float = 30.0) -> None:
        """Leaves the cluster, drains write-back, then closes the SSD index (LMDB syncs on close)."""
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.writeback is not None:
            self.writeback.close(timeout_s)
            self.writeback = None
        if self.ssd is not None:
            self.ssd.close()
            self.ssd = None
