"""MasterClient: the one client of the master's gRPC service (agents, routers, benchmarks).

Every call has a deadline and carries the token (if any) as `x-kvstore-token` metadata. Errors
surface as MasterError with the gRPC status code; callers on a data path turn them into misses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import grpc

from kvstore.errors import KVStoreError

from . import kvstore_master_pb2 as pb
from . import kvstore_master_pb2_grpc as pb_grpc
from .server import MAX_KEYS, MAX_MESSAGE_NBYTES, TOKEN_METADATA
from .state import KEY_NBYTES

DRAM, SSD = pb.DRAM, pb.SSD


class MasterError(KVStoreError):
    def __init__(self, code: grpc.StatusCode | None, message: str):
        super().__init__(f"master: {code.name if code else 'error'}: {message}")
        self.code = code


@dataclass(frozen=True)
class Candidate:
    node_id: str
    address: str
    length: int
    checksums: Sequence[int]  # per key of the run; the reply's own repeated field (index or slice it)
    nbytes: Sequence[int]


@dataclass(frozen=True)
class MatchResult:
    runs: dict[tuple[str, int], int]   # (node, tier or 0 = any tier) -> leading run length
    candidates: list[Candidate]         # best first

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


class MasterClient:
    def __init__(self, address: str, *, token: str | None = None, timeout_s: float = 5.0):
        self.address = address
        self.timeout_s = timeout_s
        self._metadata = ((TOKEN_METADATA, token),) if token else ()
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_NBYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_NBYTES),
            # a restarted master is found again within ~1 s (calls fail fast meanwhile: misses)
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.stub = pb_grpc.MasterStub(self.channel)

    def _call(self, method, request, timeout_s: float | None = None):
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            raise MasterError(code, e.details() if hasattr(e, "details") else str(e)) from None

    def register(self, node_id: str, address: str, capacities: tuple[int, int, int]) -> pb.RegisterReply:
        return self._call(self.stub.Register, pb.RegisterRequest(node_id=node_id, address=address,
                                                                 capacities=_caps(capacities)))

    def heartbeat(self, node_id: str, epoch: int, capacities: tuple[int, int, int] | None = None) -> bool:
        """True if the master asks for a resync (register again + full inventory)."""
        req = pb.HeartbeatRequest(node_id=node_id, master_epoch=epoch)
        if capacities is not None:
            req.capacities.CopyFrom(_caps(capacities))
        return self._call(self.stub.Heartbeat, req).resync

    def report(self, batches: Iterable[pb.DeltaBatch], timeout_s: float | None = None) -> pb.ReportReply:
        return self._call(self.stub.ReportDeltas, iter(batches), timeout_s)

    def match(self, keys: Iterable[bytes] | bytes, exclude_node: str = "") -> MatchResult:
        """Leading runs of keys (16-byte keys, or the same packed into one bytes object); at most
        MAX_KEYS are asked. Sent packed (MatchRequest.packed_keys)."""
        if isinstance(keys, (bytes, bytearray, memoryview)):
            packed = bytes(keys[:MAX_KEYS * KEY_NBYTES])
            if len(packed) % KEY_NBYTES:
                raise MasterError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"packed keys are {len(packed)} bytes, not a multiple of {KEY_NBYTES} bytes")
        else:
            keys = list(keys)[:MAX_KEYS]
            if keys and set(map(len, keys)) != {KEY_NBYTES}:  # before packing hides a 15 + 17 byte pair
                i = next(i for i, k in enumerate(keys) if len(k) != KEY_NBYTES)
                raise MasterError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"keys[{i}] is {len(keys[i])} bytes; keys are {KEY_NBYTES} bytes")
            packed = b"".join(keys)
        reply = self._call(self.stub.Match, pb.MatchRequest(packed_keys=packed, exclude_node=exclude_node))
        return MatchResult({(r.node_id, r.tier): r.length for r in reply.runs},
                           [Candidate(c.node_id, c.address, c.length, c.checksums, c.nbytes) for c in reply.candidates])

    def place(self, node_id: str, nbytes: int, count: int, exclude_writer: bool = True) -> list[pb.Target]:
        """Where count objects of nbytes that node_id cannot keep should go (see the proto's Place)."""
        return list(self._call(self.stub.Place, pb.PlaceRequest(node_id=node_id, nbytes=nbytes, count=count,
                                                               exclude_writer=exclude_writer)).targets)

    def status(self) -> pb.StatusReply:
        return self._call(self.stub.Status, pb.StatusRequest())

    def close(self) -> None:
        self.channel.close()


def _caps(c: tuple[int, int, int]) -> pb.Capacities:
    return pb.Capacities(dram_bytes=c[0], dram_free_bytes=c[1], ssd_bytes=c[2])


def delta_batches(node_id: str, epoch: int, admits: list[pb.Replica], evicts: list[pb.Eviction],
                  reset: bool = False, per_batch: int = MAX_KEYS) -> list[pb.DeltaBatch]:
    """Splits admits and evicts into batches of at most per_batch entries; reset on the first."""
    out = []
    entries = [("a", a) for a in admits] + [("e", e) for e in evicts]
    for i in range(0, max(1, len(entries)), per_batch):
        part = entries[i:i + per_batch]
        out.append(pb.DeltaBatch(node_id=node_id, master_epoch=epoch, reset=reset and i == 0,
                                 admits=[x for k, x in part if k == "a"], evicts=[x for k, x in part if k == "e"]))
    return out
