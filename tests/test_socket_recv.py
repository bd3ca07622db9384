"""C.recv_checksummed: receive one object from a socket, hashing it piece by piece as it arrives
(the remote tier's fetch path). Same checksum as C.checksum over the same bytes, typed errors on
an early close and on a timeout, never a hang."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from kvstore._native import C
from kvstore.errors import InvalidArgumentError, TierIOError


def _send_later(sock: socket.socket, payload: bytes, close: bool = True, pause_s: float = 0.0) -> threading.Thread:
    def run():
        view = memoryview(payload)
        step = 200_003  # odd pieces, not aligned to the 1 MiB hash pieces
        for off in range(0, len(view), step):
            sock.sendall(view[off:off + step])
            if pause_s:
                time.sleep(pause_s)
        if close:
            sock.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("nbytes", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 12345])
def test_receives_and_hashes_like_checksum(nbytes):
    a, b = socket.socketpair()
    try:
        payload = np.random.default_rng(nbytes).integers(1, 256, nbytes, dtype=np.uint8)
        dst = np.full(nbytes + 7, 0xEE, dtype=np.uint8)  # poisoned, and longer than the object
        t = _send_later(a, payload.tobytes(), close=False, pause_s=0.001)
        got = C.recv_checksummed(b.fileno(), dst, nbytes, 10.0)
        t.join()
        assert got == C.checksum(payload, nbytes)
        assert np.array_equal(dst[:nbytes], payload)
        assert (dst[nbytes:] == 0xEE).all()
    finally:
        a.close()
        b.close()


def test_early_close_and_timeout_are_typed_errors():
    a, b = socket.socketpair()
    dst = np.empty(1 << 20, dtype=np.uint8)
    _send_later(a, b"x" * 1000, close=True).join()
    with pytest.raises(TierIOError, match="closed by the source after 1000 of"):
        C.recv_checksummed(b.fileno(), dst, dst.size, 10.0)
    b.close()
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(TierIOError, match="timed out"):
            C.recv_checksummed(b.fileno(), dst, dst.size, 0.3)
        assert time.monotonic() - t0 < 5
    finally:
        a.close()
        b.close()


def test_bad_arguments():
    a, b = socket.socketpair()
    try:
        with pytest.raises(InvalidArgumentError, match="exceeds the buffer"):
            C.recv_checksummed(b.fileno(), np.empty(10, np.uint8), 11, 1.0)
        with pytest.raises(BufferError):  # a read-only buffer is refused before anything is received
            C.recv_checksummed(b.fileno(), b"0123456789", 10, 1.0)
    finally:
        a.close()
        b.close()


def test_many_objects_in_one_call_and_a_short_stream():
    a, b = socket.socketpair()
    try:
        n, nbytes = 5, (1 << 20) + 333
        objs = [np.random.default_rng(i).integers(1, 256, nbytes, dtype=np.uint8) for i in range(n)]
        dsts = [np.full(nbytes, 0xEE, dtype=np.uint8) for _ in range(n)]
        ptrs = np.array([d.ctypes.data for d in dsts], dtype=np.uint64)
        t = _send_later(a, b"".join(o.tobytes() for o in objs), close=False)
        got, sums, error = C.recv_objects_checksummed(b.fileno(), ptrs, nbytes, 10.0)
        t.join()
        assert (got, error) == (n, "")
        assert list(sums) == [C.checksum(o, nbytes) for o in objs]
        assert all(np.array_equal(d, o) for d, o in zip(dsts, objs))
        # the stream ends inside object 3: two whole objects, and why it stopped
        t = _send_later(a, b"".join(o.tobytes() for o in objs[:2]) + objs[2].tobytes()[:1000], close=True)
        got, sums, error = C.recv_objects_checksummed(b.fileno(), ptrs, nbytes, 10.0)
        t.join()
        assert got == 2 and "closed by the source" in error
        assert list(sums[:2]) == [C.checksum(o, nbytes) for o in objs[:2]]
    finally:
        b.close()
