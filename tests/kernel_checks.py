"""Shared checks of the general kernel against the float32 reference (tests import this).

``check_kernel`` runs the kernel on ``heads`` (under TRITON_INTERPRET=1 on the CPU) and asserts
what every pattern test wants of it: all of the output written, the reference's values, each
selected pair visited exactly once and nothing else, and the cost model equal to the walk.
"""
import zlib

import torch

from mi_compile.kernels import sparse_attention as kernel_module
from mi_compile.kernels.sparse_attention import count_tile_pairs_per_block, count_visited_pairs
from mi_compile.patterns.cost import tile_pairs_per_block
from mi_compile.patterns.reference import reference_attention
from mi_compile.sparse import build_sparse_index, selection_mask, sparse_attention_from_index

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}


def make_inputs(seed, B, Hq, Hkv, n, D, dtype=torch.float32):
    """q ``[B, Hq, n, D]``, k and v ``[B, Hkv, n, D]``, standard normal from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv))


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


def check_kernel(q, k, v, heads, seq_start=None, seq_len=None):
    """The general kernel's output for ``heads``, after the checks in the module docstring."""
    index = build_sparse_index(q, k, heads, seq_start=seq_start, seq_len=seq_len)
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, impl="triton", out=out)
    assert not out.isnan().any(), "kernel left output elements unwritten"
    assert kernel_module.LAST_COMPILE.get("kernel") == "general"
    ref = reference_attention(q, k, v, index, q.shape[-1] ** -0.5)
    assert rel_err(out, ref) < TOL[q.dtype]
    visits = count_visited_pairs(q, k, v, index)
    assert visits.max() <= 1, "a pair was computed twice"
    assert torch.equal(visits.bool(), selection_mask(q, k, heads, seq_start, seq_len)), "coverage differs"
    assert torch.equal(count_tile_pairs_per_block(q, k, v, index).long(), tile_pairs_per_block(index))
    return out


def assert_padded_rows_zero(out, seq_start, seq_len):
    """Rows outside each sequence's ``[start, start + len)`` are 0."""
    n = out.shape[2]
    for b in range(out.shape[0]):
        pad = torch.ones(n, dtype=torch.bool)
        pad[int(seq_start[b]):int(seq_start[b]) + int(seq_len[b])] = False
        assert torch.equal(out[b, :, pad], torch.zeros_like(out[b, :, pad])), "padded rows must be 0"


def check_case(name, heads, B, Hq, Hkv, n, starts, lengths, dtype, head_dim=32):
    """:func:`check_kernel` on inputs seeded by ``name`` and ``dtype``: ``heads`` cycled over
    ``Hq`` query heads, ``starts`` / ``lengths`` (lists, or None: unpadded) the batch's
    sequences, whose padded rows must come out 0."""
    q, k, v = make_inputs(zlib.crc32(f"{name}{dtype}".encode()), B, Hq, Hkv, n, head_dim, dtype)
    heads = [heads[h % len(heads)] for h in range(Hq)]
    start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    length = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    out = check_kernel(q, k, v, heads, start, length)
    if start is not None:
        assert_padded_rows_zero(out, start, length)
    return out
