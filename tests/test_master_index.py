"""kvstore._C.MasterIndex (csrc/master_index.h) against a plain Python model on random data:
admits with the generation rule, evicts, drop_node, counters, match runs and candidates, table
growth and backward-shift deletion; and the argument checks (nothing changes on a bad batch)."""
from __future__ import annotations

import numpy as np
import pytest

from kvstore._native import C
from kvstore.errors import InvalidArgumentError

DRAM, SSD = 1, 2


class Model:
    """The index as a dict: key -> {(node, tier): (nbytes, checksum, generation, fingerprint)}."""

    def __init__(self):
        self.d: dict[bytes, dict[tuple[int, int], tuple[int, int, int, int]]] = {}

    def admit(self, key, node, tier, nbytes, checksum, gen, fp) -> int:
        reps = self.d.setdefault(key, {})
        old = reps.get((node, tier))
        if old is not None and old[2] > gen:
            return 0
        reps[(node, tier)] = (nbytes, checksum, gen, fp)
        return 1 if old is None else 2

    def evict(self, key, node, tier) -> int:
        reps = self.d.get(key, {})
        if (node, tier) not in reps:
            return 0
        del reps[(node, tier)]
        if not reps:
            del self.d[key]
        return 1

    def drop(self, node) -> set[tuple[bytes, int]]:
        gone = set()
        for key in list(self.d):
            for nt in [nt for nt in self.d[key] if nt[0] == node]:
                del self.d[key][nt]
                gone.add((key, nt[1]))
            if not self.d[key]:
                del self.d[key]
        return gone

    def entries(self) -> set[tuple]:
        return {(k, n, t) + v for k, reps in self.d.items() for (n, t), v in reps.items()}

    def match(self, keys, exclude):
        first = self.d.get(keys[0], {}) if keys else {}
        runs, cands = {}, {}
        for node, tier in first:
            length = 0
            while length < len(keys) and (node, tier) in self.d.get(keys[length], {}):
                length += 1
            runs[(node, tier)] = length
        for node in {n for n, _ in first}:
            cs, nb = [], []
            for key in keys:
                reps = self.d.get(key, {})
                r = reps.get((node, DRAM)) or reps.get((node, SSD))  # the DRAM copy first
                if r is None:
                    break
                cs.append(r[1])
                nb.append(r[0])
            runs[(node, 0)] = len(cs)
            if node != exclude:
                cands[node] = (cs, nb)
        return runs, cands


def admit(ix, model, rows):
    """rows: (key, node, tier, nbytes, checksum, gen, fp); checks each outcome against the model."""
    if not rows:
        return
    cols = list(zip(*rows))
    out = ix.admit(b"".join(cols[0]), np.array(cols[1], np.uint16), np.array(cols[2], np.uint8),
                   *(np.array(c, np.uint64) for c in cols[3:]))
    assert out.tolist() == [model.admit(*r) for r in rows]


def evict(ix, model, rows):
    if not rows:
        return
    keys, nodes, tiers = zip(*rows)
    out = ix.evict(b"".join(keys), np.array(nodes, np.uint16), np.array(tiers, np.uint8))
    assert out.tolist() == [model.evict(*r) for r in rows]


def check_same(ix, model):
    e = ix.entries()
    keys = e["keys"]
    got = {(keys[i * 16:(i + 1) * 16], int(e["nodes"][i]), int(e["tiers"][i]), int(e["nbytes"][i]),
            int(e["checksums"][i]), int(e["generations"][i]), int(e["fingerprints"][i]))
           for i in range(len(e["nodes"]))}
    assert len(got) == len(e["nodes"]) == ix.replicas
    assert got == model.entries()
    assert len(ix) == len(model.d)
    for node in range(8):
        assert ix.node_replicas(node) == sum(1 for reps in model.d.values() for n, _ in reps if n == node)


