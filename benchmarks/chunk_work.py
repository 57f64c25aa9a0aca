"""A prompt in chunks against its whole prefill, attention alone, every layer of a config (no model).

Random q / k / v of the model's attention shape (default Qwen2.5-Coder-1.5B: 12 query / 2 KV
heads, head_dim 128), one layer at a time with that layer's heads of ``--config``, through
``torch.ops.mi_compile.sparse_attention`` as the compiled model calls it (the config's
``min_seq_len``). Per layer and summed over the layers:

* ``whole``: one call over all ``n`` queries;
* ``chunks``: the same ``n`` tokens as calls of ``--chunk`` queries over the keys so far, with the
  config's ``length`` (a chunk keeps its share of each vertical-slash head's columns);
* ``absolute``: the same chunks without it (every chunk keeps the full counts);
* ``chunks_split<T>`` (``--split-tiles T,...``): the scaled chunks with the kernel's
  ``split_tiles`` set to ``T``: a chunk's dense last rows walk their keys in parts of ~``T``
  key tiles, one program each (fewer tiles a part, more programs; the index and pairs do not
  change, only the time);
* ``whole_top_select`` / ``chunks_top_select`` (``--compare-topk``): the vertical-slash top-k by
  the Triton select kernel instead of ``torch.topk`` and a sort (``SELECT_CONFIG["kernel"]``; the
  names end in ``_torch_topk`` where the kernel is the default);

the time of their index builds alone (estimate, top-k, tables) and the pairs each computes
(the kernel's counting mode). Random inputs spread the vertical-slash estimate's picks about
evenly over the keys, so this measures the counts' effect, not a real model's selection
(``benchmarks/chunked.py`` runs the model). Those times are synchronised wall times, which the
index builds' host work dominates; ``--profile`` (CUDA) adds the device time per kernel of
every layer's whole and chunked calls, and the chunks against the whole by category and kernel
(as ``chunked.py --profile`` does in the model).

    python3 -m benchmarks.chunk_work                        # GPU: 128K in 16K chunks, ~1 min on an H100
    python3 -m benchmarks.chunk_work --split-tiles 16,32,64  # and the chunks' dense rows in smaller parts
    python3 -m benchmarks.chunk_work --compare-topk          # and with the other top-k
    python3 -m benchmarks.chunk_work --device cpu --n 512 --chunk 128 --length 512 --min-seq-len 256 --layers 0,1

Prints a table and writes ``$OUT/chunk_work.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.chunked import _sync_time  # noqa: E402
from benchmarks.e2e import Dev  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.chunk_work", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="qwen2.5-coder-1.5b-128k", help="a config name or path (default: %(default)s)")
    p.add_argument("--n", type=int, default=131072, help="prompt tokens (default %(default)s)")
    p.add_argument("--chunk", type=int, default=16384, help="chunk size (default %(default)s)")
    p.add_argument("--heads", default="12,2,128", help="query heads, KV heads, head_dim (default %(default)s)")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every layer of the config)")
    p.add_argument("--length", type=int, default=None, help="prompt length of the counts (default: the config's)")
    p.add_argument("--min-seq-len", type=int, default=None, help="the op's min_seq_len (default: the config's, else 0)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions, the minimum kept (default %(default)s)")
    p.add_argument("--split-tiles", default="",
                   help="comma-separated split_tiles values: the scaled chunks timed again with each (default: none)")
    p.add_argument("--compare-topk", action="store_true",
                   help="the whole and the chunked calls timed again with the other vertical-slash top-k "
                        "(the Triton select kernel / torch.topk and a sort)")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: device time per kernel of the whole and the chunked calls (torch.profiler)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="JSON path (default $OUT/chunk_work.json)")
    args = p.parse_args(argv)
    if min(args.n, args.chunk, args.reps) < 1 or args.chunk > args.n:
        p.error("--n, --chunk and --reps must be >= 1, --chunk <= --n")
    try:
        args.split_tiles = [int(x) for x in args.split_tiles.split(",") if x.strip()]
    except ValueError:
        p.error(f"--split-tiles takes comma-separated integers, got {args.split_tiles!r}")
    if any(t < 1 for t in args.split_tiles):
        p.error("--split-tiles values must be >= 1")
    return args


def _timed(fn, dev, reps):
    """Minimum seconds of ``fn()`` over ``reps`` synchronised runs after one warm-up."""
    fn()
    return min(_sync_time(fn, dev) for _ in range(reps))


def profile_variants(fns: dict) -> dict:
    """Device time per kernel of each ``fns[name]()`` (``gpu_profile.kernel_times``), and of
    ``chunks`` against ``whole`` when both are there: ``{"reports": ..., "diff": ..., "text":
    ...}``."""
    from mi_compile.debug import gpu_profile

    reports = {name: gpu_profile.kernel_times(fn) for name, fn in fns.items()}
    texts = [f"{name}\n\n{gpu_profile.format_kernel_times(r)}" for name, r in reports.items()]
    diff = None
    if "whole" in reports and "chunks" in reports:
        diff = gpu_profile.kernel_time_diff(reports["whole"], reports["chunks"])
        texts.append("chunks against whole\n\n" + gpu_profile.format_kernel_diff(diff, "whole", "chunks"))
    return {"reports": reports, "diff": diff, "text": "\n\n".join(texts) + "\n"}


def main(argv=None):
    args = parse_args(argv)
    from mi_compile.config import ConfigError, load_config, single_config
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG
    from mi_compile.kernels.top_select import SELECT_CONFIG
    from mi_compile.op import sparse_attention_op
    from mi_compile.patterns.spec import encode_heads
    from mi_compile.sparse import build_sparse_index, index_density

    device = torch.device(args.device)
    dev = Dev(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    try:             # a family's calls would switch members with their key count
        cfg = single_config(load_config(args.config), "give")
    except ConfigError as exc:
        sys.exit(f"--config: {exc}")
    length = args.length if args.length is not None else cfg.length or 0
    min_seq_len = args.min_seq_len if args.min_seq_len is not None else cfg.min_seq_len or 0
    layers = ([int(x) for x in args.layers.split(",")] if args.layers else
              list(range(cfg.num_layers or max(cfg.layers, default=0) + 1)))
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, hq, args.n, d, generator=g).to(device, dtype)
    k = torch.randn(1, hkv, args.n, d, generator=g).to(device, dtype)
    v = torch.randn(1, hkv, args.n, d, generator=g).to(device, dtype)
    ends = list(range(args.chunk, args.n, args.chunk)) + [args.n]

    def calls(chunked):
        """``(end, queries, sparse)`` of each op call (dense below ``min_seq_len`` keys)."""
        return [(e, min(args.chunk, e) if chunked else e, e >= max(min_seq_len, 1))
                for e in (ends if chunked else [args.n])]

    def build(heads, e, nq, prompt_length):
        """The index of the call ending at key ``e`` as the op builds it (a chunk's share of
        the columns applied by the builder itself)."""
        return build_sparse_index(q[:, :, e - nq:e], k[:, :, :e], list(heads), prompt_length=prompt_length)

    def run(heads, layer, chunked, prompt_length):
        flat = encode_heads(heads)
        if not chunked:
            return lambda: sparse_attention_op(q, k, v, flat, None, None, 0, min_seq_len, layer)
        return lambda: [sparse_attention_op(q[:, :, e - min(args.chunk, e):e], k[:, :, :e], v[:, :, :e], flat,
                                            None, None, 0, min_seq_len, layer, prompt_length) for e in ends]

    def index_only(heads, chunked, prompt_length):
        """The calls' index builds alone (estimate, top-k, tables), as the op makes them."""
        todo = [(e, nq) for e, nq, sparse in calls(chunked) if sparse]
        return lambda: [build(heads, e, nq, prompt_length) for e, nq in todo]

    def pairs(heads, chunked, prompt_length):
        """Pairs computed, from the index (the kernel's counting mode on the GPU); a call below
        ``min_seq_len`` keys runs dense: every causal pair."""
        total = 0.0
        for e, nq, sparse in calls(chunked):
            causal = (e * (e + 1) - (e - nq) * (e - nq + 1)) / 2
            if not sparse:
                total += causal * hq
                continue
            index = build(heads, e, nq, prompt_length)
            total += float(index_density(index, q[:, :, e - nq:e], k[:, :, :e], v[:, :, :e]).sum()) * causal
        return total

    def with_setting(fn, table, key, value):
        """``fn`` run with ``table[key]`` set to ``value`` (restored after)."""
        def run_with():
            saved, table[key] = table[key], value
            try:
                return fn()
            finally:
                table[key] = saved
        return run_with

    variants = {"whole": (False, 0), "chunks": (True, length), "absolute": (True, 0)}
    # timed again with one setting changed: (base variant, table, key, value, index changes too)
    settings = {f"chunks_split{t}": ("chunks", KERNEL_CONFIG, "split_tiles", t, False) for t in args.split_tiles}
    if args.compare_topk:       # the other top-k than the default
        other = not SELECT_CONFIG["kernel"]
        settings.update({f"{base}_{'top_select' if other else 'torch_topk'}": (base, SELECT_CONFIG, "kernel", other, True)
                         for base in ("whole", "chunks")})
    rows, sums = [], {name: [0.0, 0.0, 0.0] for name in [*variants, *settings]}
    t0 = time.time()
    with torch.no_grad():
        for layer in layers:
            heads = cfg.heads_for(layer, hq)
            row = {"layer": layer}
            for name, (chunked, plen) in variants.items():
                secs = _timed(run(heads, layer, chunked, plen), dev, args.reps)
                index_s = _timed(index_only(heads, chunked, plen), dev, args.reps)
                work = pairs(heads, chunked, plen)
                row[name] = {"ms": round(secs * 1e3, 3), "index_ms": round(index_s * 1e3, 3), "pairs": work}
                sums[name][0] += secs
                sums[name][1] += work
                sums[name][2] += index_s
            for name, (base, table, key, value, index_changes) in settings.items():
                chunked, plen = variants[base]
                secs = _timed(with_setting(run(heads, layer, chunked, plen), table, key, value), dev, args.reps)
                index_s = (_timed(with_setting(index_only(heads, chunked, plen), table, key, value), dev, args.reps)
                           if index_changes else row[base]["index_ms"] / 1e3)
                row[name] = dict(row[base], ms=round(secs * 1e3, 3), index_ms=round(index_s * 1e3, 3))
                sums[name][0] += secs
                sums[name][1] += row[base]["pairs"]
                sums[name][2] += index_s
            rows.append(row)
            print(f"layer {layer:2d}: " + "  ".join(f"{m} {row[m]['ms']:8.2f} ms" for m in sums), flush=True)
    whole_s, whole_p, _ = sums["whole"]
    summary = {name: {"ms": round(s * 1e3, 2), "index_ms": round(i * 1e3, 2), "vs_whole": round(s / whole_s, 3),
                      "pairs_vs_whole": round(p / whole_p, 3)} for name, (s, p, i) in sums.items()}
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, dtype=str(dtype), config=args.config, length=length,
                min_seq_len=min_seq_len, n=args.n, chunk=args.chunk, heads=[hq, hkv, d], layers=layers,
                reps=args.reps, split_tiles=KERNEL_CONFIG["split_tiles"], input="random normal",
                wall_s=round(time.time() - t0, 1))
    print(f"\n{args.n} tokens, chunks of {args.chunk}, {len(layers)} layers of {args.config} "
          f"(length {length}, min_seq_len {min_seq_len}), {meta['device']}:")
    print("variant        | attention ms | of which index builds | vs whole | pairs vs whole")
    for name, s in summary.items():
        print(f"{name:14s} | {s['ms']:12.2f} | {s['index_ms']:20.2f} | {s['vs_whole']:8.3f} | {s['pairs_vs_whole']:.3f}")
    out = args.out or os.path.join(os.environ.get("OUT", "."), "chunk_work.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    doc = {"meta": meta, "summary": summary, "layers": rows}
    if args.profile and device.type != "cuda":
        print("--profile: device times need CUDA; not profiled")
    elif args.profile:
        every_layer = {name: (lambda chunked=chunked, plen=plen: [
            run(cfg.heads_for(layer, hq), layer, chunked, plen)() for layer in layers])
            for name, (chunked, plen) in variants.items() if name != "absolute"}
        with torch.no_grad():
            prof = profile_variants(every_layer)
        print(prof["text"])
        with open(os.path.splitext(out)[0] + "_profile.txt", "w") as f:
            f.write(prof["text"])
        doc["profile"] = {"reports": prof["reports"], "diff": prof["diff"]}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
