"""Chunked prefill: q shorter than k/v (a prefill that continues a cache).

Query row ``r`` of a chunk of ``nq`` rows is key position ``nk - nq + r`` (bottom-right aligned
causal) and must come out as that row of the whole sequence's prefill: every pattern is defined
on the whole sequence (vertical-slash estimated from the chunk's last ``min(64, nq)`` queries,
the whole prompt's estimate when ``nq >= 64``). The selecting patterns estimate from what the
chunk has: block-sparse and XAttention score the chunk's own query blocks (a block cut by the
chunk's start from its rows present), FlexPrefill reads the chunk's last queries and pools its
blocks; so a block wholly in the chunk selects as in the whole prefill. Both the float32
reference and the Triton kernels (under TRITON_INTERPRET=1) are checked; small shapes, the
interpreter is slow.
"""
import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.kernels.sparse_attention import count_tile_pairs_per_block, count_visited_pairs  # noqa: E402
from mi_compile.kernels.constants import SENTINEL  # noqa: E402
from mi_compile.patterns import xattention as X  # noqa: E402
from mi_compile.patterns.block_sparse import pooled_blocks  # noqa: E402
from mi_compile.patterns.flex_prefill import FlexPrefillSpec, flex_estimate, js_distance  # noqa: E402
from mi_compile.op import chunk_dense_reason, dense_attention, sparse_attention_op  # noqa: E402
from mi_compile.patterns.cost import tile_pairs_per_block  # noqa: E402
from mi_compile.patterns.index import CHUNK_SHARE_STEPS, chunk_heads  # noqa: E402
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
    # selections that depend on the chunk's rows (peaked inputs, so they drop blocks / keys):
    # flex_prefill tau=0 is always vertical-slash, tau=1000 always query-aware
    "xattention": [HP("xattention", threshold=800, stride=8, max_blocks=8),
                   HP("xattention", threshold=900, stride=4, max_blocks=3)],
    "flex_prefill": [HP("flex_prefill", gamma=800, tau=0, min_budget=0),
                     HP("flex_prefill", gamma=850, tau=1000, min_budget=64)],
    "mixed_select": [HP("xattention", threshold=800, stride=8, max_blocks=8), HP("a_shape", sink=4, local=40),
                     HP("flex_prefill", gamma=850, tau=1000, min_budget=0),
                     HP("vertical_slash", vertical=68, slash=70, last=64)],
}
PEAKED = {"xattention", "flex_prefill", "mixed_select"}
CHUNKS = [(64, 256), (100, 300), (1, 256), (130, 300)]     # (nq, nk)
TOL = 1e-5


def heads_of(name):
    heads = SETS[name]
    return [heads[h % len(heads)] for h in range(HQ)]


@functools.lru_cache(maxsize=None)
def inputs(nk, batch=B, peaked=False):
    """q, k, v; ``peaked``: a few hot keys (positions 0-3, 100-107, 230-233) take most of the
    attention, so the XAttention / FlexPrefill selections drop blocks and keys."""
    q, k, v = make_inputs(1000 + nk + batch, batch, HQ, HKV, nk, D)
    if peaked:
        hot = [*range(4), *range(100, 108), *range(230, 234)]
        q, k = q.clone(), k.clone()
        q[..., 0] += 8.0
        k[:, :, [h for h in hot if h < nk], 0] += 8.0
    return q, k, v


def inputs_of(name, nk, batch=B):
    return inputs(nk, batch, name in PEAKED)


