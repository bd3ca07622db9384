"""PinnedPool: the DRAM tier (G2). A slab pool of fixed-size slots, one size class per object
size (no first-fit free lists), page-locked for DMA when CUDA is present.

Contract:
- reserve(key) -> a WRITING slot only its writer touches; commit() makes it visible, abort()
  frees it. Readers never see a partial object.
- acquire(key) pins a COMMITTED slot (refcount) until release(); eviction never takes a slot
  that is being written or has readers.
- Memory grows lazily a slab at a time up to the capacity cap; at the cap the least recently
  used evictable object of the size class goes (clean objects, already on SSD, first), and as a
  last resort a whole idle slab of another size class is released.
All methods are thread-safe (one lock; no I/O or copies under it).
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._native import C
from .errors import InvalidArgumentError, PoolFullError

PAGE = 4096


def align_up(n: int, a: int = PAGE) -> int:
    return (n + a - 1) // a * a


@dataclass(eq=False)
class Slot:
    key: bytes
    nbytes: int          # payload bytes
    view: np.ndarray     # uint8 view of the whole slot (slot_nbytes >= nbytes, 4 KiB multiple)
    slab: "_Slab"
    index: int
    fingerprint: int = 0
    committed: bool = False
    persisted: bool = False  # a copy is durable in the SSD tier
    readers: int = 0
    depth: int = 0           # chunk index in its token sequence (0: first chunk, or not known)

    @property
    def ptr(self) -> int:
        return self.view.ctypes.data

    @property
    def payload(self) -> np.ndarray:
        return self.view[:self.nbytes]


@dataclass(eq=False)
class _Slab:
    memory: np.ndarray
    slot_nbytes: int
    free: list[int] = field(default_factory=list)

    @property
    def num_slots(self) -> int:
        return len(self.memory) // self.slot_nbytes


class PinnedPool:
    def __init__(self, capacity_bytes: int, slab_bytes: int, pin: bool = True,
                 on_evict: Callable[[Slot], None] | None = None):
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self.pin = pin
        self._on_evict = on_evict or (lambda slot: None)
        self._lock = threading.Lock()
        self._slabs: dict[int, list[_Slab]] = {}             # slot_nbytes -> slabs
        self._entries: dict[bytes, Slot] = {}                # writing and committed
        self._lru: dict[int, OrderedDict[bytes, Slot]] = {}  # slot_nbytes -> committed, LRU first
        self._used_bytes = 0  # slot bytes of _entries, kept as they come and go (read on hot paths)
        self.allocated_bytes = 0
        self.pinned = False

    # ---- writers -----------------------------------------------------------------------------
    def reserve(self, key: bytes, nbytes: int, fingerprint: int = 0, depth: int = 0) -> Slot | None:
        """A writable slot for key, or None if key is already present or being written. depth:
        the chunk's index in its token sequence (eviction keeps prefixes, see _evict_one).
        Raises PoolFullError when nothing can be freed."""
        if nbytes <= 0:
            raise InvalidArgumentError(f"object size must be > 0, got {nbytes}")
        slot_nbytes = align_up(nbytes)
        if slot_nbytes > self.capacity_bytes:
            raise PoolFullError(f"object of {nbytes} bytes exceeds the DRAM tier capacity {self.capacity_bytes}")
        with self._lock:
            if key in self._entries:
                return None
            slab, index = self._take_free_slot(slot_nbytes)
            offset = index * slot_nbytes
            slot = Slot(key, nbytes, slab.memory[offset:offset + slot_nbytes], slab, index, fingerprint, depth=depth)
            self._entries[key] = slot
            self._used_bytes += slot_nbytes
            return slot

    def commit(self, slot: Slot, *, persisted: bool = False) -> None:
        with self._lock:
            assert self._entries.get(slot.key) is slot and not slot.committed, "commit of a slot not reserved"
            slot.committed = True
            slot.persisted = persisted
            self._lru.setdefault(slot.slab.slot_nbytes, OrderedDict())[slot.key] = slot

    def abort(self, slot: Slot) -> None:
        with self._lock:
            assert self._entries.get(slot.key) is slot and not slot.committed, "abort of a slot not reserved"
            del self._entries[slot.key]
            self._used_bytes -= slot.slab.slot_nbytes
            slot.slab.free.append(slot.index)

    # ---- readers -----------------------------------------------------------------------------
    def acquire(self, key: bytes) -> Slot | None:
        """Pins a committed object for reading, or None on a miss."""
        with self._lock:
            slot = self._entries.get(key)
            if slot is None or not slot.committed:
                return None
            slot.readers += 1
            self._lru[slot.slab.slot_nbytes].move_to_end(key)
            return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            assert slot.readers > 0, "release without acquire"
            slot.readers -= 1

    def contains(self, key: bytes) -> bool:
        slot = self._entries.get(key)
        return slot is not None and slot.committed

    def is_writing(self, key: bytes) -> bool:
        slot = self._entries.get(key)
        return slot is not None and not slot.committed

    def mark_persisted(self, key: bytes) -> None:
        with self._lock:
            slot = self._entries.get(key)
            if slot is not None:
                slot.persisted = True

    def preallocate(self, nbytes: int) -> int:
        """Allocates (and pins) slabs for objects of nbytes up to the capacity cap now, so that
        no save pays for page-locking later (~0.4 s/GiB). Returns the bytes allocated."""
        slot_nbytes = align_up(nbytes)
        before = self.allocated_bytes
        with self._lock:
            self._slabs.setdefault(slot_nbytes, [])
            while self._grow(slot_nbytes):
                pass
        return self.allocated_bytes - before

    # ---- eviction ----------------------------------------------------------------------------
    def evict_all(self) -> int:
        """Drops every committed object that has no readers; returns how many."""
        with self._lock:
            victims = [s for lru in self._lru.values() for s in lru.values() if s.readers == 0]
            for slot in victims:
                self._evict(slot)
        for slot in victims:
            self._on_evict(slot)
        return len(victims)

    def _evict(self, slot: Slot) -> None:
        del self._lru[slot.slab.slot_nbytes][slot.key]
        del self._entries[slot.key]
        self._used_bytes -= slot.slab.slot_nbytes
        slot.slab.free.append(slot.index)

    def _take_free_slot(self, slot_nbytes: int) -> tuple[_Slab, int]:
        slabs = self._slabs.setdefault(slot_nbytes, [])
        for slab in slabs:
            if slab.free:
                return slab, slab.free.pop()
        if self._grow(slot_nbytes) or self._evict_one(slot_nbytes) or (
                self._release_idle_slab(slot_nbytes) and self._grow(slot_nbytes)):
            return self._take_free_slot(slot_nbytes)
        raise PoolFullError(f"DRAM tier full: {self.allocated_bytes} of {self.capacity_bytes} bytes allocated and "
                            f"every {slot_nbytes}-byte slot is being written or read")

    def _grow(self, slot_nbytes: int) -> bool:
        room = self.capacity_bytes - self.allocated_bytes
        num_slots = min(max(1, self.slab_bytes // slot_nbytes), room // slot_nbytes)
        if num_slots < 1:
            return False
        memory, pinned = C.host_alloc(num_slots * slot_nbytes, self.pin)
        self.pinned = self.pinned or pinned
        self._slabs[slot_nbytes].append(_Slab(memory, slot_nbytes, list(range(num_slots - 1, -1, -1))))
        self.allocated_bytes += num_slots * slot_nbytes
        return True

    def _evict_one(self, slot_nbytes: int) -> bool:
        """Evicts one idle object: the least recently used one with a copy on SSD (nothing is
        lost), else the deepest chunk among the least recently used quarter, the oldest of equal
        depth. Keys are chained, so a chunk is worth loading only while every chunk before it is
        stored: evicting tails before heads leaves more sequences a usable prefix. Under a
        working set larger than DRAM (many sessions taking turns) plain LRU drops a session's
        whole history before it returns; this keeps most sessions' first chunks instead."""
        lru = self._lru.get(slot_nbytes, {})
        victim = next((s for s in lru.values() if s.readers == 0 and s.persisted), None)
        if victim is None:
            oldest = itertools.islice((s for s in lru.values() if s.readers == 0), max(1, len(lru) // 4))
            victim = max(oldest, key=lambda s: s.depth, default=None)  # max() keeps the first of equals
        if victim is None:
            return False
        self._evict(victim)
        self._on_evict(victim)
        return True

    def _release_idle_slab(self, wanted_nbytes: int) -> bool:
        """Frees one slab of another size class whose slots are all free or evictable."""
        for slot_nbytes, slabs in self._slabs.items():
            if slot_nbytes == wanted_nbytes:
                continue
            for slab in slabs:
                held = [s for s in self._entries.values() if s.slab is slab]
                if any(not s.committed or s.readers for s in held):
                    continue
                for s in held:
                    self._evict(s)
                    self._on_evict(s)
                slabs.remove(slab)
                self.allocated_bytes -= len(slab.memory)
                return True
        return False

    # ---- introspection -----------------------------------------------------------------------
    def oldest_unsaved(self, limit: int) -> list[bytes]:
        """Up to `limit` keys of committed objects with no copy elsewhere yet (not persisted) and
        no readers, least recently used first: what an eviction would lose first."""
        with self._lock:
            lrus = list(self._lru.values())
            out: list[bytes] = []
            for lru in lrus:
                out += [k for k, s in lru.items() if not s.persisted and s.readers == 0][:limit]
            return out[:limit]

    def headroom_bytes(self) -> int:
        """Bytes a writer can get without losing an object: everything not in use (never
        allocated or a free slot) plus committed unread objects with a copy elsewhere (persisted)."""
        with self._lock:
            clean = sum(s.slab.slot_nbytes for lru in self._lru.values() for s in lru.values()
                        if s.persisted and s.readers == 0)
            return self.capacity_bytes - self._used_bytes + clean

    def used_bytes(self) -> int:
        return self._used_bytes

    def __len__(self) -> int:
        with self._lock:
            return sum(len(lru) for lru in self._lru.values())
