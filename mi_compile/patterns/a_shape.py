"""A-shape heads: attention sinks plus a local window (MInference section 3, "A-shape").

Parameters (``HeadPattern("a_shape", sink=S, local=L)``):

``sink``
    the first ``S`` tokens of the sequence are visible to every later query.
``local``
    each query sees the ``L`` most recent tokens, itself included (``L >= 1``).

Exact, per element: key ``j`` is visible to query ``i`` (both in the sequence's own
coordinates, first real token = 0) iff ``j <= i and (j < S or i - j < L)``.

In the unified index (:mod:`mi_compile.patterns.index`) an A-shape head is

* a *prefix* range ``[0, S)`` of keys, visited for every query block, and
* one slash *group* ``[0, L - 1]`` whose per-block key range ``[m0 - L + 1, m0 + 63]`` is
  clipped to start at ``S`` (so the sinks are not visited twice); inside it the kernel applies
  the exact band test ``i - j < L`` per element (``band`` = ``L``; other patterns use a band
  wider than any sequence).

There is no data-dependent part, so the index is the same for every input.
"""
from __future__ import annotations

import torch

from ..kernels.constants import BLOCK, KIND_A_SHAPE
from .registry import PatternError, PatternSpec, register, tokens
from .spec import HeadPattern

#: Search candidates: sink tokens, local windows as fractions of n (rank 0) and in tokens
#: (rank 2, for long prompts; see :mod:`mi_compile.search.candidates`).
A_SHAPE_SINK = 64
A_SHAPE_LOCAL = (1 / 32, 1 / 16, 1 / 8, 1 / 6, 1 / 4, 1 / 2)
A_SHAPE_LOCAL_TOKENS = (256, 512, 1024, 2048, 4096)


def a_shape_head_tables(head: HeadPattern) -> dict:
    """Static per-head numbers for the unified index: prefix length, mask sink/band, one group."""
    return {"prefix": head.sink, "sink": head.sink, "band": head.local,
            "group": (0, head.local - 1)}


def a_shape_mask(i: torch.Tensor, j: torch.Tensor, head: HeadPattern) -> torch.Tensor:
    """Reference selection for broadcastable sequence positions ``i`` (query), ``j`` (key).

    Causality and sequence bounds are applied by the caller; this is the pattern's own test.
    """
    return (j < head.sink) | (i - j < head.local)


class AShapeSpec(PatternSpec):
    """``a_shape(sink, local)``: key ``j`` is visible to query ``i`` iff ``j <= i`` and
    (``j < sink`` or ``i - j < local``); ``local >= 1``. Static: the same index for every input
    (see the module docstring). MInference's ``a_shape`` / ``stream_llm`` entries are
    ``a_shape(sink=vertical_size, local=slash_size)``.
    """

    name = "a_shape"
    code = 1
    params = ("sink", "local")
    kernel_kind = KIND_A_SHAPE
    color = "#4e79a7"
    minference_names = ("a_shape", "stream_llm")

    def validate(self, head) -> None:
        if head.sink + head.local == 0:
            raise PatternError("a_shape needs sink + local > 0")
        if head.local == 0:
            raise PatternError("a_shape needs local >= 1 (a query must see itself)")

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        return {"sink": vertical_size, "local": slash_size}

    def head_tables(self, head) -> dict:
        return a_shape_head_tables(head)

    def meta_params(self, head) -> tuple:
        return (head.sink, head.local)

    def max_tiles(self, head, n: int) -> int:
        return -(-n // BLOCK) + 2

    def mask(self, i, j, head):
        return a_shape_mask(i, j, head)

    def candidates(self, n: int) -> list:
        out = [(0, HeadPattern(self.name, sink=A_SHAPE_SINK, local=tokens(frac, n))) for frac in A_SHAPE_LOCAL]
        return out + [(2, HeadPattern(self.name, sink=A_SHAPE_SINK, local=local))
                      for local in A_SHAPE_LOCAL_TOKENS if local < n]

    def label(self, head) -> str:
        return f"{head.sink}+{head.local}"


SPEC = register(AShapeSpec())
