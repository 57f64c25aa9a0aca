"""The offline per-head pattern search: capture q/k, score every candidate, choose, write a config.

    config, report = search_config(model, input_ids, budget=0.3)
    config.save("searched.json")          # mi-compile/v1, read back by load_config / the backend
    print(report.table())

Per head, the chosen pattern is the candidate with the highest recall (share of dense
attention mass kept, :mod:`.score`) whose density (share of the causal square computed) is at
most ``budget``; see :func:`.score.choose` for ties and the fallbacks.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from ..config import SparseConfig
from ..patterns.spec import HeadPattern
from .candidates import candidate_patterns
from .capture import capture_qk
from .score import choose, dense_probs, score_candidates, score_rows

KINDS = ("dense", "a_shape", "vertical_slash", "block_sparse")


@dataclasses.dataclass
class HeadResult:
    layer: int
    head: int
    pattern: HeadPattern
    recall: float
    density: float


@dataclasses.dataclass
class SearchReport:
    """What the search measured and chose (``heads``: one entry per searched (layer, head))."""

    model: str
    n: int
    budget: float
    seed: int
    score_queries: int
    sample_queries: int
    candidates: list[HeadPattern]
    heads: list[HeadResult]
    #: layer -> float64 [C, Hq] recall / density of every candidate (for plots and inspection).
    recall: dict[int, torch.Tensor]
    density: dict[int, torch.Tensor]
    skipped_layers: dict[int, str]
    capture_s: float = 0.0
    score_s: float = 0.0

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for h in self.heads:
            out[h.pattern.kind] += 1
        return out

    @property
    def mean_recall(self) -> float:
        return sum(h.recall for h in self.heads) / max(1, len(self.heads))

    @property
    def mean_density(self) -> float:
        return sum(h.density for h in self.heads) / max(1, len(self.heads))

    def table(self, per_layer: bool = True) -> str:
        """The summary: heads per pattern kind with mean recall / density, top patterns, layers."""
        lines = [f"pattern search: {self.model}",
                 f"  {self.n} tokens, budget {self.budget:g} of the causal square, scored on the last "
                 f"{self.score_queries} + {self.sample_queries} sampled queries, seed {self.seed}, "
                 f"{len(self.candidates)} candidates per head",
                 f"  capture {self.capture_s:.1f} s, scoring {self.score_s:.1f} s", ""]
        fmt = "{:<16} {:>6} {:>12} {:>13}"
        lines.append(fmt.format("pattern", "heads", "mean recall", "mean density"))
        for kind in KINDS:
            hs = [h for h in self.heads if h.pattern.kind == kind]
            if hs:
                lines.append(fmt.format(kind, len(hs), f"{sum(h.recall for h in hs) / len(hs):.4f}",
                                        f"{sum(h.density for h in hs) / len(hs):.4f}"))
        lines.append(fmt.format("all", len(self.heads), f"{self.mean_recall:.4f}", f"{self.mean_density:.4f}"))
        over = sum(h.density > self.budget for h in self.heads)
        lines.append(f"  min recall {min((h.recall for h in self.heads), default=0):.4f}; "
                     f"{over} head(s) over budget (no candidate fitted)")
        by_pattern: dict[str, int] = {}
        for h in self.heads:
            by_pattern[h.pattern.describe()] = by_pattern.get(h.pattern.describe(), 0) + 1
        top = sorted(by_pattern.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("  chosen: " + ", ".join(f"{p} x{c}" for p, c in top))
        if self.skipped_layers:
            lines.append("  not searched (left to the config default, dense): " + "; ".join(
                f"layer {l}: {r}" for l, r in sorted(self.skipped_layers.items())))
        if per_layer:
            lines += ["", "{:<6} {:>8} {:>9}  {}".format("layer", "recall", "density", "patterns (per head)")]
            for layer in sorted({h.layer for h in self.heads}):
                hs = sorted((h for h in self.heads if h.layer == layer), key=lambda h: h.head)
                lines.append("{:<6} {:>8.4f} {:>9.4f}  {}".format(
                    layer, sum(h.recall for h in hs) / len(hs), sum(h.density for h in hs) / len(hs),
                    " ".join(h.pattern.describe() for h in hs)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        """Per-head recall and density (the config only keeps recall, as ``score``)."""
        return {"model": self.model, "n": self.n, "budget": self.budget, "seed": self.seed,
                "score_queries": self.score_queries, "sample_queries": self.sample_queries,
                "mean_recall": self.mean_recall, "mean_density": self.mean_density,
                "counts": self.counts(),
                "heads": [{"layer": h.layer, "head": h.head, "pattern": h.pattern.describe(),
                           "recall": round(h.recall, 6), "density": round(h.density, 6)}
                          for h in self.heads]}


def model_name(model) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    if name:
        name = name.rstrip("/").split("/")[-1]
    return name or type(model).__name__


def search_config(model, input_ids: torch.Tensor, *, budget: float = 0.3, score_queries: int = 256,
                  sample_queries: int = 128, seed: int = 0, progress: bool = True,
                  candidates: Sequence[HeadPattern] | None = None, min_recall: float = 0.0,
                  name: str | None = None) -> tuple[SparseConfig, SearchReport]:
    """Search a per-head pattern for every layer the backend rewrites; returns (config, report).

    ``input_ids`` ``[1, n]``: the calibration prompt (see :func:`.prompt.calibration_ids`).
    ``budget``: the largest density (share of the causal square) a chosen pattern may compute.
    ``score_queries``: recall is measured on the last this many queries, plus
    ``sample_queries`` earlier ones drawn with ``seed``. ``candidates``: default
    :func:`.candidates.candidate_patterns` at the prompt's length. ``min_recall`` > 0: heads whose
    best fitting pattern keeps less than that go dense. Deterministic for a fixed seed.
    """
    from tqdm.auto import tqdm

    if not 0 < budget:
        raise ValueError(f"budget must be > 0, got {budget}")
    n = int(input_ids.shape[-1])
    cands = list(candidates) if candidates is not None else candidate_patterns(n)
    if not cands:
        raise ValueError("no candidate patterns")
    dense_index = next((c for c, p in enumerate(cands) if p.kind == "dense"), None)
    if min_recall > 0 and dense_index is None:
        cands.append(HeadPattern("dense"))
        dense_index = len(cands) - 1
    name = name or model_name(model)

    t0 = time.perf_counter()
    cap = capture_qk(model, input_ids)
    t1 = time.perf_counter()
    rows = score_rows(n, score_queries, sample_queries, seed)
    heads: list[HeadResult] = []
    recalls, densities = {}, {}
    chosen: dict[int, dict[int, HeadPattern]] = {}
    scores: dict[int, dict[int, float]] = {}
    with torch.no_grad():
        for layer in tqdm(cap.layers, desc="search", unit="layer", disable=not progress):
            q, k, scale = cap.q[layer], cap.k[layer], cap.scale[layer]
            probs = dense_probs(q, k, rows, scale)
            rec, den = score_candidates(q, k, cands, rows=rows, scale=scale, probs=probs)
            recalls[layer], densities[layer] = rec, den
            pick = choose(rec, den, budget, min_recall=min_recall, dense_index=dense_index)
            chosen[layer], scores[layer] = {}, {}
            for h, c in enumerate(pick):
                chosen[layer][h] = cands[c]
                scores[layer][h] = round(float(rec[c, h]), 5)
                heads.append(HeadResult(layer, h, cands[c], float(rec[c, h]), float(den[c, h])))
            del cap.q[layer], cap.k[layer], probs      # free as we go
    t2 = time.perf_counter()

    num_heads = max(h.head for h in heads) + 1
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers <= max(chosen):
        num_layers = max(chosen) + 1
    report = SearchReport(model=name, n=n, budget=budget, seed=seed, score_queries=min(score_queries, n),
                          sample_queries=int(len(rows) - min(score_queries, n)), candidates=cands,
                          heads=heads, recall=recalls, density=densities,
                          skipped_layers=dict(cap.dense_layers), capture_s=t1 - t0, score_s=t2 - t1)
    text = (f"{name}, searched by mi_compile.search at {n} tokens, budget {budget:g}, seed {seed}: "
            f"mean recall {report.mean_recall:.4f}, mean density {report.mean_density:.4f}")
    config = SparseConfig(source="<search>", num_layers=num_layers, num_heads=num_heads, layers=chosen,
                          default=HeadPattern("dense"), scores=scores, model=text)
    return config, report
