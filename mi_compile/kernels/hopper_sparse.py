"""Hopper (sm_90) kernel in Gluon for any layer's index (opt-in, ``MI_COMPILE_HOPPER``).

Same contract as :func:`mi_compile.kernels.sparse_attention._sparse_attention_kernel` in
attention mode: program ``(p, b * Hq + h)`` owns the 64 query rows of one block (heaviest
first, the chunk mapping of the Triton kernels), walks the block's entries of the
:class:`SparseIndex` and writes its rows (padding rows zero). Every selected pair is computed
once. Head dim 64 or 128, fp16 / bf16, native GQA, padded inputs, a chunk continuing a cache.

The walk is the Triton kernel's five phases, split by how their keys arrive:

* **ranges by TMA**, one flat tile sequence through a ``STAGES``-deep shared-memory ring (K
  and V each with an mbarrier per slot, loads issued ``STAGES`` tiles ahead):
  the prefix ``[0, min(prefix, m0))`` in 64-key tiles; the slash-group tiles (64-key windows
  ``[max(m0 + start, prefix), min(m0 + end, m0))`` starting anywhere: TMA takes any row); the
  block-sparse key blocks below the diagonal; the diagonal block ``[m0, m0 + 64)``;
* **gathered columns** (vertical-slash's columns that no slash window covered for this
  block), 64 at a time: loaded row by row into registers, written to shared memory, then the
  same two wgmma as a range tile. Hopper's TMA has no row gather (Blackwell's has).

S = Q K^T and O += P V are ``warpgroup_mma`` (one warpgroup: 64 rows x 64 keys), P from
registers, online softmax in float32 with ``exp2``. Masks as the Triton kernel's: the key
bound on every tile, the element test (causal, sink / band) on the diagonal and on the one
slash window of an A-shape head that reaches past its band, the covered test on columns.
"""
from __future__ import annotations

from .constants import BLOCK, WIDE
from . import hopper_wide
from .hopper_wide import GLUON_ERROR, LOG2E, _tma_strides, gl_dtype, kv_layout

NUM_WARPS = 4           # one warpgroup per 64-row block
# Ring depth per head dim (64-key tiles): small enough that two programs (one warpgroup each)
# share an SM, so one's softmax runs under the other's wgmma: 112 KiB at head dim 128 with 3
# slots, 72 KiB at 64 with 4 (benchmarks.kernel_resources; the timings that chose them:
# docs/kernels.md, "Any index in Gluon").
CONFIG = {64: {"stages": 4}, 128: {"stages": 3}}
# The warp-specialised variant: its producer warp issues TMA and does its tile arithmetic only;
# 128 registers a thread at launch for the 8 warps (the producer's padded to a warpgroup) leave
# 65536 / (2 x 256 x 128) = two programs an SM, the consumer getting the rest (216).
WS_PRODUCER_REGS = 40
WS_LAUNCH_REGS = 128
_LENGTH_ARGS = ["n", "num_q_blocks", "num_programs", "q_offset", "max_tiles", "max_columns", "max_blocks",
                "covered_len"]

usable = hopper_wide.usable
unavailable_reason = hopper_wide.unavailable_reason

