"""Host overhead of ``torch.ops.mi_compile.sparse_attention`` (GPU; ``--device cpu`` dry run).

For each length (default 2K, 16K, 32K, 128K), shape q ``[1, 12, n, 128]``, k/v ``[1, 2, n, 128]``
bf16, a layer mixing vertical-slash (1000, 6096), vertical-slash (100, 800), block-sparse
(top-100) and A-shape (128 + 1024) heads, ``min_seq_len=0`` (always sparse):

a. host time of one call: ``torch.cuda.synchronize()`` first, then the wall time until the
   Python call returns (the GPU queue is empty, so no launch waits), mean over many calls;
b. the whole call, synchronised (wall time until the GPU is done), median;
c. the same call captured once in a CUDA graph (``torch.cuda.graph``) and replayed, median
   (the replay's output must equal the eager call's, bit for bit);
d. dense causal SDPA on the same inputs, for reference (host and synchronised);
e. ops: torch ops the call dispatches (a ``TorchDispatchMode`` counter; Triton launches are
   not torch ops and are not counted);

plus checks that the fused index builder gives the PyTorch builder's tables bit for bit
(2K, 16K, and a left-padded batch), and (f) a 2-layer tiny Llama with these heads compiled
through the backend, default vs ``options={"mode": "reduce-overhead"}`` (CUDA graphs): host
and synchronised time per forward, CUDA-graph skips (must be 0), logits equal.

    python3 -m benchmarks.host_overhead                        # GPU, < 3 min on an H200
    python3 -m benchmarks.host_overhead --device cpu           # dry run: tiny n, reference impl
    python3 -m benchmarks.host_overhead --baseline DIR         # also time the package in DIR

Prints a table and writes ``$OUT/host_overhead.json`` (``--out`` to change). ``--baseline DIR``
runs (a), (b), (e) again in a subprocess with ``DIR/mi_compile`` (e.g. an earlier checkout)
for a before/after in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--lengths", default=None, help="comma-separated (default 2048,16384,32768,131072; cpu 256,512)")
    p.add_argument("--model-length", type=int, default=None,
                   help="prompt of the tiny-model step (default 16384; cpu 256)")
    p.add_argument("--model-modes", default="default,reduce-overhead")
    p.add_argument("--no-model", action="store_true", help="skip the compiled tiny-model step")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/host_overhead.json)")
    p.add_argument("--baseline", default=None, help="folder holding another mi_compile package to time as well")
    p.add_argument("--profile", action="store_true",
                   help="host time of each phase of one call and a cProfile of the call, at the first length")
    p.add_argument("--query-len", type=int, default=0,
                   help="queries per call (a chunk continuing a cache: the last rows against all n keys; "
                        "default n)")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)        # import mi_compile from here
    p.add_argument("--op-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.root:   # measure another checkout of the package (--baseline runs one in a subprocess)
    sys.path.insert(0, ARGS.root)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mi_compile  # noqa: E402


def _load_op_counter():
    """This checkout's OpCounter, also when ``--root`` points the imports at an older tree."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_op_count", os.path.join(HERE, "..", "mi_compile", "debug", "op_count.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OpCounter


OpCounter = _load_op_counter()
import mi_compile.op as op_module  # noqa: E402
from mi_compile.kernels.dispatch import interpreting  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, encode_heads  # noqa: E402

