"""The connector's settings from `kv_connector_extra_config`, validated (unknown key -> error
naming it), and the chunk-key namespace of this model shard."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore import Config, ConfigError, namespace

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ConnectorSettings:
    store: Config
    chunk_tokens: int
    layerwise: bool     # GPU caches: load/save per layer inside the forward
    save_decode: bool   # also store chunks of generated tokens (off: prompt only)
    tenant: str
    cuda_graphs: str = "full"  # "full": vLLM keeps FULL CUDA graphs; "piecewise": ask vLLM for PIECEWISE
    lookup_wait_ms: int = 100  # a prefix still being saved is asked for again this long at most (then recomputed)
    prefetch_mib: int = 256    # device buffer for the first layers of a hit, copied before vLLM allocates blocks

    _DOCS = {
        "chunk_tokens": "tokens per stored chunk, a multiple of the block size (default 256)",
        "layerwise": "pipeline GPU loads/saves layer by layer (default true)",
        "save_decode": "store chunks completed during decode too (default false)",
        "tenant": "salt in the key namespace: tenants never share chunks (default '')",
        "cuda_graphs": "'full' (default): layer-wise loads are waited on inside vLLM's FULL CUDA graphs too; "
                       "'piecewise': ask vLLM to fall back to PIECEWISE graphs, as before",
        "lookup_wait_ms": "a prompt whose prefix an earlier step is still saving is deferred (vLLM asks again "
                          "next step and runs the other requests) at most this long, then computed (default "
                          "100; 0: compute at once)",
        "prefetch_mib": "one GPU, layer-wise: device buffer (MiB) the first layers of a request's hits are "
                        "copied into while vLLM allocates its blocks (default 256; 0: off)",
        "store": "kvstore Config keys (see `kvstore config --show`), e.g. dram_capacity_bytes, ssd_path",
    }

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None) -> "ConnectorSettings":
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(cls._DOCS))
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config key(s) {', '.join(unknown)} for KVStoreConnector "
                              f"(known: {', '.join(sorted(cls._DOCS))})")
        store_overrides = extra.get("store") or {}
        if not isinstance(store_overrides, dict):
            raise ConfigError("kv_connector_extra_config.store must be a mapping of kvstore config keys")
        chunk_tokens = extra.get("chunk_tokens", store_overrides.get("chunk_tokens", 256))
        store = Config.load(**{**store_overrides, "chunk_tokens": chunk_tokens})
        flags = {}
        for key in ("layerwise", "save_decode"):
            value = extra.get(key, key == "layerwise")
            if not isinstance(value, bool):
                raise ConfigError(f"kv_connector_extra_config.{key} must be true or false, got {value!r}")
            flags[key] = value
        tenant = extra.get("tenant", "")
        if not isinstance(tenant, str):
            raise ConfigError(f"kv_connector_extra_config.tenant must be a string, got {tenant!r}")
        cuda_graphs = extra.get("cuda_graphs", "full")
        if cuda_graphs not in ("full", "piecewise"):
            raise ConfigError(f"kv_connector_extra_config.cuda_graphs must be 'full' or 'piecewise', got {cuda_graphs!r}")
        sizes = {}
        for key, default, most in (("lookup_wait_ms", 100, 10_000), ("prefetch_mib", 256, 65536)):
            value = extra.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise ConfigError(f"kv_connector_extra_config.{key} must be an integer in [0, {most}], got {value!r}")
            sizes[key] = value
        return cls(store=store, chunk_tokens=store.chunk_tokens, tenant=tenant, cuda_graphs=cuda_graphs,
                   **sizes, **flags)


def shard_namespace(vllm_config, settings: ConnectorSettings, tp_rank: int, lora: str = "") -> bytes:
    """Namespace of the KV heads this TP rank holds. The shard is named by its head range, not
    the worker, so any TP layout holding the same heads reads it; MLA's latent is replicated."""
    model = vllm_config.model_config
    tp = vllm_config.parallel_config.tensor_parallel_size
    if getattr(model, "use_mla", False):
        shard = "mla"
    else:
        total = model.get_total_num_kv_heads()
        per_rank = max(1, total // tp)
        first = (tp_rank * per_rank) % total  # heads are replicated when tp > total
        shard = f"heads{first}-{first + per_rank}of{total}"
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model.dtype).replace("torch.", "") if cache_dtype in (None, "auto") else str(cache_dtype)
    return namespace(model=str(model.model), revision=str(model.revision or ""), dtype=dtype, shard=shard,
                     chunk_tokens=settings.chunk_tokens, format=FORMAT_VERSION, tenant=settings.tenant,
                     lora=lora)
