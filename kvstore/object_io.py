"""Object reads and writes shared by the embedded Store, the node agent and its client: pin an
object in DRAM (promoting it from SSD, checksum verified), copy out a leading run of objects,
and fill-and-commit a batch of new objects."""
from __future__ import annotations

import logging
from typing import Callable

from .errors import KVStoreError
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


def write_objects(store, keys: list[bytes], nbytes: int, fingerprint: int, fill: Callable[[int, int], None],
                  abort: Callable[[list], None]) -> list[bool]:
    """Reserves slots for the keys not stored yet (store.reserve_for_save), fill(i, object_ptr)
    writes object i, then store.commit_saved publishes them; abort(slots) undoes the reservations
    if a fill fails. Per key: stored now or already present (False: no room)."""
    slots, _, failed = store.reserve_for_save(keys, nbytes, fingerprint)
    try:
        for i, slot in slots:
            fill(i, slot.ptr)
    except BaseException:
        if slots:
            abort([slot for _, slot in slots])
        raise
    failed_set = set(failed)
    try:
        store.commit_saved([slot for _, slot in slots])
    except KVStoreError as e:  # e.g. the node agent died before the commit: nothing new is stored
        log.warning("kvstore: commit of %d objects failed: %s", len(slots), e)
        failed_set.update(slot.key for _, slot in slots)
    return [k not in failed_set for k in keys]
