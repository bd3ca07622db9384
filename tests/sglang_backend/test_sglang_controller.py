"""SGLang 0.5.23's real HiCacheController drives KVStoreHiCacheStorage: its backup thread writes
host pages to us, its prefetch threads query the hit prefix and read the pages back into other
host slots, bit for bit. One-process gloo group and a published runtime topology stand in for a
server (no GPU: the device<->host kernels are not involved in L2<->L3)."""
import contextlib
import socket
import threading

import pytest

from sglang_env import missing_reason

_reason = missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from kvstore.connectors.sglang import KVStoreHiCacheStorage  # noqa: E402
from sglang_pools import DYNAMIC, PAGE, device_pool, fill_random, firsts, host_pool, page_bits, poison  # noqa: E402

TIMEOUT_S = 120  # the first backup of a process has taken ~11 s on these machines


@pytest.fixture(scope="module")
def gloo_world():
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD


@contextlib.contextmanager
def published_topology():
    """sglang.test.test_utils.published_topology, without that module's benchmark imports."""
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs
    reset_context()
    publish(ServerArgs(model_path="dummy"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    try:
        yield
    finally:
        reset_context()


@contextlib.contextmanager
def controller(kind, layout, extra, group):
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    device = device_pool(kind)
    allocator = PagedTokenToKVPoolAllocator(device.size, PAGE, torch.bfloat16, "cpu", device, need_sort=False)
    host = host_pool(kind, layout, device=device)
    with published_topology():
        ctrl = HiCacheController(allocator, host, PAGE, group, threading.Event(), write_policy="write_through",
                                 io_backend="direct", storage_backend="dynamic", model_name="test-org/model",
                                 storage_backend_extra_config=extra)
        try:
            yield ctrl, host
        finally:
            ctrl.detach_storage_backend()


def backup_then_prefetch(ctrl, host, num_pages, seed):
    from sglang.srt.mem_cache.utils import get_storage_hash_str
    src = host.alloc(num_pages * PAGE)
    fill_random(host, seed)
    expected = [page_bits(host, p) for p in firsts(src)]
    tokens = [seed * 1000 + i for i in range(num_pages * PAGE)]
    ctrl.write_storage(src, tokens, hash_value=get_storage_hash_str(tokens, None, page_size=PAGE))
    backup = ctrl.ack_backup_queue.get(timeout=TIMEOUT_S)
    assert backup.completed_tokens == num_pages * PAGE

    # A new request with the same prefix plus one unknown page: the hit query stops there.
    query = ctrl.prefetch(f"req{seed}", tokens + [7] * PAGE)
    hit = ctrl.prefetch_hit_queue.get(timeout=TIMEOUT_S)
    assert hit is query and hit.storage_hit_count == num_pages * PAGE
    dst = host.alloc(num_pages * PAGE)
    poison(host, firsts(dst))
    hit.host_indices = dst
    ctrl.prefetch_buffer.put(hit)  # what the scheduler does once it has host slots
    completed = 0
    while True:
        ack = ctrl.ack_prefetch_queue.get(timeout=TIMEOUT_S)
        if ack.completed_tokens is not None:
            completed = ack.completed_tokens
        if ack.completed_req:
            break
    assert completed == num_pages * PAGE
    for page, want in zip(firsts(dst), expected):
        assert torch.equal(page_bits(host, page), want)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind,layout,interface_v1", [
    ("mha", "page_first", 1), ("mha", "layer_first", 1), ("mha", "page_head", 0), ("mla", "page_first_direct", 1)])
def test_controller_backs_up_and_prefetches_bit_exact(gloo_world, store_config, kind, layout, interface_v1):
    extra = {**DYNAMIC, "interface_v1": interface_v1, "store": store_config, "prefetch_threshold": PAGE}
    with controller(kind, layout, extra, gloo_world) as (ctrl, host):
        assert isinstance(ctrl.storage_backend, KVStoreHiCacheStorage)
        zero_copy = ctrl.page_get_func.__name__ == "_page_get_zero_copy"
        assert zero_copy == bool(interface_v1)
        backup_then_prefetch(ctrl, host, num_pages=9, seed=len(layout) + interface_v1)
