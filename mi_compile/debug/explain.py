"""The explain table: one row per attention call site.

    layer  module                      heads  kv  mask            gqa     action  patterns / reason
    0      model.layers.0.self_attn    9      3   causal          undone  sparse  9x vertical_slash(1000,6096)
    ...

A chunk continuing a cache shows mask ``causal_bottom_right``, a call over more keys than
queries whose mask is causal aligned top-left (``is_causal=True`` with a shorter query, a static
cache's prefill) ``causal_top_left`` and a chunk continuing a static cache
``causal_static_offset`` (each with a line saying what that is, the latter two with how it was
established); a call left dense says why, e.g. ``decode step (one query token)``,
``static cache: ...`` or ``prefill chunk over a cache: <the op's reason>``. With a config family
a sparse row shows each member's patterns (``<= 32768: ... | <= 131072: ...``), and lines below
list the members and the one the input's length runs.

:func:`mi_compile.explain` (in :mod:`mi_compile.backend`) compiles a model with the backend's
passes only, runs it once and returns an :class:`ExplainResult`; this module only formats.
"""
from __future__ import annotations

import dataclasses


def _mask_text(site) -> str:
    if site.mask is None:
        return "?"
    text = site.mask.kind
    if site.mask.window:
        text = text.replace("sliding_window", f"window({site.mask.window})")
    return text


def threshold_line(min_seq_len: int, length: int | None = None) -> str:
    """What ``min_seq_len`` means for the rewritten calls (and for an input of ``length`` tokens)."""
    line = f"min_seq_len {min_seq_len}: prompts shorter than this run dense attention inside the op"
    if length is not None:
        line += (f"; this input ({length} tokens) runs "
                 + ("the sparse patterns" if length >= max(min_seq_len, 1) else "dense"))
    return line


# masks over more keys than queries whose meaning a probe established: (MaskInfo flag, legend)
_PROVEN_KINDS = (
    ("top_left", "causal_top_left: fewer queries than keys, query r sees keys 0..r (is_causal=True with a "
                 "shorter query, a static cache's prefill): the same as a prefill over the first nq keys, "
                 "which a sparse call runs (K, V and the padding mask narrowed to them)"),
    ("static_chunk", "causal_static_offset: a prefill chunk that continues a static cache (queries at runtime "
                     "positions c..c+nq-1 over all its slots, query r sees slots 0..c+r): a sparse call gathers "
                     "K and V so the filled slots come last and masks the rest as left padding"),
)


def family_lines(family, length: int | None = None, chunk: bool = False) -> list[str]:
    """What a config family's calls run: ``<= length: member source`` per member (the last also
    above its length) and, for an input of ``length`` tokens, which member that is (``chunk``:
    the input continues a cache, whose tokens count too)."""
    lines = ["config family: each sparse call runs the first member whose length its key count does not "
             "exceed, else the last:"]
    lines.extend(f"  <= {n}{' (and longer)' if i == len(family) - 1 else ''}: {source}"
                 for i, (n, source) in enumerate(family))
    if length is not None and chunk:
        lines.append(f"this input ({length} tokens) continues a cache: the member is chosen by the call's key "
                     "count, the cached tokens included (a static cache: all of its slots)")
    elif length is not None:
        from ..op import family_member

        n, source = family_member(family, length)
        lines.append(f"this input ({length} tokens) runs the member for <= {n}: {source}")
    return lines


def format_table(sites, config_source: str = "", threshold: str = "", tp=None, family=None,
                 length: int | None = None) -> str:
    """The table of ``sites`` and the legends it needs; ``family``: the config family's
    ``(length, source)`` members, shown when a site carries them, with the one an input of
    ``length`` tokens runs."""
    header = ("layer", "module", "heads", "kv", "mask", "gqa", "action", "patterns / reason")
    rows = []
    for s in sites:
        what = s.pattern_summary() if s.action == "sparse" else s.reason
        rows.append((str(s.layer if s.layer is not None else "?"), s.module_path, str(s.q_heads), str(s.kv_heads),
                     _mask_text(s), s.gqa, s.action, what))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    lines = []
    if config_source:
        lines.append(f"config: {config_source}")
    if tp is not None:   # this rank's slice of the config (mi_compile.tensor_parallel)
        local_q = {s.q_heads for s in sites if isinstance(s.q_heads, int)}
        local_kv = {s.kv_heads for s in sites if isinstance(s.kv_heads, int)}
        lines.append(tp.describe(local_q.pop() if len(local_q) == 1 else None,
                                 local_kv.pop() if len(local_kv) == 1 else None))
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines.append(fmt.format(*header))
    lines.extend(fmt.format(*r) for r in rows)
    n_sparse = sum(s.action == "sparse" for s in sites)
    lines.append(f"{len(sites)} attention call(s): {n_sparse} sparse, {len(sites) - n_sparse} dense")
    if any(s.mask is not None and s.mask.chunk for s in sites):
        lines.append("causal_bottom_right: a prefill chunk that continues a cache (nq new queries over nk "
                     "cached + new keys, query r at key nk - nq + r)")
        lengths = {_prompt_length(s) for s in sites if s.action == "sparse" and s.mask.chunk} - {0}
        if lengths:
            lines.append(f"config length {', '.join(map(str, sorted(lengths)))}: a chunk with fewer keys keeps "
                         "nk / length of each vertical-slash head's columns")
    for flag, legend in _PROVEN_KINDS:
        matched = [s for s in sites if s.mask is not None and getattr(s.mask, flag)]
        if matched:
            lines.append(legend)
            lines.extend(f"  {how}" for how in dict.fromkeys(s.mask.how for s in matched))
    if family and any(s.family for s in sites):
        lines.extend(family_lines(family, length, any(s.mask is not None and (s.mask.chunk or s.mask.static_chunk)
                                                      for s in sites)))
    if threshold and n_sparse:
        lines.append(threshold)
    return "\n".join(lines)


def _prompt_length(site) -> int:
    """The ``prompt_length`` argument of a rewritten chunk call (0 when it has none)."""
    args = getattr(site.node, "args", ())
    return int(args[9]) if len(args) > 9 else 0


@dataclasses.dataclass
class ExplainResult:
    reports: list
    min_seq_len: int | None = None
    length: int | None = None        # the traced input's sequence length, when known
    device: object = None            # the traced input's device: the table says which kernels run there

    @property
    def sites(self):
        return [s for r in self.reports for s in r.sites]

    def table(self) -> str:
        threshold = "" if self.min_seq_len is None else threshold_line(self.min_seq_len, self.length)
        text = "\n\n".join(format_table(r.sites, r.config_source, threshold, getattr(r, "tp", None),
                                        getattr(r, "family", None), self.length)
                           for r in self.reports)
        if self.device is not None and any(s.action == "sparse" for s in self.sites):
            from ..kernels.dispatch import kernels_line
            text += "\n" + kernels_line(self.device)
        return text

    def __str__(self) -> str:
        return self.table()
