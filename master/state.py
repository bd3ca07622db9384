"""MasterState: the cluster index and membership, in memory with LMDB behind it.

- Index: key -> replicas, each (node, tier, nbytes, checksum, generation, fingerprint), held by
  the native MasterIndex (csrc/master_index.h: about 70 bytes per key, batch calls without the
  GIL). Nodes are numbered here (a small integer per registered node, reused after the node is
  dropped, oldest free number first); the index only sees numbers. A replica belongs to a live
  node; when the node misses its heartbeat deadline (or re-registers with a reset inventory) its
  replicas go.
- Generations: one replica per (key, node, tier); an admit with a lower generation than the
  stored one is an older report arriving late and is ignored (not written either).
- Durability: every change is written to LMDB in the same call (one transaction per delta batch,
  one row per replica: key + tier + node id -> nbytes, checksum, generation, fingerprint), so a
  restarted master serves the last index at once; it loads the rows in bulk. The restarted master
  has a new epoch: agents learn it from their next heartbeat, re-register and re-send their full
  inventory (reset), which drops what no agent confirms. Nodes loaded from disk get one deadline
  to come back. LMDB commits do not fsync (the index is soft state: a killed master loses
  nothing, a machine crash may lose the latest batches, which the agents' resync replaces);
  flush() syncs, the server calls it periodically and at stop.
- Lookups (match) never pin and never write; they do not take the state lock (the index has its
  own reader lock), so they are not held up by LMDB writes. A stale entry is at worst a miss:
  fetchers verify checksums.
Thread-safe: one lock serialises mutations; LMDB writes happen under it.
"""
from __future__ import annotations

import collections
import itertools
import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import lmdb
import numpy as np

from kvstore._native import C
from kvstore.errors import InvalidArgumentError, KVStoreError

KEY_NBYTES = 16
TIERS = (1, 2)  # DRAM, SSD (kvstore_master.proto: Tier)
MAX_NODES = C.MASTER_INDEX_MAX_NODES
_REPLICA = struct.Struct("<QQQQ")  # nbytes, checksum, generation, fingerprint
_NODE = struct.Struct("<QQQ")      # dram_bytes, dram_free_bytes, ssd_bytes (+ address utf-8 after)
NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FORMAT = b"kvstore-master-1"
_LOAD_ROWS = 1 << 20  # rows per bulk load step


class TooManyNodesError(KVStoreError):
    """Every node number is in use (MAX_NODES live or loaded nodes)."""


@dataclass
class Node:
    node_id: str
    address: str
    dram_bytes: int = 0
    dram_free_bytes: int = 0
    ssd_bytes: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    replicas: int = 0
    number: int = -1  # the node's number in the index (assigned by MasterState)

    def pack(self) -> bytes:
        return _NODE.pack(self.dram_bytes, self.dram_free_bytes, self.ssd_bytes) + self.address.encode()

    @classmethod
    def unpack(cls, node_id: str, raw: bytes) -> "Node":
        dram, free, ssd = _NODE.unpack_from(raw)
        return cls(node_id, bytes(raw[_NODE.size:]).decode(), dram, free, ssd)


@dataclass(frozen=True)
class Admits:
    """A batch of admits as arrays: keys packed (16 bytes each), one array entry per key."""
    keys: bytes
    tiers: np.ndarray         # uint8
    nbytes: np.ndarray        # uint64
    checksums: np.ndarray     # uint64
    generations: np.ndarray   # uint64
    fingerprints: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.tiers)

    @classmethod
    def from_tuples(cls, admits: Iterable[tuple]) -> "Admits":
        """From (key, tier, nbytes, checksum, generation, fingerprint) tuples."""
        rows = list(admits)
        keys = pack_keys([r[0] for r in rows])
        cols = np.array([r[2:6] for r in rows], dtype=np.uint64).reshape(len(rows), 4)
        return cls(keys, np.array([r[1] for r in rows], dtype=np.uint8), cols[:, 0].copy(), cols[:, 1].copy(),
                   cols[:, 2].copy(), cols[:, 3].copy())


