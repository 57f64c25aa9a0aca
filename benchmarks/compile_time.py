"""Compile time of backend="minference" vs backend="inductor" on the same model, in one process.

The model is SmolLM2-135M-shaped (30 layers, 9 query / 3 KV heads, head_dim 64; random weights,
so nothing is downloaded), called with a prompt of --length tokens. Each measurement is a cold
compile: Dynamo is reset and Inductor's caches point at a fresh folder, so both backends do all
their work. A first untimed round pays the process's one-time costs (imports, Inductor's own
start-up) for both. Then the two backends alternate, --repeats times each. The compile time
is the first call minus a steady-state call (both calls run the same attention: the prompt is
below the default min_seq_len, so the sparse op runs dense like Inductor's SDPA). The ratio of
the medians is the figure (goal: <= 1.3x).

    python3 -m benchmarks.compile_time [--length 512] [--repeats 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def smollm2_shaped(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def cold_compile_seconds(model, ids, backend, options) -> float:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        with inductor_config.patch(fx_graph_cache=False):
            compiled = torch.compile(model, backend=backend, options=options, fullgraph=True)
            if ids.is_cuda:
                torch.cuda.synchronize()
            first = _timed_call(compiled, ids)
            steady = min(_timed_call(compiled, ids) for _ in range(2))
            return first - steady


def _timed_call(fn, ids) -> float:
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        fn(ids, use_cache=False, logits_to_keep=1)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = smollm2_shaped(dev, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, a.length), device=dev)
    import mi_compile  # noqa: F401  (also registers the backend without the entry point)

    times = {"inductor": [], "minference": []}
    cold_compile_seconds(model, ids, "inductor", None)          # untimed: one-time process costs
    cold_compile_seconds(model, ids, "minference", None)
    for _ in range(a.repeats):
        times["inductor"].append(cold_compile_seconds(model, ids, "inductor", None))
        times["minference"].append(cold_compile_seconds(model, ids, "minference", None))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["minference"] / med["inductor"]
    row = dict(device=str(dev), torch=torch.__version__, length=a.length, seconds=times, median=med, ratio=ratio)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "compile_time.json"), "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row))
    print(f"compile time, first call, {dev}: inductor {med['inductor']:.1f} s, minference {med['minference']:.1f} s, "
          f"ratio {ratio:.2f}x (goal <= 1.3x)")


if __name__ == "__main__":
    main()
