"""How many kernel binaries a run compiles, and what the first call at a new length costs.

Triton compiles one binary per combination of its integer arguments' specialisations ("equals
1", "divisible by 16"). mi_compile's kernels mark the length- and pattern-dependent sizes
``do_not_specialize`` (see ``_LENGTH_ARGS`` in mi_compile/kernels/sparse_attention.py); this
script shows the effect on one CUDA GPU with SmolLM2-135M's attention shape (9 query heads,
3 KV heads, head_dim 64): for each dtype it runs two layers' worth of head mixes (one with
data-dependent patterns -> general kernel, one dense/A-shape only -> wide kernel) at several
lengths, some not multiples of 16 or 64, and prints the first-call time and how many binaries
each kernel holds afterwards.

    python3 -m benchmarks.compile_variants        # writes $OUT/compile_variants.json

Expected with the marks: one binary per (kernel, dtype), whatever the lengths; without them
(``NO_MARKS=1`` drops them before the first launch): a new binary whenever a size changes
class, which in float32 (IEEE dots) costs tens of seconds of ptxas each.
"""
import json
import os
import time

import torch


from mi_compile.kernels import sparse_attention as K
from mi_compile.patterns.spec import HeadPattern as HP
from mi_compile.sparse import sparse_attention

LENGTHS = [int(x) for x in os.environ.get("LENGTHS", "8192,8193,8000,4097,2050").split(",")]
DTYPES = [getattr(torch, x) for x in os.environ.get("DTYPES", "bfloat16,float32").split(",")]
OUT = os.environ.get("OUT", "/tmp")
HQ, HKV, D = 9, 3, 64
MIXED = [HP("dense"), HP("a_shape", sink=64, local=1024), HP("vertical_slash", vertical=512, slash=1024),
         HP("block_sparse", topk=16), HP("vertical_slash", vertical=100, slash=300), HP("dense"),
         HP("block_sparse", topk=40), HP("a_shape", sink=128, local=2048), HP("vertical_slash", vertical=1000,
                                                                                   slash=2000)]
STATIC = [HP("dense"), HP("a_shape", sink=64, local=1024), HP("a_shape", sink=128, local=4096)] * 3


def binaries(kernel) -> int:
    """Compiled binaries a @triton.jit function holds, over all devices (triton 3.x layout:
    device_caches[device] = (kernel_cache, ...))."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def drop_specialization_marks():
    """Undo the kernels' ``do_not_specialize`` marks (before their first launch), so that
    Triton specialises every integer argument again: the "before" of the do_not_specialize comparison in docs/kernels.md."""
    for kern in (K._sparse_attention_kernel, K._wide_attention_kernel):
        for p in kern.params:
            p.do_not_specialize = False


def main():
    if os.environ.get("NO_MARKS") == "1":
        drop_specialization_marks()
    rows = []
    for dtype in DTYPES:
        for n in LENGTHS:
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(1, HQ, n, D, device="cuda", dtype=dtype, generator=g)
            k = torch.randn(1, HKV, n, D, device="cuda", dtype=dtype, generator=g)
            v = torch.randn(1, HKV, n, D, device="cuda", dtype=dtype, generator=g)
            for name, heads in (("mixed", MIXED), ("static", STATIC)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                sparse_attention(q, k, v, heads=heads)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                sparse_attention(q, k, v, heads=heads)
                torch.cuda.synchronize()
                again = time.perf_counter() - t0
                row = dict(dtype=str(dtype).split(".")[-1], n=n, heads=name, first_s=round(first, 3),
                           again_s=round(again, 4), general_binaries=binaries(K._sparse_attention_kernel),
                           wide_binaries=binaries(K._wide_attention_kernel))
                rows.append(row)
                print(f"{row['dtype']:>8} n={n:<6} {name:<6} first call {first:7.2f} s, again {again:.4f} s; "
                      f"binaries general {row['general_binaries']}, wide {row['wide_binaries']}", flush=True)
    marks = os.environ.get("NO_MARKS") != "1"
    name = "compile_variants.json" if marks else "compile_variants_no_marks.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "do_not_specialize": marks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
