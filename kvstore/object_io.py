"""Reading an object for a transfer, shared by the embedded Store and the node agent: pin it in
DRAM, promoting it from SSD first if it is only there (checksum verified on the way)."""
from __future__ import annotations

import logging
from typing import Callable

from .pinned_pool import PinnedPool, Slot
from .ssd_tier import SsdTier

log = logging.getLogger(__name__)


def acquire_for_load(dram: PinnedPool, ssd: SsdTier | None, key: bytes, nbytes: int, fingerprint: int,
                     on_promoted: Callable[[int], None] = lambda nbytes: None) -> tuple[Slot | None, str]:
    """(slot pinned for reading, tier it came from) or (None, "") on a miss, including an object
    of another layout (fingerprint or size). Raises PoolFullError when DRAM has no room for a
    promotion; the caller decides whether that is a miss or a reason to drain first."""
    slot = dram.acquire(key)
    if slot is not None:
        if slot.fingerprint == fingerprint and slot.nbytes == nbytes:
            return slot, "dram"
        dram.release(slot)
        return None, ""
    if ssd is None or not ssd.contains(key):
        return None, ""
    slot = dram.reserve(key, nbytes, fingerprint)
    if slot is None:  # another thread or client promoted or saved it meanwhile
        return acquire_for_load(dram, None, key, nbytes, fingerprint)
    try:
        entry = ssd.read(key, slot.view, fingerprint)
    except BaseException:
        dram.abort(slot)
        raise
    if entry is None or entry.nbytes != nbytes:
        dram.abort(slot)
        return None, ""
    dram.commit(slot, persisted=True)
    on_promoted(nbytes)
    slot = dram.acquire(key)
    return (slot, "ssd") if slot is not None else (None, "")


def read_leading_run(source, keys: list[bytes], nbytes: int, fingerprint: int,
                     drain: Callable[[int, int], None]) -> tuple[int, dict[str, int]]:
    """Copies objects out while they are present: for key i, drain(i, object_ptr). Stops at the
    first miss, read error, or a slot reused during the copy (source.release returns False).
    `source` answers acquire_for_load(key, nbytes, fingerprint) and release(slot).
    Returns (objects read, hits per tier)."""
    from .errors import KVStoreError

    hits: dict[str, int] = {}
    for i, key in enumerate(keys):
        try:
            slot, tier = source.acquire_for_load(key, nbytes, fingerprint)
        except KVStoreError as e:  # no DRAM room to promote an SSD hit, an SSD I/O error
            log.warning("kvstore: object read failed, treated as a miss: %s", e)
            slot = None
        if slot is None:
            return i, hits
        try:
            drain(i, slot.ptr)
        finally:
            valid = source.release(slot)
        if valid is False:
            return i, hits
        hits[tier] = hits.get(tier, 0) + 1
    return len(keys), hits
