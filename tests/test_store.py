"""Embedded Store: save / lookup / load through DRAM and SSD, bad input, promotion, small DRAM."""
import threading

import numpy as np
import pytest

import kvstore
from kvstore import InvalidArgumentError, LayoutError, Store, StoreClosedError, chunk_keys, namespace

from kv_caches import vllm, sglang, snapshot, expected_object

MiB = 1 << 20


def make_store(tmp_path, **kw):
    opts = dict(chunk_tokens=8, ssd_path=str(tmp_path / "ssd"), dram_capacity_bytes="8MiB",
                dram_slab_bytes="1MiB", ssd_capacity_bytes="64MiB", ssd_slab_bytes="4MiB", cpu_threads=2)
    opts.update(kw)
    return Store(**opts)


def setup_request(rng, cache, chunks, chunk_tokens=8):
    bpc = chunk_tokens // cache.layout.block_size
    tokens = rng.integers(0, 50_000, size=chunks * chunk_tokens + 3)  # a trailing partial chunk
    keys = chunk_keys(tokens, namespace(model="t"), chunk_tokens)
    ids = rng.permutation(cache.layout.num_blocks)[:chunks * bpc]
    return keys, ids


def poison(cache):
    for b in cache.buffers:
        b.view(np.uint8)[...] = 0xC3


def assert_blocks_restored(cache, before, ids):
    current = snapshot(cache)
    for b, src in zip(cache.buffers, before):
        b[...] = src
    want = expected_object(cache, ids)
    for b, cur in zip(cache.buffers, current):
        b[...] = cur
    assert np.array_equal(expected_object(cache, ids), want)


@pytest.mark.parametrize("maker", [lambda r: vllm(r, "LBNHC", B=24), lambda r: vllm(r, "BHLNC", B=24),
                                   lambda r: sglang(r, pages=24)])
def test_save_evict_reload_from_ssd_then_dram(tmp_path, rng, maker):
    cache = maker(rng)
    keys, ids = setup_request(rng, cache, chunks=4)
    with make_store(tmp_path) as store:
        assert store.lookup(keys) == 0
        r = store.save(keys, cache.layout, ids).wait(timeout_s=30)
        assert (r.stored, r.skipped) == (4, 0)
        assert store.lookup(keys) == 4
        assert store.flush(30)
        assert store.evict("dram") == 4
        before = snapshot(cache)
        for expect_tier in ("ssd", "dram"):
            poison(cache)
            result = store.load(keys, cache.layout, ids).wait(timeout_s=30)
            assert result.complete and result.hits_by_tier == {expect_tier: 4}
            assert_blocks_restored(cache, before, ids)
        again = store.save(keys, cache.layout, ids).wait(timeout_s=30)
        assert (again.stored, again.skipped) == (0, 4)
        counters = store.stats()["counters"]
        assert counters["hits.ssd"] == 4 and counters["hits.dram"] == 4


def test_lookup_is_the_leading_run_and_load_stops_at_a_gap(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=40)
    keys, ids = setup_request(rng, cache, chunks=5)
    bpc = 2
    with make_store(tmp_path, ssd_path=None) as store:
        store.save(keys[:2], cache.layout, ids[:2 * bpc]).wait()
        store.save(keys[3:], cache.layout, ids[3 * bpc:]).wait()
        assert store.lookup(keys) == 2
        assert store.lookup(keys[3:]) == 2
        result = store.load(keys, cache.layout, ids).wait()
        assert (result.loaded_chunks, result.requested_chunks, result.complete) == (2, 5, False)


