import hashlib
import json

import numpy as np
import pytest

import kvstore
from kvstore import InvalidArgumentError, chunk_keys, namespace

LLAMA_FIELDS = dict(model="meta-llama/Llama-3.1-8B", revision="main", dtype="bfloat16", shard="heads0-8",
                    chunk_tokens=4, format=1, tenant="", lora="")

# Golden vectors: also in the README. Changing them is a format break.
GOLDEN_NAMESPACE = "32288988d5c75458749742f0fb9ffa9b"
GOLDEN_KEYS = ["83433636d6ffe7739a25e02922f29726", "76b782c1f7318fc6723e981c7a55c6d8"]
GOLDEN_SMALL_NS = "69288650df68c191616ce64139a3d4e9"  # namespace(model="m")
GOLDEN_SMALL_KEYS = ["5d43203f3787fd6a4134d2ac7405adbc", "65f82a7054a633cfc6c528618fb0f822",
                     "0929c3f3987fcd061ce20747c15a06ef", "bd8b36b58bf127fbb68fb3b26083ea26",
                     "7303912ba727f0a578acc0f54a5a0b93"]


def spec_keys(tokens, ns, chunk):
    """The key spec written out independently of kvstore.keys."""
    out, prev = [], ns
    for i in range(len(tokens) // chunk):
        data = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[i * chunk:(i + 1) * chunk])
        prev = hashlib.blake2b(prev + data, digest_size=16, key=ns).digest()
        out.append(prev)
    return out


def test_golden_namespace_and_keys():
    ns = namespace(**LLAMA_FIELDS)
    assert ns.hex() == GOLDEN_NAMESPACE
    assert [k.hex() for k in chunk_keys(list(range(10)), ns, 4)] == GOLDEN_KEYS
    small = namespace(model="m")
    assert small.hex() == GOLDEN_SMALL_NS
    assert [k.hex() for k in chunk_keys([1, 2, 3, -1, 2**40], small, 1)] == GOLDEN_SMALL_KEYS


def test_namespace_is_blake2b_of_canonical_json():
    canonical = json.dumps(LLAMA_FIELDS, sort_keys=True, separators=(",", ":")).encode()
    assert namespace(**LLAMA_FIELDS) == hashlib.blake2b(canonical, digest_size=16).digest()
    assert namespace(b=1, a=2) == namespace(a=2, b=1)
    assert namespace(model="m", lora="x") != namespace(model="m")


def test_keys_match_spec_for_random_tokens(rng):
    ns = namespace(model="x", tenant="t")
    tokens = rng.integers(-(2**40), 2**40, size=1000)
    for chunk in (1, 7, 16, 256):
        assert chunk_keys(tokens, ns, chunk) == spec_keys(tokens, ns, chunk)


def test_partial_chunk_has_no_key_and_keys_chain():
    ns = namespace(model="x")
    tokens = list(range(37))
    keys = chunk_keys(tokens, ns, 8)
    assert len(keys) == 4
    assert chunk_keys(tokens[:32], ns, 8) == keys
    changed = tokens.copy()
    changed[3] += 1  # a change in chunk 0 changes every later key (keys name their prefix)
    assert all(a != b for a, b in zip(chunk_keys(changed, ns, 8), keys))
    assert chunk_keys(tokens[:7], ns, 8) == []


def test_same_keys_for_list_numpy_and_dtypes():
    ns = namespace(model="x")
    tokens = [5, 9, 1, 300000, 7, 7]
    ref = chunk_keys(tokens, ns, 3)
    assert chunk_keys(np.array(tokens, dtype=np.int32), ns, 3) == ref
    assert chunk_keys(np.array(tokens, dtype=np.int64), ns, 3) == ref


@pytest.mark.parametrize("bad_ns", [b"short", "a" * 16, 12345])
def test_bad_namespace_rejected(bad_ns):
    with pytest.raises(InvalidArgumentError, match="namespace"):
        chunk_keys([1, 2], bad_ns, 1)


@pytest.mark.parametrize("chunk", [0, -4, 2.5])
def test_bad_chunk_tokens_rejected(chunk):
    with pytest.raises(InvalidArgumentError, match="chunk_tokens"):
        chunk_keys([1, 2], namespace(model="x"), chunk)


def test_bad_tokens_rejected():
    with pytest.raises(InvalidArgumentError, match="tokens"):
        chunk_keys([[1, 2]], namespace(model="x"), 1)
    with pytest.raises(InvalidArgumentError, match="tokens"):
        chunk_keys([1.5, 2.5], namespace(model="x"), 1)
    with pytest.raises(InvalidArgumentError):
        namespace(model=object())


def test_key_length_constant():
    assert kvstore.KEY_NBYTES == 16


GOLDEN_WRAPPED = "4b1684e7e3cab3e31e4c0751a988ec2d"  # wrap_key(namespace(model="m"), "abc")


def test_wrap_key_golden_and_spec():
    ns = namespace(model="m")
    assert kvstore.keys.wrap_key(ns, "abc").hex() == GOLDEN_WRAPPED
    spec = hashlib.blake2b(b"engine:abc", digest_size=16, key=ns).digest()
    assert kvstore.keys.wrap_key(ns, "abc") == spec == kvstore.keys.wrap_key(ns, b"abc")


def test_wrap_key_separates_namespaces_and_keys():
    a, b = namespace(model="a"), namespace(model="b")
    assert kvstore.keys.wrap_key(a, "k") != kvstore.keys.wrap_key(b, "k")
    assert kvstore.keys.wrap_key(a, "k1") != kvstore.keys.wrap_key(a, "k2")


@pytest.mark.parametrize("bad", ["", b"", 7, None])
def test_wrap_key_rejects_bad_engine_keys(bad):
    with pytest.raises(InvalidArgumentError):
        kvstore.keys.wrap_key(namespace(model="m"), bad)


def test_wrap_key_rejects_bad_namespace():
    with pytest.raises(InvalidArgumentError):
        kvstore.keys.wrap_key(b"short", "k")
