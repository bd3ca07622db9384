"""Loads the compiled extension with a clear error when it is missing."""
try:
    from . import _C  # noqa: F401
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "kvstore._C is not built: install the package with `pip install -e .` "
        f"(needs cmake, ninja and a C++17 compiler); original error: {e}"
    ) from e

C = _C


def gpu_available() -> bool:
    return C.cuda_device_count() > 0
