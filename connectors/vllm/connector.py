"""KVStoreConnector: vLLM's KVConnectorBase_V1 facade. It picks its scheduler half or worker
half once, by role, and forwards; both halves share the process's store (shared_store)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

from kvstore import ConfigError, trace

from ..shared_store import shared_store
from .metadata import KVStoreConnectorMetadata
from .scheduler import ConnectorScheduler
from .settings import ConnectorSettings
from .worker import ConnectorWorker, in_process_worker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

try:  # vLLM >= 0.2x: where external hits came from, for its prefix-cache metrics
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    CacheHitSource = None


def _settings(vllm_config: "VllmConfig") -> ConnectorSettings:
    return ConnectorSettings.from_extra_config(vllm_config.kv_transfer_config.kv_connector_extra_config)


class KVStoreConnector(KVConnectorBase_V1):
    if CacheHitSource is not None:
        _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        settings = _settings(vllm_config)
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ConfigError("KVStoreConnector does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
        block_size = vllm_config.cache_config.block_size
        if settings.chunk_tokens % block_size:
            raise ConfigError(f"chunk_tokens {settings.chunk_tokens} must be a multiple of the block size {block_size}")
        store = shared_store(settings.store)
        self._scheduler = (ConnectorScheduler(vllm_config, settings, store, kv_cache_config)
                           if role == KVConnectorRole.SCHEDULER else None)
        self._worker = ConnectorWorker(vllm_config, settings, store) if role == KVConnectorRole.WORKER else None
        self._engine_id = getattr(vllm_config.kv_transfer_config, "engine_id", None)
        self._settings = settings

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a failed save never holds a request back

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        # Layer-wise loads stay correct inside FULL graphs: the worker puts its per-layer waits into
        # the graphs while vLLM captures them (external-event nodes on events reused every step),
        # and saves of layers a graph ran without calling save_kv_layer are gathered after it.
        settings = ConnectorSettings.from_extra_config(extra_config)
        return settings.layerwise and settings.cuda_graphs == "piecewise"

    def has_connector_metadata(self) -> bool:
        # vLLM's attention wrapper calls the layer hooks only while this is true. The worker wants
        # them during CUDA-graph capture too, when no metadata is bound: that is where its layer
        # waits enter FULL graphs (with no load in flight they are no-ops).
        worker = getattr(self, "_worker", None)
        return super().has_connector_metadata() or (worker is not None and worker.captures_waits)

    # ---- scheduler side ----------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        trace.mark("scheduler.match")
        matched = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        trace.mark("scheduler.match.done")
        worker = in_process_worker(self._engine_id)
        if matched[0] and worker is not None:  # the first layers can cross PCIe while vLLM allocates
            worker.prefetch(self._scheduler.keys_to_load(request, num_computed_tokens))
            trace.mark("scheduler.prefetched")
        return matched

    def update_state_after_alloc(self, request: "Request", blocks, num_external_tokens: int) -> None:
        trace.mark("scheduler.alloc")
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        trace.mark("scheduler.build_meta")
        meta = self._scheduler.build_connector_meta(scheduler_output)
        worker = in_process_worker(self._engine_id)
        if worker is not None:  # same process: the loads need not wait for the step's input preparation
            worker.start_loads_early(meta)
            trace.mark("scheduler.loads_started")
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    # ---- worker side -------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        trace.mark("worker.start_load")
        self._worker.start(self._get_connector_metadata(), _current_stream())
        trace.mark("worker.start_load.done")

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name, _current_stream())

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_kv_layer(layer_name, _current_stream())

    def wait_for_save(self) -> None:
        trace.mark("worker.wait_for_save")  # the forward has been enqueued
        self._worker.wait_for_save(_current_stream())
        trace.mark("worker.wait_for_save.done")  # the step's gathers are enqueued (they finish off the step)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()


def _current_stream() -> int:
    return torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0


__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata"]
