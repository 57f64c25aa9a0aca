"""Cheap attention-density counts for CPU runs of the harness.

:func:`mi_compile.sparse.selection_density` on the CPU sums each head's ``[B, n, n]`` selection
mask. For vertical-slash and block-sparse heads the selection of a query row depends only on
its 64-row query block (plus causality), so the number of selected pairs follows from one
running count per block row, with no ``n x n`` tensor: :func:`fast_density` returns the same
numbers (tests/test_eval.py checks it for every pattern kind) about 100x faster at 4K tokens.
"""
from __future__ import annotations

import torch

from mi_compile.patterns import a_shape, block_sparse, vertical_slash
from mi_compile.patterns.index import BLOCK, SparseIndex, head_selection_mask

__all__ = ["fast_density", "head_pairs", "is_unpadded"]


def is_unpadded(index: SparseIndex) -> bool:
    return bool((index.seq_start == 0).all()) and bool((index.seq_len == index.n).all())


def _block_rows(index: SparseIndex, h: int):
    """bool ``[B, nqb, n]``: the (non-causal) selection of each 64-row query block, for
    vertical-slash and block-sparse heads (whose rows within a block select the same keys)."""
    n, B = index.n, index.seq_start.shape[0]
    dev = index.seq_start.device
    head = index.heads[h]
    i_blk = torch.arange(0, n, BLOCK, device=dev)[None, :, None].expand(B, -1, 1)   # block starts
    j = torch.arange(n, device=dev)[None, None, :].expand(B, 1, n)
    if head.kind == "vertical_slash":
        prefix = min(head.vertical, vertical_slash.FORCED)
        return vertical_slash.vertical_slash_mask(i_blk, j, prefix, index.columns[:, h], index.offsets[:, h], n)
    return block_sparse.block_sparse_mask(i_blk, j, index.blocks[:, h], index.block_count[:, h])



def head_pairs(index: SparseIndex, h: int) -> torch.Tensor:
    """int64 ``[B]``: the number of (query, key) pairs ``head_selection_mask(index, h)`` selects,
    without building it for vertical-slash / block-sparse heads (a running count per block row)."""
    n = index.n
    head = index.heads[h]
    if not is_unpadded(index) or head.kind == "a_shape":
        return head_selection_mask(index, h).sum((1, 2))
    B = index.seq_start.shape[0]
    if head.kind == "dense":
        return torch.full((B,), n * (n + 1) // 2, dtype=torch.int64, device=index.seq_start.device)
    t = torch.arange(n, device=index.seq_start.device)
    counts = _block_rows(index, h).cumsum(-1)                              # [B, nqb, n]: keys <= j
    return counts[:, t // BLOCK, t].sum(-1)                                 # row i: keys <= i of its block


def fast_density(q, k, heads, *, scale=None) -> torch.Tensor:
    """float64 ``[B, Hq]``, as :func:`mi_compile.sparse.selection_density` (unpadded inputs)."""
    from mi_compile.sparse import build_sparse_index

    index = build_sparse_index(q, k, heads, scale=scale)
    n = index.n
    pairs = torch.stack([head_pairs(index, h) for h in range(len(index.heads))], 1)
    return pairs.double() / (n * (n + 1) / 2)
