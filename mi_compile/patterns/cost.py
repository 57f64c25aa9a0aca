"""What a launch computes: the tiles the kernel walks for an index, counted from the tables.

A pattern's *nominal* size (``vertical=1000, slash=6096``: about 11% of the causal square at
128K) is not what the kernel pays for. The kernel works in tiles: every visited tile costs its
whole ``rows x keys`` rectangle, masked elements included, and an isolated slash offset costs
a full 64-key tile per query block. The *computed density* counts that:

    computed_density[b, h] = (pairs of all visited tiles of head h in sequence b)
                             / (pairs of the tiles a dense head visits in sequence b)

so dense is exactly 1, a budget expressed in computed density is a share of dense's kernel
work, and at long lengths it is the share of the causal square computed (dense's whole
diagonal tiles add only 64 / n).

Per 64-row query block ``m`` (``m0 = 64 m < len``) the general kernel
(:mod:`mi_compile.kernels.sparse_attention`) visits, with ``bn`` / ``bc`` its prefix / column
tile widths (``KERNEL_CONFIG``):

* ``ceil(min(prefix, m0) / bn)`` prefix tiles of ``bn`` keys;
* ``tiles_upto[m]`` slash-group tiles of 64 keys;
* ``block_count[m] - 1`` block-sparse tiles (the diagonal block is the diagonal tile);
* ``ceil(columns_upto[m] / bc)`` column tiles of ``bc`` gathered keys (covered columns are
  masked, not skipped);
* the diagonal tile of 64 keys.

A block that the ``last`` table makes dense (tri-shape: ``last > 0`` and ``m0 + 64 > len -
last``) counts as a dense head's block: ``ceil(m0 / bn)`` prefix tiles and the diagonal tile.

Everything is read from the :class:`~mi_compile.kernels.index_format.SparseIndex` tables, O(B H n/64),
on their device; the kernel's counting mode 3 walks the same loops and the tests compare the
two. Layers whose heads are all dense / A-shape may run in the 128-row kernel, whose diagonal
costs a little more; the count stays the 64-row kernel's.
"""
from __future__ import annotations

import torch

from ..kernels.constants import BLOCK
from ..kernels.index_format import dense_last_block
from .index import SparseIndex


def _ceil_div(x: torch.Tensor, d: int) -> torch.Tensor:
    return (x + (d - 1)) // d


def _kernel_width(name: str, value: int | None) -> int:
    """``value``, or the kernel's configured tile width ``name`` (``block_n`` / ``block_c``)."""
    if value is not None:
        return value
    from ..kernels.sparse_attention import KERNEL_CONFIG
    return KERNEL_CONFIG[name]


def tile_pairs_per_block(index: SparseIndex, block_n: int | None = None,
                         block_c: int | None = None) -> torch.Tensor:
    """int64 ``[B, H, NQB]``: pairs of the tiles visited per 64-row query block (0 past the end,
    and, for a chunk, in the blocks before it)."""
    block_n, block_c = _kernel_width("block_n", block_n), _kernel_width("block_c", block_c)
    nqb = index.num_query_blocks
    dev = index.prefix.device
    m0 = torch.arange(nqb, device=dev, dtype=torch.int64) * BLOCK                     # [NQB]
    prefix = index.prefix.long()[None, :, None]                                       # [1, H, 1]
    last = index.last.long()[None, :, None]
    dense = dense_last_block(m0[None, None, :], index.seq_len.long()[:, None, None], last)   # [B, H, NQB]
    prefix = torch.where(dense, m0[None, None, :], prefix)
    prefix_keys = _ceil_div(torch.minimum(prefix, m0[None, None, :]), block_n) * block_n
    group_keys = index.tiles_upto.long().masked_fill(dense, 0) * BLOCK
    block_keys = (index.block_count.long() - 1).clamp(min=0).masked_fill(dense, 0) * BLOCK
    column_keys = _ceil_div(index.columns_upto.long().masked_fill(dense, 0), block_c) * block_c
    keys = prefix_keys + group_keys + block_keys + column_keys + BLOCK                # [B, H, NQB]
    live = m0[None, :] < index.seq_len.long()[:, None]                                 # [B, NQB]
    if index.q_offset:      # a chunk: only the blocks holding its rows (sequence positions)
        live &= m0[None, :] + BLOCK > index.q_offset - index.seq_start.long()[:, None]
    return keys * BLOCK * live[:, None, :]


def computed_pairs(index: SparseIndex) -> torch.Tensor:
    """int64 ``[B, H]``: pairs of every tile the kernel visits, per sequence and head."""
    return tile_pairs_per_block(index).sum(-1)


def dense_pairs(seq_len: torch.Tensor, block_n: int | None = None) -> torch.Tensor:
    """int64 ``[B]``: pairs of the tiles a dense head visits for sequences of ``seq_len``
    tokens (every prefix tile below each 64-row block, plus its diagonal tile)."""
    block_n = _kernel_width("block_n", block_n)
    length = seq_len.long()
    nqb = _ceil_div(length, BLOCK)
    top = int(nqb.max()) if nqb.numel() else 0
    m0 = torch.arange(top, device=length.device, dtype=torch.int64) * BLOCK
    keys = _ceil_div(m0, block_n) * block_n + BLOCK
    live = m0[None, :] < length[:, None]
    return (keys[None, :] * live).sum(-1) * BLOCK


def computed_density(index: SparseIndex) -> torch.Tensor:
    """float64 ``[B, H]``: :func:`computed_pairs` over what a dense head computes (dense = 1)."""
    return computed_pairs(index).double() / dense_pairs(index.seq_len).double().clamp(min=1)[:, None]
