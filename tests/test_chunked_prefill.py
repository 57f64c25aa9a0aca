"""Chunked prefill: q shorter than k/v (a prefill that continues a cache).

Query row ``r`` of a chunk of ``nq`` rows is key position ``nk - nq + r`` (bottom-right aligned
causal) and must come out as that row of the whole sequence's prefill: every pattern is defined
on the whole sequence (vertical-slash estimated from the chunk's last ``min(64, nq)`` queries,
the whole prompt's estimate when ``nq >= 64``). Both the float32 reference and the Triton
kernels (under TRITON_INTERPRET=1) are checked; small shapes, the interpreter is slow.
"""
import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.kernels.sparse_attention import count_tile_pairs_per_block, count_visited_pairs  # noqa: E402
from mi_compile.patterns.block_sparse import pooled_blocks  # noqa: E402
from mi_compile.op import chunk_dense_reason, dense_attention, sparse_attention_op  # noqa: E402
from mi_compile.patterns.cost import tile_pairs_per_block  # noqa: E402
from mi_compile.patterns.reference import reference_attention  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, encode_heads  # noqa: E402
from mi_compile.patterns.vertical_slash import estimate_scores_torch  # noqa: E402
from mi_compile.sparse import (build_sparse_index, selection_mask, sparse_attention,  # noqa: E402
                               sparse_attention_from_index)

from kernel_checks import make_inputs, rel_err  # noqa: E402

B, HQ, HKV, D = 1, 4, 2, 16
SETS = {
    "dense": [HP("dense")],
    "a_shape": [HP("a_shape", sink=4, local=40), HP("a_shape", sink=0, local=100)],
    "tri_shape": [HP("tri_shape", sink=4, local=40, last=64), HP("tri_shape", sink=64, local=70, last=100)],
    "vertical_slash": [HP("vertical_slash", vertical=68, slash=70),
                       HP("vertical_slash", vertical=80, slash=66, last=64),
                       HP("vertical_slash_tiled", vertical=70, slash=130)],
    # topk <= 2 selects the diagonal and block 0 whatever the scores: the chunk's selection is
    # the whole prefill's even where a block is partly before the chunk
    "block_sparse": [HP("block_sparse", topk=2), HP("block_sparse", topk=1, last=64)],
    "mixed_gqa": [HP("dense"), HP("a_shape", sink=4, local=40), HP("vertical_slash", vertical=68, slash=70, last=64),
                  HP("block_sparse", topk=2)],
}
CHUNKS = [(64, 256), (100, 300), (1, 256), (130, 300)]     # (nq, nk)
TOL = 1e-5


def heads_of(name):
    heads = SETS[name]
    return [heads[h % len(heads)] for h in range(HQ)]


@functools.lru_cache(maxsize=None)
def inputs(nk, batch=B):
    return make_inputs(1000 + nk + batch, batch, HQ, HKV, nk, D)


def run(q, k, v, heads, impl, seq_start=None, seq_len=None):
    """Output of the public path; the kernel's with every element poisoned first."""
    if impl == "reference":
        return sparse_attention(q, k, v, heads, impl="reference", seq_start=seq_start, seq_len=seq_len)
    index = build_sparse_index(q, k, heads, seq_start=seq_start, seq_len=seq_len)
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, impl="triton", out=out)
    assert not out.isnan().any(), "kernel left output elements unwritten"
    return out


@functools.lru_cache(maxsize=None)
def full_prefill(name, nk, impl):
    q, k, v = inputs(nk)
    return run(q, k, v, heads_of(name), impl)


def bottom_right_sdpa(q, k, v, key_padding_mask=None):
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq)[:, None] + nk - nq
    allowed = (torch.arange(nk)[None, :] <= i)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("nq,nk", CHUNKS, ids=[f"{a}of{b}" for a, b in CHUNKS])
@pytest.mark.parametrize("name", list(SETS))
def test_chunk_rows_equal_full_prefill(name, nq, nk, impl):
    q, k, v = inputs(nk)
    heads = heads_of(name)
    out = run(q[:, :, nk - nq:], k, v, heads, impl)
    assert out.shape == (B, HQ, nq, D)
    full = full_prefill(name, nk, impl)[:, :, nk - nq:]
    own_estimate = nq < 64 and name in ("vertical_slash", "mixed_gqa")
    for h, head in enumerate(heads):
        if own_estimate and head.kind.startswith("vertical_slash"):
            continue        # fewer than 64 queries: its own estimate (test_short_chunk_vertical_slash)
        err = rel_err(out[:, h], full[:, h])
        assert err < TOL, f"head {h} ({head.describe()}): rel err {err:.2e} against the whole prefill"
    if impl == "reference":
        ref = reference_attention(q[:, :, nk - nq:], k, v, build_sparse_index(q[:, :, nk - nq:], k, heads), D ** -0.5)
        assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("nq", [1, 40])
