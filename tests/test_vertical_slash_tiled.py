"""vertical_slash_tiled: vertical-slash whose extra diagonals are whole key blocks.

Checks the block scores against their definition (brute force), the selection (forced local
diagonals + the best block distances), the two table builders against each other, the kernel
against the reference, and that a block costs one tile where scattered offsets cost one each.
"""
import pytest
import torch

from mi_compile.kernels.constants import BLOCK, SENTINEL
from mi_compile.patterns import vertical_slash
from mi_compile.patterns.cost import computed_density
from mi_compile.patterns.index import build_index
from mi_compile.patterns.registry import PatternError, get
from mi_compile.patterns.spec import HeadPattern
from mi_compile.sparse import sparse_attention

HP = HeadPattern


def _brute_tile_scores(slash: torch.Tensor) -> torch.Tensor:
    n = slash.shape[-1]
    out = []
    for t in range(1, -(-n // BLOCK)):
        if not torch.isfinite(slash[64 * t]):
            out.append(float("-inf"))
            continue
        total = 0.0
        for d in range(64 * t - 63, 64 * t + 64):
            if 0 <= d < n and torch.isfinite(slash[d]):
                total += float(slash[d]) * (64 - abs(d - 64 * t)) / 64
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize("n", [65, 128, 200, 333])
def test_tile_scores_follow_their_definition(n):
    g = torch.Generator().manual_seed(n)
    slash = torch.rand(n, generator=g)
    slash[n - 30:] = float("-inf")                      # offsets outside a shorter sequence
    got = vertical_slash.tile_scores(slash[None])[0]
    want = _brute_tile_scores(slash)
    assert got.shape == want.shape == (-(-n // BLOCK) - 1,)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_block_scores_share_the_mass_without_double_counting():
    """Every offset's weight over all block distances (t = 0 included) sums to one."""
    n = 64 * 9
    for d in (0, 1, 63, 64, 100, 300, n - 1):
        slash = torch.zeros(n)
        slash[d] = 1.0
        with_t0 = float(vertical_slash.tile_scores(slash[None]).sum()) + max(0, 64 - d) / 64
        assert abs(with_t0 - 1.0) < 1e-6 or d > 64 * (-(-n // BLOCK) - 1), d


def test_selection_is_forced_diagonals_plus_best_blocks():
    n = 640
    vert = torch.zeros(1, 1, n)
    slash = torch.full((1, 1, n), 1e-3)
    for t in (3, 7):                                    # two hot block distances
        slash[0, 0, 64 * t - 5:64 * t + 5] = 1.0
    spec = get("vertical_slash_tiled")
    head = HP("vertical_slash_tiled", vertical=64, slash=64 + 2 * 64)
    _, offs = vertical_slash.select_vertical_slash(vert, slash, [spec.selection_params(head)],
                                                   torch.tensor([n], dtype=torch.int32))
    kept = offs[0, 0][offs[0, 0] < SENTINEL].tolist()
    assert kept == list(range(64)) + [192, 448]


def test_parameters_label_and_no_minference_form():
    spec = get("vertical_slash_tiled")
    head = HP("vertical_slash_tiled", vertical=300, slash=64 + 130)
    assert spec.selection_params(head) == (300, 64 + 3, 64) and spec.label(head) == "300/3b"
    assert spec.meta_params(head) == (300, 67)
    assert spec.selection_params(HP("vertical_slash_tiled", vertical=1, slash=40)) == (1, 40, 64)
    with pytest.raises(PatternError, match="vertical_slash_tiled needs vertical >= 1 and slash >= 1"):
        HP("vertical_slash_tiled", vertical=0, slash=100)
    with pytest.raises(PatternError, match="vertical_slash_tiled has no MInference form"):
        spec.from_minference(10, 100)
    cands = spec.candidates(8192)
    assert cands and all(p.kind == "vertical_slash_tiled" and p.slash > 64 for _, p in cands)


def _inputs(B, H, Hkv, n, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h in (H, Hkv, Hkv)]


MIXED = [HP("vertical_slash_tiled", vertical=100, slash=200), HP("vertical_slash", vertical=100, slash=200),
         HP("vertical_slash_tiled", vertical=70, slash=65), HP("dense")]


def test_fused_and_torch_builders_agree_bit_for_bit():
    q, k, _ = _inputs(2, 4, 2, 333, 32)
    ss = torch.tensor([0, 20], dtype=torch.int32)
    sl = torch.tensor([333, 300], dtype=torch.int32)
    a = build_index(q, k, MIXED, 32 ** -0.5, ss, sl, tables="torch")
    b = build_index(q, k, MIXED, 32 ** -0.5, ss, sl, tables="triton")
    for name in ("offsets", "group_lo", "group_hi", "tile_start", "tile_end", "tiles_upto", "columns",
                 "columns_upto", "covered"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    offs = a.offsets[0, 0]
    extra = offs[(offs >= 64) & (offs < SENTINEL)]
    assert extra.numel() == 3 and bool((extra % 64 == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference_padded_gqa(dtype):
    q, k, v = _inputs(2, 4, 2, 301, 64, dtype)
    ss = torch.tensor([0, 11], dtype=torch.int32)
    sl = torch.tensor([301, 277], dtype=torch.int32)
    out = sparse_attention(q, k, v, MIXED, seq_start=ss, seq_len=sl, impl="triton")
    ref = sparse_attention(q, k, v, MIXED, seq_start=ss, seq_len=sl, impl="reference")
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_a_block_costs_one_tile_where_the_same_diagonals_cost_more_offset_by_offset():
    """Planted mass on seven diagonals 9 apart: chosen offset by offset they form an interval
    that straddles two tiles per query block; as a block distance they cost one."""
    n, D = 64 * 12, 32
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, n, D, generator=g) * 0.1
    q = torch.zeros(1, 1, n, D)
    for i in range(n):                                 # query i looks at keys i - 320 - (i % 7) * 9
        j = i - 320 - (i % 7) * 9
        if j >= 0:
            q[0, 0, i] = k[0, 0, j] * 60
    ss, sl = torch.zeros(1, dtype=torch.int32), torch.full((1,), n, dtype=torch.int32)
    plain = build_index(q, k, [HP("vertical_slash", vertical=64, slash=64 + 8)], D ** -0.5, ss, sl)
    tiled = build_index(q, k, [HP("vertical_slash_tiled", vertical=64, slash=64 + 64)], D ** -0.5, ss, sl)
    assert float(computed_density(tiled)) < float(computed_density(plain))
