"""Computed density: the tile count read from the index equals what the kernel walks.

The kernel's counting mode 3 (under TRITON_INTERPRET=1) adds up the whole rectangle of every
tile it visits; :mod:`mi_compile.patterns.cost` predicts the same number from the tables.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mi_compile.kernels import sparse_attention as K  # noqa: E402
from mi_compile.patterns.cost import computed_density, computed_pairs, tile_pairs_per_block  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP  # noqa: E402
from mi_compile.sparse import build_sparse_index, selection_density  # noqa: E402

MIXED = [HP("dense"), HP("a_shape", sink=4, local=100), HP("vertical_slash", vertical=130, slash=90),
         HP("block_sparse", topk=3), HP("vertical_slash", vertical=64, slash=64),
         HP("vertical_slash", vertical=200, slash=300)]


def _inputs(n, B=1, Hq=6, Hkv=3, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g))


@pytest.mark.parametrize("n, padded", [(130, False), (321, False), (300, True)])
def test_tile_count_matches_kernel_walk(n, padded, monkeypatch):
    monkeypatch.setitem(K.KERNEL_CONFIG, "wide", False)
    B = 2 if padded else 1
    q, k = _inputs(n, B=B)
    kw = {}
    if padded:
        kw = dict(seq_start=torch.tensor([0, 37], dtype=torch.int32),
                  seq_len=torch.tensor([n, n - 37 - 11], dtype=torch.int32))
    index = build_sparse_index(q, k, MIXED, **kw)
    walked = K.count_tile_pairs_per_block(q, k, k, index).long()
    assert torch.equal(tile_pairs_per_block(index), walked)


def test_computed_pairs_hold_the_selection_and_dense_is_one():
    n = 321
    q, k = _inputs(n)
    index = build_sparse_index(q, k, MIXED)
    pairs = computed_pairs(index)
    causal = n * (n + 1) / 2
    selected = selection_density(q, k, MIXED) * causal
    assert (pairs >= selected - 1e-6).all()              # tiles hold every selected pair
    nqb = -(-n // 64)
    assert pairs[0, 0].item() == nqb * (nqb + 1) // 2 * 64 * 64
    density = computed_density(index)
    assert density[0, 0].item() == 1.0
    # at a few hundred tokens scattered slash diagonals cost more tiles than dense walks
    assert density[0, 2].item() > 1.0
    # an isolated slash offset costs a whole 64-key tile per block: nominal 90 offsets, far more computed
    assert pairs[0, 2] > selected[0, 2]
