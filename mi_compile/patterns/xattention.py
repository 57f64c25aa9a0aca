"""XAttention heads: per input, the fewest 64x64 key blocks whose estimated attention mass
reaches a threshold, scored by antidiagonals (the XAttention idea, ICML 2025; own code).

Parameters (``HeadPattern("xattention", threshold=T, stride=S, max_blocks=K)``, all ints):
``T`` in ``1 .. 1000`` the cumulative mass to keep, per mille; ``S`` in ``{2, 4, 8, 16}`` the
antidiagonal sampling stride; ``K >= 1`` a cap on the kept blocks per query block, which is
also the static width of the head's ``blocks`` rows (``min(K, ceil(n / 64))``).

Estimate, per input and head, in the sequence's own coordinates (``len`` real tokens, tokens
past the end count as zero vectors):

1. cut queries and keys into cells of ``S`` consecutive tokens; strided query row ``u`` is
   queries ``uS .. uS + S - 1``, strided key column ``w`` keys ``wS .. wS + S - 1``;
2. the cell's antidiagonal logit ``z[u, w] = scale / S * sum_r q[uS + r] . k[wS + S - 1 - r]``
   (the mean of the ``S`` logits on the cell's antidiagonal: every row and every column of the
   cell is sampled once, so a vertical or a slash line crossing the cell is always seen);
3. causal softmax of ``z[u, :]`` over the existing cells ``w <= u`` (``wS < len``);
4. ``mass[m, c]``: the probabilities of the strided rows of query block ``m`` (those with
   ``uS < len``) falling in key block ``c``, divided by their number. So ``mass[m, :]`` is a
   distribution over the causal key blocks ``c <= m`` (summing to 1): a cheap proxy of
   query block ``m``'s attention mass per key block at ``1 / S`` of the dense scoring cost.

A chunk (``q_len < kv_len``, a prefill that continues a cache: query row ``r`` is sequence
position ``len - q_len + r``) scores its query blocks from its own rows: queries before the
chunk count as zero vectors (as tokens past the end), a strided row is live when it holds a
chunk row (``uS + S > len - q_len``) and exists (``uS < len``), and ``mass[m, :]`` averages
the live strided rows of block ``m``. So a block wholly in the chunk gets the whole prompt's
mass (its cells, their softmax over all keys, its rows: all the same), and a block cut by the
chunk's start the mass of the rows present; blocks wholly before the chunk hold no row and
select nothing (count 0).

Selection, per query block ``m`` of the sequence: order the causal key blocks by ``mass``
descending, the diagonal block ``m`` first and the sink block ``0`` second (always kept);
keep the shortest prefix of that order whose mass reaches ``T / 1000`` (``T = 1000``: every
causal block), then at most ``K`` of it (``K = 1``: the diagonal only). Kept blocks are
stored ascending (the diagonal last, as the kernel's block phase expects) with their count.

Where it runs: the estimate is one Triton launch on CUDA (:mod:`mi_compile.kernels.
xattention_estimate`, every head of the layer at once, native GQA), :func:`block_mass_torch`
on the CPU (the definition the kernel is tested against). The selection is PyTorch ops on
the device (sort, cumsum, compare; no host synchronisation). Memory: ``mass`` is float32
``[B, heads, NQB, NQB]`` (``n^2 / 4096`` per head, 16 MiB at 128K) and the sort adds ~5 times
that, so heads go in chunks of ~256 MiB (all of a layer's heads at once up to ~32K tokens; a
chunk sorts only the ``R`` rows of :func:`~mi_compile.patterns.block_sparse.chunk_rows`);
the torch estimate holds one head's ``[n / S, n / S]`` strided logits at a time. The static
width ``K = min(max_blocks, NQB)``: a cap, not all ``NQB``, because the kernel's ``blocks``
table is ``[B, H, NQB, K]`` int32 (``K = NQB`` is 16 MiB per head at 128K).

Index: the ``PHASE_BLOCK_SELECT`` phase (the pattern writes ``blocks`` / ``block_count``
itself; :meth:`XAttentionSpec.select_block_table`), driving the existing block-sparse phase of
the kernel. On CUDA the fused table builder writes every other head and leaves these heads'
block rows empty (``KIND_OTHER``); the builder then copies this selection into them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..kernels._device import device_ints
from ..kernels.dispatch import selection_impl
from ..kernels.constants import BLOCK, KIND_OTHER, PHASE_BLOCK_SELECT, SENTINEL
from .block_sparse import blocks_mask_of, chunk_rows, layer_geometry
from .registry import PatternError, PatternSpec, register
from .spec import HeadPattern

#: Strides the estimate takes (a strided row holds ``S`` tokens; 64 must be a multiple of S).
XA_STRIDES = (2, 4, 8, 16)
#: The estimate's cost per head against the sparse kernel's work, as a fraction of the causal
#: square (length-independent: both are O(n^2)). Its two passes do ``1 / stride`` of dense
#: attention's FLOPs at ~0.8x the kernel's pace; measured on the H100 at 128K (32 heads, the
#: kernel benchmark): 66.1 ms at stride 8 and 38.5 ms at stride 16 against ~441 ms for the whole
#: square at the kernel's 319 TFLOP/s, i.e. 0.15 and 0.087 (docs/kernels.md).
XA_ESTIMATE_COST = {8: 0.15, 16: 0.087}
XA_ESTIMATE_PACE = 1.2            # the other strides: PACE / stride
#: Search candidates: thresholds (per mille) at stride 8, with the block cap at all blocks.
XA_THRESHOLDS = (900, 950, 990)
XA_STRIDE = 8
#: Bytes of selection temporaries per chunk of heads (see the module docstring).
XA_CHUNK_BYTES = 1 << 28


def block_mass(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], seq_start: torch.Tensor,
               seq_len: torch.Tensor, scale: float, stride: int, impl: Optional[str] = None) -> torch.Tensor:
    """``mass [B, len(head_ids), NQB, NQB]`` (see the module docstring); ``impl``: ``"triton"``
    (the default on CUDA) or ``"torch"`` (elsewhere)."""
    impl = impl or selection_impl(q)
    if impl == "triton":
        from ..kernels.xattention_estimate import block_mass_triton
        return block_mass_triton(q, k, head_ids, seq_start, seq_len, scale, stride)
    if impl == "torch":
        return block_mass_torch(q, k, head_ids, seq_start, seq_len, scale, stride)
    raise ValueError(f"estimate impl must be 'triton' or 'torch', got {impl!r}")


def _sequence_rows(x: torch.Tensor, h: int, seq_start, seq_len, padded: int, row_offset: int = 0) -> torch.Tensor:
    """Head ``h`` of ``x`` in sequence coordinates, float32 ``[B, padded, D]``, zero past the end
    and (a chunk of queries, ``row_offset = kv_len - q_len``: token ``t`` is row ``start + t -
    row_offset``) before the tensor's first row."""
    B, _, n, D = x.shape
    pos = torch.arange(padded, device=x.device)
    rows = seq_start.long()[:, None] + pos[None, :] - row_offset
    real = (pos[None, :] < seq_len.long()[:, None]) & (rows >= 0) & (rows < n)
    rows = rows.clamp(0, n - 1)
    out = x[:, h].gather(1, rows[..., None].expand(B, padded, D)).float()
    return out * real[..., None]


