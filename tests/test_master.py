"""The master in-process (MasterServer on 127.0.0.1, port 0) through its gRPC client: match runs,
membership deadlines, LMDB durability, token checks, malformed and oversized requests; and the
checked-in generated code matches the .proto."""
from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from kvstore.errors import ConfigError
from kvstore.master import kvstore_master_pb2 as pb
from kvstore.master.client import MasterClient, MasterError, delta_batches
from kvstore.master.server import MAX_KEYS, MasterServer
from kvstore.master.state import MasterState
from kvstore.remote_transport import TcpServer

ROOT = Path(__file__).resolve().parents[1]
CAPS = (1 << 30, 1 << 29, 0)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def rep(i: int, tier=pb.DRAM, gen=1) -> pb.Replica:
    return pb.Replica(key=key(i), tier=tier, nbytes=4096, checksum=1000 + i, generation=gen, fingerprint=7)


@pytest.fixture
def master(tmp_path):
    server = MasterServer(str(tmp_path / "m"), port=0, deadline_s=30).start()
    client = MasterClient(server.address, timeout_s=5)
    yield server, client
    client.close()
    server.stop()


def register(client: MasterClient, node: str, port: int = 1) -> int:
    return client.register(node, f"127.0.0.1:{port}", CAPS).master_epoch


def test_match_leading_runs_per_node_and_tier(master):
    _, c = master
    epoch = register(c, "n1")
    register(c, "n2", 2)
    c.report(delta_batches("n1", epoch, [rep(i) for i in range(10)] + [rep(i, pb.SSD) for i in range(4)], []))
    c.report(delta_batches("n2", epoch, [rep(i) for i in range(6)], [pb.Eviction(key=key(3), tier=pb.DRAM)]))
    r = c.match([key(i) for i in range(12)])
    assert r.runs == {("n1", pb.DRAM): 10, ("n1", pb.SSD): 4, ("n1", 0): 10, ("n2", pb.DRAM): 3, ("n2", 0): 3}
    assert [x.node_id for x in r.candidates] == ["n1", "n2"]
    assert r.best.address == "127.0.0.1:1" and r.best.checksums == [1000 + i for i in range(10)]
    assert c.match([key(i) for i in range(12)], exclude_node="n1").best.node_id == "n2"
    assert c.match([key(99), key(0)]).candidates == []  # leading run: the first key decides
    s = c.status()
    assert (s.keys, s.replicas) == (10, 19)


def test_reset_replaces_a_nodes_inventory_and_late_generations_lose(master):
    _, c = master
    epoch = register(c, "n1")
    c.report(delta_batches("n1", epoch, [rep(i, gen=5) for i in range(5)], []))
    c.report(delta_batches("n1", epoch, [rep(0, gen=3)], []))  # an older report arriving late
    assert c.match([key(0)]).best.checksums == [1000]
    c.report(delta_batches("n1", epoch, [rep(i, gen=9) for i in (1, 2)], [], reset=True))
    assert c.status().keys == 2 and c.match([key(0)]).best is None


def test_dead_node_is_dropped_with_its_replicas(tmp_path):
    server = MasterServer(str(tmp_path / "m"), deadline_s=0.3).start()
    c = MasterClient(server.address)
    try:
        epoch = register(c, "n1")
        register(c, "n2")
        c.report(delta_batches("n1", epoch, [rep(1)], []))
        c.report(delta_batches("n2", epoch, [rep(1)], []))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(c.status().nodes) > 1:
            assert not c.heartbeat("n2", epoch, CAPS)
            time.sleep(0.05)
        assert [n.node_id for n in c.status().nodes] == ["n2"]
        assert [x.node_id for x in c.match([key(1)]).candidates] == ["n2"]
        assert c.heartbeat("n1", epoch, CAPS)  # n1 must register and resync
        with pytest.raises(MasterError) as e:
            c.report(delta_batches("n1", epoch, [rep(2)], []))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        c.close()
        server.stop()


