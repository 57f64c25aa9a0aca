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
    allocate: str = "head"

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
                 f"  {self.n} tokens, budget {self.budget:g} of the causal square "
                 f"({'mean over heads' if self.allocate == 'global' else 'per head'}), scored on the last "
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
        if self.allocate == "global":
            lines.append(f"  min recall {min((h.recall for h in self.heads), default=0):.4f}; budget shared by all "
                         f"heads: mean density {self.mean_density:.4f} <= {self.budget:g}")
        else:
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
                "allocate": self.allocate,
                "heads": [{"layer": h.layer, "head": h.head, "pattern": h.pattern.describe(),
                           "recall": round(h.recall, 6), "density": round(h.density, 6)}
                          for h in self.heads],
                # every candidate's score, so the choice can be redone without the model
                # (``python -m mi_compile search --from-report``)
                "candidates": [p.encode() for p in self.candidates],     # HeadPattern.encode ints
                "skipped_layers": {str(l): r for l, r in self.skipped_layers.items()},
                "scores": {str(l): {"recall": [[round(float(x), 6) for x in row] for row in self.recall[l]],
                                    "density": [[round(float(x), 6) for x in row] for row in self.density[l]]}
                           for l in sorted(self.recall)}}

    @classmethod
    def from_json(cls, data: dict) -> "SearchReport":
        """A scored search back from :meth:`to_json` (``heads`` empty: choose again)."""
        if "scores" not in data or "candidates" not in data:
            raise ValueError("this search report has no per-candidate scores (written before they were "
                             "kept); run the search again")
        cands = [HeadPattern.decode(c) for c in data["candidates"]]
        recall = {int(l): torch.tensor(v["recall"], dtype=torch.float64) for l, v in data["scores"].items()}
        density = {int(l): torch.tensor(v["density"], dtype=torch.float64) for l, v in data["scores"].items()}
        return cls(model=data["model"], n=int(data["n"]), budget=float(data["budget"]), seed=int(data["seed"]),
                   score_queries=int(data["score_queries"]), sample_queries=int(data["sample_queries"]),
                   candidates=cands, heads=[], recall=recall, density=density,
                   skipped_layers={int(l): r for l, r in data.get("skipped_layers", {}).items()})


def model_name(model) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    if name:
        name = name.rstrip("/").split("/")[-1]
    return name or type(model).__name__


