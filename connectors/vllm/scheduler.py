"""Scheduler half of KVStoreConnector: decides what to load and save; never touches tensors.

Per request it keeps the chunk keys of its tokens, its block table and how many leading chunks
are known stored. get_num_new_matched_tokens is side-effect free apart from caching keys, the
last answer (which update_state_after_alloc turns into a load) and, while a save of the prompt's
prefix is still being written, the time until which it answers "ask again next step". Loads are synchronous from
vLLM's point of view (load_async=False): the worker pipelines them by layer inside the forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvstore import chunk_keys
from kvstore.store import Store

from .metadata import SKIP_BLOCK, ChunkTransfer, KVStoreConnectorMetadata
from .settings import ConnectorSettings, shard_namespace

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class _RequestState:
    request: "Request"
    keys: list[bytes]
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0           # leading chunks stored (or being saved)
    hit_tokens: int = 0             # last answer of get_num_new_matched_tokens (tokens loadable)
    writing_deadline: float | None = None  # its prefix was still being saved: asked again until then
    local_hit_tokens: int = 0       # the GPU prefix hit vLLM reported with it
    load: ChunkTransfer | None = None


def chunk_nbytes_of(kv_cache_config, chunk_tokens: int, block_size: int) -> int | None:
    """Bytes of one stored chunk from vLLM's KV cache config (page bytes per block and layer x
    layers x blocks per chunk), or None when the config does not say."""
    try:
        group = kv_cache_config.kv_cache_groups[0]
        return group.kv_cache_spec.page_size_bytes * len(group.layer_names) * (chunk_tokens // block_size)
    except (AttributeError, IndexError, TypeError):
        return None


class ConnectorScheduler:
    def __init__(self, vllm_config, settings: ConnectorSettings, store: Store, kv_cache_config=None):
        self._vllm_config = vllm_config
        self._settings = settings
        self._store = store
        self._chunk = settings.chunk_tokens
        self._block_size = vllm_config.cache_config.block_size
        self._namespaces: dict[str, bytes] = {}
        self._requests: dict[str, _RequestState] = {}
        # A step's loads are pinned in DRAM until its forward ran: never promise more chunks than
        # half the DRAM tier holds (the rest stays for saves and promotions), or loads would fail
        # and, under vLLM's default kv_load_failure_policy="fail", fail their requests.
        nbytes = chunk_nbytes_of(kv_cache_config, self._chunk, self._block_size)
        slot = (nbytes + 4095) // 4096 * 4096 if nbytes else 0
        self._step_load_budget = max(1, store.config.dram_capacity_bytes // slot // 2) if slot else 1 << 62
        self._step_loads = 0

    # ---- lookups -----------------------------------------------------------------------------
    def _state(self, request: "Request") -> _RequestState:
        state = self._requests.get(request.request_id)
        tokens = request.all_token_ids if self._settings.save_decode else request.prompt_token_ids
        if state is None or len(state.keys) < len(tokens) // self._chunk:
            # vLLM's token ids are Python ints; fromiter of the whole chunks is ~2.5x faster than
            # converting the list (2.4 -> 0.9 ms at 32K tokens, on the TTFT path)
            whole = len(tokens) // self._chunk * self._chunk
            keys = chunk_keys(np.fromiter(tokens, dtype=np.int64, count=whole), self._namespace(request),
                              self._chunk)
            if state is None:
                state = self._requests[request.request_id] = _RequestState(request, keys, request.num_prompt_tokens)
            state.keys = keys
        return state

    def _namespace(self, request: "Request") -> bytes:
        lora = request.lora_request.lora_name if getattr(request, "lora_request", None) else ""
        ns = self._namespaces.get(lora)
        if ns is None:
            ns = self._namespaces[lora] = shard_namespace(self._vllm_config, self._settings, tp_rank=0, lora=lora)
        return ns

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        # The last prompt token is always computed (it yields the first output token).
        limit = (request.num_prompt_tokens - 1) // self._chunk
        stored, writing = self._store.lookup_writing(state.keys[:limit])
        if writing:  # an earlier step is still saving the next chunk (saves finish off the step):
            now = time.monotonic()  # vLLM asks again next step and runs the others meanwhile
            if state.writing_deadline is None:
                state.writing_deadline = now + self._settings.lookup_wait_ms / 1000
            if now < state.writing_deadline:
                return None, False
        state.writing_deadline = None
        loadable_chunks = min(limit, stored)
        first_to_load = num_computed_tokens // self._chunk
        wanted = loadable_chunks - first_to_load
        if wanted > 0:
            left = self._step_load_budget - self._step_loads
            if wanted > left and self._step_loads:
                return None, False  # this step's DRAM budget is spoken for: ask again next step
            loadable_chunks = first_to_load + min(wanted, left)  # larger than any step: load what fits
        state.hit_tokens = max(loadable_chunks * self._chunk, num_computed_tokens)
        state.local_hit_tokens = num_computed_tokens
        return max(0, state.hit_tokens - num_computed_tokens), False

    def keys_to_load(self, request: "Request", num_computed_tokens: int) -> list[bytes]:
        """The chunks the last get_num_new_matched_tokens answer for `request` promised to load."""
        state = self._requests.get(request.request_id)
        if state is None:
            return []
        return state.keys[num_computed_tokens // self._chunk:state.hit_tokens // self._chunk]

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        state = self._state(request)
        state.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0:
            return
        end = state.hit_tokens
        start = end - num_external_tokens  # block-aligned: vLLM presents a block-aligned local hit
        first_chunk = start // self._chunk
        bpc = self._chunk // self._block_size
        ids = state.block_ids[first_chunk * bpc:(end // self._chunk) * bpc]
        skip = (start - first_chunk * self._chunk) // self._block_size
        ids = [SKIP_BLOCK] * skip + ids[skip:]  # blocks the GPU prefix cache already holds
        state.load = ChunkTransfer(request.request_id, state.keys[first_chunk:end // self._chunk], ids, first_chunk)
        self._step_loads += len(state.load.keys)
        state.saved_chunks = max(state.saved_chunks, end // self._chunk)

    # ---- per step ----------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        self._step_loads = 0
        written = meta.written_block_ids
        for req in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(req.req_id)
            if state is None:
                written.extend(req.block_ids[0])
                continue
            state.block_ids = list(req.block_ids[0])
            written.extend(state.block_ids[state.local_hit_tokens // self._block_size:])
            self._plan(meta, req.req_id, state, req.num_computed_tokens + scheduler_output.num_scheduled_tokens[req.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        resumed_ids = getattr(cached, "resumed_req_ids", None)  # vLLM < 0.3x: resumed_from_preemption
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            new_blocks = cached.new_block_ids[i]
            resumed = req_id in resumed_ids if resumed_ids is not None else cached.resumed_from_preemption[i]
            if new_blocks is not None:
                written.extend(new_blocks[0])
            if state is None:
                continue
            if resumed:  # after preemption the table is replaced
                state.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                state.block_ids.extend(new_blocks[0])
            self._plan(meta, req_id, state, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        return meta

    def _plan(self, meta: KVStoreConnectorMetadata, req_id: str, state: _RequestState, computed_after_step: int) -> None:
        if state.load is not None:
            meta.loads.append(state.load)
            state.load = None
        if self._settings.save_decode:
            self._state(state.request)  # keys for the tokens generated so far
        limit = len(state.keys) * self._chunk if self._settings.save_decode else state.num_prompt_tokens
        done_chunks = min(computed_after_step, limit) // self._chunk
        bpc = self._chunk // self._block_size
        if done_chunks > state.saved_chunks and len(state.block_ids) >= done_chunks * bpc:
            meta.saves.append(ChunkTransfer(req_id, state.keys[state.saved_chunks:done_chunks],
                                            state.block_ids[state.saved_chunks * bpc:done_chunks * bpc],
                                            state.saved_chunks))
            state.saved_chunks = done_chunks

    def request_finished(self, request: "Request", block_ids) -> tuple[bool, None]:
        # The blocks can go: a later step that writes one of them waits on the device for a save
        # still gathering it (metadata.written_block_ids, worker.py).
        self._requests.pop(request.request_id, None)
        return False, None

    @property
    def num_tracked_requests(self) -> int:
        return len(self._requests)
