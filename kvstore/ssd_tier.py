"""SsdTier: the local SSD tier (G3). One preallocated slab file per object size class, read and
written with O_DIRECT by the native io pool; an LMDB index key -> IndexEntry.

Invariants:
- An object is indexed only after its bytes are durable (pwrite, fdatasync, then the LMDB
  commit), and a slot is unindexed (committed) before it is overwritten: a crash at any point
  leaves no index entry whose bytes are wrong.
- Every read verifies the checksum (and size and layout fingerprint): a mismatch is a miss, a
  counted metric, and the entry is dropped.
- Reopening the directory in a new process finds every committed object. One process owns a
  directory at a time (an flock on LOCK); a second open raises TierIOError.
Thread-safe: one lock for the index and slot maps; I/O runs outside it, with slots pinned by a
reader count so eviction never reuses a slot under a read.
"""
from __future__ import annotations

import fcntl
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import lmdb
import numpy as np

from ._native import C
from .errors import InvalidArgumentError, TierIOError
from .pinned_pool import align_up

_ENTRY = struct.Struct("<QQQQQQ")  # slot_nbytes, slot, nbytes, checksum, generation, fingerprint
_FORMAT_VERSION = b"kvstore-ssd-1"


@dataclass(frozen=True)
class IndexEntry:
    slot_nbytes: int
    slot: int
    nbytes: int
    checksum: int
    generation: int
    fingerprint: int

    def pack(self) -> bytes:
        return _ENTRY.pack(self.slot_nbytes, self.slot, self.nbytes, self.checksum, self.generation, self.fingerprint)

    @classmethod
    def unpack(cls, raw: bytes) -> "IndexEntry":
        return cls(*_ENTRY.unpack(raw))


class _SlabFile:
    """One size class: a growing, preallocated file of equal slots."""

    def __init__(self, path: Path, slot_nbytes: int, direct: bool):
        self.slot_nbytes = slot_nbytes
        self.file = C.DirectFile(str(path), direct)
        self.num_slots = self.file.size // slot_nbytes
        self.free: list[int] = []
        self.lru: OrderedDict[bytes, IndexEntry] = OrderedDict()
        self.readers: dict[int, int] = {}   # slot -> active reads
        self.writing: set[int] = set()

    def offset(self, slot: int) -> int:
        return slot * self.slot_nbytes