def whole_prefill_rows(head, nq, nk):
    """The first chunk row (unpadded: key position ``nk - nq + r``) from which the definition
    makes the chunk's selection the whole prefill's (``nq``: none)."""
    first_whole_block = -(nk - nq) % 64          # rows before the first block wholly in the chunk
    if head.kind.startswith("vertical_slash"):
        return 0 if nq >= 64 else nq              # its estimate: the last 64 queries
    if head.kind == "xattention":
        return first_whole_block                  # a block cut by the chunk's start: its rows present
    if head.kind == "flex_prefill":
        if nq < 64:
            return nq
        return 0 if head.tau == 0 else first_whole_block    # vertical-slash / query-aware blocks
    return 0

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
    q, k, v = inputs_of(name, nk)
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
    """The rows the definition makes the whole prefill's are; every row is the reference's
    on the chunk's own index (where the chunk estimates from fewer rows, its own selection)."""
    q, k, v = inputs_of(name, nk)
    heads = heads_of(name)
    qc = q[:, :, nk - nq:]
    out = run(qc, k, v, heads, impl)
    assert out.shape == (B, HQ, nq, D)
    full = full_prefill(name, nk, impl)[:, :, nk - nq:]
    for h, head in enumerate(heads):
        r0 = whole_prefill_rows(head, nq, nk)
        if r0 < nq:
            err = rel_err(out[:, h, r0:], full[:, h, r0:])
            assert err < TOL, f"head {h} ({head.describe()}): rel err {err:.2e} against the whole prefill"
    ref = reference_attention(qc, k, v, build_sparse_index(qc, k, heads), D ** -0.5)
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
                                                       HP("block_sparse", topk=100)]),
                                        ("select_all", [HP("xattention", threshold=1000, stride=8, max_blocks=8),
                                                        HP("flex_prefill", gamma=1000, tau=0, min_budget=0),
                                                        HP("xattention", threshold=1000, stride=16, max_blocks=5),
                                                        HP("flex_prefill", gamma=1000, tau=1000, min_budget=0)])])
def test_full_selection_equals_sdpa_bottom_right(name, heads, impl):
    """Every causal pair selected (threshold / gamma 1000: every block, key and offset; the
    chunk's first block cut by its start): dense bottom-right attention."""
    nk, nq = 300, 130
    q, k, v = inputs(nk, B, name == "select_all")
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


def left_padded_chunk(name):
    """A 130-query chunk of 300 keys, batch of 3: input 0 unpadded, input 1 left-padded to 230
    real keys (the chunk's rows all real), input 2 to 100 (the chunk's first 30 rows padding)."""
    nk, nq, lengths = 300, 130, [300, 230, 100]
    q, k, v = inputs_of(name, nk, 3)
    start = torch.tensor([nk - n for n in lengths], dtype=torch.int32)
    length = torch.tensor(lengths, dtype=torch.int32)
    return nk, nq, lengths, q[:, :, nk - nq:], k, v, heads_of(name), start, length


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("name", ["mixed_gqa", "mixed_select"])
def test_left_padded_chunk(name, impl):
    """Input 0 unpadded, input 1 left-padded: 230 real keys (the chunk's rows all real), input 2:
    100 real keys (the chunk's first 30 rows are padding: 0). Each equals its sequence alone."""
    nk, nq, lengths, qc, k, v, heads, start, length = left_padded_chunk(name)
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


@pytest.mark.parametrize("nk, nq", [(300, 100), (2600, 300)])
def test_fused_tables_of_a_chunk(nk, nq):
    """The fused (CUDA) table builder gives the PyTorch builder's tables for a chunk, padded.
    At 2600 keys the block-rows programs (16 query blocks each here) of the first 2048
    positions lie wholly before the chunk in both inputs and write their rows without a sort."""
    import dataclasses

    from mi_compile.patterns.index import build_index
    q, k, _ = inputs(nk, 2)
    heads = heads_of("mixed_gqa")
    start = torch.tensor([0, 70], dtype=torch.int32)
    length = torch.tensor([nk, nk - 70], dtype=torch.int32)
    qc = q[:, :, nk - nq:]
    got = build_index(qc, k, heads, D ** -0.5, start, length, tables="triton")
    want = build_index(qc, k, heads, D ** -0.5, start, length, tables="torch")
    assert got.q_len == want.q_len == nq and got.n == want.n == nk
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, field.name


