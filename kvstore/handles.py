"""Async handles returned by Store.save / Store.load: `.wait(timeout_s)` and `.done()`."""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import KVTimeoutError

T = TypeVar("T")


@dataclass(frozen=True)
class SaveResult:
    stored: int              # chunks newly written to DRAM
    skipped: int             # chunks already present (or being written by another save)
    failed_keys: list[bytes] = field(default_factory=list)  # could not be stored (tier full)


@dataclass(frozen=True)
class LoadResult:
    loaded_chunks: int       # leading chunks now in the engine's blocks
    requested_chunks: int
    hits_by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.loaded_chunks == self.requested_chunks


class Handle(Generic[T]):
    def __init__(self, future: concurrent.futures.Future):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float | None = 60.0) -> T:
        """The job's result; raises its error, or KVTimeoutError after timeout_s (None: no limit)."""
        try:
            return self._future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise KVTimeoutError(f"transfer not finished after {timeout_s} s") from None


def completed(result: T) -> Handle[T]:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(result)
    return Handle(f)
