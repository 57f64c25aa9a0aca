"""Per-head sparse-attention config: which pattern each (layer, query head) uses.

The backend asks one question of a config: "give me the :class:`~mi_compile.patterns.spec.HeadPattern`
of every query head of layer *L*" (:meth:`SparseConfig.heads_for`). This module reads two file
formats into one :class:`SparseConfig` and validates them up front, so that a typo in a config
file fails at load time with a message naming the file, layer and head -- not deep inside a
compiled graph. A third format, the config family, groups configs searched at different prompt
lengths into a :class:`ConfigFamily`, of which every compiled attention call picks one by its
key length at run time.

Sources accepted by :func:`load_config`
---------------------------------------
``None``
    the default policy (:data:`DEFAULT_POLICY`, below).
a path (``str`` or ``os.PathLike``)
    a JSON file in any format below; the format is told apart by the top-level JSON type
    (object = mi-compile format, or a config family when its ``"format"`` says so; array =
    MInference format).
a shipped config's name (:func:`shipped_configs`)
    that file.
a ``dict``
    the mi-compile format or a config family, already parsed.
a ``list``
    the MInference format, already parsed.
a :class:`SparseConfig` or :class:`ConfigFamily`
    returned as it is.

mi-compile format (``"mi-compile/v1"``)
---------------------------------------
A JSON object::

    {"format": "mi-compile/v1",
     "model": "SmolLM2-135M-Instruct, searched at 32k",
     "num_layers": 30, "num_heads": 9,
     "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096},
     "layers": {
        "0": {"0": {"pattern": "a_shape", "sink": 128, "local": 1024},
              "1": {"pattern": "dense"},
              "2": {"pattern": "vertical_slash", "vertical": 30, "slash": 800, "score": 0.97}},
        "3": {"*": {"pattern": "block_sparse", "topk": 100}}}}

Top-level keys (no others are allowed):

``format``
    optional; when present it must be exactly ``"mi-compile/v1"``.
``model``
    optional free text (which model / search run the config came from); kept, not checked.
``num_layers``, ``num_heads``
    optional positive ints. When given, entries beyond them are rejected at load time and
    :meth:`SparseConfig.check_model` / :meth:`SparseConfig.heads_for` insist that the model has
    exactly this many layers / query heads. ``num_heads`` counts *query* heads (GQA models
    have fewer KV heads; patterns are per query head).
``min_seq_len``
    optional int in ``0 .. 2**31 - 1``: prompts shorter than this run dense attention (the
    length from which the config was measured to pay); the backend option of the same name,
    when given, wins.
``length``
    optional int in ``64 .. 2**31 - 1``: the prompt length the config's counts were chosen for
    (its search length). A chunk that continues a cache (chunked prefill, a later turn) with
    fewer keys than that keeps that share of each vertical-slash head's columns, as the rows of
    a whole prompt of this length see about that share of them; without it a chunk keeps
    every head's full count and an early chunk computes far more than the whole prefill's rows
    do (:func:`mi_compile.patterns.index.chunk_heads`). Whole prefills ignore it.
``default``
    optional head entry used for every (layer, head) without an explicit entry.
``layers``
    optional object: layer index (a decimal string, ``"0"``, ``"12"``) -> object: head index
    (decimal string) or ``"*"`` -> head entry. ``"*"`` applies to every head of that layer
    that has no entry of its own. A config needs ``layers``, ``default`` or ``triangle_mix``.
``triangle_mix``
    optional layer rule (TriangleMix, arXiv 2507.21526: dense attention in the shallow
    layers, tri-shape in the deep ones)::

        "triangle_mix": {"dense_layers": 8, "tri_shape": {"sink": 64, "local": 1024, "last": 64}}

    layers ``< dense_layers`` are dense, every head of the layers ``>= dense_layers`` is
    ``tri_shape(sink, local, last)``. ``dense_layers`` is an int ``>= 0`` (at most
    ``num_layers`` when that is given); ``tri_shape`` holds exactly the pattern's three
    parameters (``"pattern": "tri_shape"`` may be given too). :func:`triangle_mix_config`
    builds such a config in Python.

A head entry is an object with ``"pattern"`` and that pattern's parameters, all ints in
``0 .. 2**31 - 1``; a parameter in brackets below is optional (0 when left out). The patterns
are those of the registry (:mod:`mi_compile.patterns.registry`); the built-in ones:

=====================  ==============================  =========================================
``pattern``            parameters                      meaning
=====================  ==============================  =========================================
``"dense"``            (none)                          full causal attention
``"a_shape"``          ``sink``, ``local``             first ``sink`` keys + a ``local`` window
``"vertical_slash"``   ``vertical``, ``slash``,        top ``vertical`` columns + ``slash`` diagonals;
                       [``last``]                      the query blocks over the last ``last``
                                                       queries dense (the question of a prompt)
``"block_sparse"``     ``topk``, [``last``]            top ``topk`` 64x64 key blocks per query block
                                                       (``last``: as for vertical_slash)
``"tri_shape"``        ``sink``, ``local``, ``last``   a_shape + dense 64-row query blocks over the
                                                       last ``last`` queries
``"xattention"``       ``threshold``, ``stride``,      per query block the fewest key blocks whose
                       ``max_blocks``                  antidiagonal-estimated mass reaches ``threshold``
                                                       per mille (at most ``max_blocks``)
``"flex_prefill"``     ``gamma``, ``tau``,             per input query-aware blocks or vertical-slash
                       ``min_budget``                  (switch: JS distance < ``tau`` per mille), the
                                                       fewest reaching ``gamma`` per mille of the mass
``"vertical_slash_     ``vertical``, ``slash``,        vertical_slash, the extra diagonals bought as
tiled"``               [``last``]                      whole key blocks (one kernel tile each)
=====================  ==============================  =========================================

Numbered head entries may also carry ``"score"`` (a number: the recall the offline pattern
search measured for that head). It is metadata only -- it does not change what runs -- and
is kept in :attr:`SparseConfig.scores` and written back by :meth:`SparseConfig.to_json`.

:meth:`SparseConfig.with_dense_last` sets ``last`` on every head that takes it (``python -m
mi_compile search --dense-last T`` writes its configs so).

Resolution order for (layer L, head H): ``layers[L][H]``, then ``layers[L]["*"]``, then the
``triangle_mix`` rule (which covers every layer, so with it ``default`` is never used), then
``default``; if none exists, :meth:`SparseConfig.heads_for` raises :class:`ConfigError`. So
explicit ``layers`` entries win over the rule: a config can keep the rule and pin single
heads or layers to something else.

MInference format (read unchanged)
----------------------------------
The per-head files published with MInference (e.g.
``Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json``): a JSON array with one
object per layer, mapping a head index (string) to ``[pattern_name, vertical_size,
slash_size, score]`` (``score`` may be omitted). Names map as MInference's own forward
pass uses the two numbers:

* ``"vertical_and_slash"`` -> ``vertical_slash(vertical=vertical_size, slash=slash_size)``
* ``"a_shape"`` / ``"stream_llm"`` -> ``a_shape(sink=vertical_size, local=slash_size)``
  (MInference's streaming kernel takes ``n_init=vertical_size, n_local=slash_size``)
* ``"block_sparse"`` -> ``block_sparse(topk=vertical_size)`` (``slash_size`` unused)
* ``"tri_shape"`` -> ``tri_shape(sink=vertical_size, local=slash_size, last=64)`` (the entry
  has no third number; one 64-row query block of dense rows)

``num_layers`` is the array length and ``num_heads`` the number of heads per layer; every
layer must list the same heads ``0..n-1`` (there is no default, so a gap would be an error
at run time anyway -- we report it at load time).

Config family (``"mi-compile/family-v1"``)
-----------------------------------------
Configs searched for one model at different prompt lengths, of which each attention call runs
the one searched for the nearest length -- chosen inside the op from the call's key length, so
one compiled graph serves every length (no guard, no recompile)::

    {"format": "mi-compile/family-v1",
     "model": "Qwen2.5-Coder-1.5B-Instruct: the 32K config up to 32768 tokens, the 128K one above",
     "members": ["qwen2.5-coder-1.5b-32k", "128k/searched.json", {"format": "mi-compile/v1", ...}]}

Top-level keys (no others are allowed): ``format`` (required, exactly
``"mi-compile/family-v1"``), ``model`` (optional free text) and ``members`` (a non-empty array).
A member is a shipped config's name, a path (a relative one is resolved against the family
file's directory; for a family given as a dict, against the working directory; a path that
exists wins over a shipped name) or an inline mi-compile-format object (its source, in
messages and the explain table, is ``<family source>#<index>``). Every member must load as a
single config (a family cannot contain a family) and must have a ``length``: the length is how
it is chosen. Lengths must be distinct, and members' ``num_layers`` / ``num_heads`` must agree
where given. Errors start with ``<family source>#<index>`` or name the members concerned.

Members are kept in ascending ``length``. A call over ``n_k`` keys runs the first member with
``n_k <= length``, else the last (longest) one, with that member's ``length`` as the prompt length
of a chunk's counts. The family's ``min_seq_len`` is the smallest one its members give.

Default policy
--------------
With no config (``load_config(None)``) every head of every layer is
``vertical_slash(vertical=1000, slash=6096)``: MInference's default budget, the one its
search starts from and the most common entry in its published configs. It is a reasonable
starting point for any model but not tuned for one; the returned config has
``is_default_policy=True`` so the backend can log that no per-head config was given.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Union

from mi_compile.patterns import registry
from mi_compile.patterns.spec import PATTERN_IDS, PATTERN_PARAMS, HeadPattern, PatternError
from mi_compile.kernels.constants import BLOCK, MAX_PARAM
from mi_compile.op import family_member
from mi_compile.options import MAX_MIN_SEQ_LEN

__all__ = [
    "FORMAT",
    "FAMILY_FORMAT",
    "DEFAULT_PATTERN",
    "DEFAULT_POLICY",
    "MINFERENCE_NAMES",
    "ConfigError",
    "ConfigFamily",
    "SparseConfig",
    "TriangleMix",
    "load_config",
    "triangle_mix_config",
]

FORMAT = "mi-compile/v1"
#: The ``"format"`` of a config family (see the module docstring).
FAMILY_FORMAT = "mi-compile/family-v1"

#: MInference's default budget (also what MInference uses for heads missing from its files).
DEFAULT_PATTERN = HeadPattern("vertical_slash", vertical=1000, slash=6096)

#: MInference pattern name -> our pattern kind (see the module docstring for the parameters):
#: a view of the pattern registry (each pattern's ``minference_names``).
MINFERENCE_NAMES = registry.MINFERENCE_NAMES

_TOP_KEYS = ("format", "model", "num_layers", "num_heads", "min_seq_len", "length", "default", "layers",
             "triangle_mix")
_FAMILY_KEYS = ("format", "model", "members")
_TRIANGLE_MIX = "triangle_mix"
_WILDCARD = "*"

ConfigSource = Union[None, str, "os.PathLike[str]", dict, list, "SparseConfig", "ConfigFamily"]


class ConfigError(ValueError):
    """A per-head config that cannot be read or does not fit the model.

    The message always starts with the source (file path as given, ``<dict>``, ``<list>`` or
    ``<default policy>``), then the layer and head where relevant, then what is wrong.
    """


def _where(source: str, layer: Any = None, head: Any = None) -> str:
    """``source: layer L, head H`` -- the prefix of every ConfigError message."""
    loc = []
    if layer is not None:
        loc.append(layer if layer in ("default", _TRIANGLE_MIX) else f"layer {layer}")
    if head is not None:
        loc.append(f"head {head!r}" if head == _WILDCARD else f"head {head}")
    return f"{source}: {', '.join(loc)}" if loc else source


def _error(source: str, msg: str, layer: Any = None, head: Any = None) -> ConfigError:
    return ConfigError(f"{_where(source, layer, head)}: {msg}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TriangleMix:
    """The TriangleMix layer rule: layers ``< dense_layers`` dense, the others ``pattern``
    (a ``tri_shape`` head pattern) for every head."""

    dense_layers: int
    pattern: HeadPattern

    def pattern_for(self, layer: int) -> HeadPattern:
        return _DENSE if layer < self.dense_layers else self.pattern

    def to_json(self) -> dict:
        return {"dense_layers": self.dense_layers, "tri_shape": dict(self.pattern.params)}


_DENSE = HeadPattern("dense")


@dataclasses.dataclass
class SparseConfig:
    """A resolved per-head config.

    ``layers`` holds the explicit per-head entries, ``layer_defaults`` the ``"*"`` entries and
    ``default`` the fallback for everything else; :meth:`heads_for` applies them in that order.
    ``num_layers`` / ``num_heads`` are ``None`` when the config does not pin them (then any
    model size is accepted as long as the explicit entries fit).
    """

    source: str
    num_layers: int | None = None
    num_heads: int | None = None
    layers: dict[int, dict[int, HeadPattern]] = dataclasses.field(default_factory=dict)
    default: HeadPattern | None = None
    #: layer -> head -> recall measured by the pattern search (metadata only).
    scores: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)
    is_default_policy: bool = False
    #: layer -> the pattern of that layer's ``"*"`` entry.
    layer_defaults: dict[int, HeadPattern] = dataclasses.field(default_factory=dict)
    #: the optional free-text ``"model"`` field.
    model: str | None = None
    #: the optional ``"min_seq_len"``: the prompt length from which this config was measured to
    #: pay; the backend uses it when its own option ``min_seq_len`` is not given.
    min_seq_len: int | None = None
    #: the optional ``"length"``: the prompt length the counts were chosen for, which scales a
    #: chunk's vertical-slash columns (see the format above); None: chunks keep the counts.
    length: int | None = None
    #: the optional ``"triangle_mix"`` layer rule (after ``layers``, before ``default``).
    triangle_mix: TriangleMix | None = None

    # ------------------------------------------------------------------ resolution
    def _min_heads(self) -> int:
        """Smallest head count the explicit entries allow (max head index + 1)."""
        return max((h + 1 for heads in self.layers.values() for h in heads), default=0)

    def _check_heads(self, num_heads: int) -> None:
        if self.num_heads is not None and self.num_heads != num_heads:
            raise ConfigError(
                f"config {self.source} has {self.num_heads} heads per layer, "
                f"the model has {num_heads}")
        if self.num_heads is None and self._min_heads() > num_heads:
            raise ConfigError(
                f"config {self.source} has entries for head {self._min_heads() - 1}, "
                f"the model has {num_heads} heads per layer")

    def heads_for(self, layer: int, num_heads: int) -> list[HeadPattern]:
        """The patterns of the ``num_heads`` query heads of ``layer``, in head order.

        Raises :class:`ConfigError` when the config is for another head count, when
        ``layer`` is beyond the config's ``num_layers``, or when a head has no entry, no
        ``"*"`` entry and there is no ``default``.
        """
        if not _is_int(layer) or layer < 0:
            raise _error(self.source, f"layer index must be a non-negative int, got {layer!r}")
        if not _is_int(num_heads) or num_heads < 1:
            raise _error(self.source, f"num_heads must be a positive int, got {num_heads!r}")
        self._check_heads(num_heads)
        if self.num_layers is not None and layer >= self.num_layers:
            raise _error(
                self.source,
                f"the config has only {self.num_layers} layers (0..{self.num_layers - 1})",
                layer=layer)
        explicit = self.layers.get(layer, {})
        fallback = self.layer_defaults.get(layer)
        if fallback is None:
            fallback = self.triangle_mix.pattern_for(layer) if self.triangle_mix else self.default
        out = []
        for head in range(num_heads):
            pattern = explicit.get(head, fallback)
            if pattern is None:
                raise _error(self.source, "no entry for this head, no '*' entry for the layer "
                             "and no 'default'", layer=layer, head=head)
            out.append(pattern)
        return out

    def check_layers(self, num_layers: int | None) -> None:
        """Raise :class:`ConfigError` unless the config's layers fit a model of ``num_layers``
        (None: unknown, nothing to check). Tensor parallelism splits heads, never layers, so
        this holds on every rank."""
        if num_layers is None:
            return
        if self.num_layers is not None and self.num_layers != num_layers:
            raise ConfigError(f"config {self.source} has {self.num_layers} layers, the model has {num_layers}")
        present = set(self.layers) | set(self.layer_defaults)
        if self.num_layers is None and present and max(present) >= num_layers:
            raise ConfigError(f"config {self.source} has entries for layer {max(present)}, "
                              f"the model has {num_layers} layers")

    def check_model(self, num_layers: int | None, num_heads: int) -> None:
        """Raise :class:`ConfigError` unless the config fits a model of this shape.

        Checks the layer and head counts (e.g. ``config llama.json has 32 layers, the model
        has 30``); when ``num_layers`` is known it also resolves every layer, so a missing
        entry is reported now rather than when that layer is first compiled.
        """
        self.check_layers(num_layers)
        self._check_heads(num_heads)
        if num_layers is not None:
            for layer in range(num_layers):
                self.heads_for(layer, num_heads)

    # ------------------------------------------------------------------ output
    def summary(self) -> str:
        """One line for logs: source, shape and how often each pattern occurs."""
        if self.is_default_policy:
            return f"default policy: every head {self.default.describe()}"
        counts: dict[str, int] = {}
        for heads in self.layers.values():
            for p in heads.values():
                counts[p.describe()] = counts.get(p.describe(), 0) + 1
        shape = f"{self.num_layers if self.num_layers is not None else '?'} layers x " \
                f"{self.num_heads if self.num_heads is not None else '?'} heads"
        top = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        extra = []
        if self.layer_defaults:
            extra.append(f"'*' in {len(self.layer_defaults)} layers")
        if self.triangle_mix is not None:
            extra.append(f"triangle_mix: layers < {self.triangle_mix.dense_layers} dense, "
                         f"then {self.triangle_mix.pattern.describe()}")
        if self.default is not None:
            extra.append(f"default {self.default.describe()}")
        return f"config {self.source}: {shape}; " + "; ".join(
            x for x in [top or "no explicit heads", *extra] if x)

    def to_json(self) -> dict:
        """This config in the mi-compile format (a JSON-ready dict); loads back equal."""
        out: dict[str, Any] = {"format": FORMAT}
        if self.model is not None:
            out["model"] = self.model
        if self.num_layers is not None:
            out["num_layers"] = self.num_layers
        if self.num_heads is not None:
            out["num_heads"] = self.num_heads
        if self.min_seq_len is not None:
            out["min_seq_len"] = self.min_seq_len
        if self.length is not None:
            out["length"] = self.length
        if self.default is not None:
            out["default"] = _entry_json(self.default)
        if self.triangle_mix is not None:
            out[_TRIANGLE_MIX] = self.triangle_mix.to_json()
        layers: dict[str, dict] = {}
        for layer in sorted(set(self.layers) | set(self.layer_defaults)):
            heads: dict[str, dict] = {}
            if layer in self.layer_defaults:
                heads[_WILDCARD] = _entry_json(self.layer_defaults[layer])
            for head in sorted(self.layers.get(layer, {})):
                heads[str(head)] = _entry_json(self.layers[layer][head],
                                               self.scores.get(layer, {}).get(head))
            layers[str(layer)] = heads
        if layers:
            out["layers"] = layers
        return out

    def with_dense_last(self, last: int) -> "SparseConfig":
        """A copy in which every head whose pattern takes ``last`` (vertical-slash, block-sparse,
        tri-shape) computes the query blocks holding the prompt's last ``last`` queries densely:
        the question at the end of a long prompt attends exactly, for about ``last / n`` of the
        square per head. Other heads are unchanged; ``last = 0`` removes such rows."""
        if not isinstance(last, int) or isinstance(last, bool) or not 0 <= last <= MAX_PARAM:
            raise ConfigError(f"{self.source}: dense last rows must be an int in 0..2**31 - 1, got {last!r}")

        def apply(p: HeadPattern | None) -> HeadPattern | None:
            if p is None or "last" not in PATTERN_PARAMS[p.kind]:
                return p
            return dataclasses.replace(p, last=last)

        return dataclasses.replace(
            self, source=f"{self.source} (last {last} rows dense)", default=apply(self.default),
            model=None if self.model is None else f"{self.model}; the last {last} queries dense",
            layers={l: {h: apply(p) for h, p in heads.items()} for l, heads in self.layers.items()},
            layer_defaults={l: apply(p) for l, p in self.layer_defaults.items()},
            triangle_mix=self.triangle_mix if self.triangle_mix is None else dataclasses.replace(
                self.triangle_mix, pattern=apply(self.triangle_mix.pattern)))

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path``, one head entry per line (diff-friendly)."""
        Path(path).write_text(_dumps(self.to_json()))


