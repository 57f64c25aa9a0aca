"""Triton kernel: each row's ``k`` largest scores as their indices in ascending order, one launch.

What it computes is :func:`mi_compile.patterns.vertical_slash.top_rows`'s torch path (a
``torch.topk`` of the widest row's count, the ranks past each row's own count dropped, then a
sort of the indices): for row ``r`` of ``scores [B, R, m]`` (float32, ``-inf`` for keys that do
not exist), the indices of its ``min(limits[r], width, finite entries)`` largest finite scores,
ascending, then SENTINEL up to ``width``. Ties at the threshold go to the lowest indices (the
torch path takes any of them; scores are float sums, so exact ties are rare).

Why a kernel: the torch path is a multi-block radix top-k (four digit passes of four launches
each) and a radix sort of the indices, ~20 launches a call; a chunk's index build pays them
once per layer and chunk (the "top-k / sort" row of the chunk profiles). Here one program per
row does it in five sweeps of the row, no sort:

1. four radix-select sweeps find the ``k``-th largest score exactly: each sweep histograms
   one 8-bit digit (most significant first) of the scores' order-preserving integer keys,
   among the entries that match the digits fixed so far, and fixes the digit of the bin that
   holds the ``k``-th entry (``tl.histogram``, ``tl.cumsum``);
2. one compaction sweep writes, in index order, every entry above that threshold and the first
   ``k - (entries above)`` entries equal to it: ascending by construction.

Rows are short enough (at most ``n`` floats, 512 KiB at 128K) that one program a row stays in
L2 across the sweeps. No host synchronisation; every count is read on the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import SENTINEL

_SELECT_BLOCK = 4096   # scores per sweep step (more loads in flight per step: the row walk is serial)
#: ``kernel``: the vertical-slash top-k runs this kernel on CUDA instead of ``torch.topk`` and a
#: sort. Off until a GPU run shows it faster (``benchmarks/chunk_work.py --compare-topk`` times
#: both side by side); the CPU always runs torch.
SELECT_CONFIG = {"kernel": False}
_INT_MIN = tl.constexpr(-2147483648)   # the sign bit of an int32


@triton.jit
def _order_key(x):
    """int32 keys ordered as the float32 ``x`` (signed compare), and the same with the sign bit
    flipped (so its bytes, read unsigned, order the same way: the radix digits)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key, key ^ _INT_MIN


@triton.jit
def _top_select_kernel(scores_ptr, limits_ptr, out_ptr, m, num_rows_r, width,
                       stride_sb, stride_sr, stride_ob, stride_or,
                       SENTINEL_VALUE: tl.constexpr, BLOCK: tl.constexpr):
    """Program ``p`` = row ``(b, r)`` with ``b = p // R``: see the module docstring."""
    p = tl.program_id(0)
    b = p // num_rows_r
    r = p % num_rows_r
    row = scores_ptr + b.to(tl.int64) * stride_sb + r.to(tl.int64) * stride_sr
    out_row = out_ptr + b.to(tl.int64) * stride_ob + r.to(tl.int64) * stride_or
    k = tl.minimum(tl.maximum(tl.load(limits_ptr + r).to(tl.int32), 0), width)
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)

    prefix = tl.zeros([], tl.int32)      # the digits fixed so far, in the flipped key's bits
    known = tl.zeros([], tl.int32)       # which bits those are
    remaining = k                        # entries still to take at or below the current prefix
    for step in tl.static_range(4):
        shift = 24 - 8 * step
        hist = tl.zeros([256], tl.int32)
        for start in range(0, m, BLOCK):
            idx = start + offs
            inside = idx < m
            x = tl.load(row + idx, mask=inside, other=float("-inf"))
            _, flipped = _order_key(x)
            ok = inside & (x > float("-inf")) & ((flipped & known) == prefix)
            hist += tl.histogram((flipped >> shift) & 255, 256, mask=ok)
        if step == 0:
            remaining = tl.minimum(remaining, tl.sum(hist, 0))   # fewer finite entries than asked
        at_or_above = tl.cumsum(hist, 0, reverse=True)          # entries in bins >= b
        digit = tl.max(tl.where(at_or_above >= remaining, bins, -1), 0)
        digit = tl.maximum(digit, 0)
        remaining -= tl.sum(tl.where(bins > digit, hist, 0), 0)
        prefix = prefix | (digit << shift)
        known = known | (tl.full([], 255, tl.int32) << shift)
    # back to the signed key order; `remaining` entries equal to the threshold are taken (the
    # lowest indices first). k = 0 or no finite entry takes nothing: a threshold no finite score
    # exceeds (the largest key is a NaN's) and no ties
    take_any = (k > 0) & (remaining > 0)
    threshold = tl.where(take_any, prefix ^ _INT_MIN, 2147483647)
    remaining = tl.where(take_any, remaining, 0)

    written = tl.zeros([], tl.int32)
    ties = tl.zeros([], tl.int32)
    for start in range(0, m, BLOCK):
        idx = start + offs
        inside = idx < m
        x = tl.load(row + idx, mask=inside, other=float("-inf"))
        key, _ = _order_key(x)
        finite = inside & (x > float("-inf"))
        above = finite & (key > threshold)
        equal = finite & (key == threshold)
        tie_rank = tl.cumsum(equal.to(tl.int32), 0) - 1 + ties
        take = above | (equal & (tie_rank < remaining))
        slot = tl.cumsum(take.to(tl.int32), 0) - 1 + written
        tl.store(out_row + slot, idx, mask=take)
        written += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(equal.to(tl.int32), 0)
    for start in range(0, width, BLOCK):
        slot = start + offs
        tl.store(out_row + slot, tl.full([BLOCK], SENTINEL_VALUE, tl.int32),
                 mask=(slot >= written) & (slot < width))


def top_select(scores: torch.Tensor, limits: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[B, R, width]``: per row ``r`` of ``scores [B, R, m]`` (float32) the indices of its
    ``min(limits[r], width)`` largest finite scores, ascending, then SENTINEL (module docstring).
    ``limits``: ``[R]`` integers on ``scores``' device."""
    if scores.dtype != torch.float32 or scores.dim() != 3:
        raise ValueError(f"top_select: scores must be float32 [B, R, m], got {scores.dtype} {tuple(scores.shape)}")
    B, R, m = scores.shape
    if limits.numel() != R:
        raise ValueError(f"top_select: {limits.numel()} limits for {R} rows")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    out = torch.empty((B, R, width), dtype=torch.int32, device=scores.device)
    if B * R == 0 or width == 0:
        return out
    _top_select_kernel[(B * R,)](
        scores, limits, out, m, R, width,
        scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        SENTINEL_VALUE=SENTINEL, BLOCK=_SELECT_BLOCK, num_warps=16)
    return out
