"""The master's gRPC service (master/kvstore_master.proto) and `kvstore master`.

Security: binds 127.0.0.1 by default; any other bind address requires a shared token, which
every call must then carry as gRPC metadata `x-kvstore-token` (checked in constant time on every
call, Status UNAUTHENTICATED otherwise). A token set on a loopback bind is enforced as well.
Requests are bounded: at most max_keys keys per Match or per DeltaBatch, max_batches batches per
ReportDeltas stream, a 4 MiB message cap; invalid fields get INVALID_ARGUMENT with the reason and
change nothing (a DeltaBatch is validated whole before it is applied).

Threads: grpc.aio on one event-loop thread. Match runs on the loop itself (it never takes the
state lock: the index has its own reader lock), everything that takes the state lock or writes
LMDB (Register, Heartbeat, delta batches, Status) runs on a small thread pool, so a long delta
batch never stalls lookups behind it. (grpc.aio measured about 10% more Match calls per second
than the thread-pool server, at a lower p99, with the same handlers: benchmarks/master.py.)
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import ipaddress
import logging
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from kvstore.errors import ConfigError

from . import kvstore_master_pb2 as pb
from . import kvstore_master_pb2_grpc as pb_grpc
from .state import KEY_NBYTES, NODE_ID_RE, TIERS, Admits, Evicts, MasterState, TooManyNodesError

log = logging.getLogger("kvstore.master")
TOKEN_METADATA = "x-kvstore-token"
MAX_MESSAGE_NBYTES = 4 << 20
MAX_KEYS = 16384
MAX_BATCHES = 4096  # per ReportDeltas stream (a full inventory of 64 M objects at MAX_KEYS each)
MAX_ADDRESS = 256
FLUSH_INTERVAL_S = 1.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._token = token.encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-kvstore-token")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata).get(TOKEN_METADATA, "")
        if isinstance(got, str):
            got = got.encode()
        if hmac.compare_digest(got, self._token):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/ReportDeltas") else self._deny_unary


class _Reject(Exception):
    """A request the master refuses: becomes the call's status (see _rejects)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


def _rejects(handler):
    @functools.wraps(handler)
    async def wrapper(self, request, context):
        try:
            return await handler(self, request, context)
        except _Reject as e:
            await context.abort(e.code, e.details)
    return wrapper


def _check_node_id(node_id: str) -> None:
    if not NODE_ID_RE.fullmatch(node_id):
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"node_id must match {NODE_ID_RE.pattern}, got {node_id!r}")


def _check_keys(keys, what: str) -> bytes:
    """Validates 16-byte keys (count and lengths); returns them packed."""
    if len(keys) > MAX_KEYS:
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{len(keys)} {what} exceed the limit of {MAX_KEYS} per call")
    if len(keys) and set(map(len, keys)) != {KEY_NBYTES}:  # per key: a 15 + 17 byte pair packs to 32 bytes
        i = next(i for i, key in enumerate(keys) if len(key) != KEY_NBYTES)
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{what}[{i}] is {len(keys[i])} bytes; keys are {KEY_NBYTES} bytes")
    return b"".join(keys)


def _check_packed_keys(packed: bytes) -> bytes:
    if len(packed) % KEY_NBYTES:
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                      f"packed_keys is {len(packed)} bytes, not a multiple of {KEY_NBYTES} bytes (one key)")
    if len(packed) > KEY_NBYTES * MAX_KEYS:
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                      f"{len(packed) // KEY_NBYTES} keys exceed the limit of {MAX_KEYS} per call")
    return packed


def _admits(admits) -> Admits:
    """DeltaBatch.admits -> arrays, validated whole (nothing is applied if one entry is bad)."""
    n = len(admits)
    keys = _check_keys([a.key for a in admits], "admits")
    tiers = np.fromiter((a.tier for a in admits), np.int64, n)  # an open enum: any int32 may arrive
    cols = np.array([(a.nbytes, a.checksum, a.generation, a.fingerprint) for a in admits],
                    dtype=np.uint64).reshape(n, 4)
    bad = np.flatnonzero(~np.isin(tiers, TIERS) | (cols[:, 0] == 0))
    if len(bad):
        key = keys[bad[0] * KEY_NBYTES:(bad[0] + 1) * KEY_NBYTES]
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                      f"admit of {key.hex()}: tier must be DRAM or SSD and nbytes > 0")
    return Admits(keys, tiers.astype(np.uint8), *(np.ascontiguousarray(cols[:, j]) for j in range(4)))


