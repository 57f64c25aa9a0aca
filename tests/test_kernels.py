"""Triton kernel (under TRITON_INTERPRET=1 on CPU) against the float32 reference.

Every check poisons the output with NaN first, so an element the kernel forgets to write
fails the test; inputs are random (seeded per test for reproducibility).
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mi_compile.kernels.sparse_attention import count_visited_pairs  # noqa: E402
from mi_compile.patterns.reference import reference_attention  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP  # noqa: E402
from mi_compile.sparse import (build_sparse_index, selection_mask,  # noqa: E402
                               sparse_attention, sparse_attention_from_index)

from kernel_checks import TOL, make_inputs, rel_err  # noqa: E402


def run_kernel(q, k, v, index):
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, impl="triton", out=out)
    assert not out.isnan().any(), "kernel left output elements unwritten"
    return out


def check_against_reference(q, k, v, heads, seq_start=None, seq_len=None):
    index = build_sparse_index(q, k, heads, seq_start=seq_start, seq_len=seq_len)
    out = run_kernel(q, k, v, index)
    ref = reference_attention(q, k, v, index, q.shape[-1] ** -0.5)
    err = rel_err(out, ref)
    assert err < TOL[q.dtype], f"rel err {err:.2e}"
    # the kernel visits exactly the reference selection, each pair once
    visits = count_visited_pairs(q, k, v, index)
    mask = selection_mask(q, k, heads, seq_start, seq_len)
    assert visits.max() <= 1, "a pair was computed twice"
    assert torch.equal(visits.bool(), mask), "kernel coverage differs from the reference mask"
    return out


MIXED = [HP("dense"), HP("a_shape", sink=4, local=40), HP("vertical_slash", vertical=68, slash=70),
         HP("block_sparse", topk=2)]
CASES = [
    # name, heads (cycled to Hq), n, D, Hq, Hkv
    ("dense", [HP("dense")], 67, 32, 2, 2),
    ("a_shape", [HP("a_shape", sink=8, local=30), HP("a_shape", sink=0, local=1),
                 HP("a_shape", sink=70, local=64)], 191, 16, 3, 1),
    ("vertical_slash", [HP("vertical_slash", vertical=70, slash=68),
                        HP("vertical_slash", vertical=10, slash=3)], 191, 64, 4, 1),
    ("block_sparse", [HP("block_sparse", topk=1), HP("block_sparse", topk=2)], 130, 96, 8, 1),
    ("mixed_gqa4", MIXED, 130, 80, 8, 2),
    ("mixed_gqa8", MIXED, 191, 32, 8, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,heads,n,D,Hq,Hkv", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(name, heads, n, D, Hq, Hkv, dtype):
    q, k, v = make_inputs(zlib.crc32(f"{name}{dtype}".encode()), 1, Hq, Hkv, n, D, dtype)
    heads = [heads[h % len(heads)] for h in range(Hq)]
    check_against_reference(q, k, v, heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_padded_batch_equals_each_sequence_alone(dtype):
    """Batch of 2: left-padded (start 61, len 130) and right-padded (start 0, len 67)."""
    B, Hq, Hkv, n, D = 2, 4, 2, 191, 32
    q, k, v = make_inputs(7, B, Hq, Hkv, n, D, dtype)
    heads = [HP("a_shape", sink=3, local=50), HP("vertical_slash", vertical=66, slash=67),
             HP("block_sparse", topk=1), HP("dense")]
    start = torch.tensor([61, 0], dtype=torch.int32)
    length = torch.tensor([130, 67], dtype=torch.int32)
    out = check_against_reference(q, k, v, heads, start, length)
    for b in range(B):
        s, L = int(start[b]), int(length[b])
        alone = run_kernel(*(x[b:b + 1, :, s:s + L] for x in (q, k, v)),
                           build_sparse_index(q[b:b + 1, :, s:s + L], k[b:b + 1, :, s:s + L], heads))
        assert rel_err(out[b:b + 1, :, s:s + L], alone) < TOL[dtype]
        pad = torch.ones(n, dtype=torch.bool)
        pad[s:s + L] = False
        assert torch.equal(out[b, :, pad], torch.zeros_like(out[b, :, pad])), "padded rows must be 0"


def test_padded_batch_128_row_path():
    """Layers of only dense / A-shape heads take the 128-row kernel; padding, sinks past the
    first program, a band edge spanning several tiles, and a partial last program."""
    from mi_compile.kernels import sparse_attention as kernel_module
    B, Hq, Hkv, n, D = 2, 4, 2, 333, 16
    q, k, v = make_inputs(8, B, Hq, Hkv, n, D, torch.float32)
    heads = [HP("a_shape", sink=130, local=150), HP("dense"), HP("a_shape", sink=5, local=1),
             HP("a_shape", sink=0, local=70)]
    start = torch.tensor([61, 0], dtype=torch.int32)
    length = torch.tensor([270, 201], dtype=torch.int32)
    for block_n in (64, 128):
        saved = dict(kernel_module.KERNEL_CONFIG)
        kernel_module.KERNEL_CONFIG.update(wide=True, wide_block_n=block_n)
        try:
            out = check_against_reference(q, k, v, heads, start, length)
            assert kernel_module.LAST_COMPILE.get("kernel") == "wide"
        finally:
            kernel_module.KERNEL_CONFIG.clear()
            kernel_module.KERNEL_CONFIG.update(saved)
        for b in range(B):
            pad = torch.ones(n, dtype=torch.bool)
            pad[int(start[b]):int(start[b]) + int(length[b])] = False
            assert torch.equal(out[b, :, pad], torch.zeros_like(out[b, :, pad])), "padded rows must be 0"


@pytest.mark.parametrize("heads", [
    [HP("dense"), HP("a_shape", sink=16, local=64), HP("vertical_slash", vertical=32, slash=64),
     HP("block_sparse", topk=2)],
    [HP("dense"), HP("a_shape", sink=16, local=64)] * 2,
], ids=["general", "wide"])
def test_gqa_grouped_program_order(heads):
    """``KERNEL_CONFIG["group_heads"]`` only reorders programs (the query heads of a KV head
    interleave per row block); every element comes out bit-identical, padding included."""
    from mi_compile.kernels import sparse_attention as kernel_module
    q, k, v = make_inputs(12, 2, 4, 2, 200, 32, torch.float32)
    length = torch.tensor([200, 130], dtype=torch.int32)
    saved = dict(kernel_module.KERNEL_CONFIG)
    outs = []
    try:
        for group in (False, True):
            kernel_module.KERNEL_CONFIG["group_heads"] = group
            outs.append(sparse_attention(q, k, v, heads, seq_len=length, impl="triton"))
    finally:
        kernel_module.KERNEL_CONFIG.clear()
        kernel_module.KERNEL_CONFIG.update(saved)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("heads", [
    [HP("a_shape", sink=0, local=200)], [HP("a_shape", sink=200, local=1)],
    [HP("vertical_slash", vertical=1, slash=500)], [HP("block_sparse", topk=4)], [HP("dense")],
], ids=["local>=n", "sink>=n", "slash>=n", "topk>=blocks", "dense"])
def test_full_selection_equals_dense_causal(heads):
    q, k, v = make_inputs(3, 1, 4, 2, 191, 64, torch.float32)
    out = sparse_attention(q, k, v, heads * 4, impl="triton")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, ref) < 1e-4


def test_auto_and_reference_impls_agree():
    q, k, v = make_inputs(11, 1, 4, 4, 130, 16, torch.float32)
    heads = [MIXED[h] for h in range(4)]
    auto = sparse_attention(q, k, v, heads)                       # triton under the interpreter
    ref = sparse_attention(q, k, v, heads, impl="reference")
    assert rel_err(auto, ref) < 1e-4


def test_head_dim_256_and_noncontiguous_inputs():
    B, Hq, Hkv, n, D = 1, 2, 1, 67, 256
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, n, Hq, D, generator=g).transpose(1, 2)    # [B, H, n, D], strided
    k = torch.randn(B, n, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, n, Hkv, D, generator=g).transpose(1, 2)
    check_against_reference(q, k, v, [HP("a_shape", sink=2, local=9), HP("vertical_slash", vertical=2, slash=1)])


def _bad(**over):
    q, k, v = make_inputs(0, 1, 4, 2, 64, 32, torch.float32)
    args = dict(q=q, k=k, v=v, heads=[HP("dense")] * 4)
    args.update(over)
    return args


@pytest.mark.parametrize("over,message", [
    (dict(heads=[HP("dense")] * 3), "3 head patterns for 4 query heads"),
    (dict(k=torch.randn(1, 2, 60, 32), v=torch.randn(1, 2, 60, 32)), "q_len == kv_len"),
    (dict(q=torch.randn(1, 4, 64, 12), k=torch.randn(1, 2, 64, 12), v=torch.randn(1, 2, 64, 12)),
     "head_dim 12 unsupported"),
    (dict(q=torch.randn(1, 4, 64, 512), k=torch.randn(1, 2, 64, 512), v=torch.randn(1, 2, 64, 512)),
     "head_dim 512 unsupported"),
    (dict(v=torch.randn(1, 2, 64, 32, dtype=torch.float16)), "dtypes differ"),
    (dict(k=torch.randn(1, 3, 64, 32), v=torch.randn(1, 3, 64, 32)), "multiple of KV heads"),
    (dict(impl="cuda"), "impl must be"),
])
def test_bad_input_raises(over, message):
    args = _bad(**over)
    with pytest.raises(ValueError, match=message):
        sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("heads"), **args)


def test_encoded_heads_and_cpu_reference_density():
    """The flat int[] form of the heads works, and the plain-CPU density path (no kernel)
    agrees with the kernel's counting walk."""
    from mi_compile.patterns.spec import encode_heads
    from mi_compile.sparse import index_density
    from mi_compile.kernels import dispatch
    q, k, v = make_inputs(21, 1, 4, 2, 130, 16, torch.float32)
    heads = [MIXED[h] for h in range(4)]
    assert torch.equal(sparse_attention(q, k, v, encode_heads(heads)), sparse_attention(q, k, v, heads))
    index = build_sparse_index(q, k, heads)
    walked = index_density(index, q, k)
    dispatch.interpreting, saved = (lambda: False), dispatch.interpreting      # the reference's sum
    try:
        summed = index_density(index, q, k)
    finally:
        dispatch.interpreting = saved
    assert torch.allclose(walked, summed)


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """``benchmarks/gpu_checks.py`` (the GPU correctness matrix) runs end to end on the CPU
    under the interpreter at a small length, so it does not rot between GPU sessions."""
    import json
    import pathlib
    import subprocess
    import sys
    env = dict(os.environ, GPU_CHECKS_DEVICE="cpu", GPU_CHECKS_N="130", TRITON_INTERPRET="1")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_checks", "--one", "80", "float16", "--json", str(out)],
                          cwd=pathlib.Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["running"] is None                       # every check finished
    results = saved["results"]
    assert [r["check"] for r in results] == ["mixed_gqa1", "mixed_gqa4", "mixed_gqa8", "adaptive_gqa1",
                                             "adaptive_gqa4", "wide", "full_selection_vs_sdpa",
                                             "backend_tiny_llama", "hopper_wide", "hopper_ws", "hopper_sparse",
                                             "hopper_sparse_pipe", "chunk_gqa1", "chunk_gqa4", "backend_chunk",
                                             "top_select", "hopper_ws_persist", "hopper_sparse_ws"]
    assert all(r.get("skipped") for r in results if r["check"].startswith("hopper_"))   # no sm_90 here
    assert all(r["ok"] for r in results)


