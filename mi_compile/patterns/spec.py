"""The per-head sparse pattern: what one attention head computes in a long prefill.

A layer's heads are described by a list of :class:`HeadPattern`, one per *query* head. The
list travels through the FX graph as a flat ``int[]`` (four ints per head, see
:func:`encode_heads`) because ``torch.library`` op schemas take lists of ints but not Python
objects; :func:`decode_heads` turns it back.

Each pattern is a registered :class:`~mi_compile.patterns.registry.PatternSpec`, defined in its
own module (its parameters, their validation, index tables, reference mask, search candidates);
the built-in ones (MInference, arXiv 2407.02490, section 3):

``dense``
    full causal attention for this head.
``a_shape``
    the first ``sink`` tokens ("attention sinks") plus a local window: query ``i`` sees key
    ``j`` when ``j < sink`` or ``i - j < local`` (and ``j <= i``).
``vertical_slash``
    per input, the ``vertical`` hottest key columns and the ``slash`` hottest diagonals,
    estimated from the last 64 queries (optional ``last``: the query blocks over the prompt's
    last ``last`` queries dense, as tri-shape's).
``block_sparse``
    per input, for each 64-query block the ``topk`` 64-key blocks with the highest
    mean-pooled score (causal; optional ``last`` as vertical_slash).
``tri_shape``
    A-shape plus dense rows at the end: the 64-row query blocks holding any of the
    sequence's last ``last`` queries see every causal key (TriangleMix, arXiv 2507.21526;
    :mod:`mi_compile.patterns.tri_shape`).
``xattention``
    per input, for each 64-query block the fewest 64-key blocks whose attention mass,
    estimated on strided antidiagonals, reaches ``threshold`` per mille (XAttention, ICML
    2025; :mod:`mi_compile.patterns.xattention`).
``flex_prefill``
    per input, query-aware blocks or vertical-slash (chosen by a Jensen-Shannon test on the
    last queries), each with the fewest keys reaching ``gamma`` per mille of the estimated
    mass (FlexPrefill, ICLR 2025; :mod:`mi_compile.patterns.flex_prefill`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from ..kernels.constants import INTS_PER_HEAD, MAX_PARAM
# Views of the registry (pattern name -> id, id -> name, name -> parameter names in encoding
# order); registering a pattern updates them.
from .registry import PATTERN_IDS, PATTERN_NAMES, PATTERN_PARAMS, PatternError
from .registry import get as _spec_of


#: Every pattern parameter, each a :class:`HeadPattern` field defaulting to 0, in the order of
#: the patterns that introduced them; a pattern's ``params`` name some of them, and a pattern
#: with a parameter of a new name adds it here.
PARAM_FIELDS = (
    "sink", "local",                        # a_shape, tri_shape
    "vertical", "slash",                    # vertical_slash, vertical_slash_tiled
    "topk",                                 # block_sparse
    "last",                                 # tri_shape; optional on vertical_slash(_tiled), block_sparse
    "threshold", "stride", "max_blocks",    # xattention
    "gamma", "tau", "min_budget",           # flex_prefill
)


class _HeadPatternMethods:
    """What :class:`HeadPattern` does; its fields (``kind`` and :data:`PARAM_FIELDS`) are made
    from the names."""

    def __post_init__(self):
        if self.kind not in PATTERN_IDS:
            raise PatternError(
                f"unknown pattern {self.kind!r}; expected one of {sorted(PATTERN_IDS)}")
        for name in PARAM_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PARAM:
                raise PatternError(f"{self.kind}: {name} must be an int in 0..2**31 - 1, got {value!r}")
            if value and name not in PATTERN_PARAMS[self.kind]:
                raise PatternError(f"{self.kind} takes no parameter {name!r}")
        _spec_of(self.kind).validate(self)

    @property
    def params(self) -> dict:
        return {name: getattr(self, name) for name in PATTERN_PARAMS[self.kind]}

    @property
    def set_params(self) -> dict:
        """:attr:`params` less the optional ones left at 0 (what configs write and describe shows)."""
        optional = _spec_of(self.kind).optional
        return {name: v for name, v in self.params.items() if v or name not in optional}

    def describe(self) -> str:
        """Short human form, e.g. ``vertical_slash(1000,6096)``; a set optional parameter is named:
        ``vertical_slash(1000,6096,last=64)``."""
        params = self.set_params
        if not params:
            return self.kind
        optional = _spec_of(self.kind).optional
        return f"{self.kind}({','.join(f'{n}={v}' if n in optional else str(v) for n, v in params.items())})"

    def encode(self) -> list[int]:
        vals = list(self.params.values())
        return [PATTERN_IDS[self.kind]] + vals + [0] * (INTS_PER_HEAD - 1 - len(vals))

    @staticmethod
    def decode(ints: Sequence[int]) -> "HeadPattern":
        kind = PATTERN_NAMES.get(int(ints[0]))
        if kind is None:
            raise PatternError(f"unknown pattern id {ints[0]}")
        names = PATTERN_PARAMS[kind]
        return HeadPattern(kind, **{n: int(v) for n, v in zip(names, ints[1:1 + len(names)])})


HeadPattern = dataclasses.make_dataclass(
    "HeadPattern", [("kind", str, dataclasses.field(default="dense"))]
    + [(name, int, dataclasses.field(default=0)) for name in PARAM_FIELDS],
    bases=(_HeadPatternMethods,), frozen=True)
HeadPattern.__module__ = __name__
HeadPattern.__doc__ = """One query head's pattern (``kind``) and its parameters (keyword fields, every
name of :data:`PARAM_FIELDS`; those the pattern does not take stay 0)."""


def encode_heads(heads: Iterable[HeadPattern]) -> list[int]:
    """Flatten a layer's head patterns to the ``int[]`` the op schema carries."""
    out: list[int] = []
    for h in heads:
        out.extend(h.encode())
    return out


def decode_heads(ints: Sequence[int]) -> list[HeadPattern]:
    if len(ints) % INTS_PER_HEAD:
        raise PatternError(f"head table length {len(ints)} is not a multiple of {INTS_PER_HEAD}")
    return [HeadPattern.decode(ints[i:i + INTS_PER_HEAD]) for i in range(0, len(ints), INTS_PER_HEAD)]
