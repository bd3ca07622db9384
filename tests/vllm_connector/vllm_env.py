"""Whether the vLLM connector tests can run here, and why not."""
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = Path(os.environ.get("KVSTORE_VLLM_TEST_UTILS", ROOT / ".vllm-upstream" / "utils.py"))
REQUIRED = os.environ.get("KVSTORE_REQUIRE_VLLM") == "1"  # CI: a missing piece fails, never skips


def missing_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        reason = "vLLM is not installed (see .ci/run for the CPU recipe)"
    elif not UPSTREAM.is_file():
        reason = f"vLLM's connector test helpers are missing at {UPSTREAM} (run scripts/fetch_vllm_test_utils.sh)"
    else:
        return None
    if REQUIRED:
        raise RuntimeError(f"KVSTORE_REQUIRE_VLLM=1 but {reason}")
    return reason
