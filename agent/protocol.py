"""The agent's control protocol over a unix socket: one fixed binary schema, declared once here
and used by both ends (agent/server.py and kvstore/agent_client.py). No pickle, no free-form
payloads except the JSON of STATUS, which the agent writes and clients only print.

Frame = header + body. Header (little-endian, 16 bytes):
    magic b"KVA1" | op u16 | status u16 | request_id u32 | body_nbytes u32
A request carries status 0; the reply echoes op and request_id and carries a Status. A non-OK
reply's body is a UTF-8 message. Bodies are bounded (MAX_BODY_NBYTES, MAX_KEYS): a frame that
claims more is answered TOO_LARGE and the connection is closed (its body is never read); a body
that does not parse is answered MALFORMED and nothing changes. Batch is the only form: a single
key is a batch of one.

Request bodies (n = key count, keys = n * 16 bytes):
    HELLO        pid u32 | name (UTF-8, <= 64 bytes)      -> PoolInfo; the pool's fd rides along
                                                             as SCM_RIGHTS ancillary data
    LOOKUP       n u32 | keys                             -> n u8: 0 miss, 1 DRAM, 2 SSD (pins nothing)
    LOOKUP_WRITING  n u32 | keys                          -> as LOOKUP, and 4: being written (a save
                                                             in progress; a later LOOKUP may hit)
    BEGIN_READ   nbytes u64 | fingerprint u64 | n | keys  -> lease u64 | Slots (pinned until END_READ)
    END_READ     lease u64                                -> empty
    BEGIN_WRITE  nbytes u64 | fingerprint u64 | n | keys [| depths u32[n]]
                                                          -> Slots (RESERVED slots belong to the caller);
                                                             depths: each chunk's index in its token
                                                             sequence, for eviction (absent: 0)
    COMMIT/ABORT n u32 | keys                             -> empty; every key must be reserved by
                                                             this connection, else UNKNOWN_KEY and
                                                             nothing changes
    STATUS       empty                                    -> JSON
    FLUSH        timeout_ms u32                           -> u8 (1: write-back drained)
    EVICT        empty                                    -> count u64 (idle DRAM objects dropped)
Slots = n u32 | pad u32 | offsets u64[n] | generations u64[n] | states u8[n]; an offset is the
slot's byte offset in the pool's data region, a generation the value of the pool's generation
word for that slot when it was handed out (see agent/shm_pool.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from kvstore.errors import InvalidArgumentError, KVStoreError, PoolFullError, TierIOError

MAGIC = b"KVA1"
HEADER = struct.Struct("<4sHHII")
KEY_NBYTES = 16
MAX_KEYS = 16384
MAX_BODY_NBYTES = 64 + MAX_KEYS * (KEY_NBYTES + 4)  # the largest: BEGIN_WRITE of MAX_KEYS keys, depths
PRE_DEPTHS_MAX_BODY_NBYTES = 64 + MAX_KEYS * KEY_NBYTES  # what agents before BEGIN_WRITE depths accept
MAX_REPLY_NBYTES = 16 << 20                   # a client refuses larger replies
MAX_NAME_NBYTES = 64

_COUNT = struct.Struct("<I")
_SIZED = struct.Struct("<QQI")   # nbytes, fingerprint, n
_U64 = struct.Struct("<Q")
_HELLO = struct.Struct("<I")
POOL_INFO = struct.Struct("<QQQQQ")  # instance_id, file_nbytes, gen_offset, data_offset, data_nbytes


class Op(IntEnum):
    HELLO = 1
    LOOKUP = 2
    BEGIN_READ = 3
    END_READ = 4
    BEGIN_WRITE = 5
    COMMIT = 6
    ABORT = 7
    STATUS = 8
    FLUSH = 9
    EVICT = 10
    LOOKUP_WRITING = 11


class Status(IntEnum):
    OK = 0
    MALFORMED = 1
    TOO_LARGE = 2
    INVALID_ARGUMENT = 3
    UNKNOWN_KEY = 4
    UNKNOWN_LEASE = 5
    POOL_FULL = 6
    TIER_IO = 7
    SHUTTING_DOWN = 8
    INTERNAL = 9


class SlotState(IntEnum):
    # BEGIN_READ
    HIT_DRAM = 0
    MISS = 1
    HIT_SSD = 2      # promoted into DRAM by this request
    # BEGIN_WRITE
    RESERVED = 0
    PRESENT = 1      # already stored or being written by someone: skipped
    FULL = 2         # no room: not stored


# ---- errors ------------------------------------------------------------------------------------
class AgentError(KVStoreError):
    """The agent answered a request with an error status."""


class AgentUnavailableError(AgentError, ConnectionError):
    """No agent answers on the socket (not started, killed, restarting) or it timed out."""


class ProtocolError(AgentError, ValueError):
    """A malformed or oversized frame (either direction)."""


class UnknownKeyError(AgentError, InvalidArgumentError):
    """COMMIT/ABORT of a key this client has not reserved."""


class UnknownLeaseError(AgentError, InvalidArgumentError):
    """END_READ of a lease this client does not hold."""


class AgentPoolFullError(AgentError, PoolFullError):
    pass


class AgentTierIOError(AgentError, TierIOError):
    pass


class AgentInvalidArgumentError(AgentError, InvalidArgumentError):
    pass


class AgentShuttingDownError(AgentUnavailableError):
    pass


ERROR_OF_STATUS = {
    Status.MALFORMED: ProtocolError, Status.TOO_LARGE: ProtocolError,
    Status.INVALID_ARGUMENT: AgentInvalidArgumentError, Status.UNKNOWN_KEY: UnknownKeyError,
    Status.UNKNOWN_LEASE: UnknownLeaseError, Status.POOL_FULL: AgentPoolFullError,
    Status.TIER_IO: AgentTierIOError, Status.SHUTTING_DOWN: AgentShuttingDownError, Status.INTERNAL: AgentError,
}


def error_for(status: int, message: str) -> AgentError:
    try:
        cls = ERROR_OF_STATUS[Status(status)]
    except (ValueError, KeyError):
        cls = ProtocolError
        message = f"unknown status {status}: {message}"
    return cls(message)


# ---- framing -----------------------------------------------------------------------------------
def frame(op: int, request_id: int, body: bytes = b"", status: int = 0) -> bytes:
    return HEADER.pack(MAGIC, op, status, request_id, len(body)) + body


def parse_header(raw: bytes, max_body: int) -> tuple[int, int, int, int]:
    """(op, status, request_id, body_nbytes); raises ProtocolError on a bad magic or a body
    larger than max_body."""
    magic, op, status, request_id, body_nbytes = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r})")
    if body_nbytes > max_body:
        raise ProtocolError(f"frame body of {body_nbytes} bytes exceeds the limit of {max_body}")
    return op, status, request_id, body_nbytes


# ---- bodies ------------------------------------------------------------------------------------
def encode_keys(keys: list[bytes]) -> bytes:
    return _COUNT.pack(len(keys)) + b"".join(keys)


def decode_keys(body: bytes | memoryview, offset: int = 0) -> list[bytes]:
    if len(body) < offset + _COUNT.size:
        raise ProtocolError("body too short for a key count")
    (n,) = _COUNT.unpack_from(body, offset)
    if n > MAX_KEYS:
        raise ProtocolError(f"{n} keys exceed the limit of {MAX_KEYS} per request")
    start = offset + _COUNT.size
    if len(body) != start + n * KEY_NBYTES:
        raise ProtocolError(f"body of {len(body)} bytes does not hold {n} keys of {KEY_NBYTES} bytes")
    raw = bytes(body[start:])
    return [raw[i:i + KEY_NBYTES] for i in range(0, len(raw), KEY_NBYTES)]


def encode_sized_keys(nbytes: int, fingerprint: int, keys: list[bytes]) -> bytes:
    return _SIZED.pack(nbytes, fingerprint, len(keys)) + b"".join(keys)


def decode_sized_keys(body: bytes | memoryview) -> tuple[int, int, list[bytes]]:
    if len(body) < _SIZED.size:
        raise ProtocolError("body too short for (nbytes, fingerprint, count)")
    nbytes, fingerprint, _ = _SIZED.unpack_from(body)
    return nbytes, fingerprint, decode_keys(body, _SIZED.size - _COUNT.size)


def encode_write(nbytes: int, fingerprint: int, keys: list[bytes], depths=None) -> bytes:
    """BEGIN_WRITE: encode_sized_keys, then the chunks' depths if given."""
    body = encode_sized_keys(nbytes, fingerprint, keys)
    if depths is None:
        return body
    if len(depths) != len(keys):
        raise InvalidArgumentError(f"{len(depths)} depths for {len(keys)} keys")
    return body + np.asarray(depths, dtype="<u4").tobytes()


