"""The remote tier's push (spill) protocol on loopback, one process: TcpTransport.push into a
TcpServer whose source takes objects into real pinned-pool slots. Stored bit-exact when the
checksum matches; a key the receiver holds already counts as stored without its bytes; a wrong
checksum and a wrong token store nothing and leave no reserved slot behind."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore._native import C
from kvstore.pinned_pool import PinnedPool
from kvstore.remote_transport import TcpServer, TcpTransport

NBYTES = (1 << 20) + 4096 + 17  # odd: not a multiple of the 1 MiB hash piece


class PoolSource:
    """Takes pushed objects into a PinnedPool, as the agent's ClusterLink does."""

    def __init__(self, capacity_objects: int):
        self.pool = PinnedPool(capacity_objects * (NBYTES + 8192), 64 << 20, pin=False)
        self.committed = []

    def acquire_remote(self, key, nbytes, fingerprint):
        return None

    def release_remote(self, slot):
        pass

    def checksum_of(self, slot):
        return 0

    def holds(self, key):
        return self.pool.contains(key)

    def reserve_incoming(self, key, nbytes, fingerprint):
        return self.pool.reserve(key, nbytes, fingerprint)

    def commit_incoming(self, slot, checksum):
        self.pool.commit(slot)
        self.committed.append(slot.key)

    def abort_incoming(self, slot):
        self.pool.abort(slot)


def payloads(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, NBYTES, dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def receiver():
    source = PoolSource(capacity_objects=6)
    server = TcpServer(source, "127.0.0.1", 0, token="t0k").start()
    yield source, server
    server.stop()


def test_push_stores_bit_exact_and_refuses_what_it_cannot_take(receiver):
    source, server = receiver
    keys = [bytes([i]) * 16 for i in range(1, 6)]
    data = payloads(5, 1)
    sums = [C.checksum(d, NBYTES) for d in data]
    sums[3] ^= 1  # this one arrives with the wrong checksum: not stored
    t = TcpTransport(token="t0k")
    try:
        assert t.push(server.address, keys, NBYTES, 9, data, sums) == [True, True, True, False, True]
        for k, d in zip(keys, data):
            slot = source.pool.acquire(k)
            if k == keys[3]:
                assert slot is None
                continue
            assert np.array_equal(slot.payload, d) and slot.fingerprint == 9
            source.pool.release(slot)
        # already held there (and one new): a success without sending its bytes again
        more = payloads(1, 2)
        assert t.push(server.address, [keys[0], b"n" * 16], NBYTES, 9, [data[0], more[0]],
                      [sums[0], C.checksum(more[0], NBYTES)]) == [True, True]
    finally:
        t.close()
    assert source.committed == keys[:3] + keys[4:] + [b"n" * 16]
    assert len(source.pool._entries) == 5  # nothing left reserved


def test_push_with_a_wrong_token_stores_nothing(receiver):
    source, server = receiver
    data = payloads(1, 3)
    t = TcpTransport(token="wrong")
    try:
        assert t.push(server.address, [b"k" * 16], NBYTES, 0, data, [C.checksum(data[0], NBYTES)]) == [False]
        assert t.stats.failures == 1
    finally:
        t.close()
    assert source.committed == [] and len(source.pool._entries) == 0


def test_headroom_counts_free_and_clean_bytes_and_oldest_unsaved_is_lru_first():
    pool = PinnedPool(4 * 8192, 4 * 8192, pin=False)
    slots = [pool.reserve(bytes([i]) * 16, 8000) for i in range(4)]
    for s in slots:
        pool.commit(s)
    assert pool.headroom_bytes() == 0
    r = pool.acquire(slots[0].key)  # read: most recently used, and pinned
    assert pool.oldest_unsaved(10) == [s.key for s in slots[1:]]
    pool.mark_persisted(slots[1].key)
    assert pool.oldest_unsaved(10) == [slots[2].key, slots[3].key]
    assert pool.headroom_bytes() == 8192
    pool.release(r)
    assert pool.oldest_unsaved(1) == [slots[2].key]
    # used_bytes is a running count: it agrees with the entries through reserve, abort and evict
    spare = pool.reserve(b"x" * 16, 8000)  # evicts the persisted object to make room
    assert pool.used_bytes() == sum(e.slab.slot_nbytes for e in pool._entries.values()) == 4 * 8192
    pool.abort(spare)
    assert pool.used_bytes() == sum(e.slab.slot_nbytes for e in pool._entries.values()) == 3 * 8192
    assert pool.evict_all() == 3 and pool.used_bytes() == 0
