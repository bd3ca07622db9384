"""SGLang's real pools and configs, small, on the CPU; random page contents; bit views."""
import torch

PAGE = 4
LAYERS = 3
DYNAMIC = {"backend_name": "kvstore", "module_path": "kvstore.connectors.sglang",
           "class_name": "KVStoreHiCacheStorage", "interface_v1": 1}
MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def device_pool(kind: str, dtype=torch.bfloat16):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    if kind == "mha":
        return MHATokenToKVPool(256, PAGE, dtype, head_num=2, head_dim=8, layer_num=LAYERS, device="cpu",
                                enable_memory_saver=False, start_layer=0, end_layer=LAYERS)
    return MLATokenToKVPool(256, PAGE, dtype, kv_lora_rank=16, qk_rope_head_dim=8, layer_num=LAYERS, device="cpu",
                            enable_memory_saver=False, start_layer=0, end_layer=LAYERS)


def host_pool(kind: str, layout: str, dtype=torch.bfloat16, device=None):
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    device = device or device_pool(kind, dtype)
    info = device.get_device_pool_infos()[0].buffer_info
    if kind == "mha":
        return MHATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device_capacity_tokens=device.size,
                                    start_layer=0, end_layer=LAYERS)
    return MLATokenToKVPoolHost(info, 2.0, 0, PAGE, layout, pin_memory=False, device_capacity_tokens=device.size,
                                start_layer=0, end_layer=LAYERS, target_layer_num=LAYERS)


def storage_config(extra=None, *, model="test-org/model", tp_rank=0, tp_size=1, mla=False, **fields):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=True,
                                is_page_first_layout=False, model_name=model, extra_config=extra, **fields)


def fill_random(pool, seed: int) -> None:
    """Random bits everywhere in the pool (compare with bits(), not ==: bf16 NaNs)."""
    g = torch.Generator().manual_seed(seed)
    flat = pool.kv_buffer.view(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=g))


def poison(pool, pages) -> None:
    for first in pages:
        pool.set_from_flat_data_page(first, torch.full_like(pool.get_data_page(first), -7.0))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8).clone()


def page_bits(pool, first: int) -> torch.Tensor:
    return bits(pool.get_data_page(first))


def firsts(indices) -> list[int]:
    return [int(i) for i in indices[::PAGE]]


def hashes(n: int, salt: str = "") -> list[str]:
    import hashlib
    return [hashlib.sha256(f"{salt}page{i}".encode()).hexdigest() for i in range(n)]
