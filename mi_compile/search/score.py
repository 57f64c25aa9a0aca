"""Scoring candidates: how much of a head's dense attention mass a pattern keeps, at what cost.

For one layer's captured q ``[B, Hq, n, D]`` / k ``[B, Hkv, n, D]``:

* **recall** of a candidate for a head = the dense causal softmax probability mass (float32)
  that falls inside the candidate's selection, averaged over the scored query rows (the last
  ``score_queries`` rows plus a seeded sample of earlier ones, :func:`score_rows`);
* **density** = the fraction of the causal square (``n (n + 1) / 2`` pairs) the candidate
  computes -- what :func:`mi_compile.sparse.selection_density` reports.

The selection is exactly the kernel's: the data-dependent parts are built by the same pattern
code the op runs (:mod:`mi_compile.patterns.vertical_slash` estimate and top-k,
:mod:`mi_compile.patterns.block_sparse` pooling and top-k) on the full q/k, and membership is
decided by the patterns' own reference tests (the ones :func:`mi_compile.sparse.selection_mask`
uses). What is avoided is materialising ``n x n`` masks: vertical-slash and block-sparse
selections depend on the query row only through its 64-row block (and causality), so one
row per query block gives every row's selection, and the computed pair count per row is a
cumulative sum of it. A-shape and dense do not depend on the input; their densities are
computed once per length with :func:`~mi_compile.sparse.selection_density` itself. The
tests check recall rows and densities against ``selection_mask`` / ``selection_density``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch

from ..patterns import block_sparse, vertical_slash
from ..patterns.a_shape import a_shape_mask
from ..patterns.spec import HeadPattern

BLOCK = 64
#: Recalls within this of the best fitting candidate's count as a tie (then lower density wins).
RECALL_TIE = 1e-4


def score_rows(n: int, score_queries: int = 256, sample_queries: int = 0, seed: int = 0) -> torch.Tensor:
    """Query rows to score, ascending: the last ``score_queries`` rows, plus ``sample_queries``
    rows drawn (seeded, without replacement) from ``[n // 4, n - score_queries)``."""
    last = min(max(int(score_queries), 1), n)
    rows = torch.arange(n - last, n)
    lo, hi = n // 4, n - last
    if sample_queries > 0 and hi > lo:
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(hi - lo, generator=g)[:int(sample_queries)] + lo
        rows = torch.cat([pick.sort().values, rows])
    return rows


def dense_probs(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 ``[B, Hq, R, n]``: dense causal softmax of the query ``rows`` over all keys."""
    B, Hq, n, D = q.shape
    group = Hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    s = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
    s.masked_fill_(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


@functools.lru_cache(maxsize=256)
def static_density(pattern: HeadPattern, n: int) -> float:
    """Density of an input-independent pattern (dense, A-shape) at length ``n``, exactly as
    :func:`~mi_compile.sparse.selection_density` reports it (computed once per length)."""
    from ..sparse import selection_density
    z = torch.zeros(1, 1, n, 16)
    return float(selection_density(z, z, [pattern])[0, 0])


def _block_starts(n: int) -> torch.Tensor:
    return torch.arange(math.ceil(n / BLOCK)) * BLOCK


def _recall(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the probability mass inside ``selected`` (broadcast to probs)."""
    return (probs * selected).sum(-1).mean(-1)


def _output_error(probs: torch.Tensor, selected: torch.Tensor, values: "_Values") -> torch.Tensor:
    """Mean over rows of the relative squared error of the attention output when only the
    ``selected`` keys are kept, their mass renormalised as the kernel's softmax does:
    ``|O_sel - O| ** 2 / |O| ** 2``. Unlike recall it sees the values: missing 2% of the mass on
    keys whose values match the rest costs little, missing 2% on an outlier value costs a lot."""
    kept = probs * selected
    mass = kept.sum(-1, keepdim=True).clamp_min(1e-30)
    out = torch.matmul(kept, values.v) / mass
    return ((out - values.dense).pow(2).sum(-1) / values.norm2).mean(-1)


@dataclasses.dataclass
class _Values:
    v: torch.Tensor        # float32 [B, Hq, n, D] (repeated to the query heads)
    dense: torch.Tensor    # [B, Hq, R, D]: the dense output of the scored rows
    norm2: torch.Tensor    # [B, Hq, R]: its squared norm (clamped away from 0)


def _scores(probs, selected, values):
    """(recall, output error or None) of one selection ``[..., R, n]``."""
    return _recall(probs, selected), (None if values is None else _output_error(probs, selected, values))


def _block_constant_scores(S: torch.Tensor, probs: torch.Tensor, rows: torch.Tensor, n: int, values=None):
    """Recall, density and output error (None without ``values``) of selections given per
    query block.

    ``S`` bool ``[B, H, NQB, n]``: the pattern's own test (no causality) at each query block;
    row ``i`` computes ``S[i // 64] & (j <= i)``.
    """
    B, H, nqb, _ = S.shape
    j = torch.arange(n)
    selected = S[:, :, rows // BLOCK] & (j[None, :] <= rows[:, None])
    recall, error = _scores(probs, selected, values)
    cs = S.cumsum(-1, dtype=torch.int32)                                   # [B, H, NQB, n]
    idx = _block_starts(n)[:, None] + torch.arange(BLOCK)[None, :]         # rows of each block
    valid = idx < n
    per_row = cs.gather(-1, idx.clamp(max=n - 1).expand(B, H, nqb, BLOCK))  # pairs of row m0 + t
    pairs = (per_row * valid).sum((-1, -2), dtype=torch.float64)
    return recall, pairs / (n * (n + 1) / 2), error


def _vertical_slash_blocks(vert, slash, pattern: HeadPattern, n: int) -> torch.Tensor:
    B, Hq, _ = vert.shape
    seq_len = torch.full((B,), n, dtype=torch.int32)
    cols, offs = vertical_slash.select_vertical_slash(vert, slash, [(pattern.vertical, pattern.slash)] * Hq,
                                                      seq_len)
    prefix = min(pattern.vertical, vertical_slash.FORCED)
    i = _block_starts(n)[None, :, None]
    j = torch.arange(n)[None, None, :]
    S = vertical_slash.vertical_slash_mask(i, j, prefix, cols.reshape(B * Hq, -1),
                                           offs.reshape(B * Hq, -1), n)
    return S.view(B, Hq, -1, n)


def score_candidates(q: torch.Tensor, k: torch.Tensor, candidates: Sequence[HeadPattern], *,
                     rows: torch.Tensor, scale: float | None = None,
                     probs: torch.Tensor | None = None, v: torch.Tensor | None = None):
    """Recall and density of every candidate for every head of one layer.

    q ``[B, Hq, n, D]``, k ``[B, Hkv, n, D]`` (unpadded prompts); ``rows``: the scored query
    rows (:func:`score_rows`). Returns float64 ``recall, density`` of shape
    ``[len(candidates), Hq]`` (averaged over the batch); with ``v`` ``[B, Hkv, n, D]`` also
    ``error``, the relative squared output error (:func:`_output_error`), as a third tensor.
    """
    B, Hq, n, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k = q.float(), k.float()
    rows = rows.long()
    if probs is None:
        probs = dense_probs(q, k, rows, scale)
    C = len(candidates)
    recall = torch.zeros(C, B, Hq, dtype=torch.float64)
    density = torch.zeros(C, B, Hq, dtype=torch.float64)
    error = torch.zeros(C, B, Hq, dtype=torch.float64)
    values = None
    if v is not None:
        group = Hq // v.shape[1]
        vr = v.float().repeat_interleave(group, dim=1) if group > 1 else v.float()
        dense = torch.matmul(probs, vr)
        values = _Values(v=vr, dense=dense, norm2=dense.pow(2).sum(-1).clamp_min(1e-30))
    j = torch.arange(n)
    causal_rows = j[None, :] <= rows[:, None]
    seq_start = torch.zeros(B, dtype=torch.int32)
    seq_len = torch.full((B,), n, dtype=torch.int32)

    vs = [c for c, p in enumerate(candidates) if p.kind == "vertical_slash"]
    if vs:   # the estimate does not depend on the budget: once per layer
        with torch.no_grad():
            vert, slash = vertical_slash.estimate_scores(q, k, list(range(Hq)), seq_start, seq_len, scale)
        for c in vs:
            S = _vertical_slash_blocks(vert, slash, candidates[c], n)
            recall[c], density[c], err = _block_constant_scores(S, probs, rows, n, values)
            if err is not None:
                error[c] = err

    bs = [c for c, p in enumerate(candidates) if p.kind == "block_sparse"]
    if bs:   # one pooling and one top-k for all block-sparse candidates
        ids = [h for _ in bs for h in range(Hq)]
        topks = [candidates[c].topk for c in bs for _ in range(Hq)]
        blocks, counts = block_sparse.select_blocks(q, k, ids, topks, seq_start, seq_len, scale,
                                                    unpadded=True)
        i = _block_starts(n)[None, :, None]
        for t, c in enumerate(bs):
            part = slice(t * Hq, (t + 1) * Hq)
            blk = blocks[:, part].reshape(B * Hq, blocks.shape[2], blocks.shape[3])
            cnt = counts[:, part].reshape(B * Hq, counts.shape[2])
            S = block_sparse.block_sparse_mask(i, j[None, None, :], blk, cnt).view(B, Hq, -1, n)
            recall[c], density[c], err = _block_constant_scores(S, probs, rows, n, values)
            if err is not None:
                error[c] = err

    for c, p in enumerate(candidates):
        if p.kind == "dense":
            recall[c] = _recall(probs, causal_rows)          # error stays 0
        elif p.kind == "a_shape":
            recall[c], err = _scores(probs, causal_rows & a_shape_mask(rows[:, None], j[None, :], p), values)
            if err is not None:
                error[c] = err
        else:
            continue
        density[c] = static_density(p, n)
    if values is None:
        return recall.mean(1), density.mean(1)
    return recall.mean(1), density.mean(1), error.mean(1)


def choose(recall: torch.Tensor, density: torch.Tensor, budget: float, *,
           min_recall: float = 0.0, dense_index: int | None = None,
           tie: float = RECALL_TIE) -> list[int]:
    """The chosen candidate index per head (``recall``/``density``: ``[C, H]``).

    Among candidates with ``density <= budget``: the highest recall; recalls within ``tie`` of
    the best count as equal and the lowest density among them wins (then the earlier
    candidate). If none fits: the cheapest (lowest density, then highest recall). If
    ``min_recall`` is set and the choice keeps less than that, the head falls back to dense
    (``dense_index``).
    """
    C, H = recall.shape
    out = []
    for h in range(H):
        r = [float(x) for x in recall[:, h]]
        d = [float(x) for x in density[:, h]]
        fits = [c for c in range(C) if d[c] <= budget]
        if fits:
            top = max(r[c] for c in fits)
            best = min((c for c in fits if r[c] >= top - tie), key=lambda c: (d[c], -r[c], c))
        else:
            best = min(range(C), key=lambda c: (d[c], -r[c], c))
        if min_recall > 0 and r[best] < min_recall and dense_index is not None:
            best = dense_index
        out.append(best)
    return out
