import numpy as np
import pytest

from kvstore import InvalidArgumentError, PoolFullError
from kvstore.pinned_pool import PinnedPool

KiB = 1024


def key(i):
    return i.to_bytes(16, "little")


def fill(pool, i, nbytes=8 * KiB, persisted=False):
    slot = pool.reserve(key(i), nbytes)
    slot.payload[:] = i % 251
    pool.commit(slot, persisted=persisted)
    return slot


def test_slots_are_page_aligned_and_sized():
    pool = PinnedPool(capacity_bytes=64 * KiB, slab_bytes=32 * KiB, pin=False)
    slot = pool.reserve(key(1), 5000)
    assert slot.ptr % 4096 == 0 and len(slot.view) == 8 * KiB and len(slot.payload) == 5000
    pool.abort(slot)
    assert not pool.contains(key(1))


def test_writing_slot_is_invisible_until_commit():
    pool = PinnedPool(64 * KiB, 32 * KiB, pin=False)
    slot = pool.reserve(key(1), 4 * KiB)
    assert not pool.contains(key(1)) and pool.acquire(key(1)) is None
    assert pool.reserve(key(1), 4 * KiB) is None  # a second writer of the same key backs off
    pool.commit(slot)
    assert pool.contains(key(1))


def test_grows_lazily_up_to_the_cap():
    pool = PinnedPool(capacity_bytes=32 * KiB, slab_bytes=16 * KiB, pin=False)
    assert pool.allocated_bytes == 0
    fill(pool, 0)
    assert pool.allocated_bytes == 16 * KiB
    for i in range(1, 4):
        fill(pool, i)
    assert pool.allocated_bytes == 32 * KiB and len(pool) == 4


def test_lru_eviction_never_takes_readers_or_writers():
    pool = PinnedPool(capacity_bytes=32 * KiB, slab_bytes=32 * KiB, pin=False)
    held = [fill(pool, i) for i in range(3)]
    writing = pool.reserve(key(3), 8 * KiB)       # pool full: 3 committed + 1 writing
    reader = pool.acquire(key(0))                 # key 0 is the LRU but has a reader
    assert reader is held[0]
    fill(pool, 10)                                # evicts key 1 (LRU among idle)
    assert pool.contains(key(0)) and not pool.contains(key(1)) and pool.contains(key(2))
    fill(pool, 11)                                # evicts key 2
    assert not pool.contains(key(2))
    with pytest.raises(PoolFullError, match="being written or read"):
        pool.reserve(key(12), 8 * KiB) and pool.reserve(key(13), 8 * KiB) and pool.reserve(key(14), 8 * KiB)
    assert pool.contains(key(0))
    pool.release(reader)
    pool.commit(writing)


def test_clean_objects_are_evicted_before_dirty_ones():
    pool = PinnedPool(capacity_bytes=24 * KiB, slab_bytes=24 * KiB, pin=False)
    fill(pool, 0)                   # dirty, LRU
    fill(pool, 1, persisted=True)   # clean
    fill(pool, 2)
    fill(pool, 3)
    assert pool.contains(key(0)) and not pool.contains(key(1))


def test_acquire_refreshes_lru():
    pool = PinnedPool(capacity_bytes=16 * KiB, slab_bytes=16 * KiB, pin=False)
    fill(pool, 0)
    fill(pool, 1)
    pool.release(pool.acquire(key(0)))
    fill(pool, 2)
    assert pool.contains(key(0)) and not pool.contains(key(1))


def test_idle_slab_of_another_size_is_released():
    pool = PinnedPool(capacity_bytes=32 * KiB, slab_bytes=32 * KiB, pin=False)
    for i in range(4):
        fill(pool, i, nbytes=8 * KiB)
    slot = pool.reserve(key(9), 16 * KiB)      # needs the 8 KiB class's idle slab
    assert slot is not None and len(pool) == 0
    pool.commit(slot)


def test_bad_sizes_are_rejected():
    pool = PinnedPool(capacity_bytes=16 * KiB, slab_bytes=16 * KiB, pin=False)
    with pytest.raises(InvalidArgumentError):
        pool.reserve(key(0), 0)
    with pytest.raises(PoolFullError, match="exceeds"):
        pool.reserve(key(0), 17 * KiB)
    assert len(pool) == 0 and pool.allocated_bytes == 0


def test_evict_all_keeps_pinned():
    pool = PinnedPool(capacity_bytes=32 * KiB, slab_bytes=32 * KiB, pin=False)
    for i in range(3):
        fill(pool, i)
    r = pool.acquire(key(1))
    assert pool.evict_all() == 2
    assert pool.contains(key(1)) and np.all(r.payload == 1)
    pool.release(r)


def test_preallocate_fills_the_cap_once():
    pool = PinnedPool(capacity_bytes=40 * KiB, slab_bytes=16 * KiB, pin=False)
    assert pool.preallocate(8 * KiB) == 40 * KiB
    assert pool.preallocate(8 * KiB) == 0
    for i in range(5):
        fill(pool, i)
    assert pool.allocated_bytes == 40 * KiB and len(pool) == 5


def test_eviction_takes_the_deepest_chunk_among_the_oldest_quarter():
    """Chained keys: a chunk is useful only with every chunk before it, so among the least recently
    used quarter of the idle objects the deepest goes first (the oldest of equal depth); newer
    objects are not looked at, objects being read are skipped."""
    pool = PinnedPool(capacity_bytes=8 * 8 * KiB, slab_bytes=64 * KiB, pin=False)
    for i, depth in enumerate([0, 3, 1, 3, 9, 9, 9, 9]):  # LRU order
        pool.commit(pool.reserve(key(i), 8 * KiB, depth=depth))
    fill(pool, 100)                     # quarter: keys 0 (depth 0), 1 (3) -> key 1
    assert not pool.contains(key(1)) and pool.contains(key(0))
    reader = pool.acquire(key(2))       # being read (and now the most recent)
    fill(pool, 101)                     # quarter of the idle: keys 0 (0), 3 (3) -> key 3
    assert not pool.contains(key(3)) and pool.contains(key(2))
    pool.release(reader)
    fill(pool, 102)                     # keys 0 (0), 4 (9) -> key 4; the oldest, key 0, stays
    assert not pool.contains(key(4)) and pool.contains(key(0)) and len(pool) == 8
