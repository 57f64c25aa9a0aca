"""The pattern registry: every head pattern is one registered :class:`PatternSpec` object.

A pattern lives in its own module (``mi_compile/patterns/<name>.py``) that defines a
``PatternSpec`` subclass and registers one instance of it; ``mi_compile/patterns/__init__.py``
imports the built-in modules, which is the one line a new built-in pattern adds. Config
loading, :class:`~mi_compile.patterns.spec.HeadPattern` validation, the index builder, the
reference masks, the search (candidates, scoring, plots) and the eval harness iterate over
the registry (:func:`get`, :func:`names`, :func:`specs`) instead of naming patterns.

The dicts :data:`PATTERN_IDS`, :data:`PATTERN_NAMES`, :data:`PATTERN_PARAMS` and
:data:`MINFERENCE_NAMES` are views of the registry, updated in place by :func:`register`.
"""
from __future__ import annotations

from typing import Optional

from ..kernels.constants import BLOCK, KIND_OTHER, WIDE


class PatternError(ValueError):
    """A head pattern with an unknown name or bad parameters."""


class PatternSpec:
    """One head pattern: its name, parameters and what every part of the package needs of it.

    Class attributes a pattern sets: ``name``; ``code`` (its id in the encoded head table,
    stable, since search reports store it; None: the next free one); ``params`` (parameter
    names, in encoding order: at most three, each a field of ``HeadPattern``); ``kernel_kind``
    (the fused table builder's code path, ``KIND_*``); ``selection`` (the data-dependent
    index phase it runs, ``PHASE_*``, or None for a static pattern); ``per_block`` (the
    reference selection is a function of the 64-row query block: :meth:`block_mask`, else
    :meth:`mask`); ``full`` (every causal key: dense); ``color``; ``minference_names``;
    ``optional`` (trailing parameters that default to 0: a config entry may leave them out,
    and they are not written or shown while 0).
    """

    name: str = ""
    code: Optional[int] = None
    params: tuple = ()
    kernel_kind: int = KIND_OTHER
    selection: Optional[str] = None
    per_block: bool = False
    full: bool = False
    color: str = "#bab0ac"
    minference_names: tuple = ()
    optional: tuple = ()
    #: where this pattern's candidates go in the search's candidate list (lower first)
    candidate_rank: int = 50

    # ------------------------------------------------------------------ parameters
    def validate(self, head) -> None:
        """Raise :class:`PatternError` unless ``head``'s parameters make sense for the pattern
        (types and ranges of every parameter are checked before, for all patterns)."""

    def from_minference(self, vertical_size: int, slash_size: int) -> dict:
        """This pattern's parameters from a MInference entry ``[name, vertical_size, slash_size]``."""
        raise PatternError(f"{self.name} has no MInference form")

    # ------------------------------------------------------------------ index
    def head_tables(self, head) -> dict:
        """Static per-head numbers of the unified index: ``prefix`` (keys ``[0, prefix)`` for
        every block), ``sink`` / ``band`` (the exact test ``j < sink or i - j < band``),
        ``group`` (None, or a static slash group ``(0, hi)`` written for every input) and,
        optionally, ``last`` (the query blocks holding any of a sequence's last ``last`` rows
        see every causal key; absent = 0, none)."""
        return {"prefix": 0, "sink": 0, "band": WIDE, "group": None, "last": 0}

    def meta_params(self, head) -> tuple:
        """``(a, b)``: the two parameters the fused table builder reads for its ``kernel_kind``."""
        return (0, 0)

    def selection_params(self, head) -> tuple:
        """The parameters the pattern's ``selection`` phase takes (``(V, S)``, ``(topk,)``)."""
        return ()

    def max_tiles(self, head, n: int) -> int:
        """Static bound on the group tiles of such a head at length ``n`` (see
        :func:`~mi_compile.patterns.index.group_tiles`)."""
        return 1

    def block_width(self, head, n: int) -> int:
        """``PHASE_BLOCK_SELECT`` patterns: static width ``K`` of the head's ``blocks`` rows at
        length ``n`` (at most ``ceil(n / 64)``)."""
        raise NotImplementedError(f"{self.name} has no block table")

    def select_block_table(self, q, k, head_ids, heads, seq_start, seq_len, scale):
        """``PHASE_BLOCK_SELECT`` patterns: ``blocks [B, len(head_ids), NQB, K]`` (int32,
        ascending, SENTINEL-padded, the diagonal block kept, so last) and ``block_count [B,
        len(head_ids), NQB]`` for the query heads ``head_ids`` (all of this pattern, ``heads``
        their patterns), ``K = max(block_width)``; on q's device, no host synchronisation."""
        raise NotImplementedError(f"{self.name} has no block table")

    def select_tables(self, q, k, head_ids, heads, seq_start, seq_len, scale, unpadded=False) -> dict:
        """``PHASE_TABLE_SELECT`` patterns (:meth:`block_width` too): the raw selection of the
        query heads ``head_ids`` for the kernel's column, slash and block phases, as a dict of
        ``columns [B, h, *]`` (ascending keys, SENTINEL-padded, no forced prefix), ``offsets
        [B, h, *]`` (ascending), ``blocks [B, h, NQB, K]`` and ``block_count [B, h, NQB]``;
        every pair must be selected by at most one of the column / slash and block parts, and
        the diagonal 64-key tile by one of them. Such layers use the PyTorch table builder.
        ``unpadded``: every input is known to span the whole tensor (cheaper pooling, see
        :func:`~mi_compile.patterns.block_sparse.pooled_blocks`)."""
        raise NotImplementedError(f"{self.name} has no table selection")

    def chunk_reason(self, head) -> Optional[str]:
        """Why a head of this pattern cannot compute a chunk sparse (``q_len < kv_len``: the rows
        of a prefill that continues a cache; see :mod:`mi_compile.kernels.index_format`), or
        None when it can. Static patterns are defined by position, and the vertical-slash and
        block-sparse selections from the chunk's own queries; a pattern whose selection writes
        its own tables (``PHASE_BLOCK_SELECT`` / ``PHASE_TABLE_SELECT``) must say that it
        handles a chunk by overriding this (xattention and flex_prefill do)."""
        from ..kernels.constants import PHASE_BLOCK_SPARSE, PHASE_VERTICAL_SLASH
        if self.selection in (None, PHASE_VERTICAL_SLASH, PHASE_BLOCK_SPARSE):
            return None
        return f"its selection ({self.selection}) is defined for a whole prefill only"

    def for_chunk(self, head, share):
        """The head a chunk runs when its keys are ``share`` (a Fraction in ``(0, 1)``) of the
        prompt length the config's counts were chosen for
        (:func:`~mi_compile.patterns.index.chunk_heads`). A count per prompt (vertical-slash's
        columns: a whole prompt's row at that share of it sees about that share of them) scales;
        counts per query row or block (diagonals, top-k blocks, windows, thresholds) stay. The
        default: the head as given."""
        return head

    # ------------------------------------------------------------------ reference
    def mask(self, i, j, head):
        """Reference test of a static pattern for broadcastable sequence positions ``i``
        (query), ``j`` (key): bool, or None for "every key" (causality and bounds are the
        caller's)."""
        raise NotImplementedError(f"{self.name} has no element test (per_block pattern)")

    def mask_at(self, i, j, head, length):
        """:meth:`mask` for a sequence of ``length`` real tokens (an int or a tensor
        broadcastable with ``i``): what the reference callers evaluate. Patterns whose
        selection depends on where the sequence ends (``tri_shape``'s dense last rows)
        override it; the default ignores ``length``."""
        return self.mask(i, j, head)

    def block_mask(self, head, index, h, block_starts, j):
        """Reference selection of a per-block pattern from the raw selection in ``index``:
        query blocks starting at ``block_starts`` ``[B or 1, U, 1]``, keys ``j``
        ``[B or 1, 1, n]``; ``h`` a head (-> ``[B, U, n]``) or a slice of heads with this
        pattern (-> ``[B, heads, U, n]``)."""
        raise NotImplementedError(f"{self.name} has no block selection")

    # ------------------------------------------------------------------ search and plots
    def candidates(self, n: int) -> list:
        """The patterns the search tries at length ``n``: ``(rank, HeadPattern)`` pairs (the
        candidate list is ordered by rank, then by registration and list order)."""
        return []

    def search_selection(self, head, shared: dict, q, k, scale, seq_start, seq_len):
        """An explicit selection for :func:`~mi_compile.patterns.index.build_index`
        (``vs_selection``) computed from work ``shared`` by every candidate of a layer, or
        None to let the index builder select."""
        return None

    def estimate_cost(self, head, n: int) -> float:
        """Device time of the head's per-input selection at length ``n``, as the fraction of the
        causal square the sparse kernel computes in that time: what the search charges on top
        of the computed density. 0 where it is small against the kernel (a static pattern, or
        an estimate over the last 64 queries only)."""
        return 0.0

    def label(self, head) -> str:
        """The short budget text of a plot cell."""
        return ",".join(str(v) for v in head.set_params.values()) or self.name


