"""Node agent with real processes: an agent subprocess on a socket in tmp_path, engine processes
as subprocesses, SIGKILL / SIGSTOP / SIGTERM faults, malformed frames over a raw socket."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import kvstore
from kvstore.agent import protocol as P
from kvstore.agent_client import AgentClient
from kvstore.agent_store import AgentStore
from kvstore.ssd_tier import SsdTier

from kv_caches import expected_object, vllm

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
CHUNK = 8


class Agent:
    """`python -m kvstore.agent` on tmp_path/agent.sock, SSD in tmp_path/ssd."""

    def __init__(self, tmp_path: Path, dram: str = "8MiB", ssd: bool = True, extra: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = (sys.executable, "-m", "kvstore.agent")):
        self.launcher = list(launcher)
        self.tmp_path = tmp_path
        self.socket = str(tmp_path / "agent.sock")
        self.ssd = str(tmp_path / "ssd") if ssd else "none"
        self.dram = dram
        self.extra = list(extra)  # more command-line flags (later --set wins)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        cmd = [*self.launcher, "--socket", self.socket, "--dram-capacity", self.dram,
               "--ssd-path", self.ssd, "--ssd-capacity", "64MiB", "--set", "ssd_slab_bytes=4MiB",
               "--set", "dram_slab_bytes=1MiB", "--set", "cpu_threads=1", "--set", "io_threads=2",
               "--drain-s", "0.5", *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        assert "listening" in line, f"agent did not start: {line}{self.proc.stdout.read() if self.proc.poll() is not None else ''}"
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        self.proc.stdout.close()
        self.proc = None
        return rc

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self.proc.stdout.close()
        self.proc = None

    @property
    def address(self) -> str:
        return "unix://" + self.socket

    def status(self) -> dict:
        client = AgentClient(self.socket, timeout_s=5)
        try:
            return client.status()
        finally:
            client.close()


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path).start()
    yield a
    a.stop()


def agent_store(agent: Agent, timeout_ms: int = 3000) -> AgentStore:
    store = kvstore.Store(agent=agent.address, chunk_tokens=CHUNK, agent_timeout_ms=timeout_ms, ssd_path=None)
    assert isinstance(store, AgentStore)
    return store


def request(seed: int, chunks: int = 4):
    """A cache and a request both processes can rebuild from the seed."""
    rng = np.random.default_rng(seed)
    cache = vllm(rng, "LBNHC", B=4 * chunks)
    tokens = rng.integers(0, 50_000, size=chunks * CHUNK)
    keys = kvstore.chunk_keys(tokens, kvstore.namespace(model="agent-test"), CHUNK)
    ids = rng.permutation(cache.layout.num_blocks)[:chunks * 2]
    return cache, keys, ids


def objects(cache, ids) -> list[np.ndarray]:
    return [expected_object(cache, ids[2 * c:2 * c + 2]) for c in range(len(ids) // 2)]


def poison(cache) -> None:
    for b in cache.buffers:
        b.view(np.uint8)[...] = 0xA5


def child(script: str, agent: Agent, *args: str) -> subprocess.Popen:
    """A Python engine process: `script` runs with sys.argv[1:] = (socket address, *args) and
    tests/ on sys.path; it prints READY when it reached the point the test waits for."""
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n" + textwrap.dedent(script)
    return subprocess.Popen([sys.executable, "-c", code, agent.address, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line.startswith("READY"), f"child failed: {line}{proc.stderr.read()}"
    return line


def wait_until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


SAVER = """
import kvstore
from test_agent import request, CHUNK
cache, keys, ids = request(int(sys.argv[2]))
store = kvstore.Store(agent=sys.argv[1], chunk_tokens=CHUNK, ssd_path=None)
r = store.save(keys, cache.layout, ids).wait(30)
assert r.stored == len(keys), r
store.close()
print("READY", flush=True)
"""


def test_two_processes_share_hits_bit_exact(agent):
    saver = child(SAVER, agent, "7")
    wait_ready(saver)
    assert saver.wait(30) == 0
    cache, keys, ids = request(7)
    want = objects(cache, ids)
    poison(cache)
    with agent_store(agent) as store:
        assert store.lookup(keys) == len(keys)
        result = store.load(keys, cache.layout, ids).wait(30)
        assert result.complete and result.hits_by_tier == {"dram": len(keys)}
        assert all(np.array_equal(a, b) for a, b in zip(objects(cache, ids), want))
        again = store.save(keys, cache.layout, ids).wait(30)
        assert (again.stored, again.skipped) == (0, len(keys))


RESERVE_AND_HANG = """
import time, kvstore
from test_agent import request, CHUNK
cache, keys, ids = request(int(sys.argv[2]))
store = kvstore.Store(agent=sys.argv[1], chunk_tokens=CHUNK, ssd_path=None)
slots, skipped, failed = store.reserve_for_save(keys, cache.layout.chunk_nbytes(CHUNK), cache.layout.fingerprint)
assert len(slots) == len(keys)
for _, slot in slots[:2]:  # half-written objects
    import ctypes; ctypes.memset(slot.ptr, 0x5A, slot.nbytes // 2)
print("READY", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_write_reclaims_its_reservations(agent):
    writer = child(RESERVE_AND_HANG, agent, "11")
    wait_ready(writer)
    cache, keys, ids = request(11)
    with agent_store(agent) as store:
        (other,) = [c for c in agent.status()["clients"] if c["reservations"]]
        assert other["reservations"] == len(keys) and other["pid"] == writer.pid
        assert store.lookup(keys) == 0
        assert store.save(keys, cache.layout, ids).wait(30).skipped == len(keys)  # being written: not ours
        writer.kill()
        writer.wait(5)
        wait_until(lambda: not any(c["reservations"] for c in agent.status()["clients"]))
        assert store.lookup(keys) == 0 and agent.status()["dram"]["objects"] == 0  # nothing partial visible
        want = objects(cache, ids)
        r = store.save(keys, cache.layout, ids).wait(30)
        assert r.stored == len(keys)
        poison(cache)
        assert store.load(keys, cache.layout, ids).wait(30).complete
        assert all(np.array_equal(a, b) for a, b in zip(objects(cache, ids), want))
        assert agent.status()["counters"]["reclaimed_reservations"] == len(keys)


LEASE_AND_HANG = """
import time
from kvstore.agent import protocol as P
from kvstore.agent_client import AgentClient
from test_agent import request, CHUNK
cache, keys, ids = request(int(sys.argv[2]))
client = AgentClient(sys.argv[1][len("unix://"):], timeout_s=5)
body = client.request(P.Op.BEGIN_READ, P.encode_sized_keys(cache.layout.chunk_nbytes(CHUNK),
                                                             cache.layout.fingerprint, keys))
slots = P.Slots.decode(body, 8)
assert (slots.states == P.SlotState.HIT_DRAM).all()
print("READY", flush=True)
time.sleep(60)
"""


def test_client_killed_holding_read_leases_releases_them(agent):
    cache, keys, ids = request(13)
    with agent_store(agent) as store:
        assert store.save(keys, cache.layout, ids).wait(30).stored == len(keys)
        reader = child(LEASE_AND_HANG, agent, "13")
        wait_ready(reader)
        assert [c["leases"] for c in agent.status()["clients"] if c["pid"] == reader.pid] == [1]
        assert store.evict() == 0  # pinned by the lease
        reader.kill()
        reader.wait(5)
        wait_until(lambda: all(c["pid"] != reader.pid for c in agent.status()["clients"]))
        assert store.evict() == len(keys)
        assert store.lookup(keys) == len(keys)  # still on SSD once written back


def test_agent_killed_then_restarted(tmp_path):
    agent = Agent(tmp_path).start()
    cache, keys, ids = request(17)
    want = objects(cache, ids)
    store = agent_store(agent, timeout_ms=1000)
    try:
        assert store.save(keys, cache.layout, ids).wait(30).stored == len(keys)
        assert store.flush(30)
        agent.kill()
        start = time.monotonic()
        assert store.lookup(keys) == 0                                   # a miss, not a hang
        assert store.load(keys, cache.layout, ids).wait(5).loaded_chunks == 0
        assert store.save(keys, cache.layout, ids).wait(5).failed_keys == keys
        with pytest.raises(P.AgentUnavailableError):
            store.stats()
        assert time.monotonic() - start < 5
        agent.start()
        status = agent.status()
        assert status["dram"]["objects"] == 0 and status["ssd"]["objects"] == len(keys)
        wait_until(lambda: store.lookup(keys) == len(keys), 5)           # reconnected
        poison(cache)
        result = store.load(keys, cache.layout, ids).wait(30)
        assert result.complete and result.hits_by_tier == {"ssd": len(keys)}   # checksums verified on read
        assert all(np.array_equal(a, b) for a, b in zip(objects(cache, ids), want))
    finally:
        store.close()
        agent.stop()


def test_hung_agent_gives_a_miss_within_the_timeout(agent):
    cache, keys, ids = request(19)
    with agent_store(agent, timeout_ms=500) as store:
        assert store.save(keys, cache.layout, ids).wait(30).stored == len(keys)
        agent.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: Path(f"/proc/{agent.proc.pid}/stat").read_text().split()[2] == "T", 5)
        try:
            start = time.monotonic()
            assert store.lookup(keys) == 0
            assert store.load(keys, cache.layout, ids).wait(5).loaded_chunks == 0
            assert time.monotonic() - start < 3
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: store.lookup(keys) == len(keys), 5)


