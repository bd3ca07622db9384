"""KVStoreHiCacheStorage against SGLang 0.5.23's real HiCacheStorageConfig, host pools (MHA in
every layout SGLang offers, MLA) and StorageBackendFactory. Random page bits, poisoned
destinations, bit-exact compares."""
import glob
import os
import threading

import pytest

from sglang_env import missing_reason

_reason = missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import torch  # noqa: E402
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from kvstore import ConfigError, InvalidArgumentError, LayoutError  # noqa: E402
from kvstore.connectors.sglang import KVStoreHiCacheStorage  # noqa: E402
from sglang_pools import (DYNAMIC, MHA_LAYOUTS, MLA_LAYOUTS, PAGE, bits, fill_random, firsts, hashes,  # noqa: E402
                          host_pool, page_bits, poison, storage_config)

POOLS = [("mha", layout) for layout in MHA_LAYOUTS] + [("mla", layout) for layout in MLA_LAYOUTS]


def make_backend(store_config, pool=None, **fields):
    extra = {**DYNAMIC, "store": store_config, **fields.pop("extra", {})}
    backend = KVStoreHiCacheStorage(storage_config(extra, **fields))
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


@pytest.mark.parametrize("kind,layout", POOLS)
def test_v1_round_trip_is_bit_exact_in_every_layout(store_config, kind, layout):
    pool = host_pool(kind, layout)
    backend = make_backend(store_config, pool, mla=kind == "mla")
    src = pool.alloc(5 * PAGE)
    fill_random(pool, seed=len(layout))
    expected = [page_bits(pool, p) for p in firsts(src)]
    keys = hashes(5, layout)
    assert backend.batch_exists(keys) == 0
    assert backend.batch_set_v1(keys, src) == [True] * 5
    assert backend.batch_exists(keys) == 5

    dst = pool.alloc(5 * PAGE)
    poison(pool, firsts(dst))
    untouched = bits(pool.kv_buffer)
    assert backend.batch_get_v1(keys, dst) == [True] * 5
    for p, want in zip(firsts(dst), expected):
        assert torch.equal(page_bits(pool, p), want)
    # Nothing outside the destination pages changed.
    for p in firsts(dst):
        pool.set_from_flat_data_page(p, torch.full_like(pool.get_data_page(p), -7.0))
    assert torch.equal(bits(pool.kv_buffer), untouched)


@pytest.mark.parametrize("kind,layout", POOLS)
def test_stored_object_is_the_flat_page_so_fallbacks_share_objects(store_config, kind, layout):
    pool = host_pool(kind, layout)
    backend = make_backend(store_config, pool, mla=kind == "mla")
    src = pool.alloc(2 * PAGE)
    fill_random(pool, seed=7)
    a, b = firsts(src)
    keys = hashes(2, "flat" + layout)
    assert backend.batch_set_v1(keys[:1], src[:PAGE]) == [True]
    # v1 object -> tensor fallback: equals SGLang's own flat data page.
    out = backend.get(keys[0], pool.get_dummy_flat_data_page())
    assert out is not None and torch.equal(bits(out), page_bits(pool, a))
    # tensor fallback -> v1 read.
    assert backend.set(keys[1], pool.get_data_page(b)) is True
    dst = pool.alloc(PAGE)
    poison(pool, firsts(dst))
    assert backend.batch_get_v1(keys[1:], dst) == [True]
    assert torch.equal(page_bits(pool, firsts(dst)[0]), page_bits(pool, b))


def test_fallback_batch_calls_and_exists(store_config):
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config, pool)
    src = pool.alloc(3 * PAGE)
    fill_random(pool, seed=3)
    keys = hashes(4, "fallback")
    values = [pool.get_data_page(p) for p in firsts(src)]
    assert backend.batch_set(keys[:3], values) is True
    assert [backend.exists(k) for k in keys] == [True, True, True, False]
    got = backend.batch_get(keys, [pool.get_dummy_flat_data_page() for _ in keys])
    assert got[3] is None
    for out, want in zip(got[:3], values):
        assert torch.equal(bits(out), bits(want))
    assert backend.get(keys[3]) is None
    fresh = backend.get(keys[0])  # no target: a new tensor
    assert torch.equal(bits(fresh), bits(values[0]))


def test_batch_exists_is_the_leading_run_and_get_stops_at_a_miss(store_config):
    pool = host_pool("mha", "layer_first")
    backend = make_backend(store_config, pool)
    src = pool.alloc(4 * PAGE)
    fill_random(pool, seed=11)
    keys = hashes(4, "lead")
    assert backend.batch_set_v1([keys[0], keys[1], keys[3]], torch.cat([src[:2 * PAGE], src[3 * PAGE:]])) == [True] * 3
    assert backend.batch_exists(keys) == 2
    dst = pool.alloc(4 * PAGE)
    poison(pool, firsts(dst))
    before = page_bits(pool, firsts(dst)[3])
    assert backend.batch_get_v1(keys, dst) == [True, True, False, False]
    assert torch.equal(page_bits(pool, firsts(dst)[3]), before)  # not read past the miss


