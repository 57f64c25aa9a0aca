"""Triton kernels that assemble the unified sparse index's tables after the top-k, in two launches.

The PyTorch builder (:func:`mi_compile.patterns.index._build_torch`) needs ~250 small ops
per layer (selection clean-up, merging, tiles, upto counts, scatters into per-layer tables);
on the GPU each costs more host time than device time. These two launches write exactly the
same tables, bit for bit (tests compare them), from the raw top-k outputs:

Launch 1, :func:`_head_rows_kernel`, grid ``(B * H,)``, one program per input and head, the
steps that need the whole row:

1. ``offsets``: a vertical-slash head's forced offsets, then its top-k extras (sorted by the
   host, :func:`~mi_compile.patterns.vertical_slash.topk_sorted`), cut at the sequence end;
2. ``group_lo / group_hi``: offsets merged where consecutive ones differ by <= 64 (A-shape:
   its one group), by a prefix sum over group starts;
3. ``tile_start / tile_end``: the groups' tiles in the order the kernel walks them (nearest
   the diagonal first). That order needs no sort: groups are ascending and at least 65 apart,
   so every tile of group ``g`` ends after every tile of group ``g + 1``, and inside a group
   the tile ends rise with the tile; sorted slot ``i`` of group ``g`` is its tile
   ``ends[g] - 1 - i`` (``ends``: running tile count, kept in a scratch row);
4. ``columns``: the top-k columns (sorted by the host), cut at the sequence end.

Launch 2, :func:`_block_rows_kernel`, grid ``(B * H, chunks)``, the O(n) tables, a chunk of
64-token blocks / positions per program, by binary search in the rows launch 1 wrote:
``covered`` (position ``p`` is covered iff the last group with ``lo <= p`` has ``p < hi + 64``),
``groups_upto``, ``tiles_upto``, ``columns_upto``, and the block-sparse ``blocks`` (finite
top-k ranks below the head's ``K`` in live rows, sorted) and ``block_count``.

Inside launch 1, later steps read what earlier steps stored (``tl.debug_barrier`` between
them). Nothing is sized by data: no host synchronisation, CUDA-graph capturable.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._device import cached
from .constants import KIND_A_SHAPE, KIND_BS, KIND_VS, SENTINEL
from .index_format import META_WIDTH

# Sizes that change with the prompt are not specialised on (see sparse_attention._LENGTH_ARGS).
_ROW_ARGS = ["n", "gw", "tiles", "cw", "gw_steps", "col_width", "off_width"]
_BLOCK_ARGS = ["n", "gw", "tiles", "cw", "nqb", "kw", "bs_rows", "kw_raw", "gw_steps", "tile_steps",
               "cw_steps", "q_offset"]
TILE_CHUNK = 1024
_VS = tl.constexpr(KIND_VS)
_A_SHAPE = tl.constexpr(KIND_A_SHAPE)
_BS = tl.constexpr(KIND_BS)


@triton.jit
def _count_upto(row_ptr, length, bound, steps, DESCENDING: tl.constexpr):
    """Per element of ``bound``: how many leading entries of a sorted row of ``length`` satisfy
    ``entry <= bound`` (ascending row) or ``entry > bound`` (descending row); ``steps`` =
    ``length.bit_length()`` halvings settle every search."""
    lo = tl.zeros_like(bound)
    hi = lo + length
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        value = tl.load(row_ptr + mid, mask=active, other=0)
        if DESCENDING:
            right = value > bound
        else:
            right = value <= bound
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    return lo


@triton.jit
def _program_head(num_heads):
    """``(row, b, h)``: the (input, head) row this program writes (axis 0 = ``b * H + h``)."""
    row = tl.program_id(0)
    return row, row // num_heads, row % num_heads


@triton.jit
def _head_meta(meta_ptr, h):
    """Head ``h``'s row of ``IndexPlan.meta`` (``META_WIDTH`` = 8 ints): kind, prefix, param a,
    param b, row of the vertical-slash top-k tensors, block-sparse row, (unused), rows of the
    vertical-slash top-k tensors. Unused values cost nothing (their loads are dead code)."""
    p = meta_ptr + h * 8
    return (tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4), tl.load(p + 5),
            tl.load(p + 6), tl.load(p + 7))


@triton.jit(do_not_specialize=_ROW_ARGS)
def _head_rows_kernel(meta_ptr, seq_len_ptr, top_cols_ptr, top_offs_ptr,
                      offsets_ptr, group_lo_ptr, group_hi_ptr, ends_ptr, tile_start_ptr, tile_end_ptr,
                      columns_ptr,
                      n, num_heads, gw, tiles, cw, gw_steps, col_width, off_width,
                      GW_P2: tl.constexpr, CW_P2: tl.constexpr, TILE_BLOCK: tl.constexpr,
                      FORCED: tl.constexpr, SENT: tl.constexpr):
    row, b, h = _program_head(num_heads)
    kind, _, pa, pb, vs_row, _, _, vs_rows = _head_meta(meta_ptr, h)
    length = tl.load(seq_len_ptr + b)
    row64 = row.to(tl.int64)
    r = tl.arange(0, GW_P2)
    in_row = r < gw
    off_row = offsets_ptr + row64 * gw
    lo_row = group_lo_ptr + row64 * gw
    hi_row = group_hi_ptr + row64 * gw
    ends_row = ends_ptr + row64 * gw
    room = tl.maximum(n - FORCED, 0)

    # 1. offsets: forced 0 .. min(S, 64, n) - 1 (those inside the sequence), then the extras
    # (ascending; those outside the sequence are the tail and become SENT: still ascending)
    if kind == _VS:
        n_forced = tl.minimum(tl.minimum(pb, FORCED), n)
        n_extra = tl.maximum(tl.minimum(pb - FORCED, room), 0)
        e = r - n_forced
        ok = (e >= 0) & (e < n_extra)
        idx = tl.load(top_offs_ptr + (b.to(tl.int64) * vs_rows + vs_row) * off_width + e, mask=ok, other=0) + FORCED
        extra = tl.where(ok & (idx < length), idx, SENT).to(tl.int32)
        forced = tl.where(r < length, r, SENT)
        tl.store(off_row + r, tl.where(r < n_forced, forced, extra), mask=in_row)
    else:
        tl.store(off_row + r, tl.full([GW_P2], SENT, tl.int32), mask=in_row)
    tl.debug_barrier()

    # 2. groups
    if kind == _VS:
        offs = tl.load(off_row + r, mask=in_row, other=SENT)
        prev = tl.load(off_row + r - 1, mask=in_row & (r >= 1), other=0)
        nxt = tl.load(off_row + r + 1, mask=(r + 1) < gw, other=SENT)
        valid = offs < SENT
        is_start = valid & ((r == 0) | (offs - prev > 64))
        is_end = valid & ((nxt >= SENT) | (nxt - offs > 64))
        starts = is_start.to(tl.int32)
        gid = tl.cumsum(starts, 0) - 1
        num_groups = tl.sum(starts, 0)
        tl.store(lo_row + gid, offs, mask=is_start)
        tl.store(hi_row + gid, offs, mask=is_end)
        tl.store(lo_row + r, tl.full([GW_P2], SENT, tl.int32), mask=in_row & (r >= num_groups))
        tl.store(hi_row + r, tl.full([GW_P2], SENT, tl.int32), mask=in_row & (r >= num_groups))
    elif kind == _A_SHAPE:
        tl.store(lo_row + r, tl.where(r == 0, 0, SENT), mask=in_row)
        tl.store(hi_row + r, tl.where(r == 0, tl.minimum(pb - 1, n), SENT), mask=in_row)
    else:
        tl.store(lo_row + r, tl.full([GW_P2], SENT, tl.int32), mask=in_row)
        tl.store(hi_row + r, tl.full([GW_P2], SENT, tl.int32), mask=in_row)
    tl.debug_barrier()

    # 3. tiles: running tile count per group, then each sorted slot from its group
    lo = tl.load(lo_row + r, mask=in_row, other=SENT)
    hi = tl.load(hi_row + r, mask=in_row, other=SENT)
    below = tl.minimum(64 - lo, 0)
    count = tl.where(lo < SENT, tl.maximum(below + hi + 63, 0) // 64, 0)
    tl.store(ends_row + r, tl.cumsum(count, 0), mask=in_row)
    total = tl.sum(count, 0)
    tl.debug_barrier()
    start_row = tile_start_ptr + row64 * tiles
    end_row = tile_end_ptr + row64 * tiles
    for t0 in range(0, tiles, TILE_BLOCK):
        i = t0 + tl.arange(0, TILE_BLOCK)
        live = i < total
        owner = tl.minimum(_count_upto(ends_row, gw, i, gw_steps, False), gw - 1)
        o_lo = tl.load(lo_row + owner, mask=live, other=0)
        o_hi = tl.load(hi_row + owner, mask=live, other=0)
        o_end = tl.load(ends_row + owner, mask=live, other=0)
        start = (o_end - 1 - i) * 64 - o_hi
        end = tl.minimum(start + 64, tl.minimum(64 - o_lo, 0))
        tl.store(start_row + i, tl.where(live, start, -SENT), mask=i < tiles)
        tl.store(end_row + i, tl.where(live, end, -SENT), mask=i < tiles)

    # 4. columns (ascending; those outside the sequence are the tail)
    c = tl.arange(0, CW_P2)
    col_row = columns_ptr + row64 * cw
    if kind == _VS:
        n_cols = tl.maximum(tl.minimum(pa - FORCED, room), 0)
        ok = c < n_cols
        idx = tl.load(top_cols_ptr + (b.to(tl.int64) * vs_rows + vs_row) * col_width + c, mask=ok, other=0) + FORCED
        tl.store(col_row + c, tl.where(ok & (idx < length), idx, SENT).to(tl.int32), mask=c < cw)
    else:
        tl.store(col_row + c, tl.full([CW_P2], SENT, tl.int32), mask=c < cw)


@triton.jit(do_not_specialize=_BLOCK_ARGS)
def _block_rows_kernel(meta_ptr, seq_start_ptr, seq_len_ptr, blk_val_ptr, blk_idx_ptr,
                       group_lo_ptr, group_hi_ptr, tile_end_ptr, columns_ptr,
                       covered_ptr, groups_upto_ptr, tiles_upto_ptr, columns_upto_ptr, blocks_ptr,
                       block_count_ptr,
                       n, num_heads, gw, tiles, cw, nqb, kw, bs_rows, kw_raw, gw_steps, tile_steps, cw_steps,
                       q_offset,
                       BM: tl.constexpr, KW_P2: tl.constexpr, SENT: tl.constexpr):
    row, b, h = _program_head(num_heads)
    chunk = tl.program_id(1)
    kind, prefix, pa, _, _, bs_row, _, _ = _head_meta(meta_ptr, h)
    length = tl.load(seq_len_ptr + b)
    # a chunk's first query row, as a sequence position (0 for a whole prefill)
    first_row = tl.maximum(q_offset - tl.load(seq_start_ptr + b), 0)
    row64 = row.to(tl.int64)
    lo_row = group_lo_ptr + row64 * gw

    # covered over m0 - j + 63, positions [0, n + 64)
    size = n + 64
    p = chunk * (BM * 64) + tl.arange(0, BM * 64)
    cov_row = covered_ptr + row64 * size
    if kind == _VS:
        before = _count_upto(lo_row, gw, p, gw_steps, False)
        o_hi = tl.load(group_hi_ptr + row64 * gw + before - 1, mask=before > 0, other=0)
        tl.store(cov_row + p, ((before > 0) & (p < o_hi + 64)).to(tl.uint8), mask=p < size)
    else:
        tl.store(cov_row + p, tl.zeros([BM * 64], tl.uint8), mask=p < size)

    # per query block: groups, tiles and columns reaching it
    m = chunk * BM + tl.arange(0, BM)
    m_ok = m < nqb
    m0 = m * 64
    upto = row64 * nqb + m
    tl.store(groups_upto_ptr + upto, _count_upto(lo_row, gw, m0 + 63, gw_steps, False), mask=m_ok)
    tl.store(tiles_upto_ptr + upto, _count_upto(tile_end_ptr + row64 * tiles, tiles, prefix - m0, tile_steps,
                                                True), mask=m_ok)
    tl.store(columns_upto_ptr + upto, _count_upto(columns_ptr + row64 * cw, cw, m0 - 1, cw_steps, False),
             mask=m_ok)

    # block-sparse rows
    e = tl.arange(0, KW_P2)
    out = blocks_ptr + upto[:, None] * kw + e[None, :]
    out_ok = m_ok[:, None] & (e < kw)[None, :]
    # query blocks wholly before a chunk's rows were not scored (-inf: nothing kept), so a
    # program holding only such blocks writes the empty rows without loading or sorting
    if (kind == _BS) & ((chunk + 1) * (BM * 64) > first_row):
        ok = m_ok[:, None] & (e[None, :] < tl.minimum(pa, nqb))
        raw = ((b.to(tl.int64) * bs_rows + bs_row) * nqb + m)[:, None] * kw_raw + e[None, :]
        idx = tl.load(blk_idx_ptr + raw, mask=ok, other=0)
        val = tl.load(blk_val_ptr + raw, mask=ok, other=float("-inf"))
        keep = ok & (val > float("-inf")) & (m < (length + 63) // 64)[:, None]
        tl.store(out, tl.sort(tl.where(keep, idx, SENT).to(tl.int32), 1), mask=out_ok)
        tl.store(block_count_ptr + upto, tl.sum(keep.to(tl.int32), 1), mask=m_ok)
    elif kind == _BS:
        tl.store(out, tl.full([BM, KW_P2], SENT, tl.int32), mask=out_ok)
        tl.store(block_count_ptr + upto, tl.zeros([BM], tl.int32), mask=m_ok)
    else:
        tl.store(out, tl.zeros([BM, KW_P2], tl.int32), mask=out_ok)
        tl.store(block_count_ptr + upto, tl.zeros([BM], tl.int32), mask=m_ok)


def _placeholders(device) -> tuple:
    """Typed stand-ins for absent inputs (never read): block-sparse values (float32) and indices
    (int64, as the top-k returns them), vertical-slash columns / offsets (int32)."""
    return cached("index_tables_placeholders", device,
                  lambda: (torch.zeros(1, device=device, dtype=torch.float32),
                           torch.zeros(1, device=device, dtype=torch.int64),
                           torch.zeros(1, device=device, dtype=torch.int32)))


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def build_tables(plan, B: int, n: int, widths: dict, seq_start: torch.Tensor, seq_len: torch.Tensor, vs_raw,
                 bs_raw, q_len: int | None = None) -> dict:
    """Every data-dependent table of :class:`~mi_compile.kernels.index_format.SparseIndex` (two launches).

    ``vs_raw = (columns, extra offsets)``: int32 ``[B, vertical-slash heads, width]`` or None, as
    :func:`~mi_compile.patterns.vertical_slash.topk_sorted` returns them; ``bs_raw = (values,
    indices)`` ``[B, block-sparse heads, NQB, K]`` from
    :func:`~mi_compile.patterns.block_sparse.topk_raw`. Either may be None. ``q_len`` (default
    ``n``): a chunk's query count; its block-sparse rows before the chunk are written empty
    without a sort. The int32 tables are views of one allocation.
    """
    dev = seq_len.device
    H = len(plan.heads)
    nqb, gw, tiles, cw, kw = widths["nqb"], widths["groups"], widths["tiles"], widths["columns"], widths["blocks"]
    # one allocation for every int32 table, each region 64-byte aligned (the attention kernel
    # specialises on pointer alignment: unaligned regions would compile more variants of it)
    shapes = {"offsets": (gw,), "group_lo": (gw,), "group_hi": (gw,), "ends": (gw,), "groups_upto": (nqb,),
              "tile_start": (tiles,), "tile_end": (tiles,), "tiles_upto": (nqb,), "columns": (cw,),
              "columns_upto": (nqb,), "blocks": (nqb, kw), "block_count": (nqb,)}
    sizes = [-(-B * H * math.prod(shape) // 16) * 16 for shape in shapes.values()]
    buf = torch.empty(sum(sizes), device=dev, dtype=torch.int32)
    t, offset = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        inner = math.prod(shape)
        strides = (H * inner, inner) + ((shape[1], 1) if len(shape) == 2 else (1,))
        t[name] = buf.as_strided((B, H) + shape, strides, offset)
        offset += size
    t["covered"] = torch.empty(B, H, n + 64, device=dev, dtype=torch.uint8)
    ends = t.pop("ends")
    meta = plan.meta
    none = _placeholders(dev)
    cols, offs = vs_raw if vs_raw is not None else (None, None)
    cols, offs = (none[2] if x is None else x for x in (cols, offs))
    blk_val, blk_idx = bs_raw if bs_raw is not None else none[:2]
    gw_steps = gw.bit_length()
    _head_rows_kernel[(B * H,)](
        meta, seq_len, cols, offs,
        t["offsets"], t["group_lo"], t["group_hi"], ends, t["tile_start"], t["tile_end"], t["columns"],
        n, H, gw, tiles, cw, gw_steps, cols.shape[-1], offs.shape[-1],
        GW_P2=_p2(gw), CW_P2=_p2(cw), TILE_BLOCK=TILE_CHUNK, FORCED=64, SENT=SENTINEL, num_warps=4)
    kw_p2 = _p2(kw)
    bm = max(1, min(16, 4096 // kw_p2))
    chunks = triton.cdiv(n + 64, bm * 64)
    _block_rows_kernel[(B * H, chunks)](
        meta, seq_start, seq_len, blk_val, blk_idx,
        t["group_lo"], t["group_hi"], t["tile_end"], t["columns"],
        t["covered"], t["groups_upto"], t["tiles_upto"], t["columns_upto"], t["blocks"], t["block_count"],
        n, H, gw, tiles, cw, nqb, kw,
        max(1, len(plan.bs_ids)), blk_idx.shape[-1] if bs_raw is not None else 1,
        gw_steps, tiles.bit_length(), cw.bit_length(), n - (n if q_len is None else q_len),
        BM=bm, KW_P2=kw_p2, SENT=SENTINEL, num_warps=4)
    return t


assert META_WIDTH == 8, "the kernels above index meta rows of 8"
