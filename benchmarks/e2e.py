"""End-to-end prefill (time to first token) and decode of a Llama-3-8B-shaped model:
eager SDPA vs backend="minference" (uniform and MInference's Llama-3.1 per-head config) vs
plain torch.compile (Inductor), measured side by side in one process.

Model: ``LlamaForCausalLM(mi_compile.models.llama_8b_config())`` with random weights, bf16, SDPA,
eval; calls are ``model(ids, logits_to_keep=1, use_cache=False)`` under ``torch.no_grad``.

Phases, in this order (each wrapped so that one failure -- an OOM, a compile error -- is recorded
and the rest still runs; Dynamo is reset and memory freed between phases):

* ``eager``              the model as is (SDPA picks cuDNN on the H100)
* ``minference``         ``torch.compile(model, backend=mi_compile.backend({"config": uniform}),
                         dynamic=True)``, uniform = every head vertical_slash(1000, 6096), i.e.
                         the default policy
* ``minference_llama31`` the same with MInference's published Llama-3.1-8B per-head file
* ``attention_floor``    the same backend with every head ``a_shape(sink=0, local=64)``: each
                         query attends to its 64 nearest keys, so attention costs almost nothing
                         and everything else is compiled exactly as in the two modes above. Its
                         TTFT is a measured lower bound for any sparse config (opt-in: not in
                         the default --modes)
* generation check       prefill (use_cache=True) + --gen-tokens greedy single-token decode
                         steps with the returned DynamicCache (--gen-cache static: a
                         StaticCache preallocated and written in place), eager vs each of
                         --gen-modes (default minference, uniform), alternating --gen-reps
                         pairs; peak memory per phase (prefill, decode) and the cache size
* ``inductor``           ``torch.compile(model)``, only at lengths <= --inductor-max (it runs out of
                         memory at 128K on an 80 GB H100: /work/shared/anchors); runs last because
                         it is a reference only and slow to compile

Per (mode, length): first call (= compile for compiled modes at the first length, warm-up
otherwise), then --reps timed calls (torch.cuda.synchronize around each; ttft_s = the minimum),
peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats; weights included) and
the number of graphs compiled so far (len(backend.reports) for minference modes, Dynamo's
unique_graphs counter for all). A length after the first that adds graphs is a recompile.

Output: one JSON line per measurement as it happens; all rows (rewritten after every row, so a
killed run still leaves them) in $OUT/e2e.json; at the end a table and the goal checks
(PASS/FAIL with the numbers).

A real model (``--model qwen2.5-coder-1.5b``, any name ``mi_compile.models.load_model`` takes;
bf16 on the GPU) runs another sweep (:func:`run_model`), at 8K, 16K, 32K, 64K and 128K by default:

* modes ``eager``, ``searched`` (``--config``: the per-head config searched for the model, by
  default the model's config family ``mi_compile/configs/<model>.json`` when it ships one, else
  ``<model>-128k.json``), ``minference`` (the default policy, every
  head vertical_slash(1000, 6096)), ``inductor`` (plain ``torch.compile(model, dynamic=True)``,
  up to ``--inductor-max``), optionally ``attention_floor`` and ``--configs NAME=PATH`` extras;
  ``min_seq_len`` 32768 unless ``--min-seq-len`` says otherwise;
* every compiled mode stays alive side by side (one backend object each), and at each length
  every mode gets a warm-up call (the first one compiles) before ``--reps`` timed calls in which
  the modes alternate; the shortest length first, then the longest first, so that a run cut by
  ``--budget-s`` still has 128K;
* the input is real text: a Python-source document from the model's tokenizer
  (``mi_compile.eval.tasks.code_document``), not random ids, so that the vertical-slash estimate
  sees real attention;
* lengths past the model's native context run with YaRN. Switching it per length would
  recompile if the rotary tables or scale are guarded graph constants: a tiny probe
  (:func:`yarn_switch_probe`) tries that first, and if it recompiles (or would keep stale
  constants) the sweep runs YaRN for every length, which every row records (``yarn_factor``);
* goal checks for the searched config: TTFT <= 0.30x eager at 128K, <= 0.55x at 64K,
  <= 0.80x at 32K, no slower than eager at 8K and 16K (``--tol``), peak memory <= eager's at
  every length, no recompiles across lengths; the other modes' ratios as information.

    # H100, everything (default lengths 8192,32768,65536,131072; ~7 min, see benchmarks/README.md)
    OUT=/tmp/e2e python3 -m benchmarks.e2e
    python3 -m benchmarks.e2e --quick            # 8192,32768, reps 1: smoke run on the GPU
    python3 -m benchmarks.e2e --device cpu --tiny  # 2-layer tiny llama on CPU: control flow only
    OUT=/tmp/e2e python3 -m benchmarks.e2e --model qwen2.5-coder-1.5b --budget-s 420   # H200, ~7 min
    python3 -m benchmarks.e2e --model tiny:qwen2 --device cpu --no-inductor --modes eager,searched,minference \
        --config vertical_slash:16:64 --lengths 256,2304    # CPU smoke of the --model sweep (YaRN past 2048)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import statistics
import time
import traceback

import signal

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA31_CONFIG = os.path.join(ROOT, "tests", "data", "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json")
UNIFORM_CONFIG = {"format": "mi-compile/v1", "model": "uniform vertical_slash(1000, 6096) = default policy",
                  "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096}}
ALL_MODES = ("eager", "minference", "minference_llama31", "inductor", "attention_floor")
DEFAULT_MODES = ("eager", "minference", "minference_llama31", "inductor")
FLOOR_CONFIG = {"format": "mi-compile/v1", "model": "attention floor: 64-token local window only",
                "default": {"pattern": "a_shape", "sink": 0, "local": 64}}
GOAL_LEN_LONG, GOAL_LEN_SHORT = 131072, 8192
GOAL_RATIO = {"minference": 0.45, "minference_llama31": 0.33}

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


class Terminated(BaseException):
    """SIGTERM (e.g. `timeout`): stop measuring, still print the table and checks."""


def _on_sigterm(signum, frame):
    raise Terminated(f"signal {signum} after {elapsed():.0f} s")


# ----------------------------------------------------------------------------------------------
# output


class Recorder:
    def __init__(self, out_dir: str, meta: dict):
        self.path = os.path.join(out_dir, "e2e.json")
        os.makedirs(out_dir, exist_ok=True)
        self.meta, self.rows, self.checks = meta, [], []

    def add(self, **row) -> dict:
        row = {"t_s": round(elapsed(), 1), **row}
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        self.save()
        return row

    def save(self) -> None:
        tmp = self.path + ".part"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "rows": self.rows, "checks": self.checks}, f, indent=1, default=str)
        os.replace(tmp, self.path)


def err_text(exc: BaseException) -> str:
    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    return f"{kind}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


# ----------------------------------------------------------------------------------------------
# device helpers


class Dev:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3) if self.cuda else None

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def graph_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


# ----------------------------------------------------------------------------------------------
# model and configs


def build_model(args, dev: Dev):
    from transformers import LlamaForCausalLM

    from mi_compile.models import llama_8b_config

    if args.tiny:
        cfg = llama_8b_config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                              num_attention_heads=32, num_key_value_heads=8, head_dim=16, vocab_size=256,
                              max_position_embeddings=8192)
    else:
        cfg = llama_8b_config()
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # construct in bf16 directly: no 32 GB fp32 copy of 8B params
    try:
        with torch.device(dev.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(dtype).eval()
    return model, cfg


def llama31_config(num_layers: int):
    """MInference's Llama-3.1-8B per-head file; for the tiny model, its first ``num_layers`` layers."""
    with open(LLAMA31_CONFIG) as f:
        data = json.load(f)
    return data if num_layers >= len(data) else data[:num_layers]