def test_setting_a_present_page_again_succeeds_and_keeps_it(store_config):
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config, pool)
    src = pool.alloc(PAGE)
    fill_random(pool, seed=5)
    want = page_bits(pool, firsts(src)[0])
    key = hashes(1, "again")
    assert backend.batch_set_v1(key, src) == [True]
    assert backend.batch_set_v1(key, src) == [True]
    dst = pool.alloc(PAGE)
    assert backend.batch_get_v1(key, dst) == [True]
    assert torch.equal(page_bits(pool, firsts(dst)[0]), want)


def test_factory_creates_backend_through_dynamic(store_config):
    pool = host_pool("mha", "page_first_direct")
    config = storage_config({**DYNAMIC, "store": store_config})
    backend = StorageBackendFactory.create_backend("dynamic", config, pool)
    assert isinstance(backend, KVStoreHiCacheStorage) and isinstance(backend, HiCacheStorage)
    backend.register_mem_pool_host(pool)
    backend.on_host_pools_registered()
    src = pool.alloc(2 * PAGE)
    fill_random(pool, seed=2)
    assert backend.batch_set_v1(hashes(2, "factory"), src) == [True, True]
    assert backend.batch_exists(hashes(2, "factory")) == 2


def test_two_backends_share_pages_and_namespaces_separate_them(store_config):
    pool_a, pool_b = host_pool("mha", "page_first"), host_pool("mha", "page_first")
    writer = make_backend(store_config, pool_a)
    reader = make_backend(store_config, pool_b)  # another instance, e.g. a re-attached backend
    assert reader.store is writer.store
    src = pool_a.alloc(3 * PAGE)
    fill_random(pool_a, seed=13)
    keys = hashes(3, "shared")
    assert writer.batch_set_v1(keys, src) == [True] * 3
    dst = pool_b.alloc(3 * PAGE)
    poison(pool_b, firsts(dst))
    assert reader.batch_get_v1(keys, dst) == [True] * 3
    for s, d in zip(firsts(src), firsts(dst)):
        assert torch.equal(page_bits(pool_b, d), page_bits(pool_a, s))
    # Same page hashes under another TP rank, model, tenant or host layout are other pages.
    assert make_backend(store_config, host_pool("mha", "page_first"), tp_rank=1, tp_size=2).batch_exists(keys) == 0
    assert make_backend(store_config, host_pool("mha", "page_first"), model="other/model").batch_exists(keys) == 0
    assert make_backend(store_config, host_pool("mha", "page_first"), extra={"tenant": "t"}).batch_exists(keys) == 0
    assert make_backend(store_config, host_pool("mha", "page_head")).batch_exists(keys) == 0


def test_mla_pages_written_by_one_rank_read_by_all(store_config):
    pool_w, pool_r = host_pool("mla", "page_first"), host_pool("mla", "page_first")
    writer = make_backend(store_config, pool_w, mla=True, tp_rank=0, tp_size=2)
    follower = make_backend(store_config, pool_r, mla=True, tp_rank=1, tp_size=2)
    assert writer.storage_config.is_storage_writer and not follower.storage_config.is_storage_writer
    fill_random(pool_w, seed=17)
    fill_random(pool_r, seed=18)
    src_w, src_r = pool_w.alloc(2 * PAGE), pool_r.alloc(2 * PAGE)
    keys = hashes(2, "mla")
    assert follower.batch_set_v1(keys, src_r) == [True, True]  # reports success, stores nothing
    assert follower.batch_exists(keys) == 0
    assert writer.batch_set_v1(keys, src_w) == [True, True]
    assert follower.batch_exists(keys) == 2
    dst = pool_r.alloc(2 * PAGE)
    assert follower.batch_get_v1(keys, dst) == [True, True]
    for s, d in zip(firsts(src_w), firsts(dst)):
        assert torch.equal(page_bits(pool_r, d), page_bits(pool_w, s))