def test_bad_input_raises_and_changes_nothing(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=24)
    keys, ids = setup_request(rng, cache, chunks=2)
    with make_store(tmp_path) as store:
        with pytest.raises(InvalidArgumentError, match="16 bytes"):
            store.save([b"short"] + keys[1:], cache.layout, ids)
        with pytest.raises(InvalidArgumentError, match="need 4 block ids"):
            store.save(keys, cache.layout, ids[:3])
        bad = ids.copy()
        bad[2] = cache.layout.num_blocks
        with pytest.raises(InvalidArgumentError, match="out of range"):
            store.save(keys, cache.layout, bad)
        with pytest.raises(InvalidArgumentError, match="KVLayout"):
            store.load(keys, "not a layout", ids)
        with pytest.raises(LayoutError, match="multiple of block_size"):
            Store(chunk_tokens=6, ssd_path=None).save(keys, cache.layout, ids)
        assert store.lookup(keys) == 0 and len(store.dram) == 0
    with pytest.raises(StoreClosedError):
        store.lookup(keys)


def test_different_layout_fingerprint_is_a_miss(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=24)
    other = vllm(rng, "LBNHC", B=24, dtype=np.uint8, D=16)  # same bytes per block, other format
    keys, ids = setup_request(rng, cache, chunks=2)
    with make_store(tmp_path) as store:
        store.save(keys, cache.layout, ids).wait()
        before = snapshot(other)
        assert store.load(keys, other.layout, ids).wait().loaded_chunks == 0
        for a, b in zip(before, other.buffers):
            assert np.array_equal(a, b)


def test_load_larger_than_dram_streams_through_it(tmp_path, rng):
    # 6 chunks of 256 KiB each through a 1 MiB DRAM tier: loads must scatter in batches.
    cache = vllm(rng, "LBNHC", L=4, B=64, H=2, N=8, D=128, dtype=np.uint16)
    keys, ids = setup_request(rng, cache, chunks=6, chunk_tokens=64)
    assert cache.layout.chunk_nbytes(64) == 256 * 1024
    with make_store(tmp_path, chunk_tokens=64, dram_capacity_bytes="1MiB", dram_slab_bytes="1MiB") as store:
        for i in range(6):  # one at a time: DRAM holds 4, write-back keeps everything on SSD
            store.save(keys[i:i + 1], cache.layout, ids[i * 8:(i + 1) * 8]).wait()
            assert store.flush(30)
        assert store.lookup(keys) == 6
        before = snapshot(cache)
        poison(cache)
        result = store.load(keys, cache.layout, ids).wait(timeout_s=60)
        assert result.complete, result
        assert_blocks_restored(cache, before, ids)


def test_concurrent_saves_and_loads_from_threads(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=64)
    keys, ids = setup_request(rng, cache, chunks=16)
    errors = []
    with make_store(tmp_path) as store:
        def worker(part):
            try:
                sl = slice(part * 4, part * 4 + 4)
                store.save(keys[sl], cache.layout, ids[part * 8:part * 8 + 8]).wait()
                assert store.load(keys[sl], cache.layout, ids[part * 8:part * 8 + 8]).wait().complete
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(p,)) for p in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and store.lookup(keys) == 16


def test_reopened_store_serves_ssd_objects(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=24)
    keys, ids = setup_request(rng, cache, chunks=3)
    with make_store(tmp_path) as store:
        store.save(keys, cache.layout, ids).wait()
    before = snapshot(cache)
    poison(cache)
    with make_store(tmp_path) as store:  # DRAM starts empty; SSD survives
        assert len(store.dram) == 0 and store.lookup(keys) == 3
        assert store.load(keys, cache.layout, ids).wait().hits_by_tier == {"ssd": 3}
        assert_blocks_restored(cache, before, ids)


def test_handle_wait_timeout_is_typed():
    import concurrent.futures
    from kvstore.handles import Handle
    with pytest.raises(kvstore.KVTimeoutError):
        Handle(concurrent.futures.Future()).wait(timeout_s=0.01)


def test_unknown_tier_to_evict(tmp_path):
    with make_store(tmp_path) as store, pytest.raises(InvalidArgumentError, match="unknown tier"):
        store.evict("hbm")


