"""Cheap attention-density counts for CPU runs of the harness.

:func:`mi_compile.sparse.selection_density` on the CPU sums each head's ``[B, n, n]`` selection
mask. For per-block patterns (vertical-slash, block-sparse) the selection of a query row depends only on
its 64-row query block (plus causality), so the number of selected pairs follows from one
running count per block row, with no ``n x n`` tensor: :func:`fast_density` returns the same
numbers (tests/test_eval.py checks it for every pattern kind) about 100x faster at 4K tokens.
"""
from __future__ import annotations

import torch

from mi_compile.kernels.constants import BLOCK
from mi_compile.patterns.index import SparseIndex, block_rows, head_selection_mask
from mi_compile.patterns.registry import get as pattern_spec

__all__ = ["fast_density", "head_pairs", "is_unpadded"]


def is_unpadded(index: SparseIndex) -> bool:
    return bool((index.seq_start == 0).all()) and bool((index.seq_len == index.n).all())


def _block_rows(index: SparseIndex, h: int):
    """bool ``[B, nqb, n]``: the (non-causal) selection of each 64-row query block, for
    per-block patterns (vertical-slash, block-sparse: rows within a block select the same keys)."""
    n, B = index.n, index.seq_start.shape[0]
    dev = index.seq_start.device
    i_blk = torch.arange(0, n, BLOCK, device=dev)[None, :, None].expand(B, -1, 1)   # block starts
    j = torch.arange(n, device=dev)[None, None, :].expand(B, 1, n)
    return block_rows(index, h, i_blk, j)


def head_pairs(index: SparseIndex, h: int) -> torch.Tensor:
    """int64 ``[B]``: the number of (query, key) pairs ``head_selection_mask(index, h)`` selects,
    without building it for vertical-slash / block-sparse heads (a running count per block row)."""
    n = index.n
    spec = pattern_spec(index.heads[h].kind)
    if not is_unpadded(index) or not (spec.full or spec.per_block):
        return head_selection_mask(index, h).sum((1, 2))
    B = index.seq_start.shape[0]
    if spec.full:
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