def test_gpu_checks_kill_a_hung_pair_and_keep_its_finished_checks(tmp_path):
    """A pair's process still running at the deadline (a deadlocked kernel) is killed: the checks
    it saved stay, the one it was in fails as timed out; a crashed one fails with its exit code."""
    import json
    import subprocess
    import sys
    import time
    from benchmarks.gpu_checks import collect_pair
    path = tmp_path / "pair.json"
    done = {"head_dim": 64, "dtype": "float16", "check": "wide", "ok": True}
    path.write_text(json.dumps({"results": [done], "running": "hopper_sparse_ws"}))
    log = open(tmp_path / "pair.log", "w")
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    t = time.time()
    results = collect_pair(64, "float16", str(path), log, hung, deadline=time.time() + 1)
    assert time.time() - t < 30 and hung.returncode is not None       # killed, not waited for
    assert results[0] == done
    assert results[1]["check"] == "hopper_sparse_ws" and not results[1]["ok"]
    assert "timed out" in results[1]["error"]
    assert not path.exists()
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    results = collect_pair(64, "float16", str(path), open(tmp_path / "b.log", "w"), crashed, deadline=None)
    assert results == [{"head_dim": 64, "dtype": "float16", "check": "process", "ok": False,
                        "error": "process exit 3; see the log"}]


