"""The ``tri_shape`` pattern (A-shape + dense last query blocks) and the TriangleMix layer rule.

Kernels run under TRITON_INTERPRET=1 (conftest); fp32 / fp16 on small odd lengths, padded
batches and GQA. Every kernel check also counts the visited pairs (no pair twice, none
missing) and compares the cost model with the kernel's tile walk.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.config import ConfigError, TriangleMix, load_config, triangle_mix_config  # noqa: E402
from mi_compile.patterns import registry  # noqa: E402
from mi_compile.patterns.cost import tile_pairs_per_block  # noqa: E402
from mi_compile.patterns.index import build_index, head_selection_mask  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, PatternError, decode_heads, encode_heads  # noqa: E402
from mi_compile.sparse import build_sparse_index, sparse_attention  # noqa: E402

from kernel_checks import check_case, check_kernel, make_inputs, rel_err  # noqa: E402


def tri(sink, local, last):
    return HP("tri_shape", sink=sink, local=local, last=last)


# ---------------------------------------------------------------------- parameters, encoding

def test_parameters_are_validated():
    p = tri(64, 256, 64)
    assert p.params == {"sink": 64, "local": 256, "last": 64} and p.describe() == "tri_shape(64,256,64)"
    assert tri(0, 1, 0).params == {"sink": 0, "local": 1, "last": 0}     # last = 0: plain A-shape
    for kwargs in ({"sink": 4, "last": 64}, {}, {"sink": 5}):
        with pytest.raises(PatternError, match=r"tri_shape needs local >= 1 \(a query must see itself\)"):
            HP("tri_shape", **kwargs)
    for name in ("sink", "local", "last"):
        for bad in (-1, 2**31, 1.5, True, None):
            with pytest.raises(PatternError, match=f"tri_shape: {name} must be an int in 0..2\\*\\*31 - 1"):
                HP("tri_shape", **{"sink": 1, "local": 2, "last": 3, name: bad})
    for other in ("vertical", "slash", "topk"):
        with pytest.raises(PatternError, match=f"tri_shape takes no parameter '{other}'"):
            HP("tri_shape", sink=1, local=2, last=3, **{other: 1})
    with pytest.raises(PatternError, match="a_shape takes no parameter 'last'"):
        HP("a_shape", sink=1, local=2, last=3)


def test_encoding_round_trip():
    spec = registry.get("tri_shape")
    p = tri(7, 300, 65)
    assert p.encode() == [spec.code, 7, 300, 65] and spec.code == 4
    heads = [p, HP("dense"), tri(0, 1, 0), HP("vertical_slash", vertical=3, slash=4), tri(2**31 - 1, 1, 2**31 - 1)]
    flat = encode_heads(heads)
    assert len(flat) == 4 * len(heads) and decode_heads(flat) == heads
    assert HP.decode(p.encode()) == p


def test_spec_tables_candidates_and_label():
    spec = registry.get("tri_shape")
    assert spec.head_tables(tri(5, 40, 70)) == {"prefix": 5, "sink": 5, "band": 40, "group": (0, 39), "last": 70}
    cands = spec.candidates(4096)
    assert [c[1] for c in cands] == [tri(64, 256, 64), tri(64, 512, 64), tri(64, 1024, 64), tri(64, 1024, 64)]
    assert len(spec.candidates(2048)) == 4 and all(c[1].last == 64 for c in spec.candidates(2048))
    assert spec.label(tri(64, 512, 64)) == "64+512+64" and spec.color.startswith("#")
    from mi_compile.search.candidates import candidate_patterns
    from mi_compile.search.plot import colors
    found = [c for c in candidate_patterns(4096) if c.kind == "tri_shape"]
    assert found == [tri(64, 256, 64), tri(64, 512, 64), tri(64, 1024, 64)]      # duplicates dropped
    assert candidate_patterns(4096)[-1] == HP("dense") and colors()["tri_shape"] == spec.color


# ---------------------------------------------------------------------- reference mask

def brute_force(n, head, start, length):
    """Selection in tensor coordinates straight from the definition: a_shape per element, and
    rows whose 64-row block (within the sequence) holds one of its last ``last`` queries."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for r in range(start, start + length):
        i = r - start
        block = range(i // 64 * 64, min(i // 64 * 64 + 64, length))
        dense = any(q >= length - head.last for q in block) if head.last > 0 else False
        for c in range(start, r + 1):
            j = c - start
            out[r, c] = dense or j < head.sink or i - j < head.local
    return out


HEADS = [tri(5, 17, 70), tri(0, 1, 1), tri(3, 40, 0), tri(64, 1, 64), tri(1, 2, 500), tri(10, 300, 65)]


def test_reference_mask_follows_the_definition_with_padding():
    n, B = 201, 2
    q, k, _ = make_inputs(1, B, len(HEADS), 1, n, 16)
    start = torch.tensor([0, 37], dtype=torch.int32)
    length = torch.tensor([201, 129], dtype=torch.int32)
    index = build_index(q, k, HEADS, 0.25, start, length)
    assert index.last.tolist() == [70, 1, 0, 64, 500, 65]
    for h, head in enumerate(HEADS):
        mask = head_selection_mask(index, h)
        for b in range(B):
            want = brute_force(n, head, int(start[b]), int(length[b]))
            assert torch.equal(mask[b], want), (head, b)
    # last = 0 is exactly a_shape; last past the length is dense
    a_index = build_index(q[:, :1], k, [HP("a_shape", sink=3, local=40)], 0.25, start, length)
    assert torch.equal(head_selection_mask(index, 2), head_selection_mask(a_index, 0))
    d_index = build_index(q[:, :1], k, [HP("dense")], 0.25, start, length)
    assert torch.equal(head_selection_mask(index, 4), head_selection_mask(d_index, 0))


def test_both_table_builders_agree():
    """The fused builder (Triton, under the interpreter) writes the same tables as PyTorch."""
    n = 230
    q, k, _ = make_inputs(2, 2, 4, 2, n, 16)
    heads = [tri(5, 40, 70), HP("vertical_slash", vertical=70, slash=80), HP("block_sparse", topk=2), tri(0, 3, 0)]
    start = torch.tensor([0, 50], dtype=torch.int32)
    length = torch.tensor([230, 150], dtype=torch.int32)
    got = build_index(q, k, heads, 0.25, start, length, tables="triton")
    want = build_index(q, k, heads, 0.25, start, length, tables="torch")
    for name, t in vars(want).items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(getattr(got, name), t), name


# ---------------------------------------------------------------------- kernel

CASES = [
    # name, heads (cycled), B, Hq, Hkv, n, starts, lengths
    ("odd", HEADS, 1, 6, 2, 231, None, None),
    ("gqa4", [tri(3, 50, 64), tri(0, 64, 130)], 1, 8, 2, 257, None, None),
    ("padded", HEADS[:4], 2, 4, 2, 263, [0, 70], [263, 131]),
    ("short", [tri(2, 9, 3), tri(0, 1, 63)], 2, 2, 1, 67, [0, 20], [67, 41]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,heads,B,Hq,Hkv,n,starts,lengths", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, heads, B, Hq, Hkv, n, starts, lengths, dtype):
    check_case(name, heads, B, Hq, Hkv, n, starts, lengths, dtype)


def test_mixed_layer_through_the_public_op(monkeypatch):
    """tri_shape + vertical_slash + dense (+ A-shape, block-sparse) heads in one launch, through
    ``torch.ops.mi_compile.sparse_attention`` with a padding mask, Triton vs reference."""
    n, D = 211, 32
    q, k, v = make_inputs(5, 2, 8, 2, n, D)
    heads = [tri(4, 40, 70), HP("vertical_slash", vertical=66, slash=70), HP("dense"), tri(0, 1, 64),
             HP("a_shape", sink=4, local=40), HP("block_sparse", topk=2), tri(64, 64, 0), HP("dense")]
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, :60] = False                              # left padding
    start = torch.tensor([0, 60], dtype=torch.int32)
    length = torch.tensor([n, n - 60], dtype=torch.int32)
    check_kernel(q, k, v, heads, start, length)
    op = torch.ops.mi_compile.sparse_attention
    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "triton")
    got = op(q, k, v, encode_heads(heads), None, mask, 0, 0, -1)
    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "reference")
    want = op(q, k, v, encode_heads(heads), None, mask, 0, 0, -1)
    assert rel_err(got, want) < 1e-4
    assert rel_err(sparse_attention(q, k, v, heads, seq_start=start, seq_len=length, impl="triton"), got) < 1e-6