if GLUON_ERROR is None:
    from .hopper_wide import (TensorDescriptor, _kv_ring, _load_tile, _program_block, _pv, _query_tile, _rescale,
                              _ring_tile, _scores, _scores_beside_pv, _store_rows, fence_async_shared, gl, gluon,
                              kernel_layouts, mbarrier, warpgroup_mma_wait)

    _wide = gl.constexpr(WIDE)
    _WS_PRODUCER_REGS = gl.constexpr(WS_PRODUCER_REGS)

    @gluon.jit
    def _range_tile(t, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                    tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base):
        """Tile ``t`` of the TMA sequence (prefix tiles, slash windows, key blocks, the
        diagonal): its first key, its key bound and whether it takes the element test."""
        BLOCK_N: gl.constexpr = 64
        in_grp = (t >= n_pre) & (t < n_pre + n_grp)
        in_blk = (t >= n_pre + n_grp) & (t < n_pre + n_grp + n_blk)
        in_diag = t >= n_pre + n_grp + n_blk
        g = t - n_pre
        hi = gl.minimum(m0 + gl.load(tile_end_ptr + tile_base + g, mask=in_grp, other=0), m0)
        lo = gl.minimum(gl.maximum(m0 + gl.load(tile_start_ptr + tile_base + g, mask=in_grp, other=0), prefix), hi)
        key_block = gl.load(blocks_ptr + block_base + (t - n_pre - n_grp), mask=in_blk, other=0)
        key_block = gl.where((key_block >= 0) & (key_block < m), key_block, m)      # else: all masked
        k0 = gl.where(in_diag, m0, gl.where(in_blk, key_block * BLOCK_N, gl.where(in_grp, lo, t * BLOCK_N)))
        bound = gl.where(in_diag, length, gl.where(in_blk, gl.where(key_block < m, m0, 0),
                                                   gl.where(in_grp, hi, prefix_end)))
        check = in_diag | (in_grp & (g >= n_plain))
        return k0, bound, check

    @gluon.jit
    def _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t, n_tiles, b, kv, seq_start,
               n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
               tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, STAGES: gl.constexpr):
        """Start the TMA loads of K and V tile ``t`` (if it exists) into its ring slot."""
        k0, bound, check = _range_tile(t, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                                       tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base)
        _load_tile(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t % STAGES, b, kv, seq_start + k0, t < n_tiles)

    @gluon.jit
    def _tile_keep(k0, bound, check, rows, cols, length, sink, band):
        """The pairs of a range tile the walk computes: keys below ``bound`` for real rows; with
        ``check`` also the element test (causal, sink / band)."""
        keys = k0 + cols
        keep = gl.expand_dims(keys < bound, 0) & gl.expand_dims(rows < length, 1)
        if check:
            keep = keep & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows, 1))
            keep = keep & (gl.expand_dims(keys < sink, 0) | (gl.expand_dims(rows, 1) - gl.expand_dims(keys, 0) < band))
        return keep

    @gluon.jit
    def _softmax_step(s, keep, m_i, l_i, qk_scale):
        """Scores -> (P, the rescale factor of O, running max, running sum): ``keep``-masked,
        online softmax in float32 with ``exp2``."""
        s = gl.where(keep, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - gl.expand_dims(m_new, 1))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _fold(q_smem, k_tile, v_tile, acc, m_i, l_i, keep, qk_scale, L: gl.constexpr, v_bar, v_phase,
              WAIT_V: gl.constexpr):
        """One tile into the running softmax: S = Q K^T (wgmma), ``keep``-masked, online
        softmax, O += P V (wgmma; with ``WAIT_V`` after V's mbarrier phase ``v_phase``)."""
        s = _scores(q_smem, k_tile, L)
        p, alpha, m_new, l_i = _softmax_step(s, keep, m_i, l_i, qk_scale)
        acc, p_op = _rescale(acc, alpha, p, L, q_smem.dtype)
        if WAIT_V:
            mbarrier.wait(v_bar, v_phase)
        acc = _pv(p_op, v_tile, acc)
        return acc, m_new, l_i

    @gluon.jit
    def _pipelined_tiles(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, b, kv, seq_start,
                         n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                         tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base,
                         sink, band, qk_scale, rows, acc, m_i, l_i, L: gl.constexpr, PRODUCER: gl.constexpr):
        """The range tiles software-pipelined (FA3's intra-warpgroup overlap): iteration t >= 1
        issues S_t = Q K_t^T and O += P_{t-1} V_{t-1}, waits for S_t alone, runs tile t's softmax
        while the P V wgmma is in flight, then waits for it and lets tile t-1's slot go: to the
        producer warp (``PRODUCER``: an arrival on ``free_bar``) or, after a CTA barrier, refilled
        here with tile ``t - 1 + STAGES`` (then ``free_bar`` is unused)."""
        STAGES: gl.constexpr = k_ring.shape[0]
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        dtype: gl.constexpr = q_smem.dtype
        cols = gl.arange(0, BLOCK_N, layout=L.s_cols)
        k0, bound, check = _range_tile(0, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                                       tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base)
        keep = _tile_keep(k0, bound, check, rows, cols, length, sink, band)
        mbarrier.wait(k_bar.index(0), 0)
        s = _scores(q_smem, _ring_tile(k_ring, 0), L)
        p, alpha, m_i, l_i = _softmax_step(s, keep, m_i, l_i, qk_scale)
        p_op = gl.convert_layout(p.to(dtype), L.p)
        mbarrier.wait(v_bar.index(0), 0)
        for t in range(1, n_tiles):
            slot = t % STAGES
            prev = (t - 1) % STAGES
            k0, bound, check = _range_tile(t, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                                           tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base)
            keep = _tile_keep(k0, bound, check, rows, cols, length, sink, band)
            mbarrier.wait(k_bar.index(slot), (t // STAGES) & 1)
            s, acc = _scores_beside_pv(q_smem, _ring_tile(k_ring, slot), p_op, _ring_tile(v_ring, prev), acc, L)
            p, alpha, m_i, l_i = _softmax_step(s, keep, m_i, l_i, qk_scale)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if PRODUCER:
                mbarrier.arrive(free_bar.index(prev), count=1)
            else:
                gl.thread_barrier()       # every warp is done with tile t-1's slot: refill it
                _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t - 1 + STAGES, n_tiles, b, kv, seq_start,
                       n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                       tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, STAGES)
            acc, p_op = _rescale(acc, alpha, p, L, dtype)
            mbarrier.wait(v_bar.index(slot), (t // STAGES) & 1)
        acc = _pv(p_op, _ring_tile(v_ring, (n_tiles - 1) % STAGES), acc)
        return acc, m_i, l_i

    @gluon.jit
    def _gathered_columns(q_smem, kc_smem, vc_smem, acc, m_i, l_i, n_col, rows, length,
                          columns_ptr, covered_ptr, bh, max_columns, covered_len, m0,
                          k_ptr, v_ptr, b, kv, seq_start, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, qk_scale, v_bar, L: gl.constexpr):
        """The block's ``n_col`` listed columns below it that no slash window covered, 64 at a
        time: gathered row by row into registers, stored to ``kc_smem`` / ``vc_smem``, folded in
        by the same two wgmma as a range tile."""
        BLOCK_M: gl.constexpr = 64
        BLOCK_N: gl.constexpr = kc_smem.shape[0]
        HEAD_DIM: gl.constexpr = kc_smem.shape[1]
        column_base = bh.to(gl.int64) * max_columns
        covered_base = bh.to(gl.int64) * covered_len + m0 + (BLOCK_M - 1)
        k_head = k_ptr + b.to(gl.int64) * stride_kb + kv.to(gl.int64) * stride_kh
        v_head = v_ptr + b.to(gl.int64) * stride_vb + kv.to(gl.int64) * stride_vh
        offs_c = gl.arange(0, BLOCK_N, layout=L.io_rows)
        io_dims = gl.arange(0, HEAD_DIM, layout=L.io_cols)
        for c0 in range(0, n_col, BLOCK_N):
            listed = c0 + offs_c < n_col
            key_pos = gl.load(columns_ptr + column_base + c0 + offs_c, mask=listed, other=0)
            listed = listed & (key_pos >= 0) & (key_pos < m0)
            covered = gl.load(covered_ptr + covered_base - key_pos, mask=listed, other=1)
            take = listed & (covered == 0)
            key_rows = gl.expand_dims((seq_start + key_pos).to(gl.int64), 1)
            load_ok = gl.expand_dims(take, 1) & gl.expand_dims(io_dims < HEAD_DIM, 0)
            k_tile = gl.load(k_head + key_rows * stride_kn + gl.expand_dims(io_dims, 0), mask=load_ok, other=0.0)
            v_tile = gl.load(v_head + key_rows * stride_vn + gl.expand_dims(io_dims, 0), mask=load_ok, other=0.0)
            gl.thread_barrier()   # the previous columns' wgmma are done in every warp
            kc_smem.store(k_tile)
            vc_smem.store(v_tile)
            fence_async_shared()
            gl.thread_barrier()
            keep = gl.expand_dims(gl.convert_layout(take, L.s_cols), 0) & gl.expand_dims(rows < length, 1)
            acc, m_i, l_i = _fold(q_smem, kc_smem, vc_smem, acc, m_i, l_i, keep, qk_scale,
                                  L, v_bar.index(0), 0, False)
        return acc, m_i, l_i

    @gluon.jit
    def _warp_specialized(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, b, kv, seq_start, length,
                          n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, sink, band,
                          tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, qk_scale,
                          dense_rows, columns_ptr, columns_upto_ptr, covered_ptr, table_row, bh,
                          max_columns, covered_len, k_ptr, v_ptr, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, out_head, stride_on, q_offset, STAGES: gl.constexpr):
        """``WARP_SPECIALIZE``: the block's walk split between the launch's warpgroup, which
        computes (:func:`_ws_consume`), and one producer warp, which issues every range tile's
        TMA loads as soon as the consumer released the tile's slot (:func:`_ws_produce`): no CTA
        barrier per tile, the loads run ``STAGES`` tiles ahead through every phase."""
        free_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(free_bar.index(i), count=1)
        n_col = gl.minimum(gl.maximum(gl.load(columns_upto_ptr + table_row), 0), max_columns)
        n_col = gl.where(dense_rows, 0, n_col)
        gl.thread_barrier()
        walk = (n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base)
        gl.warp_specialize([
            (_ws_consume, (q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar) + walk
             + (sink, band, qk_scale, n_col, columns_ptr, covered_ptr, bh, max_columns, covered_len,
                k_ptr, v_ptr, b, kv, seq_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                out_head, stride_on, q_offset)),
            (_ws_produce, (k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, b, kv, seq_start) + walk),
        ], [1], [_WS_PRODUCER_REGS])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(free_bar.index(i))
            mbarrier.invalidate(k_bar.index(i))
            mbarrier.invalidate(v_bar.index(i))

    # Partition functions take no constexpr arguments (warp_specialize passes them as IR values):
    # ring depth, tile width and head dim come from the shared buffers' shapes.
    @gluon.jit
    def _ws_produce(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, b, kv, seq_start,
                    n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                    tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base):
        """The producer warp: range tile ``t``'s K and V by TMA into slot ``t % STAGES`` once the
        consumer released the slot's previous tile (``free_bar``)."""
        STAGES: gl.constexpr = k_ring.shape[0]
        for t in range(n_tiles):
            slot = t % STAGES
            mbarrier.wait(free_bar.index(slot), ((t // STAGES) + 1) & 1, pred=t >= STAGES)
            _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t, n_tiles, b, kv, seq_start,
                   n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                   tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, STAGES)

    @gluon.jit
    def _ws_consume(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar,
                    n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                    tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base,
                    sink, band, qk_scale, n_col, columns_ptr, covered_ptr, bh, max_columns, covered_len,
                    k_ptr, v_ptr, b, kv, seq_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                    out_head, stride_on, q_offset):
        """The consumer warpgroup: the range tiles software-pipelined as the ``PIPELINE`` loop
        (S_t beside P_{t-1} V_{t-1}), each slot released to the producer once its P V wgmma is
        done; then the gathered columns through ring slot 0 (every load has landed by then) and
        the block's rows of the output."""
        BLOCK_N: gl.constexpr = k_ring.shape[3]
        HEAD_DIM: gl.constexpr = k_ring.shape[4]
        L: gl.constexpr = kernel_layouts(4, BLOCK_N, HEAD_DIM)
        rows = m0 + gl.arange(0, 64, layout=L.s_rows)
        m_i = gl.full([64], -1.0e30, gl.float32, L.s_rows)
        l_i = gl.zeros([64], gl.float32, L.s_rows)
        acc = gl.zeros([64, HEAD_DIM], gl.float32, L.o)
        acc, m_i, l_i = _pipelined_tiles(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, free_bar, b, kv,
                                         seq_start, n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m,
                                         m0, length, tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base,
                                         sink, band, qk_scale, rows, acc, m_i, l_i, L, True)
        if n_col > 0:
            acc, m_i, l_i = _gathered_columns(q_smem, _ring_tile(k_ring, 0), _ring_tile(v_ring, 0), acc, m_i, l_i,
                                              n_col, rows, length, columns_ptr, covered_ptr, bh, max_columns,
                                              covered_len, m0, k_ptr, v_ptr, b, kv, seq_start, stride_kb, stride_kh,
                                              stride_kn, stride_vb, stride_vh, stride_vn, qk_scale, v_bar, L)
        _store_rows(acc, l_i, out_head, stride_on, m0, seq_start, length, q_offset, L)

    @gluon.jit(do_not_specialize=_LENGTH_ARGS)
    def hopper_sparse_kernel(
            q_ptr, k_ptr, v_ptr, k_desc, v_desc, out_ptr,
            seq_start_ptr, seq_len_ptr, prefix_ptr, sink_ptr, band_ptr, last_ptr,
            tile_start_ptr, tile_end_ptr, tiles_upto_ptr,
            columns_ptr, columns_upto_ptr, covered_ptr,
            blocks_ptr, block_count_ptr,
            q_strides, k_strides, v_strides, out_strides,
            n, num_heads, heads_per_kv, num_q_blocks, num_programs, q_offset,
            max_tiles, max_columns, max_blocks, covered_len,
            qk_scale,
            HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, PIPELINE: gl.constexpr,
            WARP_SPECIALIZE: gl.constexpr = False):
        BLOCK_M: gl.constexpr = 64
        BLOCK_N: gl.constexpr = 64
        dtype: gl.constexpr = q_ptr.dtype.element_ty
        L: gl.constexpr = kernel_layouts(4, BLOCK_N, HEAD_DIM)
        stride_qb, stride_qh, stride_qn = q_strides         # (batch, head, row) of each tensor
        stride_kb, stride_kh, stride_kn = k_strides
        stride_vb, stride_vh, stride_vn = v_strides
        stride_ob, stride_oh, stride_on = out_strides

        b, h, kv, seq_start, length, m, out_head = _program_block(
            seq_start_ptr, seq_len_ptr, out_ptr, stride_ob, stride_oh, stride_on, n, num_heads, heads_per_kv,
            num_programs, q_offset, L, BLOCK_M, HEAD_DIM)
        m0 = m * BLOCK_M
        bh = b * num_heads + h
        table_row = bh.to(gl.int64) * num_q_blocks + m

        if (m0 < length) & (m0 + BLOCK_M > q_offset - seq_start):     # the block holds rows of q
            q_smem = _query_tile(q_ptr, b, h, seq_start, length, m0, q_offset, stride_qb, stride_qh, stride_qn,
                                 L, BLOCK_M, HEAD_DIM)

            k_ring, v_ring, k_bar, v_bar = _kv_ring(k_desc, v_desc, STAGES, BLOCK_N, HEAD_DIM)
            fence_async_shared()
            gl.thread_barrier()

            # the head's ranges; a block over the prompt's last `last` rows is dense (every key
            # below it, no band, no table entry)
            prefix = gl.maximum(gl.load(prefix_ptr + h), 0)
            sink = gl.load(sink_ptr + h)
            band = gl.load(band_ptr + h)
            last = gl.load(last_ptr + h)
            dense_rows = (last > 0) & (m0 + BLOCK_M > length - last)
            prefix = gl.where(dense_rows, m0, prefix)
            band = gl.where(dense_rows, _wide, band)
            prefix_end = gl.minimum(prefix, m0)
            n_pre = (prefix_end + BLOCK_N - 1) // BLOCK_N
            n_grp = gl.minimum(gl.maximum(gl.load(tiles_upto_ptr + table_row), 0), max_tiles)
            n_grp = gl.where(dense_rows, 0, n_grp)
            n_plain = gl.where(band < n, gl.maximum(n_grp - 1, 0), n_grp)
            n_blk = gl.minimum(gl.maximum(gl.load(block_count_ptr + table_row), 0), max_blocks)
            n_blk = gl.maximum(gl.where(dense_rows, 0, n_blk) - 1, 0)    # the last block is the diagonal
            n_tiles = n_pre + n_grp + n_blk + 1
            tile_base = bh.to(gl.int64) * max_tiles
            block_base = table_row * max_blocks

            if WARP_SPECIALIZE:
                _warp_specialized(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, b, kv, seq_start, length,
                                  n_tiles, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, sink, band,
                                  tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, qk_scale,
                                  dense_rows, columns_ptr, columns_upto_ptr, covered_ptr, table_row, bh,
                                  max_columns, covered_len, k_ptr, v_ptr, stride_kb, stride_kh, stride_kn,
                                  stride_vb, stride_vh, stride_vn, out_head, stride_on, q_offset, STAGES)
            else:
                for i in gl.static_range(STAGES):
                    _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, i, n_tiles, b, kv, seq_start,
                           n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                           tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, STAGES)

                rows = m0 + gl.arange(0, BLOCK_M, layout=L.s_rows)
                cols = gl.arange(0, BLOCK_N, layout=L.s_cols)
                m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, L.s_rows)
                l_i = gl.zeros([BLOCK_M], gl.float32, L.s_rows)
                acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, L.o)
                if PIPELINE:
                    acc, m_i, l_i = _pipelined_tiles(q_smem, k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, k_bar, b,
                                                     kv, seq_start, n_tiles, n_pre, n_grp, n_plain, n_blk, prefix,
                                                     prefix_end, m, m0, length, tile_start_ptr, tile_end_ptr, tile_base,
                                                     blocks_ptr, block_base, sink, band, qk_scale, rows, acc, m_i, l_i,
                                                     L, False)
                else:
                    for t in range(n_tiles):
                        k0, bound, check = _range_tile(t, n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0,
                                                       length, tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr,
                                                       block_base)
                        slot = t % STAGES
                        phase = (t // STAGES) & 1
                        keep = _tile_keep(k0, bound, check, rows, cols, length, sink, band)
                        mbarrier.wait(k_bar.index(slot), phase)
                        acc, m_i, l_i = _fold(q_smem, _ring_tile(k_ring, slot), _ring_tile(v_ring, slot), acc, m_i, l_i,
                                              keep, qk_scale, L, v_bar.index(slot), phase, True)
                        gl.thread_barrier()       # every warp is done with the slot: refill it
                        _issue(k_desc, v_desc, k_ring, v_ring, k_bar, v_bar, t + STAGES, n_tiles, b, kv, seq_start,
                               n_pre, n_grp, n_plain, n_blk, prefix, prefix_end, m, m0, length,
                               tile_start_ptr, tile_end_ptr, tile_base, blocks_ptr, block_base, STAGES)
                for i in gl.static_range(STAGES):
                    mbarrier.invalidate(k_bar.index(i))
                    mbarrier.invalidate(v_bar.index(i))

                # gathered columns below the block, minus those a slash window covered for it
                n_col = gl.minimum(gl.maximum(gl.load(columns_upto_ptr + table_row), 0), max_columns)
                n_col = gl.where(dense_rows, 0, n_col)
                if n_col > 0:
                    c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
                    kc_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], c_layout)
                    vc_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], c_layout)
                    acc, m_i, l_i = _gathered_columns(q_smem, kc_smem, vc_smem, acc, m_i, l_i, n_col, rows, length,
                                                      columns_ptr, covered_ptr, bh, max_columns, covered_len, m0,
                                                      k_ptr, v_ptr, b, kv, seq_start, stride_kb, stride_kh, stride_kn,
                                                      stride_vb, stride_vh, stride_vn, qk_scale, v_bar, L)

                _store_rows(acc, l_i, out_head, stride_on, m0, seq_start, length, q_offset, L)


