"""SGLang backend tests run SGLang 0.5.23's own storage classes on the CPU: its
HiCacheStorageConfig, host pools (every layout), StorageBackendFactory and HiCacheController.
They skip, saying why, only where SGLang is not installed; with KVSTORE_REQUIRE_SGLANG=1 (CI)
that is an error instead."""
import pytest

from sglang_env import install_torchvision_stub, missing_reason

if missing_reason() is None:
    install_torchvision_stub()


@pytest.fixture
def store_config(tmp_path):
    """A private kvstore config (its own SSD directory, small tiers) for one test."""
    return {"ssd_path": str(tmp_path / "ssd"), "dram_capacity_bytes": "16MiB", "dram_slab_bytes": "1MiB",
            "ssd_capacity_bytes": "64MiB", "ssd_slab_bytes": "4MiB", "cpu_threads": 2, "io_threads": 2}