def tokens(frac: float, n: int, minimum: int = BLOCK) -> int:
    """``frac * n`` rounded to a multiple of 64, at least ``minimum`` (candidate budgets)."""
    return max(minimum, int(round(frac * n / BLOCK)) * BLOCK)


_SPECS: dict[str, PatternSpec] = {}
PATTERN_IDS: dict[str, int] = {}
PATTERN_NAMES: dict[int, str] = {}
PATTERN_PARAMS: dict[str, tuple] = {}
MINFERENCE_NAMES: dict[str, str] = {}


def _check(spec: PatternSpec) -> None:
    from ..kernels.constants import INTS_PER_HEAD, KIND_A_SHAPE, KIND_BS, KIND_VS, PHASE_BLOCK_SELECT, \
        PHASE_BLOCK_SPARSE, PHASE_TABLE_SELECT, PHASE_VERTICAL_SLASH
    from .spec import PARAM_FIELDS

    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise PatternError(f"a pattern name must be an identifier, got {spec.name!r}")
    if len(spec.params) > INTS_PER_HEAD - 1:
        raise PatternError(f"{spec.name}: at most {INTS_PER_HEAD - 1} parameters, got {spec.params}")
    unknown = [p for p in spec.params if p not in PARAM_FIELDS]
    if unknown:
        raise PatternError(f"{spec.name}: parameter(s) {unknown} are not HeadPattern fields {PARAM_FIELDS}")
    if tuple(spec.params[len(spec.params) - len(spec.optional):]) != tuple(spec.optional):
        raise PatternError(f"{spec.name}: optional parameters {spec.optional} must be the last of {spec.params}")
    if spec.kernel_kind not in (KIND_OTHER, KIND_A_SHAPE, KIND_VS, KIND_BS):
        raise PatternError(f"{spec.name}: unknown kernel_kind {spec.kernel_kind!r}")
    if spec.selection not in (None, PHASE_VERTICAL_SLASH, PHASE_BLOCK_SPARSE, PHASE_BLOCK_SELECT,
                              PHASE_TABLE_SELECT):
        raise PatternError(f"{spec.name}: unknown selection phase {spec.selection!r}")