def make_compiled(mode: str, model, args):
    """(callable, backend object or None) for a compiled mode."""
    import mi_compile

    if mode == "inductor":
        return torch.compile(model), None
    cfg = {"minference": UNIFORM_CONFIG, "attention_floor": FLOOR_CONFIG}.get(mode) or \
        llama31_config(model.config.num_hidden_layers)
    opts = {"config": cfg}
    if args.min_seq_len is not None:
        opts["min_seq_len"] = args.min_seq_len
    be = mi_compile.backend(opts)
    return torch.compile(model, backend=be, dynamic=True), be


def compile_count(be, dynamo_graphs: int) -> tuple[int, int | None]:
    """(graphs Dynamo compiled, times the minference backend ran). The two differ: with
    dynamic=True Dynamo restarts its analysis once after the first backend call (a specialised
    Python float: 'Restarting analysis due to _tensorify_python_scalars'), so the backend runs
    twice for the first graph -- plain Inductor does the same. Either number growing after the
    first length is a recompile."""
    return dynamo_graphs, (len(be.reports) if be is not None else None)


def site_summary(be) -> dict | None:
    """Sites of the last graph the backend saw (the restart re-runs the first graph), and why
    any site of any graph stayed dense (e.g. decode steps)."""
    reports = [r for r in (be.reports if be is not None else []) if r is not None]
    if not reports:
        return None
    last = reports[-1].sites
    dense_reasons = sorted({s.reason for r in reports for s in r.sites if s.action != "sparse"})
    return {"backend_calls": len(reports), "last_graph_sites": len(last),
            "last_graph_sparse": sum(s.action == "sparse" for s in last), "dense_reasons": dense_reasons[:5]}


# ----------------------------------------------------------------------------------------------
# phases


def timed_call(fn, ids, dev: Dev):
    dev.sync()
    t = time.perf_counter()
    out = fn(ids, logits_to_keep=1, use_cache=False)
    dev.sync()
    dt = time.perf_counter() - t
    del out
    return dt


def run_mode(mode, model, args, dev, rec, lengths, state):
    """Prefill timings of one mode at every length."""
    compiled = mode != "eager"
    fn, be = (model, None) if not compiled else (None, None)
    compile_s = None
    graphs0, breaks0 = graph_counters()
    graphs_after_first = None
    try:
        if compiled:
            torch._dynamo.reset()
            fn, be = make_compiled(mode, model, args)
        for i, n in enumerate(lengths):
            if mode == "inductor" and n > args.inductor_max:
                rec.add(kind="prefill", mode=mode, n=n, skipped=f"n > --inductor-max {args.inductor_max}: "
                        "plain torch.compile materialises the n x n causal mask and runs out of memory at "
                        "128K on an 80 GB H100 (/work/shared/anchors/e2e-compile-h100-128k.json)")
                continue
            if elapsed() > args.budget_s:
                rec.add(kind="prefill", mode=mode, n=n, skipped=f"time budget --budget-s {args.budget_s} spent")
                continue
            ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev.device,
                                generator=torch.Generator(dev.device).manual_seed(n))
            row = dict(kind="prefill", mode=mode, n=n)
            try:
                g_before = graph_counters()[0]
                with torch.no_grad():
                    first_s = timed_call(fn, ids, dev)  # compile (first length) or warm-up
                    if compiled and compile_s is None:
                        compile_s = first_s
                        row["compile_s"] = round(compile_s, 2)
                    ts, peak = [], 0.0
                    for _ in range(args.reps):
                        dev.reset_peak()
                        ts.append(timed_call(fn, ids, dev))
                        peak = max(peak, dev.peak_gib() or 0.0)
                graphs, breaks = graph_counters()
                row.update(ttft_s=round(min(ts), 4), all_s=[round(t, 4) for t in ts], first_s=round(first_s, 3),
                           peak_gib=peak if dev.cuda else None)
                if compiled:
                    total = compile_count(be, graphs - graphs0)
                    row.update(dynamo_graphs=total[0], backend_calls=total[1], new_graphs=graphs - g_before,
                               graph_breaks=breaks - breaks0)
                    if graphs_after_first is None:
                        graphs_after_first = total
                    else:
                        row["recompiled"] = total != graphs_after_first or graphs > g_before
                    if be is not None:
                        row["sites"] = site_summary(be)
            except Exception as exc:  # noqa: BLE001 -- record and go on
                row["error"] = err_text(exc)
                row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
            finally:
                del ids
                dev.free()
            rec.add(**row)
        if compiled:
            graphs, breaks = graph_counters()
            total = compile_count(be, graphs - graphs0)
            state["compiles"][mode] = dict(graphs_total=total, graphs_after_first_length=graphs_after_first,
                                           recompiled_across_lengths=(graphs_after_first is not None
                                                                      and total != graphs_after_first),
                                           graph_breaks=breaks - breaks0, compile_s=compile_s,
                                           sites=site_summary(be))
            rec.add(kind="compiles", mode=mode, **state["compiles"][mode])
    except Exception as exc:  # noqa: BLE001 -- e.g. the backend failed to build
        rec.add(kind="prefill", mode=mode, error=err_text(exc),
                traceback_tail=traceback.format_exc().strip().splitlines()[-6:])
    finally:
        del fn, be
        torch._dynamo.reset()
        dev.free()


