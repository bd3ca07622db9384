"""AgentServer: the unix-socket front of AgentCore. One thread per connected client (engine
processes are few); each request is read whole, validated, answered, in order.

- A frame that claims a body over the limit, or has a bad magic, is answered (TOO_LARGE /
  MALFORMED) and the connection is closed: its framing can no longer be trusted. A body that
  does not parse, unknown keys, bad sizes: an error reply, nothing changes, the connection stays.
- A client whose socket closes (exit, crash, SIGKILL) is disconnected: AgentCore reclaims its
  reservations and leases.
- stop() (SIGTERM): the listener closes at once; each connection finishes the request in
  progress; a client holding reservations or leases may still COMMIT / ABORT / END_READ for up
  to drain_s (new BEGIN_* are refused with SHUTTING_DOWN); then connections close and the core
  drains write-back and closes the SSD index.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time

from kvstore.errors import InvalidArgumentError, KVStoreError, PoolFullError, TierIOError

from . import protocol as P
from .core import AgentCore, ClientState

log = logging.getLogger(__name__)
_POLL_S = 0.2          # how often an idle connection thread looks at the stop flag
_FRAME_TIMEOUT_S = 10  # a client that starts a frame must finish sending it within this


class _Closed(Exception):
    pass


class AgentServer:
    def __init__(self, core: AgentCore, socket_path: str, *, drain_s: float = 2.0):
        self.core = core
        self.socket_path = socket_path
        self.drain_s = drain_s
        self._stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._listener = self._bind(socket_path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: its agent is gone
            else:
                raise TierIOError(f"an agent is already listening on {path}")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)  # the socket is the owner's only
        try:
            listener.bind(path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.settimeout(_POLL_S)
        return listener

    # ---- lifecycle ---------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accepts until stop(); then drains connections and closes the core."""
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError as e:
                    if self._stopping.is_set():
                        break
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        time.sleep(_POLL_S)
                        continue
                    raise
                t = threading.Thread(target=self._serve, args=(conn,), name="kvstore-agent-client", daemon=True)
                with self._threads_lock:
                    self._threads.add(t)
                t.start()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Safe from a signal handler: sets a flag the loops poll."""
        self._stopping.set()

    def _shutdown(self) -> None:
        self._listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        deadline = time.monotonic() + self.drain_s + _FRAME_TIMEOUT_S
        with self._threads_lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.core.close()
        log.info("agent stopped")

    # ---- one client --------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        client = self.core.connect()
        conn.settimeout(_POLL_S)
        drain_deadline = None
        try:
            while True:
                if self._stopping.is_set():
                    drain_deadline = drain_deadline or time.monotonic() + self.drain_s
                    if not (client.reservations or client.leases) or time.monotonic() > drain_deadline:
                        break
                header = self._recv(conn, P.HEADER.size, idle_ok=True)
                if header is None:
                    continue
                try:
                    op, _, request_id, body_nbytes = P.parse_header(header, P.MAX_BODY_NBYTES)
                except P.ProtocolError as e:
                    status = P.Status.TOO_LARGE if header[:4] == P.MAGIC else P.Status.MALFORMED
                    conn.sendall(P.frame(0, 0, str(e).encode(), status))
                    break
                body = self._recv(conn, body_nbytes, idle_ok=False) if body_nbytes else b""
                client.requests += 1
                status, reply, fds = self._dispatch(client, op, body)
                data = P.frame(op, request_id, reply, status)
                if fds:
                    socket.send_fds(conn, [data], fds)
                else:
                    conn.sendall(data)
        except (_Closed, OSError):
            pass
        finally:
            self.core.disconnect(client)
            conn.close()
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _recv(self, conn: socket.socket, n: int, *, idle_ok: bool) -> bytes | None:
        """n bytes; None if idle_ok and nothing arrived within one poll; raises _Closed at EOF."""
        buf = bytearray()
        deadline = time.monotonic() + _FRAME_TIMEOUT_S
        while len(buf) < n:
            try:
                chunk = conn.recv(n - len(buf))
            except socket.timeout:
                if idle_ok and not buf:
                    return None
                if time.monotonic() > deadline:
                    raise _Closed() from None
                continue
            if not chunk:
                raise _Closed()
            buf += chunk
        return bytes(buf)

    def _dispatch(self, client: ClientState, op: int, body: bytes) -> tuple[int, bytes, list[int]]:
        try:
            return P.Status.OK, *self._handle(client, op, body)
        except P.ProtocolError as e:
            return P.Status.MALFORMED, str(e).encode(), []
        except P.UnknownKeyError as e:
            return P.Status.UNKNOWN_KEY, str(e).encode(), []
        except P.UnknownLeaseError as e:
            return P.Status.UNKNOWN_LEASE, str(e).encode(), []
        except P.AgentShuttingDownError as e:
            return P.Status.SHUTTING_DOWN, str(e).encode(), []
        except InvalidArgumentError as e:
            return P.Status.INVALID_ARGUMENT, str(e).encode(), []
        except PoolFullError as e:
            return P.Status.POOL_FULL, str(e).encode(), []
        except TierIOError as e:
            return P.Status.TIER_IO, str(e).encode(), []
        except KVStoreError as e:
            return P.Status.INTERNAL, f"{type(e).__name__}: {e}".encode(), []
        except Exception as e:  # a bug must cost one request, not the agent
            log.exception("request op=%d failed", op)
            return P.Status.INTERNAL, f"{type(e).__name__}: {e}".encode(), []

    def _handle(self, client: ClientState, op: int, body: bytes) -> tuple[bytes, list[int]]:
        core = self.core
        if op in (P.Op.BEGIN_READ, P.Op.BEGIN_WRITE) and self._stopping.is_set():
            raise P.AgentShuttingDownError("agent is shutting down")
        if op == P.Op.HELLO:
            client.pid, client.name = P.decode_hello(body)
            f = core.file
            info = P.POOL_INFO.pack(f.instance_id, f.file_nbytes, f.gen_offset, f.data_offset, f.data_nbytes)
            return info, [f.fd]
        if op in (P.Op.LOOKUP, P.Op.LOOKUP_WRITING):
            return core.lookup(P.decode_keys(body), writing=op == P.Op.LOOKUP_WRITING).tobytes(), []
        if op == P.Op.BEGIN_READ:
            nbytes, fingerprint, keys = P.decode_sized_keys(body)
            lease, slots = core.begin_read(client, nbytes, fingerprint, keys)
            return P.encode_u64(lease) + slots.encode(), []
        if op == P.Op.END_READ:
            core.end_read(client, P.decode_u64(body))
            return b"", []
        if op == P.Op.BEGIN_WRITE:
            nbytes, fingerprint, keys, depths = P.decode_write(body)
            return core.begin_write(client, nbytes, fingerprint, keys, depths).encode(), []
        if op == P.Op.COMMIT:
            core.commit(client, P.decode_keys(body))
            return b"", []
        if op == P.Op.ABORT:
            core.abort(client, P.decode_keys(body))
            return b"", []
        if op == P.Op.STATUS:
            if body:
                raise P.ProtocolError("STATUS takes no body")
            return json.dumps(core.status()).encode(), []
        if op == P.Op.FLUSH:
            timeout_ms = P.decode_u32(body)
            return bytes([core.flush(min(timeout_ms, 600_000) / 1000)]), []
        if op == P.Op.EVICT:
            if body:
                raise P.ProtocolError("EVICT takes no body")
            return P.encode_u64(core.evict()), []
        raise P.ProtocolError(f"unknown op {op}")
