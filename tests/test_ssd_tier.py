"""SSD tier: O_DIRECT slab files + LMDB index, persistence, corruption, crashes."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kvstore import InvalidArgumentError, TierIOError
from kvstore import _C_module as C
from kvstore.ssd_tier import SsdTier

MiB = 1 << 20


def obj(seed: int, nbytes: int) -> np.ndarray:
    """A 4 KiB-aligned buffer (slot-sized) whose payload is derived from seed."""
    buf, _ = C.host_alloc((nbytes + 4095) // 4096 * 4096, False)
    buf[:nbytes] = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    return buf


def key(i):
    return i.to_bytes(16, "little")


def open_tier(path, capacity=64 * MiB, slab=8 * MiB, events=None):
    return SsdTier(path, capacity, slab, on_event=(lambda n, c: events.append((n, c))) if events is not None else None)


def test_write_read_round_trip_odd_sizes(tmp_path):
    tier = open_tier(tmp_path)
    sizes = [1, 4095, 4097, MiB + 123, 3 * MiB]
    tier.write_many([(key(i), obj(i, n), n, 7) for i, n in enumerate(sizes)])
    for i, n in enumerate(sizes):
        out, _ = C.host_alloc((n + 4095) // 4096 * 4096, False)
        out[:] = 0xEE
        entry = tier.read(key(i), out, fingerprint=7)
        assert entry is not None and entry.nbytes == n
        assert np.array_equal(out[:n], obj(i, n)[:n])
    assert tier.read(key(0), obj(0, 4096), fingerprint=8) is None  # other layout: a miss
    assert tier.read(key(99), obj(0, 4096)) is None
    tier.close()


def test_files_are_opened_with_o_direct(tmp_path):
    tier = open_tier(tmp_path)
    tier.write_many([(key(1), obj(1, 8192), 8192, 0)])
    f = next(iter(tier._files.values())).file
    assert f.direct
    flags = int(open(f"/proc/self/fdinfo/{_fd_of(f'{tmp_path}/slab-8192.dat')}").read().split("flags:")[1].split()[0], 8)
    assert flags & os.O_DIRECT
    tier.close()


def _fd_of(path):
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                return fd
        except OSError:
            pass
    raise AssertionError(f"{path} is not open")


def test_persists_across_processes(tmp_path):
    tier = open_tier(tmp_path)
    tier.write_many([(key(i), obj(i, MiB + i), MiB + i, 0) for i in range(6)])
    tier.close()
    script = textwrap.dedent(f"""
        import numpy as np
        from kvstore import _C_module as C
        from kvstore.ssd_tier import SsdTier
        t = SsdTier({str(tmp_path)!r}, 64 << 20, 8 << 20)
        ok = 0
        for i in range(6):
            n = (1 << 20) + i
            out, _ = C.host_alloc(2 << 20, False)
            e = t.read(i.to_bytes(16, "little"), out)
            ref = np.random.default_rng(i).integers(0, 256, size=n, dtype=np.uint8)
            ok += e is not None and np.array_equal(out[:n], ref)
        print(ok)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "6"


def test_second_open_of_a_directory_is_refused(tmp_path):
    tier = open_tier(tmp_path)
    with pytest.raises(TierIOError, match="in use"):
        open_tier(tmp_path)
    tier.close()
    open_tier(tmp_path).close()


def test_corrupted_bytes_are_a_counted_miss_and_dropped(tmp_path):
    events = []
    tier = open_tier(tmp_path, events=events)
    tier.write_many([(key(1), obj(1, MiB), MiB, 0), (key(2), obj(2, MiB), MiB, 0)])
    entry = tier.entry(key(1))
    with open(tmp_path / f"slab-{MiB}.dat", "r+b") as f:
        f.seek(entry.slot * MiB + 1000)
        f.write(b"\x00\x01\x02")
        f.flush()
        os.fsync(f.fileno())
    out, _ = C.host_alloc(MiB, False)
    assert tier.read(key(1), out) is None
    assert ("corrupt", 1) in events and not tier.contains(key(1))
    assert tier.read(key(2), out) is not None  # the neighbour is fine
    tier.close()
    reopened = open_tier(tmp_path)  # the drop is persistent
    assert not reopened.contains(key(1)) and reopened.contains(key(2))
    reopened.close()