def test_short_chunk_vertical_slash(nq):
    """Below 64 queries the estimate is the chunk's own rows: selection from those rows'
    softmax, the kernel equal to the reference and visiting exactly its selection."""
    nk = 256
    q, k, v = inputs(nk)
    heads = heads_of("vertical_slash")
    qc = q[:, :, nk - nq:]
    index = build_sparse_index(qc, k, heads)
    vert, slash = estimate_scores_torch(qc, k, [0, 1, 2, 3], index.seq_start, index.seq_len, D ** -0.5)
    vert_full, slash_full = estimate_scores_torch(q, k, [0, 1, 2, 3], index.seq_start, index.seq_len, D ** -0.5)
    assert not torch.allclose(vert, vert_full)
    rows_only = _estimate_of_rows(q, k, nk - nq)
    assert torch.allclose(vert, rows_only[0], atol=1e-5) and torch.allclose(slash, rows_only[1], atol=1e-5)
    out = run(qc, k, v, heads, "triton")
    ref = reference_attention(qc, k, v, index, D ** -0.5)
    assert rel_err(out, ref) < 1e-4
    visits = count_visited_pairs(qc, k, v, index)
    assert visits.max() <= 1 and torch.equal(visits.bool(), selection_mask(qc, k, heads))


def _estimate_of_rows(q, k, first):
    """The vertical-slash scores by definition from the query rows ``first ..`` only."""
    nk = k.shape[2]
    scale = D ** -0.5
    rows = torch.arange(max(first, nk - 64), nk)
    kk = k.repeat_interleave(HQ // HKV, 1)
    s = (q[:, :, rows] @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.arange(nk)[None, :] > rows[:, None], float("-inf"))
    p = s.softmax(-1)
    vert = p.sum(2)
    slash = torch.zeros_like(vert)
    for r, pos in enumerate(rows.tolist()):
        slash[..., :pos + 1] += p[:, :, r, :pos + 1].flip(-1)     # offset d: key pos - d
    return vert, slash


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("name,heads", [("dense", [HP("dense")]),
                                        ("a_shape_all", [HP("a_shape", sink=0, local=10**6)]),
                                        ("mixed_all", [HP("dense"), HP("tri_shape", sink=1, local=1, last=10**6),
                                                       HP("block_sparse", topk=100)])])
def test_full_selection_equals_sdpa_bottom_right(name, heads, impl):
    nk, nq = 300, 130
    q, k, v = inputs(nk)
    heads = [heads[h % len(heads)] for h in range(HQ)]
    out = run(q[:, :, nk - nq:], k, v, heads, impl)
    ref = bottom_right_sdpa(q[:, :, nk - nq:], k, v)
    assert rel_err(out, ref) < TOL


def test_block_sparse_scored_chunk():
    """A score-dependent top-k: the chunk's own pooled query blocks (a block partly before the
    chunk pools its present rows). Blocks wholly in the chunk select as in the whole prefill."""
    nk, nq = 300, 130                      # chunk = positions 170..299: block 2 partial, 3 and 4 whole
    q, k, v = inputs(nk)
    heads = [HP("block_sparse", topk=3), HP("block_sparse", topk=4)] * 2
    qc = q[:, :, nk - nq:]
    index = build_sparse_index(qc, k, heads)
    full_index = build_sparse_index(q, k, heads)
    assert torch.equal(index.blocks[:, :, 3:], full_index.blocks[:, :, 3:])
    # block 2 pools positions 170..191 only
    pooled = qc[:, :, :22].mean(2)
    chunk_pool = pooled_blocks(qc, index.seq_start, index.seq_len, 5, unpadded=True, row_offset=nk - nq)
    gathered = pooled_blocks(qc, index.seq_start, index.seq_len, 5, unpadded=False, row_offset=nk - nq)
    assert torch.allclose(chunk_pool[:, :, 2], pooled, atol=1e-6) and torch.allclose(chunk_pool, gathered, atol=1e-6)
    assert torch.equal(chunk_pool[:, :, :2], torch.zeros_like(chunk_pool[:, :, :2]))
    out = run(qc, k, v, heads, "triton")
    assert rel_err(out, reference_attention(qc, k, v, index, D ** -0.5)) < 1e-4


@pytest.mark.parametrize("nq,nk", [(100, 300), (130, 256)], ids=["100of300", "130of256"])
def test_kernel_visits_exactly_the_chunk_selection(nq, nk):
    """Counting modes: each selected pair once, nothing else; the cost model equals the walk;
    the chunk's selection is the whole prefill's rows."""
    q, k, v = inputs(nk)
    heads = heads_of("mixed_gqa")
    heads[0] = HP("tri_shape", sink=4, local=40, last=64)
    qc = q[:, :, nk - nq:]
    index = build_sparse_index(qc, k, heads)
    visits = count_visited_pairs(qc, k, v, index)
    mask = selection_mask(qc, k, heads)
    assert mask.shape == (B, HQ, nq, nk)
    assert visits.max() <= 1 and torch.equal(visits.bool(), mask)
    assert torch.equal(mask, selection_mask(q, k, heads)[:, :, nk - nq:])
    assert torch.equal(count_tile_pairs_per_block(qc, k, v, index).long(), tile_pairs_per_block(index))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_left_padded_chunk(impl):
    """Input 0 unpadded, input 1 left-padded: 230 real keys (the chunk's rows all real), input 2:
    100 real keys (the chunk's first 30 rows are padding: 0). Each equals its sequence alone."""
    nk, nq = 300, 130
    q, k, v = inputs(nk, 3)
    heads = heads_of("mixed_gqa")
    lengths = [300, 230, 100]
    start = torch.tensor([nk - n for n in lengths], dtype=torch.int32)
    length = torch.tensor(lengths, dtype=torch.int32)
    qc = q[:, :, nk - nq:]
    out = run(qc, k, v, heads, impl, start, length)
    for b, n in enumerate(lengths):
        rows = min(nq, n)
        alone = run(qc[b:b + 1, :, nq - rows:], k[b:b + 1, :, nk - n:], v[b:b + 1, :, nk - n:], heads, impl)
        assert rel_err(out[b:b + 1, :, nq - rows:], alone) < TOL
        assert torch.equal(out[b, :, :nq - rows], torch.zeros_like(out[b, :, :nq - rows]))
    if impl == "triton":
        index = build_sparse_index(qc, k, heads, seq_start=start, seq_len=length)
        visits = count_visited_pairs(qc, k, v, index)
        assert visits.max() <= 1 and torch.equal(visits.bool(), selection_mask(qc, k, heads, start, length))
        assert torch.equal(count_tile_pairs_per_block(qc, k, v, index).long(), tile_pairs_per_block(index))


def test_triton_estimate_of_a_chunk():
    """The fused vertical-slash estimate reads the chunk's last rows as the PyTorch one does."""
    from mi_compile.kernels.estimate import estimate_scores_triton
    nk = 300
    q, k, _ = inputs(nk, 2)
    start = torch.tensor([0, 90], dtype=torch.int32)
    length = torch.tensor([300, 210], dtype=torch.int32)
    for nq in (100, 30):
        qc = q[:, :, nk - nq:]
        got = estimate_scores_triton(qc, k, [0, 3], start, length, D ** -0.5)
        want = estimate_scores_torch(qc, k, [0, 3], start, length, D ** -0.5)
        for g, w in zip(got, want):
            assert torch.equal(g.isinf(), w.isinf())
            assert torch.allclose(g.nan_to_num(neginf=0), w.nan_to_num(neginf=0), atol=1e-5)


def test_fused_tables_of_a_chunk():
    """The fused (CUDA) table builder gives the PyTorch builder's tables for a chunk, padded."""
    import dataclasses

    from mi_compile.patterns.index import build_index
    nk, nq = 300, 100
    q, k, _ = inputs(nk, 2)
    heads = heads_of("mixed_gqa")
    start = torch.tensor([0, 70], dtype=torch.int32)
    length = torch.tensor([300, 230], dtype=torch.int32)
    qc = q[:, :, nk - nq:]
    got = build_index(qc, k, heads, D ** -0.5, start, length, tables="triton")
    want = build_index(qc, k, heads, D ** -0.5, start, length, tables="torch")
    assert got.q_len == want.q_len == nq and got.n == want.n == nk
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, field.name


def test_op_chunk(monkeypatch):
    """The compiled op's runtime: sparse for a chunk of >= 64 rows (left padding), dense below
    64 rows and for heads that cannot take a chunk, errors for q_len > kv_len and right padding."""
    nk, nq = 300, 100
    q, k, v = inputs(nk, 2)
    heads = heads_of("mixed_gqa")
    flat = encode_heads(heads)
    mask = torch.ones(2, nk, dtype=torch.bool)
    mask[1, :70] = False
    qc = q[:, :, nk - nq:]
    out = sparse_attention_op(qc, k, v, flat, None, mask, 0, 1, 0)
    want = sparse_attention(qc, k, v, heads, impl="reference", seq_start=torch.tensor([0, 70], dtype=torch.int32),
                            seq_len=torch.tensor([300, 230], dtype=torch.int32))
    assert rel_err(out, want) < TOL
    assert rel_err(out, bottom_right_sdpa(qc, k, v, mask)) > 1e-3       # sparse indeed
    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "triton")                  # the kernels, in the op's layout
    assert rel_err(sparse_attention_op(qc, k, v, flat, None, mask, 0, 1, 0), want) < TOL
    monkeypatch.delenv("MI_COMPILE_CPU_IMPL")
    # short chunk and a head without chunk support: dense, bottom-right aligned
    short = q[:, :, nk - 32:]
    assert rel_err(sparse_attention_op(short, k, v, flat, None, mask, 0, 1, 0),
                   bottom_right_sdpa(short, k, v, mask)) < TOL
    xa = encode_heads([HP("xattention", threshold=900, stride=8, max_blocks=8)] * HQ)
    assert rel_err(sparse_attention_op(qc, k, v, xa, None, None, 0, 1, 0), bottom_right_sdpa(qc, k, v)) < TOL
    assert rel_err(dense_attention(qc, k, v, None, window=50),
                   _windowed(qc, k, v, 50)) < TOL
    # nq == nk unchanged (the whole prefill)
    whole = sparse_attention_op(q, k, v, flat, None, None, 0, 1, 0)
    assert rel_err(whole, sparse_attention(q, k, v, heads, impl="reference")) < TOL
    with pytest.raises(ValueError, match="query length 301 > key length 300"):
        sparse_attention_op(torch.cat([q, q[:, :, :1]], 2), k, v, flat, None, None, 0, 1, 0)
    right = torch.ones(2, nk, dtype=torch.bool)
    right[1, 250:] = False
    with pytest.raises(RuntimeError, match="left padding"):
        sparse_attention_op(qc, k, v, flat, None, right, 0, 1, 0)


