"""The ``xattention`` pattern: parameters, the antidiagonal estimate (Triton under the interpreter
against PyTorch), the threshold selection, the kernel against the reference mask, a compiled model.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.config import ConfigError, load_config  # noqa: E402
from mi_compile.kernels.constants import BLOCK, SENTINEL  # noqa: E402
from mi_compile.kernels.sparse_attention import count_visited_pairs  # noqa: E402
from mi_compile.patterns import registry, xattention as X  # noqa: E402
from mi_compile.patterns.index import build_index  # noqa: E402
from mi_compile.patterns.reference import dense_causal_reference, reference_attention  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, PatternError, decode_heads, encode_heads  # noqa: E402
from mi_compile.sparse import (build_sparse_index, selection_mask, sparse_attention,  # noqa: E402
                               sparse_attention_from_index)

ALL = 1 << 20   # max_blocks past any length here: no cap


def xa(threshold=900, stride=8, max_blocks=ALL):
    return HP("xattention", threshold=threshold, stride=stride, max_blocks=max_blocks)


def inputs(seed, B, Hq, Hkv, n, D, dtype=torch.float32, peaked=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h in (Hq, Hkv, Hkv))
    if peaked:      # a few hot keys, so a threshold below 1000 really drops blocks
        q = q * 2.0
        k[:, :, ::37] *= 4.0
    return q.to(dtype), k.to(dtype), v.to(dtype)


PADDED = (torch.tensor([0, 29], dtype=torch.int32), torch.tensor([333, 271], dtype=torch.int32))


# ---------------------------------------------------------------------- parameters

def test_parameters_validate_and_round_trip():
    p = xa(950, 16, 7)
    assert p.params == {"threshold": 950, "stride": 16, "max_blocks": 7}
    assert p.describe() == "xattention(950,16,7)"
    assert decode_heads(encode_heads([p, HP("dense")])) == [p, HP("dense")]
    assert registry.get("xattention").label(p) == "x95%"
    bad = [(dict(threshold=0, stride=8, max_blocks=4), "threshold in 1..1000"),
           (dict(threshold=1001, stride=8, max_blocks=4), "threshold in 1..1000"),
           (dict(threshold=900, stride=0, max_blocks=4), r"stride in \(2, 4, 8, 16\), got 0"),
           (dict(threshold=900, stride=3, max_blocks=4), "stride in"),
           (dict(threshold=900, stride=32, max_blocks=4), "stride in"),
           (dict(threshold=900, stride=8, max_blocks=0), "max_blocks >= 1"),
           (dict(threshold=900, stride=8, max_blocks=4, topk=2), "takes no parameter 'topk'")]
    for kwargs, message in bad:
        with pytest.raises(PatternError, match=message):
            HP("xattention", **kwargs)
    with pytest.raises(PatternError, match="must be an int"):
        HP("xattention", threshold=0.9, stride=8, max_blocks=4)


def test_config_entries():
    cfg = load_config({"default": {"pattern": "xattention", "threshold": 900, "stride": 8, "max_blocks": 64}})
    assert cfg.heads_for(0, 2) == [xa(900, 8, 64)] * 2
    with pytest.raises(ConfigError, match="xattention is missing parameter 'max_blocks'"):
        load_config({"default": {"pattern": "xattention", "threshold": 900, "stride": 8}})
    with pytest.raises(ConfigError, match="threshold in 1..1000"):
        load_config({"default": {"pattern": "xattention", "threshold": 2000, "stride": 8, "max_blocks": 4}})


def test_search_candidates():
    cands = registry.get("xattention").candidates(1000)
    assert cands and all(rank == 4 and p.kind == "xattention" and p.max_blocks == 16 for rank, p in cands)


# ---------------------------------------------------------------------- estimate

@pytest.mark.parametrize("stride", X.XA_STRIDES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_estimate_matches_torch(stride, dtype):
    q, k, _ = inputs(stride, 2, 4, 2, 333, 24, dtype)
    heads = [3, 0, 2]
    got = X.block_mass(q, k, heads, *PADDED, 0.2, stride, impl="triton")
    want = X.block_mass(q, k, heads, *PADDED, 0.2, stride, impl="torch")
    assert got.shape == (2, 3, 6, 6)
    torch.testing.assert_close(got, want, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)
    # a distribution over the causal key blocks of every live query block, 0 elsewhere
    live = torch.tensor([6, 5])
    nqb = torch.arange(6)
    rows = want.sum(-1)
    torch.testing.assert_close(rows, (nqb[None, :] < live[:, None]).float()[:, None].expand_as(rows))
    assert (want.triu(1) == 0).all()


@pytest.mark.parametrize("stride", X.XA_STRIDES)
def test_triton_estimate_across_key_tiles(stride):
    """Small programs (16 or 32 strided rows) so that 333 tokens span several row and key tiles."""
    from mi_compile.kernels.xattention_estimate import block_mass_triton
    q, k, _ = inputs(stride, 2, 4, 2, 333, 24, torch.float32)
    unit = max(16, 64 // stride)
    got = block_mass_triton(q, k, [1, 2], *PADDED, 0.2, stride, unit=unit)
    want = X.block_mass(q, k, [1, 2], *PADDED, 0.2, stride, impl="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of 64 / stride"):
        block_mass_triton(q, k, [1], *PADDED, 0.2, 2, unit=16)


def test_estimate_definition_on_one_block():
    """The antidiagonal logits of one 64-token sequence, by hand."""
    g = torch.Generator().manual_seed(1)
    S, D, n = 4, 8, 64
    q, k = torch.randn(1, 1, n, D, generator=g), torch.randn(1, 1, n, D, generator=g)
    start, length = torch.tensor([0], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    cells = n // S
    z = torch.empty(cells, cells)
    for u in range(cells):
        for w in range(cells):
            z[u, w] = sum(q[0, 0, u * S + r] @ k[0, 0, w * S + S - 1 - r] for r in range(S)) * 0.5 / S
    p = torch.softmax(z.masked_fill(torch.ones(cells, cells, dtype=torch.bool).triu(1), float("-inf")), -1)
    mass = X.block_mass_torch(q, k, [0], start, length, 0.5, S)
    torch.testing.assert_close(mass[0, 0, 0, 0], p.sum() / cells)    # one block: all of it
    torch.testing.assert_close(mass, X.block_mass(q, k, [0], start, length, 0.5, S, impl="triton"))


# ---------------------------------------------------------------------- selection

def _brute_force(mass_row, m, thr, width):
    """Fewest blocks, diagonal and sink first then by mass, reaching thr / 1000, at most width."""
    order = [m] + ([0] if m > 0 else []) + sorted(
        (c for c in range(1, m)), key=lambda c: (-float(mass_row[c]), c))
    if thr >= 1000:
        return sorted(order[:width])
    kept, total = [], 0.0
    for c in order:
        if kept and len(kept) >= (2 if m > 0 else 1) and total >= thr / 1000:
            break
        kept.append(c)
        total += float(mass_row[c])
    return sorted(kept[:width])


@pytest.mark.parametrize("thr,width", [(1, ALL), (500, ALL), (900, ALL), (990, 3), (1000, ALL), (1000, 2)])
def test_selection_is_the_fewest_blocks_reaching_the_threshold(thr, width):
    q, k, _ = inputs(7, 2, 2, 1, 600, 16, peaked=True)
    seq_start, seq_len = torch.tensor([0, 40], dtype=torch.int32), torch.tensor([600, 530], dtype=torch.int32)
    mass = X.block_mass_torch(q, k, [0, 1], seq_start, seq_len, 0.25, 8)
    nqb = mass.shape[-1]
    kk = min(width, nqb)
    blocks, count = X.select_from_mass(mass, [thr, thr], [kk, kk], seq_len)
    assert blocks.shape == (2, 2, nqb, kk)
    for b in range(2):
        live = -(-int(seq_len[b]) // BLOCK)
        for h in range(2):
            for m in range(nqb):
                got = blocks[b, h, m, :count[b, h, m]].tolist()
                assert (blocks[b, h, m, count[b, h, m]:] == SENTINEL).all()
                if m >= live:
                    assert got == []
                    continue
                assert got == _brute_force(mass[b, h, m], m, thr, kk), (b, h, m)
                assert got[-1] == m and (m == 0 or kk < 2 or got[0] == 0)       # diagonal, sink
                if thr >= 1000:
                    assert len(got) == min(m + 1, kk)
                elif len(got) < kk:
                    assert mass[b, h, m, got].sum() >= thr / 1000 - 1e-6
    if thr == 500:      # the peaked keys make a mid threshold sparse
        assert count.sum() < sum(min(m + 1, kk) for m in range(nqb)) * 4


def test_head_chunks_give_the_same_index(monkeypatch):
    q, k, _ = inputs(4, 2, 4, 2, 200, 16, peaked=True)
    heads = [xa(700, 8), xa(800, 4, 2), xa(600, 8, 3), HP("dense")]
    want = build_index(q, k, heads, 0.25, *PADDED_200)
    monkeypatch.setattr(X, "XA_CHUNK_BYTES", 1)           # one head per chunk
    got = build_index(q, k, heads, 0.25, *PADDED_200)
    assert torch.equal(got.blocks, want.blocks) and torch.equal(got.block_count, want.block_count)


PADDED_200 = (torch.tensor([0, 13], dtype=torch.int32), torch.tensor([200, 187], dtype=torch.int32))


def test_static_width_and_dead_rows():
    q, k, _ = inputs(3, 2, 2, 2, 200, 16)
    heads = [xa(900, 8, 2), xa(950, 4, 100)]
    index = build_index(q, k, heads, 0.25, *(torch.tensor([0, 80], dtype=torch.int32),
                                            torch.tensor([200, 64], dtype=torch.int32)))
    assert index.blocks.shape == (2, 2, 4, 4)                 # min(100, 4 blocks)
    assert (index.block_count[:, 0] <= 2).all()
    assert (index.block_count[1, :, 1:] == 0).all()           # past the 64-token sequence


# ---------------------------------------------------------------------- the kernel

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}


def check(q, k, v, heads, seq_start=None, seq_len=None):
    index = build_sparse_index(q, k, heads, seq_start=seq_start, seq_len=seq_len)
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, impl="triton", out=out)
    assert not out.isnan().any()
    ref = reference_attention(q, k, v, index, q.shape[-1] ** -0.5)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOL[q.dtype], err
    visits = count_visited_pairs(q, k, v, index)
    assert visits.max() <= 1
    assert torch.equal(visits.bool(), selection_mask(q, k, heads, seq_start, seq_len))
    return index


MIXED = [xa(800, 8), HP("vertical_slash", vertical=70, slash=70), xa(500, 4, 3), HP("block_sparse", topk=2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,heads,n,Hq,Hkv,padded", [
    ("gqa2_padded", [xa(700, 8), xa(300, 16, 2)], 333, 4, 2, True),
    ("gqa4_mixed", MIXED, 257, 8, 2, False),
    ("stride2_mixed_padded", [xa(600, 2), HP("dense"), xa(950, 4, 4), HP("a_shape", sink=4, local=40)],
     333, 4, 1, True),
], ids=lambda x: x if isinstance(x, str) else "")
def test_kernel_matches_reference(name, heads, n, Hq, Hkv, padded, dtype):
    q, k, v = inputs(len(name), 2, Hq, Hkv, n, 32, dtype, peaked=True)
    heads = [heads[h % len(heads)] for h in range(Hq)]
    index = check(q, k, v, heads, *(PADDED if padded else (None, None)))
    xa_rows = [h for h in range(Hq) if heads[h].kind == "xattention"]
    full = torch.tensor([[m + 1 for m in range(index.num_query_blocks)]])
    assert (index.block_count[:, xa_rows] < full).any(), "the selection kept everything"


def test_threshold_1000_is_dense_attention():
    q, k, v = inputs(5, 2, 4, 2, 301, 16, peaked=True)
    heads = [xa(1000, s) for s in (2, 4, 8, 16)]
    out = sparse_attention(q, k, v, heads, impl="triton")
    torch.testing.assert_close(out, dense_causal_reference(q, k, v, 16 ** -0.5), atol=1e-4, rtol=1e-4)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, sdpa, atol=1e-4, rtol=1e-4)


def test_fused_and_torch_tables_agree():
    """The fused table builder (under the interpreter) leaves the xattention rows to the pattern:
    the same tables as the PyTorch builder, bit for bit."""
    q, k, _ = inputs(11, 2, 4, 2, 333, 16, peaked=True)
    got = build_index(q, k, MIXED, 0.25, *PADDED, tables="triton")
    want = build_index(q, k, MIXED, 0.25, *PADDED, tables="torch")
    for name, t in vars(want).items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(getattr(got, name), t), name


# ---------------------------------------------------------------------- a compiled model

def test_compiled_llama_with_threshold_1000_matches_eager(tiny_llama_logits):
    out, ref, report = tiny_llama_logits({"pattern": "xattention", "threshold": 1000, "stride": 8, "max_blocks": 64})
    assert all(h.kind == "xattention" for s in report.sites for h in s.heads)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
