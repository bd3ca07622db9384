"""AgentStore: Store's public surface (lookup / save / load / begin_load / begin_save / flush /
evict / stats / close) served by the node agent. `Store(agent=...)` returns one.

The socket carries only descriptors; this process moves the bytes itself, with the same movers
as the embedded store, between the engine's cache and the agent's shared pool:
- save: BEGIN_WRITE reserves slots -> gather into them -> COMMIT (ABORT on a failed gather).
- load: BEGIN_READ pins the present objects under a lease -> scatter -> generation check ->
  END_READ. A slot whose generation word changed during the copy was reused (the lease was
  reclaimed, e.g. after a timeout): that chunk and those after it count as not loaded.
An agent that is down or does not answer within agent_timeout_ms degrades to recomputation:
lookup finds nothing, load loads nothing, save stores nothing (failed_keys); the next call
reconnects. stats() / flush() / evict() raise AgentUnavailableError instead.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import metrics, movers
from .agent import protocol as P
from .agent_client import AgentClient, PoolRef, parse_address
from .config import Config
from .errors import InvalidArgumentError, StoreClosedError
from .handles import Handle, LoadResult, SaveResult, completed
from .keys import check_keys
from .layout import KVLayout

log = logging.getLogger(__name__)


@dataclass(eq=False)
class AgentSlot:
    """A slot of the agent's pool as this process sees it (what the movers and sessions need)."""
    key: bytes
    nbytes: int
    offset: int
    generation: int
    ptr: int


