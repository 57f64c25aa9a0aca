"""Index builders alone: planted structure is found, the conversion covers exactly the
selection, reference masks follow the documented definitions."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mi_compile.kernels.estimate import estimate_scores_triton  # noqa: E402
from mi_compile.kernels.sparse_attention import count_visited_pairs  # noqa: E402
from mi_compile.patterns.index import (SENTINEL, covered_table, head_selection_mask,  # noqa: E402
                                       merge_offsets)
from mi_compile.patterns.spec import HeadPattern as HP  # noqa: E402
from mi_compile.patterns.vertical_slash import estimate_scores_torch  # noqa: E402
from mi_compile.sparse import build_sparse_index, selection_density, selection_mask  # noqa: E402


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_planted_vertical_columns_are_selected():
    n, D = 191, 32
    q, k = randn(0, 1, 1, n, D), randn(1, 1, 1, n, D) * 0.1
    hot = [77, 120, 150]
    direction = q[0, 0, -64:].mean(0)
    for j in hot:
        k[0, 0, j] = direction * 4.0          # every last query likes these keys
    index = build_sparse_index(q, k, [HP("vertical_slash", vertical=64 + len(hot), slash=1)])
    cols = index.columns[0, 0]
    assert cols[cols < SENTINEL].tolist() == hot


def test_planted_diagonal_is_selected():
    n, D, d = 191, 32, 100
    q, k = randn(2, 1, 1, n, D), randn(3, 1, 1, n, D) * 0.1
    for p in range(n - 64, n):
        k[0, 0, p - d] = q[0, 0, p] * 2.0     # query p looks back exactly d tokens
    index = build_sparse_index(q, k, [HP("vertical_slash", vertical=1, slash=65)])
    offs = index.offsets[0, 0]
    assert offs[offs < SENTINEL].tolist() == list(range(64)) + [d]


# (B, Hq, Hkv, n, D, starts, lengths): one full sequence (GQA 4:1, n not a multiple of 64),
# a padded batch (right and left padding, one length < 64 + 64), one shorter than the 64
# estimate rows, and a tiny one where every key block is partial.
ESTIMATE_CASES = [(1, 4, 1, 200, 64, [0], [200]),
                  (2, 4, 2, 300, 80, [0, 100], [300, 131]),
                  (2, 2, 1, 129, 64, [122, 0], [7, 129]),
                  (1, 2, 2, 50, 32, [0], [50])]


@pytest.mark.parametrize("key_blocks", [1, 3, None], ids=lambda kb: f"kb{kb or 'default'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ESTIMATE_CASES, ids=lambda c: f"n{c[3]}_len{'-'.join(map(str, c[6]))}")
def test_triton_estimate_matches_torch(case, dtype, key_blocks, monkeypatch):
    """The fused estimate kernels give the PyTorch definition's scores, -inf pattern included,
    whatever number of key blocks a program takes (3: a program's last blocks past n)."""
    from mi_compile.kernels.estimate import ESTIMATE_CONFIG
    if key_blocks is not None:
        monkeypatch.setitem(ESTIMATE_CONFIG, "key_blocks", key_blocks)
    B, Hq, Hkv, n, D, starts, lengths = case
    q = (randn(10 + n, B, Hq, n, D) * 1.5).to(dtype)
    k = (randn(11 + n, B, Hkv, n, D) * 1.5).to(dtype)
    start, length = torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32)
    heads = list(range(Hq))[::-1][:3]                 # a subset, out of order
    want_v, want_s = estimate_scores_torch(q, k, heads, start, length, D ** -0.5)
    got_v, got_s = estimate_scores_triton(q, k, heads, start, length, D ** -0.5)
    # fp16: the reference rounds its scores to fp16 before the softmax, the kernel does not
    tol = 2e-6 if dtype == torch.float32 else 3e-3
    for want, got in ((want_v, got_v), (want_s, got_s)):
        assert torch.equal(torch.isfinite(want), torch.isfinite(got))
        assert not torch.isnan(got).any()
        real = torch.isfinite(want)
        torch.testing.assert_close(got[real], want[real], atol=tol, rtol=0)
    # each real row's probabilities sum to 1, so every head's scores sum to the row count
    for b, L in enumerate(lengths):
        rows = min(64, L)
        torch.testing.assert_close(got_v[b, :, :L].sum(-1), torch.full((len(heads),), float(rows)), atol=1e-3, rtol=0)
        torch.testing.assert_close(got_s[b, :, :L].sum(-1), torch.full((len(heads),), float(rows)), atol=1e-3, rtol=0)


def test_triton_estimate_finds_planted_column_and_diagonal():
    n, D, d, hot = 257, 32, 100, 200
    q, k = randn(20, 1, 2, n, D), randn(21, 1, 2, n, D) * 0.1
    for p in range(n - 64, n):
        k[0, 0, p - d] = q[0, 0, p] * 2.0     # head 0: query p looks back exactly d tokens
    k[0, 1, hot] = q[0, 1, -64:].mean(0) * 4.0  # head 1: every last query likes key `hot`
    start, length = torch.zeros(1, dtype=torch.int32), torch.full((1,), n, dtype=torch.int32)
    vertical, slash = estimate_scores_triton(q, k, [0, 1], start, length, D ** -0.5)
    assert slash[0, 0, 64:].argmax().item() + 64 == d
    assert vertical[0, 1, 64:].argmax().item() + 64 == hot