def test_op_chunk(monkeypatch):
    """The compiled op's runtime: sparse for a chunk of >= 64 rows (left padding; XAttention and
    FlexPrefill heads too), dense below 64 rows, errors for q_len > kv_len and right padding."""
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
    # short chunk: dense, bottom-right aligned
    short = q[:, :, nk - 32:]
    assert rel_err(sparse_attention_op(short, k, v, flat, None, mask, 0, 1, 0),
                   bottom_right_sdpa(short, k, v, mask)) < TOL
    # XAttention / FlexPrefill heads in a GQA layer: sparse too
    qp, kp, vp = inputs(nk, 2, True)
    select = heads_of("mixed_select")
    got = sparse_attention_op(qp[:, :, nk - nq:], kp, vp, encode_heads(select), None, mask, 0, 1, 0)
    want_select = sparse_attention(qp[:, :, nk - nq:], kp, vp, select, impl="reference",
                                   seq_start=torch.tensor([0, 70], dtype=torch.int32),
                                   seq_len=torch.tensor([300, 230], dtype=torch.int32))
    assert rel_err(got, want_select) < TOL
    assert rel_err(got, bottom_right_sdpa(qp[:, :, nk - nq:], kp, vp, mask)) > 1e-3
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


def test_chunk_keeps_its_share_of_the_columns():
    """``prompt_length``: a chunk whose keys are a share of the prompt the counts were chosen
    for keeps that share of each vertical-slash head's columns (rounded up to sixteenths, at
    least the forced 64); diagonals, block-sparse, A-shape and whole prefills stay as given."""
    vs = HP("vertical_slash", vertical=4096, slash=1088, last=64)
    heads = [vs, HP("vertical_slash_tiled", vertical=100, slash=130), HP("block_sparse", topk=8),
             HP("a_shape", sink=4, local=40)]
    assert chunk_heads(heads, 32768, 131072) == (HP("vertical_slash", vertical=1024, slash=1088, last=64),
                                                 HP("vertical_slash_tiled", vertical=64, slash=130), *heads[2:])
    assert chunk_heads(heads, 32769, 131072)[0].vertical == 1280          # 5/16, not 1/4
    assert chunk_heads(heads, 131072, 131072) == chunk_heads(heads, 200000, 131072) == tuple(heads)
    assert chunk_heads(heads, 1000, 0) == tuple(heads)
    assert len({chunk_heads([vs], n, 131072) for n in range(64, 131072, 997)}) == CHUNK_SHARE_STEPS

    nk, nq = 300, 100
    q, k, v = inputs(nk)
    qc = q[:, :, nk - nq:]
    heads = [HP("vertical_slash", vertical=200, slash=66), HP("block_sparse", topk=2)] * 2
    scaled = list(chunk_heads(heads, nk, 1200))                          # share 1/4: 50 -> the forced 64
    assert scaled[0].vertical == 64
    got = selection_mask(qc, k, heads, prompt_length=1200)
    assert torch.equal(got, selection_mask(qc, k, scaled))
    assert got.sum() < selection_mask(qc, k, heads).sum()               # fewer columns indeed
    want = sparse_attention(qc, k, v, scaled, impl="reference")
    assert rel_err(sparse_attention(qc, k, v, heads, impl="reference", prompt_length=1200), want) < TOL
    assert rel_err(sparse_attention_op(qc, k, v, encode_heads(heads), None, None, 0, 1, 0, 1200), want) < TOL
    # a whole prefill keeps its counts, and so does a chunk at or past the prompt length
    assert torch.equal(selection_mask(q, k, heads, prompt_length=1200), selection_mask(q, k, heads))
    assert torch.equal(selection_mask(qc, k, heads, prompt_length=nk), selection_mask(qc, k, heads))
    with pytest.raises(ValueError, match="prompt_length must be an int >= 0"):
        sparse_attention(qc, k, v, heads, prompt_length=-1)


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
    assert selection_mask(qc, k, heads_of("mixed_select")).shape == (B, HQ, 100, nk)
    # an index of the whole prefill does not fit a chunk
    with pytest.raises(ValueError, match="q_len"):
        sparse_attention_from_index(qc, k, v, build_sparse_index(q, k, heads))


def test_chunk_dense_reason():
    """Every pattern takes a chunk."""
    assert chunk_dense_reason([HP("dense"), HP("a_shape", sink=4, local=64),
                               HP("tri_shape", sink=4, local=64, last=64),
                               HP("vertical_slash", vertical=100, slash=200, last=64),
                               HP("vertical_slash_tiled", vertical=100, slash=200), HP("block_sparse", topk=4),
                               HP("xattention", threshold=900, stride=8, max_blocks=8),
                               HP("flex_prefill", gamma=900, tau=100, min_budget=64)]) is None
    assert chunk_dense_reason([]) is None
    assert chunk_dense_reason((HP("flex_prefill", gamma=900, tau=100, min_budget=64),)) is None