def _evicts(evicts) -> Evicts:
    keys = _check_keys([e.key for e in evicts], "evicts")
    tiers = np.fromiter((e.tier for e in evicts), np.int64, len(evicts))
    bad = np.flatnonzero(~np.isin(tiers, TIERS))
    if len(bad):
        key = keys[bad[0] * KEY_NBYTES:(bad[0] + 1) * KEY_NBYTES]
        raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"evict of {key.hex()}: tier must be DRAM or SSD")
    return Evicts(keys, tiers.astype(np.uint8))


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def location_run_fields(checksums: np.ndarray, nbytes: np.ndarray) -> bytes:
    """Location.checksums and Location.nbytes (fields 4 and 5, packed) in wire form, to merge into
    a Location: built from the uint64 arrays at memcpy speed instead of one Python int per key
    (which costs more than the lookup itself)."""
    if not len(checksums):
        return b""
    cs = checksums.astype("<u8", copy=False).tobytes()
    if (nbytes == nbytes[0]).all():  # one object size for the whole run: the usual case
        nb = _varint(int(nbytes[0])) * len(nbytes)
    else:
        nb = b"".join(_varint(v) for v in nbytes.tolist())
    return b"\x22" + _varint(len(cs)) + cs + b"\x2a" + _varint(len(nb)) + nb


def _caps(c: pb.Capacities) -> tuple[int, int, int]:
    return c.dram_bytes, c.dram_free_bytes, c.ssd_bytes


class MasterServicer(pb_grpc.MasterServicer):
    def __init__(self, state: MasterState, heartbeat_interval_s: float, pool: futures.Executor):
        self.state = state
        self.heartbeat_interval_s = heartbeat_interval_s
        self._pool = pool

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @_rejects
    async def Register(self, request, context):
        _check_node_id(request.node_id)
        host, sep, port = request.address.rpartition(":")
        if not sep or not host or not port.isdigit() or len(request.address) > MAX_ADDRESS:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"address must be host:port, got {request.address!r}")
        try:
            await self._in_pool(self.state.register, request.node_id, request.address, _caps(request.capacities))
        except TooManyNodesError as e:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        log.info("node %s registered at %s", request.node_id, request.address)
        return pb.RegisterReply(master_epoch=self.state.epoch,
                                heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000),
                                deadline_ms=int(self.state.deadline_s * 1000))

    @_rejects
    async def Heartbeat(self, request, context):
        _check_node_id(request.node_id)
        caps = _caps(request.capacities) if request.HasField("capacities") else None
        if request.master_epoch != self.state.epoch:
            return pb.HeartbeatReply(resync=True)
        return pb.HeartbeatReply(resync=not await self._in_pool(self.state.heartbeat, request.node_id, caps))

    @_rejects
    async def ReportDeltas(self, request_iterator, context):
        batches = admitted = evicted = 0
        async for batch in request_iterator:
            batches += 1
            if batches > MAX_BATCHES:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_BATCHES} batches in one stream")
            _check_node_id(batch.node_id)
            if batch.master_epoch != self.state.epoch:
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                              "master epoch changed (master restarted): register again and resync")
            if not self.state.known(batch.node_id):
                raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                              f"node {batch.node_id} is not registered (dead or unknown): register and resync")
            if len(batch.admits) + len(batch.evicts) > MAX_KEYS:
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"a batch holds {len(batch.admits) + len(batch.evicts)} entries, limit {MAX_KEYS}")
            a, e = await self._in_pool(self._apply, batch)
            admitted += a
            evicted += e
        return pb.ReportReply(batches=batches, admitted=admitted, evicted=evicted)

    def _apply(self, batch: pb.DeltaBatch) -> tuple[int, int]:
        """Validates the whole batch, then applies it (on the pool: it takes the state lock)."""
        admits = _admits(batch.admits)
        evicts = _evicts(batch.evicts)
        try:
            return self.state.apply(batch.node_id, batch.reset, admits, evicts)
        except KeyError:
            raise _Reject(grpc.StatusCode.FAILED_PRECONDITION,
                          f"node {batch.node_id} was declared dead: resync") from None

    @_rejects
    async def Match(self, request, context):
        if request.packed_keys:
            if len(request.keys):
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT, "set keys or packed_keys, not both")
            keys = _check_packed_keys(request.packed_keys)
        else:
            keys = _check_keys(request.keys, "keys")
        runs, cands = self.state.match(keys, request.exclude_node)
        reply = pb.MatchReply(runs=[pb.NodeRun(node_id=n, tier=t, length=length) for n, t, length in runs])
        for c in cands:
            loc = reply.candidates.add(node_id=c["node_id"], address=c["address"], length=c["length"])
            loc.MergeFromString(location_run_fields(c["checksums"], c["nbytes"]))
        return reply

    @_rejects
    async def Place(self, request, context):
        _check_node_id(request.node_id)
        if not 0 < request.nbytes <= (1 << 40) or not 0 < request.count <= MAX_KEYS:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"place: nbytes must be in (0, 2^40] and count in (0, {MAX_KEYS}], got {request.nbytes}, "
                          f"{request.count}")
        targets = await self._in_pool(self.state.place, request.node_id, request.nbytes, request.count,
                                      request.exclude_writer)
        return pb.PlaceReply(targets=[pb.Target(node_id=n, address=a, count=c) for n, a, c in targets])

    @_rejects
    async def Status(self, request, context):
        s = await self._in_pool(self.state.status)
        return pb.StatusReply(master_epoch=s["epoch"], keys=s["keys"], replicas=s["replicas"], uptime_s=s["uptime_s"],
                              nodes=[pb.NodeStatus(node_id=n["node_id"], address=n["address"],
                                                   capacities=pb.Capacities(dram_bytes=n["caps"][0],
                                                                            dram_free_bytes=n["caps"][1],
                                                                            ssd_bytes=n["caps"][2]),
                                                   replicas=n["replicas"], last_heartbeat_age_s=n["age_s"])
                                     for n in s["nodes"]])


