"""The candidate patterns tried for every head, with budgets scaled to the sequence length.

Budgets are fractions of ``n`` (A-shape windows, vertical columns, slash diagonals) or of the
number of 64-token blocks (block-sparse top-k), rounded to multiples of 64 tokens where the
kernels work in 64-token tiles anyway, so a config searched at one length keeps the same
*shape* of pattern (not the same absolute sizes) as another length's. Duplicates (short
sequences round several fractions to the same size) are dropped; order is fixed, which keeps
the choice deterministic.
"""
from __future__ import annotations

import math

from ..patterns.spec import HeadPattern

BLOCK = 64
#: A-shape: sink tokens, and local window as a fraction of n.
A_SHAPE_SINK = 64
A_SHAPE_LOCAL = (1 / 32, 1 / 16, 1 / 8, 1 / 6, 1 / 4, 1 / 2)
#: vertical_slash: vertical columns as fractions of n (rounded to 64), and slash diagonals as
#: the 64 forced local ones plus a fraction of n more. Extra diagonals are expensive: the
#: kernel computes a 64-wide band for each isolated one (about 128 / n of the causal square),
#: so the slash budgets stay small and the measured density decides.
VS_VERTICAL = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
VS_SLASH_EXTRA = (0.0, 1 / 128, 1 / 64, 1 / 32, 1 / 16)
#: The largest of each (1/2 of n or of the blocks) are there for heads that need most of the
#: square: with ``--allocate global`` a hard head may take one and pay for it elsewhere.
#: block_sparse: top-k key blocks as fractions of the number of query blocks.
BS_TOPK = (1 / 16, 1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2)
#: Absolute sizes beside the fractions: at 64K-128K tokens even 1/32 of n is thousands of
#: keys per query, while a head that looks at its sinks, a few hundred hot columns and a
#: short window costs a few percent of the square. These give long prompts cheap options
#: (each is a handful of 64-key tiles per query block); at short lengths they coincide with
#: or exceed the fractions and are dropped as duplicates or left to the budget.
A_SHAPE_LOCAL_TOKENS = (256, 512, 1024, 2048, 4096)
VS_VERTICAL_TOKENS = (128, 512, 2048)
VS_SLASH_EXTRA_TOKENS = (0, 128, 512)
BS_TOPK_BLOCKS = (8, 16, 32, 64)


def _tokens(frac: float, n: int, minimum: int = BLOCK) -> int:
    """``frac * n`` rounded to a multiple of 64, at least ``minimum``."""
    return max(minimum, int(round(frac * n / BLOCK)) * BLOCK)


def candidate_patterns(n: int, *, dense: bool = True) -> list[HeadPattern]:
    """Every pattern tried at sequence length ``n`` (dense last, if asked for)."""
    out: list[HeadPattern] = []

    def add(p: HeadPattern) -> None:
        if p not in out:
            out.append(p)

    for frac in A_SHAPE_LOCAL:
        add(HeadPattern("a_shape", sink=A_SHAPE_SINK, local=_tokens(frac, n)))
    for vf in VS_VERTICAL:
        for sf in VS_SLASH_EXTRA:
            add(HeadPattern("vertical_slash", vertical=_tokens(vf, n), slash=BLOCK + int(round(sf * n))))
    for local in A_SHAPE_LOCAL_TOKENS:
        if local < n:
            add(HeadPattern("a_shape", sink=A_SHAPE_SINK, local=local))
    for vertical in VS_VERTICAL_TOKENS:
        for extra in VS_SLASH_EXTRA_TOKENS:
            if vertical < n and extra < n:
                add(HeadPattern("vertical_slash", vertical=vertical, slash=BLOCK + extra))
    blocks = math.ceil(n / BLOCK)
    for frac in BS_TOPK:
        add(HeadPattern("block_sparse", topk=max(2, int(round(frac * blocks)))))
    for topk in BS_TOPK_BLOCKS:
        if topk < blocks:
            add(HeadPattern("block_sparse", topk=topk))
    if dense:
        add(HeadPattern("dense"))
    return out
