"""KVLayout constructors: descriptor values, validation errors, torch tensors."""
import numpy as np
import pytest

from kvstore import KVLayout, LayoutError

from kv_caches import VLLM_PERMUTATIONS, expected_object, vllm


def test_llama8b_chunk_is_32_mib():
    # vLLM LBNHC, 32 layers, 8 KV heads x 128, bf16, 16-token blocks: 256-token chunk = 32 MiB, 1 MiB/layer.
    flat = np.zeros((32, 4, 16, 8, 256), dtype=np.uint16)
    layout = KVLayout.from_vllm([flat[l].transpose(0, 2, 1, 3) for l in range(32)])
    assert layout.chunk_nbytes(256) == 32 << 20
    assert layout.layer_nbytes(256) == 1 << 20
    assert (layout.num_layers, layout.num_planes, layout.num_heads, layout.head_nbytes) == (32, 2, 8, 256)
    assert (layout.block_stride, layout.token_stride, layout.head_stride) == (16 * 8 * 512, 8 * 512, 512)
    k, v = layout.plane_ptrs[1]
    assert v - k == 256 and k == flat[1].ctypes.data


@pytest.mark.parametrize("order", VLLM_PERMUTATIONS)
def test_vllm_permutations_give_distinct_strides_same_geometry(rng, order):
    cache = vllm(rng, order)
    lay = cache.layout
    assert (lay.num_layers, lay.num_planes, lay.num_heads, lay.block_size, lay.num_blocks) == (3, 2, 2, 4, 11)
    assert lay.fingerprint == vllm(rng, "LBHNC").layout.fingerprint  # object format independent of strides


def test_fingerprint_changes_with_geometry(rng):
    assert vllm(rng, "LBNHC").layout.fingerprint != vllm(rng, "LBNHC", D=16).layout.fingerprint
    assert vllm(rng, "LBNHC").layout.fingerprint != vllm(rng, "LBNHC", dtype=np.uint8).layout.fingerprint


def test_validation_errors_name_the_problem():
    good = np.zeros((4, 2, 16, 16), dtype=np.uint16)
    with pytest.raises(LayoutError, match="4-D"):
        KVLayout.from_vllm([np.zeros((4, 2, 16), dtype=np.uint16)])
    with pytest.raises(LayoutError, match="no layer"):
        KVLayout.from_vllm([])
    with pytest.raises(LayoutError, match="layer 1 differs"):
        KVLayout.from_vllm([good, np.zeros((5, 2, 16, 16), dtype=np.uint16)])
    with pytest.raises(LayoutError, match="layer 1 differs"):
        KVLayout.from_vllm([good, good.astype(np.uint8)])
    with pytest.raises(LayoutError, match="last dim must be contiguous"):
        KVLayout.from_vllm([np.zeros((4, 2, 16, 32), dtype=np.uint16)[..., ::2]])
    with pytest.raises(LayoutError, match="2\\*head_size"):
        KVLayout.from_vllm([good], head_size=5)
    with pytest.raises(LayoutError, match="H=1"):
        KVLayout.from_vllm([good], mla=True)
    with pytest.raises(LayoutError, match="K/V dim 2 first"):
        KVLayout.from_flash_attn([np.zeros((3, 4, 16, 2, 8), dtype=np.uint16)])
    with pytest.raises(LayoutError, match="K/V dim 2 second"):
        KVLayout.from_flashinfer([np.zeros((4, 3, 16, 2, 8), dtype=np.uint16)])
    with pytest.raises(LayoutError, match="torch.Tensor or numpy"):
        KVLayout.from_mla([[1, 2, 3]])
    with pytest.raises(LayoutError, match="empty dimension"):
        KVLayout.from_mla([np.zeros((0, 16, 8), dtype=np.uint16)])
    with pytest.raises(LayoutError, match="full page"):
        KVLayout.from_sglang([np.zeros((3, 2, 8), dtype=np.uint16)], None, page_size=4)
    with pytest.raises(LayoutError, match="same layer count"):
        KVLayout.from_sglang([np.zeros((8, 2, 8), dtype=np.uint16)], [np.zeros((8, 2, 4), dtype=np.uint16)],
                             page_size=4)
    with pytest.raises(LayoutError, match="page_size"):
        KVLayout.from_sglang([np.zeros((8, 2, 8), dtype=np.uint16)], None, page_size=0)


def test_chunk_tokens_must_be_a_block_multiple(rng):
    lay = vllm(rng, "LBNHC").layout  # block_size 4
    assert lay.blocks_per_chunk(8) == 2
    for bad in (0, 6, -4):
        with pytest.raises(LayoutError, match="multiple of block_size"):
            lay.chunk_nbytes(bad)


def test_with_layers_restricts_planes(rng):
    lay = vllm(rng, "LBNHC").layout
    stage = lay.with_layers(1, 3)
    assert stage.num_layers == 2 and stage.plane_ptrs == lay.plane_ptrs[1:3]
    with pytest.raises(LayoutError):
        lay.with_layers(2, 5)


def test_sglang_mla_single_plane(rng):
    ks = [rng.integers(0, 2**16, size=(33, 1, 576), dtype=np.uint16) for _ in range(2)]
    lay = KVLayout.from_sglang(ks, None, page_size=8)
    assert (lay.num_planes, lay.num_blocks, lay.num_heads, lay.head_nbytes) == (1, 4, 1, 1152)


def test_torch_tensors_cpu(rng):
    torch = pytest.importorskip("torch")
    from kvstore import _C_module as C
    L, B, H, N, D = 2, 5, 2, 16, 64
    flat = torch.randn(L, B, N, H, 2 * D, dtype=torch.bfloat16)  # LBNHC
    views = [flat[l].permute(0, 2, 1, 3) for l in range(L)]
    lay = KVLayout.from_vllm(views)
    assert lay.dtype == "bfloat16" and lay.device == "cpu" and lay.elem_size == 2
    ids = np.array([4, 1], dtype=np.int64)
    obj = np.full(lay.chunk_nbytes(2 * N), 0x5A, dtype=np.uint8)
    C.gather(lay.native, ids, np.array([obj.ctypes.data], dtype=np.uint64), 2, 0, L)
    ref = torch.cat([flat[l][ids][..., p * D:(p + 1) * D].reshape(-1) for l in range(L) for p in range(2)])
    assert np.array_equal(obj, ref.view(torch.int16).numpy().view(np.uint8))
    # the layout keeps its tensors alive
    assert any(o is views for o in lay.owners)


def test_expected_object_helper_matches_layout_size(rng):
    cache = vllm(rng, "BHLNC")
    ids = np.array([0, 3])
    assert expected_object(cache, ids).nbytes == cache.layout.chunk_nbytes(2 * cache.layout.block_size)
