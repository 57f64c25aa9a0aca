"""Vertical-slash heads: hot key columns plus hot diagonals (MInference section 3).

Parameters (``HeadPattern("vertical_slash", vertical=V, slash=S, last=T)``): keep ``V`` key
columns and ``S`` diagonals ("slashes"; offset ``d = i - j``); optional ``T`` (default 0): the
64-row query blocks holding any of the sequence's last ``T`` queries see every causal key (the
question at the end of a prompt attends exactly; see :func:`~mi_compile.patterns.index.block_rows`).

Estimate, per input and head, in the sequence's own coordinates (``len`` real tokens):

1. take the last ``min(64, len)`` queries, at positions ``p = len - 64 + r`` (a chunk,
   ``q_len < kv_len``: those of them in the chunk, its last ``min(64, q_len)`` rows, which are
   the sequence's last queries: the whole prompt's estimate when ``q_len >= 64``);
2. scores ``scale * q_p . k_j`` over all keys, causal (``j <= p``), softmax per query in
   float32;
3. vertical score of key ``j`` = sum over those queries of the probability of ``j``;
   slash score of offset ``d`` = sum over those queries of the probability of key ``p - d``.

Selection (counts larger than the sequence are clipped statically, ``min(., n)``):

* verticals: keys ``0 .. min(V, 64) - 1`` are always kept (attention sinks; MInference forces
  the first ~30 columns). They are stored as a *prefix* range, not as columns. The other
  ``V - 64`` columns (when ``V > 64``) are the top-scored keys ``j >= 64``.
* slashes: offsets ``0 .. min(S, 64) - 1`` are always kept (the local diagonals; MInference
  forces the last ~100). The other ``S - 64`` are the top-scored offsets ``d >= 64``.

What is computed (the "rectangle" semantics of MInference's kernel): sorted selected offsets
are merged into *groups* wherever consecutive offsets differ by ``<= 64``. For the query block
``[m0, m0 + 64)`` a group ``[s_lo, s_hi]`` covers the key interval ``[m0 - s_hi, m0 + 63 - s_lo]``
(the union of the 64-wide intervals of its offsets, which overlap or touch). All pairs in those
intervals, plus the prefix keys and the selected columns, are computed, each clipped causally
per element (``j <= i``). Equivalently (what :func:`vertical_slash_mask` tests): key ``j`` is
selected for query ``i`` iff ``j <= i`` and (``j < min(V, 64)``, or ``j`` is a selected column,
or some selected offset lies in ``[m0 - j, m0 - j + 63]`` with ``m0 = 64 * (i // 64)``).

A column that a group interval already covers for a query block is skipped there (the kernel
reads a per-head ``covered`` table over ``m0 - j``), so no pair is computed twice.

Where it runs: on CUDA the estimate is two Triton launches
(:mod:`mi_compile.kernels.estimate`) that never hold more than a 64 x 64 tile of the
probabilities; :func:`estimate_scores_torch` is the PyTorch definition they are tested
against, and what runs on the CPU. Its memory: it runs over chunks of query heads that share a
KV head, so its float32 score buffer is at most ~256 MiB whatever the head count; K/V are never
repeated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..kernels._device import device_ints
from ..kernels.dispatch import selection_impl
from ..kernels.top_select import SELECT_CONFIG, top_select
from ..kernels.constants import BLOCK, FORCED, KIND_VS, LAST_QUERIES, PHASE_VERTICAL_SLASH, SENTINEL
from .dense_last import DenseLastSpec
from .registry import PatternError, register, tokens
from .spec import HeadPattern

#: Search candidates: vertical columns as fractions of n (rounded to 64), and slash diagonals as
#: the 64 forced local ones plus a fraction of n more (rank 1); absolute sizes for long prompts
#: (rank 3). Extra diagonals are expensive: the kernel computes a 64-wide band for each isolated
#: one (about 128 / n of the causal square), so the slash budgets stay small and the measured
#: density decides.
VS_VERTICAL = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
VS_SLASH_EXTRA = (0.0, 1 / 128, 1 / 64, 1 / 32, 1 / 16)
VS_VERTICAL_TOKENS = (128, 512, 2048)
#: Estimate, top-k and tables per head, as a fraction of the head's causal square at the
#: kernel's pace (PatternSpec.estimate_cost): ~0.15 ms a head in the H200's 128K profile
#: (11 + 4 + 36 ms over 334 vertical-slash and block-sparse heads) against ~14 ms for a head's
#: whole square at 128K (docs/kernels.md, "The estimates").
VS_ESTIMATE_COST = 0.011
VS_SLASH_EXTRA_TOKENS = (0, 128, 512)


def estimate_scores(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int],
                    seq_start: torch.Tensor, seq_len: torch.Tensor, scale: float,
                    impl: Optional[str] = None):
    """Vertical and slash scores for the query heads ``head_ids`` (see
    :func:`estimate_scores_torch` for the contract). ``impl``: ``"triton"`` (the default on
    CUDA: two fused launches, no ``[heads, 64, n]`` buffer), or ``"torch"`` (the default on the
    CPU, where the Triton interpreter would be far slower)."""
    impl = impl or selection_impl(q)
    if impl == "triton":
        from ..kernels.estimate import estimate_scores_triton
        return estimate_scores_triton(q, k, head_ids, seq_start, seq_len, scale)
    if impl == "torch":
        return estimate_scores_torch(q, k, head_ids, seq_start, seq_len, scale)
    raise ValueError(f"estimate impl must be 'triton' or 'torch', got {impl!r}")


def estimate_scores_torch(q: torch.Tensor, k: torch.Tensor, head_ids: Sequence[int],
                          seq_start: torch.Tensor, seq_len: torch.Tensor, scale: float,
                          budget_bytes: int = 1 << 28):
    """Vertical and slash scores for the query heads ``head_ids``, in PyTorch.

    Returns ``vertical, slash``: float32 ``[B, len(head_ids), n]`` in sequence coordinates
    (``vertical[..., j]`` for key ``j``, ``slash[..., d]`` for offset ``d``), ``-inf`` where the
    key / offset does not exist in that sequence. ``n`` is k's length; a shorter q is a chunk
    ending at key ``n`` (query row ``r`` is key ``n - q_len + r``): rows before it do not count.
    """
    B, Hq, nq, D = q.shape
    n = k.shape[2]
    group = Hq // k.shape[1]
    dev = q.device
    start = seq_start.long()
    length = seq_len.long()
    r = torch.arange(LAST_QUERIES, device=dev)
    query_pos = length[:, None] - LAST_QUERIES + r[None, :]                    # [B, 64] (seq)
    query_rows = start[:, None] + query_pos - (n - nq)                        # rows of q
    rows_real = (query_pos >= 0) & (query_rows >= 0)
    query_rows = query_rows.clamp(0, nq - 1)
    t = torch.arange(n, device=dev)
    key_pos = t[None, :] - start[:, None]                                      # [B, n] (seq)
    allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= query_pos[:, :, None])
    allowed &= rows_real[:, :, None]                                           # [B, 64, n]
    seq_to_row = (start[:, None] + t[None, :]).clamp(max=n - 1)                # [B, n]
    key_exists = t[None, :] < length[:, None]
    # slash via a skewed view: T[c] = sum_r P[r, c - 63 + r]; offset d lives at c = end - 1 - d
    slash_col = (start + length)[:, None] - 1 - t[None, :]                     # [B, n]
    offset_exists = slash_col >= start[:, None]
    slash_col = slash_col.clamp(0, n - 1)

    last_q = q.gather(2, query_rows[:, None, :, None].expand(B, Hq, LAST_QUERIES, D))
    vertical = torch.empty(B, len(head_ids), n, device=dev, dtype=torch.float32)
    slash = torch.empty_like(vertical)
    per_head = B * LAST_QUERIES * (n + LAST_QUERIES) * 4 * 2
    chunk = max(1, budget_bytes // per_head)
    by_kv: dict[int, list[int]] = {}
    for slot, h in enumerate(head_ids):
        by_kv.setdefault(h // group, []).append(slot)
    for kv, slots in by_kv.items():
        for c0 in range(0, len(slots), chunk):
            part = slots[c0:c0 + chunk]
            hs = [head_ids[s] for s in part]
            c = len(hs)
            ql = last_q.index_select(1, device_ints(hs, dev)).reshape(B, c * LAST_QUERIES, D)
            s = torch.matmul(ql, k[:, kv].transpose(-1, -2)).float().view(B, c, LAST_QUERIES, n)
            s = s.mul_(scale).masked_fill_(~allowed[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1)
            p = p.masked_fill_(~rows_real[:, None, :, None], 0.0)             # NaN rows -> 0
            del s
            vert_rows = p.sum(2)                                               # [B, c, n]
            padded = F.pad(p, (LAST_QUERIES - 1, 0))                           # [B, c, 64, n+63]
            del p
            w = n + LAST_QUERIES - 1
            skew = padded.as_strided((B, c, LAST_QUERIES, n),
                                     (c * LAST_QUERIES * w, LAST_QUERIES * w, w + 1, 1))
            diag = skew.sum(2)                                                 # [B, c, n]
            del padded
            idx = device_ints(part, dev)
            vertical[:, idx] = vert_rows.gather(2, seq_to_row[:, None].expand(B, c, n)).masked_fill(
                ~key_exists[:, None], float("-inf"))
            slash[:, idx] = diag.gather(2, slash_col[:, None].expand(B, c, n)).masked_fill(
                ~offset_exists[:, None], float("-inf"))
    return vertical, slash


def top_rows(scores: torch.Tensor, limits: torch.Tensor, width: int) -> torch.Tensor:
    """int32 ``[B, R, width]``: row ``r``'s ``limits[r]`` (clamped to ``[0, width]``) best scores
    beyond the FORCED keys, as indices relative to FORCED, ascending, then SENTINEL (also for a
    ``-inf`` score, i.e. a key outside the sequence). :func:`top_rows_torch`, or on CUDA with
    ``SELECT_CONFIG["kernel"]`` one Triton launch (:mod:`mi_compile.kernels.top_select`; ties to
    the lowest indices)."""
    if selection_impl(scores) == "triton" and SELECT_CONFIG["kernel"] and scores.dtype == torch.float32:
        return top_select(scores[..., FORCED:], limits.reshape(-1), width)
    return top_rows_torch(scores, limits, width)


def top_rows_torch(scores: torch.Tensor, limits: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`top_rows` in PyTorch: one top-k and one sort serve every row, whatever its count
    (a row's best ``c`` are the first ``c`` of its best ``width``). The sort runs on int32 keys
    (half the radix passes of int64; positions fit)."""
    top = torch.topk(scores[..., FORCED:], width, dim=-1)
    rank = torch.arange(width, device=scores.device)
    keep = (rank < limits.view(-1, 1)) & (top.values > float("-inf"))
    return torch.where(keep, top.indices.to(torch.int32), SENTINEL).sort(-1).values