def search_config(model, input_ids: torch.Tensor, *, budget: float = 0.3, score_queries: int = 256,
                  sample_queries: int = 128, seed: int = 0, progress: bool = True,
                  candidates: Sequence[HeadPattern] | None = None, min_recall: float = 0.0,
                  name: str | None = None, allocate: str = "head") -> tuple[SparseConfig, SearchReport]:
    """Search a per-head pattern for every layer the backend rewrites; returns (config, report).

    ``input_ids`` ``[1, n]``: the calibration prompt (see :func:`.prompt.calibration_ids`).
    ``budget``: the largest density (share of the causal square) a chosen pattern may compute.
    ``score_queries``: recall is measured on the last this many queries, plus
    ``sample_queries`` earlier ones drawn with ``seed``. ``allocate``: see :func:`choose_config`. ``candidates``: default
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
    if min_recall > 0 and not any(p.kind == "dense" for p in cands):
        cands.append(HeadPattern("dense"))
    name = name or model_name(model)

    t0 = time.perf_counter()
    cap = capture_qk(model, input_ids)
    t1 = time.perf_counter()
    rows = score_rows(n, score_queries, sample_queries, seed)
    recalls, densities = {}, {}
    with torch.no_grad():
        for layer in tqdm(cap.layers, desc="search", unit="layer", disable=not progress):
            q, k, scale = cap.q[layer], cap.k[layer], cap.scale[layer]
            probs = dense_probs(q, k, rows, scale)
            recalls[layer], densities[layer] = score_candidates(q, k, cands, rows=rows, scale=scale, probs=probs)
            del cap.q[layer], cap.k[layer], probs      # free as we go
    t2 = time.perf_counter()

    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    scored = SearchReport(model=name, n=n, budget=budget, seed=seed, score_queries=min(score_queries, n),
                          sample_queries=int(len(rows) - min(score_queries, n)), candidates=cands,
                          heads=[], recall=recalls, density=densities,
                          skipped_layers=dict(cap.dense_layers), capture_s=t1 - t0, score_s=t2 - t1)
    return choose_config(scored, budget, min_recall=min_recall, num_layers=num_layers, allocate=allocate)


def choose_config(scored: SearchReport, budget: float, *, min_recall: float = 0.0,
                  num_layers: int | None = None, allocate: str = "head") -> tuple[SparseConfig, SearchReport]:
    """Pick every head's pattern from an already scored search at ``budget``.

    ``allocate="head"``: ``budget`` caps every head's density (:func:`.score.choose`).
    ``allocate="global"``: ``budget`` caps the *mean* density over all searched heads, spent
    where it keeps the most attention mass (:func:`allocate_globally`): heads that are easy to
    approximate get cheap patterns, hard ones (often the first layers) up to dense.

    Scoring (capture + recall/density of every candidate) is the expensive part of a search;
    the choice is cheap, so one scored search gives the config of any budget (the CLI's
    ``--also-budgets`` writes several, for a density/accuracy trade-off)."""
    if not 0 < budget:
        raise ValueError(f"budget must be > 0, got {budget}")
    cands = list(scored.candidates)
    dense_index = next((c for c, p in enumerate(cands) if p.kind == "dense"), None)
    if min_recall > 0 and dense_index is None:
        raise ValueError("min_recall needs a dense candidate among the scored ones")
    heads: list[HeadResult] = []
    chosen: dict[int, dict[int, HeadPattern]] = {}
    scores: dict[int, dict[int, float]] = {}
    if allocate not in ("head", "global"):
        raise ValueError(f"allocate must be 'head' or 'global', got {allocate!r}")
    picks = (allocate_globally(scored.recall, scored.density, budget) if allocate == "global" else
             {l: choose(scored.recall[l], scored.density[l], budget, min_recall=min_recall,
                        dense_index=dense_index) for l in scored.recall})
    for layer in sorted(scored.recall):
        rec, den = scored.recall[layer], scored.density[layer]
        pick = picks[layer]
        chosen[layer], scores[layer] = {}, {}
        for h, c in enumerate(pick):
            chosen[layer][h] = cands[c]
            scores[layer][h] = round(float(rec[c, h]), 5)
            heads.append(HeadResult(layer, h, cands[c], float(rec[c, h]), float(den[c, h])))

    num_heads = max(h.head for h in heads) + 1
    if not isinstance(num_layers, int) or num_layers <= max(chosen):
        num_layers = max(chosen) + 1
    report = dataclasses.replace(scored, budget=budget, heads=heads, allocate=allocate)
    name, n, seed = scored.model, scored.n, scored.seed
    text = (f"{name}, searched by mi_compile.search at {n} tokens, budget {budget:g} "
            f"({'mean over heads' if allocate == 'global' else 'per head'}), seed {seed}: "
            f"mean recall {report.mean_recall:.4f}, mean density {report.mean_density:.4f}")
    config = SparseConfig(source="<search>", num_layers=num_layers, num_heads=num_heads, layers=chosen,
                          default=HeadPattern("dense"), scores=scores, model=text)
    return config, report


def allocate_globally(recall: dict[int, torch.Tensor], density: dict[int, torch.Tensor],
                      budget: float, iterations: int = 60) -> dict[int, list[int]]:
    """Per layer, the chosen candidate per head, maximising the summed recall of all heads
    under ``mean density <= budget`` (``recall``/``density``: layer -> ``[C, H]``).

    Lagrangian relaxation: for a price ``lam`` per unit of density every head independently
    takes ``argmax(recall - lam * density)`` (ties: the lower density); the mean density falls
    as ``lam`` rises, so a bisection finds the smallest price that fits the budget. This is the
    exact optimum on the convex hull of each head's (density, recall) points, which is what a
    budget shared by many heads needs. If even the sparsest choice exceeds the budget, that
    choice is returned.
    """
    layers = sorted(recall)
    R = torch.cat([recall[l].double() for l in layers], 1)          # [C, all heads]
    Dn = torch.cat([density[l].double() for l in layers], 1)

    def pick(lam: float) -> torch.Tensor:
        value = R - lam * Dn
        best = value.max(0).values
        # among the (near-)best, the lowest density
        cost = torch.where(value >= best - 1e-12, Dn, torch.full_like(Dn, float("inf")))
        return cost.argmin(0)

    def mean_density(choice: torch.Tensor) -> float:
        return float(Dn.gather(0, choice[None]).mean())

    lo, hi = 0.0, 1.0
    while mean_density(pick(hi)) > budget and hi < 1e9:
        hi *= 4
    if mean_density(pick(lo)) <= budget:
        hi = lo
    for _ in range(iterations):
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
        mid = (lo + hi) / 2
        if mean_density(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    choice = pick(hi).tolist()
    out, at = {}, 0
    for l in layers:
        h = recall[l].shape[1]
        out[l] = choice[at:at + h]
        at += h
    return out
