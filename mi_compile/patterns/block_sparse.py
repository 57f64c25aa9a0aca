"""Block-sparse heads: the top-k 64x64 blocks per query block (MInference section 3).

Parameters (``HeadPattern("block_sparse", topk=K)``): ``K`` key blocks per query block.

Selection, per input and head, in the sequence's own coordinates (first real token = 0,
``len`` real tokens, blocks of 64 tokens, the last block possibly partial):

1. mean-pool queries and keys over each 64-token block (a partial last block is averaged
   over its real tokens only; a chunk, ``q_len < kv_len``, has only its own queries: the
   selection is for the chunk's query blocks, a block partly before the chunk pools its
   present rows);
2. block score ``s[m, c] = scale * pooled_q[m] . pooled_k[c]`` for key blocks ``c <= m``
   (causal); key block ``m`` (the diagonal, score +inf) and key block 0 (score float32 max)
   are always kept (with ``K = 1`` only the diagonal);
3. keep the ``min(K, m + 1)`` highest-scoring key blocks of query block ``m``.

The kernel computes every element of every kept block, with element-level causal masking
(``j <= i``) in the diagonal block. ``K`` larger than the number of blocks is clipped
statically, so ``K >= ceil(n / 64)`` is dense causal attention.

Index part: ``blocks [B, H, NQB, K]`` (int32, ascending key-block ids, padded with
:data:`~mi_compile.patterns.index.SENTINEL`) and ``block_count [B, H, NQB]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..kernels._device import device_ints
from ..kernels.constants import BLOCK, KIND_BS, PHASE_BLOCK_SPARSE, SENTINEL
from .dense_last import DenseLastSpec
from .registry import PatternError, register
from .spec import HeadPattern

#: Search candidates: top-k key blocks as fractions of the number of query blocks, and absolute
#: block counts for long prompts (both rank 4).
BS_TOPK = (1 / 16, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2)
BS_TOPK_BLOCKS = (8, 16, 32, 64)
#: Pooling, block scores and top-k per head against the head's square at the kernel's pace
#: (PatternSpec.estimate_cost): the index build took 5.9 ms for 32 heads at 128K on the H100
#: (the kernel benchmark), ~0.18 ms a head against ~14 ms for a head's whole square.
BS_ESTIMATE_COST = 0.013


def _chunk_size(per_head_bytes: int, budget: int = 1 << 28) -> int:
    return max(1, budget // max(1, per_head_bytes))


def pooled_blocks(x: torch.Tensor, seq_start: torch.Tensor, seq_len: torch.Tensor,
                  num_blocks: int, unpadded: bool = False, row_offset: int = 0) -> torch.Tensor:
    """Mean of each 64-token block of every sequence, float32 ``[B, H, num_blocks, D]``.

    ``x`` is ``[B, H, n, D]`` in tensor coordinates; sequence ``b``'s token ``t`` is row
    ``seq_start[b] + t - row_offset``. Rows past the sequence's end do not count, nor (a chunk
    of queries, ``row_offset = kv_len - q_len``) tokens before the tensor's first row: a block
    partly before the chunk pools its present rows, one wholly before it is 0. Works on chunks
    of heads so the float32 temporaries stay bounded (O(n) per head).

    ``unpadded=True`` (the caller knows ``seq_start = 0`` and ``seq_len = n + row_offset`` for
    every input): pool by a reshape of the tensor itself, reading ``x`` once with float32
    accumulation and no gathered float32 copy.
    """
    B, H, n, D = x.shape
    if unpadded and row_offset:
        # the chunk's rows are positions [row_offset, row_offset + n): shift them onto the
        # 64-token grid with zero rows in front, pool the blocks from the chunk's first one
        lead, first = row_offset % BLOCK, row_offset // BLOCK
        blocks = num_blocks - first
        padded = torch.nn.functional.pad(x, (0, 0, lead, blocks * BLOCK - lead - n))
        pos = torch.arange(blocks * BLOCK, device=x.device)
        counts = ((pos >= lead) & (pos < lead + n)).view(blocks, BLOCK).sum(-1).clamp(min=1)
        out = torch.zeros(B, H, num_blocks, D, device=x.device, dtype=torch.float32)
        torch.sum(padded.view(B, H, blocks, BLOCK, D), 3, dtype=torch.float32, out=out[:, :, first:])
        out[:, :, first:].div_(counts[:, None].float())
        return out
    if unpadded and n == num_blocks * BLOCK:
        return x.reshape(B, H, num_blocks, BLOCK, D).sum(3, dtype=torch.float32).div_(BLOCK)
    if unpadded:
        full = n // BLOCK
        out = torch.empty(B, H, num_blocks, D, device=x.device, dtype=torch.float32)
        if full:
            body = x[:, :, :full * BLOCK].reshape(B, H, full, BLOCK, D)
            torch.sum(body, 3, dtype=torch.float32, out=out[:, :, :full])
            out[:, :, :full].div_(BLOCK)
        if full < num_blocks:
            out[:, :, full] = x[:, :, full * BLOCK:].sum(2, dtype=torch.float32) / (n - full * BLOCK)
        return out
    pos = torch.arange(num_blocks * BLOCK, device=x.device)
    rows = seq_start.long()[:, None] + pos[None, :] - row_offset              # [B, nb*64]
    real = (pos[None, :] < seq_len.long()[:, None]) & (rows >= 0) & (rows < n)   # [B, nb*64]
    rows = rows.clamp(0, n - 1)
    counts = real.view(B, num_blocks, BLOCK).sum(-1).clamp(min=1).float()     # [B, nb]
    out = torch.empty(B, H, num_blocks, D, device=x.device, dtype=torch.float32)
    step = _chunk_size(B * num_blocks * BLOCK * D * 4)
    for h0 in range(0, H, step):
        xs = x[:, h0:h0 + step]
        hc = xs.shape[1]
        gathered = xs.gather(2, rows[:, None, :, None].expand(B, hc, rows.shape[1], D)).float()
        gathered = gathered * real[:, None, :, None]
        out[:, h0:h0 + hc] = gathered.view(B, hc, num_blocks, BLOCK, D).sum(3) / counts[:, None, :, None]
    return out


def topk_chunks(num_heads: int, batch: int, nqb: int) -> list[tuple[int, int]]:
    """Head ranges ``[p0, p1)`` scored together (their float32 scores stay within ~256 MiB)."""
    step = _chunk_size(batch * nqb * nqb * 4 * 3)
    return [(p0, min(p0 + step, num_heads)) for p0 in range(0, num_heads, step)]


def layer_geometry(q: torch.Tensor, k: torch.Tensor):
    """``(B, Hq, nq, D, n, group, NQB)`` of a layer's q ``[B, Hq, nq, D]`` and k ``[B, Hkv, n, D]``:
    ``group`` query heads per KV head, ``NQB`` blocks of ``BLOCK`` keys."""
    B, Hq, nq, D = q.shape
    n = k.shape[2]
    return B, Hq, nq, D, n, Hq // k.shape[1], math.ceil(n / BLOCK)


def chunk_rows(seq_start: torch.Tensor, n: int, nq: int):
    """The query blocks that can hold a chunk's rows (``nq < n`` queries ending at key ``n``):
    ``rows`` int64 ``[B, R]``, ``R = min(ceil(nq / 64) + 1, NQB)`` (static), ascending and
    distinct, from the chunk's first block ``(n - nq - seq_start) // 64`` (0 when the chunk
    starts before the sequence), moved back to ``NQB - R`` near the end; ``held`` bool ``[B, R]``:
    the row is at or after the chunk's first block (rows past the sequence's end are the
    callers' ``live`` rows). No host synchronisation."""
    nqb = math.ceil(n / BLOCK)
    R = min(-(-nq // BLOCK) + 1, nqb)
    first = ((n - nq) - seq_start.long()).clamp(min=0) // BLOCK                 # [B]
    rows = first.clamp(max=nqb - R)[:, None] + torch.arange(R, device=seq_start.device)[None, :]
    return rows, rows >= first[:, None]


def topk_raw(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], topks: Sequence[int],
             seq_start: torch.Tensor, seq_len: torch.Tensor, scale: float, unpadded: bool):
    """The scoring and top-k step of :func:`select_blocks`.

    Heads are scored in :func:`topk_chunks`; chunk ``[p0, p1)`` takes the ``topk`` of its
    forced block scores at its largest ``K``, best first, into ``values / indices[:, p0:p1, :,
    :K]`` (float32 / int64 ``[B, len(head_ids), NQB, Kmax]``). Returns ``(values, indices)``
    and each chunk's ``K``. What stays to be done per head (keep ranks ``< K_h``, finite scores
    and live rows, sort) is :func:`select_blocks`' and the GPU table builder's.

    A chunk (q shorter than k) scores only the :func:`chunk_rows` query blocks (``R x NQB``
    scores per head, not ``NQB x NQB``): those rows get the whole scoring's top-k, every other
    row (and a row wholly before the chunk) ``-inf`` values (index 0), so it selects nothing.
    """
    nqb = math.ceil(k.shape[2] / BLOCK)
    chunks = topk_chunks(len(head_ids), q.shape[0], nqb)
    kmax = max(min(t, nqb) for t in topks)
    chunk = q.shape[2] < k.shape[2]
    if len(chunks) == 1 and not chunk:
        return _topk_into(q, k, head_ids, topks, seq_start, seq_len, scale, unpadded, None, chunks)
    shape = (q.shape[0], len(head_ids), nqb, kmax)
    if chunk:
        values = torch.full(shape, float("-inf"), device=q.device, dtype=torch.float32)
        indices = torch.zeros(shape, device=q.device, dtype=torch.int64)
    else:
        values = torch.empty(shape, device=q.device, dtype=torch.float32)
        indices = torch.empty(shape, device=q.device, dtype=torch.int64)
    return _topk_into(q, k, head_ids, topks, seq_start, seq_len, scale, unpadded, (values, indices), chunks)


def _topk_into(q, k, head_ids, topks, seq_start, seq_len, scale, unpadded, out, chunks):
    B, Hq, nq, D = q.shape
    n = k.shape[2]
    group = Hq // k.shape[1]
    nqb = math.ceil(n / BLOCK)
    dev = q.device
    pooled_k = pooled_blocks(k, seq_start, seq_len, nqb, unpadded)            # [B, Hkv, nqb, D]
    if nq < n:      # a chunk: only the query blocks that can hold its rows
        rows, held = chunk_rows(seq_start, n, nq)                            # [B, R]
        R = rows.shape[1]
        # per row: key blocks after the row's block, and every block of a row before the chunk
        upper = (torch.arange(nqb, device=dev)[None, None, :] > rows[:, :, None]) | ~held[:, :, None]
        upper = upper[:, None]                                               # [B, 1, R, nqb]
    else:
        rows, R = None, nqb
        # key blocks above the diagonal can never be chosen
        upper = torch.ones(nqb, nqb, dtype=torch.bool, device=dev).triu_(1)
    widths = []
    for p0, p1 in chunks:
        ids = list(head_ids[p0:p1])
        if ids == list(range(ids[0], ids[0] + len(ids))):
            q_chunk = q[:, ids[0]:ids[0] + len(ids)]                         # no copy
        else:
            q_chunk = q.index_select(1, device_ints(ids, dev))
        pooled_q = pooled_blocks(q_chunk, seq_start, seq_len, nqb, unpadded, n - nq)   # [B, c, nqb, D]
        kv_ids = device_ints([h // group for h in ids], dev)
        c = len(ids)
        if rows is not None:
            pooled_q = pooled_q.gather(2, rows[:, None, :, None].expand(B, c, R, D))   # [B, c, R, D]
        # torch.matmul's own bmm on the same layouts (same result), in fewer dispatches
        scores = torch.bmm(pooled_q.reshape(B * c, R, D),
                           pooled_k.index_select(1, kv_ids).view(B * c, nqb, D).transpose(1, 2)).view(B, c, R, nqb)
        if scale <= 0:          # a positive scale does not change the ranking
            scores = scores * scale
        # non-causal -inf, key block 0 float32 max, the diagonal +inf (it wins even at K = 1)
        if rows is None:
            scores.masked_fill_(upper, float("-inf"))
            scores[..., 0].fill_(torch.finfo(torch.float32).max)
            scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
        else:
            scores[..., 0].fill_(torch.finfo(torch.float32).max)
            scores.scatter_(-1, rows[:, None, :, None].expand(B, c, R, 1), float("inf"))
            scores.masked_fill_(upper, float("-inf"))         # rows before the chunk: nothing
        # one top-k for the chunk at its largest K; heads with a smaller K keep a prefix of it
        width = max(min(t, nqb) for t in topks[p0:p1])
        widths.append(width)
        if out is None:                  # one chunk: its top-k is the whole result
            return torch.topk(scores, width, dim=-1), widths
        if rows is None:
            torch.topk(scores, width, dim=-1, out=(out[0][:, p0:p1, :, :width], out[1][:, p0:p1, :, :width]))
        else:
            val, idx = torch.topk(scores, width, dim=-1)                     # [B, c, R, width]
            at = rows[:, None, :, None].expand(B, c, R, width)
            out[0][:, p0:p1, :, :width].scatter_(2, at, val)
            out[1][:, p0:p1, :, :width].scatter_(2, at, idx)
    return out, widths


def select_blocks(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], topks: Sequence[int],
                  seq_start: torch.Tensor, seq_len: torch.Tensor, scale: float,
                  unpadded: bool = False):
    """Top-k key blocks for the query heads ``head_ids`` (each with its own ``topk``).

    ``unpadded``: every input is known to span the whole tensor (see :func:`pooled_blocks`).
    Returns ``blocks [B, len(head_ids), NQB, Kmax]`` (int32, ascending, SENTINEL-padded) and
    ``block_count [B, len(head_ids), NQB]`` (int32). No host synchronisation.
    """
    B, n = q.shape[0], k.shape[2]
    nqb = math.ceil(n / BLOCK)
    dev = q.device
    kmax = max(min(t, nqb) for t in topks)
    (values, indices), widths = topk_raw(q, k, head_ids, topks, seq_start, seq_len, scale, unpadded)
    blocks = torch.full((B, len(head_ids), nqb, kmax), SENTINEL, device=dev, dtype=torch.int32)
    counts = torch.empty(B, len(head_ids), nqb, device=dev, dtype=torch.int32)
    blocks_in_seq = (seq_len.long() + BLOCK - 1) // BLOCK                      # [B]
    live_rows = torch.arange(nqb, device=dev)[None, :] < blocks_in_seq[:, None]   # [B, m]
    for (p0, p1), width in zip(topk_chunks(len(head_ids), B, nqb), widths):
        val, idx = values[:, p0:p1, :, :width], indices[:, p0:p1, :, :width]
        ks = [min(t, nqb) for t in topks[p0:p1]]
        rank_ok = torch.arange(width, device=dev) < device_ints(ks, dev)[:, None, None]
        keep = (val > float("-inf")) & live_rows[:, None, :, None] & rank_ok
        blocks[:, p0:p1, :, :width] = torch.where(keep, idx, SENTINEL).to(torch.int32).sort(-1).values
        counts[:, p0:p1] = keep.sum(-1).to(torch.int32)
    return blocks, counts


def block_sparse_mask(i: torch.Tensor, j: torch.Tensor, blocks: torch.Tensor,
                      block_count: torch.Tensor) -> torch.Tensor:
    """Reference selection for one head: ``i`` ``[B, n, 1]``, ``j`` ``[B, 1, n]`` sequence
    positions (any value; the caller applies causality and bounds); ``blocks [B, NQB, K]``,
    ``block_count [B, NQB]``. True where key block ``j // 64`` is kept for query block ``i // 64``.
    """
    B, nqb, kk = blocks.shape
    kept = torch.arange(kk, device=blocks.device)[None, None, :] < block_count[..., None]
    table = torch.zeros(B, nqb, nqb + 1, dtype=torch.bool, device=blocks.device)
    table.scatter_(2, torch.where(kept, blocks.long().clamp(max=nqb), nqb), True)
    table[..., nqb] = False
    qi = (i // BLOCK).clamp(0, nqb - 1)
    kj = (j // BLOCK).clamp(0, nqb)
    n_i, n_j = i.shape[1], j.shape[2]
    flat = (qi * (nqb + 1) + kj).expand(B, n_i, n_j).reshape(B, -1)
    return table.view(B, -1).gather(1, flat).view(B, n_i, n_j)


def blocks_mask_of(index, h, block_starts, j) -> torch.Tensor:
    """:meth:`PatternSpec.block_mask` of a head whose selection is its rows of ``index.blocks``
    / ``index.block_count`` (block-sparse, xattention, flex-prefill's query-aware part)."""
    blocks, counts = index.blocks[:, h], index.block_count[:, h]
    nqb = blocks.shape[-2]
    out = block_sparse_mask(block_starts, j, blocks.reshape(-1, nqb, blocks.shape[-1]), counts.reshape(-1, nqb))
    return out.view(counts.shape[:-1] + out.shape[1:])


class BlockSparseSpec(DenseLastSpec):
    """``block_sparse(topk)``: per input, for each 64-query block the ``topk >= 1`` 64-key blocks
    with the highest mean-pooled score (causal; the diagonal block and block 0 always kept);
    optional ``last``: dense rows for the last queries (:mod:`~mi_compile.patterns.dense_last`).
    MInference's ``block_sparse`` entries are ``block_sparse(topk=vertical_size)``.
    """

    name = "block_sparse"
    code = 3
    params = ("topk", "last")
    kernel_kind = KIND_BS
    selection = PHASE_BLOCK_SPARSE
    color = "#59a14f"
    minference_names = ("block_sparse",)

    def validate(self, head) -> None:
        if head.topk < 1:
            raise PatternError("block_sparse needs topk >= 1")

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        return {"topk": vertical_size}     # MInference passes vertical_size as the block count

    def estimate_cost(self, head, n: int) -> float:
        return BS_ESTIMATE_COST

    def meta_params(self, head) -> tuple:
        return (head.topk, 0)

    def selection_params(self, head) -> tuple:
        return (head.topk,)

    def block_mask(self, head, index, h, block_starts, j):
        return blocks_mask_of(index, h, block_starts, j)

    def candidates(self, n: int) -> list:
        blocks = math.ceil(n / BLOCK)
        out = [(4, HeadPattern(self.name, topk=max(2, int(round(frac * blocks))))) for frac in BS_TOPK]
        return out + [(4, HeadPattern(self.name, topk=topk)) for topk in BS_TOPK_BLOCKS if topk < blocks]

    def label(self, head) -> str:
        return f"k{head.topk}"


SPEC = register(BlockSparseSpec())