def selection_limits(params: Sequence[tuple], device) -> torch.Tensor:
    """int64 ``[2, R]``: ``V - FORCED`` and ``S - FORCED`` of each row's ``(V, S[, 64])`` (cached);
    clamped to the room ``n - FORCED`` they are :func:`extra_counts`."""
    return device_ints([p[0] - FORCED for p in params] + [p[1] - FORCED for p in params], device).view(2, -1)


def tiled_rows(params: Sequence[tuple]) -> dict:
    """``S -> rows`` of the heads whose extra diagonals are chosen in whole key blocks (one
    top-k of tiles per distinct ``S``)."""
    rows: dict[int, list[int]] = {}
    for r, p in enumerate(params):
        if len(p) > 2:
            rows.setdefault(p[1], []).append(r)
    return rows


def select_vertical_slash(vertical: torch.Tensor, slash: torch.Tensor,
                          params: Sequence[tuple], seq_len: torch.Tensor):
    """Turn scores into the selection of each head (``params[h] = (V, S)``, or ``(V, S, 64)``
    for a head whose extra diagonals are chosen in whole key blocks, see :func:`tile_scores`).

    Returns ``columns [B, Hs, Vx]`` (the non-forced verticals, ascending, SENTINEL-padded) and
    ``offsets [B, Hs, Sx]`` (all kept offsets, forced ones included, ascending, SENTINEL-padded).
    The top-k calls are :func:`topk_sorted`'s, so the fused builder selects the same keys.
    """
    B, Hs, n = vertical.shape
    dev = vertical.device
    s_width = max(min(p[1], n) for p in params)
    largest = (max(p[0] for p in params), max(p[1] for p in params))
    columns, extra = topk_sorted(vertical, slash, selection_limits(params, dev), largest, tiled_rows(params), n)
    if columns is None:
        columns = torch.full((B, Hs, 1), SENTINEL, device=dev, dtype=torch.int32)
    else:
        columns = torch.where(columns < SENTINEL, columns + FORCED, SENTINEL).to(torch.int32)
    # offsets: the forced ones inside the sequence and each head's extras, ascending
    n_forced = device_ints([min(p[1], FORCED, n) for p in params], dev)
    forced = torch.arange(FORCED, device=dev, dtype=torch.int32).expand(B, Hs, FORCED)
    forced = torch.where((forced < n_forced.view(1, -1, 1)) & (forced < seq_len.view(-1, 1, 1)), forced, SENTINEL)
    parts = [forced]
    if extra is not None:
        parts.append(torch.where(extra + FORCED < seq_len.view(-1, 1, 1), extra + FORCED, SENTINEL))
    offsets = torch.cat(parts, -1).sort(-1).values[..., :s_width].to(torch.int32)
    return columns, offsets