def test_planted_blocks_are_selected():
    n, D = 256, 16
    q, k = randn(4, 1, 1, n, D), randn(5, 1, 1, n, D) * 0.1
    k[0, 0, 64:128] += q[0, 0, 192:256].mean(0) * 5     # query block 3 wants key block 1
    index = build_sparse_index(q, k, [HP("block_sparse", topk=3)])
    assert index.blocks[0, 0, 3].tolist() == [0, 1, 3]  # forced 0 and diagonal, plus block 1
    assert index.block_count[0, 0].tolist() == [1, 2, 3, 3]


def test_merge_offsets_and_covered_table():
    offs = torch.tensor([[0, 1, 2, 66, 200, 264, 329, SENTINEL]], dtype=torch.int32)
    lo, hi = merge_offsets(offs)
    assert lo[0, :4].tolist() == [0, 200, 329, SENTINEL] and hi[0, :3].tolist() == [66, 264, 329]
    n = 400
    cov = covered_table(lo, hi, n)[0]
    for d in range(-63, n):                     # d = m0 - j covered iff s_lo - 63 <= d <= s_hi
        want = any(a - 63 <= d <= b for a, b in [(0, 66), (200, 264), (329, 329)])
        assert bool(cov[d + 63]) == want, d


def brute_force_vs_mask(n, prefix, columns, offsets):
    """Rectangle semantics straight from the definition: each selected offset s covers keys
    [m0 - s, m0 + 63 - s] of query block m0."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        m0 = i // 64 * 64
        for j in range(i + 1):
            hit = j < prefix or j in columns or any(m0 - s <= j <= m0 + 63 - s for s in offsets)
            mask[i, j] = hit
    return mask


def test_masks_follow_definitions():
    n, D = 150, 16
    q, k = randn(6, 1, 3, n, D), randn(7, 1, 3, n, D)
    heads = [HP("a_shape", sink=5, local=17), HP("vertical_slash", vertical=67, slash=70),
             HP("block_sparse", topk=2)]
    index = build_sparse_index(q, k, heads)
    ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    a_shape = (jj <= ii) & ((jj < 5) | (ii - jj < 17))
    assert torch.equal(head_selection_mask(index, 0)[0], a_shape)
    cols = [c for c in index.columns[0, 1].tolist() if c < SENTINEL]
    offs = [s for s in index.offsets[0, 1].tolist() if s < SENTINEL]
    assert len(cols) == 3 and len(offs) == 70
    assert torch.equal(head_selection_mask(index, 1)[0], brute_force_vs_mask(n, 64, cols, offs))
    blocks = index.blocks[0, 2]
    want = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            m = i // 64
            want[i, j] = (j // 64) in blocks[m, :index.block_count[0, 2, m]].tolist()
    assert torch.equal(head_selection_mask(index, 2)[0], want)


def test_conversion_covers_selection_exactly_with_padding():
    """Kernel-side visit counts equal the mask: nothing twice, nothing missing."""
    B, Hq, Hkv, n, D = 2, 4, 1, 200, 16
    q, k, v = randn(8, B, Hq, n, D), randn(9, B, Hkv, n, D), randn(10, B, Hkv, n, D)
    heads = [HP("vertical_slash", vertical=80, slash=90), HP("vertical_slash", vertical=64, slash=64),
             HP("a_shape", sink=64, local=65), HP("block_sparse", topk=2)]
    start, length = torch.tensor([0, 33], dtype=torch.int32), torch.tensor([131, 167], dtype=torch.int32)
    index = build_sparse_index(q, k, heads, seq_start=start, seq_len=length)
    visits = count_visited_pairs(q, k, v, index)
    mask = selection_mask(q, k, heads, start, length)
    assert visits.max() == 1 and torch.equal(visits.bool(), mask)


def test_density_from_index_matches_mask():
    B, Hq, n, D = 2, 4, 191, 16
    q, k = randn(11, B, Hq, n, D), randn(12, B, 2, n, D)
    heads = [HP("dense"), HP("a_shape", sink=4, local=32), HP("vertical_slash", vertical=70, slash=66),
             HP("block_sparse", topk=1)]
    start, length = torch.tensor([0, 50], dtype=torch.int32), torch.tensor([191, 120], dtype=torch.int32)
    dens = selection_density(q, k, heads, start, length)
    mask = selection_mask(q, k, heads, start, length)
    causal = (length.double() * (length.double() + 1) / 2)[:, None]
    assert torch.allclose(dens, mask.sum((2, 3)).double() / causal)
    assert torch.allclose(dens[:, 0], torch.ones(B, dtype=torch.float64))


def test_explicit_vertical_slash_selection():
    """A given (keys, offsets) selection, with duplicates and forced entries, drives the index."""
    n, D = 191, 16
    q, k, v = randn(13, 1, 2, n, D), randn(14, 1, 1, n, D), randn(15, 1, 1, n, D)
    heads = [HP("vertical_slash", vertical=70, slash=70), HP("a_shape", sink=3, local=9)]
    keys = torch.tensor([[[0, 5, 100, 100, 150, 70], [0] * 6]])
    offs = torch.tensor([[[0, 1, 1, 120, 190, 3], [0] * 6]])
    index = build_sparse_index(q, k, heads, vs_selection=(keys, offs))
    assert index.columns[0, 0, :3].tolist() == [70, 100, 150]
    assert index.offsets[0, 0, :5].tolist() == [0, 1, 3, 120, 190]
    visits = count_visited_pairs(q, k, v, index)
    masks = torch.stack([head_selection_mask(index, h) for h in range(2)], 1)
    assert visits.max() == 1 and torch.equal(visits.bool(), masks)