def test_full_dram_reports_failed_keys_and_stores_the_rest(tmp_path, rng):
    cache = vllm(rng, "LBNHC", L=4, B=64, H=2, N=8, D=128)
    keys, ids = setup_request(rng, cache, chunks=6, chunk_tokens=64)   # 256 KiB chunks
    with make_store(tmp_path, ssd_path=None, chunk_tokens=64, dram_capacity_bytes="512KiB",
                    dram_slab_bytes="512KiB") as store:
        store.save(keys[:2], cache.layout, ids[:16]).wait()
        readers = [store.dram.acquire(k) for k in keys[:2]]          # both slots busy
        result = store.save(keys[2:4], cache.layout, ids[16:32]).wait()
        assert (result.stored, result.failed_keys) == (0, keys[2:4])
        assert store.stats()["counters"]["dropped.dram"] == 2
        for r in readers:
            store.dram.release(r)
        assert store.save(keys[2:4], cache.layout, ids[16:32]).wait().stored == 2


def test_metrics_are_exported(tmp_path, rng):
    from prometheus_client import REGISTRY, generate_latest
    cache = vllm(rng, "LBNHC", B=24)
    keys, ids = setup_request(rng, cache, chunks=2)
    before = REGISTRY.get_sample_value("kvstore_hits_total", {"tier": "dram"}) or 0
    with make_store(tmp_path) as store:
        store.save(keys, cache.layout, ids).wait()
        store.load(keys, cache.layout, ids).wait()
    assert REGISTRY.get_sample_value("kvstore_hits_total", {"tier": "dram"}) == before + 2
    text = generate_latest().decode()
    assert "kvstore_transfer_seconds_bucket" in text and "kvstore_bytes_total" in text


def test_load_skips_blocks_marked_minus_one_and_save_rejects_them(tmp_path, rng):
    cache = vllm(rng, "LBNHC", B=24)
    keys, ids = setup_request(rng, cache, chunks=2)
    with make_store(tmp_path) as store:
        skipping = ids.copy()
        skipping[0] = -1
        with pytest.raises(InvalidArgumentError, match="out of range"):
            store.save(keys, cache.layout, skipping)
        store.save(keys, cache.layout, ids).wait()
        before = snapshot(cache)
        poison(cache)
        assert store.load(keys, cache.layout, skipping).wait().complete
        for l in range(cache.num_layers):
            for p in range(cache.num_planes):
                assert (cache.planes(l, p)[ids[0]].view(np.uint8) == 0xC3).all()
        assert_blocks_restored(cache, before, ids[1:])  # the other blocks came back


def test_lookup_writing_reports_a_prefix_still_being_saved(tmp_path, rng):
    """A save whose slots are reserved but not yet published: lookup counts only what is
    published and lookup_writing says the run stops at a key being written (an engine asks again
    rather than recompute); once committed the run goes on, once aborted it is a plain miss. A
    session's commit before its gathers are enqueued is refused."""
    cache = vllm(rng, "LBNHC", B=40)
    keys, ids = setup_request(rng, cache, chunks=4)
    with make_store(tmp_path, ssd_path=None) as store:
        store.save(keys[:1], cache.layout, ids[:2]).wait()
        session = store.begin_save(keys, cache.layout, ids)
        assert session.stored == 3
        with pytest.raises(InvalidArgumentError):
            session.commit()
        assert store.lookup(keys) == 1 and store.lookup_writing(keys) == (1, True)
        session.enqueue_rest()
        assert session.commit() == 3
        assert store.lookup_writing(keys) == (4, False)
        before = snapshot(cache)
        poison(cache)
        assert store.load(keys, cache.layout, ids).wait(10).complete
        assert_blocks_restored(cache, before, ids)

        more, more_ids = setup_request(rng, cache, chunks=2)
        aborted = store.begin_save(more, cache.layout, more_ids)
        assert store.lookup_writing(more) == (0, True)
        aborted.abort()
        assert store.lookup_writing(more) == (0, False)
