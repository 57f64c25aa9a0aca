"""Scoring candidates: how much of a head's dense attention mass a pattern keeps, at what cost.

For one layer's captured q ``[B, Hq, n, D]`` / k ``[B, Hkv, n, D]`` (on any device; the search
keeps them where the model ran, so on a GPU everything below runs there):

* **recall** of a candidate for a head = the dense causal softmax probability mass (float32)
  that falls inside the candidate's selection, averaged over the scored query rows (the last
  ``score_queries`` rows plus a seeded sample of earlier ones, :func:`score_rows`);
* **density** = the *computed* density: the pairs of every tile the kernel walks for that
  selection over the causal square (:func:`mi_compile.patterns.cost.computed_density`), not the
  pairs selected -- an isolated slash offset costs a whole 64-key tile per query block, and a
  budget must be a budget in kernel time.

Each candidate's index is built by the op's own code (:func:`mi_compile.patterns.index.build_index`:
the vertical-slash estimate once per layer, its top-k per budget, block-sparse pooling and
top-k), so the density is read from the very tables the kernel would get. Membership for the
recall is decided by the patterns' reference tests (the ones :func:`mi_compile.sparse.selection_mask`
uses) on the raw selection. No ``n x n`` mask is ever built: vertical-slash and block-sparse
selections depend on the query row only through its 64-row block (and causality), so they are
evaluated at the query blocks of the scored rows only. Memory is O(rows x n) per head.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..patterns import registry
from ..kernels.constants import BLOCK
from ..patterns.cost import computed_density
from ..patterns.index import block_rows, build_index
from ..patterns.spec import HeadPattern

#: Recalls within this of the best fitting candidate's count as a tie (then lower density wins).
RECALL_TIE = 1e-4
#: Heads evaluated together when testing selections at the scored query blocks (bounds the
#: int64 temporaries of the vertical-slash reference test to ~ chunk x blocks x n x 8 bytes).
_HEAD_CHUNK = 4


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
    rows = rows.to(q.device).long()
    group = Hq // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    s = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
    del kf
    s.masked_fill_(torch.arange(n, device=q.device)[None, :] > rows[:, None], float("-inf"))
    return torch.softmax(s, dim=-1)


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


def _selected_at_rows(index, pattern: HeadPattern, rows: torch.Tensor, causal_rows: torch.Tensor):
    """bool, broadcastable to ``[B, Hq, R, n]``: the keys each scored row computes under
    ``index`` (every head with ``pattern``), from the raw selection and the reference tests."""
    n = index.n
    dev = rows.device
    j = torch.arange(n, device=dev)
    spec = registry.get(pattern.kind)
    if not spec.per_block:
        own = spec.mask_at(rows[:, None], j[None, :], pattern, n)   # unpadded: every length is n
        return causal_rows if own is None else causal_rows & own
    blocks, slot = torch.unique(rows // BLOCK, return_inverse=True)
    starts = (blocks * BLOCK)[None, :, None]                                  # [1, U, 1]
    B, H = index.seq_start.shape[0], len(index.heads)
    out = torch.empty(B, H, rows.numel(), n, dtype=torch.bool, device=dev)
    for h0 in range(0, H, _HEAD_CHUNK):
        hs = slice(h0, min(H, h0 + _HEAD_CHUNK))
        per_block = block_rows(index, hs, starts, j[None, None, :])              # [B, c, U, n]
        out[:, hs] = per_block[:, :, slot] & causal_rows
        del per_block
    return out


def score_candidates(q: torch.Tensor, k: torch.Tensor, candidates: Sequence[HeadPattern], *,
                     rows: torch.Tensor, scale: float | None = None,
                     probs: torch.Tensor | None = None, v: torch.Tensor | None = None):
    """Recall and computed density of every candidate for every head of one layer.

    q ``[B, Hq, n, D]``, k ``[B, Hkv, n, D]`` (unpadded prompts, any float dtype: the index is
    built on them as the op would, the probabilities in float32); ``rows``: the scored query
    rows (:func:`score_rows`). Returns float64 ``recall, density`` of shape
    ``[len(candidates), Hq]`` (averaged over the batch, on the CPU); with ``v`` ``[B, Hkv, n, D]``
    also ``error``, the relative squared output error (:func:`_output_error`), as a third tensor.
    """
    B, Hq, n, D = q.shape
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    rows = rows.to(dev).long()
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
    causal_rows = torch.arange(n, device=dev)[None, :] <= rows[:, None]
    seq_start = torch.zeros(B, dtype=torch.int32, device=dev)
    seq_len = torch.full((B,), n, dtype=torch.int32, device=dev)

    shared: dict = {}     # budget-free work (the vertical-slash estimate), once per layer
    for c, p in enumerate(candidates):
        spec = registry.get(p.kind)
        selection = spec.search_selection(p, shared, q, k, scale, seq_start, seq_len)
        index = build_index(q, k, [p] * Hq, scale, seq_start, seq_len, vs_selection=selection, unpadded=True)
        density[c] = computed_density(index).cpu()
        if spec.full:
            recall[c] = _recall(probs, causal_rows).double().cpu()          # error stays 0
            continue
        selected = _selected_at_rows(index, p, rows, causal_rows)
        r, err = _scores(probs, selected, values)
        del selected, index
        recall[c] = r.double().cpu()
        if err is not None:
            error[c] = err.double().cpu()
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
