"""Building the unified sparse index (:class:`~mi_compile.kernels.index_format.SparseIndex`,
its tables defined there) for one layer's heads, one kernel launch for all of them.

All tables are built on the inputs' device with no host synchronisation: sizes depend only on
shapes and the static head parameters. What depends only on the heads (prefix, sink, band, head
ids, parameter groups) is built once per layer (:class:`IndexPlan`). On CUDA the tables after
the top-k are written by two fused launches (:mod:`mi_compile.kernels.index_tables`); the
PyTorch builder here is the CPU path and gives the same tables bit for bit.

A chunk (``q_len < kv_len``, see :mod:`mi_compile.kernels.index_format`) gets the tables of the
whole sequence over the keys, from the chunk's queries; :func:`chunk_reason` names the heads
that cannot run one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Optional, Sequence

import torch

from . import block_sparse, vertical_slash
from ..kernels._device import cached, device_ints
from ..kernels.dispatch import selection_impl
from ..kernels.constants import (BLOCK, KIND_A_SHAPE, KIND_BS, KIND_OTHER, KIND_VS, PHASE_BLOCK_SPARSE,  # noqa: F401
                        PHASE_BLOCK_SELECT, PHASE_TABLE_SELECT, PHASE_VERTICAL_SLASH, SENTINEL, WIDE)
from ..kernels.index_format import META_WIDTH, SparseIndex, dense_last_block  # noqa: F401
from .registry import get as pattern_spec
from .spec import HeadPattern


def merge_offsets(offsets: torch.Tensor, gap: int = BLOCK):
    """Merge ascending slash offsets (SENTINEL-padded) into groups ``[lo, hi]``.

    A new group starts where an offset exceeds its predecessor by more than ``gap``. Returns
    ``group_lo, group_hi`` with the shape of ``offsets``, ascending, SENTINEL-padded.
    """
    offs = offsets.long()
    valid = offs < SENTINEL
    step = offs[..., 1:] - offs[..., :-1]
    first = torch.ones_like(valid[..., :1])
    is_start = valid & torch.cat([first, step > gap], -1)
    is_end = valid & torch.cat([~valid[..., 1:] | is_start[..., 1:], first], -1)
    group_id = is_start.long().cumsum(-1) - 1
    dump = offs.shape[-1]                       # scatter target for non-start/non-end slots
    lo = torch.full(offs.shape[:-1] + (dump + 1,), SENTINEL, dtype=torch.long, device=offs.device)
    hi = lo.clone()
    lo.scatter_(-1, torch.where(is_start, group_id, dump), offs)
    hi.scatter_(-1, torch.where(is_end, group_id, dump), offs)
    return lo[..., :dump].to(torch.int32), hi[..., :dump].to(torch.int32)


def covered_table(group_lo: torch.Tensor, group_hi: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 ``[..., n + 64]``: entry ``d + 63`` is 1 iff some group covers ``m0 - j = d``.

    Group ``[s_lo, s_hi]`` puts key ``j`` of query block ``m0`` in its interval iff
    ``s_lo - 63 <= m0 - j <= s_hi``; a difference array plus cumsum marks those ranges.
    """
    size = n + BLOCK
    valid = group_lo < SENTINEL
    begin = torch.where(valid, group_lo.long(), size)                    # (s_lo - 63) + 63
    end = torch.where(valid, (group_hi.long() + BLOCK).clamp(max=size), size)
    diff = torch.zeros(group_lo.shape[:-1] + (size + 1,), dtype=torch.int32, device=group_lo.device)
    ones = torch.ones_like(begin, dtype=torch.int32)
    diff.scatter_add_(-1, begin, ones)
    diff.scatter_add_(-1, end, -ones)
    return (diff.cumsum(-1)[..., :size] > 0).to(torch.uint8)


def count_upto(sorted_values: torch.Tensor, num_blocks: int, reach: int = BLOCK - 1) -> torch.Tensor:
    """int32 ``[..., num_blocks]``: how many ascending entries are ``<= m0 + reach`` per block."""
    bounds = torch.arange(num_blocks, device=sorted_values.device) * BLOCK + reach
    bounds = bounds.expand(sorted_values.shape[:-1] + (num_blocks,)).contiguous()
    return torch.searchsorted(sorted_values.long().contiguous(), bounds, right=True).to(torch.int32)


