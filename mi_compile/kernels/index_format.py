"""The sparse index format: one structure that drives one kernel launch for all heads.

Every head, whatever its pattern, is described to the kernel by the same tables (sequence
coordinates; ``NQB = ceil(n / 64)`` query blocks of 64 rows; ``B`` inputs, ``H`` query heads):

``prefix [H]``
    keys ``[0, prefix)`` are visited for every query block (dense: all keys; A-shape: the
    sinks; vertical-slash: the forced first ``min(V, 64)`` columns).
``sink [H]``, ``band [H]``
    exact per-element test ``j < sink or i - j < band`` (A-shape; other patterns have
    ``sink = 0`` and a band wider than any sequence), always combined with ``j <= i``.
``last [H]``
    dense rows at the end (tri-shape, and the optional ``last`` of vertical-slash and
    block-sparse heads; else 0): query block ``m`` of input ``b``
    is dense iff ``last > 0`` and ``m0 + 64 > seq_len[b] - last``; the kernel then visits
    ``[0, m0)`` as its prefix and the diagonal tile without the band test, and none of the
    group / block / column ranges below (so no pair twice).
``group_lo / group_hi [B, H, G]``, ``groups_upto [B, H, NQB]``
    merged slash groups ``[s_lo, s_hi]`` ascending by ``s_lo``: query block ``m0`` visits keys
    ``[max(m0 - s_hi, prefix), m0 + 63 - s_lo]``; only the first ``groups_upto[m]`` groups
    reach block ``m`` (``s_lo <= m0 + 63``). Vertical-slash groups come from the selected
    offsets; A-shape has the single group ``[0, local - 1]``.
``tile_start / tile_end [B, H, T]``, ``tiles_upto [B, H, NQB]``
    the groups' intervals below the diagonal pre-cut into tiles of <= 64 keys, relative to
    ``m0``: tile ``t`` is keys ``[max(m0 + tile_start, prefix), m0 + tile_end)``; sorted so that
    block ``m`` walks exactly the first ``tiles_upto[m]`` (those reaching past the prefix) in
    one flat loop (see :func:`group_tiles`).
``columns [B, H, V]``, ``columns_upto [B, H, NQB]``
    ascending extra key columns (vertical-slash); block ``m`` visits the first
    ``columns_upto[m]`` of them (``j < m0``; columns in ``[m0, m0 + 64)`` belong to the
    diagonal tile) ...
``covered [B, H, n + 64]`` (uint8)
    ... skipping column ``j`` where ``covered[m0 - j + 63]``: some group interval already
    holds it for that block. Built once per head from the groups, O(n).
``blocks [B, H, NQB, K]``, ``block_count [B, H, NQB]``
    64-aligned key blocks per query block (block-sparse).

The raw selection (``offsets``: the selected slash offsets) is kept for the reference mask,
which is built from the pattern definitions, not from the tables above; tests compare the two.
The kernel visits every range only strictly below the query block (keys ``< m0``) and then
one *diagonal tile* ``[m0, m0 + 64)`` with the exact element test: every pattern selects all of
it (causally): dense, A-shape (band test), vertical-slash (offset 0 is always kept) and
block-sparse (the diagonal block is always kept).

Chunks (``q_len < n``: a prefill that continues a cache): the tables stay those of the whole
sequence over the ``n`` keys (sequence coordinates, ``NQB = ceil(n / 64)``), and only the rows
of the chunk are computed. Query row ``r`` of the chunk is key position ``n - q_len + r`` (bottom-
right aligned causal), i.e. sequence position ``seq_len[b] - q_len + r``: every input's real
range must end at ``n`` (left padding only), rows before ``seq_start`` see no key. Estimates
read the chunk's queries only (vertical-slash: its last ``min(64, q_len)`` rows; block-sparse:
pooled query blocks of the rows present in the chunk; xattention: the antidiagonals of the rows
present in the chunk; flex_prefill: both), so only the rows of the blocks that overlap the
chunk are meaningful (xattention and flex_prefill leave the blocks before it empty).

The builders live in :mod:`mi_compile.patterns.index` (PyTorch, the CPU path and reference) and
:mod:`mi_compile.kernels.index_tables` (two fused launches on CUDA, the same tables bit for bit).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .constants import BLOCK

# Per-head rows of ``IndexPlan.meta`` read by the fused table builder: kind (``KIND_*`` of
# :mod:`mi_compile.kernels.constants`, each pattern's ``kernel_kind``), prefix, param a, param b,
# row in its vertical-slash group, block-sparse row, vertical-slash group, heads in that group.
META_WIDTH = 8



def dense_last_block(block_start, seq_len, last):
    """The ``last`` rule of the format (tensors or ints, broadcast): the 64-row query block
    starting at ``block_start`` of a sequence of ``seq_len`` tokens is dense when it holds one of
    the sequence's last ``last`` queries (``last > 0``)."""
    return (last > 0) & (block_start + BLOCK > seq_len - last)

@dataclasses.dataclass
class SparseIndex:
    """Everything the kernel reads (see the module docstring for each table)."""

    heads: tuple
    n: int
    seq_start: torch.Tensor
    seq_len: torch.Tensor
    prefix: torch.Tensor
    sink: torch.Tensor
    band: torch.Tensor
    last: torch.Tensor
    group_lo: torch.Tensor
    group_hi: torch.Tensor
    groups_upto: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    tiles_upto: torch.Tensor
    columns: torch.Tensor
    columns_upto: torch.Tensor
    covered: torch.Tensor
    blocks: torch.Tensor
    block_count: torch.Tensor
    offsets: torch.Tensor
    #: query rows (``<= n``; None: ``n``, a whole prefill); fewer: a chunk ending at key ``n``
    q_len: int | None = None
    #: the largest entry of ``last`` (host side, from the heads); None: unknown
    max_last: int | None = None

    @property
    def num_queries(self) -> int:
        """The query rows the index drives: ``q_len``, or ``n`` for a whole prefill."""
        return self.n if self.q_len is None else self.q_len

    @property
    def q_offset(self) -> int:
        """Key position of query row 0: ``n - num_queries`` (0 for a whole prefill)."""
        return self.n - self.num_queries

    @property
    def num_query_blocks(self) -> int:
        return math.ceil(self.n / BLOCK)

    @property
    def shape(self) -> tuple:
        """``(B, H, NQB)``: inputs, query heads, 64-row query blocks."""
        return (int(self.seq_start.shape[0]), len(self.heads), self.num_query_blocks)
