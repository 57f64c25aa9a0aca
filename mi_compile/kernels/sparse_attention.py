"""Triton kernel: one launch computes every head of a layer from the unified sparse index.

Grid: ``(NQB, B * Hq)`` (a whole prefill; a chunk launches fewer, see "Chunks" below).
Program ``(p, b * Hq + h)`` owns query block ``m = NQB - 1 - p`` (heaviest blocks first, for
load balance) of input ``b``, query head ``h``; it reads KV head
``h // (Hq // Hkv)`` directly (native GQA, K/V never repeated). Query block ``m`` covers the
sequence positions ``[64 m, 64 m + 64)``, i.e. tensor rows ``seq_start[b] + 64 m + r``.

Visiting order inside a program (the selection is ``j <= i & (j < sink or i - j < band)``
within the ranges below):

1. prefix range ``[0, min(prefix, m0))``;
2. the slash-group tiles reaching the block (one flat loop, so the pipeliner can prefetch),
   each ``[max(m0 + start, prefix), min(m0 + end, m0))``;
3. the block-sparse key blocks below the diagonal;
4. gathered extra columns ``< m0``, skipping those a group interval already covered;
5. the diagonal tile ``[m0, m0 + 64)``, which every pattern selects (causally).

A query block that the head's ``last`` table makes dense (tri-shape, and vertical-slash or
block-sparse heads with ``last`` set: ``last > 0`` and ``m0 + 64 > len - last``) takes
``prefix = m0`` and ``band = WIDE`` and skips phases 2-4, so it visits ``[0, m0)`` and its
diagonal tile, every causal key once.

Phases 1-4 only see keys below the block's first row, so they need no causal test (only a 1D
key mask; A-shape group tiles also test the band per element); only the diagonal tile builds
the full element mask. The ranges are disjoint by construction (see
:mod:`mi_compile.patterns.index`), so each pair is computed once. Softmax is online in
float32 with ``exp2`` and a log2(e)-prescaled scale.

The same program doubles as the padding writer: it zero-fills the padding slots
``[64 m, 64 m + 64) ∩ [0, n - len)``, slot ``s`` being row ``s`` if ``s < start`` else
``s + len``; so every output element is written exactly once by one launch.

Chunks (``q`` has ``nq < n`` rows: a prefill continuing a cache, see
:mod:`mi_compile.kernels.index_format`): query row ``r`` is key position ``n - nq + r``, so
sequence position ``p`` is row ``start + p - (n - nq)`` of q and of the output (``[B, H, nq,
Dv]``), and only positions ``p >= n - nq - start`` are computed. The grid is
``min(ceil(nq / 64) + 1, NQB)`` programs per head (a program per row block, the chunk's
blocks: program ``i`` owns block ``max(ceil(len / 64) - programs, 0) + programs - 1 - i``,
heaviest first; blocks without a chunk row exit) and the padding slots are those of the
``nq`` output rows, the program's slot block being ``programs - 1 - i``. With ``nq = n``
this is the whole-prefill launch above.

Layers whose heads are all dense or A-shape (nothing data-dependent) use a second kernel,
:func:`_wide_attention_kernel`, with 128-row programs (two 64-row warpgroups share each K/V
tile); ``KERNEL_CONFIG["wide"] = False`` sends them through the general kernel too. It has no
``last`` table: layers with heads that have dense last rows always take the general kernel.

Bounds are part of the contract: whatever the index tables hold, no load or store leaves its
tensor. The sequence range is clamped into ``[0, n)``, ``prefix`` to ``>= 0``, the counts
(``tiles_upto``, ``block_count``, ``columns_upto``) to ``[0, width]`` of their table, tile ranges to
``[0, m0)``, and key blocks / columns outside ``[0, m0)`` are masked away (scalar clamps and
integer compares folded into the existing masks; valid tables are unaffected). Table shapes
are the caller's to check (:func:`mi_compile.sparse.check_index` does for the public path);
the counting-mode tests in ``tests/test_kernel_bounds.py`` run corrupted tables.

``MODE`` (constexpr): 0 attention; 1 count every visited pair into an ``[B, H, nq, n]`` int32
tensor (tests: no pair twice, none missing); 2 count visited pairs per query block (density);
3 count the pairs of every visited tile, masked or not, per query block (what a launch costs:
:mod:`mi_compile.patterns.cost` predicts it from the index, tests compare the two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cached, contiguous_last
from .constants import BLOCK, WIDE
from .dispatch import hopper_opt_in
from .index_format import SparseIndex

LOG2E = 1.4426950408889634
_WIDE = tl.constexpr(WIDE)   # band of a dense-rows block (no band test)
LAST_COMPILE: dict = {}   # resource report of the last launch (benchmarks print it)
# Launch parameters (benchmarks/kernels.py sweeps them). block_n: tile width of the prefix
# phase; num_warps None = by head dim (4 up to D=128, 8 above). wide*: the 128-row kernel used
# when every head is dense or A-shape (wide=False: those layers use the general 64-row kernel
# too). Defaults = best of the H100 sweep (benchmarks/NOTES.md, step 4). split_tiles: key
# tiles per program of a chunk's dense last rows (32: 16-64 programs a head-block at 32K-128K,
# enough to fill the GPU; 128 left fewer programs than SMs, docs/kernels.md).
KERNEL_CONFIG = {"block_n": 64, "block_c": 64, "num_warps": None, "num_stages": 3,
                 "wide": True, "wide_block_n": 64, "wide_warps": 8, "wide_stages": 3,
                 "group_heads": False, "split_tiles": 32}

# Integer arguments Triton must not specialise on. By default every int argument is compiled
# in as "equals 1" / "divisible by 16" / neither, so each new combination is a new binary.
# These sizes change with the prompt length (n, block counts) and with the layer's patterns
# (the widths of the index tables), so specialising on them compiled a fresh set of kernels
# for a length such as 8193 and for most layers with a new mix of patterns: cheap in bf16,
# but 98 s per set for float32 IEEE dots on the H100 (benchmarks/NOTES.md, step 7). They
# only bound loops and masks and scale scalar index loads, so the specialisation bought
# nothing measurable. Strides stay specialised: their alignment vectorises the tile loads.
_LENGTH_ARGS = ["n", "num_q_blocks", "num_programs", "q_offset", "max_tiles", "max_columns", "max_blocks",
                "covered_len"]
_WIDE_LENGTH_ARGS = ["n", "num_q_blocks", "num_programs", "q_offset"]   # the 128-row kernel has no tables
_SPLIT_ARGS = ["n", "q_offset", "num_blocks", "splits"]
MERGE_ROWS = 16   # rows per program of the dense-rows merge (four programs a 64-row block)


@triton.jit
def _visit_tile(state, ctx, key_pos, key_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                CHECK: tl.constexpr, MASKED: tl.constexpr = True):
    """Fold one tile of keys (sequence positions ``key_pos``) into the running softmax.

    ``state = (acc, m_i, l_i, pairs)``: the running softmax (and the pair count of the
    counting modes), returned updated; ``ctx``: the program's operands, see :func:`_context`.

    ``CHECK=True``: exact element test (causal, sink/band). ``CHECK=False``: the caller
    guarantees every key with ``key_ok`` lies strictly below the block's first row and inside
    the pattern, so only the 1D key mask is applied (rows past the sequence's end compute
    garbage that is never stored). Counting modes count exactly what each path computes, so a
    wrong bound shows up as a pair counted that the reference mask does not hold.

    ``MASKED=False`` (with ``CHECK=False``): the caller guarantees every key of the tile is
    valid, so the 1D key mask is skipped too.
    """
    acc, m_i, l_i, pairs = state
    q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, band, qk_scale = ctx
    if CHECK:
        keep = key_ok[None, :] & row_ok[:, None] & (key_pos[None, :] <= rows[:, None])
        keep = keep & ((key_pos[None, :] < sink) | (rows[:, None] - key_pos[None, :] < band))
    else:
        keep = key_ok[None, :] & row_ok[:, None]
    if MODE == 0:
        dims = tl.arange(0, BLOCK_D)
        key_rows = (seq_start + key_pos).to(tl.int64)
        load_ok = key_ok[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_head + key_rows[:, None] * stride_kn + dims[None, :], mask=load_ok, other=0.0)
        if q.dtype == tl.float32:
            # float32 means float32: without this, tl.dot rounds its inputs to tf32 on the GPU
            # (10-bit mantissa), which would put a bf16-like floor under float32 accuracy runs.
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            scores = tl.dot(q, tl.trans(k)) * qk_scale
        if CHECK:
            scores = tl.where(keep, scores, float("-inf"))
        elif MASKED:
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + key_rows[:, None] * stride_vn + dims[None, :], mask=load_ok, other=0.0)
        if v.dtype == tl.float32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    elif MODE == 1:
        where = (seq_start + rows).to(tl.int64)[:, None] * n + (seq_start + key_pos)[None, :]
        tl.atomic_add(count_head + where, keep.to(tl.int32), mask=keep)
    elif MODE == 2:
        pairs += tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
    else:
        pairs += rows.shape[0] * key_pos.shape[0]    # the whole tile, masked or not
    return acc, m_i, l_i, pairs


@triton.jit
def _initial_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """An empty running softmax: ``(acc, m_i, l_i, pairs)``; ``m_i`` finite so that a fully
    masked tile gives ``p = 0``, not NaN."""
    return (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30,
            tl.zeros([BLOCK_M], dtype=tl.float32), tl.sum(tl.zeros([BLOCK_M], dtype=tl.int32), 0))


@triton.jit
def _context(q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, band,
             qk_scale):
    """The operands every tile of a program reads, as one tuple (:func:`_visit_tile`'s ``ctx``)."""
    return q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, band, qk_scale


@triton.jit
def _visit_range(state, ctx, start, stop, bound, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, MODE: tl.constexpr, CHECK: tl.constexpr, MASKED: tl.constexpr = True):
    """Keys ``[start, stop)`` in tiles of ``BLOCK_N``, those ``< bound`` valid."""
    offs = tl.arange(0, BLOCK_N)
    for k0 in range(start, stop, BLOCK_N):
        key_pos = k0 + offs
        state = _visit_tile(state, ctx, key_pos, key_pos < bound, HEAD_DIM, BLOCK_D, MODE, CHECK, MASKED)
    return state


@triton.jit
def _visit_group_tiles(state, ctx, tile_start_ptr, tile_end_ptr, tile_base, t_lo, t_hi, m0, prefix,
                       BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
                       CHECK: tl.constexpr):
    """Slash-group tiles ``t_lo .. t_hi - 1``: keys ``[max(m0 + start, prefix), min(m0 + end, m0))``."""
    offs = tl.arange(0, BLOCK_M)
    for t in range(t_lo, t_hi):
        hi = tl.minimum(m0 + tl.load(tile_end_ptr + tile_base + t), m0)
        lo = tl.minimum(tl.maximum(m0 + tl.load(tile_start_ptr + tile_base + t), prefix), hi)
        key_pos = lo + offs
        state = _visit_tile(state, ctx, key_pos, key_pos < hi, HEAD_DIM, BLOCK_D, MODE, CHECK)
    return state


@triton.jit
def _zero_fill_padding(out_head, slots, dims, real_lo, real_rows, num_rows, stride_on,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero this program's share of the padding rows: of the ``num_rows`` output rows,
    ``[real_lo, real_lo + real_rows)`` are the sequence's; slot ``s < num_rows - real_rows`` is row
    ``s`` (left padding, ``s < real_lo``) or ``s + real_rows`` (right padding), so one launch
    writes every output row."""
    pad_rows = tl.where(slots < real_lo, slots, slots + real_rows).to(tl.int64)
    pad_ok = (slots < num_rows - real_rows)[:, None] & (dims[None, :] < HEAD_DIM)
    tl.store(out_head + pad_rows[:, None] * stride_on + dims[None, :],
             tl.zeros([BLOCK_M, BLOCK_D], dtype=out_head.dtype.element_ty), mask=pad_ok)


@triton.jit
def _program_rows(seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads,
                  num_programs, q_offset, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  MODE: tl.constexpr, GROUP: tl.constexpr):
    """Both kernels' program -> work map: program ``(p, b * H + h)`` owns rows
    ``[m0, m0 + BLOCK_M)`` with ``m = num_programs - 1 - p`` (heaviest first) of input ``b``,
    query head ``h``; in attention mode it also zero-fills its share of the padding rows.
    A chunk (``q_offset = n - nq > 0``) launches fewer programs than blocks: ``m`` is shifted by
    ``max(ceil(len / BLOCK_M) - num_programs, 0)`` onto the sequence's last blocks (0 for a
    whole prefill), the padding slots stay ``num_programs - 1 - p``'s.

    With ``GROUP = G > 1`` the grid is ``(num_programs * G, B * H / G)`` and the ``G`` query
    heads of one KV head take consecutive program ids for the same row block, so that the
    programs in flight together read the same K/V tiles (L2 reuse across a GQA group). With
    ``GROUP = 1`` the divisions by the constant fold away."""
    slot = num_programs - 1 - tl.program_id(0) // GROUP
    bh = tl.program_id(1) * GROUP + tl.program_id(0) % GROUP
    b = bh // num_heads
    h = bh % num_heads
    # clamped so that [seq_start, seq_start + length) lies inside [0, n) whatever the tables say
    seq_start = tl.minimum(tl.maximum(tl.load(seq_start_ptr + b), 0), n)
    length = tl.minimum(tl.maximum(tl.load(seq_len_ptr + b), 0), n - seq_start)
    m = slot + tl.maximum((length + BLOCK_M - 1) // BLOCK_M - num_programs, 0)
    m0 = m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    out_head = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    if MODE == 0:
        # the sequence's output rows [real_lo, real_hi) of the nq = n - q_offset rows
        real_lo = tl.minimum(tl.maximum(seq_start - q_offset, 0), n - q_offset)
        real_hi = tl.minimum(tl.maximum(seq_start + length - q_offset, real_lo), n - q_offset)
        _zero_fill_padding(out_head, slot * BLOCK_M + tl.arange(0, BLOCK_M), dims, real_lo, real_hi - real_lo,
                           n - q_offset, stride_on, HEAD_DIM, BLOCK_M, BLOCK_D)
    # from here on output rows are indexed as in a whole prefill (start + p, see _program_operands)
    out_head = out_head - q_offset.to(tl.int64) * stride_on
    return m, bh, h, seq_start, length, m0, rows, dims, out_head


@triton.jit
def _program_operands(q_ptr, k_ptr, v_ptr, count_ptr, prefix_ptr, sink_ptr, band_ptr, bh, h, seq_start,
                      length, rows, dims, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                      stride_vb, stride_vh, n, q_offset, num_heads, heads_per_kv, HEAD_DIM: tl.constexpr):
    """The program's query tile (sequence position ``p`` is q row ``start + p - q_offset``; rows
    before a chunk are masked) and row indices, its KV head's K/V base pointers (native GQA: query head ``h``
    reads KV head ``h // heads_per_kv``) and the head's prefix / sink / band."""
    b = bh // num_heads
    kv = h // heads_per_kv
    row_ok = (rows < length) & (rows >= q_offset - seq_start)
    # row start + p of a whole prefill's q; a chunk's q and output bases are shifted back by
    # q_offset rows (_program_rows shifts out_head), cheaper than shifting every row index
    q_rows = (seq_start + rows).to(tl.int64)
    q_head = (q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              - q_offset.to(tl.int64) * stride_qn)
    q = tl.load(q_head + q_rows[:, None] * stride_qn + dims[None, :],
                mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    k_head = k_ptr + b.to(tl.int64) * stride_kb + kv.to(tl.int64) * stride_kh
    v_head = v_ptr + b.to(tl.int64) * stride_vb + kv.to(tl.int64) * stride_vh
    # MODE 1 counts [nq, n] per head at row seq_start + p - q_offset (_visit_tile adds seq_start + p)
    count_head = count_ptr + (bh.to(tl.int64) * (n - q_offset) - q_offset) * n
    prefix = tl.maximum(tl.load(prefix_ptr + h), 0)   # >= 0: every range below starts in [0, m0]
    sink = tl.load(sink_ptr + h)
    band = tl.load(band_ptr + h)
    return row_ok, q_rows, q, k_head, v_head, count_head, prefix, sink, band


@triton.jit
def _store_rows(out_head, q_rows, row_ok, dims, acc, l_i, stride_on, HEAD_DIM: tl.constexpr):
    """Normalise the running softmax and store the program's real rows."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_head + q_rows[:, None] * stride_on + dims[None, :], out.to(out_head.dtype.element_ty),
             mask=row_ok[:, None] & (dims[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _sparse_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, count_ptr,
        seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, last_ptr,
        tile_start_ptr, tile_end_ptr, tiles_upto_ptr,
        columns_ptr, columns_upto_ptr, covered_ptr,
        blocks_ptr, block_count_ptr,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        n, num_heads, heads_per_kv, num_q_blocks, num_programs, q_offset,
        max_tiles, max_columns, max_blocks, covered_len,
        qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr = 1):
    m, bh, h, seq_start, length, m0, rows, dims, out_head = _program_rows(
        seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads, num_programs,
        q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, MODE, GROUP)
    table_row = bh.to(tl.int64) * num_q_blocks + m          # this block's row of the per-block tables

    if (m0 < length) & (m0 + BLOCK_M > q_offset - seq_start):     # the block holds rows of q
        row_ok, q_rows, q, k_head, v_head, count_head, prefix, sink, band = _program_operands(
            q_ptr, k_ptr, v_ptr, count_ptr, prefix_ptr, sink_ptr, band_ptr, bh, h, seq_start, length, rows, dims,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh,
            n, q_offset, num_heads, heads_per_kv, HEAD_DIM)
        # dense rows at the end (a head's `last`): every key below the block, no band, no other range
        last = tl.load(last_ptr + h)
        dense_rows = (last > 0) & (m0 + BLOCK_M > length - last)
        prefix = tl.where(dense_rows, m0, prefix)
        band = tl.where(dense_rows, _WIDE, band)

        state = _initial_state(BLOCK_M, BLOCK_D)
        ctx = _context(q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, band,
                       qk_scale)
        offs_b = tl.arange(0, BLOCK_M)

        # Phases 1-4 visit keys strictly below the block (j < m0 <= every row): no causal test.
        # 1. prefix range [0, min(prefix, m0)): sinks / forced columns / dense; always in pattern
        prefix_end = tl.minimum(prefix, m0)
        state = _visit_range(state, ctx, 0, prefix_end, prefix_end, BLOCK_N, HEAD_DIM, BLOCK_D, MODE, False)

        # 2. slash-group tiles, one flat loop: keys [max(m0 + start, prefix), min(m0 + end, m0)).
        #    Tiles come nearest-the-diagonal first, so only an A-shape head's last tile reaches
        #    past its band (i - j >= local); that one gets the element test, the others the 1D
        #    key mask.
        num_tiles = tl.minimum(tl.maximum(tl.load(tiles_upto_ptr + table_row), 0), max_tiles)
        num_tiles = tl.where(dense_rows, 0, num_tiles)
        tile_base = bh.to(tl.int64) * max_tiles
        num_plain = tl.where(band < n, tl.maximum(num_tiles - 1, 0), num_tiles)
        state = _visit_group_tiles(state, ctx, tile_start_ptr, tile_end_ptr, tile_base, num_plain, num_tiles, m0,
                                   prefix, BLOCK_M, HEAD_DIM, BLOCK_D, MODE, True)
        state = _visit_group_tiles(state, ctx, tile_start_ptr, tile_end_ptr, tile_base, 0, num_plain, m0,
                                   prefix, BLOCK_M, HEAD_DIM, BLOCK_D, MODE, False)

        # 3. block-sparse key blocks: ascending, the last is the diagonal (left to phase 5)
        num_blocks = tl.minimum(tl.maximum(tl.load(block_count_ptr + table_row), 0), max_blocks)
        num_blocks = tl.where(dense_rows, 0, num_blocks)
        for t in range(0, num_blocks - 1):
            key_block = tl.load(blocks_ptr + table_row * max_blocks + t)
            key_block = tl.where((key_block >= 0) & (key_block < m), key_block, m)   # else: all masked
            key_pos = key_block * BLOCK_M + offs_b
            state = _visit_tile(state, ctx, key_pos, key_pos < m0, HEAD_DIM, BLOCK_D, MODE, False)

        # 4. extra columns below the block, minus those a group interval covered for it
        num_columns = tl.minimum(tl.maximum(tl.load(columns_upto_ptr + table_row), 0), max_columns)
        num_columns = tl.where(dense_rows, 0, num_columns)
        column_base = bh.to(tl.int64) * max_columns
        covered_base = bh.to(tl.int64) * covered_len + m0 + (BLOCK_M - 1)
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, num_columns, BLOCK_C):
            listed = c0 + offs_c < num_columns
            key_pos = tl.load(columns_ptr + column_base + c0 + offs_c, mask=listed, other=0)
            listed = listed & (key_pos >= 0) & (key_pos < m0)
            is_covered = tl.load(covered_ptr + covered_base - key_pos, mask=listed, other=1)
            state = _visit_tile(state, ctx, key_pos, is_covered == 0, HEAD_DIM, BLOCK_D, MODE, False)

        # 5. the diagonal tile [m0, m0 + 64): selected by every pattern, exact element test
        key_pos = m0 + offs_b
        acc, m_i, l_i, pairs = _visit_tile(state, ctx, key_pos, key_pos < length, HEAD_DIM, BLOCK_D, MODE, True)

        if MODE == 0:
            _store_rows(out_head, q_rows, row_ok, dims, acc, l_i, stride_on, HEAD_DIM)
        elif MODE >= 2:
            tl.store(count_ptr + table_row, pairs)
    else:
        if MODE >= 2:
            tl.store(count_ptr + table_row, 0)



@triton.jit
def _dense_block(seq_start_ptr, seq_len_ptr, last_ptr, n, num_heads, q_offset, BLOCK_M: tl.constexpr):
    """Program ``(.., j, b * H + h)`` of the two split kernels -> ``(b, h, seq_start, length, m0,
    live)``: the ``j``-th of head ``h``'s dense-rows blocks (``last > 0``, ``m0 + 64 > len -
    last``), live if it exists and holds rows of the chunk."""
    j = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // num_heads
    h = bh % num_heads
    seq_start = tl.minimum(tl.maximum(tl.load(seq_start_ptr + b), 0), n)
    length = tl.minimum(tl.maximum(tl.load(seq_len_ptr + b), 0), n - seq_start)
    last = tl.load(last_ptr + h)
    m0 = (tl.maximum(length - last, 0) // BLOCK_M + j) * BLOCK_M
    live = (last > 0) & (m0 < length) & (m0 + BLOCK_M > q_offset - seq_start)
    return bh, b, h, seq_start, length, m0, live


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _dense_rows_part_kernel(
        q_ptr, k_ptr, v_ptr, part_ptr,
        seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, last_ptr,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        n, num_heads, heads_per_kv, q_offset, num_blocks, splits,
        qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """A chunk's dense-rows blocks with their keys split: program ``(s, j, b * H + h)`` folds
    part ``s`` of ``splits`` of the key tiles below block ``j`` of :func:`_dense_block` (the
    last part also the diagonal tile, exact test) into a running softmax and stores it
    unnormalised: ``part[bh, j, s]`` = O (``BLOCK_M x BLOCK_D``), then the row max and the row sum.
    One program would walk every key below the block alone (2048 tiles at 128K) while the
    chunk's other blocks take tens; :func:`_dense_rows_merge_kernel` combines the parts."""
    s = tl.program_id(0)
    bh, b, h, seq_start, length, m0, live = _dense_block(seq_start_ptr, seq_len_ptr, last_ptr, n, num_heads,
                                                           q_offset, BLOCK_M)
    if live:
        rows = m0 + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok, q_rows, q, k_head, v_head, count_head, prefix, sink, band = _program_operands(
            q_ptr, k_ptr, v_ptr, part_ptr, prefix_ptr, sink_ptr, band_ptr, bh, h, seq_start, length, rows, dims,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh,
            n, q_offset, num_heads, heads_per_kv, HEAD_DIM)
        ctx = _context(q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, _WIDE,
                       qk_scale)
        tiles = m0 // BLOCK_M
        lo = (s * tiles) // splits * BLOCK_M
        hi = ((s + 1) * tiles) // splits * BLOCK_M
        state = _visit_range(_initial_state(BLOCK_M, BLOCK_D), ctx, lo, hi, m0, BLOCK_M, HEAD_DIM, BLOCK_D, 0,
                             False)
        key_pos = m0 + tl.arange(0, BLOCK_M)            # the diagonal, in the last part only
        bound = tl.where(s == splits - 1, length, 0)
        acc, m_i, l_i, _ = _visit_tile(state, ctx, key_pos, key_pos < bound, HEAD_DIM, BLOCK_D, 0, True)
        offs_m = tl.arange(0, BLOCK_M)
        part = part_ptr + ((bh.to(tl.int64) * num_blocks + tl.program_id(1)) * splits + s) * (BLOCK_M * (BLOCK_D + 2))
        tl.store(part + offs_m[:, None] * BLOCK_D + dims[None, :], acc)
        tl.store(part + BLOCK_M * BLOCK_D + offs_m, m_i)
        tl.store(part + BLOCK_M * (BLOCK_D + 1) + offs_m, l_i)


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _dense_rows_merge_kernel(
        out_ptr, part_ptr, seq_start_ptr, seq_len_ptr, last_ptr,
        stride_ob, stride_oh, stride_on,
        n, num_heads, q_offset, num_blocks, splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """Program ``(r, j, b * H + h)``: rows ``[r ROWS, (r + 1) ROWS)`` of block ``j``'s ``splits``
    parts of :func:`_dense_rows_part_kernel` combined (each rescaled to the common row max) and
    stored as the general kernel stores a block. ``BLOCK_M / ROWS`` programs share a block:
    each reads ``splits`` parts (64 at 128K), too long a serial walk for one program."""
    bh, b, h, seq_start, length, m0, live = _dense_block(seq_start_ptr, seq_len_ptr, last_ptr, n, num_heads,
                                                           q_offset, BLOCK_M)
    if live:
        offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        dims = tl.arange(0, BLOCK_D)
        base = part_ptr + (bh.to(tl.int64) * num_blocks + tl.program_id(1)) * splits * (BLOCK_M * (BLOCK_D + 2))
        step = BLOCK_M * (BLOCK_D + 2)
        m_all = tl.zeros([ROWS], dtype=tl.float32) - 1.0e30
        for s in range(splits):
            m_all = tl.maximum(m_all, tl.load(base + s * step + BLOCK_M * BLOCK_D + offs_m))
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        l_all = tl.zeros([ROWS], dtype=tl.float32)
        for s in range(splits):
            part = base + s * step
            scale = tl.math.exp2(tl.load(part + BLOCK_M * BLOCK_D + offs_m) - m_all)
            l_all += tl.load(part + BLOCK_M * (BLOCK_D + 1) + offs_m) * scale
            acc += tl.load(part + offs_m[:, None] * BLOCK_D + dims[None, :]) * scale[:, None]
        rows = m0 + offs_m
        row_ok = (rows < length) & (rows >= q_offset - seq_start)
        out_head = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                    - q_offset.to(tl.int64) * stride_on)
        _store_rows(out_head, (seq_start + rows).to(tl.int64), row_ok, dims, acc, l_all, stride_on, HEAD_DIM)


