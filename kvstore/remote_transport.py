"""The remote DRAM tier's transport (G4, DESIGN.md §3): agent-to-agent object fetch and push.

One small interface, Transport.fetch(address, keys, ...) -> per key ok/miss and
Transport.push(address, keys, ...) -> per key stored (spilling objects to a node the master
placed them on), with one implementation here: plain TCP with a fixed binary framing (threads, sendall straight from the
source's pool slots, recv_into straight into the destination's reserved slots). ucxx (the
UCX binding the issue names for RDMA) is not installable on this machine, so TcpTransport is the
only implementation; a UcxxTransport would implement the same fetch().

Wire (little-endian), many objects per request, pipelined in one reply stream:
  request = b"KVR1" | n u32 | nbytes u64 | fingerprint u64 | token_nbytes u16 | pad u16
            | token | n * 16-byte keys
  reply   = b"KVR1" | n u32 | status u32 | pad u32 | n * (state u8) | n * (checksum u64)
            | the payload (nbytes) of every key whose state is 1, in request order
  status 0 = OK; otherwise the reply ends after its header and a UTF-8 message of `pad` bytes
  (bad token, malformed request, too many keys). A request that does not parse closes the
  connection. Every receive has a deadline that scales with the bytes expected
  (base + bytes / min_rate).
Push, the other way (the sender's objects into the receiver's DRAM):
  request = b"KVP1" | n u32 | nbytes u64 | fingerprint u64 | token_nbytes u16 | pad u16
            | token | n * 16-byte keys | n * (checksum u64)
  reply   = b"KVP1" | n u32 | status u32 | pad u32 | n * (state u8)
            state 1 = a slot is reserved: send it; 2 = held there already; 0 = refused (no room)
  then the sender streams the payload of every key in state 1, in request order, and the receiver
  answers n * (stored u8): stored = the bytes arrived whole and match the sender's checksum, or
  the receiver held the key already.
The destination verifies each object's checksum (against the master's index when it has one,
else the source's) before it commits the slot: a mismatch or a broken stream is a miss. All
payloads of a reply are received in one native call (C.recv_objects_checksummed, GIL released),
each 1 MiB piece hashed as soon as it has arrived, while still in cache.
"""
from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from ._native import C
from .errors import TierIOError

log = logging.getLogger(__name__)
MAGIC = b"KVR1"
PUSH_MAGIC = b"KVP1"
_REQ = struct.Struct("<4sIQQHH")
_REP = struct.Struct("<4sIII")
KEY_NBYTES = 16
MAX_KEYS = 4096
MAX_TOKEN = 256
BASE_TIMEOUT_S = 2.0
MIN_RATE_BPS = 100e6  # the slowest rate a fetch may take before it is abandoned
ST_OK, ST_UNAUTHENTICATED, ST_INVALID = 0, 1, 2


def timeout_for(nbytes: int) -> float:
    return BASE_TIMEOUT_S + nbytes / MIN_RATE_BPS


@dataclass
class FetchStats:
    objects: int = 0
    bytes: int = 0
    misses: int = 0
    checksum_mismatches: int = 0
    failures: int = 0     # broken or timed-out streams, refused connections


class Transport(Protocol):
    def fetch(self, address: str, keys: Sequence[bytes], nbytes: int, fingerprint: int,
              reserve: Callable[[int], np.ndarray | None], finish: Callable[[int, bool], None],
              expected: Sequence[int] | None = None) -> int:
        """Fetches keys from the node at address. For each key the source holds, reserve(i)
        returns a writable uint8 array of >= nbytes (or None to skip it) and finish(i, ok) is
        called once with ok = the bytes arrived whole and their checksum matches expected[i] (or
        the source's checksum when expected is None). Returns the number of objects stored;
        never raises for network failures (they are misses, counted in stats)."""


class FetchError(Exception):
    pass


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timed out")
        sock.settimeout(min(left, 5.0))
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            continue
        if n == 0:
            raise FetchError("connection closed by the source")
        got += n


def _recv_checksummed(sock: socket.socket, dst: np.ndarray, nbytes: int, deadline: float) -> int:
    """Receives one object's payload into dst and returns its checksum, hashed piece by piece as
    it arrives (native, GIL released)."""
    try:
        return C.recv_checksummed(sock.fileno(), dst, nbytes, max(0.0, deadline - time.monotonic()))
    except TierIOError as e:
        raise FetchError(str(e)) from e


