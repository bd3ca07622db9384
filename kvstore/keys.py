"""Chunk keys (DESIGN.md §2): the one place keys are made. Changing anything here breaks format.

    namespace(**fields) = BLAKE2b-128(UTF-8 of json.dumps(fields, sort_keys=True, separators=(",", ":")))
    key[i] = BLAKE2b-128(key=namespace, data=key[i-1] || tokens of chunk i as little-endian int64)
    key[-1] = namespace
    wrap_key(namespace, engine_key) = BLAKE2b-128(key=namespace, data=b"engine:" || UTF-8 of engine_key
                                                  (or its bytes))

Keys are chained, so a key names its whole prefix. A trailing partial chunk gets no key.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import numpy as np

from .errors import InvalidArgumentError

KEY_NBYTES = 16

# Namespace fields the connectors use; others are allowed (a namespace is any JSON object).
NAMESPACE_FIELDS = ("model", "revision", "dtype", "shard", "chunk_tokens", "format", "tenant", "lora")


def namespace(**fields) -> bytes:
    """The 16-byte namespace of a model/shard/format; see the module docstring."""
    try:
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    except TypeError as e:
        raise InvalidArgumentError(f"namespace fields must be JSON values: {e}") from None
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=KEY_NBYTES).digest()


def chunk_keys(tokens: Sequence[int] | np.ndarray, namespace: bytes, chunk_tokens: int) -> list[bytes]:
    """One chained key per FULL chunk of `tokens`."""
    check_key(namespace, what="namespace")
    if not isinstance(chunk_tokens, (int, np.integer)) or chunk_tokens <= 0:
        raise InvalidArgumentError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    ids = np.asarray(tokens)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise InvalidArgumentError(f"tokens must be a 1-D sequence of ints, got dtype {ids.dtype} ndim {ids.ndim}")
    data = ids.astype("<i8", copy=False).tobytes()
    step = int(chunk_tokens) * 8
    keys, prev = [], namespace
    for start in range(0, len(ids) // int(chunk_tokens) * step, step):
        prev = hashlib.blake2b(prev + data[start:start + step], digest_size=KEY_NBYTES, key=namespace).digest()
        keys.append(prev)
    return keys


def wrap_key(namespace: bytes, engine_key: str | bytes) -> bytes:
    """Our 16-byte key for a key an engine made itself (SGLang's chained page hashes): the
    engine's key already names its whole prefix, so it is only moved into our namespace. The
    "engine:" prefix keeps wrapped keys apart from chunk_keys' (whose data is 16 + 8n bytes)."""
    check_key(namespace, what="namespace")
    if isinstance(engine_key, str):
        data = engine_key.encode("utf-8")
    elif isinstance(engine_key, (bytes, bytearray)):
        data = bytes(engine_key)
    else:
        raise InvalidArgumentError(f"engine key must be str or bytes, got {type(engine_key).__name__}")
    if not data:
        raise InvalidArgumentError("engine key must not be empty")
    return hashlib.blake2b(b"engine:" + data, digest_size=KEY_NBYTES, key=namespace).digest()


def check_key(key: bytes, what: str = "key") -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_NBYTES:
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise InvalidArgumentError(f"{what} must be {KEY_NBYTES} bytes, got {got}")


def check_keys(keys: Sequence[bytes]) -> list[bytes]:
    keys = list(keys)
    for k in keys:
        check_key(k)
    return [bytes(k) for k in keys]