class ConfigFamily:
    """Configs of one model searched at different prompt lengths; each attention call runs one.

    ``members`` are kept in ascending ``length``. The op picks a member per call from its key
    count (:meth:`member_for` is the same rule in Python, for tests and tools), so one compiled
    graph serves short and long prompts with the config searched nearest to their length. The
    family has no ``length`` of its own (each member's goes into the op) and is never the
    default policy; ``min_seq_len`` is the smallest its members give (None if none does).
    """

    is_default_policy = False
    #: None: the family's calls take each member's own length (see the op's ``family`` argument).
    length = None

    def __init__(self, source: str, members, model: str | None = None):
        self.source = source
        self.model = model
        members = tuple(members)
        if not members:
            raise ConfigError(f"{source}: a config family needs at least one member")
        for i, m in enumerate(members):
            if isinstance(m, ConfigFamily):
                raise ConfigError(f"{source}: member {i} ({m.source}) is itself a config family; "
                                  "a family's members must be single configs")
            if m.length is None:
                raise ConfigError(f"{source}: member {i} ({m.source}) has no 'length' (the prompt length it "
                                  "was searched at): a family chooses its members by length")
        for what in ("length", "num_layers", "num_heads"):
            seen: dict = {}
            for i, m in enumerate(members):
                value = getattr(m, what)
                if value is None:
                    continue
                if what == "length" and value in seen:
                    j = seen[value]
                    raise ConfigError(f"{source}: members {j} ({members[j].source}) and {i} ({m.source}) both "
                                      f"have length {value}; a family's lengths must be distinct")
                if what != "length" and seen and value not in seen:
                    j, other = next(iter(seen.values())), next(iter(seen))
                    raise ConfigError(f"{source}: member {j} ({members[j].source}) has {what}={other}, "
                                      f"member {i} ({m.source}) has {what}={value}; members must be for one model")
                seen.setdefault(value, i)
        self.members = tuple(sorted(members, key=lambda m: m.length))

    def __eq__(self, other) -> bool:
        return (isinstance(other, ConfigFamily) and (self.source, self.model, self.members)
                == (other.source, other.model, other.members))

    def __repr__(self) -> str:
        return f"ConfigFamily(source={self.source!r}, members={self.members!r}, model={self.model!r})"

    def __str__(self) -> str:
        return self.summary()

    # ------------------------------------------------------------------ shape
    def _given(self, what: str) -> int | None:
        return next((getattr(m, what) for m in self.members if getattr(m, what) is not None), None)

    @property
    def num_layers(self) -> int | None:
        """The layer count the members pin (they agree), or None."""
        return self._given("num_layers")

    @property
    def num_heads(self) -> int | None:
        """The query-head count the members pin (they agree), or None."""
        return self._given("num_heads")

    @property
    def min_seq_len(self) -> int | None:
        """The smallest ``min_seq_len`` a member gives: below it no member pays; None if none gives one."""
        given = [m.min_seq_len for m in self.members if m.min_seq_len is not None]
        return min(given) if given else None

    @property
    def lengths(self) -> tuple:
        """The members' lengths, ascending."""
        return tuple(m.length for m in self.members)

    # ------------------------------------------------------------------ resolution
    def member_for(self, n_k: int):
        """The member a call over ``n_k`` keys runs: the first (shortest) with ``n_k <= length``,
        else the longest. The op applies the same rule to the lengths in its ``family`` argument."""
        return family_member([(m.length, m) for m in self.members], n_k)[1]

    def heads_for(self, layer: int, num_heads: int) -> list[HeadPattern]:
        """The longest member's patterns for ``layer``: one answer for callers that want one
        (the explain table, tools); the rewrite asks every member."""
        return self.members[-1].heads_for(layer, num_heads)

    def check_layers(self, num_layers: int | None) -> None:
        """:meth:`SparseConfig.check_layers` of every member."""
        for member in self.members:
            member.check_layers(num_layers)

    def check_model(self, num_layers: int | None, num_heads: int) -> None:
        """:meth:`SparseConfig.check_model` of every member: each must fit the model."""
        for member in self.members:
            member.check_model(num_layers, num_heads)

    # ------------------------------------------------------------------ output
    def member_lines(self) -> list[str]:
        """``<= length: source`` per member, the last also covering longer inputs."""
        last = len(self.members) - 1
        return [f"<= {m.length}{' (and longer)' if i == last else ''}: {m.source}"
                for i, m in enumerate(self.members)]

    def summary(self) -> str:
        """One line for logs: the family's source and which member runs up to which key count."""
        return f"config family {self.source}: keys " + "; ".join(self.member_lines())

    def to_json(self) -> dict:
        """This family in its format, members inline (a JSON-ready dict); loads back to the same members."""
        out: dict[str, Any] = {"format": FAMILY_FORMAT}
        if self.model is not None:
            out["model"] = self.model
        out["members"] = [m.to_json() for m in self.members]
        return out


