"""Triton kernel for the XAttention block estimate: antidiagonal-sampled attention mass per
(query block, key block), all heads of a layer in one launch.

What it computes is defined by :func:`mi_compile.patterns.xattention.block_mass_torch` (the
PyTorch reference the tests compare against); in short, with stride ``S`` and sequence
coordinates: strided query row ``u`` holds the queries ``uS + r`` and strided key column
``w`` the keys ``wS + S - 1 - r`` (``r < S``, reversed: an antidiagonal of the ``S x S`` cell),
its logit is ``scale / S * sum_r q[uS + r] . k[wS + S - 1 - r]``; a causal softmax over
``w <= u`` per strided row, then the probabilities summed into 64 x 64 blocks and divided by
the block's live strided rows: ``mass[m, c]``, summing to 1 over ``c <= m``.

Grid ``(B * heads, programs)``: a program owns ``U`` strided rows (``U S / 64`` query blocks;
``U = 128``, or 64 past head dim 128, so that a tile's operands fit in shared memory) and walks
the causal key tiles of ``U`` strided columns. A logit tile is ``S`` dots of ``[U, D] x [D, U]``,
one per residue ``r`` (the query rows ``uS + r`` against the key rows ``wS + S - 1 - r``, both
plain strided loads): the shapes Hopper's ``wgmma`` takes, which one dot of width ``S * D``
on 16 rows does not get (docs/kernels.md). Two passes over the causal key tiles: online
max / sum of exp, then the normalised tile reduced to its blocks. Query head ``h`` reads KV
head ``h // group`` (native GQA). Output: float32 ``[B, heads, NQB, NQB]``
(``n^2 / 4096`` entries per head: 16 MiB per head at 128K), written where ``c <= m`` and zero
elsewhere. No host synchronisation (lengths are read on the device).

A chunk (q has ``nq < n`` rows, query row ``r`` is key position ``n - nq + r``): query
position ``p`` is q row ``start + p - (n - nq)``, positions before the chunk load as zeros and
a strided row is live when it holds a chunk row (``uS + S > n - nq - start``). The grid is
``min(ceil(nq / (U S)) + 1, ceil(NQB / QB))`` programs per head, the last ones of the
sequence (program ``i`` owns unit ``max(ceil(len / (U S)) - programs, 0) + i``; a unit wholly
before the chunk exits), so a chunk costs its rows' share; with ``nq = n`` this is the whole
prefill's grid.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .sparse_attention import LOG2E

_LENGTH_ARGS = ["n", "nqb", "q_offset"]


@triton.jit
def _strided_logits(q_head, k_head, start, q_lo, length, u, t, stride_qn, stride_kn, qk_scale,
                    S: tl.constexpr, U: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """log2-scaled strided logits ``[U, U]`` of the strided rows ``u`` against key tile ``t``
    (``U`` strided columns); -inf where not causal (``w > u``) or the cell lies past the end.
    Query position ``p`` is q row ``p - q_lo`` (``q_lo``: the position of q's first row,
    ``-start`` for a whole prefill); those before ``q_lo`` load as zeros."""
    d = tl.arange(0, BLOCK_D)
    w = t * U + tl.arange(0, U)
    s = tl.zeros([U, U], dtype=tl.float32)
    for r in range(S):
        qpos = u * S + r
        kpos = w * S + (S - 1 - r)
        qv = tl.load(q_head + (qpos - q_lo).to(tl.int64)[:, None] * stride_qn + d[None, :],
                     mask=((qpos < length) & (qpos >= q_lo))[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        kv = tl.load(k_head + (start + kpos).to(tl.int64)[:, None] * stride_kn + d[None, :],
                     mask=(kpos < length)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        if qv.dtype == tl.float32:
            s = tl.dot(qv, tl.trans(kv), s, input_precision="ieee")
        else:
            s = tl.dot(qv, tl.trans(kv), s)
    live = (w[None, :] <= u[:, None]) & (w * S < length)[None, :]
    return tl.where(live, s * qk_scale, float("-inf"))


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _block_mass_kernel(q_ptr, k_ptr, out_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       n, nqb, num_sel, group, q_offset, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
                       U: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // num_sel
    head = tl.load(head_ids_ptr + pid_bh % num_sel)
    kvh = head // group
    start = tl.load(seq_start_ptr + b)
    length = tl.load(seq_len_ptr + b)
    # the last programs of the sequence (all of them for a whole prefill); q_lo: the position
    # of q's first row (a chunk's first position, <= 0 for a whole prefill)
    programs = tl.num_programs(1)
    pid_u = tl.maximum(tl.cdiv(length, U * S) - programs, 0) + tl.program_id(1)
    q_lo = q_offset - start
    u = pid_u * U + tl.arange(0, U)
    if (pid_u * U * S < length) & ((pid_u + 1) * U * S > q_lo):
        q_head = q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        k_head = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        # pass 1: row max and sum of exp2 over the causal key tiles (the diagonal one included)
        m_i = tl.zeros([U], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([U], dtype=tl.float32)
        for t in range(0, pid_u + 1):
            s = _strided_logits(q_head, k_head, start, q_lo, length, u, t, stride_qn, stride_kn, qk_scale,
                                S, U, BLOCK_D, HEAD_DIM)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse = m_i + tl.math.log2(tl.maximum(l_i, 1.0e-30))
        row_live = (u * S < length) & (u * S + S > q_lo)
        # live strided rows of each of the program's query blocks (those holding a chunk row)
        mq = pid_u * QB + tl.arange(0, QB)
        rows_hi = tl.minimum((length + S - 1) // S, mq * RB + RB)
        rows_lo = tl.maximum(tl.maximum(q_lo, 0) // S, mq * RB)
        live_rows = tl.maximum(rows_hi - rows_lo, 1).to(tl.float32)
        out_row = out_ptr + pid_bh.to(tl.int64) * nqb * nqb
        # pass 2: probabilities, summed into (query block, key block) cells
        for t in range(0, pid_u + 1):
            s = _strided_logits(q_head, k_head, start, q_lo, length, u, t, stride_qn, stride_kn, qk_scale,
                                S, U, BLOCK_D, HEAD_DIM)
            p = tl.where(row_live[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            cells = tl.sum(tl.sum(tl.reshape(p, [QB, RB, QB, RB]), 3), 1)          # [QB, QB]
            kc = t * QB + tl.arange(0, QB)
            ok = (mq < nqb)[:, None] & (kc < nqb)[None, :]
            tl.store(out_row + mq[:, None].to(tl.int64) * nqb + kc[None, :], cells / live_rows[:, None], mask=ok)


def estimate_launch(head_dim: int, stride: int, unit: int | None = None) -> dict:
    """The kernel's constexprs and launch parameters at this head dim and stride (``unit``: the
    strided rows per program, by default 128, or 64 past head dim 128)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    rows_per_block = 64 // stride
    U = unit or (128 if block_d <= 128 else 64)
    if U % rows_per_block or U < 16:
        raise ValueError(f"the estimate's unit {U} must be >= 16 and a multiple of 64 / stride = {rows_per_block}")
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, S=stride, U=U, QB=U // rows_per_block, RB=rows_per_block,
                num_warps=8 if U >= 128 or block_d > 128 else 4, num_stages=2)


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], seq_start: torch.Tensor,
                      seq_len: torch.Tensor, scale: float, stride: int, unit: int | None = None) -> torch.Tensor:
    """Same contract as :func:`~mi_compile.patterns.xattention.block_mass_torch`: float32
    ``[B, len(head_ids), NQB, NQB]``, ``mass[..., m, c]`` for key blocks ``c <= m`` (0 above).
    ``n``: k's length; a shorter q is a chunk ending at key ``n`` (its blocks only).
    ``unit``: see :func:`estimate_launch`."""
    from ._device import contiguous_last, device_ints

    B, Hq, nq, D = q.shape
    n = k.shape[2]
    q, k = contiguous_last(q, k)
    dev = q.device
    sel = len(head_ids)
    nqb = triton.cdiv(n, 64)
    launch = estimate_launch(D, stride, unit)
    out = torch.zeros(B, sel, nqb, nqb, device=dev, dtype=torch.float32)
    # the units (U strided rows, U S positions) holding the chunk's rows: at most one more
    # than its length spans; all of them for a whole prefill
    programs = min(triton.cdiv(nq, launch["U"] * stride) + 1, triton.cdiv(nqb, launch["QB"]))
    _block_mass_kernel[(B * sel, programs)](
        q, k, out, seq_start.to(device=dev, dtype=torch.int32), seq_len.to(device=dev, dtype=torch.int32),
        device_ints(head_ids, dev), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, nqb, sel, Hq // k.shape[1], n - nq, scale / stride * LOG2E, **launch)
    return out
