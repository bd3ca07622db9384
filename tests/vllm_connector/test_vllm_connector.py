"""KVStoreConnector inside vLLM 0.33's real Scheduler (no model: the worker half is driven by
hand with CPU KV tensors in vLLM's [B,H,N,C] layout, as vLLM's own connector tests do).

A fake "forward" writes, for each scheduled token, KV bytes derived from (layer, position,
token id), so any two requests sharing a prefix compute identical KV there and a load can be
checked bit for bit against what a recompute would have written."""
import numpy as np
import pytest

from vllm_env import missing_reason

_reason = missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import torch  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

from kvstore import ConfigError  # noqa: E402
from kvstore.connectors.vllm import KVStoreConnector, register  # noqa: E402
from kvstore.connectors.vllm import worker as worker_module  # noqa: E402
from kvstore.connectors.vllm.metadata import KVStoreConnectorMetadata  # noqa: E402

from pathlib import Path  # noqa: E402

MODEL_DIR = str(Path(__file__).resolve().parents[1] / "fixtures" / "opt-125m")
BLOCK, CHUNK = 16, 32
LAYERS, HEADS, HEAD = 12, 12, 64  # OPT-125m
NUM_BLOCKS = 64
POISON = -7.0


def make_config(vllm_utils, tmp_path, **extra):
    store = {"ssd_path": str(tmp_path / "ssd"), "dram_capacity_bytes": "64MiB", "dram_slab_bytes": "8MiB",
             "ssd_capacity_bytes": "256MiB", "ssd_slab_bytes": "32MiB", "cpu_threads": 2}
    store.update(extra.pop("store", {}))
    return vllm_utils.create_vllm_config(
        model=MODEL_DIR, block_size=BLOCK, max_num_batched_tokens=64, kv_connector="KVStoreConnector",
        kv_connector_module_path="kvstore.connectors.vllm", kv_role="kv_both", kv_load_failure_policy="recompute",
        kv_connector_extra_config={"chunk_tokens": CHUNK, "store": store, **extra})