def group_tiles(group_lo: torch.Tensor, group_hi: torch.Tensor, prefix: torch.Tensor,
                num_blocks: int, num_tiles: int):
    """Cut each group's key interval below the diagonal, ``[m0 - s_hi, min(m0 + 63 - s_lo, m0 - 1)]``,
    into tiles of at most 64 keys, relative to ``m0``.

    Tiles are sorted by their end, nearest the diagonal first. A tile matters to block ``m``
    once ``m0 + end > prefix`` (it then reaches past the prefix range, which is visited
    separately), and stays relevant for later blocks; so with that order block ``m`` walks the
    first ``tiles_upto[m]`` tiles and never a tile that is empty for it.

    Returns ``tile_start, tile_end`` (int32 ``[..., num_tiles]``; unused slots
    ``(-SENTINEL, -SENTINEL)``) and ``tiles_upto`` (int32 ``[..., num_blocks]``); ``prefix`` is
    int32 ``[H]``. ``num_tiles`` must bound the total (see :func:`max_group_tiles`).
    """
    lo, hi = group_lo.long(), group_hi.long()
    valid = lo < SENTINEL
    below_end = torch.clamp(BLOCK - lo, max=0)                          # exclusive, relative
    count = torch.where(valid, (below_end + hi + BLOCK - 1).clamp(min=0) // BLOCK, 0)
    ends = count.cumsum(-1)                                               # tiles of groups <= g
    slot = torch.arange(num_tiles, device=lo.device).expand(lo.shape[:-1] + (num_tiles,)).contiguous()
    group = torch.searchsorted(ends, slot, right=True)                    # owning group per slot
    live = group < lo.shape[-1]
    group = group.clamp(max=lo.shape[-1] - 1)
    first = (ends - count).gather(-1, group)
    start = -hi.gather(-1, group) + (slot - first) * BLOCK
    end = torch.minimum(start + BLOCK, below_end.gather(-1, group))
    start = torch.where(live, start, -SENTINEL)
    end = torch.where(live, end, -SENTINEL)
    end, order = torch.sort(end, dim=-1, descending=True, stable=True)
    start = start.gather(-1, order)
    m0 = torch.arange(num_blocks, device=lo.device) * BLOCK
    bounds = (m0[None, :] - prefix.long()[:, None]).expand(lo.shape[:-1] + (num_blocks,)).contiguous()
    upto = torch.searchsorted((-end).contiguous(), bounds, right=False)   # tiles with m0 + end > prefix
    return start.to(torch.int32), end.to(torch.int32), upto.to(torch.int32)


def max_group_tiles(heads: Sequence[HeadPattern], n: int) -> int:
    """Static bound on the group tiles of any head (see :func:`group_tiles`)."""
    return max([1] + [pattern_spec(h.kind).max_tiles(h, n) for h in dict.fromkeys(heads)])


def normalize_sequences(q: torch.Tensor, seq_start: Optional[torch.Tensor],
                        seq_len: Optional[torch.Tensor], n: Optional[int] = None):
    """int32 ``seq_start``, ``seq_len`` of shape ``[B]`` on q's device (defaults: 0 and n, the
    key length: q's length unless given)."""
    B, n = q.shape[0], q.shape[2] if n is None else n
    if seq_start is None and seq_len is None:   # the zeros are shared (read only)
        return (cached(("zero_starts", B), q.device, lambda: torch.zeros(B, dtype=torch.int32, device=q.device)),
                torch.full((B,), n, dtype=torch.int32, device=q.device))
    if seq_start is None:
        seq_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    if seq_len is None:
        seq_len = (n - seq_start.to(torch.int32)).to(torch.int32)
    return seq_start.to(device=q.device, dtype=torch.int32), seq_len.to(device=q.device, dtype=torch.int32)




@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What :func:`build_index` needs of a layer's heads before it sees an input.

    Built once per (heads, device, estimate order) and cached for the process (see
    :func:`index_plan`): the per-head tables (``prefix``, ``sink``, ``band``, ``last``, and
    ``meta`` for the GPU table builder), the head-id index tensors, the heads grouped by parameters,
    and the maxima the table widths follow from. Nothing here depends on the length.

    ``vs_ids`` / ``bs_ids``: the heads whose pattern runs the vertical-slash / block-sparse
    selection phase; ``as_ids``: the heads with a static slash group ``[0, as_hi]`` (A-shape).
    The estimate scores the vertical-slash heads in ``vs_ids`` order; ``vs_limits`` /
    ``vs_tiled`` are :func:`~mi_compile.patterns.vertical_slash.selection_limits` /
    :func:`~mi_compile.patterns.vertical_slash.topk_sorted`'s ``tiled`` of those score rows.
    """

    heads: tuple
    vs_ids: tuple
    vs_limits: Optional[torch.Tensor]
    vs_tiled: dict
    vs_params: tuple
    bs_ids: tuple
    bs_topks: tuple
    as_ids: tuple
    prefix: torch.Tensor
    sink: torch.Tensor
    band: torch.Tensor
    meta: torch.Tensor
    vs_index: Optional[torch.Tensor]
    bs_index: Optional[torch.Tensor]
    as_index: Optional[torch.Tensor]
    as_hi: Optional[torch.Tensor]
    max_vertical: int
    max_slash: int
    max_topk: int
    distinct_heads: tuple = ()
    last: Optional[torch.Tensor] = None
    #: the largest entry of ``last``
    max_last: int = 0
    #: ``PHASE_BLOCK_SELECT`` / ``PHASE_TABLE_SELECT`` heads by pattern: ``(name, head ids, their
    #: index tensor)``
    sel_groups: tuple = ()
    #: why these heads cannot run a chunk (``q_len < kv_len``), None if they can (:func:`chunk_reason`)
    chunk_reason: Optional[str] = None

    def widths(self, n: int) -> dict:
        """Table widths at length ``n`` (the same as the unfused builder's)."""
        nqb = math.ceil(n / BLOCK)
        groups = min(self.max_slash, n)
        tiles = max_group_tiles(self.distinct_heads or self.heads, n)
        n_cols = vertical_slash.extra_counts(self.max_vertical, self.max_slash, n)[0]
        return {"nqb": nqb, "groups": max(1, groups) if self.vs_ids else 1, "tiles": tiles,
                "columns": max(1, n_cols) if self.vs_ids else 1,
                "blocks": max(1, min(self.max_topk, nqb) if self.bs_ids else 1, self.select_width(n))}

    def vs_topk(self, vertical: torch.Tensor, slash: torch.Tensor, n: int):
        """:func:`~mi_compile.patterns.vertical_slash.topk_sorted` of the vertical-slash heads'
        scores (rows in ``vs_ids`` order) at length ``n``: the fused builder's top-k input."""
        return vertical_slash.topk_sorted(vertical, slash, self.vs_limits, (self.max_vertical, self.max_slash),
                                          self.vs_tiled, n)

    def select_width(self, n: int) -> int:
        """Widest ``blocks`` row of the block / table select heads at length ``n`` (0: none)."""
        return max([pattern_spec(self.heads[h].kind).block_width(self.heads[h], n)
                    for _, ids, _ in self.sel_groups for h in ids], default=0)


def _make_plan(heads: tuple, device) -> IndexPlan:
    specs = [pattern_spec(h.kind) for h in heads]
    vs_ids = tuple(i for i, s in enumerate(specs) if s.selection == PHASE_VERTICAL_SLASH)
    bs_ids = tuple(i for i, s in enumerate(specs) if s.selection == PHASE_BLOCK_SPARSE)
    vs_params = tuple(specs[h].selection_params(heads[h]) for h in vs_ids)
    bs_topks = tuple(specs[h].selection_params(heads[h])[0] for h in bs_ids)
    by_spec: dict[str, list[int]] = {}
    for h, s in enumerate(specs):
        if s.selection in (PHASE_BLOCK_SELECT, PHASE_TABLE_SELECT):
            by_spec.setdefault(s.name, []).append(h)
    sel_groups = tuple((name, tuple(ids), device_ints(ids, device)) for name, ids in by_spec.items())

    prefix, sink, band, last, static_hi = [], [], [], [], {}
    for h, (head, spec) in enumerate(zip(heads, specs)):
        t = spec.head_tables(head)
        prefix.append(min(t["prefix"], WIDE)), sink.append(t["sink"]), band.append(min(t["band"], WIDE))
        last.append(min(t.get("last", 0), WIDE))
        if t.get("group") is not None:
            lo, hi = t["group"]
            if lo != 0:
                raise ValueError(f"{head.kind}: a static slash group must start at offset 0, got {t['group']}")
            static_hi[h] = hi
    as_ids = tuple(static_hi)

    position = {h: i for i, h in enumerate(vs_ids)}
    bs_row = {h: i for i, h in enumerate(bs_ids)}

    meta = []
    for h, (head, spec) in enumerate(zip(heads, specs)):
        a, b = spec.meta_params(head)
        # the head's row of the layer's top-k tensors and their row count (entries 4 and 7)
        meta += [spec.kernel_kind, prefix[h], a, b, position.get(h, 0), bs_row.get(h, 0), 0, max(1, len(vs_ids))]

    def ints32(values):
        return device_ints(values, device, torch.int32)

    return IndexPlan(
        heads=heads, vs_ids=vs_ids,
        vs_limits=vertical_slash.selection_limits(vs_params, device) if vs_ids else None,
        vs_tiled=vertical_slash.tiled_rows(vs_params),
        vs_params=vs_params, bs_ids=bs_ids, bs_topks=bs_topks, as_ids=as_ids,
        prefix=ints32(prefix), sink=ints32(sink), band=ints32(band), last=ints32(last),
        meta=ints32(meta).view(len(heads), META_WIDTH),
        vs_index=device_ints(vs_ids, device) if vs_ids else None,
        bs_index=device_ints(bs_ids, device) if bs_ids else None,
        as_index=device_ints(as_ids, device) if as_ids else None,
        as_hi=ints32([static_hi[h] for h in as_ids]) if as_ids else None,
        max_vertical=max([p[0] for p in vs_params], default=0),
        max_slash=max([p[1] for p in vs_params], default=0),
        max_topk=max(bs_topks, default=0), distinct_heads=tuple(dict.fromkeys(heads)), sel_groups=sel_groups,
        max_last=max(last, default=0),
        chunk_reason=chunk_reason(heads))


def chunk_reason(heads: Sequence[HeadPattern]) -> Optional[str]:
    """Why a layer with ``heads`` cannot compute a chunk (``q_len < kv_len``) sparse: the first
    head whose pattern says so (:meth:`~mi_compile.patterns.registry.PatternSpec.chunk_reason`),
    with its index; None when every head can."""
    for h, head in enumerate(heads):
        reason = pattern_spec(head.kind).chunk_reason(head)
        if reason is not None:
            return f"head {h} ({head.describe()}): {reason}"
    return None


#: A chunk's share of the prompt length is rounded up to a multiple of ``1 / CHUNK_SHARE_STEPS``,
#: so a layer has at most this many chunk index plans, whatever the chunk lengths.
CHUNK_SHARE_STEPS = 16


def chunk_heads(heads: Sequence[HeadPattern], n: int, prompt_length: int) -> tuple:
    """The heads a chunk (``q_len < kv_len``) whose keys end at ``n`` runs, for a config whose
    counts were chosen for prompts of ``prompt_length`` tokens (0: unknown, heads unchanged).

    Below that length each head becomes :meth:`~mi_compile.patterns.registry.PatternSpec.for_chunk`
    of the chunk's share ``n / prompt_length`` (rounded up to sixteenths): vertical-slash keeps
    that share of its columns. The whole prompt's rows at that point see about that share of
    its columns; a chunk with the full count would compute far more (a head whose count is a
    quarter of the prompt is dense over the first quarter's chunks), which made a 128K prompt
    in 16K chunks ~1.4x the work of its whole prefill."""
    heads = tuple(heads)
    if not prompt_length or n >= prompt_length:
        return heads
    return _heads_at_share(heads, math.ceil(n * CHUNK_SHARE_STEPS / prompt_length))


@functools.lru_cache(maxsize=1024)
def _heads_at_share(heads: tuple, steps: int) -> tuple:
    """:func:`chunk_heads` at the share ``steps / CHUNK_SHARE_STEPS``, made once per layer and
    share (the op calls it for every chunk: a host path)."""
    share = Fraction(steps, CHUNK_SHARE_STEPS)
    return tuple(pattern_spec(h.kind).for_chunk(h, share) for h in heads)


def index_plan(heads: Sequence[HeadPattern], device) -> IndexPlan:
    """The cached :class:`IndexPlan` of ``heads`` on ``device``."""
    heads = tuple(heads)
    device = device if isinstance(device, torch.device) else torch.device(device)
    return cached(("index_plan", heads), device, lambda: _make_plan(heads, device))


# Widest block-sparse row (top-k blocks) the fused builder sorts in a program; wider layers use the
# torch builder.
FUSED_MAX_SORT = 4096


def _use_fused(plan: IndexPlan, n: int, tables: Optional[str], q: torch.Tensor, vs_selection) -> bool:
    if tables not in (None, "triton", "torch"):
        raise ValueError(f"tables must be 'triton', 'torch' or None, got {tables!r}")
    if tables == "torch" or vs_selection is not None:
        return False
    if any(pattern_spec(name).selection == PHASE_TABLE_SELECT for name, _, _ in plan.sel_groups):
        return False        # explicit per-head columns / offsets: the PyTorch builder's path
    fits = plan.widths(n)["blocks"] <= FUSED_MAX_SORT
    return fits and (tables == "triton" or selection_impl(q) == "triton")


def build_index(q: torch.Tensor, k: torch.Tensor, heads: Sequence[HeadPattern], scale: float,
                seq_start: torch.Tensor, seq_len: torch.Tensor,
                vs_selection: Optional[tuple] = None, unpadded: bool = False,
                tables: Optional[str] = None, prompt_length: int = 0) -> SparseIndex:
    """Run each pattern's index builder and assemble the unified tables (inputs validated).

    ``vs_selection = (keys [B, H, *], offsets [B, H, *])`` replaces the vertical-slash
    estimate with an explicit selection (entries of non-vertical-slash heads are ignored;
    see :func:`~mi_compile.patterns.vertical_slash.clean_selection`). ``unpadded``: the caller
    knows every input spans the whole tensor (start 0, length n); cheaper block pooling.
    ``tables``: ``"triton"`` assembles the tables in two fused launches
    (:mod:`mi_compile.kernels.index_tables`; the default on CUDA), ``"torch"`` with PyTorch ops
    (the default elsewhere, with ``vs_selection``, and for layers beyond the fused builder's
    limit, ``FUSED_MAX_SORT``); both give the same tables, bit for bit.
    Patterns with ``PHASE_BLOCK_SELECT`` (xattention) write their own block rows after either
    builder; layers with ``PHASE_TABLE_SELECT`` heads (flex_prefill) always use the PyTorch one.
    ``prompt_length``: a chunk runs :func:`chunk_heads` of the heads (0: the heads as given).
    """
    heads = tuple(heads)
    n = k.shape[2]
    plan = index_plan(heads, q.device)
    if q.shape[2] != n and plan.chunk_reason is not None:
        raise ValueError(f"q_len {q.shape[2]} < kv_len {n} (a chunk) is not supported for this layer: "
                         f"{plan.chunk_reason}")
    if q.shape[2] != n and 0 < n < prompt_length:
        plan = index_plan(chunk_heads(heads, n, prompt_length), q.device)
    if _use_fused(plan, n, tables, q, vs_selection):
        return _build_fused(plan, q, k, scale, seq_start, seq_len, unpadded)
    return _build_torch(plan, q, k, scale, seq_start, seq_len, vs_selection, unpadded)


def _build_fused(plan: IndexPlan, q, k, scale, seq_start, seq_len, unpadded) -> SparseIndex:
    """Top-k in PyTorch (the same calls as the unfused builder), everything after it in the
    two launches of :func:`mi_compile.kernels.index_tables.build_tables`."""
    from ..kernels.index_tables import build_tables

    B, H, nq, _ = q.shape
    n = k.shape[2]
    w = plan.widths(n)
    vs_raw = bs_raw = None
    if plan.vs_ids:
        vert, slash = vertical_slash.estimate_scores(q, k, plan.vs_ids, seq_start, seq_len, scale)
        vs_raw = plan.vs_topk(vert, slash, n)
        del vert, slash
    if plan.bs_ids:
        bs_raw, _ = block_sparse.topk_raw(q, k, plan.bs_ids, plan.bs_topks, seq_start, seq_len, scale, unpadded)
    t = build_tables(plan, B, n, w, seq_start, seq_len, vs_raw, bs_raw, q_len=nq)
    _select_blocks(plan, q, k, scale, seq_start, seq_len, t["blocks"], t["block_count"])
    return SparseIndex(heads=plan.heads, n=n, seq_start=seq_start, seq_len=seq_len,
                       prefix=plan.prefix, sink=plan.sink, band=plan.band, last=plan.last, q_len=nq,
                       max_last=plan.max_last, **t)


def _select_blocks(plan: IndexPlan, q, k, scale, seq_start, seq_len, blocks, block_count) -> None:
    """Write the block rows of the ``PHASE_BLOCK_SELECT`` heads (both builders: the fused one
    leaves them empty, their specs select with PyTorch / their own kernels)."""
    for name, ids, index in plan.sel_groups:
        if pattern_spec(name).selection != PHASE_BLOCK_SELECT:
            continue
        blk, cnt = pattern_spec(name).select_block_table(q, k, ids, [plan.heads[h] for h in ids],
                                                         seq_start, seq_len, scale)
        blocks[:, index] = SENTINEL
        blocks[:, index, :, :blk.shape[-1]] = blk
        block_count[:, index] = cnt


def _build_torch(plan: IndexPlan, q, k, scale, seq_start, seq_len, vs_selection, unpadded) -> SparseIndex:
    """The tables with PyTorch ops (CPU, and explicit selections)."""
    B, H, nq, _ = q.shape
    n = k.shape[2]
    dev = q.device
    w = plan.widths(n)
    nqb = w["nqb"]
    as_int = dict(device=dev, dtype=torch.int32)

    g_width = w["groups"] if plan.vs_ids or plan.as_ids else 1
    cols = offs = None
    if plan.vs_ids:
        if vs_selection is None:
            vert, slash = vertical_slash.estimate_scores(q, k, plan.vs_ids, seq_start, seq_len, scale)
            cols, offs = vertical_slash.select_vertical_slash(vert, slash, plan.vs_params, seq_len)
            del vert, slash
        else:
            cols, offs = vertical_slash.clean_selection(vs_selection[0].index_select(1, plan.vs_index),
                                                        vs_selection[1].index_select(1, plan.vs_index), n)
            g_width = max(g_width, offs.shape[-1])
    custom = [(index, pattern_spec(name).select_tables(q, k, ids, [plan.heads[h] for h in ids], seq_start, seq_len,
                                                       scale, unpadded=unpadded))
              for name, ids, index in plan.sel_groups if pattern_spec(name).selection == PHASE_TABLE_SELECT]
    g_width = max([g_width] + [sel["offsets"].shape[-1] for _, sel in custom])
    group_lo = torch.full((B, H, g_width), SENTINEL, **as_int)
    group_hi = torch.full((B, H, g_width), SENTINEL, **as_int)
    offsets = torch.full((B, H, g_width), SENTINEL, **as_int)
    columns = torch.full((B, H, max([1 if cols is None else cols.shape[-1]] + [sel["columns"].shape[-1]
                                                                                for _, sel in custom])),
                         SENTINEL, **as_int)
    covered = torch.zeros(B, H, n + BLOCK, dtype=torch.uint8, device=dev)
    if plan.as_ids:
        group_lo[:, plan.as_index, 0] = 0
        group_hi[:, plan.as_index, 0] = plan.as_hi.clamp(max=n)    # offsets past n reach no key
    if cols is not None:
        ids = plan.vs_index
        columns[:, ids, :cols.shape[-1]] = cols
        offsets[:, ids, :offs.shape[-1]] = offs
        lo, hi = merge_offsets(offs)
        group_lo[:, ids, :lo.shape[-1]] = lo
        group_hi[:, ids, :hi.shape[-1]] = hi
        covered[:, ids] = covered_table(lo, hi, n)
    for ids, sel in custom:     # explicit selections of PHASE_TABLE_SELECT heads
        columns[:, ids, :sel["columns"].shape[-1]] = sel["columns"]
        offsets[:, ids, :sel["offsets"].shape[-1]] = sel["offsets"]
        lo, hi = merge_offsets(sel["offsets"])
        group_lo[:, ids, :lo.shape[-1]] = lo
        group_hi[:, ids, :hi.shape[-1]] = hi
        covered[:, ids] = covered_table(lo, hi, n)

    blocks = torch.zeros(B, H, nqb, w["blocks"], **as_int)
    block_count = torch.zeros(B, H, nqb, **as_int)
    if plan.bs_ids:
        blk, cnt = block_sparse.select_blocks(q, k, plan.bs_ids, plan.bs_topks, seq_start, seq_len, scale,
                                              unpadded)
        if blk.shape[-1] < blocks.shape[-1]:    # a wider block-select head: pad as the fused builder
            blocks[:, plan.bs_index] = SENTINEL
        blocks[:, plan.bs_index, :, :blk.shape[-1]] = blk
        block_count[:, plan.bs_index] = cnt
    _select_blocks(plan, q, k, scale, seq_start, seq_len, blocks, block_count)
    for ids, sel in custom:
        blocks[:, ids] = SENTINEL
        blocks[:, ids, :, :sel["blocks"].shape[-1]] = sel["blocks"]
        block_count[:, ids] = sel["block_count"]

    tile_start, tile_end, tiles_upto = group_tiles(group_lo, group_hi, plan.prefix, nqb, w["tiles"])
    return SparseIndex(
        heads=plan.heads, n=n, seq_start=seq_start, seq_len=seq_len,
        prefix=plan.prefix, sink=plan.sink, band=plan.band, last=plan.last,
        group_lo=group_lo, group_hi=group_hi, groups_upto=count_upto(group_lo, nqb),
        tile_start=tile_start, tile_end=tile_end, tiles_upto=tiles_upto,
        columns=columns, columns_upto=count_upto(columns, nqb, reach=-1), covered=covered,
        blocks=blocks, block_count=block_count, offsets=offsets, q_len=nq, max_last=plan.max_last)


def head_selection_mask(index: SparseIndex, h: int) -> torch.Tensor:
    """Reference selection of query head ``h``: bool ``[B, q_len, n]`` in tensor coordinates
    (query row ``r`` is key position ``n - q_len + r``; ``q_len = n`` for a whole prefill).

    Built from the pattern definitions and the raw selection (columns, offsets, blocks), never
    from the kernel's range tables, so it checks them.
    """
    n = index.n
    dev = index.seq_start.device
    start = index.seq_start.long()[:, None, None]
    length = index.seq_len.long()[:, None, None]
    t = torch.arange(n, device=dev)
    rows = torch.arange(index.num_queries, device=dev) + index.q_offset
    i = rows[None, :, None] - start                                       # [B, q_len, 1]
    j = t[None, None, :] - start                                          # [B, 1, n]
    base = (j >= 0) & (j <= i) & (i < length) & (i >= 0)
    head = index.heads[h]
    spec = pattern_spec(head.kind)
    if not spec.per_block:
        own = spec.mask_at(i, j, head, length)
        return base if own is None else base & own
    # A per-block selection depends on the query only through its 64-row block (causality
    # aside), so evaluate the pattern once per block and give each row its block's keys: n/64
    # pattern rows instead of n (the CPU reference's main cost).
    B = index.seq_start.shape[0]
    nqb = -(-n // BLOCK)
    block_starts = (torch.arange(nqb, device=dev) * BLOCK)[None, :, None].expand(B, nqb, 1)
    per_block = block_rows(index, h, block_starts, j)
    row_block = (i[..., 0].clamp(min=0) // BLOCK).clamp(max=nqb - 1)                # [B, n]
    return base & per_block[torch.arange(B, device=dev)[:, None], row_block]


def block_rows(index: SparseIndex, h, block_starts: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The reference selection of query blocks for a per-block pattern (vertical-slash,
    block-sparse): bool ``[B, U, n]`` for head ``h`` (an int), ``[B, heads, U, n]`` for a slice of
    heads with one pattern; ``block_starts`` ``[B or 1, U, 1]`` and keys ``j`` ``[B or 1, 1, n]``
    in sequence coordinates (causality and bounds are the caller's). The reference mask, the
    search's scoring and the eval's pair counts evaluate selections this way.

    A head with ``last = T > 0`` (the index's ``last`` table) sees every key from the query
    blocks holding any of its sequence's last ``T`` queries, whatever its pattern selects."""
    heads = [index.heads[h]] if isinstance(h, int) else index.heads[h]
    selected = pattern_spec(heads[0].kind).block_mask(heads[0], index, h, block_starts, j)
    if not any(head.last for head in heads):
        return selected
    length = index.seq_len.long()[:, None, None]                                     # [B, 1, 1]
    last = index.last.long()[h].to(block_starts.device)
    if isinstance(h, int):
        return selected | dense_last_block(block_starts, length, last)                  # [B, U, 1]
    return selected | dense_last_block(block_starts[:, None], length[:, None], last[None, :, None, None])


def selection_mask_from_index(index: SparseIndex) -> torch.Tensor:
    """bool ``[B, H, q_len, n]``: every head's :func:`head_selection_mask` (small n only)."""
    return torch.stack([head_selection_mask(index, h) for h in range(len(index.heads))], 1)
