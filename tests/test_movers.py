"""CPU reference movers against plain numpy indexing, for every layout constructor."""
import numpy as np
import pytest

import kvstore
from kvstore import InvalidArgumentError
from kvstore import _C_module as C

from kv_caches import all_caches, expected_object, snapshot

POISON = 0xA5


def _objects(n, nbytes):
    objs = [np.full(nbytes, POISON, dtype=np.uint8) for _ in range(n)]
    return objs, np.array([o.ctypes.data for o in objs], dtype=np.uint64)


@pytest.mark.parametrize("cache_index", range(12))
def test_gather_then_scatter_round_trip(rng, cache_index):
    cache = all_caches(rng)[cache_index]
    lay = cache.layout
    bpc = 2
    chunk_tokens = bpc * lay.block_size
    nbytes = lay.chunk_nbytes(chunk_tokens)
    n_chunks = min(3, lay.num_blocks // bpc)
    ids = rng.permutation(lay.num_blocks)[:n_chunks * bpc]
    ids[-1] = lay.num_blocks - 1 if lay.num_blocks - 1 not in ids[:-1] else ids[-1]  # include the last block
    objs, ptrs = _objects(n_chunks, nbytes)

    before = snapshot(cache)
    C.gather(lay.native, ids, ptrs, bpc, 0, lay.num_layers)
    for c in range(n_chunks):
        assert np.array_equal(objs[c], expected_object(cache, ids[c * bpc:(c + 1) * bpc])), cache.name
    for a, b in zip(before, cache.buffers):  # gather never writes the source
        assert np.array_equal(a, b)

    # scatter into a poisoned cache: exactly the chosen blocks come back, others stay poisoned
    for buf in cache.buffers:
        buf.view(np.uint8)[...] = POISON
    C.scatter(lay.native, ids, ptrs, bpc, 0, lay.num_layers)
    for l in range(cache.num_layers):
        for p in range(cache.num_planes):
            restored = cache.planes(l, p)
            original = _planes_of(cache, before, l, p)
            assert np.array_equal(restored[ids], original[ids]), (cache.name, l, p)
            untouched = np.setdiff1d(np.arange(lay.num_blocks), ids)
            assert (restored[untouched].view(np.uint8) == POISON).all()


def _planes_of(cache, buffers, l, p):
    saved = [b.copy() for b in cache.buffers]
    for b, src in zip(cache.buffers, buffers):
        b[...] = src
    out = cache.planes(l, p).copy()
    for b, src in zip(cache.buffers, saved):
        b[...] = src
    return out


@pytest.mark.parametrize("cache_index", [0, 7, 8, 10, 11])
def test_one_layer_moves_only_its_slice(rng, cache_index):
    cache = all_caches(rng)[cache_index]
    lay = cache.layout
    bpc = 1
    chunk_tokens = lay.block_size
    ids = np.array([lay.num_blocks - 1, 0][:min(2, lay.num_blocks)], dtype=np.int64)
    objs, ptrs = _objects(len(ids), lay.chunk_nbytes(chunk_tokens))
    layer = lay.num_layers - 1
    C.gather(lay.native, ids, ptrs, bpc, layer, layer + 1)
    layer_bytes = lay.layer_nbytes(chunk_tokens)
    for c, o in enumerate(objs):
        assert np.array_equal(o[layer * layer_bytes:], expected_object(cache, ids[c:c + 1], range(layer, layer + 1)))
        assert (o[:layer * layer_bytes] == POISON).all()


def test_block_id_out_of_range_is_typed_and_changes_nothing(rng):
    cache = all_caches(rng)[0]
    lay = cache.layout
    objs, ptrs = _objects(1, lay.chunk_nbytes(lay.block_size))
    before = snapshot(cache)
    for bad in (lay.num_blocks, -2):
        with pytest.raises(InvalidArgumentError, match="out of range"):
            C.scatter(lay.native, np.array([bad]), ptrs, 1, 0, lay.num_layers)
    with pytest.raises(InvalidArgumentError, match="layer range"):
        C.gather(lay.native, np.array([0]), ptrs, 1, 0, lay.num_layers + 1)
    with pytest.raises(InvalidArgumentError, match="blocks_per_chunk"):
        C.gather(lay.native, np.array([0, 1, 2]), ptrs, 2, 0, lay.num_layers)
    for a, b in zip(before, cache.buffers):
        assert np.array_equal(a, b)
    assert (objs[0] == POISON).all()


def test_checksum_is_deterministic_and_sensitive(rng):
    data = rng.integers(0, 255, size=3 * (1 << 20) + 123, dtype=np.uint8)
    a = C.checksum(data, len(data))
    assert a == C.checksum(data.copy(), len(data))
    data[len(data) // 2] ^= 1
    assert C.checksum(data, len(data)) != a
    assert C.checksum(data, 10) == C.checksum(data[:10].copy(), 10)
    with pytest.raises(InvalidArgumentError):
        C.checksum(data, len(data) + 1)


def test_gpu_entry_points_raise_without_gpu():
    if C.cuda_device_count():
        pytest.skip("a GPU is present")
    with pytest.raises(kvstore.GPUUnavailableError):
        C.require_gpu()


def test_skip_block_is_left_untouched(rng):
    cache = all_caches(rng)[1]
    lay = cache.layout
    objs, ptrs = _objects(1, lay.chunk_nbytes(3 * lay.block_size))
    ids = np.array([2, 5, 7], dtype=np.int64)
    C.gather(lay.native, ids, ptrs, 3, 0, lay.num_layers)
    before = snapshot(cache)
    for buf in cache.buffers:
        buf.view(np.uint8)[...] = POISON
    C.scatter(lay.native, np.array([-1, 5, 7]), ptrs, 3, 0, lay.num_layers)
    for l in range(cache.num_layers):
        for p in range(cache.num_planes):
            assert (cache.planes(l, p)[2].view(np.uint8) == POISON).all()
            assert np.array_equal(cache.planes(l, p)[[5, 7]], _planes_of(cache, before, l, p)[[5, 7]])
