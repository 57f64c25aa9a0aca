"""The ``flex_prefill`` pattern: parameters, the estimate (Triton last-query softmax under the
interpreter against PyTorch), the per-input switch and the cumulative-mass selections, the
kernel against the reference mask, a compiled model.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mi_compile.config import ConfigError, load_config  # noqa: E402
from mi_compile.kernels.constants import BLOCK, SENTINEL  # noqa: E402
from mi_compile.kernels.sparse_attention import count_visited_pairs  # noqa: E402
from mi_compile.patterns import flex_prefill as FP, registry  # noqa: E402
from mi_compile.patterns.index import build_index  # noqa: E402
from mi_compile.patterns.reference import dense_causal_reference, reference_attention  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, PatternError, decode_heads, encode_heads  # noqa: E402
from mi_compile.sparse import (build_sparse_index, selection_mask, sparse_attention,  # noqa: E402
                               sparse_attention_from_index)


def fp(gamma=900, tau=100, min_budget=0):
    return HP("flex_prefill", gamma=gamma, tau=tau, min_budget=min_budget)


def inputs(seed, B, Hq, Hkv, n, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h in (Hq, Hkv, Hkv))
    q = q * 2.0
    k[:, :, ::37] *= 4.0           # hot columns, so gamma < 1000 really drops keys
    return q.to(dtype), k.to(dtype), v.to(dtype)


PADDED = (torch.tensor([0, 29], dtype=torch.int32), torch.tensor([333, 271], dtype=torch.int32))


def test_parameters_validate_and_round_trip():
    p = fp(950, 200, 128)
    assert p.params == {"gamma": 950, "tau": 200, "min_budget": 128}
    assert decode_heads(encode_heads([p])) == [p] and p.describe() == "flex_prefill(950,200,128)"
    assert registry.get("flex_prefill").label(p) == "f95/200"
    for kwargs, message in [(dict(gamma=0, tau=100), "gamma in 1..1000"),
                            (dict(gamma=1001, tau=100), "gamma in 1..1000"),
                            (dict(gamma=900, tau=1001), "tau in 0..1000"),
                            (dict(gamma=900, tau=1, min_budget=-1), "must be an int in 0"),
                            (dict(gamma=900, tau=1, topk=3), "takes no parameter 'topk'")]:
        with pytest.raises(PatternError, match=message):
            HP("flex_prefill", **kwargs)
    cfg = load_config({"default": {"pattern": "flex_prefill", "gamma": 900, "tau": 100, "min_budget": 64}})
    assert cfg.heads_for(0, 1) == [fp(900, 100, 64)]
    with pytest.raises(ConfigError, match="flex_prefill is missing parameter 'min_budget'"):
        load_config({"default": {"pattern": "flex_prefill", "gamma": 900, "tau": 100}})
    assert all(p.kind == "flex_prefill" for _, p in registry.get("flex_prefill").candidates(1000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_and_torch_estimates_agree(dtype):
    q, k, _ = inputs(1, 2, 4, 2, 333, 32, dtype)
    got = FP.flex_estimate(q, k, [0, 3, 1], *PADDED, 32 ** -0.5, impl="triton")
    want = FP.flex_estimate(q, k, [0, 3, 1], *PADDED, 32 ** -0.5, impl="torch")
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    v, s, distance, blocks = want
    torch.testing.assert_close(v.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(s.sum(-1), torch.ones(2, 3))
    assert (v[1, :, 271:] == 0).all() and (distance >= 0).all() and (distance <= 0.8326).all()
    assert (blocks.triu(1) == 0).all()


def test_js_distance():
    a = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(FP.js_distance(a, a), torch.zeros(2), atol=1e-6)
    disjoint = FP.js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(disjoint, torch.tensor(0.6931).sqrt(), atol=1e-4)


def test_fewest_reaching():
    dist = torch.tensor([[[0.1, 0.5, 0.05, 0.3, 0.05, 0.0]]])
    exists = torch.tensor([[[True] * 5 + [False]]])
    one = torch.ones(1)

    def run(gamma, minimum=0, first=False):
        out = FP.fewest_reaching(dist, exists, gamma * one, torch.tensor([minimum]), first)[0, 0]
        return out[out < SENTINEL].tolist()
    assert run(0.5) == [1] and run(0.8) == [1, 3] and run(0.85) == [0, 1, 3]
    assert run(1.0) == [0, 1, 2, 3, 4]                     # every existing entry, never 5
    assert run(0.5, minimum=3) == [0, 1, 3]
    assert run(0.5, first=True) == [0, 1] and run(0.01, first=True) == [0]


def _selection(q, k, heads, seq_start, seq_len):
    index = build_index(q, k, heads, q.shape[-1] ** -0.5, seq_start, seq_len)
    return index, FP.flex_estimate(q, k, list(range(len(heads))), seq_start, seq_len, q.shape[-1] ** -0.5)


def test_switch_and_selection_properties():
    q, k, _ = inputs(2, 2, 2, 1, 333, 16)
    v, s, distance, block_dist = FP.flex_estimate(q, k, [0, 1], *PADDED, 0.25)
    # a tau between the two inputs' distances of head 0 switches them differently
    d0 = distance[:, 0]
    tau = int(1000 * float(d0.mean()))
    assert d0.min() < tau / 1000 < d0.max(), d0
    heads = [fp(800, tau, 0), fp(950, 0, 70)]
    index = build_index(q, k, heads, 0.25, *PADDED)
    lengths = PADDED[1].tolist()
    for b in range(2):
        for h in range(2):
            cols = index.columns[b, h][index.columns[b, h] < SENTINEL]
            offs = index.offsets[b, h][index.offsets[b, h] < SENTINEL]
            counts = index.block_count[b, h]
            aware = bool(distance[b, h] < heads[h].tau / 1000)
            if aware:
                assert cols.numel() == 0 and offs.numel() == 0
                live = -(-lengths[b] // BLOCK)
                assert (counts[:live] >= 1).all() and (counts[live:] == 0).all()
                for m in range(live):
                    kept = index.blocks[b, h, m, :counts[m]]
                    assert kept[-1] == m and (m == 0 or kept[0] == 0)
                    assert block_dist[b, h, m, kept.long()].sum() >= heads[h].gamma / 1000 - 1e-5 or \
                        counts[m] == m + 1
            else:
                assert (counts == 0).all() and offs[0] == 0
                gamma = heads[h].gamma / 1000
                for sel, dist, forced in ((cols, v[b, h], 0), (offs, s[b, h], 1)):
                    assert (sel < lengths[b]).all()
                    assert len(sel) >= min(heads[h].min_budget, lengths[b])
                    vals = dist[sel.long()]
                    assert vals.sum() >= gamma - 1e-5
                    # the fewest: without its smallest entry (offset 0 aside) the mass falls short
                    free = vals[sel != 0] if forced else vals
                    if len(sel) > max(heads[h].min_budget, forced) and free.numel():
                        assert vals.sum() - free.min() < gamma + 1e-6
    assert (distance[:, 0] < tau / 1000).any() and not (distance[:, 0] < tau / 1000).all()


TOL = {torch.float32: 1e-4, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,Hq,Hkv,n,padded", [("gqa2_padded", 4, 2, 333, True), ("gqa4", 8, 2, 257, False)])
def test_kernel_matches_reference(name, Hq, Hkv, n, padded, dtype):
    q, k, v = inputs(len(name), 2, Hq, Hkv, n, 32, dtype)
    seq = PADDED if padded else (None, None)
    base = [fp(500, 0, 0), fp(300, 1000, 64), HP("vertical_slash", vertical=70, slash=70), fp(950, 150, 0),
            HP("block_sparse", topk=2), HP("xattention", threshold=900, stride=8, max_blocks=3), fp(700, 1000, 0),
            HP("dense")]
    heads = [base[h % len(base)] for h in range(Hq)]
    index = build_sparse_index(q, k, heads, seq_start=seq[0], seq_len=seq[1])
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, impl="triton", out=out)
    assert not out.isnan().any()
    ref = reference_attention(q, k, v, index, 32 ** -0.5)
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOL[dtype]
    visits = count_visited_pairs(q, k, v, index)
    assert visits.max() <= 1
    assert torch.equal(visits.bool(), selection_mask(q, k, heads, *seq))
    # both modes occur and really drop pairs
    per_head = visits.sum((-1, -2))
    lengths = index.seq_len.long()
    causal = lengths * (lengths + 1) // 2
    assert (index.block_count[:, 1, 0] > 0).all() and (index.columns[:, 0] < SENTINEL).any()
    assert (per_head[:, [0, 1]] < causal[:, None]).all()
    # the fused table builder hands such layers to the PyTorch one: the same tables
    fused = build_index(q, k, heads, 32 ** -0.5, index.seq_start, index.seq_len, tables="triton")
    for key, t in vars(index).items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(getattr(fused, key), t), key


def test_gamma_1000_is_dense_attention_in_both_modes():
    q, k, v = inputs(9, 2, 4, 2, 301, 16)
    heads = [fp(1000, 0), fp(1000, 1000), fp(1000, 0, 64), fp(1000, 1000, 64)]
    out = sparse_attention(q, k, v, heads, impl="triton")
    torch.testing.assert_close(out, dense_causal_reference(q, k, v, 16 ** -0.5), atol=1e-4, rtol=1e-4)


def test_a_part_holding_every_key_drops_the_other():
    """min_budget past the length keeps every column and every offset; the kernel then does a
    dense head's work once (computed density 1), not twice, and the output is dense attention."""
    from mi_compile.patterns.cost import computed_density
    q, k, v = inputs(4, 2, 2, 1, 333, 16)
    heads = [fp(900, 0, 4096), fp(500, 0, 4096)]                   # vertical-slash mode
    index = build_sparse_index(q, k, heads, seq_start=PADDED[0], seq_len=PADDED[1])
    assert (index.block_count == 0).all()
    offs = (index.offsets < SENTINEL).sum(-1)
    assert (offs == 1).all() and (index.offsets[..., 0] == 0).all()
    assert torch.equal((index.columns < SENTINEL).sum(-1), PADDED[1][:, None].long().expand(2, 2))
    torch.testing.assert_close(computed_density(index), torch.ones(2, 2, dtype=torch.float64))
    out = sparse_attention_from_index(q, k, v, index, impl="triton")
    torch.testing.assert_close(out, reference_attention(q, k, v, index, 16 ** -0.5), atol=1e-4, rtol=1e-4)
    assert torch.equal(count_visited_pairs(q, k, v, index).bool(), selection_mask(q, k, heads, *PADDED))


def test_compiled_llama_with_gamma_1000_matches_eager(tiny_llama_logits):
    out, ref, _ = tiny_llama_logits({"pattern": "flex_prefill", "gamma": 1000, "tau": 100, "min_budget": 0})
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