def cache_gib(cache) -> float:
    """Bytes held by a transformers cache's key/value tensors, in GiB."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return round(total / 2**30, 3)


def greedy(fn, ids, steps, dev: Dev, phases: dict | None = None, make_cache=None):
    """Prefill with a cache, then ``steps`` single-token greedy decode steps. Returns timings.
    ``phases`` (optional) receives the peak memory of the prefill and of the decode steps
    separately, and the cache size after the prefill, so a peak can be attributed.
    ``make_cache`` (optional) returns the cache to fill (a ``StaticCache``); default: the
    model's own ``DynamicCache``."""
    cache = make_cache() if make_cache is not None else None
    dev.sync()
    t0 = time.perf_counter()
    out = fn(ids, use_cache=True, logits_to_keep=1, past_key_values=cache)   # None: a DynamicCache
    cache = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    dev.sync()
    prefill_s = time.perf_counter() - t0
    del out
    if phases is not None:
        phases.update(prefill_peak_gib=dev.peak_gib(), cache_gib=cache_gib(cache))
        dev.reset_peak()
    toks = [tok]
    t1 = time.perf_counter()
    for _ in range(steps):
        out = fn(tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
        del out
    dev.sync()
    decode_s = time.perf_counter() - t1
    if phases is not None:
        phases.update(decode_peak_gib=dev.peak_gib())
    del cache
    return prefill_s, decode_s, torch.cat(toks, -1)[0].tolist()


def timed_greedy(fn, ids, steps, dev: Dev, make_cache=None):
    """One timed prefill + decode run: timings, per-phase peaks, tokens."""
    dev.reset_peak()
    phases = {}
    prefill_s, decode_s, toks = greedy(fn, ids, steps, dev, phases, make_cache)
    peaks = [p for p in (phases.get("prefill_peak_gib"), phases.get("decode_peak_gib")) if p is not None]
    return dict(prefill_s=round(prefill_s, 4), decode_step_ms=round(1e3 * decode_s / max(steps, 1), 3),
                peak_gib=max(peaks) if peaks else None, **phases), toks


def summarize_runs(row: dict, runs: list[dict]):
    """Median timings over the alternating runs (each run kept), the largest peaks."""
    row["runs"] = runs
    for key in ("prefill_s", "decode_step_ms"):
        row[key] = statistics.median(r[key] for r in runs)
    for key in ("peak_gib", "prefill_peak_gib", "decode_peak_gib", "cache_gib"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = max(values) if values else None


def run_gen(model, args, dev, rec, state):
    """Prefill with a cache, then greedy decode steps, for eager and each compiled mode.

    Each compiled mode is timed alternately with eager (``--gen-reps`` pairs after a warm-up
    of both), so that a drift of the machine over the run (clocks, host load: decode steps
    are short and host-bound) shows in both columns rather than between them."""
    n, steps = args.gen_length, args.gen_tokens
    if elapsed() > args.budget_s:
        rec.add(kind="gen", n=n, skipped=f"time budget --budget-s {args.budget_s} spent")
        return
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=dev.device,
                        generator=torch.Generator(dev.device).manual_seed(n))
    results = {}
    eager_runs, eager_tokens = [], None
    compiled_modes = [m for m in args.gen_modes.split(",") if m != "eager"]
    make_cache = None
    if args.gen_cache == "static":
        from transformers import StaticCache

        def make_cache():
            return StaticCache(config=model.config, max_cache_len=n + steps + 1)
    with torch.no_grad():
        t = time.perf_counter()
        greedy(model, ids, min(2, steps), dev, make_cache=make_cache)
        eager_warm_s = time.perf_counter() - t
    for mode in compiled_modes:
        fn = be = None
        row = dict(kind="gen", mode=mode, n=n, steps=steps, cache=args.gen_cache)
        try:
            torch._dynamo.reset()
            fn, be = make_compiled(mode, model, args)
            g0, _ = graph_counters()
            with torch.no_grad():
                # warm-up (compiles the cached-prefill and decode graphs); 2 steps so that a
                # second decode shape (kv_len + 1) is seen before timing
                t = time.perf_counter()
                greedy(fn, ids, min(2, steps), dev, make_cache=make_cache)
                warm_s = time.perf_counter() - t
                g1, _ = graph_counters()
                runs = []
                for _ in range(args.gen_reps):
                    run, eager_tokens = timed_greedy(model, ids, steps, dev, make_cache)
                    eager_runs.append(dict(run, paired_with=mode))
                    run, toks = timed_greedy(fn, ids, steps, dev, make_cache)
                    runs.append(run)
            g2, _ = graph_counters()
            summarize_runs(row, runs)
            row.update(warmup_s=round(warm_s, 2), tokens=toks)
            if be is not None:
                row.update(graphs_warmup=g1 - g0, graphs_during_timed=g2 - g1, sites=site_summary(be))
            results[mode] = row
        except Exception as exc:  # noqa: BLE001
            row["error"] = err_text(exc)
            row["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        finally:
            del fn, be
            torch._dynamo.reset()
            dev.free()
        rec.add(**row)
    if not compiled_modes:
        with torch.no_grad():
            for _ in range(args.gen_reps):
                run, eager_tokens = timed_greedy(model, ids, steps, dev, make_cache)
                eager_runs.append(run)
    if eager_runs:
        row = dict(kind="gen", mode="eager", n=n, steps=steps, cache=args.gen_cache,
                   warmup_s=round(eager_warm_s, 2))
        summarize_runs(row, eager_runs)
        row["tokens"] = eager_tokens
        results["eager"] = row
        rec.add(**row)
    if "eager" in results and "minference" in results:
        # compare against the eager runs interleaved with the minference ones
        paired = [r for r in eager_runs if r.get("paired_with") == "minference"]
        eager = dict(results["eager"])
        summarize_runs(eager, paired)
        a, b = eager["tokens"], results["minference"]["tokens"]
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        state["gen"] = dict(eager=eager, minference=results["minference"],
                            tokens_match=a == b, matching_prefix=prefix)
        pair_ratios = [round(m["decode_step_ms"] / e["decode_step_ms"], 3)
                       for e, m in zip(paired, results["minference"]["runs"])]
        rec.add(kind="gen_compare", n=n, tokens_match=a == b, matching_prefix=prefix, of=len(a),
                decode_ratio=round(results["minference"]["decode_step_ms"] / eager["decode_step_ms"], 3),
                decode_ratio_per_pair=pair_ratios,
                prefill_ratio=round(results["minference"]["prefill_s"] / eager["prefill_s"], 3))
    del ids
    dev.free()


# ----------------------------------------------------------------------------------------------
# summary


def prefill_rows(rec):
    return {(r["mode"], r["n"]): r for r in rec.rows if r.get("kind") == "prefill" and "n" in r}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rec, modes, lengths):
    rows = prefill_rows(rec)
    print("\n%-20s %8s %9s %8s %9s %10s %6s  %s" % ("mode", "length", "ttft_s", "x eager", "peak_GiB",
                                                  "compile_s", "recmp", "note"))
    for mode in modes:
        for n in lengths:
            r = rows.get((mode, n))
            if r is None:
                continue
            e = rows.get(("eager", n), {})
            ratio = r["ttft_s"] / e["ttft_s"] if r.get("ttft_s") and e.get("ttft_s") else None
            note = r.get("error") or r.get("skipped") or ""
            rc = r.get("recompiled")
            print("%-20s %8d %9s %8s %9s %10s %6s  %s" % (
                mode, n, fmt(r.get("ttft_s"), ".3f"), fmt(ratio, ".3f"), fmt(r.get("peak_gib"), ".2f"),
                fmt(r.get("compile_s"), ".1f"), "-" if rc is None else ("YES" if rc else "no"), note[:70]))
    for r in rec.rows:
        if r.get("kind") == "gen" and "prefill_s" in r:
            print("gen %-16s %8d prefill %.3f s, decode %.2f ms/step x %d, peak %s GiB (prefill %s, decode %s)" % (
                r["mode"], r["n"], r["prefill_s"], r["decode_step_ms"], r["steps"], fmt(r.get("peak_gib"), ".2f"),
                fmt(r.get("prefill_peak_gib"), ".2f"), fmt(r.get("decode_peak_gib"), ".2f")))
        elif r.get("kind") == "gen" and ("error" in r or "skipped" in r):
            print("gen %-16s %8d %s" % (r.get("mode", "-"), r["n"], r.get("error") or r.get("skipped")))


def goal_checks(rec, args, state, modes, lengths, dev):
    rows = prefill_rows(rec)
    checks = []
    tol = args.tol

    def add(name, ok, detail):
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        checks.append(dict(check=name, status=status, detail=detail))

    def ttft(mode, n):
        r = rows.get((mode, n))
        return r.get("ttft_s") if r else None

    measured = sorted({n for (m, n), r in rows.items() if m == "eager" and r.get("ttft_s")})
    long_n = GOAL_LEN_LONG if GOAL_LEN_LONG in measured else (measured[-1] if measured else None)
    short_n = GOAL_LEN_SHORT if GOAL_LEN_SHORT in measured else (measured[0] if measured else None)
    def ratio_check(name, mode, n, goal_n, limit, places):
        """PASS when ``mode``'s TTFT at ``n`` is at most ``limit`` x eager's (``n`` stands in for
        ``goal_n`` when that length was not measured, and says so)."""
        e, m = ttft("eager", n), ttft(mode, n)
        if e is None or m is None:
            add(name, None, f"no data (eager {e}, {mode} {m} at {n})")
            return
        where = "" if n == goal_n else f" [measured at {n}, not {goal_n}]"
        add(name, m <= limit * e, f"{m:.{places}f} s vs eager {e:.{places}f} s = {m / e:.3f}x{where}")

    for mode, goal in GOAL_RATIO.items():
        if mode in modes:
            ratio_check(f"{mode} TTFT <= {goal}x eager at {GOAL_LEN_LONG}", mode, long_n, GOAL_LEN_LONG, goal, 3)
    if "attention_floor" in modes and long_n is not None:
        e, f = ttft("eager", long_n), ttft("attention_floor", long_n)
        if e is not None and f is not None:
            left = "; ".join(f"{mode}'s goal {goal}x leaves {goal * e - f:.3f} s for all attention"
                             for mode, goal in GOAL_RATIO.items())
            checks.append(dict(check=f"attention floor at {long_n} (info)", status="INFO",
                               detail=f"{f:.3f} s vs eager {e:.3f} s = {f / e:.3f}x with a 64-key window "
                                      f"per query; {left}"))
    for mode in ("minference", "minference_llama31"):
        if mode in modes:
            ratio_check(f"{mode} no slower than eager at {GOAL_LEN_SHORT} (tol {tol:.0%})", mode, short_n,
                        GOAL_LEN_SHORT, 1 + tol, 4)
    for mode in ("minference", "minference_llama31"):
        if mode not in modes:
            continue
        name = f"{mode} peak memory never above eager's"
        if not dev.cuda:
            add(name, None, "CPU run: no CUDA memory stats")
            continue
        pairs = [(n, rows[(mode, n)]["peak_gib"], rows[("eager", n)]["peak_gib"]) for n in lengths
                 if rows.get((mode, n), {}).get("peak_gib") and rows.get(("eager", n), {}).get("peak_gib")]
        if not pairs:
            add(name, None, "no data")
        else:
            bad = [p for p in pairs if p[1] > p[2]]
            add(name, not bad, "; ".join(f"{n}: {a:.2f} vs {b:.2f} GiB" for n, a, b in pairs))
    for mode in ("minference", "minference_llama31"):
        if mode not in modes:
            continue
        name = f"{mode} no recompiles across lengths"
        c = state["compiles"].get(mode)
        n_ok = sum(1 for n in lengths if rows.get((mode, n), {}).get("ttft_s") is not None)
        if c is None or n_ok < 2:
            add(name, None, f"fewer than 2 lengths measured ({n_ok})")
        else:
            add(name, not c["recompiled_across_lengths"],
                f"(dynamo graphs, backend calls) {tuple(c['graphs_after_first_length'])} after the first length, "
                f"{tuple(c['graphs_total'])} after all {n_ok}; graph breaks {c['graph_breaks']}")
    if "inductor" in modes and "inductor" in state["compiles"]:
        c = state["compiles"]["inductor"]
        checks.append(dict(check="inductor recompiles across lengths (info)", status="INFO",
                           detail=f"dynamo graphs {c['graphs_after_first_length'][0] if c['graphs_after_first_length'] else None}"
                                  f" after the first length -> {c['graphs_total'][0]} after all"))
    g = state.get("gen")
    name = f"decode step not slower than eager (tol {tol:.0%})"
    if g is None:
        add(name, None, "generation check did not complete")
    else:
        e, m = g["eager"]["decode_step_ms"], g["minference"]["decode_step_ms"]
        add(name, m <= e * (1 + tol), f"{m:.2f} ms vs eager {e:.2f} ms per step = {m / e:.3f}x "
            f"(prefill {g['minference']['prefill_s']:.3f} vs {g['eager']['prefill_s']:.3f} s at {args.gen_length})")
        checks.append(dict(check="greedy tokens match eager (info: random weights)", status="INFO",
                           detail=f"match={g['tokens_match']}, first {g['matching_prefix']} of "
                                  f"{len(g['eager']['tokens'])} equal"))
        e, m = g["eager"], g["minference"]
        if e.get("peak_gib") is not None and m.get("peak_gib") is not None:
            add("generation peak memory not above eager's", m["peak_gib"] <= e["peak_gib"],
                f"{m['peak_gib']:.2f} vs {e['peak_gib']:.2f} GiB (prefill {m.get('prefill_peak_gib')} vs "
                f"{e.get('prefill_peak_gib')}, decode {m.get('decode_peak_gib')} vs {e.get('decode_peak_gib')}; "
                f"cache {e.get('cache_gib')} GiB)")
    rec.checks = checks
    rec.save()
    print("\nGoal checks:")
    for c in checks:
        print(f"  {c['status']:<4}  {c['check']}: {c['detail']}")


# ----------------------------------------------------------------------------------------------
# a real model (--model): eager, the searched config, the default policy and plain torch.compile
# side by side, alternating, on real tokens, YaRN past the native context

MODEL_MODES = ("eager", "searched", "minference", "inductor", "attention_floor")
MODEL_DEFAULT_MODES = ("eager", "searched", "minference", "inductor")
MODEL_LENGTHS = (8192, 16384, 32768, 65536, 131072)
#: the searched config's TTFT goals against eager, per length (model runs)
MODEL_GOAL_RATIO = {131072: 0.30, 65536: 0.55, 32768: 0.80}
MODEL_GOAL_NOT_SLOWER = (8192, 16384)
MODEL_MIN_SEQ_LEN = 32768


class CountingInductor:
    """``backend="inductor"`` (``compile_fx``) that counts its calls, so that plain
    ``torch.compile``'s recompiles are told apart from the other modes' in one process."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.calls += 1
        return compile_fx(gm, example_inputs)


def rotary_path(model) -> str:
    """Dotted name of the model's (first) ``*RotaryEmbedding`` module."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return name
    raise ValueError(f"{type(model).__name__} has no *RotaryEmbedding module")


def yarn_switch_probe(model, factor: float, native: int) -> dict:
    """Does switching YaRN on and off (``mi_compile.models.set_yarn``) under ``torch.compile``
    recompile, or worse, keep the old rotary tables as graph constants?

    Compiles a function that reaches the rotary module through the model, as the decoder's
    forward does (``model.<path>(x, position_ids)``), with a counting eager backend, calls it
    native / YaRN / native and compares each output with the eager module's. ``recompiles``:
    the backend ran again after a switch; ``stale``: an output after a switch differs from
    eager's (constants baked in). Either means a sweep that switches per length would pay a
    compile (or be wrong), so the sweep runs YaRN for every length instead. Cheap: one tiny
    graph, before anything else is compiled (it resets Dynamo)."""
    from mi_compile.models import set_yarn

    path = rotary_path(model)
    parts = path.split(".")
    calls = []

    def get(root):
        for part in parts:     # a plain attribute walk, as the model's own forward reaches it
            root = getattr(root, part)
        return root

    def counting(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm.forward

    def rope(x, pos):
        return get(model)(x, pos)

    p = next(model.parameters())
    x = torch.zeros(1, 1, 8, dtype=p.dtype, device=p.device)
    pos = torch.arange(4096, 4160, device=p.device)[None]
    torch._dynamo.reset()
    fn = torch.compile(rope, backend=counting, dynamic=True)
    seen, stale = [], False
    try:
        with torch.no_grad():
            for f in (None, factor, None):
                set_yarn(model, f, original=native)
                got = fn(x, pos)
                want = get(model)(x, pos)
                stale |= not all(torch.equal(a, b) for a, b in zip(got, want))
                seen.append(len(calls))
    finally:
        set_yarn(model, None)
        torch._dynamo.reset()
    return dict(rotary=path, backend_calls_after=seen, recompiles=seen[1] > seen[0] or seen[2] > seen[1],
                stale=stale)


def model_input(n: int, tok, vocab: int, dev: Dev, seed: int):
    """``(ids [1, n], what)``: a Python-source document of the tokenizer's (real text, so the
    vertical-slash estimate sees real attention), or random ids when there is no tokenizer."""
    if tok is None:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        return ids.to(dev.device), "random ids (no tokenizer)"
    from mi_compile.eval.tasks import code_document

    return torch.tensor([code_document(tok, n, seed=seed)], device=dev.device), f"python source (seed {seed})"


# mode suffix -> MI_COMPILE_HOPPER value: the Gluon Hopper kernels for dense / A-shape layers (the
# first or the warp-specialised one), or for every layer (with the Gluon kernel for any index:
# software-pipelined, or fed by a producer warp)
GLUON_SUFFIXES = {"@gluon": "1", "@gluon_ws": "ws", "@gluon_all": "ws_sparse", "@gluon_sparse_ws": "sparse_ws"}


def gluon_base(mode: str):
    """``(base mode, MI_COMPILE_HOPPER value)`` of a ``<mode>@gluon...`` mode (:data:`GLUON_SUFFIXES`),
    else ``(mode, None)``."""
    for suffix, value in GLUON_SUFFIXES.items():
        if mode.endswith(suffix):
            return mode[:-len(suffix)], value
    return mode, None


def with_gluon(fn, value: str = "1"):
    """``fn`` with the Gluon Hopper kernels opted in (``MI_COMPILE_HOPPER=value``) for the length
    of each call: the op reads the variable at every launch, so a ``<mode>@gluon`` mode shares
    ``<mode>``'s compiled graph and differs only in the attention kernels."""
    from mi_compile.kernels.dispatch import HOPPER_ENV

    def call(*args, **kwargs):
        saved = os.environ.get(HOPPER_ENV)
        os.environ[HOPPER_ENV] = value
        try:
            return fn(*args, **kwargs)
        finally:
            if saved is None:
                os.environ.pop(HOPPER_ENV, None)
            else:
                os.environ[HOPPER_ENV] = saved
    call._mi_backend = getattr(fn, "_mi_backend", None)
    return call


def make_model_mode(mode: str, model, args, fns=None, counters=None):
    """``(callable, compile counter)`` for a compiled mode of a --model run; ``<mode>@gluon`` /
    ``@gluon_ws`` / ``@gluon_all`` wraps ``<mode>``'s (made first if ``fns`` lacks it) in :func:`with_gluon`."""
    base, gluon = gluon_base(mode)
    if gluon:
        if fns is None or base not in fns:
            fn, counter = make_model_mode(base, model, args)
            if fns is not None:
                fns[base], counters[base] = fn, counter
        else:
            fn, counter = fns[base], counters[base]
        return with_gluon(fn, gluon), counter
    from mi_compile.backend import MInferenceBackend
    from mi_compile.eval.harness import parse_config_spec

    if mode == "inductor":
        counter = CountingInductor()
        return torch.compile(model, backend=counter, dynamic=True), (lambda: counter.calls)
    if mode == "searched":
        cfg = parse_config_spec(args.config)[0]
    elif mode in args.extra_configs:
        cfg = parse_config_spec(args.extra_configs[mode])[0]
    else:
        cfg = {"minference": UNIFORM_CONFIG, "attention_floor": FLOOR_CONFIG}[mode]
    be = MInferenceBackend({"config": cfg, "min_seq_len": args.min_seq_len}, use_inductor=not args.no_inductor)
    fn = torch.compile(model, backend=be, dynamic=True)
    fn._mi_backend = be
    return fn, (lambda: len(be.reports))


def profile_modes(args, dev: Dev, rec: Recorder, fns: dict, plan: dict, current, native: int, tok, vocab: int):
    """``--profile``: one more call per listed mode at the longest length, under the profiler
    (device time per kernel and category) and then with the allocator history (what is live at
    the peak); text reports to ``--out``, the numbers to the rows."""
    if not args.profile or not dev.cuda:
        return
    from mi_compile.debug import gpu_profile
    from mi_compile.models import set_yarn

    n = max(args.lengths)
    if plan[n] != current:
        set_yarn(fns["eager"], plan[n], original=native)
    ids, _ = model_input(n, tok, vocab, dev, args.doc_seed)
    for m in args.profile:
        if m not in fns or elapsed() > args.budget_s:
            rec.add(kind="profile", mode=m, n=n, skipped="mode not run" if m not in fns else "time budget spent")
            continue
        call = lambda f=fns[m], x=ids: f(x, logits_to_keep=1, use_cache=False)  # noqa: E731
        with torch.no_grad():
            try:
                call()
                kt = gpu_profile.kernel_times(call)
                mp = gpu_profile.memory_peak(call, device=dev.device)
            except Exception as exc:  # noqa: BLE001 -- a profiler failure must not lose the run
                rec.add(kind="profile", mode=m, n=n, error=err_text(exc))
                continue
        text = f"{m} at {n} tokens\n\n{gpu_profile.format_kernel_times(kt)}\n\n{gpu_profile.format_memory_peak(mp)}\n"
        with open(os.path.join(args.out, f"profile_{m}_{n}.txt"), "w") as f:
            f.write(text)
        print(text, flush=True)
        rec.add(kind="profile", mode=m, n=n, kernels=kt, memory=mp)
    del ids
    dev.free()


def measure_order(lengths):
    """The shortest length first (every mode compiles there), then the longest first, so that
    a run cut short by its budget still has the long lengths the goals are about."""
    first = min(lengths)
    return [first] + sorted((n for n in lengths if n != first), reverse=True)


def run_model(args, dev: Dev, rec: Recorder, model, tok, state):
    from mi_compile.models import native_context, set_yarn, yarn_factor_for

    native = native_context(model)
    need = {n: yarn_factor_for(n, native) for n in args.lengths}
    factors = sorted({f for f in need.values() if f is not None})
    if args.yarn == "off" or not factors:
        plan, policy = {n: None for n in args.lengths}, "off" if factors else "not needed (all lengths native)"
    elif args.yarn == "always":
        plan, policy = {n: factors[-1] for n in args.lengths}, f"factor {factors[-1]} for every length (--yarn always)"
    else:
        probe = yarn_switch_probe(model, factors[-1], native)
        rec.add(kind="yarn_probe", **probe)
        if probe["recompiles"] or probe["stale"] or len(factors) > 1:
            why = "switching recompiles" if probe["recompiles"] else \
                ("switching leaves stale rotary constants" if probe["stale"] else "several factors")
            plan = {n: factors[-1] for n in args.lengths}
            policy = f"factor {factors[-1]} for every length ({why}: yarn_switch_probe)"
        else:
            plan, policy = need, "per length (switching does not recompile: yarn_switch_probe)"
    state["yarn"] = dict(native=native, policy=policy, plan={str(k): v for k, v in plan.items()})
    rec.meta.update(yarn=state["yarn"])
    rec.add(kind="yarn", **state["yarn"])

    modes = list(args.modes)
    from mi_compile.eval.harness import parse_config_spec

    for m in [m for m in modes if m == "searched" or m in args.extra_configs]:
        try:
            parse_config_spec(args.config if m == "searched" else args.extra_configs[m])
        except ValueError as exc:   # e.g. the model's config not shipped yet: say so, run the rest
            rec.add(kind="prefill", mode=m, skipped=f"no config: {exc}")
            modes.remove(m)
    fns, counters, compile_s, after_first, failed = {"eager": model}, {}, {}, {}, {}
    breaks0 = graph_counters()[1]
    current = "unset"
    order = measure_order(args.lengths)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else \
        model.config.vocab_size
    for li, n in enumerate(order):
        if elapsed() > args.budget_s:
            for m in modes:
                rec.add(kind="prefill", mode=m, n=n, skipped=f"time budget --budget-s {args.budget_s} spent")
            continue
        if plan[n] != current:
            set_yarn(model, plan[n], original=native)   # per-length policy: only when it changes
            current = plan[n]
        ids, what = model_input(n, tok, vocab, dev, args.doc_seed)
        active = []
        for m in modes:
            if m in failed:
                rec.add(kind="prefill", mode=m, n=n, skipped=f"mode failed earlier: {failed[m]}")
            elif m == "inductor" and n > args.inductor_max:
                rec.add(kind="prefill", mode=m, n=n, skipped=f"n > --inductor-max {args.inductor_max}: plain "
                        "torch.compile materialises the n x n mask (out of memory at 128K: /work/shared/anchors)")
            else:
                active.append(m)
        rows = {m: dict(kind="prefill", mode=m, n=n, yarn_factor=plan[n], input=what) for m in active}
        times = {m: [] for m in active}
        peaks = {m: 0.0 for m in active}
        with torch.no_grad():
            for m in list(active):   # warm-up; the first call of a compiled mode compiles it
                try:
                    if m not in fns:
                        fns[m], counters[m] = make_model_mode(m, model, args, fns, counters)
                    rows[m]["first_s"] = round(timed_call(fns[m], ids, dev), 3)
                    if m != "eager" and m not in compile_s:
                        compile_s[m] = rows[m]["compile_s"] = rows[m]["first_s"]
                except Exception as exc:  # noqa: BLE001 -- an OOM, a compile error: record, go on
                    rows[m].update(error=err_text(exc), traceback_tail=traceback.format_exc().strip().splitlines()[-6:])
                    if m not in compile_s and m != "eager":
                        failed[m] = rows[m]["error"]
                    active.remove(m)
                    dev.free()
            for rep in range(args.reps):   # timed runs, the modes alternating
                if rep and elapsed() > args.budget_s:
                    break
                for m in list(active):
                    try:
                        dev.reset_peak()
                        times[m].append(timed_call(fns[m], ids, dev))
                        peaks[m] = max(peaks[m], dev.peak_gib() or 0.0)
                    except Exception as exc:  # noqa: BLE001
                        rows[m].update(error=err_text(exc))
                        active.remove(m)
                        dev.free()
        graphs, breaks = graph_counters()
        for m, row in rows.items():
            if times.get(m):
                row.update(ttft_s=round(min(times[m]), 4), all_s=[round(t, 4) for t in times[m]],
                           peak_gib=peaks[m] if dev.cuda else None)
            if m in counters:
                calls = counters[m]()
                row["backend_calls"] = calls
                if li == 0 or m not in after_first:
                    after_first.setdefault(m, calls)
                else:
                    row["recompiled"] = calls != after_first[m]
                be = getattr(fns[m], "_mi_backend", None)
                if be is not None:
                    row["sites"] = site_summary(be)
            row["graph_breaks_all_modes"] = breaks - breaks0
            rec.add(**row)
        del ids
        dev.free()
    profile_modes(args, dev, rec, fns, plan, current, native, tok, vocab)
    for m in modes:
        if m in counters:
            state["compiles"][m] = dict(compile_s=compile_s.get(m), backend_calls=counters[m](),
                                        backend_calls_after_first_length=after_first.get(m),
                                        recompiled_across_lengths=after_first.get(m) is not None
                                        and counters[m]() != after_first[m])
            rec.add(kind="compiles", mode=m, **state["compiles"][m])
    set_yarn(model, None)


def model_goal_checks(rec, args, state, dev):
    rows = prefill_rows(rec)
    checks, tol = [], args.tol

    def add(name, ok, detail):
        checks.append(dict(check=name, status="SKIP" if ok is None else ("PASS" if ok else "FAIL"), detail=detail))

    def ttft(mode, n):
        return (rows.get((mode, n)) or {}).get("ttft_s")

    def ratio(mode, n, limit, name):
        e, m = ttft("eager", n), ttft(mode, n)
        if e is None or m is None:
            add(name, None, f"no data at {n} (eager {e}, {mode} {m})")
        else:
            add(name, m <= limit * e, f"{m:.4f} s vs eager {e:.4f} s = {m / e:.3f}x")

    if "searched" in args.modes:
        for n, goal in MODEL_GOAL_RATIO.items():
            ratio("searched", n, goal, f"searched TTFT <= {goal}x eager at {n}")
        for n in MODEL_GOAL_NOT_SLOWER:
            ratio("searched", n, 1 + tol, f"searched no slower than eager at {n} (tol {tol:.0%})")
        name = "searched peak memory <= eager's at every length"
        pairs = [(n, (rows.get(("searched", n)) or {}).get("peak_gib"), (rows.get(("eager", n)) or {}).get("peak_gib"))
                 for n in sorted(args.lengths)]
        pairs = [(n, a, b) for n, a, b in pairs if a and b]
        if not dev.cuda:
            add(name, None, "CPU run: no CUDA memory stats")
        elif not pairs:
            add(name, None, "no data")
        else:
            add(name, all(a <= b for _, a, b in pairs), "; ".join(f"{n}: {a:.2f} vs {b:.2f} GiB" for n, a, b in pairs))
        c = state["compiles"].get("searched")
        measured = [n for n in args.lengths if ttft("searched", n) is not None]
        if c is None or len(measured) < 2:
            add("searched no recompiles across lengths", None, f"fewer than 2 lengths measured ({len(measured)})")
        else:
            add("searched no recompiles across lengths", not c["recompiled_across_lengths"],
                f"backend calls {c['backend_calls_after_first_length']} after the first length, {c['backend_calls']} "
                f"after all {len(measured)} (YaRN: {state['yarn']['policy']})")
    for mode in [m for m in args.modes if m not in ("eager", "searched")]:
        parts = [f"{n}: {ttft(mode, n) / ttft('eager', n):.3f}x" for n in sorted(args.lengths)
                 if ttft(mode, n) and ttft("eager", n)]
        c = state["compiles"].get(mode, {})
        checks.append(dict(check=f"{mode} vs eager (info)", status="INFO",
                           detail=(", ".join(parts) or "no data") + f"; compile {c.get('compile_s')} s, recompiled "
                                  f"across lengths: {c.get('recompiled_across_lengths')}"))
    checks.append(dict(check="YaRN (info)", status="INFO",
                       detail=f"native context {state['yarn']['native']}; {state['yarn']['policy']}"))
    rec.checks = checks
    rec.save()
    print("\nGoal checks:")
    for c in checks:
        print(f"  {c['status']:<4}  {c['check']}: {c['detail']}")


# ----------------------------------------------------------------------------------------------
# tensor parallelism (--tp N under torchrun): eager TP vs compiled TP, TTFT from rank 0


def _tp_checkpoint(args, dev: Dev, rank: int) -> str:
    """A Hugging Face folder ``from_pretrained(tp_plan="auto")`` can shard: ``--model`` when it is
    one, else the model written once by rank 0 to ``--out`` (random Llama-3-8B shape, --tiny, or
    whatever ``mi_compile.models.load_model`` makes of ``--model``)."""
    import torch.distributed as dist

    if args.model and os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
        return os.path.expanduser(args.model)
    name = (args.model or ("tiny" if args.tiny else "llama8b")).replace(":", "_").replace("/", "_")
    path = os.path.join(args.out, f"tp_checkpoint_{name}")
    if rank == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        if args.model:
            from mi_compile.models import load_model

            model, tok = load_model(args.model, dtype=torch.bfloat16 if dev.cuda else torch.float32)
            if tok is not None:
                tok.save_pretrained(path)
        else:
            model, _ = build_model(args, dev)      # bf16 straight on rank 0's GPU
        model.save_pretrained(path)
        del model
        dev.free()
    dist.barrier()
    return path


def _tp_configs(args, model) -> dict:
    """mode -> per-head config (the whole model's: each rank's backend takes its slice)."""
    from mi_compile.eval.harness import parse_config_spec

    out = {}
    for mode in args.modes:
        if mode == "searched" and args.config:
            out[mode] = parse_config_spec(args.config)[0]
        elif mode in args.extra_configs:
            out[mode] = parse_config_spec(args.extra_configs[mode])[0]
        elif mode == "minference_llama31":
            out[mode] = llama31_config(model.config.num_hidden_layers)
        elif mode in ("minference", "attention_floor"):
            out[mode] = {"minference": UNIFORM_CONFIG, "attention_floor": FLOOR_CONFIG}[mode]
    return out


def run_tp(args):
    """``--tp N`` under ``torchrun --nproc-per-node N``: the model loaded with
    ``from_pretrained(path, tp_plan="auto")`` (each rank holds 1/N of the heads), eager vs
    ``backend="minference"`` compiled per rank (the backend learns its rank's head slice from
    the DTensor weights, :mod:`mi_compile.tensor_parallel`). TTFT per call is the slowest rank's
    (all-reduce max); rank 0 prints and records the rows and the ratios."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mi_compile.backend import MInferenceBackend
    from mi_compile.tensor_parallel import tp_option_from_model

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world != args.tp:
        sys.exit(f"--tp {args.tp} runs under torchrun --nproc-per-node {args.tp} (WORLD_SIZE is {world})")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = Dev(torch.device(f"cuda:{local}") if args.device == "cuda" else torch.device(args.device))
    if dev.cuda:
        torch.cuda.set_device(dev.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.cuda else "gloo", device_id=dev.device if dev.cuda else None)
    path = _tp_checkpoint(args, dev, rank)
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation="sdpa",
                                                 dtype=torch.bfloat16 if dev.cuda else torch.float32).eval()
    tok = None
    if any(f.startswith("tokenizer") for f in os.listdir(path)):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    meta = dict(argv=sys.argv[1:], tp=args.tp, tp_option=tp_option_from_model(model), checkpoint=path,
                torch=torch.__version__, device=torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu",
                lengths=args.lengths, reps=args.reps, min_seq_len=args.min_seq_len,
                calls="model(ids, logits_to_keep=1, use_cache=False) under no_grad on every rank; ttft_s = min "
                      "over --reps of the slowest rank's time")
    rec = Recorder(args.out, meta) if rank == 0 else None
    say = (lambda **row: rec.add(**row)) if rank == 0 else (lambda **row: None)
    fns, backends = {"eager": model}, {}
    for mode, cfg in _tp_configs(args, model).items():
        opts = {"config": cfg} if args.min_seq_len is None else {"config": cfg, "min_seq_len": args.min_seq_len}
        backends[mode] = MInferenceBackend(opts, use_inductor=not args.no_inductor)
        fns[mode] = torch.compile(model, backend=backends[mode], dynamic=True)

    def timed(fn, ids) -> float:
        dist.barrier()
        dev.sync()
        t = time.perf_counter()
        with torch.no_grad():
            fn(ids, logits_to_keep=1, use_cache=False)
        dev.sync()
        slowest = torch.tensor([time.perf_counter() - t], device=dev.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        return float(slowest.item())

    ttft = {}
    for n in sorted(args.lengths):
        ids, what = model_input(n, tok, model.config.vocab_size, dev, args.doc_seed)
        for mode, fn in fns.items():
            if elapsed() > args.budget_s:
                say(kind="tp_ttft", mode=mode, n=n, skipped="time budget spent")
                continue
            dev.reset_peak()
            try:
                first = timed(fn, ids)
                best = min(timed(fn, ids) for _ in range(args.reps))
            except Exception as exc:  # noqa: BLE001 -- one failure must not lose the other rows
                say(kind="tp_ttft", mode=mode, n=n, error=err_text(exc))
                continue
            ttft[mode, n] = best
            row = dict(kind="tp_ttft", mode=mode, n=n, input=what, first_call_s=round(first, 3), ttft_s=round(best, 4),
                       peak_gib=dev.peak_gib())
            be = backends.get(mode)
            if be is not None and be.reports:
                r = be.reports[-1]
                sites = r.sites
                row.update(sparse_sites=sum(s.action == "sparse" for s in sites), sites=len(sites),
                           tp_slice=r.tp.describe(sites[0].q_heads, sites[0].kv_heads) if r.tp and sites else None)
            say(**row)
        del ids
        dev.free()
    if rank == 0:
        print(f"\nTP {args.tp}: TTFT (s), slowest rank; ratio = compiled / eager")
        print(f"{'mode':<22}" + "".join(f"{n:>16}" for n in sorted(args.lengths)))
        for mode in fns:
            cells = []
            for n in sorted(args.lengths):
                t, e = ttft.get((mode, n)), ttft.get(("eager", n))
                cells.append("-" if t is None else f"{t:.3f}" + (f" ({t / e:.2f}x)" if e and mode != "eager" else ""))
            print(f"{mode:<22}" + "".join(f"{c:>16}" for c in cells))
        rec.checks.extend({"mode": m, "n": n, "ratio_vs_eager_tp": round(t / ttft["eager", n], 3)}
                          for (m, n), t in ttft.items() if m != "eager" and ("eager", n) in ttft)
        rec.save()
        print(f"\nrows: {rec.path}  (total {elapsed():.0f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return rec


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a real model (mi_compile.models.load_model: qwen2.5-coder-1.5b / qwen, smollm2, tiny:<family>, "
                        "a .gguf path, a Hugging Face folder), loaded in bf16 (float32 on the CPU); default: the "
                        "random-weight Llama-3-8B shape")
    p.add_argument("--config", default=None,
                   help="--model runs: the searched mode's per-head config (a JSON path or an inline spec such as "
                        "vertical_slash:100:800); default the model's shipped config family (mi_compile/configs/<model>.json: each call runs the member searched for its length), else <model>-128k.json")
    p.add_argument("--configs", nargs="*", default=[], metavar="NAME=PATH_OR_SPEC",
                   help="--model runs: extra compiled modes, each a config (e.g. s32=mi_compile/configs/..._32k.json)")
    p.add_argument("--yarn", choices=("auto", "always", "off"), default="auto",
                   help="--model runs, lengths past the native context: auto = YaRN per length if switching does not "
                        "recompile (probed first), else YaRN for every length; always; off")
    p.add_argument("--doc-seed", type=int, default=0, help="--model runs: which Python-source document is the input")
    p.add_argument("--no-inductor", action="store_true",
                   help="--model runs: minference modes run the rewritten graph without Inductor (CPU smoke runs)")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 8192,32768,65536,131072; "
                   "--model: 8192,16384,32768,65536,131072; a tiny:<family> model on the CPU: 256,512)")
    p.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(ALL_MODES)} (default "
                   f"{','.join(DEFAULT_MODES)}); --model: of {','.join(MODEL_MODES)} and the --configs names "
                   f"(default {','.join(MODEL_DEFAULT_MODES)}), each also as <mode>@gluon / @gluon_ws / @gluon_all / @gluon_sparse_ws: "
                   "the same compiled model with the Gluon Hopper kernels (MI_COMPILE_HOPPER=1 / ws / ws_sparse)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per (mode, length) after warm-up (default 2)")
    p.add_argument("--profile", default="", help="--model runs on CUDA: comma-separated modes to profile once more at "
                   "the longest length (kernel time by category, memory live at the peak; profile_<mode>_<n>.txt)")
    p.add_argument("--inductor-max", type=int, default=32768, help="longest prompt for plain torch.compile")
    p.add_argument("--gen-tokens", type=int, default=32, help="greedy decode steps in the generation check (0: skip it)")
    p.add_argument("--gen-length", type=int, default=None, help="prompt length of the generation check (default 32768)")
    p.add_argument("--no-gen", action="store_true", help="skip the generation check (--model runs have none)")
    p.add_argument("--gen-modes", default="eager,minference",
                   help="modes of the generation check (eager,minference; inductor may be added)")
    p.add_argument("--gen-cache", choices=("dynamic", "static"), default="dynamic",
                   help="KV cache of the generation check: transformers' default DynamicCache, or a "
                        "StaticCache preallocated for prompt + tokens and written in place")
    p.add_argument("--gen-reps", type=int, default=3,
                   help="timed generation runs per compiled mode, each paired with an eager run (default 3)")
    p.add_argument("--min-seq-len", type=int, default=None,
                   help=f"backend min_seq_len (default: the backend's; --model runs: {MODEL_MIN_SEQ_LEN})")
    p.add_argument("--tol", type=float, default=0.03, help="noise tolerance of the 'no slower than eager' checks")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="skip measurements that would start after this many seconds (the run is killed at ~540 s)")
    p.add_argument("--quick", action="store_true", help="lengths 8192,32768, reps 1, gen at 8192")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer tiny llama (CPU smoke test): lengths 256,512, "
                   "min_seq_len 0, inductor-max 256, gen at 256 with 4 steps")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--tp", type=int, default=0, metavar="N",
                   help="tensor parallelism: run under torchrun --nproc-per-node N; the model is loaded with "
                        "from_pretrained(tp_plan='auto') and eager TP vs compiled TP TTFT is reported (run_tp)")
    a = p.parse_args(argv)
    if a.tp == 1 or a.tp < 0:
        p.error("--tp takes the number of ranks, >= 2 (leave it out for one process)")
    if a.model and a.tiny:
        p.error("--tiny is the random-weight tiny llama; for a tiny model of another family use --model tiny:<family>")
    a.profile = [m for m in a.profile.split(",") if m]
    a.extra_configs = {}
    for spec in a.configs:
        if "=" not in spec:
            p.error(f"--configs takes NAME=PATH_OR_SPEC, got {spec!r}")
        k, v = spec.split("=", 1)
        a.extra_configs[k] = v
    if a.model:
        small = a.model.startswith("tiny:") and a.device == "cpu"
        a.lengths = [int(x) for x in (a.lengths or ("256,512" if small else ",".join(map(str, MODEL_LENGTHS)))).split(",")
                     if x]
        a.reps = a.reps or (1 if small else 2)
        a.min_seq_len = (0 if small else MODEL_MIN_SEQ_LEN) if a.min_seq_len is None else a.min_seq_len
        if small:
            a.inductor_max = min(a.inductor_max, 256)
        a.modes = [m for m in (a.modes or ",".join(MODEL_DEFAULT_MODES)).split(",") if m]
        bad = [m for m in a.modes if gluon_base(m)[0] not in (*MODEL_MODES, *a.extra_configs)]
        if bad:
            p.error(f"unknown mode(s) {bad} for --model; known: {MODEL_MODES} and the --configs names")
        for m in a.extra_configs:
            if m not in a.modes:
                a.modes.append(m)
        if "eager" not in a.modes:
            a.modes.insert(0, "eager")
        if "searched" in a.modes and not a.config:
            from mi_compile.eval.harness import searched_default

            a.config = searched_default(a.model, max(a.lengths))
        return a
    if a.tiny:
        a.lengths = a.lengths or "256,512"
        a.min_seq_len = 0 if a.min_seq_len is None else a.min_seq_len
        a.inductor_max = min(a.inductor_max, 256)
        a.gen_length = a.gen_length or 256
        a.gen_tokens = min(a.gen_tokens, 4)
        a.reps = a.reps or 1
    if a.quick:
        a.lengths = a.lengths or "8192,32768"
        a.reps = a.reps or 1
        a.gen_length = a.gen_length or 8192
    a.lengths = [int(x) for x in (a.lengths or "8192,32768,65536,131072").split(",") if x]
    a.reps = a.reps or 2
    a.gen_length = a.gen_length or 32768
    a.modes = [m for m in (a.modes or ",".join(DEFAULT_MODES)).split(",") if m]
    bad = [m for m in a.modes if m not in ALL_MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; known: {ALL_MODES}")
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.tp:
        return run_tp(args)
    dev = Dev(torch.device(args.device))
    if dev.cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --device cpu --tiny (or --model tiny:qwen2) for a smoke run")
    import transformers

    import mi_compile  # noqa: F401  (registers the op and the backend)

    meta = dict(argv=sys.argv[1:] if argv is None else list(argv), torch=torch.__version__,
                transformers=transformers.__version__,
                device=torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu",
                model=args.model or ("tiny llama" if args.tiny else "Llama-3-8B shape, random weights"),
                lengths=args.lengths, modes=args.modes, reps=args.reps, tiny=args.tiny,
                min_seq_len=args.min_seq_len, inductor_max=args.inductor_max, budget_s=args.budget_s)
    if args.model:
        meta.update(config=args.config, extra_configs=args.extra_configs, inductor_dynamic=True,
                    minference_inductor=not args.no_inductor, order=measure_order(args.lengths),
                    calls="model(ids, logits_to_keep=1, use_cache=False) under no_grad; ttft_s = min of --reps timed "
                          "calls after a warm-up, the modes alternating")
    else:
        meta.update(gen_length=args.gen_length, gen_tokens=args.gen_tokens)
    rec = Recorder(args.out, meta)
    print(json.dumps({"meta": meta}, default=str), flush=True)

    t = time.perf_counter()
    tok = None
    if args.model:
        from mi_compile.models import load_model

        model, tok = load_model(args.model, dtype=torch.bfloat16 if dev.cuda else torch.float32, device=dev.device)
        model.eval()
    else:
        model, cfg = build_model(args, dev)
    dev.sync()
    rec.add(kind="model", params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            init_s=round(time.perf_counter() - t, 1), dtype=str(next(model.parameters()).dtype),
            weights_gib=dev.peak_gib(), layers=model.config.num_hidden_layers,
            heads=model.config.num_attention_heads, kv_heads=getattr(model.config, "num_key_value_heads", None))

    state = {"compiles": {}}
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.model:
            run_model(args, dev, rec, model, tok, state)
        else:
            # inductor last: a reference only, slowest to compile; the generation check before it
            for mode in [m for m in args.modes if m != "inductor"]:
                run_mode(mode, model, args, dev, rec, args.lengths, state)
            if not args.no_gen and args.gen_tokens > 0:
                run_gen(model, args, dev, rec, state)
            if "inductor" in args.modes:
                run_mode("inductor", model, args, dev, rec, args.lengths, state)
    except (Terminated, KeyboardInterrupt) as exc:
        rec.add(kind="terminated", reason=str(exc) or type(exc).__name__)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    print_table(rec, args.modes, sorted(args.lengths))
    if args.model:
        model_goal_checks(rec, args, state, dev)
    else:
        goal_checks(rec, args, state, args.modes, args.lengths, dev)
    print(f"\nrows: {rec.path}  (total {elapsed():.0f} s)", flush=True)
    if any(r.get("kind") == "terminated" for r in rec.rows):
        sys.exit(143)
    return rec


if __name__ == "__main__":
    main()
