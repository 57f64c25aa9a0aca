"""Pass 4: replace each recognised attention call with ``mi_compile::sparse_attention``.

Before (a Llama layer, ``use_cache=False``)::

    key   = k[:, :, None].expand(b, hkv, g, n, d).reshape(b, hkv * g, n, d)
    value = v[:, :, None].expand(b, hkv, g, n, d).reshape(b, hkv * g, n, d)
    mask  = (causal & padding[b_idx, kv_idx]).expand(b, -1, n, n)          # O(n^2)
    out   = torch._C._nn.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=s)

After::

    out = torch.ops.mi_compile.sparse_attention(q, k, v, heads=[...layer's per-head table...],
              scale=s, key_padding_mask=padding, window=0, min_seq_len=65536, layer=3)

The repeat_kv and mask nodes lose their last user and are removed by dead-code elimination,
so neither the repeated K/V nor the n x n mask is ever built. Calls that are not causal
prefill attention, or that the options keep dense, are left untouched with the reason recorded.

A prefill chunk that continues a ``DynamicCache`` (mask ``causal_bottom_right``, see
:mod:`.classify_mask`) becomes the same op over the whole cache::

    keys = torch.cat([past_keys, k], dim=-2)                      # [b, hkv, past + nq, d]
    mask = (kv_idx <= q_idx + past) & padding[b_idx, kv_idx]       # [b, 1, nq, past + nq]
    out  = sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=mask, scale=s)
->
    out  = torch.ops.mi_compile.sparse_attention(q, keys, values, heads=[...], scale=s,
              key_padding_mask=padding[:, :past + nq], window=0, min_seq_len=..., layer=3,
              prompt_length=131072)

(the op aligns query row ``r`` with key ``nk - nq + r``; ``prompt_length`` is the config's
``length``, given when the config has one, which scales a chunk's vertical counts), unless the op says such a layer's
heads cannot run a chunk sparse (:func:`mi_compile.op.chunk_dense_reason`).

A call over more keys than queries whose mask is causal aligned top-left (mask
``causal_top_left``: ``is_causal=True`` with ``nq < nk``, a static cache's prefill; query ``r``
sees keys ``0..r``) is a prefill over its first ``nq`` keys, and becomes one::

    keys.index_copy_(2, cache_position, k)                        # a static cache: [b, hkv, max_cache_len, d]
    mask = (kv_idx <= q_idx) & padding[b_idx, kv_idx]              # [b, 1, nq, max_cache_len]
    out  = sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=mask, scale=s)
->
    nq   = q.size(2)                                               # (a constant for static shapes)
    out  = torch.ops.mi_compile.sparse_attention(q, keys.narrow(2, 0, nq), values.narrow(2, 0, nq),
              heads=[...], scale=s, key_padding_mask=padding.narrow(1, 0, nq), window=0,
              min_seq_len=..., layer=3)

(counted in ``rewritten_top_left``). Where the shapes do not prove ``nq <= nk`` (lengths of
their own under dynamic shapes), the traced input's lengths decide and a guard ``nq <= nk``
makes Dynamo recompile for an input where that flips; a call with more queries than keys stays
dense.

A chunk continuing a static cache (mask ``causal_static_offset``: query ``r`` sees slots
``0..c + r``, ``c`` the cache's runtime length tensor) becomes the op's bottom-right chunk over
a rotated cache, every index computed on the device (no host sync)::

    keys.index_copy_(2, cache_position, k)                        # [b, hkv, max_cache_len, d]
    mask = (kv_idx <= q_idx + cumulative_length) & padding[b_idx, kv_idx]
    out  = sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=mask, scale=s)
->
    c    = cumulative_length.clone()                               # at the graph's start, before add_
    idx  = (torch.arange(nk) + (c + nq)) % nk                      # filled slots last, unfilled first
    out  = torch.ops.mi_compile.sparse_attention(q, keys.index_select(2, idx),
              values.index_select(2, idx), heads=[...], scale=s,
              key_padding_mask=padding.index_select(1, idx) & (idx < c + nq), window=0, ...)

(counted in ``rewritten_static_chunk``; the unfilled slots are left padding to the op; the
gather costs a copy of K and V per layer). Decode steps (one query token) and a top-left mask
with a sliding window stay dense, with the reason.

With a config family (:class:`mi_compile.config.ConfigFamily`, members searched at 32K and 128K)
the op carries every member's heads and picks one per call from its key count::

    out = sdpa(q, key, value, attn_mask=mask, scale=s)
->
    out = torch.ops.mi_compile.sparse_attention(q, k, v, heads=[...32K table..., ...128K table...],
              scale=s, key_padding_mask=padding, window=0, min_seq_len=32768, layer=3,
              prompt_length=0, family=[32768, 48, 131072, 96])

(``family``: each member's length and the end of its table in ``heads``; counted in
``rewritten_family``). A chunk stays dense when any member's heads cannot take one; a
sliding-window layer keeps its exact A-shape, without a family.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import op
from ..config import ConfigFamily
from ..patterns.spec import HeadPattern, encode_heads
from ..sparse import MAX_HEAD_DIM, MIN_HEAD_DIM, SUPPORTED_DTYPES
from .classify_mask import _sym_expr
from .find_attention import sdpa_arg
from .site import AttentionSite, bump

log = logging.getLogger(__name__)


def _example(node):
    val = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def kernel_limits_reason(site: AttentionSite) -> str:
    """Why the sparse kernels cannot take this call (head_dim, dtype), or "" if they can.

    Checked at trace time so such a call stays dense instead of failing on the first long
    prompt inside the op."""
    d = site.head_dim
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM) or d % 8:
        return (f"head_dim {d} unsupported by the sparse kernels "
                f"(need {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, a multiple of 8)")
    q = _example(sdpa_arg(site.node, "query"))
    if q is not None and q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} unsupported by the sparse kernels (need float16, bfloat16 or float32)"
    return ""


def lengths_reason(site: AttentionSite) -> str:
    """Why query and key lengths may differ (then the call is not a prefill), or "".

    Symbolic lengths count as equal only when the shape environment knows they are (the same
    symbol, as when q and k come from one hidden state). Chunks (bottom-right) and top-left
    calls (narrowed to their first ``nq`` keys) are not asked."""
    q, k = _example(sdpa_arg(site.node, "query")), _example(sdpa_arg(site.node, "key"))
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return "query/key shapes unknown"
    nq, nk = _sym_expr(q.shape[2]), _sym_expr(k.shape[2])
    if nq == nk or statically_known_true(q.shape[2] == k.shape[2]):   # no guard added
        return ""
    if isinstance(nq, int) and isinstance(nk, int):
        return f"query length {nq} != key length {nk} (not a prefill)"
    return f"query length {nq} may differ from key length {nk} (not provably a prefill)"


# Python's in-place operators (``x += y`` on a tensor mutates it); ``operator.and_`` and the
# like also end in "_" but are pure, so the operator module is listed, not matched by name.
_INPLACE_OPERATORS = {operator.iadd, operator.iand, operator.iconcat, operator.ifloordiv,
                      operator.ilshift, operator.imatmul, operator.imod, operator.imul, operator.ior,
                      operator.ipow, operator.irshift, operator.isub, operator.itruediv,
                      operator.ixor, operator.setitem, operator.delitem}
# the same as tensor methods (``x.__iadd__(y)``); other dunder methods (``__eq__``, ``__and__``) are pure
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in _INPLACE_OPERATORS if op.__name__ != "iconcat"}


def has_side_effects(node: torch.fx.Node) -> bool:
    """Keep a node through dead-code elimination even when nothing uses its result.

    FX treats every ``call_method`` node as pure, but Dynamo records in-place tensor methods
    that way: a static KV cache is written by ``keys.index_copy_(2, cache_position, k)``, whose
    result is unused while the attention reads ``keys`` afterwards. Plain
    ``eliminate_dead_code()`` deleted those writes, so a static-cache prefill attended to a
    never-written cache and produced wrong tokens. In-place methods and torch functions
    (trailing ``_``), Python's in-place operators and ``__setitem__`` count as side effects
    here, on top of FX's own rules; other dunder methods do not (an unused ``mask.__eq__(...)``,
    an ``n x n`` comparison torch 2.11 traces from transformers' mask, goes)."""
    if node.op == "call_method":
        if node.target.startswith("__") and node.target.endswith("__"):
            return node.target in _INPLACE_DUNDERS
        return node.target.endswith("_")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        if (getattr(node.target, "__module__", None) != "_operator" and name.endswith("_")
                and not name.endswith("__")):
            return True
    return node.is_impure()


