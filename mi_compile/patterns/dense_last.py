"""The optional ``last`` parameter of the input-dependent per-block patterns.

``vertical_slash(V, S, last=T)`` (and ``vertical_slash_tiled``, its subclass) and
``block_sparse(k, last=T)``: the 64-row query blocks holding any of the sequence's last ``T``
queries see every causal key (tri-shape's dense rows, for the question at the end of a prompt);
``T = 0``, the default, leaves the pattern's own selection everywhere. The kernel reads ``T``
from the index's ``last`` table (:meth:`DenseLastSpec.head_tables`); the reference adds the
dense blocks in :func:`~mi_compile.patterns.index.block_rows`, which serves per-block patterns,
so such a pattern is per-block.
"""
from __future__ import annotations

from .registry import PatternSpec


class DenseLastSpec(PatternSpec):
    """A per-block pattern whose ``params`` end with the optional ``last`` (see the module
    docstring); a subclass lists ``"last"`` as its last parameter."""

    optional = ("last",)
    per_block = True

    def head_tables(self, head) -> dict:
        return {**super().head_tables(head), "last": head.last}