class AgentStore:
    def __init__(self, config: Config | None = None, *, config_file: str | None = None, **overrides):
        self.config = config if config is not None else Config.load(config_file, **overrides)
        if self.config.agent is None:
            raise InvalidArgumentError("AgentStore needs config.agent ('auto', 'auto:///path' or 'unix:///path')")
        path, auto = parse_address(self.config.agent)
        self.client = AgentClient(path, timeout_s=self.config.agent_timeout_ms / 1000, auto_start=auto,
                                  agent_config=self.config)
        self.stats_counters = metrics.StoreStats()
        self._jobs = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-agent-job")
        self._closed = False
        self._close_lock = threading.Lock()
        self._last_warning = 0.0
        self._session_pools: dict[int, PoolRef] = {}  # id(first slot) -> pool mapped for a SaveSession
        # Agents are long-lived: one started by an older kvstore answers LOOKUP_WRITING and the
        # depths of BEGIN_WRITE as malformed. Then this store stops using them (plain lookups
        # and LRU eviction there) instead of failing every lookup or save.
        self._agent_has_lookup_writing = True
        self._agent_has_write_depths = True
        self._probed_connection = self.client.reconnects
        if auto:  # join (or start) the node's agent now: engines share one cache from the first step
            try:
                self.client.request(P.Op.STATUS)
            except P.AgentUnavailableError as e:
                self._degraded("connect", e)

    # ---- queries -----------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the leading run of keys present in the agent's DRAM or SSD (pins nothing)."""
        return self._lookup(keys, writing=False)[0]

    def lookup_writing(self, keys: Sequence[bytes]) -> tuple[int, bool]:
        """Store.lookup_writing over the agent (LOOKUP_WRITING; an older agent: never writing)."""
        self._reprobe_after_reconnect()
        return self._lookup(keys, writing=self._agent_has_lookup_writing)

    def _lookup(self, keys: Sequence[bytes], writing: bool) -> tuple[int, bool]:
        self._check_open()
        keys = check_keys(keys)
        if not keys:
            return 0, False
        start = time.perf_counter()
        op = P.Op.LOOKUP_WRITING if writing else P.Op.LOOKUP
        n, stops_at_writing = 0, False
        try:
            while n < len(keys):
                part = keys[n:n + P.MAX_KEYS]
                try:
                    reply = self.client.request(op, P.encode_keys(part))
                except P.ProtocolError:
                    if op != P.Op.LOOKUP_WRITING:
                        raise
                    self._agent_has_lookup_writing, op = False, P.Op.LOOKUP
                    log.warning("kvstore: the agent does not know LOOKUP_WRITING (older version): plain lookups")
                    continue
                states = np.frombuffer(reply, dtype=np.uint8)
                if len(states) != len(part):
                    raise P.ProtocolError(f"LOOKUP answered {len(states)} of {len(part)} keys")
                stops = np.flatnonzero((states == 0) | (states == 4))
                if len(stops):
                    n += int(stops[0])
                    stops_at_writing = bool(states[stops[0]] == 4)
                    break
                n += len(part)
        except P.AgentUnavailableError as e:
            self._degraded("lookup", e)
            return 0, False
        metrics.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return n, stops_at_writing

    # ---- save --------------------------------------------------------------------------------
    def save(self, keys: Sequence[bytes], layout: KVLayout, block_ids) -> Handle[SaveResult]:
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=False)
        if not keys:
            return completed(SaveResult(0, 0))
        return Handle(self._jobs.submit(self._save, keys, layout, ids, bpc))

    def _save(self, keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int) -> SaveResult:
        nbytes = layout.chunk_nbytes(self.config.chunk_tokens)
        stored = skipped = 0
        failed: list[bytes] = []
        for i in range(0, len(keys), P.MAX_KEYS):
            part = keys[i:i + P.MAX_KEYS]
            pool = self._acquire_pool()
            try:
                slots, s, f = self._reserve(pool, part, nbytes, layout.fingerprint)
                skipped, failed = skipped + s, failed + f
                if not slots:
                    continue
                chunk_ids = np.concatenate([ids[(i + c) * bpc:(i + c + 1) * bpc] for c, _ in slots])
                try:
                    movers.gather(layout, chunk_ids, [s.ptr for _, s in slots], bpc)
                except BaseException:
                    self._abort([s for _, s in slots])
                    raise
                if self._commit([s for _, s in slots]):
                    stored += len(slots)
                else:
                    failed += [s.key for _, s in slots]
            finally:
                self._release_pool(pool)
        self.stats_counters.add("bytes", stored * nbytes, tier="engine", dst="agent")
        return SaveResult(stored, skipped, failed)

    def reserve_for_save(self, keys: list[bytes], nbytes: int, fingerprint: int, depths=None
                         ) -> tuple[list[tuple[int, AgentSlot]], int, list[bytes]]:
        """Slots for the keys not stored yet: ([(index in keys, slot)], skipped, failed); the
        pool stays mapped until commit_saved / abort (the session contract of Store). depths:
        as in Store.begin_save, sent with BEGIN_WRITE."""
        pool = self._acquire_pool()
        slots, skipped, failed = self._reserve(pool, keys, nbytes, fingerprint, depths)
        if not slots:
            self._release_pool(pool)
        else:
            self._session_pools[id(slots[0][1])] = pool
        return slots, skipped, failed

    def _reserve(self, pool: PoolRef | None, keys: list[bytes], nbytes: int, fingerprint: int, depths=None
                 ) -> tuple[list[tuple[int, AgentSlot]], int, list[bytes]]:
        if pool is None:
            return [], 0, list(keys)
        try:
            self._reprobe_after_reconnect()
            plain = P.encode_sized_keys(nbytes, fingerprint, keys)
            request = plain
            if depths is not None and self._agent_has_write_depths:
                request = P.encode_write(nbytes, fingerprint, keys, depths)
                if len(request) > P.PRE_DEPTHS_MAX_BODY_NBYTES:  # an older agent would drop the connection
                    request = plain
            try:
                body = self.client.request(P.Op.BEGIN_WRITE, request)
            except P.ProtocolError:
                if request is plain:
                    raise
                self._agent_has_write_depths = False
                log.warning("kvstore: the agent does not take chunk depths (older version): saving without")
                body = self.client.request(P.Op.BEGIN_WRITE, plain)
            reply = P.Slots.decode(body)
        except P.AgentUnavailableError as e:
            self._degraded("save", e)
            return [], 0, list(keys)
        if len(reply.states) != len(keys):
            raise P.ProtocolError(f"BEGIN_WRITE answered {len(reply.states)} of {len(keys)} keys")
        base = pool.pool.data_ptr
        slots = [(i, AgentSlot(keys[i], nbytes, int(reply.offsets[i]), int(reply.generations[i]),
                               base + int(reply.offsets[i])))
                 for i in np.flatnonzero(reply.states == P.SlotState.RESERVED)]
        failed = [keys[i] for i in np.flatnonzero(reply.states == P.SlotState.FULL)]
        skipped = int(np.count_nonzero(reply.states == P.SlotState.PRESENT))
        if failed:
            self.stats_counters.add("dropped", len(failed), tier="agent")
        return slots, skipped, failed

    def commit_saved(self, slots: list[AgentSlot]) -> None:
        """Publishes gathered slots (the agent queues write-back). Raises AgentUnavailableError
        when the agent lost them (it died or restarted): nothing was stored."""
        if not slots:
            return
        try:
            committed = self._commit(slots)
        finally:
            self._release_session_pool(slots)
        if not committed:
            raise P.AgentUnavailableError(f"the agent dropped {len(slots)} reserved objects before their commit")

    def _commit(self, slots: list[AgentSlot]) -> bool:
        try:
            self.client.request(P.Op.COMMIT, P.encode_keys([s.key for s in slots]))
            return True
        except (P.AgentUnavailableError, P.UnknownKeyError) as e:  # the agent dropped our reservations
            self._degraded("commit", e)
            return False

    def _abort(self, slots: list[AgentSlot]) -> None:
        try:
            self.client.request(P.Op.ABORT, P.encode_keys([s.key for s in slots]))
        except P.AgentUnavailableError:
            pass  # reservations die with the connection

    # ---- load --------------------------------------------------------------------------------
    def load(self, keys: Sequence[bytes], layout: KVLayout, block_ids) -> Handle[LoadResult]:
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=True)
        if not keys:
            return completed(LoadResult(0, 0))
        return Handle(self._jobs.submit(self._load, keys, layout, ids, bpc))

    def _load(self, keys: list[bytes], layout: KVLayout, ids: np.ndarray, bpc: int) -> LoadResult:
        nbytes = layout.chunk_nbytes(self.config.chunk_tokens)
        loaded = 0
        hits = {"dram": 0, "ssd": 0}
        for i in range(0, len(keys), P.MAX_KEYS):
            part = keys[i:i + P.MAX_KEYS]
            pool = self._acquire_pool()
            try:
                lease = self._begin_read(pool, part, nbytes, layout.fingerprint)
                if lease is None:
                    break
                run = next((c for c, s in enumerate(lease.slots) if s is None), len(part))
                try:
                    if run:
                        movers.scatter(layout, ids[(i * bpc):(i + run) * bpc],
                                       [s.ptr for s in lease.slots[:run]], bpc)
                    good = lease.valid_prefix(run)
                finally:
                    self._end_read(lease)
            finally:
                self._release_pool(pool)
            loaded += good
            for tier in lease.tiers[:good]:
                hits[tier] += 1
            if good < len(part):
                break
        self.record_load(hits, len(keys), loaded, nbytes)
        return LoadResult(loaded, len(keys), {t: n for t, n in hits.items() if n})

    def _begin_read(self, pool: PoolRef | None, keys: list[bytes], nbytes: int, fingerprint: int) -> "_Lease | None":
        if pool is None:
            return None
        try:
            body = self.client.request(P.Op.BEGIN_READ, P.encode_sized_keys(nbytes, fingerprint, keys))
        except P.AgentUnavailableError as e:
            self._degraded("load", e)
            return None
        lease_id = P.decode_u64(body[:8])
        reply = P.Slots.decode(body, 8)
        if len(reply.states) != len(keys):
            raise P.ProtocolError(f"BEGIN_READ answered {len(reply.states)} of {len(keys)} keys")
        base = pool.pool.data_ptr
        slots = [AgentSlot(keys[i], nbytes, int(reply.offsets[i]), int(reply.generations[i]),
                           base + int(reply.offsets[i])) if reply.states[i] != P.SlotState.MISS else None
                 for i in range(len(keys))]
        tiers = ["dram" if st == P.SlotState.HIT_DRAM else "ssd" for st in reply.states]
        return _Lease(lease_id, slots, tiers, pool)

    def _end_read(self, lease: "_Lease") -> None:
        if lease.lease_id == 0:
            return
        try:
            self.client.request(P.Op.END_READ, P.encode_u64(lease.lease_id))
        except (P.AgentUnavailableError, P.UnknownLeaseError):
            pass  # the agent released it with our connection

    # ---- raw objects (SGLang's host pages) --------------------------------------------------
    def write_objects(self, keys: Sequence[bytes], nbytes: int, fingerprint: int, fill) -> list[bool]:
        """Store.write_objects through the agent's pool."""
        from .keys import check_keys
        from .object_io import write_objects

        def abort(slots: list[AgentSlot]) -> None:
            self._abort(slots)
            self._release_session_pool(slots)

        return write_objects(self, check_keys(keys), nbytes, fingerprint, fill, abort)

    def read_objects(self, keys: Sequence[bytes], nbytes: int, fingerprint: int, drain) -> int:
        """Store.read_objects from one BEGIN_READ lease; a slot reused during its copy ends the run."""
        from .keys import check_keys
        from .object_io import read_leading_run
        keys = check_keys(keys)
        view = _LeasedView(self, keys, nbytes, fingerprint)
        try:
            loaded, hits = read_leading_run(view, keys, nbytes, fingerprint, drain)
        finally:
            view._finish()
        self.record_load(hits, len(keys), loaded, nbytes)
        return loaded

    # ---- layer-wise sessions (the vLLM connector) ---------------------------------------------
    def begin_load(self, keys: Sequence[bytes], layout: KVLayout, block_ids, layer_events=None, after_events=(),
                   prefetch=None):
        """Store.begin_load over the agent: one BEGIN_READ for the batch, then LoadSession. No
        prefetch: its slots would be pinned outside the batch's lease."""
        if prefetch is not None:
            raise InvalidArgumentError("AgentStore.begin_load takes no prefetch")
        from .sessions import LoadSession
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=True)
        view = _LeasedView(self, keys, layout.chunk_nbytes(self.config.chunk_tokens), layout.fingerprint)
        return LoadSession(view, keys, layout, ids, bpc, layer_events, after_events)

    def begin_save(self, keys: Sequence[bytes], layout: KVLayout, block_ids, depths=None):
        """Store.begin_save over the agent: SaveSession with slots reserved in the agent (the
        chunks' depths go with BEGIN_WRITE)."""
        from .sessions import SaveSession
        keys, ids, bpc = self._validate(keys, layout, block_ids, allow_skip=False)
        return SaveSession(_SaveView(self), keys, layout, ids, bpc, depths)

    def record_load(self, hits: dict[str, int], requested: int, loaded: int, nbytes: int) -> None:
        from .store import Store
        Store.record_load(self, hits, requested, loaded, nbytes)  # same counters, no copy

    # ---- maintenance -------------------------------------------------------------------------
    def preallocate(self, layout: KVLayout) -> int:
        """The agent owns the memory (and this process registered the mapping once): nothing to do."""
        return 0

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Waits until the agent's write-back has put every committed object on SSD."""
        self._check_open()
        timeout_ms = int(timeout_s * 1000)
        saved, self.client.timeout_s = self.client.timeout_s, max(self.client.timeout_s, timeout_s + 1)
        try:
            return self.client.request(P.Op.FLUSH, timeout_ms.to_bytes(4, "little")) == b"\x01"
        finally:
            self.client.timeout_s = saved

    def evict(self, tier: str = "dram") -> int:
        self._check_open()
        if tier != "dram":
            raise InvalidArgumentError(f"evict: unknown tier {tier!r} (only 'dram')")
        return P.decode_u64(self.client.request(P.Op.EVICT))

    def agent_status(self) -> dict:
        return self.client.status()

    def stats(self) -> dict:
        status = self.agent_status()
        return {"dram": status["dram"], "ssd": status["ssd"], "agent": status,
                "counters": self.stats_counters.snapshot()}

    def close(self, timeout_s: float = 60.0) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> "AgentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------
    def _reprobe_after_reconnect(self) -> None:
        """A new connection may be to a restarted (newer) agent: try its newer requests again."""
        if self.client.reconnects != self._probed_connection:
            self._probed_connection = self.client.reconnects
            self._agent_has_lookup_writing = self._agent_has_write_depths = True

    def _release_session_pool(self, slots: list[AgentSlot]) -> None:
        pool = self._session_pools.pop(id(slots[0]), None) if slots else None
        if pool is not None:
            self._release_pool(pool)

    def _acquire_pool(self) -> PoolRef | None:
        """The mapped pool, connecting first if needed; None (degraded) when no agent answers."""
        try:
            if not self.client.connected:
                self.client.request(P.Op.STATUS)
            return self.client.acquire_pool()
        except P.AgentUnavailableError as e:
            self._degraded("connect", e)
            return None

    def _release_pool(self, pool: PoolRef | None) -> None:
        if pool is not None:
            self.client.release_pool(pool)

    def _degraded(self, what: str, error: Exception) -> None:
        self.stats_counters.add("agent_errors")
        now = time.monotonic()
        if now - self._last_warning > 5.0:
            self._last_warning = now
            log.warning("kvstore agent unavailable during %s (recomputing instead): %s", what, error)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("store is closed")

    def _validate(self, keys, layout, block_ids, *, allow_skip: bool):
        from .store import Store
        return Store._validate(self, keys, layout, block_ids, allow_skip=allow_skip)  # same rules, no copy


