"""vLLM connector tests run vLLM 0.33's own scheduler and connector classes on the CPU, with
vLLM's own test helpers (tests/v1/kv_connector/unit/utils.py of its sdist, fetched by
scripts/fetch_vllm_test_utils.sh into .vllm-upstream/). They skip, saying why, only where vLLM
is not installed; with KVSTORE_REQUIRE_VLLM=1 (CI) a missing piece is an error instead."""
import importlib.util
import os
import sys

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else teardown calls torch.accelerator APIs
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_env import UPSTREAM  # noqa: E402


@pytest.fixture(scope="session")
def vllm_utils():
    spec = importlib.util.spec_from_file_location("vllm_kv_connector_test_utils", UPSTREAM)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