def test_truncated_slab_file_drops_lost_objects(tmp_path):
    tier = open_tier(tmp_path, slab=4 * MiB)
    tier.write_many([(key(i), obj(i, MiB), MiB, 0) for i in range(4)])
    slots = {i: tier.entry(key(i)).slot for i in range(4)}
    tier.close()
    os.truncate(tmp_path / f"slab-{MiB}.dat", 2 * MiB)
    events = []
    tier = open_tier(tmp_path, slab=4 * MiB, events=events)
    survivors = {i for i in range(4) if tier.contains(key(i))}
    assert survivors == {i for i, s in slots.items() if s < 2}
    assert ("corrupt", 2) in events
    out, _ = C.host_alloc(MiB, False)
    for i in survivors:
        assert tier.read(key(i), out) is not None and np.array_equal(out, obj(i, MiB))
    tier.close()


def test_lru_eviction_under_the_byte_cap(tmp_path):
    events = []
    tier = open_tier(tmp_path, capacity=4 * MiB, slab=2 * MiB, events=events)
    tier.write_many([(key(i), obj(i, MiB), MiB, 0) for i in range(4)])
    out, _ = C.host_alloc(MiB, False)
    tier.read(key(0), out)  # refresh key 0
    tier.write_many([(key(4), obj(4, MiB), MiB, 0)])
    assert tier.contains(key(0)) and not tier.contains(key(1)) and tier.contains(key(4))
    assert ("evictions", 1) in events
    assert tier.file_bytes() <= 4 * MiB
    tier.close()


def test_bad_input_changes_nothing(tmp_path):
    tier = open_tier(tmp_path)
    with pytest.raises(InvalidArgumentError, match="smaller than the slot"):
        tier.write_many([(key(1), np.zeros(100, dtype=np.uint8), 8192, 0)])
    assert len(tier) == 0
    tier.write_many([(key(1), obj(1, 8192), 8192, 0)])
    with pytest.raises(InvalidArgumentError, match="smaller than the object slot"):
        tier.read(key(1), np.zeros(100, dtype=np.uint8))
    assert tier.contains(key(1))
    tier.close()
    with pytest.raises(TierIOError, match="closed"):
        tier.read(key(1), obj(1, 8192))


def test_unwritable_path_is_a_typed_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TierIOError, match="not usable"):
        open_tier(blocker / "ssd")


CRASH_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from kvstore import _C_module as C
    from kvstore.ssd_tier import SsdTier
    t = SsdTier(sys.argv[1], 24 << 20, 4 << 20)  # small cap: slots get evicted and reused
    buf, _ = C.host_alloc(1 << 20, False)
    i = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        n = (1 << 20) - (i % 7) * 4096
        buf[:n] = np.random.default_rng(i).integers(0, 256, size=n, dtype=np.uint8)
        t.write_many([(i.to_bytes(16, "little"), buf, n, i)])
        i += 1
""")


@pytest.mark.slow
def test_kill_9_during_writes_never_indexes_wrong_bytes(tmp_path):
    start = 0
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(tmp_path), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(0.3 + 0.2 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        tier = open_tier(tmp_path, capacity=24 * MiB, slab=4 * MiB)
        assert len(tier) > 0
        out, _ = C.host_alloc(MiB, False)
        keys = list(tier._where)
        for k in keys:
            i = int.from_bytes(k, "little")
            entry = tier.read(k, out, fingerprint=i)
            assert entry is not None, f"indexed object {i} failed its checksum after kill -9"
            n = (1 << 20) - (i % 7) * 4096
            assert entry.nbytes == n
            assert np.array_equal(out[:n], np.random.default_rng(i).integers(0, 256, size=n, dtype=np.uint8))
        start = max(int.from_bytes(k, "little") for k in keys) + 1000
        tier.close()