def _entry_json(pattern: HeadPattern, score: float | None = None) -> dict:
    entry: dict[str, Any] = {"pattern": pattern.kind, **pattern.set_params}
    if score is not None:
        entry["score"] = score
    return entry


def _dumps(doc: dict) -> str:
    """JSON with the top level and layers indented, each head entry on one line."""
    lines = ["{"]
    items = list(doc.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if key != "layers":
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
            continue
        lines.append('  "layers": {')
        layer_items = list(value.items())
        for j, (layer, heads) in enumerate(layer_items):
            lines.append(f"    {json.dumps(layer)}: {{")
            head_items = list(heads.items())
            for k, (head, entry) in enumerate(head_items):
                hc = "," if k < len(head_items) - 1 else ""
                lines.append(f"      {json.dumps(head)}: {json.dumps(entry)}{hc}")
            lines.append("    }" + ("," if j < len(layer_items) - 1 else ""))
        lines.append("  }" + comma)
    lines.append("}")
    return "\n".join(lines) + "\n"


#: The config used when none is given: every head ``vertical_slash(1000, 6096)``.
DEFAULT_POLICY = SparseConfig(source="<default policy>", default=DEFAULT_PATTERN,
                              is_default_policy=True)


# ---------------------------------------------------------------------- parsing
def _make_pattern(source: str, kind: str, params: dict, layer: Any, head: Any) -> HeadPattern:
    try:
        return HeadPattern(kind, **params)
    except PatternError as exc:
        raise _error(source, str(exc), layer, head) from None


def _check_size(source: str, name: str, value: Any, layer: Any, head: Any) -> int:
    if not _is_int(value):
        raise _error(source, f"{name} must be an int, got {value!r}", layer, head)
    if value < 0:
        raise _error(source, f"{name} must be >= 0, got {value}", layer, head)
    return value


def _check_score(source: str, value: Any, layer: Any, head: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            ok = math.isfinite(float(value))
        except OverflowError:  # an int too large for a float (JSON allows any size)
            ok = False
    if not ok:
        raise _error(source, f"score must be a finite number, got {value!r}", layer, head)
    return float(value)


def _parse_entry(source: str, entry: Any, layer: Any, head: Any, allow_score: bool
                 ) -> tuple[HeadPattern, float | None]:
    """One head entry of the mi-compile format -> (pattern, score or None)."""
    if isinstance(entry, HeadPattern):  # convenience for configs built in Python
        return entry, None
    if not isinstance(entry, dict):
        raise _error(source, f"a head entry must be an object like "
                     f'{{"pattern": "dense"}}, got {type(entry).__name__} {entry!r}', layer, head)
    if "pattern" not in entry:
        raise _error(source, f"missing 'pattern' (one of {sorted(PATTERN_IDS)})", layer, head)
    kind = entry["pattern"]
    if not isinstance(kind, str) or kind not in PATTERN_IDS:
        hint = ""
        if isinstance(kind, str) and kind in MINFERENCE_NAMES:
            hint = f" ({kind!r} is MInference's name; here it is {MINFERENCE_NAMES[kind]!r})"
        raise _error(source, f"unknown pattern {kind!r}; expected one of "
                     f"{sorted(PATTERN_IDS)}{hint}", layer, head)
    names = PATTERN_PARAMS[kind]
    allowed = {"pattern", *names} | ({"score"} if allow_score else set())
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise _error(source, f"{kind} does not take {', '.join(map(repr, unknown))}; "
                     f"allowed keys: {sorted(allowed)}", layer, head)
    optional = registry.get(kind).optional
    missing = [n for n in names if n not in entry and n not in optional]
    if missing:
        raise _error(source, f"{kind} is missing parameter {', '.join(map(repr, missing))} "
                     f"(needs {list(names)})", layer, head)
    params = {n: _check_size(source, n, entry[n], layer, head) for n in names if n in entry}
    score = _check_score(source, entry["score"], layer, head) if "score" in entry else None
    return _make_pattern(source, kind, params, layer, head), score


def _parse_index(source: str, key: Any, what: str, limit: int | None, layer: Any = None) -> int:
    """A layer/head key: a decimal string (JSON) or an int (dicts built in Python)."""
    if _is_int(key):
        index = key
    elif isinstance(key, str) and key.isascii() and key.isdigit() and str(int(key)) == key:
        index = int(key)
    else:
        expected = "a decimal index like '3'" + (" or '*'" if what == "head" else "")
        raise _error(source, f"bad {what} key {key!r}; expected {expected}", layer)
    if index < 0:
        raise _error(source, f"{what} index must be >= 0, got {index}", layer)
    if limit is not None and index >= limit:
        raise _error(source, f"{what} {index} is beyond num_{what}s={limit}", layer)
    return index


def _positive(source: str, doc: dict, key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _error(source, f"{key} must be a positive int, got {value!r}")
    return value


def _from_ours(source: str, doc: dict) -> SparseConfig:
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        hint = f' (a config family needs "format": "{FAMILY_FORMAT}")' if "members" in unknown else ""
        raise _error(source, f"unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                     f"allowed: {list(_TOP_KEYS)}{hint}")
    if "format" in doc and doc["format"] != FORMAT:
        raise _error(source, f"format is {doc['format']!r}, this reader understands {FORMAT!r} "
                     f"(and {FAMILY_FORMAT!r}, a config family)")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise _error(source, f"model must be a string, got {type(model).__name__}")
    num_layers = _positive(source, doc, "num_layers")
    num_heads = _positive(source, doc, "num_heads")
    min_seq_len = doc.get("min_seq_len")
    if min_seq_len is not None and (not _is_int(min_seq_len) or not 0 <= min_seq_len <= MAX_MIN_SEQ_LEN):
        raise _error(source, f"min_seq_len must be an int >= 0 and <= 2**31 - 1, got {min_seq_len!r}")
    length = doc.get("length")
    if length is not None and (not _is_int(length) or not BLOCK <= length <= MAX_MIN_SEQ_LEN):
        raise _error(source, f"length must be an int >= {BLOCK} and <= 2**31 - 1 (the prompt length the "
                     f"counts were chosen for), got {length!r}")
    default = None
    if doc.get("default") is not None:
        default, _ = _parse_entry(source, doc["default"], "default", None, allow_score=False)
    raw_layers = doc.get("layers", {})
    if not isinstance(raw_layers, dict):
        raise _error(source, f"layers must be an object (layer -> heads), "
                     f"got {type(raw_layers).__name__}")
    mix = None
    if doc.get(_TRIANGLE_MIX) is not None:
        mix = _parse_triangle_mix(source, doc[_TRIANGLE_MIX], num_layers)
    if not raw_layers and default is None and mix is None:
        raise _error(source, "the config has neither 'layers' nor 'default' (nor 'triangle_mix')")

    layers: dict[int, dict[int, HeadPattern]] = {}
    layer_defaults: dict[int, HeadPattern] = {}
    scores: dict[int, dict[int, float]] = {}
    for lkey, raw_heads in raw_layers.items():
        layer = _parse_index(source, lkey, "layer", num_layers)
        if layer in layers or layer in layer_defaults:
            raise _error(source, "given twice", layer)
        if not isinstance(raw_heads, dict) or not raw_heads:
            raise _error(source, "must be a non-empty object (head -> entry)", layer)
        heads: dict[int, HeadPattern] = {}
        for hkey, entry in raw_heads.items():
            if hkey == _WILDCARD:
                layer_defaults[layer], _ = _parse_entry(source, entry, layer, _WILDCARD,
                                                        allow_score=False)
                continue
            head = _parse_index(source, hkey, "head", num_heads, layer)
            if head in heads:
                raise _error(source, "given twice", layer, head)
            heads[head], score = _parse_entry(source, entry, layer, head, allow_score=True)
            if score is not None:
                scores.setdefault(layer, {})[head] = score
        if heads:
            layers[layer] = heads
    return SparseConfig(source=source, num_layers=num_layers, num_heads=num_heads,
                        layers=layers, default=default, scores=scores,
                        layer_defaults=layer_defaults, model=model, min_seq_len=min_seq_len,
                        length=length, triangle_mix=mix)


def _parse_triangle_mix(source: str, raw: Any, num_layers: int | None) -> TriangleMix:
    """The ``"triangle_mix"`` object: ``dense_layers`` and the ``tri_shape`` parameters."""
    if not isinstance(raw, dict):
        raise _error(source, f'must be an object like {{"dense_layers": 8, "tri_shape": '
                     f'{{"sink": 64, "local": 1024, "last": 64}}}}, got {type(raw).__name__}', _TRIANGLE_MIX)
    allowed = ("dense_layers", "tri_shape")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise _error(source, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {list(allowed)}",
                     _TRIANGLE_MIX)
    missing = [key for key in allowed if key not in raw]
    if missing:
        raise _error(source, f"missing {', '.join(map(repr, missing))}", _TRIANGLE_MIX)
    dense_layers = _check_size(source, "dense_layers", raw["dense_layers"], _TRIANGLE_MIX, None)
    if num_layers is not None and dense_layers > num_layers:
        raise _error(source, f"dense_layers is {dense_layers}, more than num_layers={num_layers}", _TRIANGLE_MIX)
    entry = raw["tri_shape"]
    if not isinstance(entry, dict):
        raise _error(source, f"tri_shape must be an object of the pattern's parameters "
                     f'(sink, local, last), got {type(entry).__name__} {entry!r}', _TRIANGLE_MIX)
    if entry.get("pattern", "tri_shape") != "tri_shape":
        raise _error(source, f"tri_shape: the pattern is 'tri_shape', got {entry['pattern']!r}", _TRIANGLE_MIX)
    pattern, _ = _parse_entry(source, {**entry, "pattern": "tri_shape"}, _TRIANGLE_MIX, None, allow_score=False)
    return TriangleMix(dense_layers=dense_layers, pattern=pattern)


def triangle_mix_config(dense_layers: int, *, sink: int = 64, local: int = 1024, last: int = 64,
                        num_layers: int | None = None, num_heads: int | None = None) -> SparseConfig:
    """A TriangleMix config: layers ``< dense_layers`` dense, then every head
    ``tri_shape(sink, local, last)``; the same as ``load_config({"triangle_mix": ...})`` (and
    validated the same way)."""
    doc: dict[str, Any] = {"format": FORMAT, _TRIANGLE_MIX: {
        "dense_layers": dense_layers, "tri_shape": {"sink": sink, "local": local, "last": last}}}
    if num_layers is not None:
        doc["num_layers"] = num_layers
    if num_heads is not None:
        doc["num_heads"] = num_heads
    return load_config(doc)


def _from_minference(source: str, doc: list) -> SparseConfig:
    if not doc:
        raise _error(source, "MInference config is an empty list (expected one entry per layer)")
    layers: dict[int, dict[int, HeadPattern]] = {}
    scores: dict[int, dict[int, float]] = {}
    for layer, raw_heads in enumerate(doc):
        if not isinstance(raw_heads, dict) or not raw_heads:
            raise _error(source, "expected a non-empty object mapping head -> "
                         "[pattern, vertical_size, slash_size, score]", layer)
        heads: dict[int, HeadPattern] = {}
        for hkey, entry in raw_heads.items():
            head = _parse_index(source, hkey, "head", None, layer)
            if head in heads:
                raise _error(source, "given twice", layer, head)
            if not isinstance(entry, (list, tuple)) or len(entry) not in (3, 4):
                raise _error(source, "expected [pattern, vertical_size, slash_size, score], "
                             f"got {entry!r}", layer, head)
            name, vertical, slash = entry[:3]
            if not isinstance(name, str) or name not in MINFERENCE_NAMES:
                raise _error(source, f"unknown pattern {name!r}; expected one of "
                             f"{sorted(MINFERENCE_NAMES)}", layer, head)
            vertical = _check_size(source, "vertical_size", vertical, layer, head)
            slash = _check_size(source, "slash_size", slash, layer, head)
            kind = MINFERENCE_NAMES[name]
            params = registry.get(kind).from_minference(vertical, slash)
            heads[head] = _make_pattern(source, kind, params, layer, head)
            if len(entry) == 4:
                scores.setdefault(layer, {})[head] = _check_score(source, entry[3], layer, head)
        layers[layer] = heads

    # Every layer must list the same heads 0..n-1: MInference configs are complete.
    num_heads = len(layers[0])
    for layer, heads in layers.items():
        if len(heads) != num_heads:
            raise _error(source, f"has {len(heads)} heads, layer 0 has {num_heads}", layer)
        missing = [h for h in range(num_heads) if h not in heads]
        if missing:
            raise _error(source, f"missing head {missing[0]} (heads must be 0..{num_heads - 1})",
                         layer)
    return SparseConfig(source=source, num_layers=len(doc), num_heads=num_heads,
                        layers=layers, scores=scores)


def _read_json(path: str | os.PathLike) -> tuple[str, Any]:
    source = os.fspath(path)
    try:
        text = Path(source).read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: "
                          f"{exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
    try:
        return source, json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}") from None


#: Configs that ship with the package (searched per model; each file's ``model`` text says
#: how it was made): ``load_config("<name>")`` and the backend's ``config`` option take the name.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> dict[str, str]:
    """Name (file name without ``.json``) -> path of every config shipped in the package."""
    if not os.path.isdir(SHIPPED_DIR):
        return {}
    return {f[:-5]: os.path.join(SHIPPED_DIR, f) for f in sorted(os.listdir(SHIPPED_DIR))
            if f.endswith(".json")}


def _family_from(source: str, doc: dict, base_dir: str | None) -> ConfigFamily:
    """A config family's JSON object (see the module docstring) -> :class:`ConfigFamily`."""
    unknown = [k for k in doc if k not in _FAMILY_KEYS]
    if unknown:
        raise _error(source, f"unknown top-level key(s) {', '.join(map(repr, unknown))} of a config family; "
                     f"allowed: {list(_FAMILY_KEYS)}")
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise _error(source, f"model must be a string, got {type(model).__name__}")
    members = doc.get("members")
    if not isinstance(members, list) or not members:
        raise _error(source, "a config family needs 'members': a non-empty array of shipped config names, "
                     f"paths or inline configs, got {members!r}")
    return ConfigFamily(source, [_load_member(source, i, m, base_dir) for i, m in enumerate(members)], model)


def _member_path(source: str, index: int, member: str | os.PathLike, base_dir: str | None) -> str:
    """The file a family member names: a path (relative to ``base_dir``, the family file's
    folder) when it exists, else a shipped config's name."""
    path = os.fspath(member)
    candidate = path if base_dir is None else os.path.join(base_dir, path)
    if os.path.exists(candidate):
        return candidate
    shipped = shipped_configs()
    if isinstance(member, str) and member in shipped:
        return shipped[member]
    raise ConfigError(f"{source}#{index}: unknown member {path!r}: no file {candidate!r} and no shipped config "
                      f"of that name (shipped: {', '.join(shipped) or 'none'})")


def _load_member(source: str, index: int, member: Any, base_dir: str | None) -> SparseConfig:
    """Member ``index`` of family ``source``: a single config. An inline member's source is
    ``<family source>#<index>``; errors from a member's file are prefixed with that."""
    where = f"{source}#{index}"
    if isinstance(member, (SparseConfig, ConfigFamily)):   # families built in Python (a family: refused later)
        return member
    name = where
    if isinstance(member, dict):
        doc = member
    elif isinstance(member, (str, os.PathLike)):
        path = _member_path(source, index, member, base_dir)
        try:
            name, doc = _read_json(path)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    else:
        raise _error(where, f"a family member must be a shipped config's name, a path or an inline config "
                     f"object, got {type(member).__name__}")
    if isinstance(doc, dict) and doc.get("format") == FAMILY_FORMAT:
        what = "this member" if name == where else name
        raise _error(where, f"{what} is itself a config family; a family cannot contain a family "
                     "(list that family's members instead)")
    try:
        return _parse_doc(name, doc)
    except ConfigError as exc:
        if name == where:
            raise
        raise ConfigError(f"{where}: {exc}") from None


def _parse_doc(name: str, doc: Any) -> SparseConfig:
    """A single config's parsed JSON: an object (mi-compile format) or an array (MInference's)."""
    if isinstance(doc, dict):
        return _from_ours(name, doc)
    if isinstance(doc, list):
        return _from_minference(name, doc)
    raise _error(name, f"top level must be an object (mi-compile format) or an array "
                 f"(MInference format), got {type(doc).__name__}")


def single_config(config, use: str):
    """``config`` unless it is a :class:`ConfigFamily`, for a ``use`` that needs one config (a
    plot, a benchmark at fixed lengths): a family raises :class:`ConfigError` naming its members."""
    if isinstance(config, ConfigFamily):
        raise ConfigError(f"{config.source} is a config family; {use} one of its members: "
                          + ", ".join(m.source for m in config.members))
    return config


def load_config(source: ConfigSource = None) -> SparseConfig | ConfigFamily:
    """Read a per-head config from ``source`` (see the module docstring for the formats).

    ``None`` gives a copy of :data:`DEFAULT_POLICY`; a path is read as JSON (object =
    mi-compile format or a config family, array = MInference format); the name of a shipped
    config (:func:`shipped_configs`, e.g. ``"qwen2.5-coder-1.5b-128k"``, or the family
    ``"qwen2.5-coder-1.5b"``) reads that file; a ``dict`` / ``list`` is taken as already parsed
    JSON of the respective format. A config family gives a :class:`ConfigFamily`, anything
    else a :class:`SparseConfig`; a loaded one of either is returned as it is. Any problem
    raises :class:`ConfigError`.
    """
    if source is None:
        return copy.deepcopy(DEFAULT_POLICY)
    if isinstance(source, (SparseConfig, ConfigFamily)):
        return source
    if isinstance(source, str) and not os.path.exists(source) and source in shipped_configs():
        source = shipped_configs()[source]
    base_dir = None
    if isinstance(source, (str, os.PathLike)):
        name, doc = _read_json(source)
        base_dir = os.path.dirname(os.path.abspath(name))
    elif isinstance(source, dict):
        name, doc = "<dict>", source
    elif isinstance(source, list):
        name, doc = "<list>", source
    else:
        raise ConfigError(f"cannot read a config from {type(source).__name__}; expected None, "
                          "a path, a dict (mi-compile format or a config family) or a list (MInference format)")
    if isinstance(doc, dict) and doc.get("format") == FAMILY_FORMAT:
        return _family_from(name, doc, base_dir)
    return _parse_doc(name, doc)
