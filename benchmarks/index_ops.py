"""Torch ops the host dispatches to build one forward's sparse indexes under a config (CPU).

Every layer of the config builds its index as on CUDA: the fused table builder where it takes
the layer, else the PyTorch builder. Triton launches are not torch ops: the fused builder's two
are skipped while counting (in the interpreter they would dispatch torch ops of their own), and
the vertical-slash estimate (two launches on CUDA) is computed once beforehand. Each op costs host time on a GPU (a top-k ~0.16 ms on the H100, a small
op ~0.01-0.02 ms), so the counts track the host time of a call where no GPU is at hand.

    python3 -m benchmarks.index_ops --config qwen2.5-coder-1.5b-128k --heads 12 --kv-heads 2
"""
import argparse
import collections
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import mi_compile.kernels.index_tables as index_tables  # noqa: E402
from mi_compile.config import ConfigFamily, load_config  # noqa: E402
from mi_compile.debug.op_count import OpCounter  # noqa: E402
from mi_compile.patterns import index as index_module, vertical_slash  # noqa: E402
from mi_compile.patterns.index import build_index, normalize_sequences  # noqa: E402


class _Skipped:
    """A Triton kernel whose launches do nothing (``kernel[grid](...)``)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def count_forward(config, heads: int, kv_heads: int, n: int, head_dim: int = 32, query_len: int = 0) -> dict:
    """Summed over the config's layers: layers the fused builder takes, torch ops, top-k, sorts,
    and the most frequent ops. ``query_len``: a chunk of that many queries continuing a cache
    of ``n`` keys in all (0: the whole prompt)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, heads, query_len or n, head_dim), torch.randn(1, kv_heads, n, head_dim)
    ss, sl = normalize_sequences(q, None, None, n)
    total = {"layers": config.num_layers, "fused_layers": 0, "ops": 0, "topk": 0, "sort": 0}
    by_op = collections.Counter()
    saved = (vertical_slash.estimate_scores, index_tables._head_rows_kernel, index_tables._block_rows_kernel)
    index_tables._head_rows_kernel = index_tables._block_rows_kernel = _Skipped()
    try:
        for layer in range(config.num_layers):
            layer_heads = config.heads_for(layer, heads)
            plan = index_module.index_plan(tuple(layer_heads), q.device)
            fused = index_module._use_fused(plan, n, "triton", q, None)
            scores = vertical_slash.estimate_scores_torch(q, k, plan.vs_ids, ss, sl, head_dim ** -0.5)
            vertical_slash.estimate_scores = lambda *args, scores=scores, **kwargs: scores

            def build():
                return build_index(q, k, layer_heads, head_dim ** -0.5, ss, sl, unpadded=True,
                                   tables="triton" if fused else "torch")

            build()                      # plans and per-length tables cached, as after a warm-up
            with OpCounter() as counter:
                build()
            total["fused_layers"] += int(fused)
            total["ops"] += sum(counter.counts.values())
            total["topk"] += counter.counts.get("topk", 0)
            total["sort"] += counter.counts.get("sort", 0)
            by_op.update(counter.counts)
    finally:
        vertical_slash.estimate_scores, index_tables._head_rows_kernel, index_tables._block_rows_kernel = saved
    return {**total, "top_ops": dict(by_op.most_common(12))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="qwen2.5-coder-1.5b-128k", help="a shipped config's name or a JSON path (a config family: the member for --length)")
    ap.add_argument("--heads", type=int, default=12, help="query heads of the model")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024, help="keys (the counts hardly depend on it)")
    ap.add_argument("--query-len", type=int, default=0, help="a chunk of this many queries (0: the whole prompt)")
    args = ap.parse_args()
    config = load_config(args.config)
    if isinstance(config, ConfigFamily):      # the member the op runs over --length keys
        config = config.member_for(args.length)
    counts = count_forward(config, args.heads, args.kv_heads, args.length, query_len=args.query_len)
    print(json.dumps({"config": args.config, "length": args.length, "query_len": args.query_len, **counts}))


if __name__ == "__main__":
    main()
