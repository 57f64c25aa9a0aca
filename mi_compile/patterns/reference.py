"""Float32 PyTorch reference: masked dense attention, one head at a time.

Used by ``sparse_attention(..., impl="reference")`` (CPU default) and by the tests. It builds
each head's selection with :func:`~mi_compile.patterns.index.head_selection_mask` (an
``[B, n, n]`` bool mask and an ``[B, n, n]`` float32 score matrix per head), so it is meant for
moderate ``n`` only.
"""
from __future__ import annotations

import torch

from .index import SparseIndex, head_selection_mask


def masked_attention(q, k, v, mask_of_head, scale: float) -> torch.Tensor:
    """``softmax(scale * q k^T masked) v`` in float32; rows with no key give 0.

    ``mask_of_head(h)`` returns bool ``[B, n, n]``; query head ``h`` reads KV head
    ``h // (Hq // Hkv)``.
    """
    B, Hq, n, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, n, D, dtype=torch.float32, device=q.device)
    for h in range(Hq):
        kv = h // group
        mask = mask_of_head(h)
        s = torch.matmul(q[:, h].float(), k[:, kv].float().transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).masked_fill(~mask.any(-1, keepdim=True), 0.0)
        out[:, h] = torch.matmul(p, v[:, kv].float())
    return out


def reference_attention(q, k, v, index: SparseIndex, scale: float) -> torch.Tensor:
    """Float32 result of attending exactly the pairs the index selects."""
    return masked_attention(q, k, v, lambda h: head_selection_mask(index, h), scale)


def dense_causal_reference(q, k, v, scale: float) -> torch.Tensor:
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, lambda h: causal.expand(q.shape[0], n, n), scale)