def top_left_reason(site: AttentionSite) -> str:
    """Why a top-left causal call cannot run as a prefill over its first ``nq`` keys, or "".

    That needs ``nq <= nk``. Where the shape environment does not know it (symbolic lengths of
    their own, as under ``dynamic=True``), this input's lengths decide and the answer becomes
    a guard (``nq <= nk``; Dynamo recompiles for an input where it flips)."""
    q, k = _example(sdpa_arg(site.node, "query")), _example(site.key_source)
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return "query/key shapes unknown"
    nq, nk = q.shape[2], k.shape[2]
    if statically_known_true(nq <= nk):
        return ""
    if not (isinstance(nq, int) and isinstance(nk, int)):
        try:
            if bool(nq <= nk):          # guarded from here on
                return ""
        except Exception as e:  # noqa: BLE001  - e.g. data-dependent (unbacked) lengths: no guard possible
            return f"query length {nq} may exceed key length {nk} ({type(e).__name__})"
    return (f"query length {nq} exceeds key length {nk} here: top-left causal attention over fewer keys "
            f"than queries is not a prefill")


def _narrowed(graph: torch.fx.Graph, node: torch.fx.Node, dim: int, length, known_length) -> torch.fx.Node:
    """``node.narrow(dim, 0, length)``, or ``node`` itself where its size there is ``known_length``."""
    val = _example(node)
    if val is not None and (_sym_expr(val.shape[dim]) == _sym_expr(known_length)
                            or statically_known_true(val.shape[dim] == known_length)):
        return node
    return graph.call_method("narrow", (node, dim, 0, length))


