"""Typed errors. Every failure a caller can act on is a KVStoreError subclass; the native
extension raises the same classes (csrc/bindings.cpp maps its C++ errors onto them)."""


class KVStoreError(Exception):
    """Base of every kvstore error."""


class ConfigError(KVStoreError, ValueError):
    """Unknown config key, bad value, or an impossible combination."""


class InvalidArgumentError(KVStoreError, ValueError):
    """Wrong sizes, block ids out of range, keys of the wrong length, and similar bad input."""


class LayoutError(InvalidArgumentError):
    """A KV cache tensor whose shape, dtype or strides do not describe a supported paged layout."""


class GPUUnavailableError(KVStoreError, RuntimeError):
    """A GPU entry point was called where no CUDA device (or no CUDA build) is available."""


class CudaError(KVStoreError, RuntimeError):
    """A CUDA runtime call failed."""


class PoolFullError(KVStoreError):
    """No slot can be reserved: the tier is at capacity and nothing is evictable."""


class TierIOError(KVStoreError, OSError):
    """A tier's file or memory could not be created, read or written."""


class KVTimeoutError(KVStoreError, TimeoutError):
    """A wait ran past its timeout."""


class StoreClosedError(KVStoreError):
    """The store was closed."""