def test_dense_rows_and_full_cover_equal_dense_attention():
    n = 199
    q, k, v = make_inputs(9, 1, 4, 2, n, 32)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for heads in ([tri(0, n, 0)], [tri(n, 1, 0)], [tri(0, 1, n)], [tri(3, 5, 2**31 - 1)]):
        assert rel_err(sparse_attention(q, k, v, heads * 4, impl="triton"), dense) < 1e-4, heads
    # last = 70 of 199 (rows 129..198): block 2 (rows 128..198, row 128 included) is dense,
    # blocks 0 and 1 are A-shape
    out = sparse_attention(q, k, v, [tri(2, 8, 70)] * 4, impl="triton")
    a_shape = sparse_attention(q, k, v, [HP("a_shape", sink=2, local=8)] * 4, impl="triton")
    assert rel_err(out[:, :, 128:], dense[:, :, 128:]) < 1e-4
    assert rel_err(out[:, :, :128], a_shape[:, :, :128]) < 1e-6    # (A-shape alone: the 128-row kernel)
    assert rel_err(out[:, :, 64:128], dense[:, :, 64:128]) > 1e-2


def test_cost_model_counts_dense_blocks_as_dense():
    from mi_compile.patterns.cost import computed_density
    n = 320                                  # len - last = 256: only the last block is dense
    q, k, _ = make_inputs(3, 1, 3, 1, n, 16)
    index = build_sparse_index(q, k, [tri(64, 64, 0), tri(64, 64, 64), tri(0, 1, n)])
    density = computed_density(index)[0]
    assert density[2].item() == 1.0 and density[0] < density[1] < 1.0
    per_block = tile_pairs_per_block(index)[0]
    assert torch.equal(per_block[1, :-1], per_block[0, :-1])           # only the last block is dense
    assert per_block[1, -1] == per_block[2, -1] > per_block[0, -1]


