import pytest

from kvstore import Config, ConfigError, Store
from kvstore.config import parse_size


def test_defaults_and_precedence(tmp_path):
    cfg_file = tmp_path / "kv.yaml"
    cfg_file.write_text("chunk_tokens: 128\ndram_capacity_bytes: 2GiB\nio_threads: 4\n")
    env = {"KVSTORE_CHUNK_TOKENS": "512", "KVSTORE_WRITE_BACK": "off"}
    cfg = Config.load(cfg_file, env=env, io_threads=6)
    assert cfg.chunk_tokens == 512            # env beats file
    assert cfg.dram_capacity_bytes == 2 << 30  # file beats default
    assert cfg.io_threads == 6                # kwargs beat everything
    assert cfg.write_back is False
    assert Config.load(env={}).chunk_tokens == 256


def test_config_file_from_env(tmp_path):
    cfg_file = tmp_path / "kv.yaml"
    cfg_file.write_text("ssd_path: none\n")
    assert Config.load(env={"KVSTORE_CONFIG": str(cfg_file)}).ssd_path is None


@pytest.mark.parametrize("value,expected", [(4096, 4096), ("4KiB", 4096), ("1.5GB", 1_500_000_000),
                                            ("2 MiB", 2 << 20), ("7", 7)])
def test_sizes(value, expected):
    assert parse_size(value, "k") == expected


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key.*chunk_tokenz"):
        Config.load(env={}, chunk_tokenz=3)
    with pytest.raises(ConfigError, match="KVSTORE_NOPE"):
        Config.load(env={"KVSTORE_NOPE": "1"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("dram_capacity: 1GiB\n")
    with pytest.raises(ConfigError, match="dram_capacity"):
        Config.load(bad, env={})
    with pytest.raises(ConfigError, match="unknown config key"):
        Store(ssd_path=None, not_a_key=1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(chunk_tokens="many"), "expected an int"),
    (dict(dram_capacity_bytes="lots"), "cannot parse size"),
    (dict(dram_capacity_bytes="1MiB", dram_slab_bytes="2MiB"), "dram_slab_bytes"),
    (dict(ssd_capacity_bytes="1GiB", ssd_slab_bytes="2GiB"), "ssd_slab_bytes"),
    (dict(pin_memory="maybe"), "boolean"),
    (dict(cpu_threads=0), "threads"),
    (dict(metrics_port=70000), "metrics_port"),
])
def test_impossible_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(env={}, **kwargs)


def test_bad_yaml(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        Config.load(f, env={})
    f.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(f, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        Config.load(tmp_path / "missing.yaml", env={})


def test_describe_lists_every_key():
    text = Config.load(env={}).describe()
    for key in Config.keys():
        assert f"\n{key}: " in "\n" + text


def test_build_and_test_switches_are_not_config_keys():
    cfg = Config.load(env={"KVSTORE_BUILD_JOBS": "2", "KVSTORE_REQUIRE_VLLM": "1", "KVSTORE_CUDA": "0"})
    assert cfg == Config.load(env={})
