"""MasterState: the cluster index and membership, in memory with LMDB behind it.

- Index: key -> replicas, each (node_id, tier, nbytes, checksum, generation, fingerprint). A
  replica belongs to a live node; when the node misses its heartbeat deadline (or re-registers
  with a reset inventory) its replicas go.
- Durability: every change is written to LMDB in the same call (one transaction per batch), so a
  restarted master serves the last index at once. The restarted master has a new epoch: agents
  learn it from their next heartbeat, re-register and re-send their full inventory (reset), which
  drops what no agent confirms. Nodes loaded from disk get one deadline to come back.
- Lookups (match) never pin and never write.
Thread-safe: one lock; LMDB writes happen under it (one writer at a time is LMDB's rule anyway).
"""
from __future__ import annotations

import os
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import lmdb

KEY_NBYTES = 16
TIERS = (1, 2)  # DRAM, SSD (kvstore_master.proto: Tier)
_REPLICA = struct.Struct("<QQQQ")  # nbytes, checksum, generation, fingerprint
_NODE = struct.Struct("<QQQ")      # dram_bytes, dram_free_bytes, ssd_bytes (+ address utf-8 after)
NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FORMAT = b"kvstore-master-1"


@dataclass
class Node:
    node_id: str
    address: str
    dram_bytes: int = 0
    dram_free_bytes: int = 0
    ssd_bytes: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    replicas: int = 0

    def pack(self) -> bytes:
        return _NODE.pack(self.dram_bytes, self.dram_free_bytes, self.ssd_bytes) + self.address.encode()

    @classmethod
    def unpack(cls, node_id: str, raw: bytes) -> "Node":
        dram, free, ssd = _NODE.unpack_from(raw)
        return cls(node_id, bytes(raw[_NODE.size:]).decode(), dram, free, ssd)


# (node_id, tier, nbytes, checksum, generation, fingerprint)
Replica = tuple