@triton.jit(do_not_specialize=_WIDE_LENGTH_ARGS)
def _wide_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, count_ptr,
        seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_ob, stride_oh, stride_on,
        n, num_heads, heads_per_kv, num_programs, num_q_blocks, q_offset,
        qk_scale,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, MODE: tl.constexpr, GROUP: tl.constexpr = 1):
    """Layers whose heads are all dense or A-shape (no data-dependent index): one program per
    ``BLOCK_M`` (128) query rows, so each K/V tile feeds two 64-row warpgroups.

    Per head (``prefix``, ``sink``, ``band`` from the index; dense: ``prefix = band = WIDE``),
    program rows ``[r0, r0 + BLOCK_M)``, every key visited once:

    1. ``[0, min(prefix, r0))``: sinks (A-shape) or everything below (dense), unmasked full
       tiles + at most one partial tile;
    2. the band edge ``[lo, e)`` with ``lo = max(prefix, r0 + 1 - band)``: keys some row of the
       program may not see (``i - j >= band``), exact element test; ``e`` is moved up so that
    3. the interior ``[e, r0)`` is a whole number of unmasked ``BLOCK_N`` tiles;
    4. the diagonal ``[r0, r0 + BLOCK_M)``, exact element test.

    Padding rows are zero-filled, and chunks (``q_offset > 0``) mapped, as in the general
    kernel. ``MODE`` 2 stores the pair count of the program at its first 64-row block (the
    caller zero-fills the table).
    """
    m, bh, h, seq_start, length, m0, rows, dims, out_head = _program_rows(
        seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads, num_programs,
        q_offset, HEAD_DIM, BLOCK_D, BLOCK_M, MODE, GROUP)

    if (m0 < length) & (m0 + BLOCK_M > q_offset - seq_start):     # the block holds rows of q
        row_ok, q_rows, q, k_head, v_head, count_head, prefix, sink, band = _program_operands(
            q_ptr, k_ptr, v_ptr, count_ptr, prefix_ptr, sink_ptr, band_ptr, bh, h, seq_start, length, rows, dims,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_vb, stride_vh,
            n, q_offset, num_heads, heads_per_kv, HEAD_DIM)

        state = _initial_state(BLOCK_M, BLOCK_D)
        ctx = _context(q, k_head, v_head, count_head, stride_kn, stride_vn, seq_start, n, rows, row_ok, sink, band,
                       qk_scale)

        # 1. prefix [0, min(prefix, m0)): below every row and inside the pattern
        prefix_end = tl.minimum(prefix, m0)
        prefix_full = (prefix_end // BLOCK_N) * BLOCK_N
        state = _visit_range(state, ctx, 0, prefix_full, prefix_end, BLOCK_N, HEAD_DIM, BLOCK_D, MODE, False, False)
        state = _visit_range(state, ctx, prefix_full, prefix_end, prefix_end, BLOCK_N, HEAD_DIM, BLOCK_D, MODE, False)

        # 2. band edge [lo, edge): exact test; keys >= m0 + BLOCK_M - band are in every row's band
        lo = tl.minimum(tl.maximum(prefix, m0 + 1 - band), m0)
        edge = tl.minimum(m0, tl.maximum(prefix, m0 + BLOCK_M - band))
        edge = tl.maximum(edge, lo)
        edge = m0 - ((m0 - edge) // BLOCK_N) * BLOCK_N     # interior = whole tiles
        state = _visit_range(state, ctx, lo, edge, edge, BLOCK_N, HEAD_DIM, BLOCK_D, MODE, True)
        # 3. interior [edge, m0): every pair selected, no mask
        state = _visit_range(state, ctx, edge, m0, m0, BLOCK_N, HEAD_DIM, BLOCK_D, MODE, False, False)
        # 4. diagonal [m0, m0 + BLOCK_M): exact element test
        acc, m_i, l_i, pairs = _visit_range(state, ctx, m0, m0 + BLOCK_M, length, BLOCK_N, HEAD_DIM, BLOCK_D, MODE,
                                            True)

        if MODE == 0:
            _store_rows(out_head, q_rows, row_ok, dims, acc, l_i, stride_on, HEAD_DIM)
        elif MODE >= 2:
            tl.store(count_ptr + bh.to(tl.int64) * num_q_blocks + m * (BLOCK_M // 64), pairs)


def _wide_ok(index: SparseIndex, block_d: int, cfg: dict) -> bool:
    """Use the 128-row kernel: every head dense or A-shape (not tri-shape: no ``last`` table
    there) and the accumulator fits."""
    return bool(cfg.get("wide")) and block_d <= 128 and all(
        h.kind in ("dense", "a_shape") for h in index.heads)


def _head_group(num_heads: int, num_kv_heads: int, cfg: dict) -> int:
    """Program order: 1 = all row blocks of one query head, then the next head; with
    ``cfg["group_heads"]`` the query heads of a GQA group interleave per row block
    (``_program_rows``)."""
    return num_heads // num_kv_heads if cfg.get("group_heads") else 1


def _programs(nq: int, n: int, rows: int) -> int:
    """Programs per head of ``rows``-row blocks: every block of a whole prefill (``nq = n``), or
    those a chunk of ``nq`` rows can overlap (its last row is the sequence's last)."""
    blocks = triton.cdiv(n, rows)
    return blocks if nq == n else min(triton.cdiv(nq, rows) + 1, blocks)


def _hopper(q, k, v, index: SparseIndex, scale: float, out, programs: int, variant: str) -> bool:
    """Opt-in (``MI_COMPILE_HOPPER``, :func:`~mi_compile.kernels.dispatch.hopper_opt_in`): the
    layer through a Gluon kernel when one takes it (sm_90, Gluon's Hopper API, fp16 / bf16,
    head dim 64 / 128, TMA-aligned K/V):
    ``variant`` ``"wide"`` / ``"ws"`` / ``"ws_persist"`` the wide layers' kernels of
    :mod:`mi_compile.kernels.hopper_wide`, ``"sparse"`` / ``"sparse_pipe"`` (software-pipelined) /
    ``"sparse_ws"`` (pipelined, fed by a producer warp) any index (:mod:`mi_compile.kernels.hopper_sparse`). False leaves the layer to the Triton kernels.
    The modules are imported here only, so a triton without Gluon never loads them otherwise."""
    from . import hopper_wide
    if not hopper_wide.usable(q, k, v, out):
        return False
    if variant.startswith("sparse"):
        from . import hopper_sparse
        compiled = hopper_sparse.launch(q, k, v, index, scale, out, programs, variant)
    else:
        compiled = hopper_wide.launch(q, k, v, index, scale, out, programs, variant)
    LAST_COMPILE.update(kernel=f"hopper_{variant}", mode=0, regs=getattr(compiled, "n_regs", None),
                        spills=getattr(compiled, "n_spills", None), shared=getattr(compiled, "shared", None))
    return True


def _launch(q, k, v, index: SparseIndex, scale: float, out, counts, mode: int):
    B, H, nq, D = q.shape
    n = k.shape[2]
    q_offset = n - nq
    nqb = index.num_query_blocks
    block_d = max(16, triton.next_power_of_2(D))
    cfg = dict(KERNEL_CONFIG)
    group = _head_group(H, k.shape[1], cfg)
    common = (q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              out.stride(0), out.stride(1), out.stride(2))
    if _wide_ok(index, block_d, cfg):
        wide_m = 2 * BLOCK
        programs = _programs(nq, n, wide_m)
        hopper = hopper_opt_in() if mode == 0 else None
        if hopper and _hopper(q, k, v, index, scale, out, programs, hopper.wide):
            return
        compiled = _wide_attention_kernel[(programs * group, B * H // group)](
            q, k, v, out, counts,
            index.seq_start, index.seq_len, index.prefix, index.sink, index.band,
            *common,
            n, H, H // k.shape[1], programs, nqb, q_offset,
            scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=wide_m, BLOCK_N=cfg["wide_block_n"], MODE=mode, GROUP=group,
                num_warps=cfg["wide_warps"], num_stages=cfg["wide_stages"])
        LAST_COMPILE.update(kernel="wide", mode=mode, regs=getattr(compiled, "n_regs", None),
                            spills=getattr(compiled, "n_spills", None),
                            shared=getattr(compiled, "shared", None))
        return
    # One warpgroup per 64-row block: 8 warps measured 2x slower at D=128 (H100, calls 1-2 of
    # benchmarks/NOTES.md); D=256 needs 8 to hold its 64x256 float32 accumulator.
    num_warps = cfg["num_warps"] or (4 if block_d <= 128 else 8)
    programs = _programs(nq, n, BLOCK)
    hopper = hopper_opt_in() if mode == 0 else None
    if hopper and hopper.sparse and _hopper(q, k, v, index, scale, out, programs, hopper.sparse):
        return
    grid = (programs * group, B * H // group)
    split = _dense_split(index, nq, n, mode, cfg)
    # with the split, the general kernel walks the dense-rows blocks as their heads' other blocks
    # (cheap); the merge kernel, launched after it on the stream, writes those rows over
    last = index.last if split is None else _no_dense_rows(index.last)
    compiled = _sparse_attention_kernel[grid](
        q, k, v, out, counts,
        index.seq_start, index.seq_len, index.prefix, index.sink, index.band, last,
        index.tile_start, index.tile_end, index.tiles_upto,
        index.columns, index.columns_upto, index.covered,
        index.blocks, index.block_count,
        *common,
        n, H, H // k.shape[1], nqb, programs, q_offset,
        index.tile_start.shape[-1], index.columns.shape[-1], index.blocks.shape[-1],
        index.covered.shape[-1],
        scale * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BLOCK, BLOCK_N=cfg["block_n"], BLOCK_C=cfg["block_c"], MODE=mode,
        GROUP=group,
        num_warps=num_warps, num_stages=cfg["num_stages"])
    LAST_COMPILE.update(kernel="general", mode=mode, regs=getattr(compiled, "n_regs", None),
                        spills=getattr(compiled, "n_spills", None), shared=getattr(compiled, "shared", None),
                        dense_splits=split[0] if split else None)
    if split is not None:
        splits, num_blocks = split
        part = torch.empty(B * H * num_blocks * splits * BLOCK * (block_d + 2), device=q.device, dtype=torch.float32)
        _dense_rows_part_kernel[(splits, num_blocks, B * H)](
            q, k, v, part,
            index.seq_start, index.seq_len, index.prefix, index.sink, index.band, index.last,
            *common[:9],
            n, H, H // k.shape[1], q_offset, num_blocks, splits,
            scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BLOCK, num_warps=num_warps, num_stages=cfg["num_stages"])
        _dense_rows_merge_kernel[(BLOCK // MERGE_ROWS, num_blocks, B * H)](
            out, part, index.seq_start, index.seq_len, index.last,
            *common[9:],
            n, H, q_offset, num_blocks, splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BLOCK, ROWS=MERGE_ROWS, num_warps=num_warps)


def _no_dense_rows(last: torch.Tensor) -> torch.Tensor:
    """A ``last`` table of zeros like ``last`` (cached per shape and device)."""
    return cached(("no_dense_rows", tuple(last.shape)), last.device, lambda: torch.zeros_like(last))


def _dense_split(index: SparseIndex, nq: int, n: int, mode: int, cfg: dict):
    """``(splits, blocks)`` when a chunk's dense-rows blocks (heads with ``last``) run with their
    keys split over ``splits`` programs (:func:`_dense_rows_part_kernel`), each ~``split_tiles``
    key tiles; ``blocks`` bounds a head's dense-rows blocks. None: the general kernel walks them
    (a whole prefill, where those blocks are few among many; short keys; attention not asked)."""
    per_part = cfg.get("split_tiles") or 0
    if mode != 0 or nq >= n or not index.max_last or per_part <= 0:
        return None
    splits = min(64, -(-(n // BLOCK) // per_part))
    if splits < 2:
        return None
    return splits, min(-(-index.max_last // BLOCK) + 1, index.num_query_blocks)


def sparse_attention_from_index(q, k, v, index: SparseIndex, scale: float,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel on an explicit index (inputs assumed validated). Writes every element
    of ``out`` (allocated when None) and returns it."""
    q, k, v = contiguous_last(q, k, v)
    if out is None:
        out = torch.empty_like(q)
    _launch(q, k, v, index, scale, out, index.prefix, mode=0)
    return out


def count_visited_pairs(q, k, v, index: SparseIndex) -> torch.Tensor:
    """int32 ``[B, H, nq, n]`` (tensor coordinates): how often the kernel visits each pair."""
    B, H, nq, _ = q.shape
    counts = torch.zeros(B, H, nq, k.shape[2], dtype=torch.int32, device=q.device)
    _launch(q, k, v, index, 1.0, q, counts, mode=1)
    return counts


def count_pairs_per_head(q, k, v, index: SparseIndex) -> torch.Tensor:
    """int64 ``[B, H]``: pairs the kernel computes per head (walks the index, no attention)."""
    B, H, _, _ = q.shape
    counts = torch.zeros(B, H, index.num_query_blocks, dtype=torch.int32, device=q.device)
    _launch(q, k, v, index, 1.0, q, counts, mode=2)
    return counts.sum(-1, dtype=torch.int64)


def count_tile_pairs_per_block(q, k, v, index: SparseIndex) -> torch.Tensor:
    """int32 ``[B, H, NQB]``: pairs of the tiles the kernel visits per 64-row query block,
    masked elements included (walks the index, no attention)."""
    B, H, _, _ = q.shape
    counts = torch.zeros(B, H, index.num_query_blocks, dtype=torch.int32, device=q.device)
    _launch(q, k, v, index, 1.0, q, counts, mode=3)
    return counts
