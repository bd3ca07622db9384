"""SharedPool: the agent's DRAM tier (G2) in one shared-memory file that client processes map.

The file (a memfd by default, or a file under /dev/shm or hugetlbfs) is laid out as
    [4 KiB header][generation words: u64 per 4 KiB page of data][data: capacity bytes]
and sized once at start-up; it is sparse, so memory is used only where slabs are carved. Slabs
are extents of the data region handed out first-fit (and returned when PinnedPool releases an
idle slab); within a slab everything is PinnedPool's: reserve -> commit/abort, refcounted
readers, an LRU that never evicts a slot being written or read.

Generations: the word of a slot's first page is bumped each time the slot is reserved, and the
words of a whole extent each time it is carved into a new slab. A client records the word with
the slot's offset when it begins a read and compares it after the copy: a different value means
the slot was reused meanwhile (its lease was reclaimed) and the copied bytes must not be used.
Only the agent writes the file's header and generation words; clients write only into slots
they reserved.
"""
from __future__ import annotations

import mmap
import os
import secrets
import struct

import numpy as np

from kvstore.pinned_pool import PAGE, PinnedPool, Slot, _Slab, align_up

HEADER_NBYTES = PAGE
_HEADER = struct.Struct("<8sQQQQ")  # magic, instance_id, gen_offset, data_offset, data_nbytes
SHM_MAGIC = b"KVSHM001"


class PoolFile:
    """The mapped shared-memory file, created by the agent or attached by a client."""

    def __init__(self, fd: int, file_nbytes: int, gen_offset: int, data_offset: int, data_nbytes: int,
                 instance_id: int, *, owner: bool):
        self.fd = fd
        self.file_nbytes = file_nbytes
        self.gen_offset = gen_offset
        self.data_offset = data_offset
        self.data_nbytes = data_nbytes
        self.instance_id = instance_id
        self._mm = mmap.mmap(fd, file_nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        whole = np.frombuffer(self._mm, dtype=np.uint8)
        self.generations = whole[gen_offset:data_offset].view(np.uint64)
        self.data = whole[data_offset:data_offset + data_nbytes]
        self.data_ptr = self.data.ctypes.data
        if owner:
            _HEADER.pack_into(self._mm, 0, SHM_MAGIC, instance_id, gen_offset, data_offset, data_nbytes)

    @classmethod
    def create(cls, capacity_bytes: int, path: str | None = None) -> "PoolFile":
        """A new pool file: a memfd when path is None, else the file at path (created, then
        unlinked so that nothing is left behind when the agent dies; clients get the fd)."""
        data_nbytes = align_up(capacity_bytes)
        gen_offset = HEADER_NBYTES
        data_offset = gen_offset + align_up((data_nbytes // PAGE) * 8)
        file_nbytes = data_offset + data_nbytes
        if path is None:
            fd = os.memfd_create("kvstore-agent-pool", os.MFD_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.unlink(path)
        try:
            os.ftruncate(fd, file_nbytes)
            return cls(fd, file_nbytes, gen_offset, data_offset, data_nbytes, secrets.randbits(63), owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, file_nbytes: int, gen_offset: int, data_offset: int, data_nbytes: int,
               instance_id: int) -> "PoolFile":
        """Maps a pool file received from the agent; checks that the header agrees."""
        if os.fstat(fd).st_size < file_nbytes:
            raise ValueError("pool file is smaller than the agent says")
        pool = cls(fd, file_nbytes, gen_offset, data_offset, data_nbytes, instance_id, owner=False)
        magic, iid, g, d, n = _HEADER.unpack_from(pool._mm, 0)
        if (magic, iid, g, d, n) != (SHM_MAGIC, instance_id, gen_offset, data_offset, data_nbytes):
            pool.close()
            raise ValueError("pool file header does not match the agent's description")
        return pool

    def generation(self, offset: int) -> int:
        return int(self.generations[offset // PAGE])

    def close(self) -> None:
        self.generations = self.data = None  # drop the exports before unmapping
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


class _Extents:
    """First-fit allocator of page-aligned extents of [0, size)."""

    def __init__(self, size: int):
        self._free: list[tuple[int, int]] = [(0, size)]  # (start, length), sorted, coalesced

    def take(self, nbytes: int) -> int | None:
        for i, (start, length) in enumerate(self._free):
            if length >= nbytes:
                if length == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (start + nbytes, length - nbytes)
                return start
        return None

    def give(self, start: int, nbytes: int) -> None:
        self._free.append((start, nbytes))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self._free = merged


class SharedPool(PinnedPool):
    """PinnedPool whose slabs are extents of a PoolFile; offsets are what clients see."""

    def __init__(self, pool_file: PoolFile, slab_bytes: int, on_evict=None):
        super().__init__(pool_file.data_nbytes, slab_bytes, pin=False, on_evict=on_evict)
        self.file = pool_file
        self._extents = _Extents(pool_file.data_nbytes)

    def offset(self, slot: Slot) -> int:
        return slot.ptr - self.file.data_ptr

    def reserve(self, key: bytes, nbytes: int, fingerprint: int = 0, depth: int = 0) -> Slot | None:
        slot = super().reserve(key, nbytes, fingerprint, depth)
        if slot is not None:
            self.file.generations[self.offset(slot) // PAGE] += 1
        return slot

    # PinnedPool calls these two under its lock.
    def _grow(self, slot_nbytes: int) -> bool:
        room = self.capacity_bytes - self.allocated_bytes
        num_slots = min(max(1, self.slab_bytes // slot_nbytes), room // slot_nbytes)
        if num_slots < 1:
            return False
        nbytes = num_slots * slot_nbytes
        start = self._extents.take(nbytes)
        if start is None:  # room in total, but fragmented across size classes
            return False
        self.file.generations[start // PAGE:(start + nbytes) // PAGE] += 1
        self._slabs[slot_nbytes].append(_Slab(self.file.data[start:start + nbytes], slot_nbytes,
                                              list(range(num_slots - 1, -1, -1))))
        self.allocated_bytes += nbytes
        return True

    def _release_idle_slab(self, wanted_nbytes: int) -> bool:
        before = {id(s): s for slabs in self._slabs.values() for s in slabs}
        if not super()._release_idle_slab(wanted_nbytes):
            return False
        after = {id(s) for slabs in self._slabs.values() for s in slabs}
        for key, slab in before.items():
            if key not in after:
                self._extents.give(slab.memory.ctypes.data - self.file.data_ptr, len(slab.memory))
        return True
