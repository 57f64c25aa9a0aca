"""Dense heads: full causal attention (no parameters)."""
from __future__ import annotations

from ..kernels.constants import WIDE
from .registry import PatternSpec, register
from .spec import HeadPattern


class DenseSpec(PatternSpec):
    """``dense``: query ``i`` sees every key ``j <= i``. No parameters.

    In the unified index a dense head is one prefix range over all keys (``prefix = band =
    WIDE``); the search keeps it as the last candidate and the fallback of ``min_recall``.
    """

    name = "dense"
    code = 0
    full = True
    color = "#9e9e9e"
    candidate_rank = 100

    def head_tables(self, head) -> dict:
        return {"prefix": WIDE, "sink": 0, "band": WIDE, "group": None}

    def mask(self, i, j, head):
        return None

    def candidates(self, n: int) -> list:
        return [(self.candidate_rank, HeadPattern(self.name))]

    def label(self, head) -> str:
        return "dense"


SPEC = register(DenseSpec())