def _first_keys(graph: torch.fx.Graph, site: AttentionSite):
    """K, V and the padding mask of a top-left causal call cut to its first ``nq`` keys (the
    query length: a SymInt read from the query where symbolic). Inserted before the call."""
    query = sdpa_arg(site.node, "query")
    nq = _example(query).shape[2]
    length = nq if isinstance(nq, int) else graph.call_method("size", (query, 2))
    key = _narrowed(graph, site.key_source, 2, length, nq)
    value = _narrowed(graph, site.value_source, 2, length, nq)
    padding = site.mask.padding_source
    if padding is not None:
        padding = _narrowed(graph, padding, 1, length, nq)
    return key, value, padding


def _chunk_padding(graph: torch.fx.Graph, site: AttentionSite):
    """The key padding mask for a chunk, cut to the keys' length: transformers indexes the
    2D ``attention_mask`` with ``arange(nk)``, so only its first ``nk`` columns count, and
    under dynamic shapes its length is a symbol of its own. Inserted before the call."""
    padding = site.mask.padding_source
    pad, key = _example(padding), _example(site.key_source)
    if padding is None or pad is None or key is None or pad.dim() != 2:
        return padding
    if _sym_expr(pad.shape[1]) == _sym_expr(key.shape[2]) or statically_known_true(pad.shape[1] == key.shape[2]):
        return padding
    nk = graph.call_method("size", (site.key_source, 2))
    return graph.call_method("narrow", (padding, 1, 0, nk))


def _start_value(graph: torch.fx.Graph, offset: torch.fx.Node, starts: dict) -> torch.fx.Node:
    """A copy of input ``offset`` made before the graph's first computation, once per input:
    the graph writes a static cache's length in place (``cumulative_length.add_(nq)``) before
    the attention, and the classifier proved the mask read it unwritten."""
    if offset not in starts:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            starts[offset] = graph.call_method("clone", (offset,))
    return starts[offset]


