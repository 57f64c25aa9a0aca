"""Pass 1: find every scaled_dot_product_attention call and the layer it belongs to.

Matches, in the Dynamo FX graph (torch IR, before AOTAutograd)::

    attn = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.0,
                                                     scale=s, is_causal=c, enable_gqa=g)

(``torch.nn.functional.scaled_dot_product_attention`` is the same call under another name.)
The layer index comes from ``node.meta["nn_module_stack"]``: the innermost module whose path has a
``layers.<i>`` / ``layers[<i>]`` / ``h.<i>`` component, e.g. ``L['self'].model.layers.3.self_attn``
-> layer 3. Nothing in the graph changes here.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.fx

from .site import AttentionSite, bump

log = logging.getLogger(__name__)

SDPA_TARGETS = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
)
_LAYER_RE = re.compile(r"(?:layers|layer|h|blocks|block)(?:\.|\[)(\d+)\]?")


def is_sdpa(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def _clean_path(path: str) -> str:
    """``L['self'].model.layers[3].self_attn`` (or, on newer torch, ``L['args'][0].model...``)
    -> ``model.layers.3.self_attn``: the path as the user's module names it."""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"^L\.(?:self|args\.\d+)(?:\.|$)", "", path)
    return path.lstrip(".")


def module_of(node: torch.fx.Node) -> tuple[str, str, int | None]:
    """(module path, module type name, layer index) of the innermost module owning ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "?", "?", None
    path, mtype = list(stack.values())[-1]
    path = _clean_path(str(path))
    layer = None
    for p, _ in reversed(list(stack.values())):
        m = _LAYER_RE.findall(_clean_path(str(p)))
        if m:
            layer = int(m[-1])
            break
    return path, getattr(mtype, "__name__", str(mtype)), layer


def sdpa_arg(node: torch.fx.Node, name: str, default=None):
    """Read an SDPA argument given positionally or by keyword."""
    order = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    if name in node.kwargs:
        return node.kwargs[name]
    i = order.index(name)
    if i < len(node.args):
        return node.args[i]
    return default


def fake_shape(node) -> tuple | None:
    val = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


class FindAttentionPass:
    """Collect :class:`AttentionSite` records for every SDPA call in graph order."""

    name = "find_attention"

    def __call__(self, gm: torch.fx.GraphModule) -> list[AttentionSite]:
        sites = []
        for node in gm.graph.nodes:
            if not is_sdpa(node):
                continue
            path, mtype, layer = module_of(node)
            site = AttentionSite(node=node, index=len(sites), layer=layer, module_path=path, module_type=mtype)
            q, k = fake_shape(sdpa_arg(node, "query")), fake_shape(sdpa_arg(node, "key"))
            if q is not None and len(q) == 4:
                site.q_heads, site.q_len, site.head_dim = q[1], str(q[2]), q[3]
            if k is not None and len(k) == 4:
                site.kv_heads, site.kv_len = k[1], str(k[2])
            site.key_source = sdpa_arg(node, "key")
            site.value_source = sdpa_arg(node, "value")
            sites.append(site)
        bump("attention_found", len(sites))
        log.info("mi_compile: %s found %d attention call(s)", self.name, len(sites))
        return sites