class MasterState:
    def __init__(self, data_dir: str | os.PathLike, *, deadline_s: float = 10.0, map_size: int = 8 << 30):
        self.deadline_s = deadline_s
        self.epoch = secrets.randbits(63) or 1
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self.index: dict[bytes, tuple[Replica, ...]] = {}
        self.nodes: dict[str, Node] = {}
        path = Path(data_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), max_dbs=4, map_size=map_size, subdir=True, lock=True)
        self._meta = self.env.open_db(b"meta")
        self._nodes_db = self.env.open_db(b"nodes")
        self._replicas_db = self.env.open_db(b"replicas")
        self._load()

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
                self.nodes[node.node_id] = node
            index: dict[bytes, list] = {}
            for rkey, raw in txn.cursor(db=self._replicas_db):
                key, tier, node_id = rkey[:KEY_NBYTES], rkey[KEY_NBYTES], rkey[KEY_NBYTES + 1:].decode()
                if node_id not in self.nodes:
                    continue
                nbytes, checksum, gen, fp = _REPLICA.unpack(raw)
                index.setdefault(key, []).append((node_id, tier, nbytes, checksum, gen, fp))
                self.nodes[node_id].replicas += 1
        self.index = {k: tuple(v) for k, v in index.items()}

    def close(self) -> None:
        self.env.close()

    # ---- membership --------------------------------------------------------------------------
    def register(self, node_id: str, address: str, caps: tuple[int, int, int]) -> None:
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None:
                node = self.nodes[node_id] = Node(node_id, address)
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

    def reap(self) -> list[str]:
        """Drops nodes past their deadline with all their replicas; returns their ids."""
        now = time.monotonic()
        with self._lock:
            dead = [n for n, node in self.nodes.items() if now - node.last_seen > self.deadline_s]
            for node_id in dead:
                self._drop_node(node_id)
        return dead

    def _drop_node(self, node_id: str) -> None:
        with self.env.begin(write=True) as txn:
            self._drop_replicas_of(txn, node_id)
            txn.delete(node_id.encode(), db=self._nodes_db)
        self.nodes.pop(node_id, None)

    def _drop_replicas_of(self, txn, node_id: str) -> int:
        dropped = 0
        for key in [k for k, reps in self.index.items() if any(r[0] == node_id for r in reps)]:
            reps = self.index[key]
            keep = tuple(r for r in reps if r[0] != node_id)
            for r in reps:
                if r[0] == node_id:
                    txn.delete(self._rkey(key, r[1], node_id), db=self._replicas_db)
                    dropped += 1
            if keep:
                self.index[key] = keep
            else:
                del self.index[key]
        node = self.nodes.get(node_id)
        if node is not None:
            node.replicas = 0
        return dropped

    # ---- deltas ------------------------------------------------------------------------------
    def apply(self, node_id: str, reset: bool, admits: Iterable[tuple], evicts: Iterable[tuple[bytes, int]]
              ) -> tuple[int, int]:
        """Applies one batch (validated by the caller): admits are (key, tier, nbytes, checksum,
        generation, fingerprint), evicts (key, tier). Returns (admitted, evicted)."""
        admitted = evicted = 0
        with self._lock:
            node = self.nodes.get(node_id)
            if node is None:
                raise KeyError(node_id)
            node.last_seen = time.monotonic()
            with self.env.begin(write=True) as txn:
                if reset:
                    self._drop_replicas_of(txn, node_id)
                for key, tier, nbytes, checksum, gen, fp in admits:
                    old = self.index.get(key, ())
                    mine = next((r for r in old if r[0] == node_id and r[1] == tier), None)
                    if mine is not None and mine[4] > gen:
                        continue  # an older report arriving late
                    rep = (node_id, tier, nbytes, checksum, gen, fp)
                    self.index[key] = tuple(r for r in old if r is not mine) + (rep,)
                    txn.put(self._rkey(key, tier, node_id), _REPLICA.pack(nbytes, checksum, gen, fp),
                            db=self._replicas_db)
                    if mine is None:
                        node.replicas += 1
                    admitted += 1
                for key, tier in evicts:
                    old = self.index.get(key)
                    if not old:
                        continue
                    keep = tuple(r for r in old if not (r[0] == node_id and r[1] == tier))
                    if len(keep) == len(old):
                        continue
                    txn.delete(self._rkey(key, tier, node_id), db=self._replicas_db)
                    node.replicas -= 1
                    evicted += 1
                    if keep:
                        self.index[key] = keep
                    else:
                        del self.index[key]
        return admitted, evicted

    # ---- queries -----------------------------------------------------------------------------
    def match(self, keys: list[bytes], exclude_node: str = "") -> tuple[list[tuple[str, int, int]], list[dict]]:
        """(runs: (node_id, tier or 0 for any, length), candidates best first: node_id, address,
        length, checksums, nbytes of the run). Pins nothing."""
        index = self.index
        nodes = self.nodes
        tier_runs: dict[tuple[str, int], int] = {}
        any_runs: dict[str, list] = {}  # node -> [checksums, nbytes]
        first = index.get(keys[0], ()) if keys else ()
        active_t = {(r[0], r[1]) for r in first if r[0] in nodes}
        active_n = {r[0] for r in first if r[0] in nodes}
        for key_i, key in enumerate(keys):
            if not active_t and not active_n:
                break
            reps = index.get(key, ())
            have_t = {(r[0], r[1]) for r in reps}
            for nt in list(active_t):
                if nt in have_t:
                    tier_runs[nt] = tier_runs.get(nt, 0) + 1
                else:
                    active_t.discard(nt)
            for node_id in list(active_n):
                rep = next((r for r in reps if r[0] == node_id), None)
                if rep is None:
                    active_n.discard(node_id)
                    continue
                run = any_runs.setdefault(node_id, [[], []])
                run[0].append(rep[3])
                run[1].append(rep[2])
        runs = [(n, t, length) for (n, t), length in tier_runs.items()]
        runs += [(n, 0, len(v[0])) for n, v in any_runs.items()]
        cands = [n for n in any_runs if n != exclude_node and n in nodes]
        cands.sort(key=lambda n: (-len(any_runs[n][0]), -nodes[n].dram_free_bytes, n))
        candidates = [{"node_id": n, "address": nodes[n].address, "length": len(any_runs[n][0]),
                       "checksums": any_runs[n][0], "nbytes": any_runs[n][1]} for n in cands]
        return runs, candidates

    def status(self) -> dict:
        now = time.monotonic()
        with self._lock:
            return {"epoch": self.epoch, "keys": len(self.index),
                    "replicas": sum(len(v) for v in self.index.values()),
                    "uptime_s": now - self.started_at,
                    "nodes": [{"node_id": n.node_id, "address": n.address, "caps": (n.dram_bytes, n.dram_free_bytes,
                                                                                    n.ssd_bytes),
                               "replicas": n.replicas, "age_s": now - n.last_seen} for n in self.nodes.values()]}