def tile_scores(slash: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., ceil(n / 64) - 1]``: the slash mass each whole key block would catch.

    Entry ``t - 1`` (``t >= 1``) scores offset ``64 t``: for the query block ``[m0, m0 + 64)``
    that offset's interval is exactly the key block ``m0 / 64 - t``, one kernel tile, whose pairs
    span the diagonals ``64 t - 63 .. 64 t + 63``, diagonal ``64 t + k`` on ``64 - |k|`` of the 64
    rows. So the score is the slash scores under that triangle, ``/ 64``; the triangles of all
    ``t`` sum to one at every offset, so the blocks' scores share the slash mass without double
    counting, and the top-k of them is the best choice of whole tiles. ``-inf`` where the
    offset ``64 t`` lies outside the sequence.
    """
    lead, n = slash.shape[:-1], slash.shape[-1]
    count = -(-n // BLOCK)
    finite = torch.isfinite(slash)
    mass = torch.where(finite, slash, 0.0).float().reshape(-1, 1, n)
    k = BLOCK - torch.arange(-(BLOCK - 1), BLOCK, device=slash.device).abs().float()
    out = F.conv1d(mass, (k / BLOCK).view(1, 1, -1), stride=BLOCK, padding=BLOCK - 1)
    out = out.view(*lead, -1)[..., 1:count]
    exists = finite[..., BLOCK::BLOCK][..., :out.shape[-1]]
    return torch.where(exists, out, float("-inf"))


def _top_tiles(slash: torch.Tensor, count: int) -> torch.Tensor:
    """``[..., count]`` int32, ascending: ``offset - FORCED`` of the offsets ``64 t`` of the
    ``count`` best whole key blocks (:func:`tile_scores`), then ``n`` where fewer blocks exist
    than asked (the tail, which the cut at the sequence length drops)."""
    n = slash.shape[-1]
    count = min(count, max(n - FORCED, 0))
    if count <= 0:
        return slash.new_empty(slash.shape[:-1] + (0,), dtype=torch.int32)
    scores = tile_scores(slash)
    pick = min(count, scores.shape[-1])
    top = torch.topk(scores, pick, dim=-1).indices.to(torch.int32).sort(-1).values * BLOCK
    return F.pad(top, (0, count - pick), value=n)


def extra_counts(vertical: int, slash: int, n: int) -> tuple[int, int]:
    """How many columns / offsets beyond the forced ones a ``(V, S)`` head selects at length
    ``n`` (0 when none)."""
    room = max(n - FORCED, 0)
    return max(min(vertical - FORCED, room), 0), max(min(slash - FORCED, room), 0)


def topk_sorted(vertical: torch.Tensor, slash: torch.Tensor, limits: torch.Tensor, largest: tuple,
                tiled: dict, n: int):
    """The top-k step of the vertical-slash selection, for every head of a layer at once.

    ``vertical`` / ``slash``: scores ``[B, R, n]`` (``-inf`` exactly where the key / offset lies
    outside the sequence); ``limits``: :func:`selection_limits` of the rows' parameters,
    ``largest`` their largest ``(V, S)``; ``tiled``: :func:`tiled_rows` (rows whose extra
    diagonals are whole key blocks). Returns ``columns, offsets``: int32 ``[B, R, width]``, or
    None where no row selects beyond the forced keys; row ``r`` holds its :func:`extra_counts`
    best indices relative to FORCED, ascending, then SENTINEL (also for keys outside the
    sequence, which a builder that adds FORCED and cuts at the length drops anyway). One top-k
    and one sort each, whatever the layer's parameters (and one per group of tiled heads).
    """
    v_width, s_width = extra_counts(largest[0], largest[1], n)
    columns = top_rows(vertical, limits[0], v_width) if v_width else None
    offsets = top_rows(slash, limits[1], s_width) if s_width else None
    for s, rows in tiled.items():
        count = extra_counts(0, s, n)[1]
        if count:
            index = device_ints(rows, slash.device)
            top = _top_tiles(slash.index_select(1, index), count)
            offsets[:, index, :count] = torch.where(top + FORCED < n, top, SENTINEL)
    return columns, offsets


def clean_selection(keys: torch.Tensor, offsets: torch.Tensor, n: int):
    """An explicit selection (e.g. a fixed index for timing) in :func:`select_vertical_slash`'s
    form: ``keys [B, Hs, *]`` (any order, duplicates allowed; keys ``< 64`` are dropped since
    the forced prefix holds them), ``offsets [B, Hs, *]`` (any order, duplicates allowed).
    Returns ascending, de-duplicated, SENTINEL-padded int32 ``columns, offsets``.
    """
    def dedupe(x, low):
        x = x.to(torch.int32)
        x = torch.where((x >= low) & (x < n), x, SENTINEL).sort(-1).values
        repeat = torch.cat([torch.zeros_like(x[..., :1], dtype=torch.bool), x[..., 1:] == x[..., :-1]], -1)
        return torch.where(repeat, SENTINEL, x).sort(-1).values
    return dedupe(keys, FORCED), dedupe(offsets, 0)


def vertical_slash_mask(i: torch.Tensor, j: torch.Tensor, prefix: int, columns: torch.Tensor,
                        offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Reference selection for one head, straight from the selected columns and offsets.

    ``i`` ``[B, n, 1]``, ``j`` ``[B, 1, n]`` sequence positions (the caller applies causality
    and bounds); ``columns [B, Vx]``, ``offsets [B, Sx]`` as from :func:`select_vertical_slash`.
    """
    B = columns.shape[0]
    dev = columns.device
    col_table = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
    col_table.scatter_(1, columns.long().clamp(max=n), True)
    col_table[:, n] = False
    off_table = torch.zeros(B, n + 1, dtype=torch.long, device=dev)
    off_table.scatter_(1, offsets.long().clamp(max=n), 1)
    off_table[:, n] = 0
    cum = F.pad(off_table.cumsum(1), (1, 0))                                   # cum[x] = #offsets < x
    n_i, n_j = i.shape[1], j.shape[2]
    jj = j.clamp(0, n - 1).expand(B, 1, n_j).reshape(B, n_j)
    in_column = col_table.gather(1, jj)[:, None, :]
    m0 = (i.clamp(min=0) // FORCED) * FORCED
    d_lo = (m0 - j).clamp(0, n)                                                # some offset in
    d_hi = (m0 - j + FORCED).clamp(0, n)                                       # [m0-j, m0-j+63]
    hits = cum.gather(1, d_hi.expand(B, n_i, n_j).reshape(B, -1)) - \
        cum.gather(1, d_lo.expand(B, n_i, n_j).reshape(B, -1))
    on_slash = (hits > 0).view(B, n_i, n_j)
    return (j < prefix) | in_column | on_slash


def slashes_mask_of(index, h, block_starts, j, prefix: int) -> torch.Tensor:
    """:meth:`PatternSpec.block_mask` of a head whose selection is its rows of ``index.columns``
    / ``index.offsets`` plus keys below ``prefix`` (vertical-slash and its variants)."""
    cols, offs = index.columns[:, h], index.offsets[:, h]
    out = vertical_slash_mask(block_starts, j, prefix, cols.reshape(-1, cols.shape[-1]),
                              offs.reshape(-1, offs.shape[-1]), index.n)
    return out.view(cols.shape[:-1] + out.shape[1:])


class VerticalSlashSpec(DenseLastSpec):
    """``vertical_slash(vertical, slash)``: per input, the ``vertical`` hottest key columns and
    the ``slash`` hottest diagonals (both ``>= 1``), estimated from the last 64 queries; the
    first ``min(V, 64)`` columns and ``min(S, 64)`` diagonals are always kept (see the module
    docstring); optional ``last``: dense rows for the last queries. MInference's
    ``vertical_and_slash`` entries map one to one.
    """

    name = "vertical_slash"
    code = 2
    params = ("vertical", "slash", "last")
    kernel_kind = KIND_VS
    selection = PHASE_VERTICAL_SLASH
    color = "#f28e2b"
    minference_names = ("vertical_and_slash",)

    def validate(self, head) -> None:
        if head.vertical < 1 or head.slash < 1:
            raise PatternError(f"{self.name} needs vertical >= 1 and slash >= 1")

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        return {"vertical": vertical_size, "slash": slash_size}

    def estimate_cost(self, head, n: int) -> float:
        return VS_ESTIMATE_COST

    def head_tables(self, head) -> dict:
        return {**super().head_tables(head), "prefix": min(head.vertical, FORCED)}

    def meta_params(self, head) -> tuple:
        return (head.vertical, head.slash)

    def for_chunk(self, head, share):
        # the columns are chosen per prompt: a chunk keeps its share of them (at least the forced
        # ones); the diagonals are per row and stay
        return dataclasses.replace(head, vertical=max(min(head.vertical, FORCED), math.ceil(head.vertical * share)))

    def selection_params(self, head) -> tuple:
        return (head.vertical, head.slash)

    def max_tiles(self, head, n: int) -> int:
        groups = min(head.slash, n)
        # spans add up to <= 64 * offsets and to <= n + 64 per group count
        return min(3 * groups, 2 * groups + -(-n // BLOCK) + 1)

    def block_mask(self, head, index, h, block_starts, j):
        return slashes_mask_of(index, h, block_starts, j, min(head.vertical, FORCED))

    def candidates(self, n: int) -> list:
        out = [(1, HeadPattern(self.name, vertical=tokens(vf, n), slash=BLOCK + int(round(sf * n))))
               for vf in VS_VERTICAL for sf in VS_SLASH_EXTRA]
        return out + [(3, HeadPattern(self.name, vertical=vertical, slash=BLOCK + extra))
                      for vertical in VS_VERTICAL_TOKENS for extra in VS_SLASH_EXTRA_TOKENS
                      if vertical < n and extra < n]

    def search_selection(self, head, shared: dict, q, k, scale, seq_start, seq_len):
        # the estimate does not depend on the budget: once per layer (shared by the variants)
        if "vertical_slash" not in shared:
            shared["vertical_slash"] = estimate_scores(q, k, list(range(q.shape[1])), seq_start, seq_len, scale)
        vert, slash = shared["vertical_slash"]
        return select_vertical_slash(vert, slash, [self.selection_params(head)] * q.shape[1], seq_len)

    def label(self, head) -> str:
        return f"{head.vertical}/{head.slash}"


SPEC = register(VerticalSlashSpec())
