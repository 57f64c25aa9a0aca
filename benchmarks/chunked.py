"""Prefills that continue a cache, timed side by side: a follow-up turn against a long cached
context (multi-turn use), and one long prompt prefilled in chunks (chunked prefill).

    OUT=/tmp/chunked python3 -m benchmarks.chunked --model qwen2.5-coder-1.5b            # GPU, ~3 min
    python3 -m benchmarks.chunked --model tiny:qwen2 --device cpu --no-inductor --context 512 --turn 128 \\
        --chunk 256 --config vertical_slash:16:64 --min-seq-len 0                       # CPU smoke run

* ``turn``: the context (``--context`` tokens of Python source) is prefilled once by the eager
  model into a ``DynamicCache``; then the turn (``--turn`` new tokens) is prefilled on that cache
  by eager and by each compiled mode in alternation, the cache set back to the context's tensors
  after every call (``--reps`` timed calls each after a warm-up that compiles). Goal: the searched
  config's turn <= 0.5x eager's.
* ``chunked``: the whole context prefilled by the compiled searched mode at once and in pieces of
  ``--chunk`` tokens (each continuing the cache), and by eager at once. Goal: chunked <= 1.15x
  unchunked; the next-token argmax of the two is recorded. One more untimed pass per chunked
  mode synchronises after every piece: its seconds per piece go to the row as ``piece_s``
  (the timed totals never synchronise between pieces).

``--profile`` (CUDA): after the timed turns, each mode's host time and device time per kernel
(``profile_turn_<mode>.txt``); after the timed prefills, each compiled mode's whole and chunked
prefill profiled once (``profile_chunked_<mode>_whole.txt`` / ``_chunk<size>.txt``), and the
chunks against the whole prefill by category and kernel (``profile_chunked_<mode>_diff.txt``).

Modes: ``searched`` (``--config``, default the model's shipped config family, else its 128K config) and
``--configs NAME=PATH_OR_SPEC`` extras, each ``torch.compile(model, backend=MInferenceBackend,
dynamic=True)``. ``--absolute-chunks`` adds ``absolute`` (chunked phase only): the searched
config without its ``"length"`` key (written to ``$OUT/absolute_config.json``), so chunks keep
the config's absolute vertical counts instead of their share of a ``length``-token prompt's
columns (an A/B of that scaling). ``--compare-topk`` adds ``<mode>@top_select`` for every
compiled mode: the same compiled graph with the vertical-slash top-k made by the Triton select
kernel (``SELECT_CONFIG["kernel"]``, read by the op at every call) instead of ``torch.topk``
(a ``_cg`` mode's gets a compile of its own: a graph replays what it recorded);
``--cudagraphs`` adds ``<mode>_cg``, the same config compiled with ``mode="reduce-overhead"``
(CUDA graphs, one per chunk shape: a chunk's host time gone, only its device time left; the
warm-up call and the first timed one record, the best timed call replays; each call is a graph
step of its own and copies a ``DynamicCache``'s tensors out of the graphs' pool after it, timed
with it: ``call_continuing``); ``--cudagraphs-only`` runs the compiled modes that way only
(eager stays the plain model). ``--cache static --phases chunked``: the chunks continue a
``StaticCache`` of the context's length instead (one chunk shape; each chunk is held to
``min_seq_len`` by all of the cache's slots, so the first runs sparse too). A mode whose timed
call fails is dropped with its error row. Lengths past the model's native context run with
YaRN. Rows go to ``$OUT/chunked.json`` as they are measured, with peak memory per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.e2e import Dev, err_text


def _sync_time(fn, dev: Dev) -> float:
    dev.sync()
    t = time.perf_counter()
    fn()
    dev.sync()
    return time.perf_counter() - t


class Rows:
    def __init__(self, path: str, meta: dict):
        self.path, self.data = path, dict(meta=meta, rows=[])

    def add(self, **row):
        self.data["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=1, default=str)


def write_absolute_config(spec: str, out: str) -> tuple[str, int | None]:
    """The config of ``spec`` (a path, a shipped name or an inline spec) without its top-level
    ``"length"`` key, written as ``out/absolute_config.json``: chunks that continue a cache then
    keep the config's absolute vertical counts. Returns the path and the removed length (``None``:
    the config had none, and the copy is the same config)."""
    from mi_compile.eval.harness import parse_config_spec

    config = parse_config_spec(spec)[0]
    if isinstance(config, dict):
        doc = json.loads(json.dumps(config))
    else:
        with open(config) as f:
            doc = json.load(f)
    length = doc.pop("length", None)
    path = os.path.join(out, "absolute_config.json")
    os.makedirs(out or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path, length


def make_modes(model, args) -> dict:
    from mi_compile.backend import MInferenceBackend
    from mi_compile.eval.harness import parse_config_spec

    specs = {"searched": args.config, **dict(s.split("=", 1) for s in args.configs)}
    if getattr(args, "absolute_config", None):
        specs["absolute"] = args.absolute_config
    cg_only = getattr(args, "cudagraphs_only", False)
    graphs = ([] if cg_only else [None]) + (["reduce-overhead"] if getattr(args, "cudagraphs", False) or cg_only else [])

    def compiled(spec, mode):
        options = {"config": parse_config_spec(spec)[0], "min_seq_len": args.min_seq_len}
        if mode:
            options["mode"] = mode
        be = MInferenceBackend(options, use_inductor=not args.no_inductor)
        fn = torch.compile(model, backend=be, dynamic=True)
        # on the wrapper itself: OptimizedModule.__setattr__ would set it on the shared model,
        # every mode (eager too) then reporting the last backend's sites
        object.__setattr__(fn, "_mi_backend", be)
        object.__setattr__(fn, "_mi_cudagraphs", bool(mode))
        return fn

    fns, spec_of = {"eager": model}, {}
    for name, spec in specs.items():
        for mode in graphs:
            key = f"{name}_cg" if mode else name
            fns[key], spec_of[key] = compiled(spec, mode), spec
    if getattr(args, "compare_topk", False):
        for name, spec in spec_of.items():
            # a CUDA graph replays the launches it recorded, so the select kernel's mode needs
            # graphs of its own (recorded with the kernel on): its own compile
            fn = compiled(spec, "reduce-overhead") if fns[name]._mi_cudagraphs else fns[name]
            fns[f"{name}@top_select"] = with_top_select(fn)
    return fns


def with_top_select(fn):
    """``fn`` with the Triton top-k select kernel on for the length of each call (the op reads
    ``SELECT_CONFIG`` when it builds an index, so no recompile)."""
    from mi_compile.kernels.top_select import SELECT_CONFIG

    def call(*args, **kwargs):
        saved = SELECT_CONFIG["kernel"]
        SELECT_CONFIG["kernel"] = True
        try:
            return fn(*args, **kwargs)
        finally:
            SELECT_CONFIG["kernel"] = saved
    call._mi_backend = getattr(fn, "_mi_backend", None)
    call._mi_cudagraphs = getattr(fn, "_mi_cudagraphs", False)
    return call


def call_continuing(fn, cache, ids, **kwargs):
    """``fn(ids)`` continuing ``cache``, ``ids`` with contiguous strides (a piece of
    ``context.split`` has the context's row stride, which would compile the model once more;
    the cache's K / V the backend stores contiguous itself). Under CUDA graphs (``<mode>_cg``)
    each call is a step of its own, and a ``DynamicCache``'s tensors are copied out of the
    graphs' memory pool afterwards (:func:`mi_compile.contiguous_cache` with ``copy``): they are
    a graph's outputs, and the next replay would overwrite them while the cache still holds them
    (a few ms for a 128K cache). A ``StaticCache`` is written in place, its tensors at fixed
    addresses: nothing to copy."""
    from mi_compile.generation import contiguous_cache, standard_strides

    graphs = getattr(fn, "_mi_cudagraphs", False)
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    out = fn(standard_strides(ids), past_key_values=cache, use_cache=True, **kwargs)
    if graphs:
        contiguous_cache(cache, copy=True)
    return out


def timed_rounds(reps: int, times: dict, run, rows, kind: str) -> None:
    """``reps`` rounds over ``times``' keys in alternation, appending ``run(key)``'s seconds; a
    key whose call fails is dropped with its error in a ``<kind>_error`` row, the others go on."""
    for _ in range(reps):
        for key in list(times):
            try:
                times[key].append(run(key))
            except Exception as exc:  # noqa: BLE001 -- one mode's failure must not lose the others
                rows.add(kind=f"{kind}_error", mode=key if isinstance(key, str) else key[0],
                         error=err_text(exc), **({} if isinstance(key, str) else {"chunk": key[1]}))
                times.pop(key)


def sites_of(fn) -> dict | None:
    """How the backend treated the graphs it saw: sparse sites, and why others stayed dense."""
    be = getattr(fn, "_mi_backend", None)
    if be is None:
        return None
    sites = [s for r in be.reports for s in r.sites]
    return dict(graphs=len(be.reports), sparse=sum(s.action == "sparse" for s in sites),
                dense_reasons=sorted({s.reason for s in sites if s.action != "sparse"})[:6])


def run_turn(args, dev, rows, model, fns, context, turn):
    """Each mode prefills ``turn`` on the eager model's cache of ``context`` (set back after
    every call), warm-up first, then ``--reps`` rounds in alternation."""
    from transformers import DynamicCache

    from mi_compile.generation import contiguous_cache

    n = context.shape[1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(context, past_key_values=cache, use_cache=True, logits_to_keep=1)
    # every turn continues the same contiguous tensors (a crop would leave views of the longer
    # ones, whose strides compile the turn's graph once more)
    context_kv = [(layer.keys, layer.values) for layer in contiguous_cache(cache).layers]
    times: dict[str, list] = {m: [] for m in fns}
    peak: dict[str, float] = {}

    def call(fn):
        with torch.no_grad():
            out = call_continuing(fn, cache, turn, logits_to_keep=1)
        for layer, (keys, values) in zip(cache.layers, context_kv):     # back to the context
            layer.keys, layer.values = keys, values
        return out

    for m, fn in fns.items():
        try:
            dev.reset_peak()
            wall = _sync_time(lambda: call(fn), dev)
            peak[m] = dev.peak_gib()
            rows.add(kind="turn_warmup", mode=m, context=n, turn=turn.shape[1], wall_s=round(wall, 3),
                     sites=sites_of(fn))
        except Exception as exc:  # noqa: BLE001 -- one mode's failure must not lose the others
            rows.add(kind="turn_warmup", mode=m, error=err_text(exc))
            times.pop(m)
    timed_rounds(args.reps, times, lambda m: _sync_time(lambda: call(fns[m]), dev), rows, "turn")
    eager = min(times["eager"]) if times.get("eager") else None
    for m, ts in times.items():
        rows.add(kind="turn", mode=m, context=n, turn=turn.shape[1], turn_s=round(min(ts), 4),
                 all_s=[round(t, 4) for t in ts], vs_eager=round(min(ts) / eager, 3) if eager else None,
                 peak_gib=peak.get(m), sites=sites_of(fns[m]))
    if args.profile and dev.cuda:
        profile_turn(args, dev, rows, fns, call, times)
    del cache
    dev.free()


def profile_turn(args, dev, rows, fns, call, times):
    """Where a turn's time goes, per mode: host seconds until the call returns (the GPU idle
    at the start, so a host-bound call returns about when the GPU is done) against the
    synchronised time, and the device time per kernel category (``--profile``)."""
    for m in times:
        host = []
        for _ in range(max(args.reps, 2)):
            dev.sync()
            t = time.perf_counter()
            call(fns[m])
            host.append(time.perf_counter() - t)
            dev.sync()
        kt = _kernel_profile(args, rows, lambda f=fns[m]: call(f),
                             f"{m}: a {args.turn}-token turn after {args.context} cached tokens",
                             f"profile_turn_{m}.txt", kind="turn_profile", mode=m)
        if kt is not None:
            rows.add(kind="turn_profile", mode=m, host_s=round(min(host), 4), turn_s=round(min(times[m]), 4),
                     kernels=kt)


def _kernel_profile(args, rows, fn, title, filename, **row):
    """Device time per kernel category of one ``fn()`` (``gpu_profile.kernel_times``), written
    under ``title`` to ``--out``/``filename`` and printed; None, with ``row`` plus the error
    recorded, when the profiler fails (that must not lose the run)."""
    from mi_compile.debug import gpu_profile

    try:
        kt = gpu_profile.kernel_times(fn)
    except Exception as exc:  # noqa: BLE001
        rows.add(**row, error=err_text(exc))
        return None
    text = f"{title}\n\n{gpu_profile.format_kernel_times(kt)}\n"
    with open(os.path.join(args.out, filename), "w") as f:
        f.write(text)
    print(text, flush=True)
    return kt


def run_chunked(args, dev, rows, model, fns, context):
    """The context prefilled at once by eager and by each compiled mode, and in ``--chunk``
    pieces by each compiled mode; total times and the next-token argmax."""
    from transformers import DynamicCache, StaticCache

    def prefill(fn, chunk=None, piece_s=None):
        """``piece_s`` (a list): synchronise around every piece and append its seconds (only in
        the extra untimed pass; the timed calls never synchronise between pieces)."""
        cache = (StaticCache(config=model.config, max_cache_len=context.shape[1]) if args.cache == "static"
                 else DynamicCache(config=model.config))
        with torch.no_grad():
            for piece in ([context] if not chunk else context.split(chunk, dim=1)):
                if piece_s is not None:
                    dev.sync()
                    t = time.perf_counter()
                out = call_continuing(fn, cache, piece, logits_to_keep=1)
                if piece_s is not None:
                    dev.sync()
                    piece_s.append(time.perf_counter() - t)
        return int(out.logits[0, -1].argmax())

    variants = [(m, None) for m in fns] + [(m, args.chunk) for m in fns if m != "eager"]
    times: dict[tuple, list] = {}
    first: dict[tuple, int] = {}
    for v in variants:
        try:
            dev.reset_peak()
            wall = _sync_time(lambda: first.__setitem__(v, prefill(fns[v[0]], v[1])), dev)
            rows.add(kind="chunked_warmup", mode=v[0], chunk=v[1], wall_s=round(wall, 3), peak_gib=dev.peak_gib())
            times[v] = []
        except Exception as exc:  # noqa: BLE001
            rows.add(kind="chunked_warmup", mode=v[0], chunk=v[1], error=err_text(exc))
        dev.free()
    def timed(v):
        try:
            return _sync_time(lambda: prefill(fns[v[0]], v[1]), dev)
        finally:
            dev.free()
    timed_rounds(args.reps, times, timed, rows, "chunked")
    pieces: dict[tuple, dict] = {}     # one extra pass per chunked mode, synchronised per piece
    for v in times:
        if v[1]:
            secs: list = []
            try:
                prefill(fns[v[0]], v[1], piece_s=secs)
                pieces[v] = dict(piece_s=[round(t, 4) for t in secs])
            except Exception as exc:  # noqa: BLE001 -- the timed totals stand without it
                pieces[v] = dict(piece_s=[round(t, 4) for t in secs], piece_error=err_text(exc))
            dev.free()
    for (m, c), ts in times.items():
        whole = times.get((m, None))
        rows.add(kind="chunked", mode=m, chunk=c, context=context.shape[1], prefill_s=round(min(ts), 4),
                 all_s=[round(t, 4) for t in ts],
                 vs_unchunked=round(min(ts) / min(whole), 3) if c and whole else None,
                 vs_eager=round(min(ts) / min(times[("eager", None)]), 3) if times.get(("eager", None)) else None,
                 next_token=first.get((m, c)), same_next_token=first.get((m, c)) == first.get((m, None)),
                 **pieces.get((m, c), {}), sites=sites_of(fns[m]))
    if args.profile and dev.cuda:
        profile_chunked(args, dev, rows, fns, prefill, times, context.shape[1])


def profile_chunked(args, dev, rows, fns, prefill, times, n):
    """Where a prefill's time goes (``--profile``): each compiled mode's whole and chunked
    prefill of the ``n``-token context profiled once (device time per kernel category),
    written to ``profile_chunked_<mode>_whole.txt`` / ``_chunk<size>.txt`` under ``--out``,
    and what the chunks spend beyond the whole prefill (``_diff.txt``, a row
    ``chunked_profile_diff``)."""
    from mi_compile.debug import gpu_profile

    reports: dict[tuple, dict] = {}
    for (m, c), ts in times.items():
        if m == "eager":
            continue
        how = f"in {c}-token chunks" if c else "whole"
        kt = _kernel_profile(args, rows, lambda f=fns[m], c=c: prefill(f, c),
                             f"{m}: a {n}-token prompt prefilled {how}",
                             f"profile_chunked_{m}_{f'chunk{c}' if c else 'whole'}.txt",
                             kind="chunked_profile", mode=m, chunk=c)
        dev.free()
        if kt is not None:
            reports[(m, c)] = kt
            rows.add(kind="chunked_profile", mode=m, chunk=c, prefill_s=round(min(ts), 4), kernels=kt)
    for (m, c), kt in reports.items():
        if c and (m, None) in reports:
            diff = gpu_profile.kernel_time_diff(reports[(m, None)], kt)
            text = (f"{m}: a {n}-token prompt in {c}-token chunks against its whole prefill\n\n"
                    f"{gpu_profile.format_kernel_diff(diff, 'whole', 'chunks')}\n")
            with open(os.path.join(args.out, f"profile_chunked_{m}_diff.txt"), "w") as f:
                f.write(text)
            print(text, flush=True)
            rows.add(kind="chunked_profile_diff", mode=m, chunk=c, **diff)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.chunked", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b", help="a name mi_compile.models.load_model takes")
    p.add_argument("--config", default=None, help="the searched mode's config (default: the model's shipped config family, else its 128K config)")
    p.add_argument("--configs", nargs="*", default=[], metavar="NAME=PATH_OR_SPEC", help="more compiled modes")
    p.add_argument("--context", type=int, default=131072, help="cached context tokens (default 131072)")
    p.add_argument("--turn", type=int, default=2048, help="tokens of the follow-up turn (default 2048)")
    p.add_argument("--chunk", type=int, default=16384, help="chunk size of the chunked prefill (default 16384)")
    p.add_argument("--phases", default="turn,chunked", help="comma-separated: turn, chunked")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--min-seq-len", type=int, default=32768,
                   help="backend min_seq_len, compared with the keys' length (default 32768)")
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="after the timed turns: each mode's host time and device time per kernel; after "
                        "the timed prefills: each compiled mode's whole and chunked prefill's device time "
                        "per kernel (GPU)")
    p.add_argument("--absolute-chunks", action="store_true",
                   help="one more compiled mode, absolute: the searched config without its \"length\" key "
                        "(chunks keep the absolute vertical counts; written to OUT/absolute_config.json)")
    p.add_argument("--compare-topk", action="store_true",
                   help="each compiled mode again as <mode>@top_select: the Triton top-k select kernel instead of torch.topk")
    p.add_argument("--cudagraphs", action="store_true",
                   help="each compiled mode again as <mode>_cg, compiled with mode=\"reduce-overhead\" (CUDA graphs: "
                        "one recorded per chunk shape, no host time per launch)")
    p.add_argument("--cudagraphs-only", action="store_true",
                   help="each compiled mode as <mode>_cg only (CUDA graphs; half the compiles of --cudagraphs)")
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic",
                   help="the chunked phase's cache: DynamicCache (grows with each chunk) or StaticCache (the "
                        "context's length, written in place: one chunk shape, the op gathers the filled slots)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    if set(args.phases) - {"turn", "chunked"} or min(args.context, args.turn, args.chunk, args.reps) < 1:
        p.error("bad --phases / lengths / reps")
    if args.cache == "static" and "turn" in args.phases:
        p.error("--cache static times the chunked phase only (the turn phase sets its cache back after every call): "
                "add --phases chunked")
    if args.absolute_chunks and any(s.split("=", 1)[0] == "absolute" for s in args.configs):
        p.error("--absolute-chunks names its mode absolute: rename the --configs mode of that name")
    return args


def main(argv=None):
    args = parse_args(argv)
    from mi_compile.eval.harness import searched_default
    from mi_compile.eval.tasks import code_document
    from mi_compile.models import load_model, native_context, set_yarn, yarn_factor_for

    dev = Dev(torch.device(args.device))
    dtype = torch.bfloat16 if dev.cuda else torch.float32
    model, tok = load_model(args.model, dtype=dtype, device=dev.device)
    args.config = args.config or searched_default(args.model)
    absolute = None
    if args.absolute_chunks:
        args.absolute_config, length = write_absolute_config(args.config, args.out)
        absolute = dict(config=args.absolute_config, length_removed=length,
                        note=None if length is not None else "the config has no \"length\": an identical copy")
    native = native_context(model)
    factor = yarn_factor_for(args.context + args.turn, native)
    if factor:
        set_yarn(model, factor, original=native)
    if tok is not None:
        context = torch.tensor([code_document(tok, args.context, seed=0)], device=dev.device)
        turn = torch.tensor([code_document(tok, args.turn, seed=7)], device=dev.device)
    else:
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        context = torch.randint(0, vocab, (1, args.context), generator=g).to(dev.device)
        turn = torch.randint(0, vocab, (1, args.turn), generator=g).to(dev.device)
    meta = dict(model=args.model, device=torch.cuda.get_device_name(dev.device) if dev.cuda else "cpu",
                torch=torch.__version__, dtype=str(dtype), yarn=factor, config=args.config,
                extra=args.configs, absolute=absolute, cache=args.cache, min_seq_len=args.min_seq_len, inductor=not args.no_inductor,
                context=args.context, turn=args.turn, chunk=args.chunk, input="python source" if tok else "random ids")
    rows = Rows(os.path.join(args.out, "chunked.json"), meta)
    fns = make_modes(model, args)
    if "turn" in args.phases:
        # not absolute: a turn after the whole cached context has about the config's length in
        # keys, where the scaled counts are the absolute ones (one compile saved)
        run_turn(args, dev, rows, model, {m: f for m, f in fns.items() if not m.startswith("absolute")}, context, turn)
    if "chunked" in args.phases:
        run_chunked(args, dev, rows, model, fns, context)
    for r in rows.data["rows"]:
        if r["kind"] in ("turn", "chunked"):
            print(f"{r['kind']:<8} {r['mode']:<20} chunk {str(r.get('chunk') or '-'):>6} "
                  f"{r.get('turn_s', r.get('prefill_s')):.4f} s  vs eager {r.get('vs_eager')}"
                  + (f"  vs unchunked {r['vs_unchunked']}" if r.get("vs_unchunked") else ""))


if __name__ == "__main__":
    main()
