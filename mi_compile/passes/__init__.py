"""FX graph passes, one concern per file, run in this order by :func:`run_passes`:

1. :mod:`.find_attention`   - every SDPA call and its decoder layer
2. :mod:`.classify_mask`    - what its mask means (causal / padding / sliding window / unknown;
   bottom-right causal for a prefill chunk that continues a cache; top-left causal over more
   keys than queries, which runs as a prefill over the first keys)
3. :mod:`.undo_repeat_kv`   - K/V once per KV head (native GQA)
4. :mod:`.rewrite_attention`- the call becomes ``mi_compile::sparse_attention`` or stays dense, with the reason
5. :mod:`.contiguous_cache` - a rewritten prefill's K / V that a cache keeps are returned contiguous

Before 4, under tensor parallelism, :mod:`mi_compile.tensor_parallel` gives the rewrite this
rank's slice of the whole-model per-head config.
"""
from __future__ import annotations

import dataclasses
import logging

import torch.fx

from .classify_mask import ClassifyMaskPass
from .contiguous_cache import ContiguousCacheOutputsPass
from .find_attention import FindAttentionPass
from .rewrite_attention import RewriteAttentionPass
from .site import AttentionSite, MaskInfo
from .undo_repeat_kv import UndoRepeatKVPass
from ..config import ConfigFamily
from ..tensor_parallel import rank_config, resolve_tp

log = logging.getLogger("mi_compile")

__all__ = ["run_passes", "PassReport", "AttentionSite", "MaskInfo"]


@dataclasses.dataclass
class PassReport:
    """What the passes did to one graph (the explain table is made from this)."""

    graph_id: int
    sites: list[AttentionSite]
    config_source: str
    default_policy: bool
    before_code: str = ""
    after_code: str = ""
    tp: object = None        # tensor_parallel.TPSlice when this rank runs a slice of the config
    # a config family's members as (length, source), ascending; None for a single config
    family: object = None

    @property
    def rewritten(self) -> int:
        return sum(s.action == "sparse" for s in self.sites)


def _whole_model_layers(gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> int | None:
    """The model's layer count if this graph runs the whole decoder stack, else None.

    A graph reaches the end of the model when, after its last attention call, it runs modules
    outside the decoder layers (final norm, lm_head): then max layer + 1 is the layer count.
    """
    layers = [s.layer for s in sites if s.layer is not None]
    if not layers or min(layers) != 0:
        return None
    last = sites[-1].node
    after = False
    for node in gm.graph.nodes:
        if node is last:
            after = True
            continue
        if after and node.op in ("call_function", "call_method", "call_module"):
            stack = node.meta.get("nn_module_stack") or {}
            paths = [str(p) for p, _ in stack.values()]
            if paths and not any("layers" in p for p in paths):
                return max(layers) + 1
    return None


def _check_dense_layers(options, num_layers: int | None) -> None:
    """Option ``dense_layers`` must name layers the model has (checked once the graph shows
    the whole decoder stack, the only place the layer count is known): a typo would otherwise
    silently leave nothing dense."""
    if num_layers is None:
        return
    extra = sorted(i for i in options.dense_layers if i >= num_layers)
    if extra:
        from ..options import OptionsError

        raise OptionsError(f"option 'dense_layers' names layer(s) {extra}, the model has {num_layers} "
                           f"layers (0..{num_layers - 1})")


def _has_attention_modules(gm: torch.fx.GraphModule) -> bool:
    """Whether any node was traced inside a module whose class name ends in ``Attention``."""
    for node in gm.graph.nodes:
        for _, mtype in (node.meta.get("nn_module_stack") or {}).values():
            if getattr(mtype, "__name__", str(mtype)).endswith("Attention"):
                return True
    return False


def _structured_trace_on() -> bool:
    try:
        from torch._logging._internal import trace_log
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(trace_log.handlers)


def run_passes(gm: torch.fx.GraphModule, options, config, graph_id: int = 0, keep_code: bool | None = None) -> PassReport:
    """Run the passes on ``gm`` in place. The readable before/after code (a third of the passes'
    cost on a 30-layer model) is kept only when something will show it: a dump folder,
    TORCH_TRACE, or ``keep_code=True``."""
    if keep_code is None:
        keep_code = bool(options.dump_dir) or _structured_trace_on()
    before = gm.print_readable(print_output=False) if keep_code else ""
    sites = FindAttentionPass()(gm)
    if not sites and _has_attention_modules(gm):
        log.warning("mi_compile: graph %d has attention modules but no scaled_dot_product_attention call, so "
                    "nothing can be made sparse; load the model with attn_implementation=\"sdpa\"", graph_id)
    ClassifyMaskPass()(gm, sites)
    UndoRepeatKVPass()(gm, sites)
    q_heads = {s.q_heads for s in sites if isinstance(s.q_heads, int)}
    num_layers = _whole_model_layers(gm, sites)
    _check_dense_layers(options, num_layers)
    config.check_layers(num_layers)         # before the head slice: ranks share every layer
    local_heads = next(iter(q_heads)) if len(q_heads) == 1 else None
    tp = resolve_tp(gm, getattr(options, "tp", None), local_heads, config) if sites else None
    if tp is not None:
        config = rank_config(config, tp)     # this rank's heads of the whole-model config (of each member)
    if len(q_heads) == 1:
        config.check_model(num_layers, q_heads.pop())
    RewriteAttentionPass(options, config)(gm, sites)
    ContiguousCacheOutputsPass()(gm, sites)
    report = PassReport(graph_id=graph_id, sites=sites, config_source=config.source,
                        default_policy=config.is_default_policy, before_code=before,
                        after_code=gm.print_readable(print_output=False) if keep_code else "", tp=tp,
                        family=[(m.length, m.source) for m in config.members]
                        if isinstance(config, ConfigFamily) else None)
    log.info("mi_compile: graph %d: %d attention call(s), %d rewritten to sparse, %d left dense",
             graph_id, len(sites), report.rewritten, len(sites) - report.rewritten)
    return report