@dataclass(frozen=True)
class Evicts:
    keys: bytes
    tiers: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.tiers)

    @classmethod
    def from_tuples(cls, evicts: Iterable[tuple[bytes, int]]) -> "Evicts":
        rows = list(evicts)
        return cls(pack_keys([r[0] for r in rows]), np.array([r[1] for r in rows], dtype=np.uint8))


def pack_keys(keys: Sequence[bytes]) -> bytes:
    """16-byte keys -> one buffer; InvalidArgumentError naming the first key of another length."""
    if keys and set(map(len, keys)) != {KEY_NBYTES}:  # per key: a 15 + 17 byte pair packs to 32 bytes
        i = next(i for i, k in enumerate(keys) if len(k) != KEY_NBYTES)
        raise InvalidArgumentError(f"keys[{i}] is {len(keys[i])} bytes; keys are {KEY_NBYTES} bytes")
    return b"".join(keys)


class MasterState:
    def __init__(self, data_dir: str | os.PathLike, *, deadline_s: float = 10.0, map_size: int = 8 << 30):
        self.deadline_s = deadline_s
        self.epoch = secrets.randbits(63) or 1
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self.index = C.MasterIndex()
        self.nodes: dict[str, Node] = {}
        self._by_number: list[Node | None] = []  # number -> node
        self._free_numbers: collections.deque[int] = collections.deque()
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), max_dbs=4, map_size=map_size, subdir=True, lock=True, sync=False)
        self._meta = self.env.open_db(b"meta")
        self._nodes_db = self.env.open_db(b"nodes")
        self._replicas_db = self.env.open_db(b"replicas")
        self._load()

    # ---- node numbers ------------------------------------------------------------------------
    def _add_node(self, node: Node) -> None:
        if self._free_numbers:
            node.number = self._free_numbers.popleft()
            self._by_number[node.number] = node
        elif len(self._by_number) < MAX_NODES:
            node.number = len(self._by_number)
            self._by_number.append(node)
        else:
            raise TooManyNodesError(f"the master holds {MAX_NODES} nodes already")
        self.nodes[node.node_id] = node

    def _remove_node(self, node: Node) -> None:
        del self.nodes[node.node_id]
        self._by_number[node.number] = None
        self._free_numbers.append(node.number)

    # ---- persistence -------------------------------------------------------------------------
    @staticmethod
    def _rkey(key: bytes, tier: int, node_id: str) -> bytes:
        return key + bytes([tier]) + node_id.encode()

    def _load(self) -> None:
        now = time.monotonic()
        with self.env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None:
                txn.put(b"format", _FORMAT, db=self._meta)
            elif fmt != _FORMAT:
                raise RuntimeError(f"master data dir holds format {fmt!r}, expected {_FORMAT!r}")
            for raw_id, raw in txn.cursor(db=self._nodes_db):
                node = Node.unpack(raw_id.decode(), raw)
                node.last_seen = now  # one deadline to re-register from now
                self._add_node(node)
            numbers = {n.node_id.encode(): n.number for n in self.nodes.values()}
            rows = txn.cursor(db=self._replicas_db).iternext()
            while chunk := list(itertools.islice(rows, _LOAD_ROWS)):
                self._load_rows(chunk, numbers)
        for node in self.nodes.values():
            node.replicas = self.index.node_replicas(node.number)

    def _load_rows(self, rows: list[tuple[bytes, bytes]], numbers: dict[bytes, int]) -> None:
        nodes = np.fromiter((numbers.get(k[KEY_NBYTES + 1:], -1) for k, _ in rows), np.int64, len(rows))
        keep = np.flatnonzero(nodes >= 0)  # rows of nodes no longer known are stale
        if not len(keep):
            return
        keys = np.frombuffer(b"".join([k[:KEY_NBYTES] for k, _ in rows]), np.uint8).reshape(-1, KEY_NBYTES)
        tiers = np.fromiter((k[KEY_NBYTES] for k, _ in rows), np.uint8, len(rows))
        vals = np.frombuffer(b"".join([v for _, v in rows]), "<u8").reshape(-1, 4)
        self.index.admit(np.ascontiguousarray(keys[keep]), nodes[keep].astype(np.uint16), tiers[keep],
                         vals[keep, 0], vals[keep, 1], vals[keep, 2], vals[keep, 3])

    def flush(self) -> None:
        """Makes every committed change durable (fsync)."""
        self.env.sync(True)

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    # ---- membership --------------------------------------------------------------------------
    def register(self, node_id: str, address: str, caps: tuple[int, int, int]) -> None:
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None:
                node = Node(node_id, address)
                self._add_node(node)
            node.address = address
            node.dram_bytes, node.dram_free_bytes, node.ssd_bytes = caps
            node.last_seen = time.monotonic()
            with self.env.begin(write=True) as txn:
                txn.put(node_id.encode(), node.pack(), db=self._nodes_db)

    def heartbeat(self, node_id: str, caps: tuple[int, int, int] | None) -> bool:
        """False if the node is unknown (it must register and resync)."""
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None:
                return False
            node.last_seen = time.monotonic()
            if caps is not None:
                node.dram_bytes, node.dram_free_bytes, node.ssd_bytes = caps
            return True

    def known(self, node_id: str) -> bool:
        return node_id in self.nodes

    def place(self, writer: str, nbytes: int, count: int, exclude_writer: bool = False) -> list[tuple[str, str, int]]:
        """(node_id, address, count) targets for count objects of nbytes: the writer alone if its
        free DRAM holds them all (and it is not excluded), else the other live nodes with the
        highest free DRAM ratio first, each up to what its free DRAM holds. Placed bytes are taken
        off the node's free DRAM until its next heartbeat reports it again."""
        with self._lock:
            me = self.nodes.get(writer)
            if not exclude_writer and me is not None and me.dram_free_bytes >= nbytes * count:
                me.dram_free_bytes -= nbytes * count
                return [(me.node_id, me.address, count)]
            others = sorted((n for n in self.nodes.values() if n.node_id != writer and n.dram_bytes > 0
                             and n.dram_free_bytes >= nbytes),
                            key=lambda n: (-n.dram_free_bytes / n.dram_bytes, n.node_id))
            targets = []
            for node in others:
                take = min(count, node.dram_free_bytes // nbytes)
                node.dram_free_bytes -= take * nbytes
                targets.append((node.node_id, node.address, take))
                count -= take
                if count == 0:
                    break
            return targets

    def reap(self) -> list[str]:
        """Drops nodes past their deadline with all their replicas; returns their ids."""
        now = time.monotonic()
        with self._lock:
            dead = [n for n, node in self.nodes.items() if now - node.last_seen > self.deadline_s]
            for node_id in dead:
                self._drop_node(self.nodes[node_id])
        return dead

    def _drop_node(self, node: Node) -> None:
        with self.env.begin(write=True) as txn:
            self._drop_replicas_of(txn, node)
            txn.delete(node.node_id.encode(), db=self._nodes_db)
        self._remove_node(node)

    def _drop_replicas_of(self, txn, node: Node) -> int:
        keys, tiers = self.index.drop_node(node.number)
        suffix = node.node_id.encode()
        for i, tier in enumerate(tiers.tolist()):
            txn.delete(keys[i * KEY_NBYTES:(i + 1) * KEY_NBYTES] + bytes((tier,)) + suffix, db=self._replicas_db)
        node.replicas = 0
        return len(tiers)

    # ---- deltas ------------------------------------------------------------------------------
    def apply(self, node_id: str, reset: bool, admits: Admits | Iterable[tuple], evicts: Evicts | Iterable[tuple]
              ) -> tuple[int, int]:
        """Applies one batch (validated by the caller): admits as Admits or (key, tier, nbytes,
        checksum, generation, fingerprint) tuples, evicts as Evicts or (key, tier) tuples; admits
        before evicts. Returns (admitted, evicted). KeyError: the node is not registered."""
        if not isinstance(admits, Admits):
            admits = Admits.from_tuples(admits)
        if not isinstance(evicts, Evicts):
            evicts = Evicts.from_tuples(evicts)
        for what, tiers in (("admit", admits.tiers), ("evict", evicts.tiers)):
            if len(tiers) and not np.isin(tiers, TIERS).all():
                raise InvalidArgumentError(f"every {what} needs tier DRAM (1) or SSD (2)")
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None:
                raise KeyError(node_id)
            node.last_seen = time.monotonic()
            suffixes = [bytes((t,)) + node_id.encode() for t in range(max(TIERS) + 1)]
            with self.env.begin(write=True) as txn:
                if reset:
                    self._drop_replicas_of(txn, node)
                admitted = evicted = 0
                if len(admits):
                    outcome = self.index.admit(admits.keys, np.full(len(admits), node.number, np.uint16), admits.tiers,
                                               admits.nbytes, admits.checksums, admits.generations, admits.fingerprints)
                    done = np.flatnonzero(outcome)  # ignored ones (older generations) are not written
                    admitted = len(done)
                    vals = np.stack([admits.nbytes, admits.checksums, admits.generations, admits.fingerprints],
                                    axis=1).astype("<u8").tobytes()
                    k, t = admits.keys, admits.tiers.tolist()
                    rows = [(k[i * KEY_NBYTES:(i + 1) * KEY_NBYTES] + suffixes[t[i]], vals[i * 32:(i + 1) * 32])
                            for i in (range(len(admits)) if admitted == len(admits) else done.tolist())]
                    txn.cursor(db=self._replicas_db).putmulti(rows)
                if len(evicts):
                    gone = self.index.evict(evicts.keys, np.full(len(evicts), node.number, np.uint16), evicts.tiers)
                    k, t = evicts.keys, evicts.tiers.tolist()
                    for i in np.flatnonzero(gone).tolist():
                        txn.delete(k[i * KEY_NBYTES:(i + 1) * KEY_NBYTES] + suffixes[t[i]], db=self._replicas_db)
                        evicted += 1
            node.replicas = self.index.node_replicas(node.number)
        return admitted, evicted

    # ---- queries -----------------------------------------------------------------------------
    def match(self, keys: bytes | Sequence[bytes], exclude_node: str = ""
              ) -> tuple[list[tuple[str, int, int]], list[dict]]:
        """keys: packed (16 * N bytes) or a sequence of 16-byte keys. Returns (runs: (node_id, tier
        or 0 for any tier, length), candidates best first (longest run, then most free DRAM): dicts
        of node_id, address, length, checksums and nbytes (uint64 arrays) of the run). Pins nothing."""
        if not isinstance(keys, (bytes, bytearray, memoryview)):
            keys = pack_keys(list(keys))
        excluded = self.nodes.get(exclude_node) if exclude_node else None
        raw_runs, raw_cands = self.index.match(keys, excluded.number if excluded is not None else -1)
        by_number = self._by_number
        runs = []
        for number, tier, length in raw_runs.tolist():
            node = by_number[number]
            if node is not None:
                runs.append((node.node_id, tier, length))
        cands = []
        for number, checksums, nbytes in raw_cands:
            node = by_number[number]
            if node is not None:
                cands.append((node, checksums, nbytes))
        cands.sort(key=lambda c: (-len(c[1]), -c[0].dram_free_bytes, c[0].node_id))
        return runs, [{"node_id": n.node_id, "address": n.address, "length": len(cs), "checksums": cs, "nbytes": nb}
                      for n, cs, nb in cands]

    def status(self) -> dict:
        now = time.monotonic()
        with self._lock:
            return {"epoch": self.epoch, "keys": len(self.index), "replicas": self.index.replicas,
                    "index_bytes": self.index.memory_bytes, "uptime_s": now - self.started_at,
                    "nodes": [{"node_id": n.node_id, "address": n.address, "caps": (n.dram_bytes, n.dram_free_bytes,
                                                                                    n.ssd_bytes),
                               "replicas": n.replicas, "age_s": now - n.last_seen} for n in self.nodes.values()]}
