"""A/B of the kernels' program order (benchmarks/NOTES.md, step 8): head-major (default) against
``KERNEL_CONFIG["group_heads"]``, where the query heads of one KV head interleave per row block.

    python3 benchmarks/ab_group_heads.py     # from the repository root, CUDA; writes $OUT/ab_group.json

Shapes as benchmarks/kernels.py (32 q / 8 KV heads, head_dim 128, bf16) at 128K and 32K, three
alternating repetitions; each grouped output is compared with the head-major one (max |diff|).
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import kernels as KB  # noqa: E402
from mi_compile.kernels import sparse_attention as K  # noqa: E402
out = []
for n in (131072, 32768):
    q, k, v = KB.inputs(n)
    idx = {"ashape": KB.build_sparse_index(q, k, KB.A_SHAPE),
           "vs_structured": KB.build_sparse_index(q, k, KB.VS, vs_selection=KB.structured_selection(n)),
           "bs_top100": KB.build_sparse_index(q, k, KB.BS)}
    ref = {}
    for rep in range(3):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cud, _ = KB.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        r = dict(n=n, rep=rep, cudnn=round(cud, 2))
        for g in (False, True):
            K.KERNEL_CONFIG["group_heads"] = g
            for name, ix in idx.items():
                o = KB.sparse_attention_from_index(q, k, v, ix)
                if g:
                    r[f"{name}_maxdiff"] = (o.float() - ref[name]).abs().max().item()
                else:
                    ref[name] = o.float()
                ms, _ = KB.bench(lambda: KB.sparse_attention_from_index(q, k, v, ix))
                r[f"{name}_{'group' if g else 'head'}"] = round(ms, 2)
        print(json.dumps(r), flush=True)
        out.append(r)
    del idx, ref, q, k, v
    torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_group.json"), "w"), indent=1)
