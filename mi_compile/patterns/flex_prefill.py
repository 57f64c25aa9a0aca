"""FlexPrefill heads: per input and head, a query-aware block pattern or a vertical-slash
pattern, each with the fewest keys reaching an attention-mass target (the FlexPrefill idea,
ICLR 2025; own code).

Parameters (``HeadPattern("flex_prefill", gamma=G, tau=T, min_budget=M)``, all ints): ``G`` in
``1 .. 1000`` the mass to keep, per mille; ``T`` in ``0 .. 1000`` the pattern switch, per mille
(compared with a Jensen-Shannon distance, at most ``sqrt(ln 2) ~ 0.833``: ``T = 0`` is always
vertical-slash, ``T >= 833`` always query-aware); ``M >= 0`` a floor in tokens.

Estimate, per input and head, in the sequence's own coordinates (``len`` real tokens), from
the last ``min(64, len)`` queries (their causal softmax over all keys, the vertical-slash
estimate of :func:`~mi_compile.patterns.vertical_slash.estimate_scores`, Triton on CUDA):

* ``v[j]``: the queries' mean probability of key ``j``; ``s[d]``: their mean probability of
  the key at offset ``d`` (both distributions over the existing keys / offsets);
* ``a[c]``: ``v`` summed over key block ``c`` (the true block distribution of those queries);
  ``e[c]``: ``softmax_c(scale * mean(q) . pooled_k[c])`` over the existing key blocks, the
  block-pooled estimate (mean of those queries, ``pooled_k`` as block_sparse pools keys);
* the switch: ``D = sqrt(JSD(a, e))`` (natural log). ``D < T / 1000``: the pooled estimate is
  reliable, so the head is *query-aware* for this input, else *vertical-slash*.

Selection. Query-aware: for every query block ``m`` the block distribution
``softmax_c(scale * pooled_q[m] . pooled_k[c])`` over ``c <= m`` (block_sparse's pooled
scores) and, as xattention's :func:`~mi_compile.patterns.xattention.select_from_mass`, the
fewest blocks (diagonal and sink first) reaching ``G / 1000``, at least ``ceil(M / 64)``.
Vertical-slash: the fewest keys by ``v`` whose mass reaches ``G / 1000`` (at least ``M``) as
columns, and the fewest offsets by ``s`` (offset 0 first, always: it holds the diagonal tile;
at least ``M``) as slashes, computed with MInference's rectangle semantics (see
:mod:`~mi_compile.patterns.vertical_slash`); no forced prefix. When one part holds every key the
other is dropped (columns win; offset 0 stays), as the kernel would pay for both. ``G = 1000`` keeps every key,
offset or causal block: dense attention either way.

A chunk (``q_len < kv_len``, a prefill that continues a cache: query row ``r`` is sequence
position ``len - q_len + r``) estimates from what it has, as vertical-slash and block-sparse
do: the last queries are the chunk's last ``min(64, q_len)`` rows (the sequence's last
queries: the whole prompt's ``v``, ``s``, ``a``, ``e`` and switch when ``q_len >= 64``), and the
query-aware blocks pool the chunk's own query blocks (a block cut by the chunk's start pools
its rows present; blocks wholly before the chunk select nothing). So with ``q_len >= 64`` the
chunk's rows select as the whole prompt's, except in a query-aware block cut by its start.

Index: ``PHASE_TABLE_SELECT`` (:meth:`FlexPrefillSpec.select_tables`). The variable counts are
masked slots of static widths: ``columns`` and ``offsets`` ``n`` wide, ``blocks`` ``NQB`` wide
(``n^2 / 4096`` int32 per head: 16 MiB at 128K); per input only one part is non-empty. Such
layers go through the PyTorch table builder on CUDA too (the fused builder takes only
vertical-slash top-k outputs); the selection is device ops with no host synchronisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels._device import device_ints
from ..kernels.constants import BLOCK, KIND_OTHER, LAST_QUERIES, PHASE_TABLE_SELECT, SENTINEL
from . import block_sparse, vertical_slash
from .registry import PatternError, PatternSpec, register
from .spec import HeadPattern
from .xattention import chunk_first_position, select_from_mass

#: Search candidates: ``(gamma, tau)`` per mille, with a one-block floor.
FLEX_CANDIDATES = ((900, 100), (950, 100), (950, 200))
FLEX_MIN_BUDGET = BLOCK
#: Estimate and (PyTorch) table building per head against the head's square at the kernel's
#: pace (PatternSpec.estimate_cost): ~360 ms of table building and 13 ms of estimate over 336
#: heads in the H200's 128K profile, ~1.1 ms a head against ~13.8 ms for a head's whole square.
FLEX_ESTIMATE_COST = 0.080


def fewest_reaching(dist: torch.Tensor, exists: torch.Tensor, gammas: torch.Tensor,
                    minimum: torch.Tensor, first_forced: bool = False):
    """Per row of ``dist [B, h, L]`` (non-negative, 0 where ``~exists``): the fewest existing
    entries, best first (entry 0 first if ``first_forced``), whose sum reaches ``gammas [h]`` (a
    fraction; ``>= 1``: all of them), at least ``minimum [h]``. Returns the kept indices
    ascending, SENTINEL-padded, int32 ``[B, h, L]``."""
    L = dist.shape[-1]
    key = dist.masked_fill(~exists, -1.0)
    if first_forced:
        key[..., 0] = torch.where(exists[..., 0], 2.0, -1.0)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranked = dist.gather(-1, order)
    before = ranked.cumsum(-1) - ranked
    rank = torch.arange(L, device=dist.device)
    g = gammas[None, :, None]
    keep = (before < g) | (g >= 1.0) | (rank < minimum[None, :, None])
    if first_forced:
        keep |= rank == 0
    keep &= rank < exists.sum(-1, keepdim=True)               # existing entries rank first
    return torch.where(keep, order, SENTINEL).to(torch.int32).sort(-1).values


def js_distance(a: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of the Jensen-Shannon divergence (natural log) of the distributions along the
    last axis (0 log 0 = 0)."""
    mid = 0.5 * (a + e)

    def kl(p):
        return torch.where(p > 0, p * (p.clamp(min=1e-30).log() - mid.clamp(min=1e-30).log()), 0.0).sum(-1)
    return (0.5 * kl(a) + 0.5 * kl(e)).clamp(min=0).sqrt()