class Engine:
    """vLLM's Scheduler with our connector + our worker connector over CPU KV tensors."""

    def __init__(self, vllm_utils, config):
        self.u = vllm_utils
        # The KV cache config of the tensors below (vLLM's helper defaults to a 1-head stand-in).
        kv_cache_config = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
            KVCacheGroupSpec([f"model.layers.{l}.attn" for l in range(LAYERS)], FullAttentionSpec(
                block_size=BLOCK, num_kv_heads=HEADS, head_size=HEAD, dtype=torch.float16))])
        self.scheduler = vllm_utils.create_scheduler(config, num_blocks=NUM_BLOCKS, kv_cache_config=kv_cache_config)
        self.worker = KVStoreConnector(config, KVConnectorRole.WORKER, self.scheduler.kv_cache_config)
        # vLLM 0.33 LBNHC: one buffer, per-layer [B, H, N, C] views, K|V packed along C.
        self.flat = torch.full((LAYERS, NUM_BLOCKS, BLOCK, HEADS, 2 * HEAD), POISON, dtype=torch.float16)
        self.kv = {f"model.layers.{l}.attn": self.flat[l].permute(0, 2, 1, 3) for l in range(LAYERS)}
        self.worker.register_kv_caches(self.kv)
        self.requests = {}
        self.errors = []

    @staticmethod
    def kv_for(position: int, token: int) -> torch.Tensor:
        """What the fake model computes for a token: [L, H, 2*D], from (position, token) only."""
        g = torch.Generator().manual_seed(position * 1_000_003 + token)
        return torch.randn(LAYERS, HEADS, 2 * HEAD, generator=g).to(torch.float16)

    def add(self, request):
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

    def step(self, before_forward=None):
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, KVStoreConnectorMetadata)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        if before_forward:
            before_forward(out, meta)
        for req_id, n in out.num_scheduled_tokens.items():  # the "forward": write KV of scheduled tokens
            req = self.requests[req_id]
            blocks = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            first = req.num_computed_tokens - n  # schedule() already counted this step's tokens
            for pos in range(first, first + n):
                if pos < len(req.all_token_ids):
                    self.flat[:, blocks[pos // BLOCK], pos % BLOCK] = self.kv_for(pos, req.all_token_ids[pos])
        for name in self.kv:
            self.worker.wait_for_layer_load(name)
            self.worker.save_kv_layer(name, self.kv[name], None)
        self.worker.wait_for_save()
        errors = self.worker.get_block_ids_with_load_errors()
        self.errors.append(errors)
        self.worker.clear_connector_metadata()
        reqs = [self.requests[r] for r in out.num_scheduled_tokens]
        self.scheduler.update_from_output(out, self.u.create_model_runner_output(
            reqs, invalid_block_ids=errors or None))
        return out, meta

    def run_to_end(self, max_steps=50):
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def assert_kv_exact(self, req, upto: int):
        blocks = self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0]
        for pos in range(upto):
            got = self.flat[:, blocks[pos // BLOCK], pos % BLOCK]
            assert torch.equal(got.view(torch.int16), self.kv_for(pos, req.all_token_ids[pos]).view(torch.int16)), pos

    def reset_gpu(self):
        """A restarted engine: empty GPU prefix cache, every block poisoned."""
        assert self.scheduler.reset_prefix_cache()
        self.flat.fill_(POISON)


def make_request(vllm_utils, req_id, num_tokens, common_prefix_len, max_tokens=2):
    return vllm_utils.create_request(request_id=req_id, num_tokens=num_tokens, common_prefix_len=common_prefix_len,
                                     max_tokens=max_tokens, block_size=BLOCK)


def test_prefix_saved_by_one_request_is_loaded_bit_exact_by_another(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    a = make_request(vllm_utils, 1, num_tokens=100, common_prefix_len=100)
    engine.add(a)
    _, meta = engine.step()                       # prefill tokens [0, 64): chunks 0 and 1 complete
    assert [(len(s.keys), s.first_chunk) for s in meta.saves] == [(2, 0)] and not meta.loads
    _, meta = engine.step()                       # tokens [64, 100): chunk 2 completes
    assert [(len(s.keys), s.first_chunk) for s in meta.saves] == [(1, 2)]
    engine.run_to_end()
    store = engine.worker._worker._store
    # DRAM eviction takes deep chunks first: each slot knows its chunk's place in the sequence
    assert [store.dram._entries[k].depth for k in meta.saves[0].keys] == [2]
    assert store.stats()["counters"]["bytes.engine->dram"] == 3 * LAYERS * 2 * CHUNK * HEADS * HEAD * 2

    engine.reset_gpu()
    b = make_request(vllm_utils, 2, num_tokens=100, common_prefix_len=80)  # shares chunks 0, 1 (64 tokens)
    engine.add(b)
    loaded_before = {}

    def check_loaded(out, meta):
        assert out.num_scheduled_tokens[b.request_id] == 100 - 64   # computed tokens advanced by the hit
        assert b.num_computed_tokens == 100  # 64 loaded + 36 computed in this step
        assert [(len(load.keys), load.first_chunk) for load in meta.loads] == [(2, 0)]
        assert meta.early_load_id != 0  # started in build_connector_meta: the worker is in this process
        engine.assert_kv_exact(b, upto=64)                           # loaded before the forward
        loaded_before["ok"] = True

    engine.step(before_forward=check_loaded)
    assert loaded_before and not engine.errors[-1]
    engine.assert_kv_exact(b, upto=100)
    engine.run_to_end()

    # A worker in another process (TP > 1, or an out-of-process executor): loads start in
    # start_load_kv, as before.
    engine.reset_gpu()
    worker_module._IN_PROCESS.clear()
    c = make_request(vllm_utils, 3, num_tokens=90, common_prefix_len=80)
    engine.add(c)
    loaded_before.clear()

    def check_loaded_late(out, meta):
        assert [len(load.keys) for load in meta.loads] == [2] and meta.early_load_id == 0
        engine.assert_kv_exact(c, upto=64)
        loaded_before["ok"] = True

    engine.step(before_forward=check_loaded_late)
    assert loaded_before and not engine.errors[-1]
    engine.assert_kv_exact(c, upto=90)
    engine.run_to_end()
    engine.u.assert_scheduler_empty(engine.scheduler)
    assert engine.scheduler.connector._scheduler.num_tracked_requests == 0


def test_get_num_new_matched_tokens_is_side_effect_free_and_keeps_last_token(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    a = make_request(vllm_utils, 3, num_tokens=96, common_prefix_len=96)  # exactly 3 chunks
    engine.add(a)
    engine.run_to_end()
    engine.reset_gpu()
    b = make_request(vllm_utils, 4, num_tokens=96, common_prefix_len=96)
    connector = engine.scheduler.connector
    counters = dict(connector._scheduler._store.stats()["counters"])
    # All 3 chunks are stored but the last prompt token must be computed: 2 chunks load.
    assert connector.get_num_new_matched_tokens(b, 0) == (64, False)
    assert connector.get_num_new_matched_tokens(b, 0) == (64, False)
    assert connector.get_num_new_matched_tokens(b, 48) == (16, False)
    assert connector._scheduler._store.stats()["counters"] == counters


def test_gpu_prefix_hit_inside_a_chunk_leaves_held_blocks_alone(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    a = make_request(vllm_utils, 5, num_tokens=100, common_prefix_len=100)
    engine.add(a)
    engine.run_to_end()
    engine.reset_gpu()
    c = make_request(vllm_utils, 6, num_tokens=60, common_prefix_len=48)  # GPU caches blocks 0-2 (48 tokens)
    engine.add(c)
    engine.run_to_end()
    b = make_request(vllm_utils, 7, num_tokens=100, common_prefix_len=80)
    engine.add(b)

    def mark_and_check(out, meta):
        blocks = engine.scheduler.kv_cache_manager.get_block_ids(b.request_id)[0]
        assert out.num_scheduled_tokens[b.request_id] == 36
        load = meta.loads[0]
        assert load.block_ids[0] == -1 and load.block_ids[1] == blocks[3]  # chunk 1: block 2 held by the GPU
        # what the step writes (loads and new KV): every block past the 3 the GPU already holds;
        # a save still reading one of them would be waited for
        assert meta.written_block_ids == list(blocks[3:])
        engine.assert_kv_exact(b, upto=64)

    engine.step(before_forward=mark_and_check)
    engine.run_to_end()
    engine.u.assert_scheduler_empty(engine.scheduler)


def test_corrupt_chunk_is_reported_and_recomputed(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    a = make_request(vllm_utils, 8, num_tokens=100, common_prefix_len=100)
    engine.add(a)
    engine.run_to_end()
    store = engine.worker._worker._store
    assert store.flush(30)
    store.evict("dram")
    keys = engine.scheduler.connector._scheduler._state(a).keys
    entry = store.ssd.entry(keys[1])
    with open(tmp_path / "ssd" / f"slab-{entry.slot_nbytes}.dat", "r+b") as f:  # flip bytes of chunk 1
        f.seek(entry.slot * entry.slot_nbytes + 4096)
        f.write(b"\xff" * 64)
    engine.reset_gpu()
    b = make_request(vllm_utils, 9, num_tokens=100, common_prefix_len=80)
    engine.add(b)
    out, meta = engine.step()
    assert out.num_scheduled_tokens[b.request_id] == 36          # the scheduler believed 64 tokens loadable
    bad_blocks = set(meta.loads[0].block_ids[2:4])
    assert engine.errors[-1] == bad_blocks                          # chunk 1's blocks failed their checksum
    assert store.stats()["counters"]["corrupt.ssd"] == 1
    assert b.num_computed_tokens < 64                               # vLLM rolled back to recompute them
    engine.run_to_end()
    assert b.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_abort_releases_requests_and_store_slots(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    a = make_request(vllm_utils, 10, num_tokens=100, common_prefix_len=100, max_tokens=50)
    engine.add(a)
    engine.step()
    engine.step()
    engine.scheduler.finish_requests(a.request_id, RequestStatus.FINISHED_ABORTED)
    engine.step()
    engine.u.assert_scheduler_empty(engine.scheduler)
    assert engine.scheduler.connector._scheduler.num_tracked_requests == 0
    store = engine.worker._worker._store
    assert store.flush(30)  # write-back holds a reader while it copies a slot to SSD
    assert all(s.committed and s.readers == 0 for s in store.dram._entries.values())
    assert store.lookup(engine.scheduler.connector._scheduler._state(a).keys) == 3


def test_preempted_request_resumes_from_the_store_bit_exact(vllm_utils, tmp_path):
    engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path))
    reqs = [make_request(vllm_utils, 20 + i, num_tokens=200, common_prefix_len=0, max_tokens=100) for i in range(4)]
    for r in reqs:
        engine.add(r)
    checked = set()
    for _ in range(1000):
        if not engine.scheduler.has_requests():
            break
        out, meta = engine.step()
        for r in reqs:  # once a preempted request runs again, its KV (reloaded or recomputed) is exact
            if r.num_preemptions and r.request_id not in checked and r.status == RequestStatus.RUNNING:
                engine.assert_kv_exact(r, upto=r.num_computed_tokens)
                checked.add(r.request_id)
    assert checked, "the 64-block cache should have forced a preemption"
    engine.u.assert_scheduler_empty(engine.scheduler)
    assert engine.scheduler.connector._scheduler.num_tracked_requests == 0
    store = engine.worker._worker._store
    assert store.stats()["counters"].get("hits.dram", 0) > 0  # resumed requests reloaded their prompt chunks


def test_unknown_extra_config_key_is_rejected_by_name(vllm_utils, tmp_path):
    config = make_config(vllm_utils, tmp_path, chunk_tokenz=64)
    with pytest.raises(ConfigError, match="chunk_tokenz"):
        KVStoreConnector(config, KVConnectorRole.SCHEDULER, None)
    config = make_config(vllm_utils, tmp_path, store={"dram_capacity": "1GiB"})
    with pytest.raises(ConfigError, match="dram_capacity"):
        KVStoreConnector(config, KVConnectorRole.WORKER, None)
    with pytest.raises(ConfigError, match="multiple of the block size"):
        KVStoreConnector(make_config(vllm_utils, tmp_path, chunk_tokens=40), KVConnectorRole.WORKER, None)
    for key, bad in [("lookup_wait_ms", -1), ("lookup_wait_ms", True), ("prefetch_mib", "256"),
                     ("prefetch_mib", 1 << 20)]:
        with pytest.raises(ConfigError, match=key):
            KVStoreConnector(make_config(vllm_utils, tmp_path, **{key: bad}), KVConnectorRole.SCHEDULER, None)


def test_plugin_registers_by_name_once(vllm_utils, tmp_path):
    register()
    register()  # vLLM loads general plugins in every process, possibly more than once
    config = make_config(vllm_utils, tmp_path)
    config.kv_transfer_config.kv_connector_module_path = None
    assert KVConnectorFactory.get_connector_class(config.kv_transfer_config) is KVStoreConnector
    # layer waits go into vLLM's FULL CUDA graphs; PIECEWISE only when asked for
    assert KVStoreConnector.requires_piecewise_for_cudagraph({}) is False
    assert KVStoreConnector.requires_piecewise_for_cudagraph({"cuda_graphs": "piecewise"}) is True
    assert KVStoreConnector.requires_piecewise_for_cudagraph({"layerwise": False, "cuda_graphs": "piecewise"}) is False
    with pytest.raises(ConfigError, match="cuda_graphs"):
        KVStoreConnector.requires_piecewise_for_cudagraph({"cuda_graphs": "full-ish"})


def test_a_step_never_promises_more_chunks_than_half_the_dram_tier(vllm_utils, tmp_path):
    chunk_bytes = LAYERS * 2 * CHUNK * HEADS * HEAD * 2                 # 1152 KiB
    config = make_config(vllm_utils, tmp_path, store={"dram_capacity_bytes": 5 * chunk_bytes,
                                                      "dram_slab_bytes": chunk_bytes})
    engine = Engine(vllm_utils, config)
    a = make_request(vllm_utils, 30, num_tokens=130, common_prefix_len=130)   # 4 whole chunks
    engine.add(a)
    engine.run_to_end()
    assert engine.worker._worker._store.lookup(engine.scheduler.connector._scheduler._state(a).keys) == 4
    engine.reset_gpu()
    b = make_request(vllm_utils, 31, num_tokens=130, common_prefix_len=130)
    assert engine.scheduler.connector.get_num_new_matched_tokens(b, 0) == (2 * CHUNK, False)  # 5 slots // 2
    engine.add(b)
    out, meta = engine.step()
    assert [len(load.keys) for load in meta.loads] == [2] and not engine.errors[-1]
    engine.run_to_end()
    engine.u.assert_scheduler_empty(engine.scheduler)


def test_a_request_over_the_step_budget_waits_a_step_instead_of_recomputing(vllm_utils, tmp_path):
    chunk_bytes = LAYERS * 2 * CHUNK * HEADS * HEAD * 2
    config = make_config(vllm_utils, tmp_path, store={"dram_capacity_bytes": 9 * chunk_bytes,
                                                      "dram_slab_bytes": chunk_bytes})   # 4 chunks a step
    engine = Engine(vllm_utils, config)
    for req_id in (40, 43):  # two different prompts of 3 whole chunks each (enough output tokens that
        # vLLM's mock runner, which samples a token on every step, does not end them mid-prompt)
        engine.add(make_request(vllm_utils, req_id, num_tokens=100, common_prefix_len=0, max_tokens=10))
    engine.run_to_end()
    engine.reset_gpu()
    b = make_request(vllm_utils, 40, num_tokens=100, common_prefix_len=0)
    c = make_request(vllm_utils, 43, num_tokens=100, common_prefix_len=0)
    engine.add(b)
    engine.add(c)
    out, meta = engine.step()                     # b loads 3 chunks; c would not fit: it waits a step
    assert [ld.req_id for ld in meta.loads] == [b.request_id] and c.request_id not in out.num_scheduled_tokens
    out, meta = engine.step()                     # then c loads its chunks instead of recomputing them
    assert [ld.req_id for ld in meta.loads] == [c.request_id] and out.num_scheduled_tokens[c.request_id] == 100 - 96
    engine.assert_kv_exact(c, upto=100)
    engine.run_to_end()
    engine.u.assert_scheduler_empty(engine.scheduler)


def test_a_prompt_whose_prefix_is_still_being_saved_is_asked_for_again_not_waited_for(vllm_utils, tmp_path):
    """Chunk 2 of a stored prefix is still being written (another engine's save, or this one's
    finishing off the step): the request is skipped this step ("ask again") while the engine goes
    on; once that save is over (here: aborted) it loads what is stored and computes the rest. With
    lookup_wait_ms 0 it computes at once."""
    from kvstore import chunk_keys
    for wait_ms in (5000, 0):
        engine = Engine(vllm_utils, make_config(vllm_utils, tmp_path / str(wait_ms), lookup_wait_ms=wait_ms))
        a = make_request(vllm_utils, 60, num_tokens=70, common_prefix_len=70)  # stores chunks 0, 1
        engine.add(a)
        engine.run_to_end()
        engine.reset_gpu()
        b = make_request(vllm_utils, 61, num_tokens=100, common_prefix_len=100)
        sched = engine.scheduler.connector._scheduler
        key2 = chunk_keys(np.asarray(b.prompt_token_ids[:3 * CHUNK]), sched._namespace(b), CHUNK)[2]
        worker = engine.worker._worker
        writer = worker._store.begin_save([key2], worker.layout, [0, 1])  # reserved, not published
        assert writer.stored == 1
        engine.add(b)
        out, meta = engine.step()
        if wait_ms:
            assert b.request_id not in out.num_scheduled_tokens and not meta.loads
            writer.abort()
            out, meta = engine.step()
        else:
            writer.abort()
        assert [(len(ld.keys), ld.req_id) for ld in meta.loads] == [(2, b.request_id)]
        assert out.num_scheduled_tokens[b.request_id] == 100 - 64
        engine.assert_kv_exact(b, upto=100)
        engine.run_to_end()
        engine.u.assert_scheduler_empty(engine.scheduler)