class SsdTier:
    def __init__(self, path: str | os.PathLike, capacity_bytes: int, slab_bytes: int, direct_io: bool = True,
                 on_event: Callable[[str, int], None] | None = None):
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self.direct_io = direct_io
        self._event = on_event or (lambda name, n: None)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TierIOError(f"SSD tier directory {self.path} is not usable: {e}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise TierIOError(f"SSD tier directory {self.path} is in use by another process") from None
        try:
            self._env = lmdb.open(str(self.path / "index"), map_size=4 << 30, max_dbs=2, subdir=True)
            self._objects = self._env.open_db(b"objects")
            self._meta = self._env.open_db(b"meta")
        except lmdb.Error as e:
            self._unlock()
            raise TierIOError(f"cannot open the SSD index in {self.path}: {e}") from None
        self._lock = threading.Lock()
        self._files: dict[int, _SlabFile] = {}
        self._where: dict[bytes, _SlabFile] = {}
        self._generation = 0
        self._closed = False
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # ---- start-up ----------------------------------------------------------------------------
    def _recover(self) -> None:
        """Rebuilds slot maps from the index; entries whose slot lies past the end of its file
        (a truncated file) are dropped."""
        with self._env.begin(write=True) as txn:
            version = txn.get(b"format", db=self._meta)
            if version is None:
                txn.put(b"format", _FORMAT_VERSION, db=self._meta)
            elif version != _FORMAT_VERSION:
                raise TierIOError(f"{self.path} holds SSD format {version!r}, this build reads {_FORMAT_VERSION!r}")
            raw_gen = txn.get(b"generation", db=self._meta)
            self._generation = struct.unpack("<Q", raw_gen)[0] if raw_gen else 0
            entries = [(bytes(k), IndexEntry.unpack(bytes(v))) for k, v in txn.cursor(db=self._objects)]
            dropped = 0
            for key, entry in sorted(entries, key=lambda kv: kv[1].generation):
                f = self._file_for(entry.slot_nbytes)
                if len(key) != 16 or entry.slot >= f.num_slots or entry.nbytes > entry.slot_nbytes:
                    txn.delete(key, db=self._objects)
                    dropped += 1
                    continue
                f.lru[key] = entry
                self._where[key] = f
        for f in self._files.values():
            used = {e.slot for e in f.lru.values()}
            f.free = [s for s in range(f.num_slots - 1, -1, -1) if s not in used]
        if dropped:
            self._event("corrupt", dropped)

    def _file_for(self, slot_nbytes: int) -> _SlabFile:
        f = self._files.get(slot_nbytes)
        if f is None:
            try:
                f = _SlabFile(self.path / f"slab-{slot_nbytes}.dat", slot_nbytes, self.direct_io)
            except TierIOError:
                raise
            self._files[slot_nbytes] = f
        return f

    # ---- queries -----------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def file_bytes(self) -> int:
        with self._lock:
            return sum(f.num_slots * f.slot_nbytes for f in self._files.values())

    # ---- writes ------------------------------------------------------------------------------
    def write_many(self, items: Iterable[tuple[bytes, np.ndarray, int, int]]) -> list[bool]:
        """Stores (key, buffer, nbytes, fingerprint) objects durably: all bytes, one fdatasync per
        file, then one index transaction. Returns per item whether it is stored (False: no room,
        or already present)."""
        planned: list[tuple[bytes, _SlabFile, int, np.ndarray, int, int]] = []
        results: list[bool] = []
        evicted: list[bytes] = []
        with self._lock:
            self._check_open()
            for key, buf, nbytes, fingerprint in items:
                if key in self._where or any(p[0] == key for p in planned):
                    results.append(False)
                    continue
                slot_nbytes = align_up(nbytes)
                if len(buf) < slot_nbytes:
                    raise InvalidArgumentError(f"buffer of {len(buf)} bytes is smaller than the slot ({slot_nbytes})")
                f = self._file_for(slot_nbytes)
                slot = self._take_slot(f, evicted)
                results.append(slot is not None)
                if slot is not None:
                    f.writing.add(slot)
                    planned.append((key, f, slot, buf, nbytes, fingerprint))
        if evicted:  # unindex before the slots are overwritten
            with self._env.begin(write=True) as txn:
                for key in evicted:
                    txn.delete(key, db=self._objects)
            self._event("evictions", len(evicted))
        if not planned:
            return results
        committed: list[tuple[bytes, _SlabFile, IndexEntry]] = []
        try:
            checksums = [f.file.write(f.offset(slot), buf, nbytes) for key, f, slot, buf, nbytes, _ in planned]
            for f in {p[1] for p in planned}:
                f.file.sync()
            with self._lock:
                gen0 = self._generation
                self._generation += len(planned)
            with self._env.begin(write=True) as txn:
                for i, ((key, f, slot, _, nbytes, fingerprint), checksum) in enumerate(zip(planned, checksums)):
                    entry = IndexEntry(f.slot_nbytes, slot, nbytes, checksum, gen0 + i + 1, fingerprint)
                    txn.put(key, entry.pack(), db=self._objects)
                    committed.append((key, f, entry))
                txn.put(b"generation", struct.pack("<Q", self._generation), db=self._meta)
        except BaseException:
            with self._lock:
                for key, f, slot, *_ in planned:
                    f.writing.discard(slot)
                    f.free.append(slot)
            raise
        with self._lock:
            for key, f, entry in committed:
                f.writing.discard(entry.slot)
                f.lru[key] = entry
                self._where[key] = f
        return results

    def _take_slot(self, f: _SlabFile, evicted: list[bytes]) -> int | None:
        if f.free:
            return f.free.pop()
        room = self.capacity_bytes - sum(x.num_slots * x.slot_nbytes for x in self._files.values())
        grow = min(max(1, self.slab_bytes // f.slot_nbytes), room // f.slot_nbytes)
        if grow >= 1:
            f.file.reserve((f.num_slots + grow) * f.slot_nbytes)
            f.free.extend(range(f.num_slots + grow - 1, f.num_slots - 1, -1))
            f.num_slots += grow
            return f.free.pop()
        for key, entry in f.lru.items():  # least recently used first
            if not f.readers.get(entry.slot):
                del f.lru[key]
                del self._where[key]
                evicted.append(key)
                return entry.slot
        return None

    # ---- reads -------------------------------------------------------------------------------
    def read(self, key: bytes, out: np.ndarray, fingerprint: int | None = None) -> IndexEntry | None:
        """Reads key's object into out (>= its 4 KiB-aligned size). None on a miss, including a
        checksum, size or fingerprint mismatch (then the entry is dropped and counted)."""
        with self._lock:
            self._check_open()
            f = self._where.get(key)
            if f is None:
                return None
            entry = f.lru[key]
            f.lru.move_to_end(key)
            f.readers[entry.slot] = f.readers.get(entry.slot, 0) + 1
        try:
            if fingerprint is not None and entry.fingerprint != fingerprint:
                return None
            if len(out) < entry.slot_nbytes:
                raise InvalidArgumentError(f"read buffer of {len(out)} bytes is smaller than the object slot "
                                           f"({entry.slot_nbytes})")
            try:
                checksum = f.file.read(f.offset(entry.slot), out, entry.nbytes)
            except TierIOError:
                checksum = None
            if checksum != entry.checksum:
                self._drop(key, entry)
                self._event("corrupt", 1)
                return None
            return entry
        finally:
            with self._lock:
                f.readers[entry.slot] -= 1
                if not f.readers[entry.slot]:
                    del f.readers[entry.slot]

    def _drop(self, key: bytes, entry: IndexEntry) -> None:
        with self._lock:
            f = self._where.get(key)
            if f is None or f.lru.get(key) != entry:
                return
            del f.lru[key]
            del self._where[key]
        with self._env.begin(write=True) as txn:
            txn.delete(key, db=self._objects)
        with self._lock:
            f.free.append(entry.slot)

    def entry(self, key: bytes) -> IndexEntry | None:
        with self._lock:
            f = self._where.get(key)
            return None if f is None else f.lru[key]

    def delete(self, key: bytes) -> bool:
        entry = self.entry(key)
        if entry is None:
            return False
        self._drop(key, entry)
        return True

    # ---- lifecycle ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TierIOError(f"SSD tier {self.path} is closed")

    def _unlock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._files.clear()
        self._env.close()
        self._unlock()
