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

from .spec import HeadPattern


def a_shape_head_tables(head: HeadPattern) -> dict:
    """Static per-head numbers for the unified index: prefix length, mask sink/band, one group."""
    return {"prefix": head.sink, "sink": head.sink, "band": head.local,
            "group": (0, head.local - 1)}


def a_shape_mask(i: torch.Tensor, j: torch.Tensor, head: HeadPattern) -> torch.Tensor:
    """Reference selection for broadcastable sequence positions ``i`` (query), ``j`` (key).

    Causality and sequence bounds are applied by the caller; this is the pattern's own test.
    """
    return (j < head.sink) | (i - j < head.local)