def _filled_slots_last(graph: torch.fx.Graph, site: AttentionSite, starts: dict):
    """K, V and a key padding mask for a static cache's chunk (mask ``causal_static_offset``:
    query ``r`` sees slots ``0..c + r``, ``c`` the runtime length tensor), as the op's
    bottom-right chunk. K/V are gathered along the slots with ``(arange(nk) + c + nq) % nk``,
    which puts the filled slots ``0..c + nq - 1`` last (query ``r`` lands at key
    ``nk - nq + r``, slot ``c + r``) and the unfilled ones first, masked as left padding
    (``& padding`` where the mask has one: a left-padded row stays one run of keys). All on
    the device, no host sync; it costs a copy of K and V per layer. Inserted before the call."""
    query, key = sdpa_arg(site.node, "query"), site.key_source
    q, k = _example(query), _example(key)
    # the layers share one mask, so one rotation: built for the first, reused by the others
    shared = (site.mask.offset_source, str(_sym_expr(q.shape[2])), str(_sym_expr(k.shape[2])), str(k.device))
    if shared not in starts:
        nq = q.shape[2] if isinstance(q.shape[2], int) else graph.call_method("size", (query, 2))
        nk = k.shape[2] if isinstance(k.shape[2], int) else graph.call_method("size", (key, 2))
        start = graph.call_method("to", (_start_value(graph, site.mask.offset_source, starts), k.device))
        end = graph.call_function(operator.add, (start, nq))                   # c + nq, on the device
        slots = graph.call_function(torch.arange, (nk,), {"device": k.device})
        idx = graph.call_function(torch.remainder, (graph.call_function(operator.add, (slots, end)), nk))
        starts[shared] = idx, graph.call_function(operator.lt, (idx, end))
    idx, filled = starts[shared]
    padding = _chunk_padding(graph, site)
    if padding is None:
        batch = q.shape[0] if isinstance(q.shape[0], int) else graph.call_method("size", (query, 0))
        padding = graph.call_method("expand", (graph.call_method("unsqueeze", (filled, 0)), batch, -1))
    else:
        padding = graph.call_function(operator.and_, (graph.call_method("index_select", (padding, 1, idx)), filled))
    key = graph.call_method("index_select", (key, 2, idx))
    value = graph.call_method("index_select", (site.value_source, 2, idx))
    return key, value, padding


def _op_tables(site: AttentionSite) -> tuple[list[int], list[int]]:
    """The op's ``heads`` and ``family`` arguments for a sparse site: its own head table and no
    family, or every member's table one after the other and ``[length_0, end_0, length_1,
    end_1, ...]`` (member ``i``'s table ends at ``end_i``)."""
    if not site.family:
        return encode_heads(site.heads), []
    heads: list[int] = []
    members: list[int] = []
    for length, member_heads in site.family:
        heads += encode_heads(member_heads)
        members += [int(length), len(heads)]
    return heads, members


