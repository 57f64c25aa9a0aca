"""Accuracy harness: run the synthetic tasks and a natural-text document through the backend
in several modes (configs) and compare them.

A *mode* is a per-head config given to ``mi_compile.backend({"config": ..., "min_seq_len": 0})``:

``dense``     every head dense (the reference: same graph, same op, full causal attention)
``default``   ``vertical_slash(1000, 6096)`` everywhere (MInference's default budget)
``searched``  a config file (default :data:`SEARCHED_DEFAULT`, when it exists)
extra         ``--configs name=path`` (a JSON config) or ``name=<inline spec>``, e.g.
              ``vs=vertical_slash:100:500``, ``ashape=a_shape:64:512``, ``bs=block_sparse:8``

Per mode the decoder (``model.model``) is compiled with ``torch.compile(..., dynamic=True)``
and the backend, after ``torch._dynamo.reset()``. Each prompt is prefilled through the compiled
decoder (a fresh ``DynamicCache``; the prefill goes through ``torch.ops.mi_compile.sparse_attention``)
and the answer is decoded greedily, one token at a time, by the eager model on that cache --
the same computation as the compiled model's decode steps, which the backend leaves dense
(one query token), without compiling a second graph per mode.

Measured per mode:

* accuracy per task and length (:func:`mi_compile.eval.tasks.score` of the greedy continuation);
* the attention density actually computed: :func:`mi_compile.kernels.op.observe_attention`
  sees every op call and :func:`mi_compile.sparse.selection_density` counts the (query, key)
  pairs the layer's patterns select on those very q/k; the mean over layers and heads (a layer
  the backend left dense counts as 1.0; an all-dense layer is 1.0 without counting);
* on a natural-text document (:func:`mi_compile.eval.tasks.natural_document`) of each length:
  top-1 next-token agreement with the dense mode and mean ``KL(dense || mode)`` over the
  positions after the first ``natural_skip`` tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from . import tasks as T

# 8K; scores averaged over 7 calibration prompts (seeds 0-6); global budget 0.385, objective output,
# early weight 1 (benchmarks/NOTES.md, "Accuracy at 8K", step C)
SEARCHED_DEFAULT = "benchmarks/configs/smollm2_searched_8k_avg7.json"
FORMAT = "mi-compile/v1"
DENSE_CONFIG = {"format": FORMAT, "default": {"pattern": "dense"}}
DEFAULT_CONFIG = {"format": FORMAT, "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096}}
_INLINE_PARAMS = {"dense": (), "a_shape": ("sink", "local"), "vertical_slash": ("vertical", "slash"),
                  "block_sparse": ("topk",)}


@dataclasses.dataclass
class Mode:
    name: str
    config: object        # dict or path, as the backend's "config" option takes it
    source: str           # where it came from, for the report


def parse_config_spec(spec: str):
    """A config path (existing file) or an inline ``pattern:p1:p2`` applied to every head."""
    if os.path.exists(spec):
        return str(spec), f"file {spec}"
    parts = spec.split(":")
    name, args = parts[0], parts[1:]
    if name not in _INLINE_PARAMS:
        raise ValueError(f"config {spec!r} is neither an existing file nor an inline spec "
                         f"({', '.join(f'{k}:' + ':'.join(v) for k, v in _INLINE_PARAMS.items())})")
    params = _INLINE_PARAMS[name]
    if len(args) != len(params):
        raise ValueError(f"inline config {spec!r}: {name} takes {len(params)} parameter(s) {params}")
    entry = {"pattern": name, **{p: int(a) for p, a in zip(params, args)}}
    return {"format": FORMAT, "default": entry}, f"inline {spec}"


def resolve_modes(names, extra: Optional[dict] = None, searched_path: Optional[str] = None):
    """``(modes, skipped)``: the :class:`Mode` list (dense first, always present: it is the
    reference for the natural-text comparison) and ``{name: why}`` for modes left out."""
    extra = dict(extra or {})
    modes, skipped = [], {}
    names = list(names)
    for n in extra:
        if n not in names:
            names.append(n)
    if "dense" not in names:
        names.insert(0, "dense")
    names = ["dense"] + [n for n in names if n != "dense"]
    for n in dict.fromkeys(names):
        if n in extra:
            cfg, src = parse_config_spec(extra[n])
            modes.append(Mode(n, cfg, src))
        elif n == "dense":
            modes.append(Mode(n, DENSE_CONFIG, "all heads dense"))
        elif n == "default":
            modes.append(Mode(n, DEFAULT_CONFIG, "vertical_slash(1000, 6096) everywhere"))
        elif n == "searched":
            path = searched_path or SEARCHED_DEFAULT
            if os.path.exists(path):
                modes.append(Mode(n, str(path), f"file {path}"))
            else:
                skipped[n] = f"{path} does not exist"
        else:
            raise ValueError(f"unknown mode {n!r}: use dense, default, searched or --configs {n}=...")
    return modes, skipped


# ----------------------------------------------------------------------------- one mode

class ModeRunner:
    """The model's decoder compiled with the backend for one mode, plus the density observer."""

    def __init__(self, model, mode: Mode, use_inductor: bool = True):
        import mi_compile
        from mi_compile.backend import MInferenceBackend

        torch._dynamo.reset()
        self.model, self.mode = model, mode
        self.backend = MInferenceBackend({"config": mode.config, "min_seq_len": 0}, use_inductor=use_inductor)
        self.decoder = torch.compile(model.model, backend=self.backend, dynamic=True)
        self.num_layers = model.config.num_hidden_layers
        self._heads: dict[int, list] = {}
        self._density: dict[int, float] = {}
        self.compile_s: Optional[float] = None
        self.observe_s = 0.0
        del mi_compile

    # -- density observer
    def _layer_heads(self, layer):
        if layer not in self._heads:
            for report in self.backend.reports:
                for site in report.sites:
                    if site.action == "sparse" and site.heads and site.layer is not None:
                        self._heads.setdefault(site.layer, site.heads)
        return self._heads.get(layer)

    def _observe(self, layer, q, k, v, key_padding_mask):
        from mi_compile.kernels.op import padding_to_ranges
        from mi_compile.sparse import selection_density

        from .fastref import fast_density

        t = time.perf_counter()
        heads = self._layer_heads(layer)
        if heads is None:
            raise RuntimeError(f"mode {self.mode.name}: no patterns found for layer {layer} in the backend's reports")
        if q.shape[-2] == 1 or all(h.kind == "dense" for h in heads):
            d = 1.0
        elif key_padding_mask is None:
            d = float(fast_density(q, k, heads).mean())      # == selection_density (tested)
        else:
            start, length = padding_to_ranges(key_padding_mask)
            d = float(selection_density(q, k, heads, start, length).mean())
        self._density[layer] = d
        self.observe_s += time.perf_counter() - t

    def prefill(self, ids: torch.Tensor):
        """Run the compiled decoder on ``ids`` (1 x n): ``(last_hidden_state, cache, info)``;
        ``info`` has the density (mean over all layers/heads), layers observed, seconds."""
        from transformers import DynamicCache

        from mi_compile.kernels.op import observe_attention

        self._density = {}
        cache = DynamicCache(config=self.model.config)
        t = time.perf_counter()
        obs0 = self.observe_s
        with torch.no_grad(), observe_attention(self._observe):
            out = self.decoder(input_ids=ids, past_key_values=cache, use_cache=True)
        wall = time.perf_counter() - t
        if self.compile_s is None:
            self.compile_s = wall
        per_layer = [self._density.get(i, 1.0) for i in range(self.num_layers)]
        info = dict(density=sum(per_layer) / len(per_layer), layers_observed=len(self._density),
                    prefill_s=wall - (self.observe_s - obs0), observe_s=self.observe_s - obs0)
        return out.last_hidden_state, out.past_key_values if out.past_key_values is not None else cache, info

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_ids=()):
        """Greedy continuation: prefill through the compiled decoder, then eager decode steps."""
        hidden, cache, info = self.prefill(ids)
        t = time.perf_counter()
        out_ids = []
        with torch.no_grad():
            logits = self.model.lm_head(hidden[:, -1:])
            for step in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                out_ids.append(nxt)
                if nxt in eos_ids or step == max_new_tokens - 1:
                    break
                logits = self.model(input_ids=torch.tensor([[nxt]], device=ids.device),
                                    past_key_values=cache, use_cache=True).logits
        info["decode_s"] = time.perf_counter() - t
        return out_ids, info