@pytest.mark.parametrize("value,wide,sparse", [("", None, None), ("0", None, None), ("1", "wide", None),
                                              ("wide", "wide", None), ("ws", "ws", None), ("sparse", "wide", "sparse"),
                                              ("ws_sparse", "ws", "sparse_pipe"), ("sparse_ws", "ws", "sparse_ws"),
                                              ("ws_persist", "ws_persist", None)])
def test_hopper_opt_in_names_the_kernels(monkeypatch, value, wide, sparse):
    """=1 / =ws take the Gluon kernels for dense / A-shape layers only (Triton keeps any other
    index); =sparse / =ws_sparse / =sparse_ws send every layer to Gluon."""
    from mi_compile.kernels.dispatch import HOPPER_ENV, hopper_opt_in
    monkeypatch.setenv(HOPPER_ENV, value)
    choice = hopper_opt_in()
    assert (choice is None) if wide is None else (choice.wide, choice.sparse) == (wide, sparse)


@pytest.mark.parametrize("programs,batch,heads,sms,grid", [(1024, 1, 32, 132, (132, 1)), (2, 1, 3, 132, (6, 1)),
                                                           (1024, 2, 12, 132, (66, 2)), (8, 200, 4, 132, (1, 200))])
def test_persistent_wide_grid_is_one_program_an_sm(programs, batch, heads, sms, grid):
    """The persistent Gluon kernel's grid: a program an SM over the batch, at most one a block,
    at least one per batch element."""
    from mi_compile.kernels.hopper_wide import persistent_grid
    assert persistent_grid(programs, batch, heads, sms) == grid


def test_hopper_opt_in_rejects_an_unknown_value(monkeypatch):
    from mi_compile.kernels.dispatch import HOPPER_ENV, hopper_opt_in
    monkeypatch.setenv(HOPPER_ENV, "fa3")
    with pytest.raises(ValueError, match="MI_COMPILE_HOPPER must be one of"):
        hopper_opt_in()


def test_hopper_kernels_stay_off_on_cpu_tensors(monkeypatch):
    """Opted in, CPU tensors still run the Triton / reference path (the Gluon kernels are sm_90)."""
    from mi_compile.kernels import hopper_wide
    from mi_compile.kernels.dispatch import HOPPER_ENV
    monkeypatch.setenv(HOPPER_ENV, "ws")
    q = torch.randn(1, 2, 128, 64, dtype=torch.float16)
    assert not hopper_wide.usable(q, q, q, q)
    assert hopper_wide.unavailable_reason() is not None
