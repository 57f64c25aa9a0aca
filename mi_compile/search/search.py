"""The offline per-head pattern search: capture q/k, score every candidate, choose, write a config.

    config, report = search_config(model, input_ids, budget=0.3)
    config.save("searched.json")          # mi-compile/v1, read back by load_config / the backend
    print(report.table())

Per head, the chosen pattern is the candidate with the highest recall (share of dense
attention mass kept, :mod:`.score`) whose density (share of the causal square computed) is at
most ``budget``; see :func:`.score.choose` for ties and the fallbacks. A pattern whose per-input
estimate costs kernel time of its own (XAttention's strided logits) is charged that too, in the
same units (:func:`estimate_costs`), so the budget bounds time and not only the tiles.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import torch

from ..config import SparseConfig
from ..patterns import registry
from ..patterns.spec import HeadPattern
from .candidates import candidate_patterns
from .capture import capture_qk
from .score import choose, dense_probs, score_candidates, score_rows

#: The pattern kinds registered at import (summaries use :func:`registry.names`, which sees
#: later ones too).
KINDS = registry.names()


@dataclasses.dataclass
class HeadResult:
    layer: int
    head: int
    pattern: HeadPattern
    recall: float
    density: float
    error: float | None = None     # relative squared output error (None: not scored)
    #: the pattern's per-input estimate, charged like density (PatternSpec.estimate_cost)
    estimate: float = 0.0


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
    #: layer -> float64 [C, Hq] relative squared output error (empty: not scored, older reports)
    error: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    capture_s: float = 0.0
    score_s: float = 0.0
    allocate: str = "head"
    objective: str = "mass"
    early_weight: float = 0.0
    #: calibration prompt seeds whose scores are averaged here (:meth:`average`); [] means [seed]
    seeds: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.seeds:
            self.seeds = [int(self.seed)]

    # ------------------------------------------------------------------ summaries
    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in registry.names()}
        for h in self.heads:
            out[h.pattern.kind] += 1
        return out

    @property
    def mean_recall(self) -> float:
        return sum(h.recall for h in self.heads) / max(1, len(self.heads))

    @property
    def mean_density(self) -> float:
        return sum(h.density for h in self.heads) / max(1, len(self.heads))

    @property
    def mean_charged(self) -> float:
        """Mean computed density plus the estimates' cost: what the budget bounds."""
        return sum(h.density + h.estimate for h in self.heads) / max(1, len(self.heads))

    @property
    def mean_error(self) -> float | None:
        """Mean relative squared output error of the chosen patterns (None: not scored)."""
        errs = [h.error for h in self.heads if h.error is not None]
        return sum(errs) / len(errs) if errs and len(errs) == len(self.heads) else None

    def seeds_text(self) -> str:
        if len(self.seeds) == 1:
            return f"seed {self.seeds[0]}"
        return "mean of the calibration prompts of seeds " + ",".join(map(str, self.seeds))

    def table(self, per_layer: bool = True) -> str:
        """The summary: heads per pattern kind with mean recall / density, top patterns, layers."""
        lines = [f"pattern search: {self.model}",
                 f"  {self.n} tokens, budget {self.budget:g} of the causal square "
                 f"({'per head' if self.allocate != 'global' else 'mean over heads, objective ' + self.objective + (f', early weight {self.early_weight:g}' if self.early_weight else '')}), scored on the last "
                 f"{self.score_queries} + {self.sample_queries} sampled queries, {self.seeds_text()}, "
                 f"{len(self.candidates)} candidates per head",
                 f"  capture {self.capture_s:.1f} s, scoring {self.score_s:.1f} s", ""]
        fmt = "{:<16} {:>6} {:>12} {:>13}"
        lines.append(fmt.format("pattern", "heads", "mean recall", "mean density"))
        for kind in registry.names():
            hs = [h for h in self.heads if h.pattern.kind == kind]
            if hs:
                lines.append(fmt.format(kind, len(hs), f"{sum(h.recall for h in hs) / len(hs):.4f}",
                                        f"{sum(h.density for h in hs) / len(hs):.4f}"))
        lines.append(fmt.format("all", len(self.heads), f"{self.mean_recall:.4f}", f"{self.mean_density:.4f}"))
        if self.mean_error is not None:
            lines.append(f"  mean relative squared output error {self.mean_error:.3g} (max "
                         f"{max(h.error for h in self.heads):.3g})")
        estimates = self.mean_charged - self.mean_density
        charged = f" + estimates {estimates:.4f}" if estimates > 0 else ""
        if self.allocate == "global":
            within = self.mean_charged <= self.budget + 1e-12
            lines.append(f"  min recall {min((h.recall for h in self.heads), default=0):.4f}; budget shared by all "
                         f"heads: mean density {self.mean_density:.4f}{charged} "
                         + (f"<= {self.budget:g}" if within else
                            f"> {self.budget:g} (even the cheapest candidates exceed the budget)"))
        else:
            over = sum(h.density + h.estimate > self.budget for h in self.heads)
            lines.append(f"  min recall {min((h.recall for h in self.heads), default=0):.4f}; mean density "
                         f"{self.mean_density:.4f}{charged}; {over} head(s) over budget (no candidate fitted)")
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
                "mean_recall": self.mean_recall, "mean_density": self.mean_density, "mean_error": self.mean_error,
                "counts": self.counts(),
                "allocate": self.allocate, "objective": self.objective, "early_weight": self.early_weight,
                "seeds": list(self.seeds),
                "capture_s": round(self.capture_s, 1), "score_s": round(self.score_s, 1),
                "heads": [{"layer": h.layer, "head": h.head, "pattern": h.pattern.describe(),
                           "recall": round(h.recall, 6), "density": round(h.density, 6),
                           "estimate": round(h.estimate, 6),
                           **({} if h.error is None else {"error": float(f"{h.error:.4g}")})}
                          for h in self.heads],
                # every candidate's score, so the choice can be redone without the model
                # (``python -m mi_compile search --from-report``)
                "candidates": [p.encode() for p in self.candidates],     # HeadPattern.encode ints
                "skipped_layers": {str(l): r for l, r in self.skipped_layers.items()},
                "scores": {str(l): {"recall": [[round(float(x), 6) for x in row] for row in self.recall[l]],
                                    "density": [[round(float(x), 6) for x in row] for row in self.density[l]],
                                    **({"error": [[float(f"{float(x):.4g}") for x in row] for row in self.error[l]]}
                                       if l in self.error else {})}
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
        error = {int(l): torch.tensor(v["error"], dtype=torch.float64) for l, v in data["scores"].items()
                 if "error" in v}
        return cls(model=data["model"], n=int(data["n"]), budget=float(data["budget"]), seed=int(data["seed"]),
                   score_queries=int(data["score_queries"]), sample_queries=int(data["sample_queries"]),
                   candidates=cands, heads=[], recall=recall, density=density, error=error,
                   skipped_layers={int(l): r for l, r in data.get("skipped_layers", {}).items()},
                   seeds=[int(x) for x in data.get("seeds", [])],
                   capture_s=float(data.get("capture_s", 0.0)), score_s=float(data.get("score_s", 0.0)))

    @classmethod
    def average(cls, reports: Sequence["SearchReport"]) -> "SearchReport":
        """One scored search from several on different calibration prompts (``heads`` empty:
        choose again). Every candidate's recall, density and output error are averaged over
        the prompts, so the choice favours patterns that hold on all of them rather than the
        quirks of one prompt (a vertical-slash head's density and recall vary per input).

        The reports must come from the same model, prompt length, candidates and layers."""
        reports = list(reports)
        if not reports:
            raise ValueError("no search reports to average")
        first = reports[0]
        for r in reports[1:]:
            for what, a, b in (("prompt length", first.n, r.n), ("model", first.model, r.model),
                               ("candidates", [c.describe() for c in first.candidates],
                                [c.describe() for c in r.candidates]),
                               ("scored layers", sorted(first.recall), sorted(r.recall))):
                if a != b:
                    raise ValueError(f"cannot average search reports with different {what}")
        has_error = all(set(r.error) == set(first.recall) for r in reports)

        def mean(field: str) -> dict[int, torch.Tensor]:
            return {l: sum(getattr(r, field)[l] for r in reports) / len(reports) for l in first.recall}

        return dataclasses.replace(
            first, heads=[], recall=mean("recall"), density=mean("density"),
            error=mean("error") if has_error else {}, seeds=[s for r in reports for s in r.seeds],
            capture_s=sum(r.capture_s for r in reports), score_s=sum(r.score_s for r in reports))


def model_name(model) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", "") or ""
    if name:
        name = name.rstrip("/").split("/")[-1]
    return name or type(model).__name__


def search_config(model, input_ids: torch.Tensor, *, budget: float = 0.3, score_queries: int = 256,
                  sample_queries: int = 128, seed: int = 0, progress: bool = True,
                  candidates: Sequence[HeadPattern] | None = None, min_recall: float = 0.0,
                  name: str | None = None, allocate: str = "head", objective: str = "mass",
                  early_weight: float = 0.0) -> tuple[SparseConfig, SearchReport]:
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
    if min_recall > 0 and not any(registry.get(p.kind).full for p in cands):
        cands.append(HeadPattern("dense"))
    name = name or model_name(model)

    t0 = time.perf_counter()
    cap = capture_qk(model, input_ids)
    t1 = time.perf_counter()
    rows = score_rows(n, score_queries, sample_queries, seed)
    recalls, densities, errors = {}, {}, {}
    with torch.no_grad():
        for layer in tqdm(cap.layers, desc="search", unit="layer", disable=not progress):
            q, k, scale = cap.q[layer], cap.k[layer], cap.scale[layer]
            probs = dense_probs(q, k, rows, scale)
            recalls[layer], densities[layer], errors[layer] = score_candidates(
                q, k, cands, rows=rows, scale=scale, probs=probs, v=cap.v[layer])
            del cap.q[layer], cap.k[layer], cap.v[layer], probs      # free as we go
    t2 = time.perf_counter()

    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    scored = SearchReport(model=name, n=n, budget=budget, seed=seed, score_queries=min(score_queries, n),
                          sample_queries=int(len(rows) - min(score_queries, n)), candidates=cands,
                          heads=[], recall=recalls, density=densities, error=errors,
                          skipped_layers=dict(cap.dense_layers), capture_s=t1 - t0, score_s=t2 - t1)
    return choose_config(scored, budget, min_recall=min_recall, num_layers=num_layers, allocate=allocate,
                         objective=objective, early_weight=early_weight)


def choose_config(scored: SearchReport, budget: float, *, min_recall: float = 0.0,
                  num_layers: int | None = None, allocate: str = "head", objective: str = "mass",
                  early_weight: float = 0.0) -> tuple[SparseConfig, SearchReport]:
    """Pick every head's pattern from an already scored search at ``budget``.

    ``allocate="head"``: ``budget`` caps every head's density (:func:`.score.choose`).
    ``allocate="global"``: ``budget`` caps the *mean* density over all searched heads, spent
    where it keeps the most attention mass (:func:`allocate_globally`): heads that are easy to
    approximate get cheap patterns, hard ones (often the first layers) up to dense;
    ``objective`` and ``early_weight`` say what "most" means (:func:`allocation_utility`).
    ``min_recall`` then is a floor on every head: candidates keeping less are not considered
    (a head where none reaches it keeps its best-recall candidate), so no head is sacrificed
    wholesale to pay for the others.

    Scoring (capture + recall/density of every candidate) is the expensive part of a search;
    the choice is cheap, so one scored search gives the config of any budget (the CLI's
    ``--also-budgets`` writes several, for a density/accuracy trade-off)."""
    if not 0 < budget:
        raise ValueError(f"budget must be > 0, got {budget}")
    cands = list(scored.candidates)
    dense_index = next((c for c, p in enumerate(cands) if registry.get(p.kind).full), None)
    if min_recall > 0 and dense_index is None:
        raise ValueError("min_recall needs a dense candidate among the scored ones")
    heads: list[HeadResult] = []
    chosen: dict[int, dict[int, HeadPattern]] = {}
    scores: dict[int, dict[int, float]] = {}
    if allocate not in ("head", "global"):
        raise ValueError(f"allocate must be 'head' or 'global', got {allocate!r}")
    if allocate == "head" and (objective != "mass" or early_weight):
        raise ValueError("objective / early_weight apply to allocate='global' only")
    estimate = estimate_costs(cands, scored.n)                                   # [C, 1]
    charged = {l: d + estimate.to(d.dtype) for l, d in scored.density.items()}
    picks = (allocate_globally(allocation_utility(scored.recall, objective, early_weight, scored.error),
                               charged, budget, allowed=recall_floor(scored.recall, min_recall))
             if allocate == "global" else
             {l: choose(scored.recall[l], charged[l], budget, min_recall=min_recall,
                        dense_index=dense_index) for l in scored.recall})
    for layer in sorted(scored.recall):
        rec, den = scored.recall[layer], scored.density[layer]
        pick = picks[layer]
        chosen[layer], scores[layer] = {}, {}
        for h, c in enumerate(pick):
            chosen[layer][h] = cands[c]
            scores[layer][h] = round(float(rec[c, h]), 5)
            err = scored.error.get(layer)
            heads.append(HeadResult(layer, h, cands[c], float(rec[c, h]), float(den[c, h]),
                                    None if err is None else float(err[c, h]), float(estimate[c, 0])))

    num_heads = max(h.head for h in heads) + 1
    if not isinstance(num_layers, int) or num_layers <= max(chosen):
        num_layers = max(chosen) + 1
    report = dataclasses.replace(scored, budget=budget, heads=heads, allocate=allocate,
                                 objective=objective, early_weight=float(early_weight))
    name, n, seed = scored.model, scored.n, scored.seed
    how = "per head" if allocate == "head" else "mean over heads" + (
        f", objective {objective}" if objective != "mass" else "") + (
        f", early weight {early_weight:g}" if early_weight else "")
    text = (f"{name}, searched by mi_compile.search at {n} tokens, budget {budget:g} "
            f"({how}), {scored.seeds_text()}: "
            f"mean recall {report.mean_recall:.4f}, mean density {report.mean_density:.4f}"
            + (f" (+ estimates {report.mean_charged - report.mean_density:.4f})"
               if report.mean_charged > report.mean_density else ""))
    config = SparseConfig(source="<search>", num_layers=num_layers, num_heads=num_heads, layers=chosen,
                          default=HeadPattern("dense"), scores=scores, model=text, length=int(n))
    return config, report


def estimate_costs(candidates: Sequence[HeadPattern], n: int) -> torch.Tensor:
    """float64 ``[C, 1]``: each candidate's :meth:`~mi_compile.patterns.registry.PatternSpec.estimate_cost`
    at length ``n``, added to its computed density wherever the search compares costs."""
    return torch.tensor([[registry.get(p.kind).estimate_cost(p, n)] for p in candidates], dtype=torch.float64)


OBJECTIVES = ("mass", "squared-miss", "output")


def allocation_utility(recall: dict[int, torch.Tensor], objective: str = "mass",
                       early_weight: float = 0.0,
                       error: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """What the global allocation maximises, per layer ``[C, H]``, summed over heads.

    ``objective="mass"``: the attention mass kept (recall). ``"squared-miss"``: minus the
    squared mass missed, ``-(1 - recall)**2``: a head that misses 4% costs four times one that
    misses 2%, so the budget goes first to the worst-approximated heads instead of evening out
    the mean (one badly served head can flip a token on its own). ``"output"``: minus the
    relative squared error of the head's attention output (``error``, from
    :func:`.score.score_candidates` with ``v``): what the next layer actually receives, values
    included -- closest to what MInference fits its configs on.

    ``early_weight`` w >= 0 scales layer ``l`` of ``L`` by ``1 + w * (L - 1 - l) / (L - 1)``:
    an error made early passes through every later layer, so with w > 0 the first layers get
    more of the budget (w = 1: the first layer counts twice the last)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if early_weight < 0:
        raise ValueError(f"early_weight must be >= 0, got {early_weight}")
    if objective == "output" and not (error and set(error) >= set(recall)):
        raise ValueError("objective 'output' needs the candidates' output errors: search again (reports "
                         "written before output errors were scored do not have them)")
    layers = sorted(recall)
    first, last = layers[0], layers[-1]
    out = {}
    for l in layers:
        r = recall[l].double()
        if objective == "mass":
            u = r
        elif objective == "squared-miss":
            u = -(1.0 - r).clamp(min=0) ** 2
        else:
            u = -error[l].double()
        w = 1.0 + early_weight * ((last - l) / (last - first) if last > first else 0.0)
        out[l] = w * u
    return out


def recall_floor(recall: dict[int, torch.Tensor], min_recall: float) -> dict[int, torch.Tensor] | None:
    """Per layer, bool ``[C, H]``: the candidates whose recall reaches ``min_recall`` (each
    head's best-recall candidate always counts, so no head is left without one); None for 0."""
    if min_recall <= 0:
        return None
    out = {}
    for l, r in recall.items():
        ok = r >= min_recall
        best = r.argmax(0)
        ok[best, torch.arange(r.shape[1])] = True
        out[l] = ok
    return out


def allocate_globally(recall: dict[int, torch.Tensor], density: dict[int, torch.Tensor],
                      budget: float, iterations: int = 60,
                      allowed: dict[int, torch.Tensor] | None = None) -> dict[int, list[int]]:
    """Per layer, the chosen candidate per head, maximising the summed recall of all heads
    under ``mean density <= budget`` (``recall``/``density``: layer -> ``[C, H]``; any other
    per-candidate utility, e.g. :func:`allocation_utility`, can stand in for recall).

    Lagrangian relaxation: for a price ``lam`` per unit of density every head independently
    takes ``argmax(recall - lam * density)`` (ties: the lower density); the mean density falls
    as ``lam`` rises, so a bisection finds the smallest price that fits the budget. This is the
    exact optimum on the convex hull of each head's (density, recall) points, which is what a
    budget shared by many heads needs. If even the sparsest choice exceeds the budget, that
    choice is returned. ``allowed`` (layer -> bool ``[C, H]``, e.g. :func:`recall_floor`)
    restricts each head to some candidates.
    """
    layers = sorted(recall)
    R = torch.cat([recall[l].double() for l in layers], 1)          # [C, all heads]
    Dn = torch.cat([density[l].double() for l in layers], 1)
    if allowed is not None:
        ok = torch.cat([allowed[l] for l in layers], 1)
        R = torch.where(ok, R, torch.full_like(R, -1e30))

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
