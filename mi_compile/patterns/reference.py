"""Float32 PyTorch reference: masked dense attention, one head at a time.

Used by ``sparse_attention(..., impl="reference")`` (CPU default) and by the tests. It builds
each head's selection with :func:`~mi_compile.patterns.index.head_selection_mask` (an
``[B, nq, n]`` bool mask per head, ``nq < n`` for a chunk; once for heads of equal
input-independent patterns), so it is meant for moderate ``n`` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .index import SparseIndex, head_selection_mask
from .registry import get as pattern_spec


def masked_attention(q, k, v, mask_of_head, scale: float, mask_key=None) -> torch.Tensor:
    """``softmax(scale * q k^T masked) v`` in float32; rows with no key give 0.

    ``mask_of_head(h)`` returns bool ``[B, nq, nk]`` (q's and k's lengths); query head ``h``
    reads KV head ``h // (Hq // Hkv)``. ``mask_key(h)``: a hashable that is equal for heads
    whose masks are equal (``None``: build every head's), so such a mask is built once. Each head is one
    float32 ``scaled_dot_product_attention`` with the boolean mask (PyTorch's fused CPU kernel
    where it has one: no ``n x n`` float32 score matrix of our own).
    """
    B, Hq, n, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, n, D, dtype=torch.float32, device=q.device)
    masks: dict = {}
    for h in range(Hq):
        kv = h // group
        key = mask_key(h) if mask_key is not None else None
        entry = masks.get(key) if key is not None else None
        if entry is None:
            mask = mask_of_head(h)
            entry = (mask, mask.any(-1, keepdim=True))
            if key is not None:
                masks[key] = entry
        mask, live = entry
        o = F.scaled_dot_product_attention(q[:, h:h + 1].float(), k[:, kv:kv + 1].float(), v[:, kv:kv + 1].float(),
                                           attn_mask=mask[:, None], scale=scale)[:, 0]
        out[:, h] = torch.where(live, o, 0.0)          # a row with no key: 0, not the kernels' NaN
    return out


def reference_attention(q, k, v, index: SparseIndex, scale: float) -> torch.Tensor:
    """Float32 result of attending exactly the pairs the index selects."""
    return masked_attention(q, k, v, lambda h: head_selection_mask(index, h), scale,
                            mask_key=lambda h: _shared_mask_key(index, h))


def _shared_mask_key(index: SparseIndex, h: int):
    """Equal for heads whose selection is their parameters alone (no per-input estimate)."""
    head = index.heads[h]
    return None if pattern_spec(head.kind).per_block else head


def dense_causal_reference(q, k, v, scale: float) -> torch.Tensor:
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return masked_attention(q, k, v, lambda h: causal.expand(q.shape[0], n, n), scale)
