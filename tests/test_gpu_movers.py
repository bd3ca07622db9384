"""GPU movers: bit-exact against the CPU reference movers (kvstore._C.gather/scatter on CPU copies
of the same caches) for every KVLayout constructor, both paths, element sizes 2 and 1, random
block ids (always including the last block), 1..N chunks, partial layer ranges; outputs poisoned
before each run, data random. Plus the layer-wise handles and input validation.
Run on a GPU machine: pytest -m gpu tests/test_gpu_movers.py"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from kvstore._native import C

pytestmark = pytest.mark.gpu

if C.cuda_device_count() == 0:
    pytest.skip("no CUDA device (kvstore._C.cuda_device_count() == 0): GPU mover tests need one",
                allow_module_level=True)

torch = pytest.importorskip("torch", reason="GPU mover tests build CUDA caches with torch")

from kvstore import gpu_movers  # noqa: E402
from kvstore.errors import InvalidArgumentError  # noqa: E402
from kvstore.layout import KVLayout  # noqa: E402

DTYPES = {2: torch.bfloat16, 1: torch.uint8}
VLLM_ORDERS = ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]
PATHS = [gpu_movers.PATH_DIRECT, gpu_movers.PATH_STAGED, gpu_movers.PATH_DMA]


def rand_bytes(gen: torch.Generator, shape, dtype) -> torch.Tensor:
    """Random bit patterns (never zeros) of `dtype` on the CPU."""
    es = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape)) * es
    raw = torch.randint(1, 256, (n,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


class Cache:
    """The same paged cache on the GPU and on the CPU: `build(tensors_on_device)` -> KVLayout."""

    def __init__(self, name, phys_shapes, build, dtype, gen):
        self.name = name
        self.cpu = [rand_bytes(gen, s, dtype) for s in phys_shapes]
        self.gpu = [t.cuda() for t in self.cpu]
        self.build = build
        self.layout_gpu = build(self.gpu)
        self.layout_cpu = build(self.cpu)

    def poison(self, gen):
        for c, g in zip(self.cpu, self.gpu):
            c.view(torch.uint8).copy_(torch.randint(1, 256, c.view(torch.uint8).shape, dtype=torch.uint8, generator=gen))
            g.copy_(c)

    def equal(self) -> bool:
        torch.cuda.synchronize()
        return all(torch.equal(c.view(torch.uint8), g.cpu().view(torch.uint8)) for c, g in zip(self.cpu, self.gpu))


def vllm_cache(order, L, B, H, N, D, dtype, gen, mla=False):
    C_ = D if mla else 2 * D
    H = 1 if mla else H
    sizes = dict(L=L, B=B, H=H, N=N, C=C_)
    shape = [sizes[ch] for ch in order]

    def build(phys):
        t = phys[0]
        rest = [ch for ch in order if ch != "L"]
        perm = [rest.index(ch) for ch in "BHNC"]
        views = [t.select(order.index("L"), l).permute(*perm) for l in range(L)]
        return KVLayout.from_vllm(views, mla=mla)
    return Cache(f"vllm-{order}{'-mla' if mla else ''}", [shape], build, dtype, gen)


def cache_factories(L, B, N, H, D, dtype):
    fs = {f"vllm-{o}": (lambda gen, o=o: vllm_cache(o, L, B, H, N, D, dtype, gen)) for o in VLLM_ORDERS}
    fs["vllm-mla"] = lambda gen: vllm_cache("LBHNC", L, B, 1, N, 4 * D, dtype, gen, mla=True)
    fs["flash_attn"] = lambda gen: Cache("flash_attn", [(2, B, N, H, D)] * L,
                                         lambda ts: KVLayout.from_flash_attn(ts), dtype, gen)
    fs["flashinfer"] = lambda gen: Cache("flashinfer", [(B, 2, N, H, D)] * L,
                                         lambda ts: KVLayout.from_flashinfer(ts), dtype, gen)
    fs["mla"] = lambda gen: Cache("mla", [(B, N, 4 * D + D // 2)] * L, lambda ts: KVLayout.from_mla(ts), dtype, gen)
    fs["sglang"] = lambda gen: Cache("sglang", [(B * N + 3, H, D)] * (2 * L),
                                     lambda ts: KVLayout.from_sglang(ts[:L], ts[L:], page_size=N), dtype, gen)
    fs["sglang-mla"] = lambda gen: Cache("sglang-mla", [(B * N, 1, 4 * D)] * L,
                                         lambda ts: KVLayout.from_sglang(ts, None, page_size=N), dtype, gen)
    return fs


class Objects:
    """n objects in pinned+mapped host memory (or device memory), with CPU reference copies."""

    def __init__(self, n, nbytes, where="pinned", offset=0):
        self.nbytes = nbytes
        stride = (nbytes + 4095) // 4096 * 4096
        if where == "pinned":
            self.mem, pinned = C.host_alloc(n * stride + offset + 4096, True)
            assert pinned, "host_alloc did not pin memory on a GPU machine"
            base = self.mem.ctypes.data + offset
            self.views = [self.mem[offset + i * stride: offset + i * stride + nbytes] for i in range(n)]
        else:
            self.mem = torch.empty(n * stride + offset, dtype=torch.uint8, device="cuda")
            base = self.mem.data_ptr() + offset
            self.views = [self.mem[offset + i * stride: offset + i * stride + nbytes] for i in range(n)]
        self.ptrs = [base + i * stride for i in range(n)]
        self.ref = [np.empty(nbytes, np.uint8) for _ in range(n)]

    def fill(self, rng):
        for v, r in zip(self.views, self.ref):
            r[:] = rng.integers(1, 256, self.nbytes, dtype=np.uint8)
            if isinstance(v, np.ndarray):
                v[:] = r
            else:
                v.copy_(torch.from_numpy(r))
        torch.cuda.synchronize()

    def got(self, i) -> np.ndarray:
        v = self.views[i]
        return v.copy() if isinstance(v, np.ndarray) else v.cpu().numpy()

    @property
    def ref_ptrs(self):
        return np.array([r.ctypes.data for r in self.ref], dtype=np.uint64)


def pick_ids(rng, num_blocks, n_chunks, bpc):
    ids = rng.choice(num_blocks, size=n_chunks * bpc, replace=False).astype(np.int64)
    if num_blocks - 1 not in ids:
        ids[rng.integers(len(ids))] = num_blocks - 1
    return ids


def run_case(cache: Cache, rng, gen, path, n_chunks, bpc, layers, where="pinned", direction="both", ids=None,
             **kw):
    lay_g, lay_c = cache.layout_gpu, cache.layout_cpu
    if ids is None:
        ids = pick_ids(rng, lay_g.num_blocks, n_chunks, bpc)
    nbytes = lay_g.chunk_nbytes(bpc * lay_g.block_size)
    objs = Objects(n_chunks, nbytes, where)
    lb, le = layers
    if direction in ("both", "gather"):
        objs.fill(rng)  # poison
        C.gather(lay_c.native, ids, objs.ref_ptrs, bpc, lb, le)
        used = C.gpu_gather(lay_g.native, ids, np.array(objs.ptrs, np.uint64), bpc, lb, le, stream=0, path=path, **kw)
        torch.cuda.synchronize()
        for i in range(n_chunks):
            assert np.array_equal(objs.got(i), objs.ref[i]), f"{cache.name} gather path={used} chunk {i}"
    if direction in ("both", "scatter"):
        objs.fill(rng)      # random payload
        cache.poison(gen)   # random engine contents everywhere
        C.scatter(lay_c.native, ids, objs.ref_ptrs, bpc, lb, le)
        used = C.gpu_scatter(lay_g.native, ids, np.array(objs.ptrs, np.uint64), bpc, lb, le, stream=0, path=path, **kw)
        assert cache.equal(), f"{cache.name} scatter path={used}"


@pytest.mark.parametrize("elem", [2, 1])
@pytest.mark.parametrize("name", list(cache_factories(1, 1, 1, 1, 8, torch.uint8)))
def test_layouts_bit_exact(name, elem):
    L, B, N, H, D = 5, 37, 16, 3, 64 if elem == 2 else 128
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{elem}".encode()))
    rng = np.random.default_rng(zlib.crc32(f"{name}{elem}".encode()))
    cache = cache_factories(L, B, N, H, D, DTYPES[elem])[name](gen)
    bpc = 2
    max_chunks = cache.layout_gpu.num_blocks // bpc
    for trial, path in enumerate(PATHS * 2 + [gpu_movers.PATH_AUTO]):
        n = int(rng.integers(1, max_chunks + 1)) if trial else 1
        lb = int(rng.integers(0, L)) if trial % 2 else 0
        le = int(rng.integers(lb + 1, L + 1)) if trial % 2 else L
        run_case(cache, rng, gen, path, n, bpc, (lb, le))


@pytest.mark.parametrize("name", ["flash_attn", "vllm-LBNHC", "vllm-BHLNC", "flashinfer", "mla", "sglang"])
def test_dma_merges_runs_of_block_ids(name):
    """Block ids in runs, as a fresh engine hands them out: the DMA path merges consecutive units
    into long segments; bit-exact with skip blocks inside a run, the
    last block, partial layer ranges; PATH_AUTO picks DMA once segments are long."""
    L, B, N, H, D = 4, 160, 16, 2, 64
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cache = cache_factories(L, B, N, H, D, torch.bfloat16)[name](gen)
    lay = cache.layout_gpu
    bpc = 16
    starts = [0, 16, 64, lay.num_blocks - bpc, 100]  # chunks 0 and 1 continue each other; the last block
    ids = np.concatenate([np.arange(s, s + bpc) for s in starts]).astype(np.int64)
    for path in (gpu_movers.PATH_DMA, gpu_movers.PATH_AUTO):
        for layers in ((0, L), (1, 3)):
            run_case(cache, rng, gen, path, len(starts), bpc, layers, ids=ids)
    ids[[5, 6, 40]] = -1  # the engine already holds these: loads leave them alone, saves refuse
    for path in (gpu_movers.PATH_DMA, gpu_movers.PATH_AUTO):
        run_case(cache, rng, gen, path, len(starts), bpc, (0, L), ids=ids, direction="scatter")
    objs = Objects(len(starts), lay.chunk_nbytes(bpc * N))
    plan = C.GpuPlan(lay.native, ids, np.array(objs.ptrs, np.uint64), bpc, 0)
    unit = lay.block_size * lay.num_heads * lay.head_nbytes
    if name in ("flash_attn", "mla", "sglang"):
        # 77 units in 7 runs: chunk 0 [0-4] [7-15], chunk 1 [16-31] (another object: its own
        # run), chunk 2 [64-71] [73-79], chunks 3 and 4 one run each
        assert plan.dma_segment_bytes() == 77 * unit // 7
    elif name == "flashinfer":  # K and V of a block interleave: units are contiguous, never adjacent
        assert plan.dma_segment_bytes() == unit
    else:  # vLLM [B,H,N,C]: K and V rows interleave inside a block, no contiguous unit
        assert plan.dma_segment_bytes() == 0
    plan.close()


@pytest.mark.parametrize("path", PATHS)
def test_staged_many_small_pieces_and_device_objects(path):
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    cache = cache_factories(6, 64, 16, 2, 64, torch.bfloat16)["vllm-BLNHC"](gen)
    for n in (1, 3, 16):
        run_case(cache, rng, gen, path, n, 2, (0, 6), piece_bytes=4096, ring=2)
        run_case(cache, rng, gen, path, n, 2, (1, 4), piece_bytes=100_000, ring=3, ctas=3, threads=128)
    run_case(cache, rng, gen, path, 5, 4, (0, 6), where="device")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_elems,dtype", [(36, torch.bfloat16), (5, torch.uint8), (6, torch.float16),
                                             (3, torch.bfloat16)])
def test_unaligned_widths(path, head_elems, dtype):
    """Head rows of 72, 5, 12 and 6 bytes: the kernel falls back to 8-, 1-, 4- and 2-byte vectors."""
    gen = torch.Generator().manual_seed(head_elems)
    rng = np.random.default_rng(head_elems)
    cache = cache_factories(3, 21, 4, 3, head_elems, dtype)["flashinfer"](gen)
    run_case(cache, rng, gen, path, 4, 3, (0, 3))
    run_case(cache, rng, gen, path, 2, 5, (1, 2))


def test_python_api_sync_and_stream():
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    cache = cache_factories(4, 40, 16, 2, 64, torch.bfloat16)["vllm-LBNHC"](gen)
    lay = cache.layout_gpu
    ids = pick_ids(rng, lay.num_blocks, 3, 2)
    objs = Objects(3, lay.chunk_nbytes(32))
    objs.fill(rng)
    C.gather(cache.layout_cpu.native, ids, objs.ref_ptrs, 2, 0, 4)
    from kvstore import movers
    movers.gather(lay, ids, objs.ptrs, 2)  # synchronous on return
    assert all(np.array_equal(objs.got(i), objs.ref[i]) for i in range(3))
    objs.fill(rng)
    cache.poison(gen)
    C.scatter(cache.layout_cpu.native, ids, objs.ref_ptrs, 2, 0, 4)
    s = torch.cuda.Stream()
    gpu_movers.scatter(lay, ids, objs.ptrs, 2, stream=s)
    s.synchronize()
    assert cache.equal()


class LoadCase:
    """A FlashAttention cache with random contents, `n` objects of `bpc` random blocks each, and
    their CPU reference: refill() draws new object bytes, poisons the GPU cache and applies the
    objects to the CPU copy (what a load must leave on the GPU)."""

    def __init__(self, seed: int, layers: int, blocks: int, heads: int, head_dim: int, bpc: int, n: int):
        self.gen, self.rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        self.L, self.bpc = layers, bpc
        self.cache = cache_factories(layers, blocks, 16, heads, head_dim, torch.bfloat16)["flash_attn"](self.gen)
        self.lay = self.cache.layout_gpu
        self.ids = pick_ids(self.rng, self.lay.num_blocks, n, bpc)
        self.objs = Objects(n, self.lay.chunk_nbytes(bpc * 16))

    def refill(self) -> None:
        self.objs.fill(self.rng)
        self.cache.poison(self.gen)
        C.scatter(self.cache.layout_cpu.native, self.ids, self.objs.ref_ptrs, self.bpc, 0, self.L)


def test_layerwise_load_orders_compute():
    case = LoadCase(11, layers=8, blocks=64, heads=4, head_dim=128, bpc=4, n=6)
    cache, lay, ids, objs, bpc, L = case.cache, case.lay, case.ids, case.objs, case.bpc, case.L
    for path in PATHS:
        case.refill()
        compute = torch.cuda.Stream()
        snaps = []
        h = gpu_movers.LayerwiseLoad(lay, ids, objs.ptrs, bpc, path=path, keepalive=objs)
        assert h.path_name == gpu_movers.PATH_NAMES[path]  # FlashAttention units are contiguous: no fallback
        background = path in (gpu_movers.PATH_STAGED, gpu_movers.PATH_DMA)
        h.start(after_stream=torch.cuda.current_stream(), background=background,
                lookahead=(2 if path == gpu_movers.PATH_DIRECT else None))
        with torch.cuda.stream(compute):
            for layer in range(L):
                h.wait_layer(layer, compute)
                snaps.append(cache.gpu[layer].clone())  # reads layer `layer` on the compute stream
        compute.synchronize()
        h.wait(timeout_s=30)
        h.close()
        for layer in range(L):
            assert torch.equal(snaps[layer].cpu().view(torch.uint8), cache.cpu[layer].view(torch.uint8)), layer


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("piece_bytes", [0, 5000])
def test_layerwise_load_starts_after_its_start_point(piece_bytes, background):
    """Every layer, on every path, moves only after the work the load was ordered after
    (after_stream): the current stream sleeps, then overwrites every layer with poison; a layer
    moved before that would end poisoned. Small pieces (5000 bytes) make each layer several staged
    pieces, so the staging ring wraps within and across layers."""
    case = LoadCase(17, layers=9, blocks=80, heads=2, head_dim=40, bpc=3, n=7)
    cache, lay, ids, objs, bpc = case.cache, case.lay, case.ids, case.objs, case.bpc
    for path in PATHS:
        case.refill()
        poison = [rand_bytes(case.gen, t.shape, t.dtype).cuda() for t in cache.gpu]
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms
        for t, p in zip(cache.gpu, poison):
            t.copy_(p)
        h = gpu_movers.LayerwiseLoad(lay, ids, objs.ptrs, bpc, path=path, keepalive=objs, piece_bytes=piece_bytes)
        h.start(after_stream=torch.cuda.current_stream(), background=background)
        h.wait(timeout_s=30)
        h.close()
        # blocks outside the batch keep the poison; the batch's blocks hold the objects' bytes
        keep = torch.from_numpy(np.setdiff1d(np.arange(lay.num_blocks), ids))
        for t, p in zip(cache.cpu, poison):
            t[:, keep] = p.cpu()[:, keep]
        assert cache.equal(), gpu_movers.PATH_NAMES[path]


def test_layer_waits_inside_a_captured_cuda_graph():
    """Per-layer events owned by the caller and reused by every load: a CUDA graph captured once
    (the waits become external-event nodes) waits, at each replay, for the load enqueued before
    that replay. The load is held back behind a GPU sleep and the graph replays on another stream,
    so without the waits the graph would copy poisoned blocks."""
    case = LoadCase(13, layers=6, blocks=64, heads=4, head_dim=128, bpc=4, n=5)
    cache, lay, ids, objs, bpc, L = case.cache, case.lay, case.ids, case.objs, case.bpc, case.L
    events = [C.cuda_event_create(0, False) for _ in range(L)]
    snaps = [torch.empty_like(t) for t in cache.gpu]
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.graph(graph, stream=side):
        capture = torch.cuda.current_stream().cuda_stream
        assert C.cuda_stream_is_capturing(capture)
        for layer in range(L):
            C.cuda_stream_wait_event(capture, events[layer])
            snaps[layer].copy_(cache.gpu[layer])
    try:
        for trial, path in enumerate([gpu_movers.PATH_AUTO, gpu_movers.PATH_DMA, gpu_movers.PATH_STAGED]):
            case.refill()
            torch.cuda._sleep(50_000_000)  # ~25 ms: the load starts only after this
            h = gpu_movers.LayerwiseLoad(lay, ids, objs.ptrs, bpc, path=path, keepalive=objs, events=events)
            h.start(after_stream=torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graph.replay()
            side.synchronize()
            h.wait(timeout_s=30)
            h.close()  # the caller's events outlive the handle
            for layer in range(L):
                assert torch.equal(snaps[layer].cpu().view(torch.uint8), cache.cpu[layer].view(torch.uint8)), \
                    (trial, layer)
        with torch.cuda.stream(side):  # a replay with no load in flight does not wait for anything
            graph.replay()
        side.synchronize()
    finally:
        for e in events:
            C.cuda_event_destroy(e)


def test_background_enqueue_refuses_caller_events():
    """The caller's events may be waited on by a captured CUDA graph, which binds to their record
    at launch: a background thread recording them later would let the graph run on stale blocks."""
    gen = torch.Generator().manual_seed(19)
    cache = cache_factories(2, 8, 16, 2, 64, torch.bfloat16)["flash_attn"](gen)
    objs = Objects(1, cache.layout_gpu.chunk_nbytes(16))
    events = [C.cuda_event_create(0, False) for _ in range(2)]
    try:
        h = gpu_movers.LayerwiseLoad(cache.layout_gpu, [3], objs.ptrs, 1, keepalive=objs, events=events)
        with pytest.raises(InvalidArgumentError, match="caller's events"):
            h.start(after_stream=0, background=True)
        h.start(after_stream=0)  # nothing was enqueued by the refused call
        h.wait(timeout_s=30)
        h.close()
    finally:
        for e in events:
            C.cuda_event_destroy(e)


class _FailingPlan:
    """A GpuPlan whose scatter fails at one layer; everything else goes to the plan."""

    def __init__(self, plan, fail_at: int):
        self._wrapped, self.fail_at, self.calls = plan, fail_at, []

    def scatter(self, lb, le, **kw):
        self.calls.append(lb)
        if lb == self.fail_at:
            raise InvalidArgumentError("injected failure")
        return self._wrapped.scatter(lb, le, **kw)

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def test_background_load_that_fails_reports_it():
    """A helper thread that fails mid-load stops there; waiting for a layer it did not enqueue,
    or for the whole load, raises its error instead of waiting or going on with stale blocks, and
    wait() raises only once the layers it did enqueue have finished."""
    gen = torch.Generator().manual_seed(19)
    cache = cache_factories(4, 8, 16, 2, 64, torch.bfloat16)["flash_attn"](gen)
    objs = Objects(1, cache.layout_gpu.chunk_nbytes(16))
    h = gpu_movers.LayerwiseLoad(cache.layout_gpu, [3], objs.ptrs, 1, keepalive=objs)
    h._plan = plan = _FailingPlan(h._plan, fail_at=2)
    try:
        h.start(after_stream=0, background=True)
        compute = torch.cuda.Stream()
        with pytest.raises(InvalidArgumentError, match="injected failure"):
            h.wait_layer(3, compute, timeout_s=30)
        with pytest.raises(InvalidArgumentError, match="injected failure"):
            h.wait(timeout_s=30)
        # what was enqueued before the failure has finished: the objects may be freed now
        assert all(C.cuda_event_query(h._event(layer)) for layer in (0, 1))
        compute.synchronize()
    finally:
        h.close()
    assert plan.calls == [0, 1, 2]


def test_layerwise_save_after_compute():
    gen = torch.Generator().manual_seed(12)
    rng = np.random.default_rng(12)
    L = 6
    cache = cache_factories(L, 48, 16, 2, 64, torch.bfloat16)["flash_attn"](gen)
    lay = cache.layout_gpu
    bpc, n = 2, 5
    ids = pick_ids(rng, lay.num_blocks, n, bpc)
    final_cpu = [rand_bytes(gen, t.shape, t.dtype) for t in cache.cpu]
    final = [t.cuda() for t in final_cpu]
    ref = Objects(n, lay.chunk_nbytes(bpc * 16))
    ref.fill(rng)
    C.gather(cache.build(final_cpu).native, ids, ref.ref_ptrs, bpc, 0, L)
    for path in PATHS:
        cache.poison(gen)
        objs = Objects(n, ref.nbytes)
        objs.fill(rng)
        for i in range(n):  # what the objects must hold: the reference gather over this poison
            objs.ref[i][:] = objs.got(i)
        h = gpu_movers.LayerwiseSave(lay, ids, objs.ptrs, bpc, path=path, keepalive=objs)
        compute = torch.cuda.Stream()
        compute.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(compute):
            for layer in range(L):
                torch.cuda._sleep(100_000)          # this layer's "forward" takes a while ...
                cache.gpu[layer].copy_(final[layer])  # ... then writes its final KV
                h.save_layer(layer, compute)
        h.wait(timeout_s=30)
        h.close()
        for i in range(n):
            assert np.array_equal(objs.got(i), ref.ref[i]), (path, i)


def assert_blocks_hold(cache: Cache, ids, bpc: int, ref: "Objects") -> None:
    """The GPU blocks `ids` hold what ref.ref holds (gathered by the CPU reference mover)."""
    now = [t.cpu() for t in cache.gpu]
    got = Objects(len(ref.ref), ref.nbytes)
    C.gather(cache.build(now).native, ids, got.ref_ptrs, bpc, 0, cache.layout_cpu.num_layers)
    for i in range(len(ref.ref)):
        assert np.array_equal(got.ref[i], ref.ref[i]), i


def test_saves_finish_off_the_step_and_later_writes_wait_for_them(tmp_path):
    """What the vLLM worker relies on for saves that finish off the step. enqueue_rest returns
    while the gathers are still held behind the "forward" (a GPU sleep); nothing is visible before
    commit; a stream that waits on done_event may overwrite the blocks at once and the committed
    objects still hold them as they were. A load with after_events writes the blocks only after
    those events (here a poison held back behind a sleep), so the blocks end as loaded."""
    from kvstore import Store, chunk_keys, namespace
    gen = torch.Generator().manual_seed(21)
    rng = np.random.default_rng(21)
    L, bpc, n = 4, 4, 5
    cache = cache_factories(L, 64, 16, 4, 128, torch.bfloat16)["flash_attn"](gen)
    lay = cache.layout_gpu
    ids = pick_ids(rng, lay.num_blocks, n, bpc)
    keys = chunk_keys(rng.integers(0, 50_000, size=n * 64), namespace(model="gpu-async-save"), 64)
    ref = Objects(n, lay.chunk_nbytes(bpc * 16))
    C.gather(cache.layout_cpu.native, ids, ref.ref_ptrs, bpc, 0, L)  # the blocks as they are now

    def fill_on(stream, value, sleep_cycles=0):
        with torch.cuda.stream(stream):
            if sleep_cycles:
                torch.cuda._sleep(sleep_cycles)
            for t in cache.gpu:
                t.view(torch.uint8).fill_(value)

    with Store(chunk_tokens=64, ssd_path=None, dram_capacity_bytes="64MiB", dram_slab_bytes="16MiB") as store:
        session = store.begin_save(keys, lay, ids)
        compute = torch.cuda.Stream()
        with torch.cuda.stream(compute):
            torch.cuda._sleep(50_000_000)  # ~25 ms of "forward" before the gathers may run
        session.enqueue_rest(compute.cuda_stream)
        assert store.lookup(keys) == 0 and session.done_event is not None
        overwrite = torch.cuda.Stream()
        C.cuda_stream_wait_event(overwrite.cuda_stream, session.done_event)
        fill_on(overwrite, 0x5A)  # a later step reusing the blocks
        assert session.commit(timeout_s=30) == n and store.lookup(keys) == n
        session.release_gpu()
        torch.cuda.synchronize()
        assert all(bool((t.view(torch.uint8) == 0x5A).all()) for t in cache.gpu)

        late = torch.cuda.Stream()
        fill_on(late, 0x77, sleep_cycles=50_000_000)  # an earlier step's work on the blocks
        event = C.cuda_event_create(0, False)
        try:
            C.cuda_event_record(event, late.cuda_stream)
            load = store.begin_load(keys, lay, ids, after_events=[event])
            load.close(timeout_s=30)
            torch.cuda.synchronize()
        finally:
            C.cuda_event_destroy(event)
        assert load.loaded_chunks == n and not load.invalid
        assert_blocks_hold(cache, ids, bpc, ref)


@pytest.mark.parametrize("fit_layers", [1, 3, 4])
def test_prefetched_first_layers_load_bit_exact(fit_layers):
    """Prefetch copies the first layers of stored chunks into a device buffer before the block ids
    are known; a LoadSession of the same keys scatters those layers from the buffer and the rest
    from DRAM (all layers from the buffer when they all fit): bit-exact, per-layer events recorded
    by both parts. A prefetch of other keys is not used; one with a missing key pins nothing."""
    from kvstore import Store, chunk_keys, namespace
    from kvstore.sessions import Prefetch
    gen = torch.Generator().manual_seed(30 + fit_layers)
    rng = np.random.default_rng(30 + fit_layers)
    L, bpc, n, chunk_tokens = 4, 4, 3, 64
    cache = cache_factories(L, 64, 16, 4, 128, torch.bfloat16)["flashinfer"](gen)
    lay = cache.layout_gpu
    ids = pick_ids(rng, lay.num_blocks, n, bpc)
    keys = chunk_keys(rng.integers(0, 50_000, size=n * chunk_tokens), namespace(model="gpu-prefetch"), chunk_tokens)
    ref = Objects(n, lay.chunk_nbytes(chunk_tokens))
    C.gather(cache.layout_cpu.native, ids, ref.ref_ptrs, bpc, 0, L)
    buffer_nbytes = lay.chunk_nbytes(chunk_tokens) + fit_layers * n * lay.layer_nbytes(chunk_tokens)
    assert Prefetch.layers_that_fit(lay, chunk_tokens, n, buffer_nbytes) == fit_layers
    buffer = torch.empty(buffer_nbytes, dtype=torch.uint8, device="cuda")
    stream = C.cuda_stream_create(0, 0)
    copied, read = C.cuda_event_create(0, False), C.cuda_event_create(0, False)
    layer_events = [C.cuda_event_create(0, False) for _ in range(L)]
    try:
        with Store(chunk_tokens=chunk_tokens, ssd_path=None, dram_capacity_bytes="32MiB",
                   dram_slab_bytes="8MiB") as store:
            assert store.save(keys, lay, ids).wait(30).stored == n
            with pytest.raises(LookupError):
                Prefetch(store, keys[:2] + [bytes(16)], lay, buffer.data_ptr(), buffer_nbytes, stream, copied, read)
            other = Prefetch(store, keys[1:], lay, buffer.data_ptr(), buffer_nbytes, stream, copied, read)
            cache.poison(gen)
            torch.cuda.synchronize()
            prefetch = Prefetch(store, keys, lay, buffer.data_ptr(), buffer_nbytes, stream, copied, read)
            assert prefetch.layers == fit_layers
            ignored = store.begin_load(keys[1:] + keys[:1], lay, np.concatenate([ids[bpc:], ids[:bpc]]),
                                       prefetch=prefetch)  # other keys: loads from DRAM
            ignored.close(30)
            cache.poison(gen)
            torch.cuda.synchronize()
            load = store.begin_load(keys, lay, ids, layer_events=layer_events, prefetch=prefetch)
            side = torch.cuda.Stream()
            for layer in range(L):  # what an engine's forward does
                load.wait_layer(layer, side.cuda_stream)
            side.synchronize()
            load.close(30)
            other.close(30)
            assert load.loaded_chunks == n and not load.missing
            assert_blocks_hold(cache, ids, bpc, ref)
            assert store.evict("dram") == n  # nothing is left pinned
    finally:
        for e in [copied, read, *layer_events]:
            C.cuda_event_destroy(e)
        C.cuda_stream_destroy(stream)


@pytest.mark.parametrize("name", ["flashinfer", "vllm-LBNHC"])
def test_warm_up_leaves_the_cache_as_it_was(name):
    gen = torch.Generator().manual_seed(40)
    cache = cache_factories(3, 40, 16, 2, 64, torch.bfloat16)[name](gen)
    buffer = torch.empty(cache.layout_gpu.chunk_nbytes(4 * 16), dtype=torch.uint8, device="cuda")
    gpu_movers.warm_up(cache.layout_gpu, 4)
    gpu_movers.warm_up(cache.layout_gpu, 4, buffer.data_ptr())
    assert cache.equal()


def test_validation_errors():
    gen = torch.Generator().manual_seed(5)
    cache = cache_factories(2, 8, 16, 2, 64, torch.bfloat16)["flashinfer"](gen)
    lay = cache.layout_gpu
    nbytes = lay.chunk_nbytes(16)
    pageable = np.ones(nbytes, np.uint8)
    with pytest.raises(InvalidArgumentError, match="pageable"):
        C.gpu_gather(lay.native, np.array([0], np.int64), np.array([pageable.ctypes.data], np.uint64), 1, 0, 2)
    objs = Objects(1, nbytes)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        C.gpu_gather(lay.native, np.array([8], np.int64), np.array(objs.ptrs, np.uint64), 1, 0, 2)
    with pytest.raises(InvalidArgumentError):
        C.gpu_scatter(lay.native, np.array([0], np.int64), np.array(objs.ptrs, np.uint64), 1, 1, 1)
    with pytest.raises(InvalidArgumentError):
        C.gpu_scatter(lay.native, np.array([0, 1], np.int64), np.array(objs.ptrs, np.uint64), 1, 0, 2)
    with pytest.raises(InvalidArgumentError):
        C.gpu_gather(lay.native, np.array([0], np.int64), np.array(objs.ptrs, np.uint64), 1, 0, 2, path=7)
    with pytest.raises(InvalidArgumentError, match="staged_ce.*removed"):
        C.gpu_scatter(lay.native, np.array([0], np.int64), np.array(objs.ptrs, np.uint64), 1, 0, 2, path=3)
    with pytest.raises(InvalidArgumentError, match="device memory"):  # a CPU cache given to the GPU mover
        C.gpu_gather(cache.layout_cpu.native, np.array([0], np.int64), np.array(objs.ptrs, np.uint64), 1, 0, 2)


@pytest.mark.parametrize("path", PATHS)
def test_scatter_leaves_skip_blocks_alone(path):
    """Block id -1 (kSkipBlock) = the engine already holds that block: the GPU scatter must leave
    it exactly as the CPU reference does."""
    gen = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    cache = cache_factories(3, 24, 16, 2, 64, torch.bfloat16)["vllm-LBNHC"](gen)
    lay_g, lay_c = cache.layout_gpu, cache.layout_cpu
    ids = pick_ids(rng, lay_g.num_blocks, 3, 2)
    ids[[0, 3]] = -1
    objs = Objects(3, lay_g.chunk_nbytes(32))
    objs.fill(rng)
    cache.poison(gen)
    C.scatter(lay_c.native, ids, objs.ref_ptrs, 2, 0, 3)
    C.gpu_scatter(lay_g.native, ids, np.array(objs.ptrs, np.uint64), 2, 0, 3, stream=0, path=path)
    assert cache.equal()
    before = [objs.got(i) for i in range(3)]
    with pytest.raises(InvalidArgumentError, match="only valid for loads"):
        C.gpu_gather(lay_g.native, ids, np.array(objs.ptrs, np.uint64), 2, 0, 3, stream=0, path=path)
    torch.cuda.synchronize()
    assert all(np.array_equal(objs.got(i), before[i]) for i in range(3))
