"""ClusterLink: the agent's side of the cluster (DESIGN.md §4): membership and delta reports to the
master, and the remote DRAM tier (serving peers, fetching from them).

Reports. Admits (a client COMMIT, an SSD promotion, a remote fetch) and DRAM evictions are queued
by AgentCore without blocking; the link's thread drains the queue every report_interval_s into
batched DeltaBatch streams (never one RPC per object). An admit's checksum is computed here, off
the request path, with the object pinned. When the master asks for a resync (its epoch changed:
it restarted; or it declared this node dead) or a report fails, the link registers again and
sends its full inventory (DRAM objects + SSD index) with reset = true, then the queued deltas.
SSD write-backs are not reported one by one: the SSD tier appears in the inventory of each
(re)sync. A stale index entry is harmless: its fetch is a miss (checksum or absence).

Remote fetch. On a local miss, fetch_run(keys) asks the master where the leading run of keys is
(Match, excluding this node), reserves local DRAM slots, fetches from the best candidate over
the Transport (many objects per request, pipelined), verifies each checksum against the master's
index, commits; if a source fails midway the rest is tried from the next candidate. Failures are
misses plus counters (remote_fetch_failures, remote_checksum_mismatches).

Spill. A node without an SSD tier loses an object when its DRAM evicts it. When such a node's
DRAM holds too few objects that could go without loss (free bytes + objects with a copy
elsewhere < SPILL_HEADROOM of capacity), the link pushes its least recently used unsaved objects
to nodes the master places them on (Place: free DRAM ratio first among live nodes), a batch per
round. A pushed object stays readable here but is clean: evictions take it first, and the
remote tier fetches it back from its new home. A receiving node refuses pushes that would take
its own DRAM above SPILL_ACCEPT_MAX, so spills never cascade.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time

from kvstore._native import C
from kvstore.errors import PoolFullError
from kvstore.master import kvstore_master_pb2 as pb
from kvstore.master.client import MasterClient, MasterError, delta_batches
from kvstore.remote_transport import TcpServer, TcpTransport

log = logging.getLogger(__name__)
DRAM, SSD = pb.DRAM, pb.SSD
REPORT_INTERVAL_S = 0.05
SPILL_HEADROOM = 0.2    # of DRAM capacity kept free or clean on a node without SSD
SPILL_BATCH = 64        # objects per spill round
SPILL_ACCEPT_MAX = 0.9  # a node takes pushed objects only while its DRAM stays below this use
SPILL_CHECK_S = 0.2     # how often the headroom is checked


class ClusterLink:
    def __init__(self, core, *, master: str, token: str | None, node_id: str | None, listen: str,
                 serve_delay_s: float = 0.0, timeout_s: float = 5.0):
        self.core = core
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.master = MasterClient(master, token=token, timeout_s=timeout_s)
        host, _, port = listen.rpartition(":")
        self.server = TcpServer(self, host or "127.0.0.1", int(port or 0), token=token, serve_delay_s=serve_delay_s)
        self.transport = TcpTransport(token=token)
        self._events: collections.deque = collections.deque()
        self._checksums: dict[bytes, int] = {}
        self._gen = 0
        self.epoch = 0
        self.heartbeat_s = 1.0
        self._last_heartbeat = 0.0
        self._synced = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvstore-agent-cluster", daemon=True)
        self.reports = 0
        self.resyncs = 0
        self.spilled = 0
        self._spill_backoff_until = 0.0

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> "ClusterLink":
        self.server.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)
        self.server.stop()
        self.transport.close()
        self.master.close()

    # ---- events (called by AgentCore; never block) ---------------------------------------------
    def admitted(self, keys) -> None:
        for key in keys:
            self._events.append(("a", key))

    def evicted(self, key: bytes) -> None:
        self._events.append(("e", key))

    # ---- the report loop -----------------------------------------------------------------------
    def _capacities(self) -> tuple[int, int, int]:
        dram = self.core.dram
        ssd = self.core.ssd
        return (dram.capacity_bytes, max(0, dram.capacity_bytes - dram.used_bytes()),
                0 if ssd is None else ssd.capacity_bytes)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._synced:
                    self._resync()
                self._flush_events()
                self._spill()
                if time.monotonic() - self._last_heartbeat >= self.heartbeat_s:
                    if self.master.heartbeat(self.node_id, self.epoch, self._capacities()):
                        log.info("master asked for a resync (restarted or lost this node)")
                        self._synced = False
                        continue
                    self._last_heartbeat = time.monotonic()
            except MasterError as e:
                if self._synced:
                    log.warning("master unreachable or refused a report, will resync: %s", e)
                self._synced = False
                self._stop.wait(min(1.0, self.heartbeat_s))
                continue
            except Exception:  # a bug must not kill the link
                log.exception("cluster link loop failed")
                self._synced = False
                self._stop.wait(1.0)
                continue
            self._wake.wait(REPORT_INTERVAL_S)
            self._wake.clear()

    def _resync(self) -> None:
        reply = self.master.register(self.node_id, self.address, self._capacities())
        self.epoch = reply.master_epoch
        self.heartbeat_s = max(0.05, reply.heartbeat_interval_ms / 1000)
        pending = len(self._events)  # events queued before the snapshot are re-applied after it
        admits = [r for r in (self._replica(k, DRAM) for k in self._dram_keys()) if r is not None]
        ssd = self.core.ssd
        if ssd is not None:
            for key in list(ssd._where):
                e = ssd.entry(key)
                if e is not None:
                    admits.append(pb.Replica(key=key, tier=SSD, nbytes=e.nbytes, checksum=e.checksum,
                                             generation=e.generation, fingerprint=e.fingerprint))
        self.master.report(delta_batches(self.node_id, self.epoch, admits, [], reset=True),
                           timeout_s=self.master.timeout_s + len(admits) / 50_000)
        self._synced = True
        self._last_heartbeat = time.monotonic()
        self.resyncs += 1
        log.info("registered with the master as %s (%s): %d objects reported, %d deltas pending", self.node_id,
                 self.address, len(admits), pending)

    def _dram_keys(self) -> list[bytes]:
        dram = self.core.dram
        with dram._lock:
            return [k for lru in dram._lru.values() for k in lru]

    def _replica(self, key: bytes, tier: int) -> pb.Replica | None:
        slot = self.core.dram.acquire(key)
        if slot is None:
            return None
        try:
            checksum = C.checksum(slot.payload, slot.nbytes)
            self._checksums[key] = checksum
            self._gen += 1
            return pb.Replica(key=key, tier=tier, nbytes=slot.nbytes, checksum=checksum, generation=self._gen,
                              fingerprint=slot.fingerprint)
        finally:
            self.core.dram.release(slot)

    def _flush_events(self) -> None:
        if not self._events:
            return
        events = []
        while self._events:
            events.append(self._events.popleft())
        admits, evicts = [], []
        for kind, key in events:
            if kind == "a":
                r = self._replica(key, DRAM)
                if r is not None:
                    admits.append(r)
            else:
                self._checksums.pop(key, None)
                evicts.append(pb.Eviction(key=key, tier=DRAM))
        try:
            self.master.report(delta_batches(self.node_id, self.epoch, admits, evicts))
        except MasterError:
            self._synced = False  # the full inventory replaces the lost deltas
            raise
        self.reports += 1

    # ---- spilling to other nodes -----------------------------------------------------------------
    def _spill(self) -> None:
        """One round: if this DRAM-only node is short of loss-free headroom, push a batch of its
        least recently used unsaved objects where the master places them."""
        dram = self.core.dram
        if self.core.ssd is not None or time.monotonic() < self._spill_backoff_until:
            return
        self._spill_backoff_until = time.monotonic() + SPILL_CHECK_S
        wanted = SPILL_HEADROOM * dram.capacity_bytes
        if dram.capacity_bytes - dram.used_bytes() >= wanted or dram.headroom_bytes() >= wanted:
            return  # the free bytes alone suffice (O(1)); else count the clean objects too
        slots = [s for s in (dram.acquire(k) for k in dram.oldest_unsaved(SPILL_BATCH)) if s is not None]
        try:
            by_size: dict[tuple[int, int], list] = {}
            for s in slots:
                by_size.setdefault((s.nbytes, s.fingerprint), []).append(s)
            for (nbytes, fingerprint), group in by_size.items():
                try:
                    targets = self.master.place(self.node_id, nbytes, len(group), exclude_writer=True)
                except MasterError as e:  # a spill can wait; the report loop handles the master's health
                    log.warning("spill: placement failed: %s", e)
                    targets = []
                if not targets:
                    self._spill_backoff_until = time.monotonic() + 1.0  # no node has room: retry later
                    log.info("spill: no live node has room for %d objects of %d bytes", len(group), nbytes)
                    continue
                for target in targets:
                    batch, group = group[:target.count], group[target.count:]
                    sums = [self.checksum_of(s) for s in batch]
                    stored = self.transport.push(target.address, [s.key for s in batch], nbytes, fingerprint,
                                                 [s.payload for s in batch], sums)
                    for s, ok in zip(batch, stored):
                        if ok:
                            dram.mark_persisted(s.key)  # a copy lives on target: evict this one first
                    n = sum(stored)
                    self.spilled += n
                    self.core.stats.add("spilled", n, tier="dram")
                    if n < len(batch):
                        self._spill_backoff_until = time.monotonic() + 1.0
        finally:
            for s in slots:
                dram.release(s)

    # ---- taking pushed objects (TcpServer) -----------------------------------------------------
    def holds(self, key: bytes) -> bool:
        return self.core.dram.contains(key) or (self.core.ssd is not None and self.core.ssd.contains(key))

    def reserve_incoming(self, key: bytes, nbytes: int, fingerprint: int):
        dram = self.core.dram
        if dram.used_bytes() + nbytes > SPILL_ACCEPT_MAX * dram.capacity_bytes:
            return None
        try:
            return dram.reserve(key, nbytes, fingerprint)  # None: present already
        except PoolFullError:
            return None

    def commit_incoming(self, slot, checksum: int) -> None:
        self.core.dram.commit(slot)
        self._checksums[slot.key] = checksum
        self.core.stats.add("bytes", slot.nbytes, tier="remote", dst="dram")
        self.core.stats.add("received_spills")
        if self.core.writeback is not None:
            self.core.writeback.enqueue([slot.key])
        self.admitted([slot.key])

    def abort_incoming(self, slot) -> None:
        self.core.dram.abort(slot)

    # ---- serving peers (ObjectSource for TcpServer) ----------------------------------------------
    def acquire_remote(self, key: bytes, nbytes: int, fingerprint: int):
        slot, _ = self.core._acquire(key, nbytes, fingerprint)
        return slot

    def release_remote(self, slot) -> None:
        self.core.dram.release(slot)

    def checksum_of(self, slot) -> int:
        cached = self._checksums.get(slot.key)
        return cached if cached is not None else C.checksum(slot.payload, slot.nbytes)

    # ---- fetching from peers ---------------------------------------------------------------------
    def locate(self, keys: list[bytes]) -> int:
        """Length of the leading run of keys some other live node holds (pins nothing)."""
        try:
            best = self.master.match(keys, exclude_node=self.node_id).best
        except MasterError as e:
            self.core.stats.add("remote_lookup_failures")
            log.warning("master lookup failed (a miss): %s", e)
            return 0
        return 0 if best is None else best.length

    def fetch_run(self, keys: list[bytes], nbytes: int, fingerprint: int) -> int:
        """Fetches the leading run of keys from other nodes into local DRAM (committed, verified).
        Returns how many of the leading keys are now local."""
        try:
            match = self.master.match(keys, exclude_node=self.node_id)
        except MasterError as e:
            self.core.stats.add("remote_lookup_failures")
            log.warning("master lookup failed (a miss): %s", e)
            return 0
        done = 0
        for cand in match.candidates:
            if cand.length <= done:
                continue
            if any(n != nbytes for n in cand.nbytes[done:cand.length]):
                continue  # another layout under those keys
            got = self._fetch_from(cand.address, keys[done:cand.length], nbytes, fingerprint,
                                   cand.checksums[done:cand.length])
            done += got
            if done >= cand.length and cand is match.candidates[0]:
                break
        return done

    def _fetch_from(self, address: str, keys: list[bytes], nbytes: int, fingerprint: int, expected: list[int]) -> int:
        dram = self.core.dram
        reserved: dict[int, object] = {}
        committed: list[bytes] = []
        run = [True] * len(keys)

        def reserve(i):
            try:
                slot = dram.reserve(keys[i], nbytes, fingerprint)
            except PoolFullError:
                slot = None
            if slot is None:
                run[i] = dram.contains(keys[i])  # someone saved or fetched it meanwhile
                return None
            reserved[i] = slot
            return slot.view

        def finish(i, ok):
            slot = reserved.pop(i)
            if ok:
                dram.commit(slot)
                committed.append(keys[i])
            else:
                dram.abort(slot)
                run[i] = False

        failures = self.transport.stats.failures
        mismatches = self.transport.stats.checksum_mismatches
        try:
            self.transport.fetch(address, keys, nbytes, fingerprint, reserve, finish, expected)
        finally:
            for slot in reserved.values():
                dram.abort(slot)
        self.core.stats.add("remote_fetch_failures", self.transport.stats.failures - failures)
        self.core.stats.add("remote_checksum_mismatches", self.transport.stats.checksum_mismatches - mismatches)
        if committed:
            self.core.stats.add("bytes", len(committed) * nbytes, tier="remote", dst="dram")
            self.admitted(committed)
        have = set(committed)
        n = 0
        for i, key in enumerate(keys):
            if not (key in have or (run[i] and dram.contains(key))):
                break
            n += 1
        return n

    def status(self) -> dict:
        return {"node_id": self.node_id, "address": self.address, "master": self.master.address,
                "synced": self._synced, "epoch": self.epoch, "reports": self.reports, "resyncs": self.resyncs,
                "served_objects": self.server.served_objects, "fetched_objects": self.transport.stats.objects,
                "spilled_objects": self.spilled}
