"""Cluster with real processes on loopback: a master (`python -m kvstore.master`) and node agents
(`python -m kvstore.agent --master ...`) on tmp_path sockets; engines are this process's
AgentStores. Save on node A, load bit-exact on node B through the remote tier; SIGKILL of the
source mid-fetch; a master restart with a stale index."""
from __future__ import annotations

import ctypes
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kvstore
from kvstore.agent_client import AgentClient
from kvstore.agent import protocol as P
from kvstore.agent_store import AgentStore
from kvstore.master.client import MasterClient

from kv_caches import expected_object, vllm

pytestmark = pytest.mark.slow
CHUNK = 8
DEADLINE_S = 1.5


def wait_until(cond, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s} s"
        time.sleep(0.05)


class _Service:
    """A daemon subprocess (master or agent) the test stops or kills; `proc` is set by start()."""
    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc.stdout.close()
            self.proc = None


class Master(_Service):
    def __init__(self, tmp_path: Path, port: int = 0):
        self.data_dir = str(tmp_path / "master")
        self.port = port
        self.proc = None

    def start(self) -> "Master":
        self.proc = subprocess.Popen([sys.executable, "-m", "kvstore.master", "--port", str(self.port), "--data-dir",
                                      self.data_dir, "--deadline-s", str(DEADLINE_S), "--heartbeat-s", "0.2"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, f"master did not start: {line}"
        self.port = int(m.group(1))
        self.first_line = line
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> MasterClient:
        return MasterClient(self.address, timeout_s=5)

    def status(self):
        c = self.client()
        try:
            return c.status()
        finally:
            c.close()


class Node(_Service):
    def __init__(self, tmp_path: Path, name: str, master: Master, dram: str = "16MiB", serve_delay_ms: float = 0):
        self.name = name
        self.socket = str(tmp_path / f"{name}.sock")
        self.master = master
        self.dram = dram
        self.serve_delay_ms = serve_delay_ms
        self.proc = None

    def start(self) -> "Node":
        cmd = [sys.executable, "-m", "kvstore.agent", "--socket", self.socket, "--dram-capacity", self.dram,
               "--ssd-path", "none", "--set", "dram_slab_bytes=1MiB", "--set", "cpu_threads=1", "--set",
               "io_threads=1", "--drain-s", "0.2", "--master", self.master.address, "--node-id", self.name,
               "--debug-serve-delay-ms", str(self.serve_delay_ms)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert "listening" in line and "serving peers" in line, f"agent did not start: {line}"
        return self

    def store(self) -> AgentStore:
        return kvstore.Store(agent="unix://" + self.socket, chunk_tokens=CHUNK, agent_timeout_ms=20_000,
                             ssd_path=None)

    def status(self) -> dict:
        c = AgentClient(self.socket, timeout_s=5)
        try:
            return c.status()
        finally:
            c.close()


@pytest.fixture
def cluster(tmp_path):
    started = []

    def start(*nodes_spec):
        master = Master(tmp_path).start()
        started.append(master)
        nodes = []
        for name, kw in nodes_spec:
            node = Node(tmp_path, name, master, **kw).start()
            started.append(node)
            nodes.append(node)
        wait_until(lambda: len(master.status().nodes) == len(nodes), what="nodes registered")
        return master, nodes

    yield start
    for p in reversed(started):
        p.stop()


def replicas_on(master: Master, node_id: str) -> int:
    return next((n.replicas for n in master.status().nodes if n.node_id == node_id), -1)


def request(seed: int, chunks: int = 4):
    rng = np.random.default_rng(seed)
    cache = vllm(rng, "LBNHC", B=4 * chunks)
    tokens = rng.integers(0, 50_000, size=chunks * CHUNK)
    keys = kvstore.chunk_keys(tokens, kvstore.namespace(model="remote-test"), CHUNK)
    ids = rng.permutation(cache.layout.num_blocks)[:chunks * 2]
    return cache, keys, ids


def objects(cache, ids):
    return [expected_object(cache, ids[2 * c:2 * c + 2]) for c in range(len(ids) // 2)]


def test_save_on_a_load_on_b_bit_exact_through_the_remote_tier(cluster):
    master, (a, b, c) = cluster(("a", {}), ("b", {}), ("c", {}))
    cache, keys, ids = request(3)
    want = objects(cache, ids)
    with a.store() as sa:
        assert sa.save(keys, cache.layout, ids).wait(30).stored == len(keys)
    wait_until(lambda: replicas_on(master, "a") == len(keys), what="A's deltas reported")
    for b_ in cache.buffers:
        b_.view(np.uint8)[...] = 0xA5
    with b.store() as sb:
        assert sb.lookup(keys) == len(keys)          # the master places them on A
        result = sb.load(keys, cache.layout, ids).wait(30)
        assert result.complete, result
        assert all(np.array_equal(x, y) for x, y in zip(objects(cache, ids), want))
    status = b.status()
    assert status["counters"]["hits.remote"] == len(keys)
    assert status["cluster"]["fetched_objects"] == len(keys)
    assert a.status()["cluster"]["served_objects"] == len(keys)
    # B's fetched copies are admitted and reported: two replicas per key now.
    wait_until(lambda: replicas_on(master, "b") == len(keys), what="B's admits reported")
    m = master.client()
    try:
        r = m.match(keys, exclude_node="c")
        assert r.runs[("a", 1)] == r.runs[("b", 1)] == len(keys)
        assert {cand.node_id for cand in r.candidates} == {"a", "b"}
    finally:
        m.close()
    # A's objects evicted: the master learns it from A's deltas; B still holds them.
    c_ = AgentClient(a.socket, timeout_s=5)
    try:
        assert P.decode_u64(c_.request(P.Op.EVICT)) == len(keys)
    finally:
        c_.close()
    wait_until(lambda: replicas_on(master, "a") == 0, what="A's evictions reported")
    with c.store() as sc:
        assert sc.lookup(keys) == len(keys)


OBJ = 256 << 10


def fill_objects(store, keys, seed):
    def fill(i, ptr):
        data = np.random.default_rng(seed + i).integers(0, 256, OBJ, dtype=np.uint8)
        ctypes.memmove(ptr, data.ctypes.data, OBJ)
    return store.write_objects(keys, OBJ, 77, fill)


def read_objects(store, keys, seed):
    got = {}

    def drain(i, ptr):
        got[i] = np.ctypeslib.as_array((ctypes.c_uint8 * OBJ).from_address(ptr)).copy()
    n = store.read_objects(keys, OBJ, 77, drain)
    for i in range(n):
        want = np.random.default_rng(seed + i).integers(0, 256, OBJ, dtype=np.uint8)
        assert np.array_equal(got[i], want), f"object {i} has wrong bytes"
    return n


def test_source_killed_mid_fetch_gives_a_miss_or_a_retry_never_wrong_bytes(cluster):
    # A serves slowly (50 ms per object) so the kill lands in the middle of B's fetch; C holds a
    # second replica of the first half only.
    master, (a, b, c) = cluster(("a", {"dram": "32MiB", "serve_delay_ms": 50}), ("b", {}), ("c", {"dram": "8MiB"}))
    keys = [bytes([i]) * 16 for i in range(1, 25)]
    with a.store() as sa:
        assert all(fill_objects(sa, keys, 100))
    with c.store() as sc:
        assert all(fill_objects(sc, keys[:12], 100))
    wait_until(lambda: replicas_on(master, "a") == 24 and replicas_on(master, "c") == 12, what="reports")
    result = {}

    def load():
        with b.store() as sb:
            start = time.monotonic()
            result["n"] = read_objects(sb, keys, 100)
            result["s"] = time.monotonic() - start
    t = threading.Thread(target=load)
    t.start()
    wait_until(lambda: a.status()["cluster"]["served_objects"] >= 4, what="fetch in progress")
    a.kill()
    t.join(30)
    assert not t.is_alive(), "load hung after the source died"
    # Bytes are checked in read_objects: what arrived from A before the kill, then the rest of
    # the first half retried from C; the second half only A held: a miss.
    assert 12 <= result["n"] <= 24, result  # A's part, then C's replica up to 12
    assert result["s"] < 15
    counters = b.status()["counters"]
    assert counters.get("remote_fetch_failures", 0) >= 1
    # A misses its deadline: its replicas go; what B fetched stays indexed under B.
    wait_until(lambda: all(n.node_id != "a" for n in master.status().nodes), timeout_s=10, what="A dropped")
    with b.store() as sb:
        assert read_objects(sb, keys, 100) == result["n"]


def test_a_full_dram_only_node_spills_where_the_master_places_and_loses_nothing(cluster):
    # A (no SSD) holds 8 objects of 256 KiB; 16 are written to it, two at a time. Without spills
    # its evictions would lose the oldest 8. A pushes its least recently used objects to the node
    # the master places them on (B), keeps its headroom clean, and every object still loads
    # bit-exact through A (remote hits from B). Placement order itself: test_master.py.
    master, (a, b) = cluster(("a", {"dram": "2MiB"}), ("b", {"dram": "16MiB"}))
    keys = [bytes([i]) * 16 for i in range(1, 17)]
    with a.store() as sa:
        for i in range(0, 16, 2):
            assert all(fill_objects(sa, keys[i:i + 2], 300 + i))
            time.sleep(0.5)  # the spiller checks every 0.2 s
    wait_until(lambda: a.status()["cluster"]["spilled_objects"] >= 8, what="A's spills")
    assert b.status()["counters"].get("received_spills", 0) >= 8
    with a.store() as sa:
        for i in range(0, 16, 2):
            assert read_objects(sa, keys[i:i + 2], 300 + i) == 2, f"objects {i}, {i + 1} lost"
    assert a.status()["counters"].get("hits.remote", 0) >= 8


def test_master_restart_resyncs_agents_and_drops_unconfirmed_entries(cluster, tmp_path):
    master, (a, b) = cluster(("a", {}), ("b", {}))
    keys = [bytes([i]) * 16 for i in range(1, 9)]
    with a.store() as sa:
        assert all(fill_objects(sa, keys, 5))
    wait_until(lambda: replicas_on(master, "a") == 8, what="reports")
    epoch = master.status().master_epoch
    master.kill()
    # While the master is down A drops half its objects: the master's LMDB index is now stale.
    c_ = AgentClient(a.socket, timeout_s=5)
    try:
        with a.store() as sa:  # re-save the first half after evicting everything
            assert P.decode_u64(c_.request(P.Op.EVICT)) == 8
            assert all(fill_objects(sa, keys[:4], 5))
    finally:
        c_.close()
    master.start()  # same port and data dir
    assert "8 keys, 2 nodes loaded" in master.first_line  # serves the persisted index at once
    assert master.status().master_epoch != epoch
    wait_until(lambda: replicas_on(master, "a") == 4, what="A's resync")
    new_epoch = master.status().master_epoch
    wait_until(lambda: all(n.status()["cluster"]["synced"] and n.status()["cluster"]["epoch"] == new_epoch
                           for n in (a, b)), what="both agents resynced")
    assert master.status().keys == 4
    with b.store() as sb:
        assert sb.lookup(keys) == 4
        assert read_objects(sb, keys, 5) == 4


class _Source:
    """An ObjectSource of plain arrays (the transport without agents)."""

    class Slot:
        def __init__(self, key, payload):
            self.key, self.payload, self.nbytes = key, payload, len(payload)

    def __init__(self, objects):
        self.objects = objects
        self.pinned = 0

    def acquire_remote(self, key, nbytes, fingerprint):
        data = self.objects.get(key)
        if data is None or len(data) != nbytes:
            return None
        self.pinned += 1
        return self.Slot(key, data)

    def release_remote(self, slot):
        self.pinned -= 1

    def checksum_of(self, slot):
        from kvstore._native import C
        return C.checksum(slot.payload, slot.nbytes)


def test_transport_token_checksums_and_malformed_requests():
    import socket
    from kvstore._native import C
    from kvstore.remote_transport import TcpServer, TcpTransport
    rng = np.random.default_rng(1)
    objs = {bytes([i]) * 16: rng.integers(0, 256, 8192, dtype=np.uint8) for i in range(1, 6)}
    source = _Source(objs)
    server = TcpServer(source, "127.0.0.1", 0, token="tok").start()
    keys = list(objs) + [b"\x00" * 16]
    try:
        def run(transport, expected=None):
            out = {i: np.zeros(8192, dtype=np.uint8) for i in range(len(keys))}
            oks = {}
            n = transport.fetch(server.address, keys, 8192, 0, lambda i: out[i], lambda i, ok: oks.__setitem__(i, ok),
                                expected)
            return n, out, oks
        n, _, oks = run(TcpTransport(token=None))            # no token: refused, all misses
        assert n == 0 and not oks
        good = TcpTransport(token="tok")
        n, out, oks = run(good)
        assert n == 5 and all(oks.values()) and len(oks) == 5  # the unknown key is a miss
        assert all(np.array_equal(out[i], objs[k]) for i, k in enumerate(keys[:5]))
        sums = [C.checksum(objs[k], 8192) for k in keys[:5]] + [0]
        sums[2] ^= 1                                          # the index says otherwise: a miss
        n, _, oks = run(good, sums)
        assert n == 4 and oks[2] is False and good.stats.checksum_mismatches == 1
        deadline = time.monotonic() + 5  # the server unpins after its last send, maybe after we return
        while source.pinned and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.pinned == 0
        # Garbage and an oversized key count: an error or a closed connection, the server lives on.
        for payload in (b"GARBAGE" * 10, b"KVR1" + (1 << 31).to_bytes(4, "little") + bytes(24)):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                reply = s.recv(64)
            except OSError:  # the server may close (reset) the connection as soon as it sees the header
                reply = b""
            finally:
                s.close()
            assert reply == b"" or reply[:4] == b"KVR1" and int.from_bytes(reply[8:12], "little") != 0
        assert run(good)[0] == 5
    finally:
        server.stop()
