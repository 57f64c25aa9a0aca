"""Pass 3: read K/V once per KV head (native GQA) instead of once per query head.

Matches transformers' ``repeat_kv`` as Dynamo traces it (Llama, Qwen2, Mistral, Phi3, ...)::

    k5 = k[:, :, None, :, :]                      # [b, hkv, 1, n, d]
    k6 = k5.expand(b, hkv, groups, n, d)          # [b, hkv, groups, n, d]
    key = k6.reshape(b, hkv * groups, n, d)       # [b, hq, n, d]   <- what SDPA receives
    sdpa(q, key, value, ...)

and records ``k`` (and likewise ``v``) as the tensors the sparse op reads: the op's kernels map
query head ``h`` to KV head ``h // groups`` themselves, so the repeated copies (6 GiB at 128K
for an 8B model's layer in MInference's kernels) are never made. ``enable_gqa=True`` calls
already pass un-repeated K/V. The graph is not changed here; the rewrite pass uses the result
(the repeat nodes then die with no users and are removed by dead-code elimination).
"""
from __future__ import annotations

import logging
import operator

import torch.fx

from .find_attention import fake_shape, sdpa_arg
from .site import AttentionSite, bump

log = logging.getLogger(__name__)


def _is_method(node, *names) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_method" and node.target in names)
        or (node.op == "call_function" and getattr(node.target, "__name__", None) in names))


def match_repeat_kv(node: torch.fx.Node) -> torch.fx.Node | None:
    """Return the un-repeated ``[b, hkv, n, d]`` tensor behind ``node``, or None if not repeat_kv."""
    if not _is_method(node, "reshape", "view"):
        return None
    expand = node.args[0]
    if not _is_method(expand, "expand"):
        return None
    unsq = expand.args[0]
    if not (isinstance(unsq, torch.fx.Node) and unsq.op == "call_function" and unsq.target is operator.getitem):
        return None
    idx = unsq.args[1]
    if not (isinstance(idx, tuple) and len(idx) == 5 and idx[2] is None
            and all(isinstance(i, slice) and i == slice(None) for i in idx[:2] + idx[3:])):
        return None
    src = unsq.args[0]
    src_shape, out_shape = fake_shape(src), fake_shape(node)
    if src_shape is None or out_shape is None or len(src_shape) != 4 or len(out_shape) != 4:
        return None
    hq, hkv = out_shape[1], src_shape[1]
    if not (isinstance(hq, int) and isinstance(hkv, int) and hq % hkv == 0):
        return None
    return src


class UndoRepeatKVPass:
    name = "undo_repeat_kv"

    def __call__(self, gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> None:
        undone = 0
        for site in sites:
            node = site.node
            key, value = sdpa_arg(node, "key"), sdpa_arg(node, "value")
            if sdpa_arg(node, "enable_gqa", False):
                site.gqa = "native" if site.q_heads != site.kv_heads else "mha"
                continue
            k_src, v_src = match_repeat_kv(key), match_repeat_kv(value)
            if k_src is not None and v_src is not None:
                site.key_source, site.value_source = k_src, v_src
                site.kv_heads = fake_shape(k_src)[1]
                site.gqa = "undone" if site.kv_heads != site.q_heads else "mha"
                undone += 1
            else:
                # K/V reach SDPA with as many heads as Q: true MHA, or a repeat we do not know
                # (still correct, only slower: the op then reads the repeated copies).
                site.gqa = "mha"
        bump("repeat_kv_undone", undone)
        log.info("mi_compile: %s removed repeat_kv at %d of %d site(s)", self.name, undone, len(sites))
