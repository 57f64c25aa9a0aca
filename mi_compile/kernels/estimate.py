"""Triton kernels for the vertical-slash estimate: column and diagonal scores in two launches.

What they compute is defined by :func:`mi_compile.patterns.vertical_slash.estimate_scores_torch`
(the PyTorch reference, which the tests compare against): the last ``R = 64`` queries of each
selected head, causal softmax over all keys in float32, then

* ``vertical[j]`` = sum over those rows of ``P[r, j]`` (key ``j``), and
* ``slash[d]`` = sum over those rows of ``P[r, p_r - d]`` (offset ``d``, ``p_r`` the row's position).

Why kernels: the reference materialises ``P`` (``[heads, 64, n]`` float32, 1 GiB for 32 heads
at 128K, so it runs in chunks) and skews a padded copy of it for the diagonal sums; that was
11-13 ms of the 230 ms vertical-slash op at 128K on the H100 (docs/kernels.md).
Here ``P`` only ever exists one 64 x 64 tile at a time, in registers.

Launch 1, :func:`_row_stats_kernel`, grid ``(B * heads, splits)``: each program runs an online
max / sum-of-exp over a contiguous run of key blocks and writes the partial ``(m, l)`` of its
64 rows; the host side folds the splits into one log2-sum-exp per row (three tiny torch ops).

Launch 2, :func:`_scores_kernel`, grid ``(B * heads, key blocks / KEY_BLOCKS)``: each program loads
the 64 queries and their statistics once, then for each of its ``KEY_BLOCKS`` key blocks
``[j0, j0 + 64)`` (``ESTIMATE_CONFIG["key_blocks"]``) recomputes the scores, normalises them with
the row statistics, and

* sums the tile over rows for the vertical scores of its 64 keys (each key has one owner);
* sums it along diagonals. In the tile, entry ``(r, c)`` (key ``j0 + c``) lies on offset
  ``d = len - 1 - j0 - u`` with ``u = c - r + 63``, so the diagonal sums are column sums of
  the *skewed* tile ``S[r, u] = P[r, u + r - 63]`` (``u`` in ``[0, 127)``), built in registers
  with ``tl.gather``. A diagonal crosses at most two key blocks: the ``u < 64`` half holds
  offsets this block owns (``slash_main``), the ``u >= 64`` half the part that belongs to the
  next block's offsets (``slash_tail``). Every element of both buffers has exactly one
  writer, so there are no atomics and the result does not depend on scheduling; one add
  joins them.

A chunk (q has ``nq < n`` rows, query row ``r`` is key position ``n - nq + r``): the rows of the
last 64 positions that lie before the chunk take no part (as rows before a sequence's start), so
the estimate reads the chunk's last ``min(64, nq)`` queries.

Memory: two ``[B, heads, n]`` float32 buffers plus the outputs (16 MiB each for 32 heads at
128K), nothing ``n x 64``. No host synchronisation: lengths are read on the device.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .sparse_attention import LOG2E

ROWS = 64           # queries in the estimate (vertical_slash.LAST_QUERIES)
BLOCK_N = 64        # keys per tile; the skew below assumes BLOCK_N == ROWS
BLOCKS_PER_SPLIT = 16
# Key blocks per _scores_kernel program: the queries and their statistics are loaded once for
# all of them (one block a program: 24576 programs of one small tile each for 12 heads at
# 128K). Two or more keep the skew's indices live across blocks (255 registers at head dim 128
# on sm_90, against 95 for one), so one stays the default until the kernel benchmark's
# ``ours_vs_estimate_only_kb*`` rows say which is faster. A key block past a sequence's end
# costs no K load (masked).
ESTIMATE_CONFIG = {"key_blocks": 1}
# Sizes that change with the prompt are not specialised on (see sparse_attention._LENGTH_ARGS).
_LENGTH_ARGS = ["n", "num_splits", "blocks_per_split", "q_offset"]


@triton.jit
def _last_queries(q_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr, pid_bh, num_sel, q_offset,
                  stride_qb, stride_qh, stride_qn,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr):
    """The program's batch row, sequence start/length, KV-relevant head and its last R queries
    (``query_pos`` -1 for rows before the sequence or before a chunk, q row ``start + p -
    q_offset``)."""
    b = pid_bh // num_sel
    slot = pid_bh % num_sel
    head = tl.load(head_ids_ptr + slot)
    start = tl.load(seq_start_ptr + b)
    length = tl.load(seq_len_ptr + b)
    r = tl.arange(0, R)
    query_pos = length - R + r                              # sequence positions of the rows
    query_pos = tl.where(start + query_pos >= q_offset, query_pos, -1)   # before a chunk: none
    dims = tl.arange(0, BLOCK_D)
    rows = (start + query_pos - q_offset).to(tl.int64)
    ok = (query_pos >= 0)[:, None] & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                + rows[:, None] * stride_qn + dims[None, :], mask=ok, other=0.0)
    return b, head, start, length, query_pos, q


@triton.jit
def _tile_scores(q, k_ptr, b, kv, start, length, key_pos, query_pos, stride_kb, stride_kh, stride_kn,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """log2-scaled scores of the R rows against the keys ``key_pos``; -inf where not causal
    (so rows before the sequence start, ``query_pos < 0``, are all -inf)."""
    dims = tl.arange(0, BLOCK_D)
    keys = (start + key_pos).to(tl.int64)
    ok = (key_pos < length)[:, None] & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + kv.to(tl.int64) * stride_kh
                + keys[:, None] * stride_kn + dims[None, :], mask=ok, other=0.0)
    if q.dtype == tl.float32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    return tl.where(key_pos[None, :] <= query_pos[:, None], s, float("-inf"))


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _row_stats_kernel(q_ptr, k_ptr, stats_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr,
                      stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      n, num_sel, group, num_splits, blocks_per_split, q_offset, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b, head, start, length, query_pos, q = _last_queries(
        q_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr, pid_bh, num_sel, q_offset,
        stride_qb, stride_qh, stride_qn, HEAD_DIM, BLOCK_D, R)
    kv = head // group
    m_i = tl.zeros([R], dtype=tl.float32) - 1.0e30      # finite: fully masked tiles give 0
    l_i = tl.zeros([R], dtype=tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(length, BLOCK_N))
    for blk in range(first, last):
        key_pos = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _tile_scores(q, k_ptr, b, kv, start, length, key_pos, query_pos, stride_kb, stride_kh,
                         stride_kn, qk_scale, HEAD_DIM, BLOCK_D)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = stats_ptr + (pid_bh * num_splits + split).to(tl.int64) * (2 * R) + tl.arange(0, R)
    tl.store(out, m_i)
    tl.store(out + R, l_i)


@triton.jit(do_not_specialize=_LENGTH_ARGS)
def _scores_kernel(q_ptr, k_ptr, lse_ptr, vertical_ptr, slash_main_ptr, slash_tail_ptr,
                   seq_start_ptr, seq_len_ptr, head_ids_ptr,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   n, num_sel, group, q_offset, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr,
                   BLOCK_N: tl.constexpr, KEY_BLOCKS: tl.constexpr):
    pid_bh = tl.program_id(0)
    b, head, start, length, query_pos, q = _last_queries(
        q_ptr, seq_start_ptr, seq_len_ptr, head_ids_ptr, pid_bh, num_sel, q_offset,
        stride_qb, stride_qh, stride_qn, HEAD_DIM, BLOCK_D, R)
    out_row = pid_bh.to(tl.int64) * n
    cols = tl.arange(0, BLOCK_N)
    # rows before the sequence start (len < R) have lse = -inf and all-(-inf) scores: a 0 in
    # place of their lse makes their probabilities exp2(-inf) = 0 instead of NaN
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * R + tl.arange(0, R))
    lse = tl.where(query_pos >= 0, lse, 0.0)
    r = tl.arange(0, R)
    u = tl.arange(0, 2 * BLOCK_N)
    for i in range(KEY_BLOCKS):
        # a block past the sequence's end: K is not loaded (masked), every score -inf, so its
        # vertical scores are -inf and no offset of it exists (the host pre-fills slash with
        # -inf); past n nothing is stored
        j0 = (tl.program_id(1) * KEY_BLOCKS + i) * BLOCK_N
        key_pos = j0 + cols
        s = _tile_scores(q, k_ptr, b, head // group, start, length, key_pos, query_pos, stride_kb,
                         stride_kh, stride_kn, qk_scale, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(s - lse[:, None])
        vertical = tl.where(key_pos < length, tl.sum(p, 0), float("-inf"))
        tl.store(vertical_ptr + out_row + key_pos, vertical, mask=key_pos < n)
        # skew: column u of S holds P[r, u + r - (R - 1)], i.e. one diagonal per column
        c = u[None, :] + r[:, None] - (R - 1)
        in_tile = (c >= 0) & (c < BLOCK_N)
        skewed = tl.gather(p, tl.minimum(tl.maximum(c, 0), BLOCK_N - 1), axis=1)
        diag = tl.sum(tl.where(in_tile, skewed, 0.0), 0)
        offset = length - 1 - j0 - u
        main = (u < BLOCK_N) & (offset >= 0)
        tail = (u >= BLOCK_N) & (u < BLOCK_N + R - 1) & (offset >= 0)
        tl.store(slash_main_ptr + out_row + offset, diag, mask=main)
        tl.store(slash_tail_ptr + out_row + offset, diag, mask=tail)


def estimate_scores_triton(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int],
                           seq_start: torch.Tensor, seq_len: torch.Tensor, scale: float):
    """Same contract as :func:`~mi_compile.patterns.vertical_slash.estimate_scores_torch`:
    float32 ``vertical, slash`` of shape ``[B, len(head_ids), n]``, ``-inf`` where the key /
    offset does not exist in that sequence (``n``: k's length; a shorter q is a chunk)."""
    from ._device import contiguous_last, device_ints

    B, Hq, nq, D = q.shape
    n = k.shape[2]
    q, k = contiguous_last(q, k)
    dev = q.device
    sel = len(head_ids)
    heads = device_ints(head_ids, dev)
    start = seq_start.to(device=dev, dtype=torch.int32)
    length = seq_len.to(device=dev, dtype=torch.int32)
    block_d = max(16, triton.next_power_of_2(D))
    group = Hq // k.shape[1]
    key_blocks = triton.cdiv(n, BLOCK_N)
    splits = triton.cdiv(key_blocks, BLOCKS_PER_SPLIT)
    qk_scale = scale * LOG2E
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d, R=ROWS, BLOCK_N=BLOCK_N,
                num_warps=4 if block_d <= 128 else 8)

    stats = torch.empty(B * sel, splits, 2, ROWS, device=dev, dtype=torch.float32)
    _row_stats_kernel[(B * sel, splits)](
        q, k, stats, start, length, heads, *strides,
        n, sel, group, splits, BLOCKS_PER_SPLIT, n - nq, qk_scale, **meta)
    m, l = stats[:, :, 0], stats[:, :, 1]
    m_all = m.amax(1, keepdim=True)
    lse = (m_all.squeeze(1) + torch.log2((l * torch.exp2(m - m_all)).sum(1))).contiguous()

    vertical = torch.empty(B, sel, n, device=dev, dtype=torch.float32)
    slash = torch.full((B, sel, n), float("-inf"), device=dev, dtype=torch.float32)
    tail = torch.zeros(B, sel, n, device=dev, dtype=torch.float32)
    per_program = max(1, int(ESTIMATE_CONFIG["key_blocks"]))
    _scores_kernel[(B * sel, triton.cdiv(key_blocks, per_program))](
        q, k, lse, vertical, slash, tail, start, length, heads, *strides,
        n, sel, group, n - nq, qk_scale, KEY_BLOCKS=per_program, **meta)
    return vertical, slash.add_(tail)