# ---------------------------------------------------------------------- TriangleMix config

MIX = {"dense_layers": 2, "tri_shape": {"sink": 64, "local": 1024, "last": 64}}


def test_triangle_mix_layer_rule():
    cfg = load_config({"num_layers": 5, "triangle_mix": MIX})
    assert cfg.triangle_mix == TriangleMix(2, tri(64, 1024, 64))
    for layer in range(5):
        want = HP("dense") if layer < 2 else tri(64, 1024, 64)
        assert cfg.heads_for(layer, 3) == [want] * 3
    cfg.check_model(5, 3)
    assert "triangle_mix" in cfg.summary()
    again = load_config(json.loads(json.dumps(cfg.to_json())))
    assert again.to_json() == cfg.to_json() == {"format": "mi-compile/v1", "num_layers": 5, "triangle_mix": MIX}
    assert again == cfg
    assert triangle_mix_config(2, sink=64, local=1024, last=64, num_layers=5).to_json() == cfg.to_json()
    # explicit layers entries win over the rule; the rule wins over default
    doc = {"default": {"pattern": "a_shape", "sink": 1, "local": 2}, "triangle_mix": MIX,
           "layers": {"0": {"1": {"pattern": "vertical_slash", "vertical": 10, "slash": 20}},
                      "3": {"*": {"pattern": "dense"}}}}
    cfg = load_config(doc)
    assert cfg.heads_for(0, 2) == [HP("dense"), HP("vertical_slash", vertical=10, slash=20)]
    assert cfg.heads_for(1, 2) == [HP("dense")] * 2
    assert cfg.heads_for(2, 2) == [tri(64, 1024, 64)] * 2
    assert cfg.heads_for(3, 2) == [HP("dense")] * 2
    assert cfg.heads_for(9, 2) == [tri(64, 1024, 64)] * 2
    assert load_config(json.loads(json.dumps(cfg.to_json()))).to_json() == cfg.to_json()
    assert load_config({"triangle_mix": {**MIX, "dense_layers": 0}}).heads_for(0, 1) == [tri(64, 1024, 64)]
    explicit = {"dense_layers": 1, "tri_shape": {"pattern": "tri_shape", "sink": 0, "local": 5, "last": 0}}
    assert load_config({"triangle_mix": explicit}).heads_for(1, 1) == [tri(0, 5, 0)]


def test_triangle_mix_file_round_trip(tmp_path):
    path = tmp_path / "mix.json"
    triangle_mix_config(3, sink=4, local=128, last=64, num_heads=2).save(path)
    cfg = load_config(str(path))
    assert cfg.source == str(path) and cfg.heads_for(3, 2) == [tri(4, 128, 64)] * 2
    with pytest.raises(ConfigError, match="2 heads per layer, the model has 3"):
        cfg.heads_for(0, 3)


