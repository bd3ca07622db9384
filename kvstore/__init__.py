"""kvstore: KV-cache offload and transfer engine for LLM inference (see DESIGN.md)."""
from .errors import (ConfigError, CudaError, GPUUnavailableError, InvalidArgumentError, KVStoreError,
                     KVTimeoutError, LayoutError, PoolFullError, StoreClosedError, TierIOError)
from ._native import C as _C_module, gpu_available
from .config import Config
from .keys import KEY_NBYTES, chunk_keys, namespace
from .layout import KVLayout
from .handles import Handle, LoadResult, SaveResult
from .store import Store

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "CudaError", "GPUUnavailableError", "Handle", "InvalidArgumentError", "KEY_NBYTES",
    "KVLayout", "KVStoreError", "KVTimeoutError", "LayoutError", "LoadResult", "PoolFullError", "SaveResult",
    "Store", "StoreClosedError", "TierIOError", "chunk_keys", "gpu_available", "namespace",
]
