"""A/B of the ``do_not_specialize`` marks on the attention kernels (benchmarks/NOTES.md, step 7).

Run from the repository root on a CUDA GPU, once per setting, alternating:

    for i in 1 2 3; do for m in 0 1; do NO_MARKS=$m python3 benchmarks/ab_do_not_specialize.py; done; done

``NO_MARKS=1`` clears the marks before the first launch, so Triton specialises every integer
argument again. Prints one JSON line: cuDNN, A-shape kernel and vertical-slash kernel (the
anchors' structured 1000/6096 index) at 128K, milliseconds, same shapes as benchmarks/kernels.py.
"""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import kernels as KB  # noqa: E402
from compile_variants import drop_specialization_marks  # noqa: E402

if os.environ.get("NO_MARKS") == "1":
    drop_specialization_marks()
n = 131072
q, k, v = KB.inputs(n)
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    cud, _ = KB.bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
ia = KB.build_sparse_index(q, k, KB.A_SHAPE)
a, _ = KB.bench(lambda: KB.sparse_attention_from_index(q, k, v, ia))
del ia
iv = KB.build_sparse_index(q, k, KB.VS, vs_selection=KB.structured_selection(n))
vs, _ = KB.bench(lambda: KB.sparse_attention_from_index(q, k, v, iv))
r = dict(marks=os.environ.get("NO_MARKS") != "1", cudnn=round(cud, 2), ashape_kernel=round(a, 2), vs_kernel=round(vs, 2),
         vs_over_cudnn=round(vs / cud, 4))
print(json.dumps(r), flush=True)