class RewriteAttentionPass:
    name = "rewrite_attention"

    def __init__(self, options, config):
        self.options = options
        self.config = config

    def decide(self, site: AttentionSite) -> None:
        """Set ``site.action`` / ``site.heads`` / ``site.reason``; nothing in the graph changes."""
        node = site.node
        dropout = sdpa_arg(node, "dropout_p", 0.0)
        if site.q_len == "1":
            return site.keep_dense("decode step (one query token)")
        if site.mask is None or site.mask.kind == "unknown":
            reason = site.mask.reason if site.mask else "?"
            if reason.startswith(("static cache:", "causal aligned top-left with a sliding window")):
                return site.keep_dense(reason)
            return site.keep_dense(f"mask not understood: {reason}")
        if site.mask.kind == "none":
            return site.keep_dense("not causal (no mask, is_causal=False)")
        if not isinstance(dropout, (int, float)) or dropout != 0.0:
            return site.keep_dense(f"dropout_p={dropout} (training)")
        if site.q_heads is None or site.kv_heads is None or site.head_dim is None:
            return site.keep_dense("query/key shapes unknown")
        if not all(isinstance(x, int) for x in (site.q_heads, site.kv_heads, site.head_dim)):
            return site.keep_dense("head counts or head_dim are symbolic")
        if site.q_heads % site.kv_heads:
            return site.keep_dense(f"{site.q_heads} query heads not a multiple of {site.kv_heads} KV heads")
        # a chunk's lengths differ by construction (the classifier proved nq <= nk and the
        # bottom-right mask), a top-left call's are made equal (its first nq keys); anything
        # else must be a prefill
        reason = kernel_limits_reason(site) or (
            "" if site.mask.chunk or site.mask.top_left or site.mask.static_chunk else lengths_reason(site))
        if reason:
            return site.keep_dense(reason)
        if site.layer is None:
            return site.keep_dense("layer index not found in nn_module_stack")
        if site.layer in self.options.dense_layers:
            return site.keep_dense(f"layer {site.layer} kept dense by option dense_layers")
        if site.mask.top_left:
            reason = top_left_reason(site)      # last: it may add a guard, for a rewritten call only
            if reason:
                return site.keep_dense(reason)
        if site.mask.window:
            # The model itself limits this layer to a sliding window: that *is* an A-shape with
            # no sinks, computed exactly, whatever the config says for its heads.
            site.heads = [HeadPattern("a_shape", sink=0, local=site.mask.window)] * site.q_heads
        elif isinstance(self.config, ConfigFamily):
            # every member's heads go into the op, which picks one per call by its key count
            site.family = [(int(m.length), m.heads_for(site.layer, site.q_heads)) for m in self.config.members]
            site.heads = site.family[-1][1]
        else:
            site.heads = self.config.heads_for(site.layer, site.q_heads)
        if site.mask.chunk or site.mask.static_chunk:
            reason = next(filter(None, map(op.chunk_dense_reason, site.head_tables())), None)
            if reason:
                site.heads = site.family = None
                return site.keep_dense(f"prefill chunk over a cache: {reason}")
        site.action = "sparse"

    def __call__(self, gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> int:
        rewritten = top_left = static = family = 0
        graph = gm.graph
        starts: dict = {}      # a static cache's length input -> its value at the start; its rotation
        for site in sites:
            if site.action == "pending":
                self.decide(site)
            if site.action != "sparse":
                continue
            node = site.node
            with graph.inserting_before(node):
                key, value, padding = site.key_source, site.value_source, site.mask.padding_source
                if site.mask.chunk:
                    padding = _chunk_padding(graph, site)
                elif site.mask.top_left:
                    key, value, padding = _first_keys(graph, site)
                    top_left += 1
                elif site.mask.static_chunk:
                    key, value, padding = _filled_slots_last(graph, site, starts)
                    static += 1
                heads, members = _op_tables(site)
                args = (sdpa_arg(node, "query"), key, value, heads,
                        sdpa_arg(node, "scale"), padding, int(site.mask.window), int(self.options.min_seq_len),
                        int(site.layer))
                if members:
                    args += (0, members)                 # each member's length is its calls' prompt length
                    family += 1
                elif (site.mask.chunk or site.mask.static_chunk) and self.config.length:
                    args += (int(self.config.length),)   # the prompt length the counts are for
                new = graph.call_function(torch.ops.mi_compile.sparse_attention.default, args)
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            site.node = new
            rewritten += 1
        bump("rewritten_sparse", rewritten)
        bump("rewritten_top_left", top_left)
        bump("rewritten_static_chunk", static)
        bump("rewritten_family", family)
        bump("left_dense", sum(s.action == "dense" for s in sites))
        graph.eliminate_dead_code(is_impure_node=has_side_effects)
        graph.lint()
        gm.recompile()
        log.info("mi_compile: %s rewrote %d of %d attention call(s)", self.name, rewritten, len(sites))
        return rewritten