def check_match(ix, model, keys, exclude):
    runs, cands = ix.match(b"".join(keys), exclude)
    want_runs, want_cands = model.match(keys, exclude)
    assert {(int(n), int(t)): int(length) for n, t, length in runs} == want_runs
    assert {int(n): (cs.tolist(), nb.tolist()) for n, cs, nb in cands} == want_cands


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_match_a_python_model(seed):
    rng = np.random.default_rng(seed)
    universe = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(3000)]
    universe[1] = bytes(16)  # the all-zero key is an ordinary key
    ix, model = C.MasterIndex(), Model()

    def rand_rows(n):
        return [(universe[int(rng.integers(len(universe)))], int(rng.integers(0, 8)), int(rng.integers(1, 3)),
                 int(rng.integers(1, 1 << 40)), int(rng.integers(0, 1 << 63)) * 2 + 1, int(rng.integers(0, 20)),
                 int(rng.integers(0, 4))) for _ in range(n)]

    for step in range(60):
        admit(ix, model, rand_rows(int(rng.integers(0, 400))))  # duplicates inside a batch included
        evict(ix, model, [r[:3] for r in rand_rows(int(rng.integers(0, 150)))])
        if step % 15 == 14:
            node = int(rng.integers(0, 8))
            keys, tiers = ix.drop_node(node)
            assert {(keys[i * 16:(i + 1) * 16], int(t)) for i, t in enumerate(tiers)} == model.drop(node)
        check_same(ix, model)
        # Runs over prefix-like sequences: mostly present keys, some absent, random lengths.
        present = list(model.d)
        for _ in range(20):
            n = int(rng.integers(1, 60))
            seq = [present[int(rng.integers(len(present)))] if present and rng.random() < 0.97
                   else universe[int(rng.integers(len(universe)))] for _ in range(n)]
            check_match(ix, model, seq, int(rng.integers(-1, 8)))


def test_long_runs_across_nodes_and_tiers():
    ix, model = C.MasterIndex(), Model()
    keys = [i.to_bytes(16, "little") for i in range(5000)]
    admit(ix, model, [(k, 0, DRAM, 100 + i, i, 1, 0) for i, k in enumerate(keys)])
    admit(ix, model, [(k, 0, SSD, 100 + i, i + 7, 1, 0) for i, k in enumerate(keys[:3000])])  # DRAM copy wins
    admit(ix, model, [(k, 1, SSD, 50, 9, 1, 0) for k in keys[:4000]])
    evict(ix, model, [(keys[2500], 0, DRAM)])  # node 0 keeps it on SSD: its any-tier run goes on
    for exclude in (-1, 0, 1):
        check_match(ix, model, keys, exclude)
        check_match(ix, model, keys[17:4099], exclude)  # group boundaries of the prefetching loop
    runs, cands = ix.match(b"".join(keys))
    assert {(int(n), int(t)): int(length) for n, t, length in runs} == {(0, DRAM): 2500, (0, SSD): 3000, (0, 0): 5000,
                                                                        (1, SSD): 4000, (1, 0): 4000}
    assert ix.match(b"")[1] == [] and ix.match(b"\xff" * 16 + keys[0])[1] == []  # the first key decides


def test_generation_rule():
    ix, model = C.MasterIndex(), Model()
    k = b"k" * 16
    admit(ix, model, [(k, 3, DRAM, 10, 111, 5, 0)])
    admit(ix, model, [(k, 3, DRAM, 10, 222, 4, 0)])   # older: ignored
    admit(ix, model, [(k, 3, SSD, 10, 333, 1, 0)])    # another tier: its own replica
    admit(ix, model, [(k, 3, DRAM, 10, 444, 5, 0)])   # equal: replaces
    admit(ix, model, [(k, 3, DRAM, 12, 555, 9, 0), (k, 3, DRAM, 13, 666, 8, 0)])  # in order inside a batch
    assert ix.match(k)[1][0][1].tolist() == [555]
    check_same(ix, model)


