"""AgentClient: one engine process's connection to the node agent (agent/), and its mapping of
the agent's shared DRAM pool.

- request() sends one frame and waits for its reply within timeout_s. A timeout, a closed
  socket or a garbled reply closes the connection and raises AgentUnavailableError; an error
  reply raises its typed AgentError (the connection stays). Closing the connection makes the
  agent reclaim everything this client reserved or leased.
- The next request reconnects (at most once per retry interval, so a dead agent costs a failed
  connect, not a hang); a restarted agent has a new pool (another instance id), which is mapped
  afresh. The old mapping is unmapped once no transfer uses it (PoolRef.users).
- With CUDA present the pool's data region is registered with cudaHostRegister once per mapping,
  so the GPU movers read and write it directly.
- mode "auto" starts a detached agent (python -m kvstore.agent, new session: it outlives this
  process) when none answers, serialised by an flock beside the socket.
Thread-safe: one lock serialises requests on the one socket.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from ._native import C
from .config import Config
from .agent import protocol as P
from .agent.shm_pool import PoolFile

log = logging.getLogger(__name__)
_RETRY_S = 0.2
_EOF = "agent closed the connection"


class _StaleConnection(Exception):
    """The agent closed the connection (restart, shutdown) before answering."""


def default_socket_path() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "kvstore", "agent.sock")
    return os.path.join("/tmp", f"kvstore-{os.getuid()}", "agent.sock")


def parse_address(agent: str) -> tuple[str, bool]:
    """(socket path, auto-start) from a config `agent` value."""
    if agent == "auto":
        return default_socket_path(), True
    for prefix, auto in (("unix://", False), ("auto://", True)):
        if agent.startswith(prefix):
            return agent[len(prefix):], auto
    raise P.AgentInvalidArgumentError(f"cannot parse agent address {agent!r}")


@dataclass(eq=False)
class PoolRef:
    pool: PoolFile
    registered: bool
    users: int = 0
    retired: bool = False


class AgentClient:
    def __init__(self, socket_path: str, *, timeout_s: float, auto_start: bool = False,
                 agent_config: Config | None = None, name: str = ""):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.auto_start = auto_start
        self._agent_config = agent_config
        self._name = name or os.path.basename(sys.argv[0] or "python")
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pool: PoolRef | None = None
        self._request_id = 0
        self._next_try = 0.0
        self._closed = False
        self.reconnects = 0

    # ---- requests ----------------------------------------------------------------------------
    def request(self, op: P.Op, body: bytes = b"") -> bytes:
        with self._lock:
            fresh = self._sock is None
            self._ensure_connected()
            try:
                return self._exchange(op, body)
            except _StaleConnection:
                if fresh:
                    raise P.AgentUnavailableError(f"agent on {self.socket_path} closed the connection") from None
            # The agent went away while we were idle (restart): one more try on a new connection.
            # Safe for every op: what the old connection held died with it, so a COMMIT or END_READ
            # of it gets UNKNOWN_KEY / UNKNOWN_LEASE rather than acting twice.
            self._ensure_connected()
            return self._exchange(op, body)

    def status(self) -> dict:
        """The agent's STATUS (occupancy, tiers, clients, counters, cluster link) as a dict."""
        return json.loads(self.request(P.Op.STATUS))

    def _exchange(self, op: P.Op, body: bytes, with_fd: bool = False) -> bytes | tuple[bytes, list[int]]:
        self._request_id = (self._request_id + 1) & 0xFFFFFFFF
        sock = self._sock
        assert sock is not None
        fds: list[int] = []
        try:
            sock.settimeout(self.timeout_s)
            sock.sendall(P.frame(op, self._request_id, body))
            deadline = time.monotonic() + self.timeout_s
            if with_fd:
                head, fds, _, _ = socket.recv_fds(sock, P.HEADER.size + P.POOL_INFO.size, 1)
                if not head:
                    raise ConnectionError(_EOF)
                head += self._recv(sock, P.HEADER.size - len(head), deadline) if len(head) < P.HEADER.size else b""
            else:
                head = self._recv(sock, P.HEADER.size, deadline)
            rop, status, rid, nbody = P.parse_header(head[:P.HEADER.size], P.MAX_REPLY_NBYTES)
            rest = head[P.HEADER.size:]
            body_out = rest + self._recv(sock, nbody - len(rest), deadline)
            if status == P.Status.OK and (rop != op or rid != self._request_id):
                raise P.ProtocolError(f"reply for op {rop}/request {rid}, expected {int(op)}/{self._request_id}")
        except (OSError, P.ProtocolError) as e:
            for fd in fds:
                os.close(fd)
            self._disconnect()
            if isinstance(e, (BrokenPipeError, ConnectionResetError)) or str(e) == _EOF:
                raise _StaleConnection() from None
            if isinstance(e, socket.timeout):
                raise P.AgentUnavailableError(f"agent on {self.socket_path} did not answer within "
                                              f"{self.timeout_s} s") from None
            raise P.AgentUnavailableError(f"agent on {self.socket_path}: {e}") from None
        if status != P.Status.OK:
            for fd in fds:
                os.close(fd)
            if status in (P.Status.TOO_LARGE, P.Status.MALFORMED) and rid == 0:
                self._disconnect()  # the agent closes after a frame it cannot trust
            raise P.error_for(status, body_out.decode(errors="replace"))
        return (body_out, fds) if with_fd else body_out

    @staticmethod
    def _recv(sock: socket.socket, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            sock.settimeout(left)
            chunk = sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError(_EOF)
            buf += chunk
        return bytes(buf)

    # ---- connection --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    def _ensure_connected(self) -> None:
        if self._closed:
            raise P.AgentUnavailableError("agent client is closed")
        if self._sock is not None:
            return
        now = time.monotonic()
        if now < self._next_try:
            raise P.AgentUnavailableError(f"no agent on {self.socket_path} (retrying in "
                                          f"{self._next_try - now:.2f} s)")
        try:
            self._connect()
        except P.AgentUnavailableError:
            if not self.auto_start:
                self._next_try = time.monotonic() + _RETRY_S
                raise
            self._start_agent()
            self._connect()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as e:
            sock.close()
            raise P.AgentUnavailableError(f"no agent on {self.socket_path}: {e.strerror or e}") from None
        self._sock = sock
        try:
            body, fds = self._exchange(P.Op.HELLO, P.encode_hello(os.getpid(), self._name), with_fd=True)
        except _StaleConnection:
            raise P.AgentUnavailableError(f"agent on {self.socket_path} closed the connection") from None
        try:
            if len(fds) != 1 or len(body) != P.POOL_INFO.size:
                raise P.ProtocolError("HELLO reply without the pool's file descriptor")
            instance_id, file_nbytes, gen_offset, data_offset, data_nbytes = P.POOL_INFO.unpack(body)
            if self._pool is not None and self._pool.pool.instance_id == instance_id:
                os.close(fds[0])
            else:
                pool = PoolFile.attach(fds[0], file_nbytes, gen_offset, data_offset, data_nbytes, instance_id)
                fds = []
                registered = bool(C.host_register(pool.data_ptr, pool.data_nbytes)) if C.cuda_device_count() else False
                self._retire_pool()
                self._pool = PoolRef(pool, registered)
                log.info("attached to agent pool %x (%d bytes) on %s", instance_id, data_nbytes, self.socket_path)
        except BaseException as e:
            for fd in fds:
                os.close(fd)
            self._disconnect()
            if isinstance(e, (P.ProtocolError, ValueError, OSError)):
                raise P.AgentUnavailableError(f"cannot attach to the agent's pool: {e}") from None
            raise
        self.reconnects += 1

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _start_agent(self) -> None:
        """Starts a detached agent unless another process does it first; waits until it listens."""
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        lock_fd = os.open(self.socket_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + max(self.timeout_s, 30.0)
        try:
            while True:  # the lock holder may be starting one: wait for it, bounded
                try:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise P.AgentUnavailableError(f"timed out waiting for another process to start the agent "
                                                      f"on {self.socket_path}") from None
                    time.sleep(0.05)
            if _answers(self.socket_path):
                return
            cmd = [sys.executable, "-m", "kvstore.agent", "--socket", self.socket_path]
            cfg = self._agent_config or Config()
            for key in Config.keys():
                if not key.startswith("agent") and key != "master_token":
                    value = getattr(cfg, key)
                    cmd += ["--set", f"{key}={'none' if value is None else value}"]
            log_path = self.socket_path + ".log"
            env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
            if cfg.master_token:  # through the environment: any user can read a command line (ps)
                env["KVSTORE_MASTER_TOKEN"] = cfg.master_token
            with open(log_path, "ab") as log_file:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                        start_new_session=True, close_fds=True, env=env)
            log.info("started kvstore agent pid %d on %s (log %s)", proc.pid, self.socket_path, log_path)
            while not _answers(self.socket_path):
                if proc.poll() is not None:
                    raise P.AgentUnavailableError(f"the agent exited with status {proc.returncode} at start-up; "
                                                  f"see {log_path}")
                if time.monotonic() > deadline:
                    raise P.AgentUnavailableError(f"the agent did not listen on {self.socket_path} in time; "
                                                  f"see {log_path}")
                time.sleep(0.05)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)

    # ---- the pool ----------------------------------------------------------------------------
    def acquire_pool(self) -> PoolRef:
        """The current mapping, held until release_pool (a restart does not unmap it under us)."""
        with self._lock:
            if self._pool is None:
                raise P.AgentUnavailableError("not attached to an agent")
            self._pool.users += 1
            return self._pool

    def release_pool(self, ref: PoolRef) -> None:
        with self._lock:
            ref.users -= 1
            if ref.retired and ref.users == 0:
                _unmap(ref)

    def _retire_pool(self) -> None:
        ref, self._pool = self._pool, None
        if ref is not None:
            ref.retired = True
            if ref.users == 0:
                _unmap(ref)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._disconnect()
            self._retire_pool()


def _unmap(ref: PoolRef) -> None:
    if ref.registered:
        C.host_unregister(ref.pool.data_ptr)
    ref.pool.close()


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
