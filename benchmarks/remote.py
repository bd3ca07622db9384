"""`kvstore bench remote`: the remote tier's fetch (TcpTransport client -> TcpServer source, many
objects per request, checksum verified on arrival, as an agent fetches) next to the raw
transport ceiling measured in the same run: one plain TCP stream of the same bytes on loopback
(sendall from the source buffer, recv_into with MSG_WAITALL into the destination buffer, no
framing, no checksum).

Both ends run in this process (threads; socket I/O and checksums release the GIL). ucxx is not
installed here, so TCP is the only transport measured. Writes remote.json and remote.png.
"""
from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvstore.config import parse_size

from .common import GB, machine, plot_lines, print_table, write_json

MiB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes-mib", default="1,4,16,64", help="object sizes in MiB, comma separated")
    p.add_argument("--total", default="512MiB", help="bytes fetched per size and round")
    p.add_argument("--repeats", type=int, default=3, help="keep the best of this many rounds")
    p.add_argument("--out", default="bench-out", help="directory for remote.json and remote.png")


class _Source:
    class Slot:
        def __init__(self, key, payload, checksum):
            self.key, self.payload, self.nbytes, self.checksum = key, payload, len(payload), checksum

    def __init__(self):
        self.objects = {}

    def acquire_remote(self, key, nbytes, fingerprint):
        return self.objects.get(key)

    def release_remote(self, slot):
        pass

    def checksum_of(self, slot):
        return slot.checksum


def _raw_stream(src: np.ndarray, dst: np.ndarray, nbytes: int, count: int) -> float:
    """Seconds to move count objects of nbytes over one loopback TCP connection, raw."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send():
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        go = conn.recv(1)
        if go:
            view = memoryview(src)
            for i in range(count):
                conn.sendall(view[(i % 4) * nbytes:(i % 4 + 1) * nbytes])
        conn.close()
    t = threading.Thread(target=send)
    t.start()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dview = memoryview(dst)
    start = time.perf_counter()
    s.sendall(b"g")
    for i in range(count):
        got = 0
        while got < nbytes:  # MSG_WAITALL: the kernel fills the whole object in one call, if it can
            n = s.recv_into(dview[got:nbytes], nbytes - got, socket.MSG_WAITALL)
            if n == 0:
                raise RuntimeError("raw stream closed early")
            got += n
    seconds = time.perf_counter() - start
    s.close()
    t.join()
    listener.close()
    return seconds


def run(args: argparse.Namespace) -> dict:
    from kvstore._native import C
    from kvstore.remote_transport import TcpServer, TcpTransport

    sizes = [int(s) * MiB for s in args.sizes_mib.split(",")]
    total = parse_size(args.total, "--total")
    source = _Source()
    server = TcpServer(source, "127.0.0.1", 0).start()
    transport = TcpTransport()
    rows, results = [], []
    try:
        with tqdm(total=len(sizes) * args.repeats, desc="bench remote", unit="round") as bar:
            for nbytes in sizes:
                count = max(4, total // nbytes)
                src = np.random.default_rng(nbytes).integers(0, 256, 4 * nbytes, dtype=np.uint8)
                dst = np.empty(4 * nbytes, dtype=np.uint8)
                source.objects = {}
                keys = []
                for i in range(count):
                    key = i.to_bytes(16, "little")
                    payload = src[(i % 4) * nbytes:(i % 4 + 1) * nbytes]
                    source.objects[key] = _Source.Slot(key, payload, C.checksum(payload, nbytes))
                    keys.append(key)
                expected = [source.objects[k].checksum for k in keys]
                fetch_s = raw_s = float("inf")
                for _ in range(args.repeats):
                    oks = []
                    start = time.perf_counter()
                    n = transport.fetch(server.address, keys, nbytes, 0,
                                        lambda i: dst[(i % 4) * nbytes:(i % 4 + 1) * nbytes],
                                        lambda i, ok: oks.append(ok), expected)
                    fetch_s = min(fetch_s, time.perf_counter() - start)
                    if n != count or not all(oks):
                        raise RuntimeError(f"fetched {n} of {count} objects of {nbytes} bytes")
                    raw_s = min(raw_s, _raw_stream(src, dst, nbytes, count))
                    bar.update(1)
                fetch_gbs, raw_gbs = count * nbytes / fetch_s / GB, count * nbytes / raw_s / GB
                results.append({"object_mib": nbytes // MiB, "objects": count, "fetch_gbs": fetch_gbs,
                                "raw_tcp_gbs": raw_gbs, "ratio": fetch_gbs / raw_gbs})
                rows.append([nbytes // MiB, count, fetch_gbs, raw_gbs, fetch_gbs / raw_gbs])
    finally:
        transport.close()
        server.stop()
    table = print_table(["object MiB", "objects", "fetch GB/s (verified)", "raw TCP GB/s (ceiling)", "ratio"], rows)
    out = Path(args.out)
    payload = {"machine": machine(), "args": vars(args), "results": results, "table": table,
               "transport": "tcp (ucxx not installed)", "goal": ">= 0.8x the raw transport for >= 1 MiB"}
    write_json(out, "remote", payload)
    plot_lines(out, "remote", "remote tier fetch vs raw TCP (loopback)", "object size (MiB)", "GB/s",
               [r["object_mib"] for r in results], {"fetch (checksum verified)": [r["fetch_gbs"] for r in results],
                                                    "raw TCP stream (ceiling)": [r["raw_tcp_gbs"] for r in results]})
    return payload
