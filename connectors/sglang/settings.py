"""The backend's settings from SGLang's HiCacheStorageConfig and its extra config, validated
(unknown key -> ConfigError naming it), and the namespace of this rank's pages.

Extra-config keys (`--hicache-storage-backend-extra-config`):
  backend_name, module_path, class_name, interface_v1   SGLang's own (the dynamic loader reads them)
  prefetch_threshold, prefetch_timeout_base, prefetch_timeout_per_ki_token,
  hicache_storage_pass_prefix_keys, tp_lcm_size          SGLang's controller pops these; accepted
  tenant                                                 salt: tenants never share pages (default "")
  store                                                  kvstore Config keys, e.g. dram_capacity_bytes, ssd_path
HiCacheStorageConfig keeps gaining fields between SGLang releases, so it is read with getattr.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from kvstore import Config, ConfigError, namespace

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # stored object = the host pool's flat data page; bump when that changes

_SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1", "prefetch_threshold",
                "prefetch_timeout_base", "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys",
                "tp_lcm_size")
_OWN_KEYS = {
    "tenant": "salt in the key namespace: tenants never share pages (default '')",
    "store": "kvstore Config keys (see `kvstore config --show`), e.g. dram_capacity_bytes, ssd_path",
}


@dataclass(frozen=True)
class BackendSettings:
    store: Config
    tenant: str
    model: str
    shard: str                 # which KV this rank holds: TP shard (or "mla": replicated), PP/CP/DCP parts
    is_storage_writer: bool    # False on MLA ranks that only read (one writer per replicated shard)
    zero_copy: bool            # interface_v1 set: SGLang drives batch_get_v1 / batch_set_v1
    enable_metrics: bool

    @classmethod
    def from_storage_config(cls, storage_config: Any, extra_kwargs: Mapping[str, Any] | None = None
                            ) -> "BackendSettings":
        extra = getattr(storage_config, "extra_config", None) or {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"hicache storage extra config must be a mapping, got {type(extra).__name__}")
        unknown = sorted(set(extra) - set(_SGLANG_KEYS) - set(_OWN_KEYS))
        if unknown:
            raise ConfigError(f"unknown hicache storage extra config key(s) {', '.join(unknown)} for "
                              f"KVStoreHiCacheStorage (kvstore keys: {', '.join(sorted(_OWN_KEYS))}; "
                              f"kvstore Config keys go under 'store')")
        if extra_kwargs:
            # The dynamic loader passes an empty dict today; later SGLang releases may pass more.
            log.warning("KVStoreHiCacheStorage ignores constructor kwargs %s", sorted(extra_kwargs))
        store_overrides = extra.get("store") or {}
        if not isinstance(store_overrides, Mapping):
            raise ConfigError("hicache storage extra config 'store' must be a mapping of kvstore config keys")
        store = Config.load(**dict(store_overrides))
        tenant = extra.get("tenant", "")
        if not isinstance(tenant, str):
            raise ConfigError(f"hicache storage extra config 'tenant' must be a string, got {tenant!r}")
        if getattr(storage_config, "should_split_heads", False):
            raise ConfigError("KVStoreHiCacheStorage does not support tp_lcm_size head splitting "
                              "(heterogeneous TP sharing); drop tp_lcm_size from the extra config")
        model = getattr(storage_config, "model_name", None) or ""
        if not model:
            raise ConfigError("HiCacheStorageConfig.model_name is empty: kvstore namespaces pages by model and "
                              "would otherwise mix different models' KV")
        writer = getattr(storage_config, "is_storage_writer", True)
        return cls(store=store, tenant=tenant, model=model, shard=shard_of(storage_config),
                   is_storage_writer=bool(writer), zero_copy=bool(extra.get("interface_v1", 0)),
                   enable_metrics=bool(getattr(storage_config, "enable_storage_metrics", False)))


def shard_of(storage_config: Any) -> str:
    """Names the KV this rank holds. MLA (rank-replicated) KV is one shard for every TP rank; MHA
    KV is split by TP rank. dp_rank is left out on purpose: DP groups hold the same heads, so
    they share pages (like SGLang's file backend)."""
    get = lambda name, default: getattr(storage_config, name, default)  # noqa: E731
    if get("is_mla_model", False):
        shard = "mla"
    else:
        shard = f"tp{get('tp_rank', 0)}of{get('tp_size', 1)}"
    if get("pp_size", 1) > 1:
        shard += f"-pp{get('pp_rank', 0)}of{get('pp_size', 1)}"
    if get("attn_cp_size", 1) > 1:
        shard += f"-cp{get('attn_cp_rank', 0)}of{get('attn_cp_size', 1)}"
    if get("dcp_size", 1) > 1:
        shard += f"-tp{get('tp_size', 1)}dcp{get('dcp_rank', 0)}of{get('dcp_size', 1)}page{get('logical_page_size', 0)}"
    return shard


def page_namespace(settings: BackendSettings, *, dtype: str, host_layout: str, page_tokens: int,
                   fingerprint: int) -> bytes:
    """Namespace of this rank's pages: model, dtype, shard, SGLang host layout and the page
    geometry (fingerprint), so pages of another layout or shape are never read as ours."""
    return namespace(model=settings.model, dtype=dtype, shard=settings.shard, chunk_tokens=page_tokens,
                     format=FORMAT_VERSION, tenant=settings.tenant, engine="sglang", layout=host_layout,
                     geometry=f"{fingerprint:016x}")
