"""The candidate patterns tried for every head, with budgets scaled to the sequence length.

Each registered pattern lists its own candidates (:meth:`~mi_compile.patterns.registry.PatternSpec.candidates`,
with the budgets defined in the pattern's module). Budgets are fractions of ``n`` (A-shape
windows, vertical columns, slash diagonals) or of the number of 64-token blocks (block-sparse
top-k), rounded to multiples of 64 tokens where the kernels work in 64-token tiles anyway, so a
config searched at one length keeps the same *shape* of pattern (not the same absolute sizes)
as another length's; beside them absolute sizes give long prompts cheap options (a handful of
64-key tiles per query block). The largest (1/2 of n or of the blocks) are there for heads
that need most of the square: with ``--allocate global`` a hard head may take one and pay for
it elsewhere. Duplicates (short sequences round several fractions to the same size) are
dropped; order is fixed (by each candidate's rank, then registration order), which keeps the
choice deterministic.
"""
from __future__ import annotations

from ..patterns import registry
from ..patterns.a_shape import A_SHAPE_LOCAL, A_SHAPE_LOCAL_TOKENS, A_SHAPE_SINK  # noqa: F401
from ..patterns.registry import tokens as _tokens  # noqa: F401
from ..patterns.block_sparse import BS_TOPK, BS_TOPK_BLOCKS  # noqa: F401
from ..kernels.constants import BLOCK  # noqa: F401
from ..patterns.spec import HeadPattern
from ..patterns.vertical_slash import (VS_SLASH_EXTRA, VS_SLASH_EXTRA_TOKENS, VS_VERTICAL,  # noqa: F401
                                       VS_VERTICAL_TOKENS)


def candidate_patterns(n: int, *, dense: bool = True) -> list[HeadPattern]:
    """Every pattern tried at sequence length ``n`` (dense last, if asked for)."""
    ranked = [(rank, p) for spec in registry.specs() if dense or not spec.full
              for rank, p in spec.candidates(n)]
    ranked.sort(key=lambda rp: rp[0])          # stable: registration and list order within a rank
    out: list[HeadPattern] = []
    for _, p in ranked:
        if p not in out:
            out.append(p)
    return out