def register(spec: PatternSpec, *, replace: bool = False) -> PatternSpec:
    """Add ``spec`` (an instance) to the registry and return it. ``replace``: a spec of the same
    name may be replaced (its code is kept)."""
    _check(spec)
    old = _SPECS.get(spec.name)
    if old is not None and not replace:
        raise PatternError(f"pattern {spec.name!r} is already registered")
    code = spec.code
    if code is None:
        code = old.code if old is not None else max(PATTERN_NAMES, default=-1) + 1
    owner = PATTERN_NAMES.get(code)
    if owner is not None and owner != spec.name:
        raise PatternError(f"pattern id {code} of {spec.name!r} is taken by {owner!r}")
    if old is not None:
        unregister(spec.name)
    spec.code = code
    for alias in spec.minference_names:
        if MINFERENCE_NAMES.get(alias, spec.name) != spec.name:
            raise PatternError(f"MInference name {alias!r} already maps to {MINFERENCE_NAMES[alias]!r}")
    _SPECS[spec.name] = spec
    PATTERN_IDS[spec.name] = code
    PATTERN_NAMES[code] = spec.name
    PATTERN_PARAMS[spec.name] = tuple(spec.params)
    for alias in spec.minference_names:
        MINFERENCE_NAMES[alias] = spec.name
    return spec


def unregister(name: str) -> None:
    """Remove a pattern (tests register toy patterns and take them out again)."""
    spec = _SPECS.pop(name)
    del PATTERN_IDS[name], PATTERN_NAMES[spec.code], PATTERN_PARAMS[name]
    for alias in [a for a, kind in MINFERENCE_NAMES.items() if kind == name]:
        del MINFERENCE_NAMES[alias]


def get(name: str) -> PatternSpec:
    """The registered spec called ``name``."""
    try:
        return _SPECS[name]
    except KeyError:
        raise PatternError(f"unknown pattern {name!r}; expected one of {sorted(_SPECS)}") from None


def names() -> tuple:
    """Registered pattern names, in registration order."""
    return tuple(_SPECS)


def specs() -> tuple:
    """Registered specs, in registration order."""
    return tuple(_SPECS.values())
