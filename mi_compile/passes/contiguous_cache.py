"""Pass 5: the K / V of a rewritten prefill that the graph returns (a cache keeps them) are
returned with contiguous strides.

A prefill from an empty ``DynamicCache`` stores its keys as the layer made them, the
projection viewed ``[b, n, hkv, d]`` and transposed, RoPE applied: strides of a ``[b, n, hkv, d]``
tensor. Whatever continues that cache (a chunk, a turn, a decode step) concatenates it into
contiguous ``[b, hkv, n, d]`` tensors, and Dynamo guards the strides of the cache's tensors: the
continuing graph compiled over the prefill's cache is compiled again over its own (two full
compiles of the model where one would do). Before::

    k = rope(k_proj(x).view(b, n, hkv, d).transpose(1, 2))
    out = torch.ops.mi_compile.sparse_attention(q, k, v, ...)
    return (..., k, v, ...)                   # -> cache.layers[i].keys / values

After::

    k = rope(...).contiguous();  v = v.contiguous()
    out = torch.ops.mi_compile.sparse_attention(q, k, v, ...)
    return (..., k, v, ...)

Only prefills over no cache (mask ``causal`` / ``sliding_window``, with or without padding)
whose K / V the graph returns change; a chunk's K / V are already the concatenated ones, and a static cache's are its own
buffers, written in place (their addresses are the cache's). Under Inductor the copy is the
RoPE kernel writing that layout. Counted in ``contiguous_cache_outputs``.
"""
from __future__ import annotations

import torch.fx

from .site import AttentionSite, bump

PREFILL_MASKS = ("causal", "causal+padding", "sliding_window", "sliding_window+padding")


def _cache_buffer(node: torch.fx.Node) -> bool:
    """An input of the graph, or what an in-place method returns (a static cache's buffer after
    ``index_copy_``): a tensor the cache owns, which must stay the same tensor."""
    target = getattr(node.target, "__name__", node.target)
    return node.op == "placeholder" or (isinstance(target, str) and target.endswith("_") and not target.endswith("__"))


class ContiguousCacheOutputsPass:
    name = "contiguous_cache_outputs"

    def __call__(self, gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> int:
        graph = gm.graph
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        returned: set = set()
        torch.fx.node.map_arg(output.args, returned.add)
        done = 0
        for site in sites:
            if site.action != "sparse" or site.mask is None or site.mask.kind not in PREFILL_MASKS:
                continue
            for source in (site.key_source, site.value_source):
                if source not in returned or _cache_buffer(source):
                    continue
                with graph.inserting_after(source):
                    copy = graph.call_method("contiguous", (source,))
                copy.meta.update({k: v for k, v in source.meta.items() if k in ("nn_module_stack", "stack_trace")})
                source.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
                returned.discard(source)
                done += 1
        if done:
            graph.lint()
            gm.recompile()
        bump("contiguous_cache_outputs", done)
        return done
