"""One typed config (DESIGN.md §6). Precedence, lowest first: defaults, a YAML file
(`config_file=` or KVSTORE_CONFIG), KVSTORE_<NAME> environment variables, keyword arguments.
Unknown keys, malformed values and impossible combinations raise ConfigError naming the key.
Sizes accept ints or strings with a unit ("512MiB", "4GiB", "1.5GB").
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

ENV_PREFIX = "KVSTORE_"
# KVSTORE_* variables that are not config keys: the config file, build switches (setup.py) and
# test switches (tests/). Every other KVSTORE_* variable must name a config key.
NOT_CONFIG_ENV = {"KVSTORE_CONFIG", "KVSTORE_BUILD_JOBS", "KVSTORE_BUILD_TYPE", "KVSTORE_CUDA",
                  "KVSTORE_REQUIRE_VLLM", "KVSTORE_VLLM_TEST_UTILS", "KVSTORE_REQUIRE_SGLANG"}
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def default_ssd_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvstore", "ssd")


def parse_size(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{key}: cannot parse size {value!r} (use e.g. 4096, '512MiB', '4GiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected a boolean, got {value!r}")


def _parse_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an int, got {value!r}") from None


def _parse_optional_str(value: Any, key: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return os.fspath(value)


_SIZE, _INT, _BOOL, _OPT_STR = "size", "int", "bool", "optional path"
_PARSERS = {_SIZE: parse_size, _INT: _parse_int, _BOOL: _parse_bool, _OPT_STR: _parse_optional_str}


def _opt(default, kind: str, doc: str):
    return field(default=default, metadata={"kind": kind, "doc": doc})


@dataclass(frozen=True)
class Config:
    chunk_tokens: int = _opt(256, _INT, "tokens per stored chunk (a multiple of the engine block size)")
    dram_capacity_bytes: int = _opt(4 << 30, _SIZE, "cap of the pinned DRAM tier; memory is allocated lazily")
    dram_slab_bytes: int = _opt(256 << 20, _SIZE, "DRAM grows by slabs of about this size (at least one slot)")
    pin_memory: bool = _opt(True, _BOOL, "page-lock DRAM slabs with CUDA when a device is present")
    ssd_path: str | None = _opt(default_ssd_path(), _OPT_STR, "directory of the SSD tier; none disables it")
    ssd_capacity_bytes: int = _opt(16 << 30, _SIZE, "cap of the SSD tier's slab files")
    ssd_slab_bytes: int = _opt(1 << 30, _SIZE, "SSD files grow (preallocated) by about this much")
    ssd_direct_io: bool = _opt(True, _BOOL, "O_DIRECT for SSD files (off only for filesystems that refuse it)")
    write_back: bool = _opt(True, _BOOL, "copy every DRAM object to the SSD tier in the background (needs ssd_path)")
    cpu_threads: int = _opt(max(1, min(8, os.cpu_count() or 1)), _INT, "threads for CPU copies and checksums")
    io_threads: int = _opt(8, _INT, "threads issuing O_DIRECT requests (queue depth)")
    metrics_port: int = _opt(0, _INT, "serve Prometheus metrics on this port (0: off)")
    agent: str | None = _opt(None, _OPT_STR, "none: embedded store; 'unix:///path': use the node agent on that "
                             "socket; 'auto' or 'auto:///path': join the local agent, starting one if none runs")
    agent_timeout_ms: int = _opt(5000, _INT, "bound on every agent request (then a typed error or a miss)")
    master: str | None = _opt(None, _OPT_STR, "none, or the cluster master's 'host:port': the agent registers, "
                              "reports its objects and fetches local misses from other nodes")
    master_token: str | None = _opt(None, _OPT_STR, "shared token for the master and the remote tier (required "
                                    "off loopback); prefer KVSTORE_MASTER_TOKEN over a file")
    node_id: str | None = _opt(None, _OPT_STR, "this agent's node id in the cluster (default: hostname-pid)")
    remote_listen: str = _opt("127.0.0.1:0", _OPT_STR, "host:port the agent serves peers' fetches on (remote "
                              "tier; port 0: any free port); non-loopback requires master_token")
    master_timeout_ms: int = _opt(5000, _INT, "bound on every master RPC (then a miss or a resync)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _PARSERS[f.metadata["kind"]](getattr(self, f.name), f.name))
        checks = [
            (self.chunk_tokens > 0, "chunk_tokens must be > 0"),
            (self.dram_capacity_bytes > 0, "dram_capacity_bytes must be > 0"),
            (0 < self.dram_slab_bytes <= self.dram_capacity_bytes, "dram_slab_bytes must be in (0, dram_capacity_bytes]"),
            (self.ssd_capacity_bytes > 0, "ssd_capacity_bytes must be > 0"),
            (0 < self.ssd_slab_bytes <= self.ssd_capacity_bytes, "ssd_slab_bytes must be in (0, ssd_capacity_bytes]"),
            (self.cpu_threads >= 1 and self.io_threads >= 1, "cpu_threads and io_threads must be >= 1"),
            (0 <= self.metrics_port < 65536, "metrics_port must be in [0, 65535]"),
            (self.agent is None or self.agent == "auto" or self.agent.startswith(("unix:///", "auto:///")),
             "agent must be none, 'auto', 'auto:///path' or 'unix:///path'"),
            (self.agent_timeout_ms > 0, "agent_timeout_ms must be > 0"),
            (self.master is None or _host_port(self.master), "master must be 'host:port'"),
            (self.remote_listen is not None and _host_port(self.remote_listen), "remote_listen must be 'host:port'"),
            (self.node_id is None or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.node_id) is not None,
             "node_id must match [A-Za-z0-9._-]{1,64}"),
            (self.master_timeout_ms > 0, "master_timeout_ms must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
             **overrides: Any) -> "Config":
        """Builds the effective config from every source; see the module docstring."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file if config_file is not None else env.get(ENV_PREFIX + "CONFIG")
        if path:
            values.update(_read_yaml(Path(path)))
        known = set(cls.keys())
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or name in NOT_CONFIG_ENV:
                continue
            key = name[len(ENV_PREFIX):].lower()
            if key not in known:
                raise ConfigError(f"unknown environment variable {name} (known: {_env_names()})")
            values[key] = raw
        values.update(overrides)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def describe(self) -> str:
        """The effective config, one `key: value  # doc` line each (YAML-readable)."""
        lines = []
        for f in dataclasses.fields(self):
            lines.append(f"{f.name}: {yaml.safe_dump(getattr(self, f.name)).splitlines()[0]}  # {f.metadata['doc']}")
        return "\n".join(lines)


def _host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) < 65536)


def _env_names() -> str:
    return ", ".join(ENV_PREFIX + k.upper() for k in Config.keys())


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data