def test_corrupted_stored_page_is_a_miss(store_config):
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config, pool)
    src = pool.alloc(3 * PAGE)
    fill_random(pool, seed=19)
    keys = hashes(3, "corrupt")
    assert backend.batch_set_v1(keys, src) == [True] * 3
    assert backend.store.flush(timeout_s=30)
    backend.clear()  # DRAM copies gone: reads come from SSD, checksum verified
    entry = backend.store.ssd.entry(backend._keys(keys[1:2])[0])
    slab = glob.glob(os.path.join(store_config["ssd_path"], f"slab-{entry.slot_nbytes}.dat"))[0]
    with open(slab, "r+b") as f:
        f.seek(entry.slot * entry.slot_nbytes + 5)
        byte = f.read(1)
        f.seek(entry.slot * entry.slot_nbytes + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst = pool.alloc(3 * PAGE)
    poison(pool, firsts(dst))
    poisoned = page_bits(pool, firsts(dst)[1])
    assert backend.batch_get_v1(keys, dst) == [True, False, False]
    assert torch.equal(page_bits(pool, firsts(dst)[0]), page_bits(pool, firsts(src)[0]))
    assert torch.equal(page_bits(pool, firsts(dst)[1]), poisoned)
    assert backend.batch_exists(keys) == 1  # the corrupt page was dropped


def test_concurrent_sets_and_gets_from_many_threads(store_config):
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config, pool)
    threads, per_thread = 6, 4
    fill_random(pool, seed=23)
    work = []
    for t in range(threads):
        src, dst = pool.alloc(per_thread * PAGE), pool.alloc(per_thread * PAGE)
        work.append((hashes(per_thread, f"thread{t % 3}"), src, dst))  # threads 0/3, 1/4, 2/5 share keys
    errors, barrier = [], threading.Barrier(threads)

    def run(keys, src, dst):
        try:
            barrier.wait()
            for _ in range(5):
                # True also for a page another thread is still writing: it may miss until committed.
                assert all(backend.batch_set_v1(keys, src))
                hits = backend.batch_get_v1(keys, dst)
                assert hits == sorted(hits, reverse=True)  # a leading run
                assert backend.batch_exists(keys) >= sum(hits)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # Threads sharing keys must also share the source bytes.
    for t in range(3, threads):
        keys, src, dst = work[t]
        for a, b in zip(firsts(work[t - 3][1]), firsts(src)):
            pool.set_from_flat_data_page(b, pool.get_data_page(a).clone())
    workers = [threading.Thread(target=run, args=w) for w in work]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    for keys, src, dst in work:
        poison(pool, firsts(dst))
        assert backend.batch_get_v1(keys, dst) == [True] * per_thread
        for s, d in zip(firsts(src), firsts(dst)):
            assert torch.equal(page_bits(pool, d), page_bits(pool, s))


def test_get_stats_reports_sglang_storage_metrics(store_config):
    from sglang.srt.observability.metrics_collector import StorageMetrics
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config, pool)
    src = pool.alloc(2 * PAGE)
    backend.batch_set_v1(hashes(2, "stats"), src)
    backend.batch_get_v1(hashes(2, "stats"), pool.alloc(2 * PAGE))
    stats = backend.get_stats()
    assert isinstance(stats, StorageMetrics)
    assert stats.backup_pgs == [2] and stats.prefetch_pgs == [2] and len(stats.backup_bandwidth) == 1
    assert backend.get_stats().backup_pgs == []  # drained
    backend.close()
    backend.close()


@pytest.mark.parametrize("extra,match", [
    ({"bogus_key": 1}, "bogus_key"),
    ({"store": {"no_such_option": 1}}, "no_such_option"),
    ({"store": "not-a-mapping"}, "store"),
    ({"tenant": 3}, "tenant"),
])
def test_bad_extra_config_is_a_clear_error(store_config, extra, match):
    with pytest.raises(ConfigError, match=match):
        make_backend(store_config, extra=extra)


def test_bad_extra_config_fails_through_the_factory(store_config):
    config = storage_config({**DYNAMIC, "store": store_config, "typo_key": True})
    with pytest.raises(ConfigError, match="typo_key"):
        StorageBackendFactory.create_backend("dynamic", config, host_pool("mha", "page_first"))


def test_missing_model_name_is_an_error(store_config):
    with pytest.raises(ConfigError, match="model_name"):
        make_backend(store_config, model=None)


def test_unsupported_host_layout_is_rejected(store_config):
    pool = host_pool("mha", "page_first")
    object.__setattr__(pool, "layout", "page_unified")
    with pytest.raises(LayoutError, match="page_unified"):
        make_backend(store_config, pool)


def test_bad_io_is_rejected_and_changes_nothing(store_config):
    pool = host_pool("mha", "page_first")
    backend = make_backend(store_config)
    with pytest.raises(InvalidArgumentError, match="register_mem_pool_host"):
        backend.batch_exists(hashes(1))
    backend.register_mem_pool_host(pool)
    keys = hashes(2, "bad")
    with pytest.raises(InvalidArgumentError, match="host indices"):
        backend.batch_set_v1(keys, pool.alloc(PAGE))  # one page of indices for two keys
    with pytest.raises(InvalidArgumentError, match="start a page"):
        backend.batch_set_v1(keys[:1], torch.arange(1, 1 + PAGE))
    with pytest.raises(InvalidArgumentError):
        backend.batch_set_v1(keys[:1], torch.arange(pool.size, pool.size + PAGE))  # outside the pool
    with pytest.raises(InvalidArgumentError, match="bytes"):
        backend.set(keys[0], torch.zeros(3, dtype=pool.dtype))
    assert backend.batch_exists(keys) == 0