# ---------------------------------------------------------------------- XAttention, FlexPrefill

PADDED = (torch.tensor([0, 90], dtype=torch.int32), torch.tensor([300, 210], dtype=torch.int32))


def whole_range(nk):
    """seq_start, seq_len of one unpadded input of ``nk`` keys."""
    return torch.tensor([0], dtype=torch.int32), torch.tensor([nk], dtype=torch.int32)


def _mass_by_definition(q, k, q_offset, seq_start, seq_len, head_ids, scale, S):
    """XAttention's block mass of a chunk, by its definition: per sequence, queries before the
    chunk (q row ``r`` is key position ``q_offset + r``) and past the end are zero vectors;
    a strided row holding a chunk row is live; its causal softmax over the existing cells is
    summed into key blocks, averaged over the live rows of its query block."""
    nk = k.shape[2]
    nqb = -(-nk // 64)
    out = torch.zeros(q.shape[0], len(head_ids), nqb, nqb)
    for b in range(q.shape[0]):
        s0, n = int(seq_start[b]), int(seq_len[b])
        cells = -(-n // 64) * 64 // S
        first = q_offset - s0                                  # the chunk's first position
        qs = torch.zeros(q.shape[1], cells * S, D)
        for p in range(max(first, 0), n):
            qs[:, p] = q[b, :, s0 + p - q_offset]
        ks = torch.zeros(k.shape[1], cells * S, D)
        ks[:, :n] = k[b, :, s0:s0 + n]
        u = torch.arange(cells)
        live = (u * S + S > first) & (u * S < n)
        for slot, h in enumerate(head_ids):
            qq = qs[h].view(cells, S, D)
            kk = ks[h // (HQ // HKV)].view(cells, S, D).flip(1)   # cell w, slot r: key wS + S - 1 - r
            z = torch.einsum("urd,wrd->uw", qq, kk) * scale / S
            z = z.masked_fill((u[None, :] > u[:, None]) | (u[None, :] * S >= n), float("-inf"))
            p = torch.softmax(z, -1)
            for m in range(cells * S // 64):
                rows = [x for x in range(m * 64 // S, (m + 1) * 64 // S) if live[x]]
                if rows:
                    out[b, slot, m, :cells * S // 64] = p[rows].view(len(rows), -1, 64 // S).sum((0, 2)) / len(rows)
    return out


@pytest.mark.parametrize("stride", [4, 8])
def test_xattention_mass_of_a_chunk(stride):
    """The chunk's block mass: its definition (PyTorch), the Triton estimate (several programs,
    some before the chunk) equal to it, and the whole prompt's mass in every block wholly in
    the chunk; blocks before it hold nothing."""
    from mi_compile.kernels.xattention_estimate import block_mass_triton
    nk, scale = 300, 0.3
    q, k, _ = inputs(nk, 2, True)
    full = X.block_mass_torch(q, k, [0, 3], *PADDED, scale, stride)
    for nq in (130, 100, 30, 1):
        qc = q[:, :, nk - nq:]
        got = X.block_mass_torch(qc, k, [0, 3], *PADDED, scale, stride)
        assert torch.allclose(got, _mass_by_definition(qc, k, nk - nq, *PADDED, [0, 3], scale, stride), atol=1e-6)
        tri = block_mass_triton(qc, k, [0, 3], *PADDED, scale, stride, unit=max(16, 64 // stride))
        assert torch.allclose(tri, got, atol=1e-5)
        for b in range(2):
            first = nk - nq - int(PADDED[0][b])
            whole = -(-first // 64)
            assert torch.allclose(got[b, :, whole:], full[b, :, whole:], atol=1e-6)
            assert torch.equal(got[b, :, :first // 64], torch.zeros_like(got[b, :, :first // 64]))
    # a chunk on a block boundary: every block of it is the whole prompt's (default launch)
    nk, nq = 256, 128
    q, k, _ = inputs(nk, 1, True)
    full = X.block_mass(q, k, [1, 2], *whole_range(nk), scale, stride, impl="triton")
    got = X.block_mass(q[:, :, nk - nq:], k, [1, 2], *whole_range(nk), scale, stride, impl="triton")
    assert torch.allclose(got[:, :, 2:], full[:, :, 2:], atol=1e-6)
    assert torch.equal(got[:, :, :2], torch.zeros_like(got[:, :, :2]))


def test_xattention_selection_of_a_chunk():
    """The chunk's block rows: none before it, the whole prefill's in every block wholly in it."""
    nk, nq = 300, 100                            # positions 200..299: block 3 cut, block 4 whole
    q, k, _ = inputs(nk, 2, True)
    heads = heads_of("xattention")
    start, length = PADDED
    index = build_sparse_index(q[:, :, nk - nq:], k, heads, seq_start=start, seq_len=length)
    full = build_sparse_index(q, k, heads, seq_start=start, seq_len=length)
    for b in range(2):
        first = nk - nq - int(start[b])
        whole = -(-first // 64)
        assert torch.equal(index.blocks[b, :, whole:], full.blocks[b, :, whole:])
        assert torch.equal(index.block_count[b, :, whole:], full.block_count[b, :, whole:])
        assert not index.block_count[b, :, :first // 64].any()
    assert (index.block_count[0, 0, 4] < 5).all()        # the threshold drops blocks (head 0: at most 8)


def test_flex_prefill_estimate_of_a_chunk():
    """FlexPrefill's estimate of a chunk: with >= 64 queries the whole prompt's (last queries,
    switch, and the query-aware blocks wholly in the chunk), Triton as PyTorch; with fewer, from
    the chunk's rows by definition; blocks before the chunk select nothing."""
    nk, scale, ids = 300, D ** -0.5, [0, 3]
    q, k, _ = inputs(nk, 2, True)
    full = flex_estimate(q, k, ids, *PADDED, scale, impl="torch")
    for nq in (130, 100, 30):
        qc = q[:, :, nk - nq:]
        got = flex_estimate(qc, k, ids, *PADDED, scale, impl="torch")
        tri = flex_estimate(qc, k, ids, *PADDED, scale, impl="triton")
        for g, t in zip(got, tri):
            assert torch.allclose(g, t, atol=1e-5)
        if nq >= 64:
            for g, f in zip(got[:3], full[:3]):
                assert torch.allclose(g, f, atol=1e-6)
        for b in range(2):
            first = nk - nq - int(PADDED[0][b])
            whole = -(-first // 64)
            assert torch.allclose(got[3][b, :, whole:], full[3][b, :, whole:], atol=1e-6)
        heads = [HP("flex_prefill", gamma=850, tau=1000, min_budget=0)] * 2
        sel = FlexPrefillSpec().select_tables(qc, k, ids, heads, *PADDED, scale)
        for b in range(2):
            before = (nk - nq - int(PADDED[0][b])) // 64
            blocks = -(-int(PADDED[1][b]) // 64)
            counts = sel["block_count"][b]
            assert not counts[:, :before].any() and counts[:, before:blocks].all() and not counts[:, blocks:].any()
    # fewer than 64 queries: the estimate of the chunk's own rows (one unpadded input)
    nq = 30
    q, k, _ = inputs(nk, 1, True)
    qc = q[:, :, nk - nq:]
    v, s, distance, _ = flex_estimate(qc, k, ids, *whole_range(nk), scale, impl="torch")
    vert, slash = _estimate_of_rows(q, k, nk - nq)
    assert torch.allclose(v, vert[:, ids] / nq, atol=1e-6) and torch.allclose(s, slash[:, ids] / nq, atol=1e-6)
    pooled_k = pooled_blocks(k, *whole_range(nk), 5)[:, [h // (HQ // HKV) for h in ids]]
    est = torch.softmax(torch.einsum("bhd,bhcd->bhc", qc[:, ids].mean(2), pooled_k) * scale, -1)
    true_blocks = torch.nn.functional.pad(v, (0, 20)).view(1, 2, 5, 64).sum(-1)
    assert torch.allclose(distance, js_distance(true_blocks, est), atol=1e-6)


def test_triton_estimates_build_the_chunk_index(monkeypatch):
    """The index of a padded chunk with the Triton estimates (as on CUDA: XAttention's block
    mass, the last queries' softmax) is the PyTorch estimates' index."""
    import dataclasses

    from mi_compile.patterns import vertical_slash
    nk, nq = 300, 130
    q, k, _ = inputs(nk, 2, True)
    heads = heads_of("mixed_select")
    qc = q[:, :, nk - nq:]
    want = build_sparse_index(qc, k, heads, seq_start=PADDED[0], seq_len=PADDED[1])
    monkeypatch.setattr(X, "selection_impl", lambda q: "triton")
    monkeypatch.setattr(vertical_slash, "selection_impl", lambda q: "triton")
    got = build_sparse_index(qc, k, heads, seq_start=PADDED[0], seq_len=PADDED[1])
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        assert torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b, field.name


def _old_block_sparse_rows(qc, k, topks, start, length, scale):
    """The chunk's block-sparse tables as scored before a chunk scored only its own query blocks:
    every ``NQB x NQB`` block pair pooled, masked and top-k'd, then the live rows (blocks
    before the chunk cleared: they hold no chunk row)."""
    nq, nk = qc.shape[2], k.shape[2]
    nqb = -(-nk // 64)
    pooled_q = pooled_blocks(qc, start, length, nqb, row_offset=nk - nq)
    pooled_k = pooled_blocks(k, start, length, nqb)[:, [h // (HQ // HKV) for h in range(HQ)]]
    scores = torch.bmm(pooled_q.view(-1, nqb, D), pooled_k.reshape(-1, nqb, D).transpose(1, 2)).view(-1, HQ, nqb, nqb)
    scores.masked_fill_(torch.ones(nqb, nqb, dtype=torch.bool).triu(1), float("-inf"))
    scores[..., 0] = torch.finfo(torch.float32).max
    scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    kmax = max(min(t, nqb) for t in topks)
    val, idx = torch.topk(scores, kmax, dim=-1)
    m = torch.arange(nqb)
    first = ((nk - nq) - start.long()).clamp(min=0) // 64
    held = (m[None, :] >= first[:, None]) & (m[None, :] < (length.long()[:, None] + 63) // 64)
    rank_ok = torch.arange(kmax)[None, :] < torch.tensor([min(t, nqb) for t in topks])[:, None]
    keep = (val > float("-inf")) & held[:, None, :, None] & rank_ok[None, :, None, :]
    return torch.where(keep, idx, SENTINEL).to(torch.int32).sort(-1).values, keep.sum(-1).to(torch.int32)


def _old_flex_rows(qc, k, heads, start, length, scale):
    """FlexPrefill's chunk tables from the whole ``NQB x NQB`` block distributions."""
    nq, nk = qc.shape[2], k.shape[2]
    ids = list(range(HQ))
    _, _, distance, block_dist = flex_estimate(qc, k, ids, start, length, scale)
    blocks, counts = X.select_from_mass(block_dist, [h.gamma for h in heads], [-(-nk // 64)] * HQ, length,
                                        [-(-h.min_budget // 64) for h in heads],
                                        X.chunk_first_position(start, nk, nq))
    aware = distance < torch.tensor([h.tau for h in heads], dtype=torch.float32)[None, :] / 1000.0
    return torch.where(aware[..., None, None], blocks, SENTINEL), torch.where(aware[..., None], counts, 0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("nq,nk", [(1, 300), (64, 300), (100, 300), (130, 300), (64, 256), (130, 700)],
                         ids=lambda x: str(x))
def test_chunk_scores_only_its_query_blocks(nq, nk, padded):
    """A chunk scores and selects only the query blocks that can hold its rows; its tables (every
    row: blocks, block_count) are those of scoring every block pair, the rows before the chunk
    and past the sequence empty. Block-sparse through both table builders (PyTorch, fused
    Triton), FlexPrefill query-aware and XAttention heads as their specs select."""
    from mi_compile.patterns.block_sparse import chunk_rows
    from mi_compile.patterns.index import build_index
    batch = 3 if padded else 1
    lengths = [nk, nk - 70, 100][:batch]
    start = torch.tensor([nk - n for n in lengths], dtype=torch.int32)
    length = torch.tensor(lengths, dtype=torch.int32)
    scale = D ** -0.5
    q, k, _ = inputs(nk, batch, True)
    qc = q[:, :, nk - nq:]
    rows, held = chunk_rows(start, nk, nq)
    assert rows.shape == (batch, min(-(-nq // 64) + 1, -(-nk // 64)))

    topks = [3, 4, 2, 5]
    heads = [HP("block_sparse", topk=t) for t in topks]
    want_blocks, want_counts = _old_block_sparse_rows(qc, k, topks, start, length, scale)
    for tables in ("torch", "triton"):
        for unpadded in ((False, True) if not padded else (False,)):
            index = build_index(qc, k, heads, scale, start, length, unpadded=unpadded, tables=tables)
            kw = want_blocks.shape[-1]
            assert torch.equal(index.block_count, want_counts), (tables, unpadded)
            assert torch.equal(index.blocks[..., :kw], want_blocks), (tables, unpadded)
            assert (index.blocks[..., kw:] == SENTINEL).all()
    assert want_counts.any()

    flex = [HP("flex_prefill", gamma=g, tau=1000, min_budget=m) for g, m in ((850, 0), (700, 64), (950, 0), (800, 128))]
    sel = FlexPrefillSpec().select_tables(qc, k, list(range(HQ)), flex, start, length, scale)
    want_blocks, want_counts = _old_flex_rows(qc, k, flex, start, length, scale)
    assert torch.equal(sel["block_count"], want_counts) and torch.equal(sel["blocks"], want_blocks)
    if not padded:      # pooled by a reshape: the same selection
        fast = FlexPrefillSpec().select_tables(qc, k, list(range(HQ)), flex, start, length, scale, unpadded=True)
        assert all(torch.equal(sel[key], fast[key]) for key in sel)
    index = build_index(qc, k, flex, scale, start, length)
    assert torch.equal(index.block_count, want_counts) and torch.equal(index.blocks, want_blocks)

    xa = [HP("xattention", threshold=800, stride=8, max_blocks=8),
          HP("xattention", threshold=900, stride=4, max_blocks=3)] * 2
    mass = X.block_mass(qc, k, list(range(HQ)), start, length, scale, 8, impl="torch")
    mass4 = X.block_mass(qc, k, list(range(HQ)), start, length, scale, 4, impl="torch")
    mass[:, 1::2] = mass4[:, 1::2]
    want_blocks, want_counts = X.select_from_mass(mass, [h.threshold for h in xa],
                                                  [min(h.max_blocks, -(-nk // 64)) for h in xa], length,
                                                  first_position=X.chunk_first_position(start, nk, nq))
    got_blocks, got_counts = X.XAttentionSpec().select_block_table(qc, k, list(range(HQ)), xa, start, length, scale)
    assert torch.equal(got_counts, want_counts) and torch.equal(got_blocks, want_blocks)


@pytest.mark.parametrize("split_tiles", [1, 3])
@pytest.mark.parametrize("name", ["tri_shape", "vertical_slash", "block_sparse", "mixed_gqa", "mixed_select"])
def test_dense_rows_split_over_programs(monkeypatch, name, split_tiles):
    """A chunk's dense-rows blocks (heads with ``last``) with their keys split over several
    programs and merged equal the reference, left-padded inputs included, and the general
    kernel leaves those blocks to the split kernels (it did the launch, the rows are not NaN)."""
    from mi_compile.kernels import sparse_attention as kernel_module
    monkeypatch.setitem(kernel_module.KERNEL_CONFIG, "split_tiles", split_tiles)
    nk, nq, lengths, qc, k, v, heads, start, length = left_padded_chunk(name)
    out = run(qc, k, v, heads, "triton", start, length)
    assert kernel_module.LAST_COMPILE["dense_splits"] == -(-(nk // 64) // split_tiles)
    ref = sparse_attention(qc, k, v, heads, impl="reference", seq_start=start, seq_len=length)
    assert rel_err(out, ref) < TOL
    monkeypatch.setitem(kernel_module.KERNEL_CONFIG, "split_tiles", 0)
    whole = run(qc, k, v, heads, "triton", start, length)
    assert kernel_module.LAST_COMPILE["dense_splits"] is None and rel_err(out, whole) < TOL