class _Lease:
    def __init__(self, lease_id: int, slots: list[AgentSlot | None], tiers: list[str], pool: PoolRef):
        self.lease_id, self.slots, self.tiers, self.pool = lease_id, slots, tiers, pool

    def valid_prefix(self, n: int) -> int:
        """How many of the first n slots still hold what BEGIN_READ pinned (generation check)."""
        for c in range(n):
            s = self.slots[c]
            if self.pool.pool.generation(s.offset) != s.generation:
                return c
        return n


class _LeasedView:
    """What LoadSession needs from a store, answered from one BEGIN_READ of the whole batch."""

    def __init__(self, store: AgentStore, keys: list[bytes], nbytes: int, fingerprint: int):
        self._store = store
        self.config = store.config
        self.dram = self
        self._pool = store._acquire_pool()
        self._lease = store._begin_read(self._pool, keys, nbytes, fingerprint) if keys else None
        self._next: dict[bytes, list[tuple[AgentSlot, str]]] = {}
        if self._lease is not None:
            for s, tier in zip(self._lease.slots, self._lease.tiers):
                if s is not None:
                    self._next.setdefault(s.key, []).append((s, tier))
        self._held = sum(len(v) for v in self._next.values())
        if not self._held:
            self._finish()

    def acquire_for_load(self, key: bytes, nbytes: int, fingerprint: int):
        queue = self._next.get(key)
        if not queue:
            return None, ""
        return queue.pop(0)

    def record_load(self, hits, requested, loaded, nbytes) -> None:
        self._store.record_load(hits, requested, loaded, nbytes)

    def release(self, slot: AgentSlot) -> bool:
        """The reader is done with slot; the lease ends with the last one. False if the slot was
        reused while it was read (its bytes may be wrong)."""
        valid = self._lease is None or self._lease.pool.pool.generation(slot.offset) == slot.generation
        if not valid:
            self._store.stats_counters.add("reused_during_read")
            log.warning("agent slot of key %s was reused during a read: its chunk may be wrong", slot.key.hex())
        self._held -= 1
        if self._held == 0:
            self._finish()
        return valid

    def _finish(self) -> None:
        unused = [s for q in self._next.values() for s in q]
        self._next = {}
        if unused:  # LoadSession never asked for them (duplicate keys): count them released
            self._held -= len(unused)
        if self._lease is not None:
            self._store._end_read(self._lease)
            self._lease = None
        if self._pool is not None:
            self._store._release_pool(self._pool)
            self._pool = None


class _SaveView:
    """What SaveSession needs from a store: reserve / commit / abort through the agent."""

    def __init__(self, store: AgentStore):
        self._store = store
        self.config = store.config
        self.dram = self

    def reserve_for_save(self, keys, nbytes, fingerprint, depths=None):
        return self._store.reserve_for_save(keys, nbytes, fingerprint, depths)

    def commit_saved(self, slots: list[AgentSlot]) -> None:
        self._store.commit_saved(slots)

    def abort(self, slot: AgentSlot) -> None:
        self._store._abort([slot])
        self._store._release_session_pool([slot])
