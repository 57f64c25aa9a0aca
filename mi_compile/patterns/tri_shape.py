"""Tri-shape heads: A-shape plus dense rows at the end of the sequence (TriangleMix,
arXiv 2507.21526; MInference's ``tri_shape``).

Parameters (``HeadPattern("tri_shape", sink=S, local=L, last=T)``):

``sink``, ``local``
    as A-shape (:mod:`mi_compile.patterns.a_shape`): the first ``S`` keys and a window of the
    ``L`` most recent keys, the query itself included (``L >= 1``).
``last``
    the query blocks holding any of the sequence's last ``T`` queries see every causal key
    (``T = 0``: exactly A-shape).

Exact definition, in the sequence's own coordinates (input ``b`` of a padded batch has
``seq_start[b]`` / ``seq_len[b] = len``; position ``i`` counts from its first real token):
query ``i`` sees key ``j`` iff ``j <= i`` and

    ``j < S  or  i - j < L  or  (T > 0 and 64 * (i // 64) + 64 > len - T)``

i.e. at 64-row query-block granularity: block ``m`` (rows ``[64 m, 64 m + 64)``) is dense iff
``T > 0`` and ``64 m + 64 > len - T``, whatever part of the block lies in the last ``T`` rows.
Why blocks: the kernel works in 64-row programs, so a dense block costs one dense program and
no per-row test; a few extra dense rows only add recall.

In the unified index a tri-shape head is an A-shape head (prefix ``[0, S)``, one static slash
group ``[0, L - 1]``, band ``L``) plus the per-head table ``last [H]`` = ``T``; the general kernel
(:mod:`mi_compile.kernels.sparse_attention`) turns a dense block into prefix ``[0, m0)`` + a
diagonal tile without band test and skips every other range for it. Layers with tri-shape
heads run the general 64-row kernel (the 128-row one has no ``last`` table). The index is the
same for every input of a given length (nothing data-dependent).
"""
from __future__ import annotations

import torch

from ..kernels.constants import BLOCK, KIND_A_SHAPE
from ..kernels.index_format import dense_last_block
from .a_shape import A_SHAPE_SINK, a_shape_head_tables, a_shape_mask
from .registry import PatternError, PatternSpec, register, tokens
from .spec import HeadPattern

#: Search candidates: sinks, local windows as fractions of n and in tokens, and one dense
#: query block at the end (the last 64 queries).
TRI_SHAPE_SINK = A_SHAPE_SINK
TRI_SHAPE_LOCAL = (1 / 16, 1 / 8, 1 / 4)
TRI_SHAPE_LOCAL_TOKENS = (1024, 4096)
TRI_SHAPE_LAST = BLOCK
#: ``last`` of MInference ``tri_shape`` entries (their two numbers are ``sink`` and ``local``).
MINFERENCE_LAST = BLOCK


def dense_rows(i, length, last: int):
    """bool, broadcast of ``i`` and ``length``: query position ``i`` lies in a 64-row block that
    holds one of the last ``last`` queries of a sequence of ``length`` tokens."""
    if last <= 0:
        return torch.zeros_like(torch.as_tensor(i), dtype=torch.bool)
    return dense_last_block((i // BLOCK) * BLOCK, length, last)


def tri_shape_mask(i, j, head: HeadPattern, length) -> torch.Tensor:
    """Reference selection for broadcastable sequence positions ``i`` (query), ``j`` (key) of a
    sequence of ``length`` tokens; causality and bounds are the caller's."""
    own = a_shape_mask(i, j, head)
    return own | dense_rows(i, length, head.last) if head.last > 0 else own


class TriShapeSpec(PatternSpec):
    """``tri_shape(sink, local, last)``: A-shape ``(sink, local)`` plus dense 64-row query blocks
    over the sequence's last ``last`` queries (see the module docstring); ``local >= 1``.
    MInference's ``tri_shape`` entries are ``tri_shape(sink=vertical_size, local=slash_size,
    last=64)``: its entry has no third number, one query block is our choice.
    """

    name = "tri_shape"
    code = 4
    params = ("sink", "local", "last")
    kernel_kind = KIND_A_SHAPE       # the fused table builder writes its A-shape group
    color = "#b07aa1"
    minference_names = ("tri_shape",)

    def validate(self, head) -> None:
        if head.local == 0:
            raise PatternError("tri_shape needs local >= 1 (a query must see itself)")

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        return {"sink": vertical_size, "local": slash_size, "last": MINFERENCE_LAST}

    def head_tables(self, head) -> dict:
        return {**a_shape_head_tables(head), "last": head.last}

    def meta_params(self, head) -> tuple:
        return (head.sink, head.local)

    def max_tiles(self, head, n: int) -> int:
        return -(-n // BLOCK) + 2

    def mask(self, i, j, head):
        raise NotImplementedError("tri_shape's selection depends on the sequence length: use mask_at")

    def mask_at(self, i, j, head, length):
        return tri_shape_mask(i, j, head, length)

    def candidates(self, n: int) -> list:
        out = [(3, HeadPattern(self.name, sink=TRI_SHAPE_SINK, local=tokens(frac, n), last=TRI_SHAPE_LAST))
               for frac in TRI_SHAPE_LOCAL]
        return out + [(3, HeadPattern(self.name, sink=TRI_SHAPE_SINK, local=local, last=TRI_SHAPE_LAST))
                      for local in TRI_SHAPE_LOCAL_TOKENS if local < n]

    def label(self, head) -> str:
        return f"{head.sink}+{head.local}+{head.last}"


SPEC = register(TriShapeSpec())