def test_growth_and_deletion_keep_every_key_findable():
    rng = np.random.default_rng(5)
    n = 200_000
    raw = rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64)
    raw[: n // 2, 1] = 0  # half the keys share their upper words: structured keys hash well too
    keys = raw.tobytes()
    ones = np.ones(n, np.uint64)
    ix = C.MasterIndex()
    assert (ix.admit(keys, np.zeros(n, np.uint16), np.ones(n, np.uint8), ones, np.arange(n, dtype=np.uint64), ones,
                     ones) == 1).all()
    assert len(ix) == n and ix.memory_bytes < 110 * n  # 20 B per slot at load 3/8..3/4 + 40 B per replica
    gone = rng.permutation(n)[: n // 2]
    assert ix.evict(np.ascontiguousarray(raw[gone]).tobytes(), np.zeros(len(gone), np.uint16),
                    np.ones(len(gone), np.uint8)).all()
    alive = np.setdiff1d(np.arange(n), gone)
    for i in alive[:: 97].tolist():  # each surviving key is found with its own checksum
        assert ix.match(keys[i * 16:(i + 1) * 16])[1][0][1].tolist() == [i]
    for i in gone[:: 97].tolist():
        assert ix.match(keys[i * 16:(i + 1) * 16])[0].shape == (0, 3)
    assert len(ix) == ix.replicas == len(alive) == ix.node_replicas(0)
    dropped, _ = ix.drop_node(0)
    assert len(dropped) == 16 * len(alive) and len(ix) == ix.replicas == 0
    assert ix.drop_node(0)[0] == b""


def test_churn_at_high_load_wraps_probe_runs_around_the_table_end():
    # The table starts at 1024 slots and grows past 768 keys: 740 keys keep it near its highest
    # load, where probe runs are long and some wrap past the last slot; each deletion shifts them.
    rng = np.random.default_rng(11)
    ix = C.MasterIndex()
    one = np.ones(1, np.uint64)
    present: list[bytes] = []

    def put(key: bytes) -> None:
        assert ix.admit(key, np.zeros(1, np.uint16), np.ones(1, np.uint8), one, one, one, one).tolist() == [1]
        present.append(key)

    for _ in range(740):
        put(bytes(rng.integers(0, 256, 16, dtype=np.uint8)))
    for step in range(3000):
        key = present.pop(int(rng.integers(len(present))))
        assert ix.evict(key, np.zeros(1, np.uint16), np.ones(1, np.uint8)).tolist() == [1]
        put(bytes(rng.integers(0, 256, 16, dtype=np.uint8)))
        if step % 100 == 0:
            assert all(ix.match(k)[0].shape == (2, 3) for k in present)  # every key still found
    assert ix.memory_bytes < 1024 * 20 + (1 << 16) * 40 + 65535 * 8 + 1  # never grew
    assert ix.evict(b"".join(present), np.zeros(740, np.uint16), np.ones(740, np.uint8)).all()
    assert len(ix) == 0


def test_bad_batches_raise_and_change_nothing():
    ix, model = C.MasterIndex(), Model()
    admit(ix, model, [(b"a" * 16, 1, DRAM, 1, 1, 1, 0)])
    one = np.ones(1, np.uint64)
    two = np.ones(2, np.uint64)
    bad = [
        lambda: ix.admit(b"x" * 17, np.ones(1, np.uint16), np.ones(1, np.uint8), one, one, one, one),
        lambda: ix.admit(b"x" * 32, np.ones(2, np.uint16), np.ones(2, np.uint8), two, two, two, one),
        lambda: ix.admit(b"x" * 32, np.array([1, 65535], np.uint16), np.ones(2, np.uint8), two, two, two, two),
        lambda: ix.admit(b"x" * 32, np.ones(2, np.uint16), np.array([1, 3], np.uint8), two, two, two, two),
        lambda: ix.admit(b"x" * 16, np.ones(1, np.uint16), np.zeros(1, np.uint8), one, one, one, one),
        lambda: ix.evict(b"a" * 16, np.ones(1, np.uint16), np.zeros(1, np.uint8)),
        lambda: ix.evict(b"a" * 15, np.ones(1, np.uint16), np.ones(1, np.uint8)),
        lambda: ix.match(b"a" * 31),
        lambda: ix.drop_node(65535),
    ]
    for call in bad:
        with pytest.raises(InvalidArgumentError):
            call()
    check_same(ix, model)
    assert C.MASTER_INDEX_MAX_NODES == 65535
