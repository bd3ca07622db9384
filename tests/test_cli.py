"""The kvstore command as a user runs it (subprocesses, real files)."""
import json
import os
import subprocess
import sys

import pytest


def kvstore_cmd(*args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_config_show():
    done = kvstore_cmd("config", "--show", env_extra={"KVSTORE_CHUNK_TOKENS": "512"})
    assert done.returncode == 0, done.stderr
    assert "chunk_tokens: 512" in done.stdout and "ssd_path:" in done.stdout


def test_config_error_is_reported_cleanly():
    done = kvstore_cmd("config", "--show", env_extra={"KVSTORE_BOGUS": "1"})
    assert done.returncode == 2
    assert "ConfigError" in done.stderr and "KVSTORE_BOGUS" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_demo_round_trip(tmp_path):
    done = kvstore_cmd("demo", "--tokens", "1024", "--cpu", env_extra={"XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    assert done.stdout.count("bytes verified") == 2
    assert "hits {'ssd': 4}" in done.stdout and "hits {'dram': 4}" in done.stdout


@pytest.mark.slow
def test_bench_tiers_writes_json_and_png(tmp_path):
    done = kvstore_cmd("bench", "tiers", "--sizes-mib", "1,4", "--total", "16MiB", "--repeats", "1",
                       "--dir", str(tmp_path / "ssd"), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "out" / "tiers.json").read_text())
    assert [r["size_mib"] for r in result["rows"]] == [1, 4]
    for r in result["rows"]:
        assert r["ssd"]["put_gbps"] > 0 and r["ssd"]["dd_read_gbps"] > 0 and r["dram"]["ceiling_gbps"] > 0
    assert (tmp_path / "out" / "tiers.png").stat().st_size > 1000
    assert "put/dd" in done.stdout