def decode_write(body: bytes | memoryview) -> tuple[int, int, list[bytes], list[int] | None]:
    """(nbytes, fingerprint, keys, depths or None) of a BEGIN_WRITE body."""
    if len(body) < _SIZED.size:
        raise ProtocolError("body too short for (nbytes, fingerprint, count)")
    (n,) = _COUNT.unpack_from(body, _SIZED.size - _COUNT.size)
    keys_end = _SIZED.size + n * KEY_NBYTES
    if len(body) == keys_end + 4 * n and n:
        depths = np.frombuffer(bytes(body[keys_end:]), dtype="<u4").tolist()
        return (*decode_sized_keys(body[:keys_end]), depths)
    return (*decode_sized_keys(body), None)


@dataclass(frozen=True)
class Slots:
    offsets: np.ndarray       # u64[n]
    generations: np.ndarray   # u64[n]
    states: np.ndarray        # u8[n]

    def encode(self) -> bytes:
        n = len(self.states)
        return (struct.pack("<II", n, 0) + self.offsets.astype("<u8").tobytes()
                + self.generations.astype("<u8").tobytes() + self.states.astype(np.uint8).tobytes())

    @classmethod
    def decode(cls, body: bytes | memoryview, offset: int = 0) -> "Slots":
        if len(body) < offset + 8:
            raise ProtocolError("reply too short for a slot count")
        (n, _) = struct.unpack_from("<II", body, offset)
        start = offset + 8
        if len(body) != start + n * 17:
            raise ProtocolError(f"slot reply of {len(body)} bytes does not hold {n} slots")
        offsets = np.frombuffer(body, dtype="<u8", count=n, offset=start)
        gens = np.frombuffer(body, dtype="<u8", count=n, offset=start + 8 * n)
        states = np.frombuffer(body, dtype=np.uint8, count=n, offset=start + 16 * n)
        return cls(offsets, gens, states)


def encode_hello(pid: int, name: str) -> bytes:
    return _HELLO.pack(pid) + name.encode()[:MAX_NAME_NBYTES]


def decode_hello(body: bytes | memoryview) -> tuple[int, str]:
    if len(body) < _HELLO.size or len(body) > _HELLO.size + MAX_NAME_NBYTES:
        raise ProtocolError("HELLO body must be a pid and a name of at most 64 bytes")
    (pid,) = _HELLO.unpack_from(body)
    return pid, bytes(body[_HELLO.size:]).decode(errors="replace")


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(body: bytes | memoryview) -> int:
    if len(body) != _U64.size:
        raise ProtocolError(f"expected an 8-byte body, got {len(body)} bytes")
    return _U64.unpack(body)[0]


def decode_u32(body: bytes | memoryview) -> int:
    if len(body) != _COUNT.size:
        raise ProtocolError(f"expected a 4-byte body, got {len(body)} bytes")
    return _COUNT.unpack(body)[0]