def _windowed(q, k, v, window):
    nq, nk = q.shape[2], k.shape[2]
    i = torch.arange(nq)[:, None] + nk - nq
    j = torch.arange(nk)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < window), enable_gqa=True)


def test_validation():
    nk = 256
    q, k, v = inputs(nk)
    heads = heads_of("mixed_gqa")
    with pytest.raises(ValueError, match="q_len 257 > kv_len 256"):
        sparse_attention(torch.cat([q, q[:, :, :1]], 2), k, v, heads)
    with pytest.raises(ValueError, match="q_len 257 > kv_len 256"):
        build_sparse_index(torch.cat([q, q[:, :, :1]], 2), k, heads)
    qc = q[:, :, -100:]
    with pytest.raises(ValueError, match="left padding only"):
        sparse_attention(qc, k, v, heads, seq_start=torch.tensor([0], dtype=torch.int32),
                         seq_len=torch.tensor([200], dtype=torch.int32))
    with pytest.raises(ValueError, match="xattention"):
        selection_mask(qc, k, [HP("xattention", threshold=900, stride=8, max_blocks=8)] * HQ)
    # an index of the whole prefill does not fit a chunk
    with pytest.raises(ValueError, match="q_len"):
        sparse_attention_from_index(qc, k, v, build_sparse_index(q, k, heads))


def test_chunk_dense_reason():
    assert chunk_dense_reason([HP("dense"), HP("a_shape", sink=4, local=64),
                               HP("tri_shape", sink=4, local=64, last=64),
                               HP("vertical_slash", vertical=100, slash=200, last=64),
                               HP("vertical_slash_tiled", vertical=100, slash=200), HP("block_sparse", topk=4)]) is None
    assert chunk_dense_reason([]) is None
    reason = chunk_dense_reason([HP("dense"), HP("xattention", threshold=900, stride=8, max_blocks=8)])
    assert reason is not None and "head 1" in reason and "xattention" in reason
    reason = chunk_dense_reason((HP("flex_prefill", gamma=900, tau=100, min_budget=64),))
    assert reason is not None and "flex_prefill" in reason
