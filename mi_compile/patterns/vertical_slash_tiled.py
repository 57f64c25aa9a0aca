"""Vertical-slash heads whose diagonals are chosen in the units the kernel pays for.

``HeadPattern("vertical_slash_tiled", vertical=V, slash=S)`` keeps the same columns and the
same forced local diagonals as :mod:`~mi_compile.patterns.vertical_slash` (from the same
estimate), but spends the other ``S - 64`` diagonals as ``ceil((S - 64) / 64)`` whole key
blocks: block distance ``t`` means, for every query block ``m``, the key block ``m - t``.

Why: the kernel computes a selected offset ``d`` as a 64-key interval of every query block,
one tile, whatever the offset's own mass. Offsets picked one by one (``vertical_slash``) can
each cost a tile for one useful diagonal; at 128K on Qwen2.5-Coder the default 1000/6096
computed ~28% of the square for ~11% nominal. Here every tile bought is a whole key block,
ranked by the slash mass it catches (:func:`~mi_compile.patterns.vertical_slash.tile_scores`:
the triangles of neighbouring blocks share that mass exactly), so the recall per computed
tile is the best a choice of tiles can give, and the top-k runs over ``n / 64`` scores
instead of ``n``.

In the index a block distance ``t`` is the offset ``64 t`` (its interval for block ``m0`` is
keys ``[m0 - 64 t, m0 - 64 t + 63]``); everything after the selection (groups, tiles, the
reference mask from the offsets) is vertical-slash's own.
"""
from __future__ import annotations

from ..kernels.constants import BLOCK, FORCED
from .registry import PatternSpec, register, tokens
from .spec import HeadPattern
from .vertical_slash import VS_VERTICAL, VS_VERTICAL_TOKENS, VerticalSlashSpec

#: the unit (diagonals per block distance) that marks these heads' groups for the selection
TILE_UNIT = BLOCK
#: Search candidates: vertical-slash's columns with extra diagonals as a fraction of n (rank 1)
#: or in tokens (rank 3), each rounded up to whole blocks; few, since they share the estimate.
TILED_SLASH_EXTRA = (1 / 128, 1 / 32)
TILED_SLASH_EXTRA_TOKENS = (128, 512)


def tiles_of(head) -> int:
    """Whole key blocks a head selects beyond the forced diagonals."""
    return -(-max(head.slash - FORCED, 0) // BLOCK)


class VerticalSlashTiledSpec(VerticalSlashSpec):
    """``vertical_slash_tiled(vertical, slash)``: ``vertical_slash``'s columns and forced
    diagonals, with the extra ``slash - 64`` diagonals bought as whole key blocks at the block
    distances holding the most slash mass (see the module docstring)."""

    name = "vertical_slash_tiled"
    code = 7
    color = "#ff9da7"
    minference_names = ()

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        return PatternSpec.from_minference(self, vertical_size, slash_size)   # none: raises

    def meta_params(self, head) -> tuple:
        # the fused table builder reads S as "forced + extras": the extras are the block count
        return (head.vertical, min(head.slash, FORCED) + tiles_of(head))

    def selection_params(self, head) -> tuple:
        return (head.vertical, min(head.slash, FORCED) + tiles_of(head), TILE_UNIT)

    def candidates(self, n: int) -> list:
        # slash budgets in whole blocks: the forced 64 plus a fraction of n (at least one block)
        out = [(1, HeadPattern(self.name, vertical=tokens(vf, n), slash=FORCED + tokens(sf, n)))
               for vf in VS_VERTICAL for sf in TILED_SLASH_EXTRA]
        return out + [(3, HeadPattern(self.name, vertical=vertical, slash=FORCED + extra))
                      for vertical in VS_VERTICAL_TOKENS for extra in TILED_SLASH_EXTRA_TOKENS
                      if vertical < n and extra < n]

    def label(self, head) -> str:
        return f"{head.vertical}/{tiles_of(head)}b"


SPEC = register(VerticalSlashTiledSpec())
