"""Triton kernel for the XAttention block estimate: antidiagonal-sampled attention mass per
(query block, key block), all heads of a layer in one launch.

What it computes is defined by :func:`mi_compile.patterns.xattention.block_mass_torch` (the
PyTorch reference the tests compare against); in short, with stride ``S`` and sequence
coordinates: strided query row ``u`` holds the queries ``uS + r`` and strided key column
``w`` the keys ``wS + S - 1 - r`` (``r < S``, reversed: an antidiagonal of the ``S x S`` cell),
its logit is ``scale / S * sum_r q[uS + r] . k[wS + S - 1 - r]``; a causal softmax over
``w <= u`` per strided row, then the probabilities summed into 64 x 64 blocks and divided by
the block's live strided rows: ``mass[m, c]``, summing to 1 over ``c <= m``.

Grid ``(B * heads, programs)``: a program owns ``U = max(16, 64 / S)`` strided rows (``U S / 64``
query blocks) and loads them as one ``[U, S * BLOCK_D]`` operand (the ``S`` rows of a cell side
by side), so a strided logit tile is one ``tl.dot`` of width ``S * D``; key tiles are ``U``
strided columns loaded the same way with the residues reversed. Two passes over the causal
key tiles: online max / sum of exp, then the normalised tile reduced to its blocks. Query head
``h`` reads KV head ``h // group`` (native GQA). Output: float32 ``[B, heads, NQB, NQB]``
(``n^2 / 4096`` entries per head: 16 MiB per head at 128K), written where ``c <= m`` and zero
elsewhere. No host synchronisation (lengths are read on the device).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .sparse_attention import LOG2E

_LENGTH_ARGS = ["n", "nqb"]


@triton.jit
def _strided_logits(qv, k_head, start, length, t, stride_kn, qk_scale, u,
                    S: tl.constexpr, U: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """log2-scaled strided logits of the program's rows ``u`` against key tile ``t`` (``U``
    strided columns); -inf where not causal (``w > u``) or the cell lies past the end."""
    e = tl.arange(0, S * BLOCK_D)
    r = e // BLOCK_D
    d = e % BLOCK_D
    w = t * U + tl.arange(0, U)
    kpos = w[:, None] * S + (S - 1 - r)[None, :]
    ok = (kpos < length) & (d < HEAD_DIM)[None, :]
    kv = tl.load(k_head + (start + kpos).to(tl.int64) * stride_kn + d[None, :], mask=ok, other=0.0)
    if qv.dtype == tl.float32:
        s = tl.dot(qv, tl.trans(kv), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(qv, tl.trans(kv)) * qk_scale
    live = (w[None, :] <= u[:, None]) & (w * S < length)[None, :]
    return tl.where(live, s, float("-inf"))


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _block_mass_kernel(q_ptr, k_ptr, out_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr,
                       stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                       n, nqb, num_sel, group, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, S: tl.constexpr,
                       U: tl.constexpr, QB: tl.constexpr, RB: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_u = tl.program_id(1)
    b = pid_bh // num_sel
    head = tl.load(head_ids_ptr + pid_bh % num_sel)
    kvh = head // group
    start = tl.load(seq_start_ptr + b)
    length = tl.load(seq_len_ptr + b)
    u = pid_u * U + tl.arange(0, U)
    if pid_u * U * S < length:
        e = tl.arange(0, S * BLOCK_D)
        r = e // BLOCK_D
        d = e % BLOCK_D
        qpos = u[:, None] * S + r[None, :]
        q_head = q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        qv = tl.load(q_head + (start + qpos).to(tl.int64) * stride_qn + d[None, :],
                     mask=(qpos < length) & (d < HEAD_DIM)[None, :], other=0.0)
        k_head = k_ptr + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
        # pass 1: row max and sum of exp2 over the causal key tiles (the diagonal one included)
        m_i = tl.zeros([U], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([U], dtype=tl.float32)
        for t in range(0, pid_u + 1):
            s = _strided_logits(qv, k_head, start, length, t, stride_kn, qk_scale, u, S, U, BLOCK_D, HEAD_DIM)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        lse = m_i + tl.math.log2(tl.maximum(l_i, 1.0e-30))
        row_live = u * S < length
        # live strided rows of each of the program's query blocks
        mq = pid_u * QB + tl.arange(0, QB)
        rows_left = (length + S - 1) // S - mq * RB
        live_rows = tl.minimum(tl.maximum(rows_left, 1), RB).to(tl.float32)
        out_row = out_ptr + pid_bh.to(tl.int64) * nqb * nqb
        # pass 2: probabilities, summed into (query block, key block) cells
        for t in range(0, pid_u + 1):
            s = _strided_logits(qv, k_head, start, length, t, stride_kn, qk_scale, u, S, U, BLOCK_D, HEAD_DIM)
            p = tl.where(row_live[:, None], tl.math.exp2(s - lse[:, None]), 0.0)
            cells = tl.sum(tl.sum(tl.reshape(p, [QB, RB, QB, RB]), 3), 1)          # [QB, QB]
            kc = t * QB + tl.arange(0, QB)
            ok = (mq < nqb)[:, None] & (kc < nqb)[None, :]
            tl.store(out_row + mq[:, None].to(tl.int64) * nqb + kc[None, :], cells / live_rows[:, None], mask=ok)


def block_mass_triton(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int], seq_start: torch.Tensor,
                      seq_len: torch.Tensor, scale: float, stride: int) -> torch.Tensor:
    """Same contract as :func:`~mi_compile.patterns.xattention.block_mass_torch`: float32
    ``[B, len(head_ids), NQB, NQB]``, ``mass[..., m, c]`` for key blocks ``c <= m`` (0 above)."""
    from ._device import contiguous_last, device_ints

    B, Hq, n, D = q.shape
    q, k = contiguous_last(q, k)
    dev = q.device
    sel = len(head_ids)
    nqb = triton.cdiv(n, 64)
    rows_per_block = 64 // stride
    U = max(16, rows_per_block)
    qb = U // rows_per_block
    out = torch.zeros(B, sel, nqb, nqb, device=dev, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    _block_mass_kernel[(B * sel, triton.cdiv(nqb, qb))](
        q, k, out, seq_start.to(device=dev, dtype=torch.int32), seq_len.to(device=dev, dtype=torch.int32),
        device_ints(head_ids, dev), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        n, nqb, sel, Hq // k.shape[1], scale / stride * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, S=stride, U=U, QB=qb, RB=rows_per_block, num_warps=4)
    return out