class MasterServer:
    """The state, the gRPC server (grpc.aio on its own event-loop thread) and the reaper thread
    (drops nodes past their deadline, flushes LMDB)."""

    def __init__(self, data_dir: str, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 deadline_s: float = 10.0, heartbeat_interval_s: float | None = None, workers: int = 4):
        if not is_loopback(host) and not token:
            raise ConfigError(f"binding the master to non-loopback address {host!r} requires a token "
                              f"(--token or KVSTORE_MASTER_TOKEN)")
        if deadline_s <= 0:
            raise ConfigError("deadline_s must be > 0")
        self.state = MasterState(data_dir, deadline_s=deadline_s)
        self.heartbeat_interval_s = heartbeat_interval_s or deadline_s / 4
        self.host = host
        self._pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvstore-master")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="kvstore-master-grpc", daemon=True)
        self._loop_thread.start()
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._on_loop(self._bind(bind, token))
        except RuntimeError:  # grpc: "Failed to bind"
            self.port = 0
        if self.port == 0:
            self._close_loop()
            self.state.close()
            raise ConfigError(f"cannot bind the master to {bind}")
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kvstore-master-reaper", daemon=True)

    async def _bind(self, bind: str, token: str | None) -> int:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.aio.server(interceptors=[_TokenInterceptor(token)] if token else [], options=options)
        pb_grpc.add_MasterServicer_to_server(MasterServicer(self.state, self.heartbeat_interval_s, self._pool),
                                             self.server)
        return self.server.add_insecure_port(bind)

    def _on_loop(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(5)
        self._loop.close()
        self._pool.shutdown(wait=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "MasterServer":
        self._on_loop(self.server.start())
        self._reaper.start()
        return self

    def _reap_loop(self) -> None:
        period = max(0.05, min(1.0, self.state.deadline_s / 4))
        last_flush = time.monotonic()
        while not self._stop.wait(period):
            for node_id in self.state.reap():
                log.warning("node %s missed its heartbeat deadline: dropped with its replicas", node_id)
            if time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                self.state.flush()  # LMDB commits do not fsync (state.py): bound what a machine crash loses
                last_flush = time.monotonic()

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self._on_loop(self.server.stop(grace_s), timeout_s=grace_s + 5)
        self._close_loop()
        if self._reaper.is_alive():
            self._reaper.join(2)
        self.state.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback requires --token)")
    p.add_argument("--port", type=int, default=50151)
    p.add_argument("--data-dir", required=True, help="LMDB directory of the index and membership")
    p.add_argument("--token", default=None, help="shared token every call must carry (default: $KVSTORE_MASTER_TOKEN)")
    p.add_argument("--deadline-s", type=float, default=10.0, help="a node silent this long is dead")
    p.add_argument("--heartbeat-s", type=float, default=None, help="heartbeat interval told to agents "
                   "(default: deadline / 4)")
    p.add_argument("--log-level", default="INFO")


def run(args: argparse.Namespace) -> int:
    import os
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s kvstore-master %(levelname)s %(message)s")
    token = args.token or os.environ.get("KVSTORE_MASTER_TOKEN") or None
    server = MasterServer(args.data_dir, host=args.host, port=args.port, token=token, deadline_s=args.deadline_s,
                          heartbeat_interval_s=args.heartbeat_s).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    print(f"kvstore master listening on {server.address} (pid {os.getpid()}); epoch {server.state.epoch}; "
          f"{len(server.state.index)} keys, {len(server.state.nodes)} nodes loaded", flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvstore.master", description="kvstore master (gRPC + LMDB)")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
