"""Two SGLang backends with separate store clients share pages through a real node agent
(`python -m kvstore.agent` as a subprocess): the pages cross from one client to the other
through the agent's shared-memory pool, bit-exact."""
import subprocess
import sys

import pytest

from sglang_env import missing_reason

_reason = missing_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

import torch  # noqa: E402

from kvstore.agent_store import AgentStore  # noqa: E402
from kvstore.connectors.sglang import KVStoreHiCacheStorage  # noqa: E402
from sglang_pools import DYNAMIC, PAGE, fill_random, firsts, hashes, host_pool, page_bits, poison, storage_config  # noqa: E402


@pytest.fixture
def agent_address(tmp_path):
    socket = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.agent", "--socket", socket, "--dram-capacity", "16MiB",
                             "--ssd-path", str(tmp_path / "ssd"), "--ssd-capacity", "64MiB",
                             "--set", "ssd_slab_bytes=4MiB", "--set", "dram_slab_bytes=1MiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line
    yield "unix://" + socket
    proc.terminate()
    proc.wait(15)
    proc.stdout.close()


def backend(address, pool, timeout_ms):
    # Different agent_timeout_ms: two Config values, so two separate AgentStore clients.
    extra = {**DYNAMIC, "store": {"agent": address, "agent_timeout_ms": timeout_ms}}
    b = KVStoreHiCacheStorage(storage_config(extra))
    b.register_mem_pool_host(pool)
    return b


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_pages_written_by_one_client_are_read_by_another_through_the_agent(agent_address, layout):
    pool_a, pool_b = host_pool("mha", layout), host_pool("mha", layout)
    writer, reader = backend(agent_address, pool_a, 3000), backend(agent_address, pool_b, 3001)
    assert isinstance(writer.store, AgentStore) and reader.store is not writer.store
    src = pool_a.alloc(4 * PAGE)
    fill_random(pool_a, seed=21)
    keys = hashes(4, "agent-" + layout)
    assert reader.batch_exists(keys) == 0
    assert writer.batch_set_v1(keys, src) == [True] * 4
    assert reader.batch_exists(keys) == 4
    dst = pool_b.alloc(4 * PAGE)
    poison(pool_b, firsts(dst))
    assert reader.batch_get_v1(keys, dst) == [True] * 4
    for s, d in zip(firsts(src), firsts(dst)):
        assert torch.equal(page_bits(pool_b, d), page_bits(pool_a, s))
    missing = hashes(2, "never-stored")
    assert reader.batch_get_v1(keys[:1] + missing, pool_b.alloc(3 * PAGE)) == [True, False, False]