# ----------------------------------------------------------------------------- comparisons

def compare_logits(model, h_ref: torch.Tensor, h: torch.Tensor, skip: int, chunk: int = 512):
    """Top-1 agreement and mean KL(ref || other) of next-token distributions from final hidden
    states (``[1, n, d]``), over positions ``>= skip``, computed in chunks."""
    n = h_ref.shape[1]
    agree, kl, count = 0, 0.0, 0
    with torch.no_grad():
        for s in range(skip, n, chunk):
            e = min(n, s + chunk)
            lr = torch.log_softmax(model.lm_head(h_ref[:, s:e]).float(), -1)
            lo = torch.log_softmax(model.lm_head(h[:, s:e]).float(), -1)
            agree += int((lr.argmax(-1) == lo.argmax(-1)).sum())
            kl += float((lr.exp() * (lr - lo)).sum(-1).clamp_min(0).sum())
            count += e - s
    return dict(top1_agreement=agree / max(1, count), kl_mean=kl / max(1, count), positions=count)


# ----------------------------------------------------------------------------- the run

def run_eval(model, tokenizer, modes, lengths, examples: int, task_names=T.TASKS, *, seed: int = 0,
             natural: bool = True, natural_skip: int = 1024, natural_docs: int = 1, use_inductor: bool = True,
             out_path: Optional[str] = None, log=print, skipped_modes=None, meta_extra: Optional[dict] = None):
    """Run every mode over every (task, length) and the natural document; returns the report
    dict (written to ``out_path`` after each mode, so partial runs keep what they measured).

    ``natural_docs``: how many natural-text documents per length (seeds ``seed`` ... ``seed +
    natural_docs - 1``); top-1 / KL are reported per document and as their mean (and minimum),
    since one document's figure moves by about half a point from one text to the next."""
    device = next(model.parameters()).device
    eos_ids = {tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None})
    t0 = time.perf_counter()
    examples_by = {}
    for L in lengths:
        for task in task_names:
            examples_by[(task, L)] = T.make_examples(tokenizer, task, L, examples, seed=seed)
    if natural_docs < 1:
        raise ValueError(f"natural_docs must be >= 1, got {natural_docs}")
    doc_seeds = list(range(seed, seed + natural_docs))
    docs = {(L, d): torch.tensor([T.natural_document(tokenizer, L, seed=d)], device=device)
            for L in lengths for d in doc_seeds} if natural else {}
    report = dict(
        meta=dict(model=getattr(model.config, "_name_or_path", "") or model.config.model_type,
                  device=str(device), dtype=str(next(model.parameters()).dtype), torch=torch.__version__,
                  python=platform.python_version(), threads=torch.get_num_threads(),
                  lengths=list(lengths), examples=examples, tasks=list(task_names), seed=seed,
                  natural_skip=natural_skip, natural_doc_seeds=doc_seeds if natural else [], inductor=use_inductor,
                  cpu_impl=os.environ.get("MI_COMPILE_CPU_IMPL", "reference"),
                  started=time.strftime("%Y-%m-%d %H:%M:%S"), **(meta_extra or {})),
        modes={}, skipped_modes=dict(skipped_modes or {}), results=[], natural=[], summary={})
    ref_hidden = {}
    for mode in modes:
        log(f"== mode {mode.name} ({mode.source})")
        tm = time.perf_counter()
        runner = ModeRunner(model, mode, use_inductor=use_inductor)
        mrep = dict(source=mode.source, config=mode.config if isinstance(mode.config, str) else mode.config)
        for L in lengths:
            for d in doc_seeds if natural else ():
                hidden, _, info = runner.prefill(docs[L, d])
                if mode.name == "dense":
                    ref_hidden[L, d] = hidden
                cmp = compare_logits(model, ref_hidden[L, d], hidden, min(natural_skip, L - 1)) \
                    if (L, d) in ref_hidden else dict(top1_agreement=None, kl_mean=None, positions=0)
                row = dict(mode=mode.name, length=L, doc_seed=d, n_tokens=int(docs[L, d].shape[1]),
                           density=info["density"], prefill_s=info["prefill_s"], **cmp)
                report["natural"].append(row)
                log(f"   natural {L} doc {d}: density {row['density']:.3f} top1 {_fmt(row['top1_agreement'], '.4f')} "
                    f"KL {_fmt(row['kl_mean'], '.5f')} ({info['prefill_s']:.1f}s)")
            for task in task_names:
                rows = []
                for ex in examples_by[(task, L)]:
                    ids = tokenizer(ex.prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
                    out_ids, info = runner.generate(ids, ex.max_new_tokens, eos_ids)
                    text = tokenizer.decode(out_ids, skip_special_tokens=True)
                    s = T.score(ex, text)
                    rows.append(dict(index=ex.index, depth=ex.depth, needle_token_depth=ex.needle_token_depth,
                                     n_tokens=ex.n_tokens, answers=ex.answers, output=text, score=s, **info))
                    log(f"   {task:<9} {L:>6} #{ex.index} depth {ex.depth:.2f} score {s:.2f} "
                        f"density {info['density']:.3f} prefill {info['prefill_s']:.1f}s  {text.strip()[:60]!r}")
                report["results"].append(dict(
                    mode=mode.name, task=task, length=L, n=len(rows),
                    accuracy=sum(r["score"] for r in rows) / max(1, len(rows)),
                    density=sum(r["density"] for r in rows) / max(1, len(rows)),
                    prefill_s=sum(r["prefill_s"] for r in rows) / max(1, len(rows)),
                    examples=rows))
        mrep.update(compile_s=runner.compile_s, observe_s=runner.observe_s, wall_s=time.perf_counter() - tm,
                    sites=_site_summary(runner.backend))
        report["modes"][mode.name] = mrep
        report["summary"] = summarize(report)
        report["meta"]["wall_s"] = time.perf_counter() - t0
        if out_path:
            write_json(report, out_path)
    return report


def _site_summary(backend):
    rows = {}
    for r in backend.reports:
        for s in r.sites:
            if s.layer is not None and s.q_len != "1":
                rows.setdefault(s.layer, dict(action=s.action, patterns=s.pattern_summary(), reason=s.reason))
    return {str(k): v for k, v in sorted(rows.items())}


def summarize(report) -> dict:
    """``{mode: {length: {accuracy: mean over tasks, per-task accuracies, density, top1, kl}}}``."""
    out = {}
    for r in report["results"]:
        s = out.setdefault(r["mode"], {}).setdefault(str(r["length"]), {"tasks": {}, "_d": []})
        s["tasks"][r["task"]] = r["accuracy"]
        s["_d"] += [e["density"] for e in r["examples"]]
    by_key = {}
    for n in report["natural"]:
        by_key.setdefault((n["mode"], str(n["length"])), []).append(n)
    for (mode, L), rows in by_key.items():
        s = out.setdefault(mode, {}).setdefault(L, {"tasks": {}, "_d": []})
        top1 = [r["top1_agreement"] for r in rows if r["top1_agreement"] is not None]
        kl = [r["kl_mean"] for r in rows if r["kl_mean"] is not None]
        s.update(top1_agreement=sum(top1) / len(top1) if top1 else None,
                 top1_min=min(top1) if top1 else None, top1_max=max(top1) if top1 else None,
                 kl_mean=sum(kl) / len(kl) if kl else None,
                 natural_density=sum(r["density"] for r in rows) / len(rows), natural_docs=len(rows))
    for m in out.values():
        for s in m.values():
            d = s.pop("_d")
            s["density"] = sum(d) / len(d) if d else s.get("natural_density")
            s["accuracy"] = sum(s["tasks"].values()) / len(s["tasks"]) if s["tasks"] else None
    return out


def write_json(report, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(report) -> str:
    task_names = report["meta"]["tasks"]
    head = f"{'mode':<10} {'length':>6} " + " ".join(f"{t:>8}" for t in task_names) + \
        f" {'mean':>6} {'density':>8} {'top1':>7} {'KL':>9}"
    lines = [head, "-" * len(head)]
    for mode, per_len in report["summary"].items():
        for L, s in per_len.items():
            lines.append(f"{mode:<10} {L:>6} " + " ".join(f"{_fmt(s['tasks'].get(t), '.2f'):>8}" for t in task_names)
                         + f" {_fmt(s['accuracy'], '.3f'):>6} {_fmt(s['density'], '.4f'):>8}"
                         f" {_fmt(s.get('top1_agreement'), '.4f'):>7} {_fmt(s.get('kl_mean'), '.2e'):>9}")
    docs = len(report["meta"].get("natural_doc_seeds") or [0])
    if docs > 1:
        lines.append("natural text, per document: " + "; ".join(
            f"{n['mode']} {n['length']} doc {n['doc_seed']}: top1 {_fmt(n['top1_agreement'], '.4f')} at "
            f"{n['density']:.3f}" for n in report["natural"] if n["mode"] != "dense"))
    lines.append(f"(accuracy: fraction of examples solved, vartrack: fraction of variables named; density: "
                 f"computed fraction of the causal square, mean over layers/heads and examples; top1/KL: natural "
                 f"text vs dense, positions >= {report['meta']['natural_skip']}"
                 + (f", mean over {docs} documents" if docs > 1 else "") + ")")
    return "\n".join(lines)


def plot(report, path):
    """The density / accuracy trade-off, one point per (mode, length): density vs mean task
    accuracy, and density vs top-1 agreement on natural text (with the range over documents
    when there are several). A panel without data (e.g. ``--tasks ""``) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    modes = list(summary)
    lengths = sorted({int(L) for m in summary.values() for L in m})
    has_tasks = any(s.get("accuracy") is not None for m in summary.values() for s in m.values())
    has_text = any(s.get("top1_agreement") is not None for m in summary.values() for s in m.values())
    panels = (["tasks"] if has_tasks else []) + (["text"] if has_text else [])
    if not panels:
        raise ValueError("plot: the report has neither task accuracies nor natural-text agreement")

    markers = "os^Dvp*"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 1.5, 4.4), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    for mi, mode in enumerate(modes):
        for li, L in enumerate(lengths):
            s = summary[mode].get(str(L))
            if not s:
                continue
            kw = dict(color=colors[mi % len(colors)], marker=markers[li % len(markers)], markersize=7,
                      linestyle="none", label=f"{mode} @ {L}")
            if "tasks" in ax_of and s.get("accuracy") is not None and s.get("density") is not None:
                ax_of["tasks"].plot(s["density"], s["accuracy"], **kw)
            if "text" in ax_of and s.get("top1_agreement") is not None:
                y = s["top1_agreement"]
                err = [[y - s["top1_min"]], [s["top1_max"] - y]] if s.get("natural_docs", 1) > 1 else None
                ax_of["text"].errorbar(s["natural_density"], y, yerr=err, capsize=3, **kw)
    if "tasks" in ax_of:
        ax_of["tasks"].set(xlabel="attention density computed (fraction of the causal square)",
                           ylabel="accuracy (mean over tasks)", title="synthetic tasks", ylim=(-0.05, 1.05))
    if "text" in ax_of:
        docs = len(report["meta"].get("natural_doc_seeds") or [0])
        ax_of["text"].set(xlabel="attention density computed", ylabel="top-1 agreement with dense",
                          title=f"natural text (positions >= {report['meta']['natural_skip']}"
                                + (f"; mean and range over {docs} documents)" if docs > 1 else ")"))
    for ax in ax_of.values():
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.02, 1.05)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{report['meta']['model']}: density / accuracy trade-off ({report['meta']['device']})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _csv(s, conv=str):
    return [conv(x) for x in s.split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(prog="benchmarks/accuracy.py",
                                description="Accuracy / density harness for mi-compile (SmolLM2).")
    p.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens (default 4096)")
    p.add_argument("--examples", type=int, default=2, help="examples per task and length (default 2)")
    p.add_argument("--tasks", default=",".join(T.TASKS), help=f"comma-separated, from {','.join(T.TASKS)}")
    p.add_argument("--modes", default="dense,default,searched",
                   help="comma-separated: dense, default, searched, and names given with --configs "
                        "(dense always runs first: it is the reference)")
    p.add_argument("--configs", nargs="*", default=[], metavar="NAME=PATH_OR_SPEC",
                   help="extra modes: a config JSON path, or inline pattern:params for every head "
                        "(vertical_slash:V:S, a_shape:SINK:LOCAL, block_sparse:TOPK, dense)")
    p.add_argument("--searched", default=None, help=f"config for the searched mode (default {SEARCHED_DEFAULT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--natural-skip", type=int, default=1024,
                   help="compare next-token distributions only after this many tokens (default 1024)")
    p.add_argument("--no-natural", action="store_true", help="skip the natural-text comparison")
    p.add_argument("--docs", type=int, default=1,
                   help="natural-text documents per length (seeds --seed, --seed+1, ...; top-1/KL averaged)")
    p.add_argument("--no-inductor", action="store_true",
                   help="run the rewritten graph without Inductor (faster to compile; same attention)")
    p.add_argument("--one-kernel", action="store_true",
                   help="CUDA: run all-dense/A-shape layers through the general 64-row kernel too (not the "
                        "128-row one), so that dense and sparse modes share one kernel's rounding and top-1/KL "
                        "measure the selection, not bf16 accumulation order")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="benchmarks/results/accuracy.json", help="JSON report path")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--replot", default=None, metavar="REPORT_JSON",
                   help="run nothing: print the table of a saved report and draw its plot again "
                        "(to --plot, default the report's path with .png)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.replot:
        report = json.loads(Path(a.replot).read_text())
        report["summary"] = summarize(report)   # reports written before a summary field existed
        png = a.plot or str(Path(a.replot).with_suffix(".png"))
        print(format_table(report))
        plot(report, png)
        print(f"wrote {png}")
        return report
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = {}
    for spec in a.configs:
        if "=" not in spec:
            raise SystemExit(f"--configs takes NAME=PATH_OR_SPEC, got {spec!r}")
        k, v = spec.split("=", 1)
        extra[k] = v
    task_names = _csv(a.tasks)
    for t in task_names:
        if t not in T.TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {','.join(T.TASKS)}")
    modes, skipped = resolve_modes(_csv(a.modes), extra, a.searched)
    for n, why in skipped.items():
        print(f"mode {n} skipped: {why}", file=sys.stderr)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG
    from mi_compile.models import load_smollm2
    model, tok = load_smollm2(dtype=dtype, device=dev)
    saved = dict(KERNEL_CONFIG)
    if a.one_kernel:
        KERNEL_CONFIG["wide"] = False
    try:
        report = run_eval(model, tok, modes, _csv(a.lengths, int), a.examples, task_names, seed=a.seed,
                          natural=not a.no_natural, natural_skip=a.natural_skip, natural_docs=a.docs,
                          use_inductor=not a.no_inductor,
                          out_path=a.out, skipped_modes=skipped,
                          meta_extra=dict(one_kernel=bool(a.one_kernel), kernel_config=dict(KERNEL_CONFIG)))
    finally:
        KERNEL_CONFIG.clear()
        KERNEL_CONFIG.update(saved)
    print()
    print(format_table(report))
    png = a.plot or str(Path(a.out).with_suffix(".png"))
    plot(report, png)
    print(f"wrote {a.out} and {png} ({report['meta']['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