def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf), deadline)
    return bytes(buf)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class TcpTransport:
    """Client side: one persistent connection per source address (a lock per connection)."""

    def __init__(self, token: str | None = None, connect_timeout_s: float = 2.0):
        self.token = (token or "").encode()
        self.connect_timeout_s = connect_timeout_s
        self.stats = FetchStats()
        self._conns: dict[str, socket.socket] = {}
        self._lock = threading.Lock()

    def _connect(self, address: str) -> socket.socket:
        with self._lock:
            sock = self._conns.pop(address, None)
        if sock is not None:
            return sock
        sock = socket.create_connection(_split(address), timeout=self.connect_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _keep(self, address: str, sock: socket.socket) -> None:
        with self._lock:
            old = self._conns.get(address)
            self._conns[address] = sock
        if old is not None:
            old.close()

    def _request(self, sock: socket.socket, magic: bytes, n: int, nbytes: int, fingerprint: int, body: bytes,
                 deadline: float) -> None:
        """Sends one request (header, token, body) and reads the reply's header; FetchError
        unless the peer answered OK for the same n objects."""
        sock.sendall(_REQ.pack(magic, n, nbytes, fingerprint, len(self.token), 0) + self.token + body)
        got_magic, count, status, msg_len = _REP.unpack(_recv(sock, _REP.size, deadline))
        if got_magic != magic:
            raise FetchError(f"bad reply magic {got_magic!r}")
        if status != ST_OK:
            raise FetchError(f"peer refused: {_recv(sock, min(msg_len, 4096), deadline).decode(errors='replace')}")
        if count != n:
            raise FetchError(f"reply counts {count} objects for a request of {n}")

    def fetch(self, address, keys, nbytes, fingerprint, reserve, finish, expected=None) -> int:
        stored = 0
        for start in range(0, len(keys), MAX_KEYS):
            part = list(keys[start:start + MAX_KEYS])
            exp = None if expected is None else list(expected[start:start + MAX_KEYS])
            got, complete = self._fetch_part(address, part, nbytes, fingerprint,
                                             lambda i, s=start: reserve(s + i),
                                             lambda i, ok, s=start: finish(s + i, ok), exp)
            stored += got
            if not complete:
                break
        return stored

    def _fetch_part(self, address, keys, nbytes, fingerprint, reserve, finish, expected) -> tuple[int, bool]:
        n = len(keys)
        deadline = time.monotonic() + timeout_for(n * nbytes)
        try:
            sock = self._connect(address)
        except OSError as e:
            self.stats.failures += 1
            self.stats.misses += n
            log.warning("remote fetch: cannot connect to %s: %s", address, e)
            return 0, False
        stored = 0
        pending: list[int] = []  # indices reserved and not finished yet (the stream broke first)
        done = counted = 0
        try:
            self._request(sock, MAGIC, n, nbytes, fingerprint, b"".join(keys), deadline)
            states = np.frombuffer(_recv(sock, n, deadline), dtype=np.uint8)
            sums = np.frombuffer(_recv(sock, 8 * n, deadline), dtype="<u8")
            present = np.flatnonzero(states == 1).tolist()
            self.stats.misses += n - len(present)
            counted = n - len(present)  # misses counted so far
            # Every destination first (what the caller declines lands in a scratch buffer), then
            # all payloads in one native call: no Python between objects.
            scratch = None
            dsts = []
            for i in present:
                dst = reserve(i)
                if dst is None:
                    if scratch is None:
                        scratch = np.empty(nbytes, dtype=np.uint8)
                    dst = scratch
                else:
                    if dst.nbytes < nbytes or not dst.flags.c_contiguous or not dst.flags.writeable:
                        raise ValueError("reserve() must return a writable contiguous array of >= nbytes")
                    pending.append(i)
                dsts.append(dst)
            got, got_sums, error = C.recv_objects_checksummed(
                sock.fileno(), np.array([d.ctypes.data for d in dsts], dtype=np.uint64), nbytes,
                max(0.0, deadline - time.monotonic()))
            for j, i in enumerate(present):
                if dsts[j] is scratch:
                    continue
                pending.remove(i)
                want = int(sums[i]) if expected is None else int(expected[i])
                ok = j < got and int(got_sums[j]) == want
                if j < got and not ok:
                    self.stats.checksum_mismatches += 1
                    log.warning("remote fetch from %s: checksum mismatch on %s: a miss", address, keys[i].hex())
                finish(i, ok)
                if ok:
                    stored += 1
                    self.stats.objects += 1
                    self.stats.bytes += nbytes
            if got < len(present):
                raise FetchError(error)
            done = n
            self._keep(address, sock)
            return stored, True
        except (OSError, FetchError, struct.error) as e:
            for i in pending:
                finish(i, False)
            self.stats.failures += 1
            self.stats.misses += max(0, n - done - stored - counted)
            log.warning("remote fetch from %s failed after %d objects: %s", address, stored, e)
            sock.close()
            return stored, False

    def push(self, address: str, keys: Sequence[bytes], nbytes: int, fingerprint: int,
             payloads: Sequence[np.ndarray], checksums: Sequence[int]) -> list[bool]:
        """Sends objects (payloads[i] holds >= nbytes) to the node at address, which stores those
        it has room for and whose bytes match checksums[i]. Per key: stored there. Never raises
        for network failures (nothing stored, counted in stats.failures)."""
        stored: list[bool] = []
        for start in range(0, len(keys), MAX_KEYS):
            end = start + MAX_KEYS
            stored += self._push_part(address, list(keys[start:end]), nbytes, fingerprint, payloads[start:end],
                                      checksums[start:end])
        return stored

    def _push_part(self, address, keys, nbytes, fingerprint, payloads, checksums) -> list[bool]:
        n = len(keys)
        deadline = time.monotonic() + timeout_for(n * nbytes)
        try:
            sock = self._connect(address)
        except OSError as e:
            self.stats.failures += 1
            log.warning("remote push: cannot connect to %s: %s", address, e)
            return [False] * n
        try:
            sums = np.asarray(checksums, dtype="<u8")
            self._request(sock, PUSH_MAGIC, n, nbytes, fingerprint, b"".join(keys) + sums.tobytes(), deadline)
            accepted = np.frombuffer(_recv(sock, n, deadline), dtype=np.uint8)
            for i in range(n):
                if accepted[i] == 1:
                    sock.sendall(memoryview(payloads[i])[:nbytes])
            stored = np.frombuffer(_recv(sock, n, deadline), dtype=np.uint8)
            self._keep(address, sock)
            return [bool(x) for x in stored]
        except (OSError, FetchError, struct.error) as e:
            self.stats.failures += 1
            log.warning("remote push to %s failed: %s", address, e)
            sock.close()
            return [False] * n

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for s in conns:
            s.close()


class ObjectSource(Protocol):
    def acquire_remote(self, key: bytes, nbytes: int, fingerprint: int):
        """A pinned slot (with .payload) or None."""

    def release_remote(self, slot) -> None: ...

    def checksum_of(self, slot) -> int: ...

    # push (optional: a source without these refuses pushes)
    def holds(self, key: bytes) -> bool:
        """The node has this object already (any tier): a push of it is a success without bytes."""

    def reserve_incoming(self, key: bytes, nbytes: int, fingerprint: int):
        """A writable slot (with .view) for a pushed object, or None (no room, or being written)."""

    def commit_incoming(self, slot, checksum: int) -> None: ...

    def abort_incoming(self, slot) -> None: ...


class TcpServer:
    """Source side: serves fetches of this node's objects; one thread per connection."""

    def __init__(self, source: ObjectSource, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 serve_delay_s: float = 0.0):
        from .errors import ConfigError
        if host not in ("127.0.0.1", "localhost", "::1") and not token:
            raise ConfigError(f"the remote tier listens on non-loopback {host!r}: a token (master_token) is required")
        self.source = source
        self.token = (token or "").encode()
        self.serve_delay_s = serve_delay_s  # tests only: slows each object so a fault can land mid-fetch
        self._listener = socket.create_server((host, port), backlog=64)
        self._listener.settimeout(0.2)
        self.host, self.port = host, self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="kvstore-remote-accept", daemon=True)
        self.served_objects = 0
        self.served_bytes = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "TcpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name="kvstore-remote-conn", daemon=True).start()

    def _refuse(self, conn: socket.socket, status: int, message: str, magic: bytes = MAGIC) -> None:
        msg = message.encode()
        conn.sendall(_REP.pack(magic, 0, status, len(msg)) + msg)

    def _accept(self, conn: socket.socket, keys: list[bytes], nbytes: int, fingerprint: int,
                sums: list[int]) -> None:
        """A push: reserve what fits, receive those payloads (hashed on arrival), commit the ones
        whose checksum matches, abort the rest; answer per key."""
        n = len(keys)
        slots = []
        states = np.zeros(n, dtype=np.uint8)
        for i, key in enumerate(keys):
            slot = None
            try:
                if self.source.holds(key):
                    states[i] = 2
                else:
                    slot = self.source.reserve_incoming(key, nbytes, fingerprint)
                    states[i] = slot is not None
            except Exception as e:  # a local error: not accepted
                log.warning("remote push: cannot take %s: %s", key.hex(), e)
            slots.append(slot)
        stored = (states == 2).astype(np.uint8)
        try:
            conn.sendall(_REP.pack(PUSH_MAGIC, n, ST_OK, 0) + states.tobytes())
            deadline = time.monotonic() + timeout_for(sum(s is not None for s in slots) * nbytes)
            for i, slot in enumerate(slots):
                if slot is None:
                    continue
                got = _recv_checksummed(conn, slot.view, nbytes, deadline)
                slots[i] = None
                if got == sums[i]:
                    self.source.commit_incoming(slot, got)
                    stored[i] = 1
                else:
                    log.warning("remote push: checksum mismatch on %s: not stored", keys[i].hex())
                    self.source.abort_incoming(slot)
            conn.sendall(stored.tobytes())
        finally:
            for slot in slots:
                if slot is not None:
                    self.source.abort_incoming(slot)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    head = _recv(conn, _REQ.size, time.monotonic() + 3600)
                except FetchError:
                    return
                magic, n, nbytes, fingerprint, token_len, _ = _REQ.unpack(head)
                if magic not in (MAGIC, PUSH_MAGIC) or token_len > MAX_TOKEN:
                    return self._refuse(conn, ST_INVALID, "malformed request header")
                push = magic == PUSH_MAGIC
                deadline = time.monotonic() + BASE_TIMEOUT_S
                token = _recv(conn, token_len, deadline) if token_len else b""
                if self.token and not hmac.compare_digest(token, self.token):
                    return self._refuse(conn, ST_UNAUTHENTICATED, "missing or wrong token", magic)
                if n > MAX_KEYS or nbytes == 0 or nbytes > (1 << 40):
                    return self._refuse(conn, ST_INVALID, f"bad request: {n} keys (max {MAX_KEYS}), nbytes {nbytes}",
                                        magic)
                if push and not hasattr(self.source, "reserve_incoming"):
                    return self._refuse(conn, ST_INVALID, "this node does not accept pushed objects", magic)
                raw = _recv(conn, n * KEY_NBYTES, deadline)
                keys = [raw[i:i + KEY_NBYTES] for i in range(0, len(raw), KEY_NBYTES)]
                if push:
                    sums = np.frombuffer(_recv(conn, 8 * n, deadline), dtype="<u8")
                    self._accept(conn, keys, nbytes, fingerprint, [int(x) for x in sums])
                else:
                    self._answer(conn, keys, nbytes, fingerprint)
        except (OSError, FetchError):
            pass
        finally:
            conn.close()

    def _answer(self, conn: socket.socket, keys: list[bytes], nbytes: int, fingerprint: int) -> None:
        n = len(keys)
        slots = []
        try:
            for key in keys:
                try:
                    slots.append(self.source.acquire_remote(key, nbytes, fingerprint))
                except Exception as e:  # a read error on this node: a miss for the peer
                    log.warning("remote serve: %s: %s", key.hex(), e)
                    slots.append(None)
            states = np.array([s is not None for s in slots], dtype=np.uint8)
            sums = np.array([self.source.checksum_of(s) if s is not None else 0 for s in slots], dtype="<u8")
            conn.sendall(_REP.pack(MAGIC, n, ST_OK, 0) + states.tobytes() + sums.tobytes())
            for i, slot in enumerate(slots):
                if slot is None:
                    continue
                if self.serve_delay_s:
                    time.sleep(self.serve_delay_s)
                conn.sendall(memoryview(slot.payload))
                self.source.release_remote(slot)
                slots[i] = None
                self.served_objects += 1
                self.served_bytes += nbytes
        finally:
            for slot in slots:
                if slot is not None:
                    self.source.release_remote(slot)