VARIANTS = ("sparse", "sparse_pipe", "sparse_ws")


def launch(q, k, v, index, scale: float, out, programs: int, variant: str = "sparse"):
    """Attention of the layer into ``out`` from ``index`` (``programs`` 64-row programs per
    head, as the general Triton kernel's launch computes them) by the ``variant`` kernel:
    ``"sparse"`` one loop, ``"sparse_pipe"`` the range tiles software-pipelined (FA3's
    intra-warpgroup overlap), ``"sparse_ws"`` that loop fed by a producer warp (warp
    specialisation). Returns the compiled kernel."""
    if GLUON_ERROR is not None:
        raise RuntimeError(GLUON_ERROR)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    B, H, nq, D = q.shape
    n = k.shape[2]
    layout = kv_layout(gl_dtype(q.dtype), BLOCK, D)
    box = [1, 1, BLOCK, D]
    k_desc = TensorDescriptor(k, list(k.shape), _tma_strides(k), box, layout)
    v_desc = TensorDescriptor(v, list(v.shape), _tma_strides(v), box, layout)
    return hopper_sparse_kernel[(programs, B * H)](
        q, k, v, k_desc, v_desc, out,
        index.seq_start, index.seq_len, index.prefix, index.sink, index.band, index.last,
        index.tile_start, index.tile_end, index.tiles_upto,
        index.columns, index.columns_upto, index.covered,
        index.blocks, index.block_count,
        q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3],
        n, H, H // k.shape[1], index.num_query_blocks, programs, n - nq,
        index.tile_start.shape[-1], index.columns.shape[-1], index.blocks.shape[-1], index.covered.shape[-1],
        scale * LOG2E,
        HEAD_DIM=D, STAGES=CONFIG[D]["stages"], PIPELINE=variant != "sparse", WARP_SPECIALIZE=variant == "sparse_ws",
        num_warps=NUM_WARPS, **launch_options(variant))


def launch_options(variant: str) -> dict:
    """Launch options beyond the warps: the warp-specialised kernel starts its two partitions
    (a warpgroup and the producer warp padded to one) at ``WS_LAUNCH_REGS`` registers a thread,
    so two programs share an SM as the other variants' do; ``setmaxnreg`` then moves the
    producer's unused registers to the consumer."""
    return {"maxnreg": WS_LAUNCH_REGS} if variant == "sparse_ws" else {}
