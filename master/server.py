"""The master's gRPC service (master/kvstore_master.proto) and `kvstore master`.

Security: binds 127.0.0.1 by default; any other bind address requires a shared token, which
every call must then carry as gRPC metadata `x-kvstore-token` (checked in constant time on every
call, Status UNAUTHENTICATED otherwise). A token set on a loopback bind is enforced as well.
Requests are bounded: at most max_keys keys per Match or per DeltaBatch, max_batches batches per
ReportDeltas stream, a 4 MiB message cap; invalid fields get INVALID_ARGUMENT with the reason and
change nothing (a DeltaBatch is validated whole before it is applied).
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc

from kvstore.errors import ConfigError

from . import kvstore_master_pb2 as pb
from . import kvstore_master_pb2_grpc as pb_grpc
from .state import KEY_NBYTES, NODE_ID_RE, TIERS, MasterState

log = logging.getLogger("kvstore.master")
TOKEN_METADATA = "x-kvstore-token"
MAX_MESSAGE_NBYTES = 4 << 20
MAX_KEYS = 16384
MAX_BATCHES = 4096  # per ReportDeltas stream (a full inventory of 64 M objects at MAX_KEYS each)
MAX_ADDRESS = 256


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong x-kvstore-token")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata).get(TOKEN_METADATA, "")
        if isinstance(got, str):
            got = got.encode()
        if hmac.compare_digest(got, self._token):
            return continuation(details)
        return self._deny_stream if details.method.endswith("/ReportDeltas") else self._deny_unary


def _check_node_id(context, node_id: str) -> None:
    if not NODE_ID_RE.fullmatch(node_id):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node_id must match {NODE_ID_RE.pattern}, got {node_id!r}")


def _check_keys(context, keys, what: str) -> None:
    if len(keys) > MAX_KEYS:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(keys)} {what} exceed the limit of {MAX_KEYS} per call")
    for i, key in enumerate(keys):
        if len(key) != KEY_NBYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{what}[{i}] is {len(key)} bytes; keys are {KEY_NBYTES} bytes")


def _caps(c: pb.Capacities) -> tuple[int, int, int]:
    return c.dram_bytes, c.dram_free_bytes, c.ssd_bytes


class MasterServicer(pb_grpc.MasterServicer):
    def __init__(self, state: MasterState, heartbeat_interval_s: float):
        self.state = state
        self.heartbeat_interval_s = heartbeat_interval_s

    def Register(self, request, context):
        _check_node_id(context, request.node_id)
        host, sep, port = request.address.rpartition(":")
        if not sep or not host or not port.isdigit() or len(request.address) > MAX_ADDRESS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"address must be host:port, got {request.address!r}")
        self.state.register(request.node_id, request.address, _caps(request.capacities))
        log.info("node %s registered at %s", request.node_id, request.address)
        return pb.RegisterReply(master_epoch=self.state.epoch,
                                heartbeat_interval_ms=int(self.heartbeat_interval_s * 1000),
                                deadline_ms=int(self.state.deadline_s * 1000))

    def Heartbeat(self, request, context):
        _check_node_id(context, request.node_id)
        caps = _caps(request.capacities) if request.HasField("capacities") else None
        if request.master_epoch != self.state.epoch:
            return pb.HeartbeatReply(resync=True)
        return pb.HeartbeatReply(resync=not self.state.heartbeat(request.node_id, caps))

    def ReportDeltas(self, request_iterator, context):
        batches = admitted = evicted = 0
        for batch in request_iterator:
            batches += 1
            if batches > MAX_BATCHES:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_BATCHES} batches in one stream")
            _check_node_id(context, batch.node_id)
            if batch.master_epoch != self.state.epoch:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              "master epoch changed (master restarted): register again and resync")
            if not self.state.known(batch.node_id):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"node {batch.node_id} is not registered (dead or unknown): register and resync")
            if len(batch.admits) + len(batch.evicts) > MAX_KEYS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"a batch holds {len(batch.admits) + len(batch.evicts)} entries, limit {MAX_KEYS}")
            _check_keys(context, [a.key for a in batch.admits], "admits")
            _check_keys(context, [e.key for e in batch.evicts], "evicts")
            for a in batch.admits:
                if a.tier not in TIERS or a.nbytes == 0:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"admit of {a.key.hex()}: tier must be DRAM or SSD and nbytes > 0")
            for e in batch.evicts:
                if e.tier not in TIERS:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"evict of {e.key.hex()}: tier must be DRAM or SSD")
            try:
                a, e = self.state.apply(batch.node_id, batch.reset,
                                        [(x.key, x.tier, x.nbytes, x.checksum, x.generation, x.fingerprint)
                                         for x in batch.admits], [(x.key, x.tier) for x in batch.evicts])
            except KeyError:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {batch.node_id} was declared dead: resync")
            admitted += a
            evicted += e
        return pb.ReportReply(batches=batches, admitted=admitted, evicted=evicted)

    def Match(self, request, context):
        keys = list(request.keys)
        _check_keys(context, keys, "keys")
        runs, cands = self.state.match(keys, request.exclude_node)
        return pb.MatchReply(
            runs=[pb.NodeRun(node_id=n, tier=t, length=length) for n, t, length in runs],
            candidates=[pb.Location(node_id=c["node_id"], address=c["address"], length=c["length"],
                                    checksums=c["checksums"], nbytes=c["nbytes"]) for c in cands])

    def Status(self, request, context):
        s = self.state.status()
        return pb.StatusReply(master_epoch=s["epoch"], keys=s["keys"], replicas=s["replicas"], uptime_s=s["uptime_s"],
                              nodes=[pb.NodeStatus(node_id=n["node_id"], address=n["address"],
                                                   capacities=pb.Capacities(dram_bytes=n["caps"][0],
                                                                            dram_free_bytes=n["caps"][1],
                                                                            ssd_bytes=n["caps"][2]),
                                                   replicas=n["replicas"], last_heartbeat_age_s=n["age_s"])
                                     for n in s["nodes"]])


class MasterServer:
    """The state, the gRPC server and the reaper thread (drops nodes past their deadline)."""

    def __init__(self, data_dir: str, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 deadline_s: float = 10.0, heartbeat_interval_s: float | None = None, workers: int = 8):
        if not is_loopback(host) and not token:
            raise ConfigError(f"binding the master to non-loopback address {host!r} requires a token "
                              f"(--token or KVSTORE_MASTER_TOKEN)")
        if deadline_s <= 0:
            raise ConfigError("deadline_s must be > 0")
        self.state = MasterState(data_dir, deadline_s=deadline_s)
        self.heartbeat_interval_s = heartbeat_interval_s or deadline_s / 4
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_NBYTES),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvstore-master"),
                                  interceptors=[_TokenInterceptor(token)] if token else [], options=options)
        pb_grpc.add_MasterServicer_to_server(MasterServicer(self.state, self.heartbeat_interval_s), self.server)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(bind)
        if self.port == 0:
            self.state.close()
            raise ConfigError(f"cannot bind the master to {bind}")
        self.host = host
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kvstore-master-reaper", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "MasterServer":
        self.server.start()
        self._reaper.start()
        return self

    def _reap_loop(self) -> None:
        period = max(0.05, min(1.0, self.state.deadline_s / 4))
        while not self._stop.wait(period):
            for node_id in self.state.reap():
                log.warning("node %s missed its heartbeat deadline: dropped with its replicas", node_id)

    def stop(self, grace_s: float = 1.0) -> None:
        self._stop.set()
        self.server.stop(grace_s).wait(grace_s + 1)
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