def flex_estimate(q, k, head_ids, seq_start, seq_len, scale, impl=None, rows=None, unpadded=False):
    """The estimate of the module docstring: ``v, s`` (``[B, h, n]`` distributions), the switch
    distance ``D [B, h]`` and the query-aware block distributions ``[B, h, NQB, NQB]``. ``impl``:
    that of the last queries' softmax (``"triton"``, the CUDA default, or ``"torch"``). ``n`` is
    k's length; a shorter q is a chunk ending at key ``n`` (see the module docstring).
    ``rows`` (int64 ``[B, R]``, a chunk's :func:`~mi_compile.patterns.block_sparse.chunk_rows`):
    the block distributions of those query blocks only, ``[B, h, R, NQB]``. ``unpadded``: every
    input spans the whole tensor (blocks pooled by a reshape, no gathered copy of q and k)."""
    B, Hq, nq, D, n, group, nqb = block_sparse.layer_geometry(q, k)
    dev = q.device
    query_blocks = rows
    vert, slash = vertical_slash.estimate_scores(q, k, head_ids, seq_start, seq_len, scale, impl)
    vert = torch.nan_to_num(vert, neginf=0.0).clamp(min=0)
    slash = torch.nan_to_num(slash, neginf=0.0).clamp(min=0)
    rows = vert.sum(-1, keepdim=True).clamp(min=1e-30)            # live estimate rows
    v, s = vert / rows, slash / rows
    true_blocks = F.pad(v, (0, nqb * BLOCK - n)).view(B, len(head_ids), nqb, BLOCK).sum(-1)

    ids = device_ints(head_ids, dev)
    kv = device_ints([h // group for h in head_ids], dev)
    # heads are picked from the pooled / gathered rows, never from q itself (a copy of q per layer)
    pooled_k = block_sparse.pooled_blocks(k, seq_start, seq_len, nqb, unpadded).index_select(1, kv)   # [B, h, nqb, D]
    pooled_q = block_sparse.pooled_blocks(q, seq_start, seq_len, nqb, unpadded, n - nq).index_select(1, ids)
    length = seq_len.long()
    blocks_in_seq = (length + BLOCK - 1) // BLOCK
    c = torch.arange(nqb, device=dev)
    # mean of the estimate's query rows (positions len - 64 .. len - 1 that exist, in the chunk)
    pos = length[:, None] - LAST_QUERIES + torch.arange(LAST_QUERIES, device=dev)[None, :]
    rows_at = seq_start.long()[:, None] + pos - (n - nq)                      # rows of q
    real = ((pos >= 0) & (rows_at >= 0)).float()
    rows_at = rows_at.clamp(0, nq - 1)
    last_q = q.gather(2, rows_at[:, None, :, None].expand(B, Hq, LAST_QUERIES, D)).index_select(1, ids)
    mean_q = (last_q.float() * real[:, None, :, None]).sum(2) / real.sum(1).clamp(min=1)[:, None, None]
    est = torch.einsum("bhd,bhcd->bhc", mean_q, pooled_k) * scale
    est = torch.softmax(est.masked_fill(c[None, None, :] >= blocks_in_seq[:, None, None], float("-inf")), -1)
    distance = js_distance(true_blocks, est)

    if query_blocks is None:
        upper = torch.ones(nqb, nqb, dtype=torch.bool, device=dev).triu(1)
    else:       # the chunk's query blocks only
        R = query_blocks.shape[1]
        pooled_q = pooled_q.gather(2, query_blocks[:, None, :, None].expand(B, len(head_ids), R, D))
        upper = (c[None, None, :] > query_blocks[:, :, None])[:, None]        # [B, 1, R, c]
    scores = torch.matmul(pooled_q, pooled_k.transpose(-1, -2)) * scale       # [B, h, m, c]
    scores = scores.masked_fill(upper, float("-inf"))
    return v, s, distance, torch.softmax(scores, -1)


class FlexPrefillSpec(PatternSpec):
    """``flex_prefill(gamma, tau, min_budget)``: per input, query-aware blocks or vertical-slash
    (switched on the Jensen-Shannon distance ``< tau`` per mille of the pooled and the true block
    distribution of the last queries), the fewest reaching ``gamma`` per mille of the estimated
    mass, at least ``min_budget`` tokens (see the module docstring)."""

    name = "flex_prefill"
    code = 6
    params = ("gamma", "tau", "min_budget")
    kernel_kind = KIND_OTHER
    selection = PHASE_TABLE_SELECT
    per_block = True
    color = "#9c755f"

    def estimate_cost(self, head, n: int) -> float:
        return FLEX_ESTIMATE_COST

    def validate(self, head) -> None:
        if not 1 <= head.gamma <= 1000:
            raise PatternError(f"flex_prefill needs gamma in 1..1000 (per mille), got {head.gamma}")
        if head.tau > 1000:
            raise PatternError(f"flex_prefill needs tau in 0..1000 (per mille), got {head.tau}")

    def block_width(self, head, n: int) -> int:
        return math.ceil(n / BLOCK)

    def chunk_reason(self, head) -> None:
        return None         # a chunk estimates from its own queries (see the module docstring)

    def max_tiles(self, head, n: int) -> int:
        return 2 * n + -(-n // BLOCK) + 1        # vertical_slash's bound with up to n offsets

    def select_tables(self, q, k, head_ids, heads, seq_start, seq_len, scale, unpadded=False) -> dict:
        nq, n = q.shape[2], k.shape[2]
        dev = q.device
        nqb = math.ceil(n / BLOCK)
        # a chunk: only the query blocks that can hold its rows (R of NQB) are scored and selected
        rows = block_sparse.chunk_rows(seq_start, n, nq)[0] if nq < n else None
        v, s, distance, block_dist = flex_estimate(q, k, head_ids, seq_start, seq_len, scale, rows=rows,
                                                   unpadded=unpadded)
        gammas = device_ints([h.gamma for h in heads], dev, torch.float32) / 1000.0
        minimum = device_ints([h.min_budget for h in heads], dev)
        exists = (torch.arange(n, device=dev)[None, :] < seq_len.long()[:, None])[:, None, :].expand_as(v)
        columns = fewest_reaching(v, exists, gammas, minimum)
        offsets = fewest_reaching(s, exists, gammas, minimum, first_forced=True)
        # one part holding every key makes the other redundant (the kernel would pay for both):
        # all columns keep only offset 0 (the diagonal tile), all offsets drop the columns
        live = seq_len.long()[:, None]
        all_columns = ((columns != SENTINEL).sum(-1) >= live)[..., None]
        all_offsets = ((offsets != SENTINEL).sum(-1) >= live)[..., None]
        first = torch.arange(n, device=dev) == 0
        offsets = torch.where(all_columns & ~first, SENTINEL, offsets)
        columns = torch.where(all_offsets & ~all_columns, SENTINEL, columns)
        chunk_first = chunk_first_position(seq_start, n, nq) if nq < n else None
        blocks, counts = select_from_mass(block_dist, [h.gamma for h in heads], [nqb] * len(heads), seq_len,
                                          [-(-h.min_budget // BLOCK) for h in heads], chunk_first, rows)
        aware = distance < device_ints([h.tau for h in heads], dev, torch.float32)[None, :] / 1000.0   # [B, h]
        return {"columns": torch.where(aware[..., None], SENTINEL, columns),
                "offsets": torch.where(aware[..., None], SENTINEL, offsets),
                "blocks": torch.where(aware[..., None, None], blocks, SENTINEL),
                "block_count": torch.where(aware[..., None], counts, 0)}

    def block_mask(self, head, index, h, block_starts, j):
        # per input one of the two parts is empty (see select_tables)
        return (vertical_slash.slashes_mask_of(index, h, block_starts, j, 0)
                | block_sparse.blocks_mask_of(index, h, block_starts, j))

    def candidates(self, n: int) -> list:
        return [(4, HeadPattern(self.name, gamma=g, tau=t, min_budget=FLEX_MIN_BUDGET)) for g, t in FLEX_CANDIDATES]

    def label(self, head) -> str:
        return f"f{head.gamma / 10:g}/{head.tau}"


SPEC = register(FlexPrefillSpec())
