"""Dense last rows on the input-dependent patterns: ``vertical_slash(V, S, last=T)``,
``vertical_slash_tiled(V, S, last=T)`` and ``block_sparse(k, last=T)``.

The query blocks holding a prompt's last ``T`` queries (where a question sits) see every causal
key; the other blocks keep the pattern's selection. Kernels run under TRITON_INTERPRET=1
(conftest), fp32 / fp16, padded batches and GQA, with the visited pairs counted (no pair twice,
none missing) and the cost model checked against the kernel's walk.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.config import ConfigError, load_config  # noqa: E402
from mi_compile.eval.harness import parse_config_spec  # noqa: E402
from mi_compile.patterns.cost import computed_density  # noqa: E402
from mi_compile.patterns.index import head_selection_mask  # noqa: E402
from mi_compile.patterns.spec import PATTERN_IDS, HeadPattern as HP, PatternError  # noqa: E402
from mi_compile.sparse import build_sparse_index, sparse_attention  # noqa: E402

from kernel_checks import check_case, make_inputs, rel_err  # noqa: E402


def vs(v, s, last=0):
    return HP("vertical_slash", vertical=v, slash=s, last=last)


def bs(topk, last=0):
    return HP("block_sparse", topk=topk, last=last)


def tiled(v, s, last=0):
    return HP("vertical_slash_tiled", vertical=v, slash=s, last=last)


def test_parameter_is_optional_everywhere():
    # written and shown only when set; the encoding keeps its place (third int)
    assert vs(100, 200).describe() == "vertical_slash(100,200)"
    assert vs(100, 200, 64).describe() == "vertical_slash(100,200,last=64)"
    assert bs(4, 128).encode() == [PATTERN_IDS["block_sparse"], 4, 128, 0]
    assert vs(100, 200).encode() == [PATTERN_IDS["vertical_slash"], 100, 200, 0]
    assert HP.decode(vs(100, 200, 64).encode()) == vs(100, 200, 64)
    # configs written before the parameter existed load unchanged, and round-trip
    old = load_config({"default": {"pattern": "vertical_slash", "vertical": 100, "slash": 200}})
    assert old.default == vs(100, 200) and old.to_json()["default"] == {
        "pattern": "vertical_slash", "vertical": 100, "slash": 200}
    new = load_config({"default": {"pattern": "block_sparse", "topk": 4, "last": 64}})
    assert new.default == bs(4, 64) and load_config(new.to_json()).default == bs(4, 64)
    # required parameters are still required; bad values are named
    with pytest.raises(ConfigError, match="missing parameter 'slash'"):
        load_config({"default": {"pattern": "vertical_slash", "vertical": 100, "last": 64}})
    with pytest.raises(PatternError, match="last must be an int"):
        vs(100, 200, -1)
    with pytest.raises(PatternError, match="a_shape takes no parameter 'last'"):
        HP("a_shape", sink=4, local=64, last=64)
    # inline specs take it as an optional trailing number
    assert parse_config_spec("vertical_slash:100:200")[0]["default"] == {
        "pattern": "vertical_slash", "vertical": 100, "slash": 200}
    assert parse_config_spec("block_sparse:8:64")[0]["default"]["last"] == 64
    with pytest.raises(ValueError, match="vertical_slash takes 2-3 parameter"):
        parse_config_spec("vertical_slash:100")


def test_with_dense_last_touches_only_patterns_that_take_it():
    cfg = load_config({"num_layers": 2, "num_heads": 3, "default": {"pattern": "dense"},
                       "layers": {"0": {"0": {"pattern": "vertical_slash", "vertical": 100, "slash": 200},
                                        "1": {"pattern": "a_shape", "sink": 4, "local": 64},
                                        "*": {"pattern": "block_sparse", "topk": 3}},
                                  "1": {"0": {"pattern": "tri_shape", "sink": 4, "local": 64, "last": 512}}}})
    out = cfg.with_dense_last(64)
    assert out.heads_for(0, 3) == [vs(100, 200, 64), HP("a_shape", sink=4, local=64), bs(3, 64)]
    assert out.heads_for(1, 3)[0] == HP("tri_shape", sink=4, local=64, last=64)
    assert out.heads_for(1, 3)[1:] == [HP("dense")] * 2
    assert cfg.heads_for(0, 3)[0] == vs(100, 200)                        # the original is unchanged
    assert load_config(out.to_json()).heads_for(0, 3) == out.heads_for(0, 3)
    assert out.with_dense_last(0).heads_for(0, 3) == cfg.heads_for(0, 3)
    with pytest.raises(ConfigError, match="dense last rows must be an int"):
        cfg.with_dense_last(-5)


def brute_force_rows(mask_plain, start, length, last):
    """The plain pattern's mask with the dense query blocks of one sequence filled in causally."""
    n = mask_plain.shape[-1]
    i = torch.arange(n)[:, None] - start
    j = torch.arange(n)[None, :] - start
    causal = (j >= 0) & (j <= i) & (i < length)
    dense_row = (i // 64) * 64 + 64 > length - last
    return mask_plain | (causal & dense_row)


@pytest.mark.parametrize("make", [vs, bs, tiled], ids=["vertical_slash", "block_sparse", "tiled"])
def test_reference_mask_is_the_plain_selection_plus_dense_blocks(make):
    n, B = 261, 2
    plain_head = make(70, 130) if make is not bs else make(2)
    q, k, _ = make_inputs(4, B, 4, 2, n, 16)
    start = torch.tensor([0, 40], dtype=torch.int32)
    length = torch.tensor([261, 190], dtype=torch.int32)
    plain = build_sparse_index(q, k, [plain_head] * 4, seq_start=start, seq_len=length)
    for last in (1, 64, 70, 500):
        head = HP(**{**vars(plain_head), "last": last})
        index = build_sparse_index(q, k, [head] * 4, seq_start=start, seq_len=length)
        assert index.last.tolist() == [last] * 4
        for h in range(4):
            got = head_selection_mask(index, h)
            want = head_selection_mask(plain, h)
            for b in range(B):
                assert torch.equal(got[b], brute_force_rows(want[b], int(start[b]), int(length[b]), last)), (last, h, b)


MIXED = [vs(70, 130, 64), bs(2, 100), tiled(66, 200, 1), vs(66, 70), HP("dense"), bs(1, 2**31 - 1)]
CASES = [
    # name, heads (cycled), B, Hq, Hkv, n, starts, lengths
    ("odd", MIXED, 1, 6, 2, 231, None, None),
    ("gqa4", [vs(80, 100, 130), bs(2, 64)], 1, 8, 2, 257, None, None),
    ("padded", MIXED[:4], 2, 4, 2, 263, [0, 70], [263, 131]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,heads,B,Hq,Hkv,n,starts,lengths", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, heads, B, Hq, Hkv, n, starts, lengths, dtype):
    check_case(name, heads, B, Hq, Hkv, n, starts, lengths, dtype)


def test_dense_rows_equal_dense_attention_there_and_cost_what_they_compute():
    n = 320                                   # last = 64: only the last query block is dense
    q, k, v = make_inputs(9, 1, 4, 2, n, 32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    heads = [vs(64, 64, 64), bs(1, 64)] * 2
    out = sparse_attention(q, k, v, heads, impl="triton")
    plain = sparse_attention(q, k, v, [vs(64, 64), bs(1)] * 2, impl="triton")
    assert rel_err(out[:, :, 256:], dense[:, :, 256:]) < 1e-4
    assert rel_err(out[:, :, :256], plain[:, :, :256]) < 1e-6
    assert rel_err(plain[:, :, 256:], dense[:, :, 256:]) > 1e-2          # the selection alone is sparse there
    with_rows = computed_density(build_sparse_index(q, k, heads))[0]
    without = computed_density(build_sparse_index(q, k, [vs(64, 64), bs(1)] * 2))[0]
    assert (with_rows > without).all() and (with_rows < 1).all()
