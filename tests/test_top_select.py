"""The Triton top-k select (mi_compile.kernels.top_select) against the torch path it replaces on
CUDA (vertical_slash.top_rows_torch: torch.topk, ranks past each row's count dropped, a sort),
in the interpreter; and through the index builder."""
import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from mi_compile.kernels.constants import FORCED, SENTINEL
from mi_compile.kernels.top_select import SELECT_CONFIG, top_select
from mi_compile.patterns import vertical_slash
from mi_compile.patterns.spec import HeadPattern as HP
from mi_compile.sparse import build_sparse_index


def _scores(B, R, m, seed, holes=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, R, m, generator=g) * 3
    if holes:                                   # keys outside the sequence: -inf
        s[..., m // 3: m // 3 + 17] = float("-inf")
        s[0, 0] = torch.where(torch.rand(m, generator=g) < 0.6, s[0, 0], float("-inf"))
    return s


def _torch_select(scores, limits, width):
    """top_rows_torch's work on rows that start at 0 (it drops the first FORCED entries)."""
    padded = torch.cat([scores.new_zeros(scores.shape[:-1] + (FORCED,)), scores], -1)
    return vertical_slash.top_rows_torch(padded, limits, width)


@pytest.mark.parametrize("B,R,m,width,seed", [(1, 3, 300, 40, 0), (2, 4, 5000, 700, 1), (1, 2, 64, 64, 2),
                                              (1, 5, 9, 9, 3), (2, 1, 4099, 2100, 4)])
def test_equals_the_torch_top_k(B, R, m, width, seed):
    """Counts above the width, zero, between; rows with fewer finite entries than asked; widths up to
    the row length; several sweep steps (m > 2048)."""
    scores = _scores(B, R, m, seed)
    limits = torch.randint(0, width + 5, (R,), generator=torch.Generator().manual_seed(seed))
    limits[0] = width + 3
    if R > 2:
        limits[1] = 0
    got = top_select(scores, limits, width)
    assert got.dtype == torch.int32 and got.shape == (B, R, width)
    assert torch.equal(got, _torch_select(scores, limits, width))


def test_rows_of_a_strided_view_and_negative_scores():
    """A view that skips leading entries (as top_rows passes scores[..., FORCED:]) and all-negative
    scores (their integer keys order as the floats do)."""
    base = -_scores(2, 3, 3000, 5, holes=False).abs() - 1.0
    limits = torch.tensor([100, 1, 2900])
    got = top_select(base[..., 77:], limits, 2900)
    assert torch.equal(got, _torch_select(base[..., 77:].contiguous(), limits, 2900))


def test_ties_go_to_the_lowest_indices():
    s = torch.zeros(1, 3, 200)
    s[0, 0, 50:60] = 1.0                        # 10 above, then ties at 0.0
    s[0, 2, :] = float("-inf")                  # nothing finite
    s[0, 2, 190] = 2.0
    got = top_select(s, torch.tensor([15, 5, 7]), 20)
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, *range(50, 60)] + [SENTINEL] * 5
    assert got[0, 1].tolist() == [0, 1, 2, 3, 4] + [SENTINEL] * 15
    assert got[0, 2].tolist() == [190] + [SENTINEL] * 19


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="float32"):
        top_select(torch.zeros(1, 2, 10, dtype=torch.float16), torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="3 limits for 2 rows"):
        top_select(torch.zeros(1, 2, 10), torch.tensor([1, 1, 1]), 4)


def test_the_index_builder_selects_the_same_with_the_kernel(monkeypatch):
    """build_sparse_index with the select kernel in top_rows (as on CUDA when switched on) gives
    the torch path's tables, here for a prefill and a chunk of a layer of vertical-slash heads."""
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 4, 700, 32, generator=g), torch.randn(1, 2, 700, 32, generator=g)
    heads = [HP("vertical_slash", vertical=200, slash=300), HP("vertical_slash", vertical=90, slash=64, last=64),
             HP("vertical_slash", vertical=1000, slash=1000), HP("dense")]
    calls = []
    real = vertical_slash.top_select

    def counted(*args):
        calls.append(1)
        return real(*args)

    def tables(qq, kk, **kw):
        return build_sparse_index(qq, kk, heads, **kw)

    expected = [tables(q, k), tables(q[:, :, 500:], k)]
    monkeypatch.setattr(vertical_slash, "selection_impl", lambda t: "triton")
    monkeypatch.setattr(vertical_slash, "top_select", counted)
    monkeypatch.setitem(SELECT_CONFIG, "kernel", True)
    got = [tables(q, k), tables(q[:, :, 500:], k)]
    assert calls, "the select kernel did not run"
    for a, b in zip(expected, got):
        for name in (f.name for f in dataclasses.fields(a)):
            x, y = getattr(a, name), getattr(b, name)
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name
    monkeypatch.setitem(SELECT_CONFIG, "kernel", False)
    calls.clear()
    tables(q, k)
    assert not calls


@pytest.mark.slow
def test_compiles_for_sm90(tmp_path):
    """The select kernel compiles for the H100/H200 (triton's sm_90 lowering, not the interpreter)
    without spilling."""
    code = ("from benchmarks.kernel_resources import compile_kernel, resources\n"
            "from mi_compile.kernels import top_select as ts\n"
            "c = compile_kernel(ts._top_select_kernel, 'fp32', {'SENTINEL_VALUE': 1 << 30, 'BLOCK': ts._SELECT_BLOCK}, 16, 1, 90,\n"
            "                   pointers={'scores_ptr': 'fp32', 'limits_ptr': 'i64', 'out_ptr': 'i32'})\n"
            "r = resources(c); assert r['stack_bytes'] == 0 and r['registers'] <= 255, r; print(r)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