CUDA = ARGS.device == "cuda"
DEV = ARGS.device
DT = torch.bfloat16 if CUDA else torch.float32
B, HQ, HKV = 1, 12, 2
D = 128 if CUDA else 32
LENGTHS = [int(x) for x in (ARGS.lengths or ("2048,16384,32768,131072" if CUDA else "256,512")).split(",")]
MODEL_N = ARGS.model_length or (16384 if CUDA else 256)
HEADS = [HP("vertical_slash", vertical=1000, slash=6096), HP("vertical_slash", vertical=100, slash=800),
         HP("block_sparse", topk=100), HP("a_shape", sink=128, local=1024)] * (HQ // 4)
ENC = encode_heads(HEADS)
rows, checks = [], []


def log(*a):
    print(*a, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def reps_for(n):
    if not CUDA:
        return 5
    return 60 if n <= 4096 else 30 if n <= 32768 else 6


def inputs(n, seed=0):
    """q ``[B, HQ, nq, D]`` (nq = ``--query-len`` or n), k/v ``[B, HKV, n, D]``."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nq = min(ARGS.query_len, n) if ARGS.query_len else n
    return tuple(torch.randn(B, h, m, D, device=DEV, dtype=DT, generator=g) for h, m in ((HQ, nq), (HKV, n), (HKV, n)))


def op_call(q, k, v):
    return torch.ops.mi_compile.sparse_attention(q, k, v, ENC, None, None, 0, 0, 0)


def dense_call(q, k, v):
    if q.shape[-2] < k.shape[-2]:     # a chunk: the bottom-right causal mask
        return op_module.dense_attention(q, k, v, None)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def host_ms(fn, reps):
    """(a): mean wall time of the call alone, the GPU idle when it starts."""
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sync()
    return 1e3 * statistics.mean(times), 1e3 * statistics.median(times)


def full_ms(fn, reps):
    """(b): median wall time of the call until the device is done."""
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)



def count_ops(q, k, v):
    """(e): torch ops dispatched inside one call (the op's implementation, run directly)."""
    with OpCounter() as c:
        op_module._sparse_attention_impl(q, k, v, ENC, None, None, 0, 0, 0)
    sync()
    return sum(c.counts.values()), dict(c.counts.most_common(8))


def graph_ms(q, k, v, reps, eager_out):
    """(c): capture the call once, replay it; the replay must reproduce the eager output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            op_call(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op_call(q, k, v)
    graph.replay()
    sync()
    same = bool(torch.equal(out, eager_out))
    ms = full_ms(graph.replay, reps)
    host = host_ms(graph.replay, reps)[0]
    del graph
    return ms, host, same


def bench_length(n):
    q, k, v = inputs(n)
    reps = reps_for(n)
    for _ in range(3):                       # compile the kernels, fill the caches
        out = op_call(q, k, v)
    sync()
    row = {"n": n, "query_len": q.shape[-2], "reps": reps}
    row["ops_per_call"], row["top_ops"] = count_ops(q, k, v)
    row["host_ms_mean"], row["host_ms_median"] = host_ms(lambda: op_call(q, k, v), reps)
    row["full_ms"] = full_ms(lambda: op_call(q, k, v), reps)
    if not ARGS.op_only:
        dense_call(q, k, v)
        row["dense_host_ms"] = host_ms(lambda: dense_call(q, k, v), reps)[0]
        row["dense_full_ms"] = full_ms(lambda: dense_call(q, k, v), reps)
        if CUDA:
            eager = op_call(q, k, v).clone()
            row["graph_replay_ms"], row["graph_replay_host_ms"], row["graph_equals_eager"] = graph_ms(
                q, k, v, reps, eager)
    rows.append(row)
    log(json.dumps(row))
    del q, k, v, out
    if CUDA:
        torch.cuda.empty_cache()


def check(name, fn):
    try:
        t = time.time()
        value = fn()
        checks.append({"check": name, "ok": bool(value), "s": round(time.time() - t, 1)})
        log(f"CHECK {name}: {'ok' if value else 'FAILED'}")
    except Exception as e:  # noqa: BLE001
        checks.append({"check": name, "ok": False, "error": repr(e)[:300]})
        log(f"CHECK {name} FAILED: {e!r}")
        traceback.print_exc()


def tables_equal(n, padded=False):
    """The fused builder's tables equal the PyTorch builder's, bit for bit."""
    from mi_compile.patterns.index import build_index, normalize_sequences
    from mi_compile.sparse import sparse_attention_from_index
    b = 2 if padded else 1
    g = torch.Generator(device=DEV).manual_seed(5)
    q = torch.randn(b, HQ, n, D, device=DEV, dtype=DT, generator=g)
    k = torch.randn(b, HKV, n, D, device=DEV, dtype=DT, generator=g)
    v = torch.randn(b, HKV, n, D, device=DEV, dtype=DT, generator=g)
    if padded:   # one full row, one left-padded to 60% of it
        lens = torch.tensor([n, (3 * n) // 5], dtype=torch.int32, device=DEV)
        starts = n - lens
        ss, sl = normalize_sequences(q, starts, lens)
    else:
        ss, sl = normalize_sequences(q, None, None)
    fused = build_index(q, k, HEADS, D ** -0.5, ss, sl, unpadded=not padded,
                        tables="triton" if (CUDA or interpreting()) else "torch")
    plain = build_index(q, k, HEADS, D ** -0.5, ss, sl, unpadded=not padded, tables="torch")
    fields = ["prefix", "sink", "band", "group_lo", "group_hi", "groups_upto", "tile_start", "tile_end",
              "tiles_upto", "columns", "columns_upto", "covered", "blocks", "block_count", "offsets"]
    diff = [f for f in fields if not torch.equal(getattr(fused, f), getattr(plain, f))]
    if diff:
        log(f"  tables differ: {diff}")
    same_out = torch.equal(sparse_attention_from_index(q, k, v, fused), sparse_attention_from_index(q, k, v, plain))
    return not diff and same_out


def tiny_config():
    layer = {str(h): {"pattern": p.kind, **p.params} for h, p in enumerate(HEADS)}
    return {"format": "mi-compile/v1", "num_layers": 2, "num_heads": HQ,
            "default": {"pattern": "dense"}, "layers": {"0": layer, "1": layer}}


def model_step():
    """(f): the op inside a compiled 2-layer model, default vs mode="reduce-overhead"."""
    from torch._dynamo.utils import counters
    from mi_compile.models import tiny_model

    n = MODEL_N
    model = tiny_model("llama", num_layers=2, num_heads=HQ, num_kv_heads=HKV, head_dim=D, vocab=256,
                       max_position_embeddings=max(2048, n)).to(device=DEV, dtype=DT)
    ids = torch.randint(3, 256, (1, n), device=DEV, generator=torch.Generator(device=DEV).manual_seed(3))
    results, logits = {}, {}
    for mode in ARGS.model_modes.split(","):
        torch._dynamo.reset()
        counters.clear()
        options = {"config": tiny_config(), "min_seq_len": 0}
        if mode != "default":
            options["mode"] = mode
        backend = mi_compile.backend(options)
        compiled = torch.compile(model, backend=backend, dynamic=False)

        def forward():
            torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                return compiled(ids, use_cache=False, logits_to_keep=1).logits

        t = time.time()
        for _ in range(3):                    # compile; CUDA graphs: warm-up, record, replay
            out = forward()
        sync()
        compile_s = time.time() - t
        logits[mode] = out.float().clone()
        reps = 20 if CUDA else 3
        rewritten = sum(r.rewritten for r in backend.reports)
        results[mode] = {"n": n, "compile_s": round(compile_s, 1), "host_ms": host_ms(forward, reps)[0],
                         "full_ms": full_ms(forward, reps),
                         "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
                         "inductor_patches": backend.inductor_patches(), "rewritten": rewritten}
        log(f"model {mode}: {json.dumps(results[mode])}")
        del compiled
    modes = list(logits)
    if len(modes) > 1:
        a, b = logits[modes[0]], logits[modes[1]]
        results["logits_max_abs_diff"] = float((a - b).abs().max())
    return results


def profile(n):
    """Where one call's host time goes: each phase alone (GPU idle at its start), then cProfile."""
    import cProfile
    import io
    import pstats

    from mi_compile.kernels.index_tables import build_tables
    from mi_compile.patterns import block_sparse, vertical_slash
    from mi_compile.patterns.index import build_index, index_plan, normalize_sequences
    from mi_compile.sparse import build_sparse_index, sparse_attention_from_index

    q, k, v = inputs(n)
    scale = D ** -0.5
    reps = 50 if CUDA else 2
    for _ in range(3):
        op_call(q, k, v)
    if q.shape[-2] < n:     # a chunk: the whole call only, and the cProfile below
        phases = {"op call": lambda: op_call(q, k, v), "dense attention": lambda: dense_call(q, k, v)}
        return profile_phases(q, k, v, n, phases, reps)
    ss, sl = normalize_sequences(q, None, None)
    plan = index_plan(tuple(HEADS), q.device)
    index = build_sparse_index(q, k, ENC)
    w = plan.widths(n)
    vert, slash = vertical_slash.estimate_scores(q, k, plan.vs_ids, ss, sl, scale)
    vs_raw = plan.vs_topk(vert, slash, n)
    bs_raw, _ = block_sparse.topk_raw(q, k, plan.bs_ids, plan.bs_topks, ss, sl, scale, True)
    phases = {
        "op call": lambda: op_call(q, k, v),
        "op call, dense path (custom-op overhead + SDPA)":
            lambda: torch.ops.mi_compile.sparse_attention(q, k, v, ENC, None, None, 0, 1 << 30, 0),
        "dense SDPA": lambda: dense_call(q, k, v),
        "build_sparse_index": lambda: build_sparse_index(q, k, ENC),
        "build_index (no validation)": lambda: build_index(q, k, HEADS, scale, ss, sl, unpadded=True),
        "normalize_sequences": lambda: normalize_sequences(q, None, None),
        "estimate (2 launches)": lambda: vertical_slash.estimate_scores(q, k, plan.vs_ids, ss, sl, scale),
        "vertical-slash top-k + sort": lambda: plan.vs_topk(vert, slash, n),
        "block-sparse scores + top-k": lambda: block_sparse.topk_raw(
            q, k, plan.bs_ids, plan.bs_topks, ss, sl, scale, True),
        "fused tables (2 launches)": lambda: build_tables(plan, B, n, w, ss, sl, vs_raw, bs_raw),
        "attention launch": lambda: sparse_attention_from_index(q, k, v, index),
        "torch.empty x1": lambda: torch.empty(B, HQ, n + 64, device=DEV, dtype=torch.int32),
    }
    return profile_phases(q, k, v, n, phases, reps)


def profile_phases(q, k, v, n, phases, reps):
    """Host ms of each phase alone, then the op call under cProfile."""
    import cProfile
    import io
    import pstats

    result = {}
    for name, fn in phases.items():
        fn()
        result[name] = round(host_ms(fn, reps)[0], 4)
        log(f"  {name:55s} {result[name]:.4f} ms")
    prof = cProfile.Profile()
    for _ in range(reps):
        sync()
        prof.enable()
        op_call(q, k, v)
        prof.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    log(text.getvalue())
    return {"n": n, "query_len": q.shape[-2], "phases_host_ms": result, "cprofile_top": text.getvalue()[-6000:]}


def baseline_rows():
    """(a), (b), (e) of another checkout of the package, in a subprocess (same module name)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "baseline.json")
        cmd = [sys.executable, "-m", "benchmarks.host_overhead", "--device", ARGS.device, "--root", ARGS.baseline,
               "--op-only", "--no-model", "--out", path, "--lengths", ",".join(map(str, LENGTHS))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log("baseline run failed:\n" + proc.stdout[-2000:] + proc.stderr[-3000:])
            return None
        with open(path) as f:
            return json.load(f)["rows"]


def table(baseline):
    head = ["n", "ops", "host ms", "full ms", "graph ms", "graph==eager", "dense host", "dense ms"]
    if baseline:
        head[1:1] = ["base ops", "base host ms", "base full ms"]
    log("\n" + " | ".join(head))
    base = {r["n"]: r for r in baseline or []}
    for r in rows:
        cells = [r["n"], r["ops_per_call"], f"{r['host_ms_mean']:.3f}", f"{r['full_ms']:.3f}",
                 f"{r.get('graph_replay_ms', float('nan')):.3f}", r.get("graph_equals_eager", "-"),
                 f"{r.get('dense_host_ms', float('nan')):.3f}", f"{r.get('dense_full_ms', float('nan')):.3f}"]
        if baseline:
            b = base.get(r["n"], {})
            cells[1:1] = [b.get("ops_per_call", "-"), f"{b.get('host_ms_mean', float('nan')):.3f}",
                          f"{b.get('full_ms', float('nan')):.3f}"]
        log(" | ".join(str(c) for c in cells))


def main():
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
              "heads": [h.describe() for h in HEADS], "shape": [B, HQ, HKV, D], "dtype": str(DT)}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        pass
    out_path = ARGS.out or os.path.join(os.environ.get("OUT", "."), "host_overhead.json")

    def save():
        result.update(rows=rows, checks=checks, seconds=round(time.time() - t0, 1))
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)

    if ARGS.profile:
        result["profile"] = profile(LENGTHS[0])
        save()
    if not ARGS.op_only:
        small = LENGTHS[0]
        check(f"fused_tables_equal_n{small}", lambda: tables_equal(small))
        check("fused_tables_equal_padded", lambda: tables_equal(max(small, 300), padded=True))
        if len(LENGTHS) > 1:
            check(f"fused_tables_equal_n{LENGTHS[1]}", lambda: tables_equal(LENGTHS[1]))
    for n in LENGTHS:
        try:
            bench_length(n)
        except Exception as e:  # noqa: BLE001
            rows.append({"n": n, "error": repr(e)[:300]})
            log(f"n={n} FAILED: {e!r}")
            traceback.print_exc()
        save()
    if not ARGS.no_model and not ARGS.op_only:
        try:
            result["model"] = model_step()
        except Exception as e:  # noqa: BLE001
            result["model"] = {"error": repr(e)[:500]}
            traceback.print_exc()
        save()
    baseline = baseline_rows() if ARGS.baseline else None
    if baseline is not None:
        result["baseline_rows"] = baseline
    table(baseline)
    if "model" in result:
        log("model step: " + json.dumps(result["model"]))
    save()
    log(f"wrote {out_path} ({time.time() - t0:.0f} s)")
    failed = [c["check"] for c in checks if not c["ok"]] + [r["n"] for r in rows if "error" in r]
    if "error" in result.get("model", {}):
        failed.append("model")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