def block_mass_torch(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], seq_start: torch.Tensor,
                     seq_len: torch.Tensor, scale: float, stride: int) -> torch.Tensor:
    """The XAttention estimate in PyTorch, float32 ``[B, len(head_ids), NQB, NQB]``: entry
    ``[b, h, m, c]`` is query block ``m``'s estimated mass in key block ``c`` (``c <= m``; 0
    above the diagonal, in blocks past the sequence end and, for a chunk (q shorter than k),
    in blocks before it). One head at a time."""
    B, Hq, nq, D, n, group, nqb = layer_geometry(q, k)
    dev = q.device
    S = stride
    cells = nqb * BLOCK // S                              # strided rows / columns
    per_block = BLOCK // S
    length = seq_len.long()
    u = torch.arange(cells, device=dev)
    cell_live = (u[None, :] * S) < length[:, None]                            # [B, cells]
    allowed = (u[None, None, :] <= u[None, :, None]) & cell_live[:, None, :]   # [B, u, w]
    first = chunk_first_position(seq_start, n, nq)                            # [B] (seq)
    row_live = cell_live & (u[None, :] * S + S > first[:, None])              # holds a chunk row
    rows_live = row_live.view(B, nqb, per_block).sum(-1).clamp(min=1).float()  # [B, nqb]
    out = torch.empty(B, len(head_ids), nqb, nqb, device=dev, dtype=torch.float32)
    for slot, h in enumerate(head_ids):
        qs = _sequence_rows(q, h, seq_start, seq_len, nqb * BLOCK, n - nq).view(B, cells, S * D)
        ks = _sequence_rows(k, h // group, seq_start, seq_len, nqb * BLOCK).view(B, cells, S, D)
        ks = ks.flip(2).reshape(B, cells, S * D)          # slot r holds key wS + S - 1 - r
        z = torch.matmul(qs, ks.transpose(1, 2)) * (scale / S)
        p = torch.softmax(z.masked_fill_(~allowed, float("-inf")), dim=-1)
        p = p * row_live[:, :, None]
        mass = p.view(B, nqb, per_block, nqb, per_block).sum((2, 4))
        out[:, slot] = mass / rows_live[:, :, None]
    return out


def chunk_first_position(seq_start: torch.Tensor, n: int, nq: int) -> torch.Tensor:
    """int64 ``[B]``: the sequence position of q's first row, ``n - nq - seq_start`` (a chunk of
    ``nq`` queries ending at key ``n``; ``<= 0`` for a whole prefill). Blocks ending at or
    before it hold no query row."""
    return (n - nq) - seq_start.long()


def select_from_mass(mass: torch.Tensor, thresholds: Sequence[int], widths: Sequence[int],
                     seq_len: torch.Tensor, minimum: Optional[Sequence[int]] = None,
                     first_position: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None):
    """Blocks and counts from ``mass [B, Hs, NQB, NQB]`` (one ``threshold`` per mille and one
    width ``K`` per head slot): per query block the fewest key blocks, diagonal and sink first,
    then by mass, whose mass reaches the threshold, at least ``minimum`` (per head slot, blocks;
    default none) and at most ``K``. ``first_position`` (``[B]``, a chunk: see
    :func:`chunk_first_position`): query blocks wholly before it select nothing. ``rows``
    (int64 ``[B, R]``, distinct per input; a chunk's
    :func:`~mi_compile.patterns.block_sparse.chunk_rows`): ``mass`` is ``[B, Hs, R, NQB]``, its
    row ``r`` query block ``rows[b, r]``; each selects as that row of the whole ``mass`` would,
    every other query block nothing. Returns ``blocks [B, Hs, NQB, max K]`` (int32, ascending,
    SENTINEL-padded) and ``block_count [B, Hs, NQB]`` (int32)."""
    B, Hs, _, nqb = mass.shape
    dev = mass.device
    width = max(widths)
    # the query block of each mass row: [1, NQB] (every block) or [B, R]
    m = torch.arange(nqb, device=dev)[None, :] if rows is None else rows
    R = m.shape[1]
    causal = torch.arange(nqb, device=dev)[None, None, :] <= m[:, :, None]    # [B|1, m, c]
    # sort key: the diagonal (3), then the sink (2), then the mass (in [0, 1]); -1 not causal
    key = mass.masked_fill(~causal[:, None], -1.0)
    key[..., 0] = torch.where(causal[:, None, :, 0], 2.0, -1.0)
    if rows is None:
        key.diagonal(dim1=-2, dim2=-1).fill_(3.0)
    else:
        key.scatter_(-1, rows[:, None, :, None].expand(B, Hs, R, 1), 3.0)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices                # [B, Hs, m, rank]
    ranked = mass.masked_fill(~causal[:, None], 0.0).gather(-1, order)
    before = ranked.cumsum(-1) - ranked                                        # mass of the better ranks
    thr = device_ints(thresholds, dev, torch.float32)[None, :, None, None] / 1000.0
    forced = torch.where(m > 0, 2, 1)[:, None, :]                              # diagonal (+ sink)
    if minimum is not None:
        forced = torch.maximum(forced, device_ints(minimum, dev)[None, :, None])
    rank = torch.arange(nqb, device=dev)
    full = device_ints([t >= 1000 for t in thresholds], dev, torch.bool)[None, :, None, None]
    keep = (rank < forced[..., None]) | (before < thr) | full
    keep &= rank <= m[:, None, :, None]                                        # causal ranks only
    count = keep.sum(-1)
    count = torch.minimum(count, device_ints(widths, dev)[None, :, None])
    blocks_in_seq = (seq_len.long() + BLOCK - 1) // BLOCK
    live = m < blocks_in_seq[:, None]                                          # [B, m]
    if first_position is not None:                  # a chunk: the blocks holding its rows
        live &= (m + 1) * BLOCK > first_position[:, None]
    count = torch.where(live[:, None, :], count, 0)
    top = order[..., :width]
    blocks = torch.where(rank[:width] < count[..., None], top, SENTINEL).to(torch.int32).sort(-1).values
    if rows is None:
        return blocks, count.to(torch.int32)
    at = rows[:, None, :, None].expand(B, Hs, R, 1)
    all_blocks = torch.full((B, Hs, nqb, width), SENTINEL, device=dev, dtype=torch.int32)
    all_blocks.scatter_(2, at.expand(B, Hs, R, width), blocks)
    all_counts = torch.zeros(B, Hs, nqb, device=dev, dtype=torch.int32)
    all_counts.scatter_(2, at[..., 0], count.to(torch.int32))
    return all_blocks, all_counts


class XAttentionSpec(PatternSpec):
    """``xattention(threshold, stride, max_blocks)``: per input and 64-query block, the fewest
    key blocks (diagonal and sink always) whose antidiagonal-estimated attention mass reaches
    ``threshold`` per mille, at most ``max_blocks`` (see the module docstring)."""

    name = "xattention"
    code = 5
    params = ("threshold", "stride", "max_blocks")
    kernel_kind = KIND_OTHER          # the fused builder leaves its rows to select_block_table
    selection = PHASE_BLOCK_SELECT
    per_block = True
    color = "#edc948"

    def estimate_cost(self, head, n: int) -> float:
        return XA_ESTIMATE_COST.get(head.stride, XA_ESTIMATE_PACE / head.stride)

    def validate(self, head) -> None:
        if not 1 <= head.threshold <= 1000:
            raise PatternError(f"xattention needs threshold in 1..1000 (per mille), got {head.threshold}")
        if head.stride not in XA_STRIDES:
            raise PatternError(f"xattention needs stride in {XA_STRIDES}, got {head.stride}")
        if head.max_blocks < 1:
            raise PatternError("xattention needs max_blocks >= 1")

    def block_width(self, head, n: int) -> int:
        return max(1, min(head.max_blocks, math.ceil(n / BLOCK)))

    def chunk_reason(self, head) -> None:
        return None         # a chunk scores its own query blocks (see the module docstring)

    def select_block_table(self, q, k, head_ids, heads, seq_start, seq_len, scale):
        n = k.shape[2]
        first = chunk_first_position(seq_start, n, q.shape[2]) if q.shape[2] < n else None
        # a chunk selects only the query blocks that can hold its rows (R of NQB)
        rows = chunk_rows(seq_start, n, q.shape[2])[0] if first is not None else None
        by_stride: dict[int, list[int]] = {}
        for slot, head in enumerate(heads):
            by_stride.setdefault(head.stride, []).append(slot)
        width = max(self.block_width(h, n) for h in heads)
        nqb = math.ceil(n / BLOCK)
        blocks = torch.full((q.shape[0], len(head_ids), nqb, width), SENTINEL, device=q.device, dtype=torch.int32)
        counts = torch.zeros(q.shape[0], len(head_ids), nqb, device=q.device, dtype=torch.int32)
        # heads in chunks whose mass and sort temporaries (~24 bytes per entry) stay near 256 MiB:
        # one launch for a whole layer up to ~32K tokens
        step = max(1, XA_CHUNK_BYTES // (24 * q.shape[0] * nqb * nqb))
        for stride, all_slots in by_stride.items():
            for c0 in range(0, len(all_slots), step):
                slots = all_slots[c0:c0 + step]
                mass = block_mass(q, k, [head_ids[s] for s in slots], seq_start, seq_len, scale, stride)
                if rows is not None:
                    mass = mass.gather(2, rows[:, None, :, None].expand(-1, len(slots), -1, nqb))
                blk, cnt = select_from_mass(mass, [heads[s].threshold for s in slots],
                                            [self.block_width(heads[s], n) for s in slots], seq_len,
                                            first_position=first, rows=rows)
                del mass
                idx = device_ints(slots, q.device)
                blocks[:, idx, :, :blk.shape[-1]] = blk
                counts[:, idx] = cnt
        return blocks, counts

    def block_mask(self, head, index, h, block_starts, j):
        return blocks_mask_of(index, h, block_starts, j)

    def candidates(self, n: int) -> list:
        blocks = math.ceil(n / BLOCK)
        return [(4, HeadPattern(self.name, threshold=t, stride=XA_STRIDE, max_blocks=blocks))
                for t in XA_THRESHOLDS]

    def label(self, head) -> str:
        return f"x{head.threshold / 10:g}%"


SPEC = register(XAttentionSpec())
