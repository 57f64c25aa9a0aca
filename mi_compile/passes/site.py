"""What the passes learn about one attention call site, and what they decide for it.

Each pass fills in its part of an :class:`AttentionSite`; the explain table and the dumps print
them. A site either ends ``action == "sparse"`` (rewritten to ``mi_compile::sparse_attention``) or
``action == "dense"`` with ``reason`` saying why it was left as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx

from ..op import family_member
from ..patterns.spec import HeadPattern


def bump(key: str, by: int = 1) -> None:
    """Count what a pass did in ``torch._dynamo.utils.counters["mi_compile"]`` (tests assert on
    these, as Inductor's pattern tests do on theirs; ``counters.clear()`` resets them)."""
    from torch._dynamo.utils import counters

    counters["mi_compile"][key] += by


@dataclasses.dataclass
class MaskInfo:
    """The meaning of an SDPA call's mask, as far as the classifier could establish it.

    kind: ``causal`` | ``causal+padding`` | ``sliding_window`` | ``sliding_window+padding`` |
    ``causal_bottom_right`` | ``causal_bottom_right+padding`` (a prefill chunk continuing a
    cache: ``nq <= nk`` and query row ``r`` sees key ``j`` iff ``j <= nk - nq + r``) |
    ``causal_top_left`` | ``causal_top_left+padding`` (fewer queries than keys, query ``r`` sees
    key ``j`` iff ``j <= r``: ``is_causal=True`` with ``nq < nk``, a static cache's prefill; the
    same as a prefill over the first ``nq`` keys) |
    ``causal_static_offset`` | ``causal_static_offset+padding`` (a prefill chunk continuing a
    static cache: query row ``r`` sees slot ``j`` iff ``j <= c + r``, ``c`` the runtime integer
    tensor ``offset_source``, the cache's filled length) |
    ``none`` (no mask, not causal) | ``unknown``.
    """

    kind: str
    window: int = 0                              # sliding window size, 0 = none
    padding_source: Optional[torch.fx.Node] = None  # the [batch, kv_len] bool/int key mask
    how: str = ""                                # how it was established (is_causal flag, probe, ...)
    reason: str = ""                             # why ``unknown``
    offset_source: Optional[torch.fx.Node] = None  # ``causal_static_offset``: the 0-d input holding ``c``

    @property
    def recognised(self) -> bool:
        return self.kind not in ("unknown", "none")

    @property
    def chunk(self) -> bool:
        """A prefill chunk that continues a cache (bottom-right-aligned causal, ``nq <= nk``)."""
        return self.kind.startswith("causal_bottom_right")

    @property
    def top_left(self) -> bool:
        """Top-left-aligned causal over more keys than queries: a prefill over the first ``nq`` keys."""
        return self.kind.startswith("causal_top_left")

    @property
    def static_chunk(self) -> bool:
        """A prefill chunk continuing a static cache: causal over its filled slots ``0..c + nq - 1``."""
        return self.kind.startswith("causal_static_offset")


@dataclasses.dataclass
class AttentionSite:
    node: torch.fx.Node
    index: int                       # order of appearance in the graph
    layer: Optional[int]             # decoder layer index from nn_module_stack, None if not found
    module_path: str                 # e.g. model.layers.3.self_attn
    module_type: str                 # e.g. LlamaAttention
    q_heads: Optional[int] = None
    kv_heads: Optional[int] = None   # K/V heads the op reads (after undoing repeat_kv)
    head_dim: Optional[int] = None
    q_len: str = "?"                 # printable (may be symbolic)
    kv_len: str = "?"
    mask: Optional[MaskInfo] = None
    gqa: str = "-"                   # native (enable_gqa) | undone (repeat_kv removed) | mha | kept (repeat_kv left)
    key_source: Optional[torch.fx.Node] = None    # K/V to feed the op (after undoing repeat_kv)
    value_source: Optional[torch.fx.Node] = None
    heads: Optional[list[HeadPattern]] = None
    action: str = "pending"          # sparse | dense | pending
    reason: str = ""
    # a config family's members for this call, [(length, heads), ...] ascending (``heads`` is then
    # the longest member's); None for a single config
    family: Optional[list[tuple[int, list[HeadPattern]]]] = None

    def keep_dense(self, reason: str) -> None:
        """Leave this call as it is, and remember why (never silently)."""
        if self.action != "dense":
            self.action = "dense"
            self.reason = reason

    def heads_at(self, n_k: int) -> Optional[list[HeadPattern]]:
        """The heads the op runs for a call over ``n_k`` keys: with a family the first member whose
        length ``n_k`` does not exceed (else the last), without one ``heads``."""
        return family_member(self.family, n_k)[1] if self.family else self.heads

    def head_tables(self) -> list[list[HeadPattern]]:
        """Every head table the call may run: each family member's, or just ``heads``."""
        return [heads for _, heads in self.family] if self.family else [self.heads]

    def pattern_summary(self) -> str:
        """How many heads run each pattern (per family member when the call carries a family)."""
        if self.action != "sparse" or not self.heads:
            return ""
        if self.family:
            return " | ".join(f"<= {length}: {_count_patterns(heads)}" for length, heads in self.family)
        return _count_patterns(self.heads)


def _count_patterns(heads) -> str:
    counts: dict[str, int] = {}
    for h in heads:
        counts[h.describe()] = counts.get(h.describe(), 0) + 1
    return ", ".join(f"{c}x {d}" for d, c in counts.items())