def test_index_and_membership_survive_a_restart(tmp_path):
    state = MasterState(tmp_path / "m")
    state.register("n1", "127.0.0.1:5", CAPS)
    state.apply("n1", False, [(key(i), 1, 4096, i, 1, 0) for i in range(100)], [(key(0), 1)])
    epoch = state.epoch
    state.close()
    state = MasterState(tmp_path / "m", deadline_s=0.01)
    assert state.epoch != epoch
    assert len(state.index) == 99 and state.nodes["n1"].replicas == 99
    assert state.match([key(i) for i in range(1, 100)])[1][0]["length"] == 99
    time.sleep(0.05)
    assert state.reap() == ["n1"] and not state.index  # nobody came back to confirm them
    state.close()
    assert not MasterState(tmp_path / "m").index


def test_stale_epoch_asks_for_resync(master):
    _, c = master
    epoch = register(c, "n1")
    assert not c.heartbeat("n1", epoch, CAPS)
    assert c.heartbeat("n1", epoch + 1, CAPS)
    with pytest.raises(MasterError) as e:
        c.report(delta_batches("n1", epoch + 1, [rep(1)], []))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "epoch" in str(e.value)


def test_token_is_required_on_every_call(tmp_path):
    server = MasterServer(str(tmp_path / "m"), token="s3cret").start()
    try:
        for token in (None, "wrong"):
            c = MasterClient(server.address, token=token)
            for call in (c.status, lambda: c.match([key(1)]), lambda: register(c, "n1"),
                         lambda: c.report(delta_batches("n1", 1, [rep(1)], []))):
                with pytest.raises(MasterError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            c.close()
        c = MasterClient(server.address, token="s3cret")
        register(c, "n1")
        assert len(c.status().nodes) == 1
        c.close()
    finally:
        server.stop()


def test_non_loopback_binds_require_a_token(tmp_path):
    # The checks run before anything binds: no traffic leaves loopback.
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ConfigError, match="token"):
            MasterServer(str(tmp_path / "m"), host=host)
        with pytest.raises(ConfigError, match="token"):
            TcpServer(source=None, host=host)
    r = subprocess.run([sys.executable, "-m", "kvstore.master", "--host", "0.0.0.0", "--data-dir",
                        str(tmp_path / "m2")], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "requires a token" in r.stderr


def test_malformed_and_oversized_requests_are_rejected_and_change_nothing(master):
    server, c = master
    epoch = register(c, "n1")
    c.report(delta_batches("n1", epoch, [rep(1)], []))
    bad = [
        (lambda: c.match([b"short"]), grpc.StatusCode.INVALID_ARGUMENT, "16 bytes"),
        (lambda: c._call(c.stub.Match, pb.MatchRequest(keys=[key(i) for i in range(MAX_KEYS + 1)])),
         grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (lambda: c.register("bad id/..", "127.0.0.1:1", CAPS), grpc.StatusCode.INVALID_ARGUMENT, "node_id"),
        (lambda: c.register("n2", "nohostport", CAPS), grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
        # a batch whose last entry is invalid changes nothing (validated whole first)
        (lambda: c.report([pb.DeltaBatch(node_id="n1", master_epoch=epoch, admits=[rep(2), pb.Replica(
            key=key(3), tier=pb.DRAM, nbytes=0)])]), grpc.StatusCode.INVALID_ARGUMENT, "nbytes"),
        (lambda: c.report([pb.DeltaBatch(node_id="n1", master_epoch=epoch, evicts=[pb.Eviction(
            key=key(1), tier=pb.TIER_UNSPECIFIED)])]), grpc.StatusCode.INVALID_ARGUMENT, "tier"),
        (lambda: c.report([pb.DeltaBatch(node_id="n1", master_epoch=epoch, admits=[
            rep(i) for i in range(MAX_KEYS + 1)])]), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (lambda: c.report([pb.DeltaBatch(node_id="ghost", master_epoch=epoch, admits=[rep(5)])]),
         grpc.StatusCode.FAILED_PRECONDITION, "not registered"),
    ]
    for call, code, text in bad:
        with pytest.raises(MasterError) as e:
            call()
        assert e.value.code == code and text in str(e.value), str(e.value)
    # Bytes that are not a MatchRequest, and a message over the 4 MiB cap.
    raw = c.channel.unary_unary("/kvstore.master.v1.Master/Match", request_serializer=None,
                                response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f garbage", timeout=5)
    assert e.value.code() != grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\x10" + b"k" * 16 + b"\x12" + b"\xff\xff\xff\x03" + b"x" * (8 << 20), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    s = c.status()
    assert (s.keys, s.replicas, len(s.nodes)) == (1, 1, 1)
    assert c.match([key(1)]).best.length == 1


def test_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "master").mkdir()
    shutil.copy(ROOT / "master" / "kvstore_master.proto", tmp_path / "master")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                    "master/kvstore_master.proto"], cwd=tmp_path, check=True, timeout=60)
    grpc_py = tmp_path / "master" / "kvstore_master_pb2_grpc.py"
    grpc_py.write_text(grpc_py.read_text().replace("from master import kvstore_master_pb2",
                                                   "from . import kvstore_master_pb2"))
    for name in ("kvstore_master_pb2.py", "kvstore_master_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "master" / name, ROOT / "master" / name, shallow=False), \
            f"master/{name} is stale: regenerate it (see master/kvstore_master.proto)"


def test_packed_keys_match_like_keys_and_are_validated(master):
    _, c = master
    epoch = register(c, "n1")
    register(c, "n2", 2)
    c.report(delta_batches("n1", epoch, [rep(i) for i in range(50)] + [rep(i, pb.SSD) for i in range(20)], []))
    c.report(delta_batches("n2", epoch, [rep(i) for i in range(30)], []))
    keys = [key(i) for i in range(60)]
    for exclude in ("", "n1", "n2"):
        by_list = c._call(c.stub.Match, pb.MatchRequest(keys=keys, exclude_node=exclude))
        by_packed = c._call(c.stub.Match, pb.MatchRequest(packed_keys=b"".join(keys), exclude_node=exclude))
        assert by_list == by_packed and len(by_packed.candidates) == (2 if not exclude else 1)
    r = c.match(b"".join(keys))  # the client takes packed keys as well
    assert r.runs == {("n1", pb.DRAM): 50, ("n1", pb.SSD): 20, ("n1", 0): 50, ("n2", pb.DRAM): 30, ("n2", 0): 30}
    assert list(r.best.checksums) == [1000 + i for i in range(50)] and list(r.best.nbytes) == [4096] * 50
    bad = [
        (pb.MatchRequest(packed_keys=b"k" * 33), "16 bytes"),
        (pb.MatchRequest(packed_keys=b"k" * 16 * (MAX_KEYS + 1)), "limit"),
        (pb.MatchRequest(packed_keys=key(1), keys=[key(1)]), "not both"),
    ]
    for request, text in bad:
        with pytest.raises(MasterError) as e:
            c._call(c.stub.Match, request)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in str(e.value), str(e.value)
    for call in (lambda: c.match([key(1), b"x" * 15, b"y" * 17]), lambda: c.match(b"k" * 20)):
        with pytest.raises(MasterError) as e:  # caught before packing hides a wrong length
            call()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "16 bytes" in str(e.value)


def test_location_run_fields_encode_like_protobuf():
    import numpy as np

    from kvstore.master.server import location_run_fields
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 300):
        for nbytes in (np.full(n, 2 << 20, np.uint64), rng.integers(1, 2**64, n, dtype=np.uint64)):
            checksums = rng.integers(0, 2**64, n, dtype=np.uint64)
            got = pb.Location(node_id="a", length=n)
            got.MergeFromString(location_run_fields(checksums, nbytes))
            want = pb.Location(node_id="a", length=n, checksums=checksums.tolist(), nbytes=nbytes.tolist())
            assert got.SerializeToString() == want.SerializeToString()


def test_late_generations_are_not_persisted_and_node_numbers_are_reused(tmp_path):
    state = MasterState(tmp_path / "m", deadline_s=0.05)
    state.register("n1", "127.0.0.1:5", CAPS)
    assert state.apply("n1", False, [(key(i), 1, 4096, 500 + i, 5, 0) for i in range(10)], []) == (10, 0)
    assert state.apply("n1", False, [(key(i), 1, 4096, 900 + i, 4, 0) for i in range(10)], []) == (0, 0)
    state.close()
    state = MasterState(tmp_path / "m", deadline_s=0.05)
    assert state.match([key(i) for i in range(10)])[1][0]["checksums"].tolist() == [500 + i for i in range(10)]
    number = state.nodes["n1"].number
    time.sleep(0.1)
    assert state.reap() == ["n1"] and len(state.index) == 0
    state.register("n2", "127.0.0.1:6", CAPS)  # takes n1's number: inherits none of its replicas
    assert state.nodes["n2"].number == number and state.nodes["n2"].replicas == 0
    assert state.match([key(0)]) == ([], [])
    state.close()


def test_keys_of_compensating_lengths_are_rejected(master):
    _, c = master
    register(c, "n1")
    pair = [key(1)[:15], key(1) + b"!"]  # 32 bytes together: packing must not hide them
    with pytest.raises(MasterError) as e:
        c._call(c.stub.Match, pb.MatchRequest(keys=pair))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "keys[0] is 15 bytes" in str(e.value)
    with pytest.raises(MasterError) as e:
        c.report([pb.DeltaBatch(node_id="n1", master_epoch=c.status().master_epoch,
                                admits=[pb.Replica(key=k, tier=pb.DRAM, nbytes=1) for k in pair])])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "admits[0] is 15 bytes" in str(e.value)
    assert c.status().keys == 0


def test_place_prefers_the_writer_then_free_ratio_and_counts_what_it_placed(master):
    server, client = master
    mib = 1 << 20
    client.register("w", "127.0.0.1:1", (100 * mib, 50 * mib, 0))     # the writer: 50 % free
    client.register("big", "127.0.0.1:2", (1000 * mib, 300 * mib, 0))  # 30 % free, most bytes
    client.register("half", "127.0.0.1:3", (100 * mib, 60 * mib, 0))   # 60 % free
    client.register("full", "127.0.0.1:4", (100 * mib, 0, 0))
    got = lambda ts: [(t.node_id, t.address, t.count) for t in ts]  # noqa: E731
    # fits on the writer: everything stays there
    assert got(client.place("w", mib, 10, exclude_writer=False)) == [("w", "127.0.0.1:1", 10)]
    # a spill: by free ratio (half 60 %, then big 30 %), each up to its free DRAM
    assert got(client.place("w", mib, 100)) == [("half", "127.0.0.1:3", 60), ("big", "127.0.0.1:2", 40)]
    # placed bytes count as used until the next heartbeat: half has nothing left now
    assert got(client.place("w", mib, 500)) == [("big", "127.0.0.1:2", 260)]
    assert client.place("w", mib, 1) == []  # nobody has room
    epoch = server.state.epoch
    client.heartbeat("half", epoch, (100 * mib, 60 * mib, 0))  # the heartbeat reports its real use again
    assert got(client.place("w", 2 * mib, 3)) == [("half", "127.0.0.1:3", 3)]
    for bad in (dict(nbytes=0, count=1), dict(nbytes=mib, count=0), dict(nbytes=mib, count=MAX_KEYS + 1)):
        with pytest.raises(MasterError) as e:
            client.place("w", **bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(MasterError) as e:
        client.place("no such node!", mib, 1)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