@pytest.mark.parametrize("value,message", [
    (3, "triangle_mix: must be an object"),
    ({"dense_layers": 2}, "triangle_mix: missing 'tri_shape'"),
    ({"tri_shape": MIX["tri_shape"]}, "triangle_mix: missing 'dense_layers'"),
    ({**MIX, "extra": 1}, "triangle_mix: unknown key\\(s\\) 'extra'"),
    ({**MIX, "dense_layers": -1}, "triangle_mix: dense_layers must be >= 0, got -1"),
    ({**MIX, "dense_layers": "2"}, "triangle_mix: dense_layers must be an int"),
    ({**MIX, "dense_layers": True}, "triangle_mix: dense_layers must be an int"),
    ({**MIX, "dense_layers": 6}, "triangle_mix: dense_layers is 6, more than num_layers=5"),
    ({**MIX, "tri_shape": [64, 1024, 64]}, "triangle_mix: tri_shape must be an object"),
    ({**MIX, "tri_shape": {"sink": 64, "local": 0, "last": 64}}, "triangle_mix: tri_shape needs local >= 1"),
    ({**MIX, "tri_shape": {"sink": 64, "local": 8}}, "triangle_mix: tri_shape is missing parameter 'last'"),
    ({**MIX, "tri_shape": {"sink": 64, "local": 8, "last": -3}}, "triangle_mix: last must be >= 0, got -3"),
    ({**MIX, "tri_shape": {"sink": 1, "local": 8, "last": 1, "topk": 2}}, "triangle_mix: tri_shape does not take 'topk'"),
    ({**MIX, "tri_shape": {"pattern": "a_shape", "sink": 1, "local": 8, "last": 1}},
     "triangle_mix: tri_shape: the pattern is 'tri_shape', got 'a_shape'"),
])
def test_triangle_mix_bad_values_are_rejected(value, message):
    with pytest.raises(ConfigError, match=f"^<dict>: {message}"):
        load_config({"num_layers": 5, "triangle_mix": value})


def test_tri_shape_in_both_config_formats():
    cfg = load_config({"default": {"pattern": "tri_shape", "sink": 4, "local": 64, "last": 64}})
    assert cfg.heads_for(0, 1) == [tri(4, 64, 64)]
    with pytest.raises(ConfigError, match="<dict>: default: tri_shape needs local >= 1"):
        load_config({"default": {"pattern": "tri_shape", "sink": 4, "local": 0, "last": 64}})
    mi = load_config([{"0": ["tri_shape", 100, 300, 0.9], "1": ["a_shape", 100, 300]}])
    assert mi.heads_for(0, 2) == [tri(100, 300, 64), HP("a_shape", sink=100, local=300)]
    with pytest.raises(ConfigError, match="layer 0, head 0: tri_shape needs local >= 1"):
        load_config([{"0": ["tri_shape", 100, 0]}])


# ---------------------------------------------------------------------- compiled model

@pytest.fixture
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_logits(model, ids, cfg):
    with torch.no_grad():
        return torch.compile(model, backend="minference", options={"config": cfg, "min_seq_len": 0})(
            ids, use_cache=False).logits


@pytest.mark.usefixtures("_reset_dynamo")
def test_compiled_triangle_mix_model(monkeypatch):
    """A 2-layer Llama, layer 0 dense and layer 1 tri_shape. Covering every key it is eager;
    with a narrow window the first block's rows change (except the first ``sink + local``)
    while the dense last block (rows 64..) still matches eager exactly: its keys come from the
    dense layer 0."""
    from mi_compile.models import tiny_model

    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "triton")     # the kernel, not the CPU reference
    model = tiny_model("llama")
    n = 100
    ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    full = {"triangle_mix": {"dense_layers": 1, "tri_shape": {"sink": 0, "local": n, "last": 0}}}
    torch.testing.assert_close(_compiled_logits(model, ids, full), ref, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
    narrow = {"triangle_mix": {"dense_layers": 1, "tri_shape": {"sink": 2, "local": 4, "last": 30}}}
    out = _compiled_logits(model, ids, narrow)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :6], ref[:, :6], rtol=1e-4, atol=1e-4)   # i < sink + local: all keys
    torch.testing.assert_close(out[:, 64:], ref[:, 64:], rtol=1e-4, atol=1e-4)
    assert (out[:, 6:64] - ref[:, 6:64]).abs().amax(-1).min() > 1e-3      # every such row changed