def raw(agent: Agent) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(agent.socket)
    return s


def reply(s: socket.socket) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < P.HEADER.size:
        chunk = s.recv(P.HEADER.size - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    _, op, status, _, n = P.HEADER.unpack(head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return op, status, body


def closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionError:
        return True


def test_malformed_and_oversized_requests_get_clear_errors_and_change_nothing(agent):
    cache, keys, ids = request(23)
    with agent_store(agent) as store:
        store.save(keys[:2], cache.layout, ids[:4]).wait(30)
        assert store.flush(30)
        before = agent.status()
        s = raw(agent)
        s.sendall(P.frame(P.Op.LOOKUP, 1, struct.pack("<I", 3) + keys[0]))           # says 3 keys, holds 1
        assert reply(s)[1] == P.Status.MALFORMED
        s.sendall(P.frame(P.Op.LOOKUP, 2, struct.pack("<I", P.MAX_KEYS + 1)))         # too many keys
        assert reply(s)[1] == P.Status.MALFORMED
        s.sendall(P.frame(99, 3))                                                      # unknown op
        assert reply(s)[1] == P.Status.MALFORMED
        s.sendall(P.frame(P.Op.COMMIT, 4, P.encode_keys([keys[3]])))                  # not reserved
        op, status, body = reply(s)
        assert status == P.Status.UNKNOWN_KEY and b"not reserved" in body
        s.sendall(P.frame(P.Op.END_READ, 5, P.encode_u64(12345)))
        assert reply(s)[1] == P.Status.UNKNOWN_LEASE
        for nbytes in (0, 1 << 40):                                                    # impossible sizes
            s.sendall(P.frame(P.Op.BEGIN_WRITE, 6, P.encode_sized_keys(nbytes, 0, keys[2:])))
            assert reply(s)[1] == P.Status.INVALID_ARGUMENT
        s.sendall(P.frame(P.Op.LOOKUP, 7, P.encode_keys(keys)))                        # still usable
        op, status, body = reply(s)
        assert status == P.Status.OK and list(body) == [1, 1, 0, 0]
        s.close()
        s = raw(agent)                                                                 # oversized frame
        s.sendall(P.HEADER.pack(P.MAGIC, P.Op.LOOKUP, 0, 8, P.MAX_BODY_NBYTES + 1))
        assert reply(s)[1] == P.Status.TOO_LARGE and closed(s)
        s = raw(agent)                                                                 # not our protocol
        s.sendall(b"GET / HTTP/1.1\r\n")
        assert reply(s)[1] == P.Status.MALFORMED and closed(s)
        after = agent.status()
        assert (after["dram"], after["ssd"]["objects"]) == (before["dram"], before["ssd"]["objects"])
        assert store.lookup(keys) == 2
        # Client-side typed errors: a layout of another size is a miss, bad block ids raise.
        other = vllm(np.random.default_rng(1), "LBNHC", B=16, D=16)
        assert store.load(keys[:2], other.layout, ids[:4]).wait(30).loaded_chunks == 0
        with pytest.raises(kvstore.InvalidArgumentError):
            store.save(keys, cache.layout, ids[:3])
        client = AgentClient(agent.socket, timeout_s=5)
        with pytest.raises(P.UnknownKeyError):
            client.request(P.Op.ABORT, P.encode_keys([keys[0]]))
        client.close()


JOIN_AUTO = """
import kvstore
from test_agent import request, CHUNK
cache, keys, ids = request(int(sys.argv[2]))
store = kvstore.Store(agent=sys.argv[1], chunk_tokens=CHUNK, ssd_path=sys.argv[3], dram_capacity_bytes="8MiB",
                      dram_slab_bytes="1MiB", ssd_capacity_bytes="64MiB", ssd_slab_bytes="4MiB")
r = store.save(keys, cache.layout, ids).wait(30)
assert r.stored + r.skipped == len(keys), r
print("READY", store.agent_status()["pid"], flush=True)
store.close()
"""


def test_auto_starts_a_shared_agent_that_outlives_its_starter(tmp_path):
    sock = tmp_path / "auto" / "agent.sock"
    address = f"auto://{sock}"
    fake = Agent(tmp_path)
    fake.socket = str(sock)
    procs = [child(JOIN_AUTO, type("A", (), {"address": address})(), "29", str(tmp_path / "ssd")) for _ in range(2)]
    pids: set[int] = set()
    try:
        pids = {int(wait_ready(p).split()[1]) for p in procs}
        assert [p.wait(30) for p in procs] == [0, 0]
        assert len(pids) == 1, "both engines must share one agent"
        (pid,) = pids
        status = fake.status()                               # the starters are gone, the agent is not
        assert status["pid"] == pid and status["dram"]["objects"] == 4
        cache, keys, ids = request(29)
        with kvstore.Store(agent=address, chunk_tokens=CHUNK) as store:
            assert store.lookup(keys) == len(keys)
    finally:
        for started in pids:  # graceful: drains write-back, closes the index; never left running
            try:
                os.kill(started, signal.SIGTERM)
            except ProcessLookupError:
                pass
    wait_until(lambda: not os.path.exists(sock), 15)
    wait_until(lambda: _gone(pid), 15)
    tier = SsdTier(tmp_path / "ssd", 64 << 20, 4 << 20)      # the flock is free, the objects are there
    try:
        assert len(tier) == 4
    finally:
        tier.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # our grandchild may linger as a zombie until init reaps it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def test_sigterm_lets_a_writer_commit_then_exits_cleanly(tmp_path):
    agent = Agent(tmp_path).start()
    cache, keys, ids = request(31)
    store = agent_store(agent)
    try:
        slots, _, _ = store.reserve_for_save(keys, cache.layout.chunk_nbytes(CHUNK), cache.layout.fingerprint)
        agent.proc.terminate()
        time.sleep(0.3)
        assert store.reserve_for_save(keys, 4096, 0)[2] == keys    # no new work while draining
        store.commit_saved([s for _, s in slots])                  # in-flight work finishes
        assert agent.proc.wait(15) == 0
        agent.proc.stdout.close()
        agent.proc = None
        agent.start()
        assert store.flush(10) and agent.status()["ssd"]["objects"] == len(keys)
    finally:
        store.close()
        agent.stop()


def test_shared_pool_generation_changes_when_a_slot_is_reused():
    from kvstore.agent.shm_pool import PoolFile, SharedPool
    pool = SharedPool(PoolFile.create(1 << 20), 64 << 10)
    a = pool.reserve(b"a" * 16, 4096)
    offset = pool.offset(a)
    pool.commit(a)
    gen = pool.file.generation(offset)
    pool.evict_all()
    assert pool.file.generation(offset) == gen          # eviction alone does not touch the bytes
    slots = [pool.reserve(bytes([i]) * 16, 4096) for i in range(16)]
    assert any(pool.offset(s) == offset for s in slots)
    assert pool.file.generation(offset) != gen
    pool.file.close()


def test_status_cli_and_agent_config(agent, capsys):
    from kvstore import cli
    with agent_store(agent) as store:
        cache, keys, ids = request(37)
        store.save(keys, cache.layout, ids).wait(30)
        assert cli.main(["status", "--socket", agent.socket]) == 0
        out = capsys.readouterr().out
        assert "DRAM  4 objects" in out and "clients 2" in out
    assert cli.main(["status", "--socket", str(agent.tmp_path / "nobody.sock"), "--timeout-s", "1"]) == 2
    assert "AgentUnavailableError" in capsys.readouterr().err
    with pytest.raises(kvstore.ConfigError):
        kvstore.Config(agent="tcp://somewhere")
    assert "agent" in cli.BENCHMARKS


def test_save_session_whose_agent_died_before_the_commit_reports_failure(tmp_path):
    agent = Agent(tmp_path).start()
    try:
        store = agent_store(agent, timeout_ms=2000)
        cache, keys, ids = request(seed=77, chunks=2)
        session = store.begin_save(keys, cache.layout, ids)
        assert session.stored == 2
        agent.kill()  # the reservations die with the agent
        with pytest.raises(kvstore.KVStoreError):
            session.finish()
        agent.start()
        wait_until(lambda: store.lookup(keys) == 0 and store.save(keys[:1], cache.layout, ids[:2]).wait(10).stored == 1)
        assert store.lookup(keys) == 1  # nothing from the lost session; the new save works
        store.close()
    finally:
        agent.stop()


def test_auto_start_hands_the_master_token_over_by_environment_not_command_line(tmp_path, monkeypatch):
    from kvstore import agent_client
    seen = {}

    class Started(Exception):
        pass

    def popen(cmd, **kw):
        seen["cmd"], seen["env"] = cmd, kw["env"]
        raise Started

    monkeypatch.setattr(agent_client.subprocess, "Popen", popen)
    with pytest.raises(Started):
        kvstore.Store(agent=f"auto://{tmp_path / 'a.sock'}", chunk_tokens=CHUNK, master="127.0.0.1:1",
                      master_token="s3cret-token")
    assert not any("s3cret" in arg for arg in seen["cmd"])  # `ps` shows every process's arguments
    assert seen["env"]["KVSTORE_MASTER_TOKEN"] == "s3cret-token"
    assert "--set" in seen["cmd"] and "master=127.0.0.1:1" in seen["cmd"]


def test_lookup_writing_reports_keys_another_process_is_still_saving(agent):
    """LOOKUP_WRITING: the agent reports keys a SaveSession reserved but has not committed (4), so
    AgentStore.lookup_writing says the run stops at a key being written; a plain lookup counts
    them as misses; once committed they are hits."""
    store = agent_store(agent)
    writer = agent_store(agent)  # another engine process's store
    try:
        cache, keys, ids = request(seed=91, chunks=3)
        session = writer.begin_save(keys, cache.layout, ids)
        assert session.stored == 3
        assert store.lookup(keys) == 0 and store.lookup_writing(keys) == (0, True)
        session.enqueue_rest()
        assert session.commit() == 3
        assert store.lookup_writing(keys) == (3, False)
        client = AgentClient(agent.socket, timeout_s=5)
        try:
            assert list(client.request(P.Op.LOOKUP_WRITING, P.encode_keys(keys))) == [1, 1, 1]
        finally:
            client.close()
    finally:
        store.close()
        writer.close()


def test_the_agent_evicts_deep_chunks_first_with_the_depths_a_save_sends(tmp_path):
    """BEGIN_WRITE carries each chunk's depth: the agent's full DRAM evicts the deepest chunk of
    its least recently used quarter (here chunk 1 of 0..7), so the sequence keeps a usable prefix
    where LRU would have dropped chunk 0 and with it the whole sequence."""
    agent = Agent(tmp_path, dram="32KiB", ssd=False, extra=("--set", "dram_slab_bytes=32KiB")).start()
    store = agent_store(agent)
    try:
        cache, keys, ids = request(seed=93, chunks=8)  # 8 objects of 1.5 KiB: one 4 KiB slot each fills DRAM
        with pytest.raises(kvstore.InvalidArgumentError):
            store.begin_save(keys, cache.layout, ids, depths=[0, 1])
        client = AgentClient(agent.socket, timeout_s=5)
        try:  # depths that are not one u32 per key: refused, nothing reserved
            with pytest.raises(P.AgentError, match="does not hold"):
                client.request(P.Op.BEGIN_WRITE, P.encode_sized_keys(1536, 0, keys[:2]) + b"\0" * 6)
        finally:
            client.close()
        assert store.begin_save(keys, cache.layout, ids, depths=list(range(8))).finish() == 8
        other, more, more_ids = request(seed=94, chunks=1)
        assert store.save(more, other.layout, more_ids).wait(10).stored == 1
        assert store.lookup(keys) == 1 and store.lookup(keys[2:]) == 6 and store.lookup(more) == 1
    finally:
        store.close()
        agent.stop()


# The agent as released before LOOKUP_WRITING and BEGIN_WRITE depths: the same daemon whose server
# refuses both as an older one does (unknown op; a body that is not n keys).
OLDER_AGENT = textwrap.dedent("""
    import sys
    from kvstore.agent import protocol as P, server
    from kvstore.agent.daemon import main
    handle = server.AgentServer._handle
    def older(self, client, op, body):
        if op == P.Op.LOOKUP_WRITING:
            raise P.ProtocolError(f"unknown op {op}")
        if op == P.Op.BEGIN_WRITE:
            P.decode_sized_keys(body)
        return handle(self, client, op, body)
    server.AgentServer._handle = older
    sys.exit(main(sys.argv[1:]))
""")


def test_an_agent_of_an_older_version_still_serves_lookups_and_saves(tmp_path, caplog):
    """Agents outlive engines: against one that knows neither LOOKUP_WRITING nor depths,
    lookup_writing falls back to plain lookups and a save with depths to one without, instead of
    failing."""
    agent = Agent(tmp_path, launcher=(sys.executable, "-c", OLDER_AGENT)).start()
    store = agent_store(agent)
    try:
        cache, keys, ids = request(seed=95, chunks=3)
        assert store.lookup_writing(keys) == (0, False)
        assert store.begin_save(keys, cache.layout, ids, depths=[0, 1, 2]).finish() == 3
        assert store.lookup_writing(keys) == (3, False) and store.lookup(keys) == 3
        poisoned = vllm(np.random.default_rng(1), "LBNHC", B=4 * 3)
        assert store.load(keys, poisoned.layout, ids).wait(10).complete
        assert all(np.array_equal(a, b) for a, b in zip(objects(poisoned, ids), objects(cache, ids)))
        assert "does not know LOOKUP_WRITING" in caplog.text and "does not take chunk depths" in caplog.text
    finally:
        store.close()
        agent.stop()
