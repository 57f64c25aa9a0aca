"""Correctness matrix on one CUDA GPU: every supported head dim, fp16 and bf16.

The CPU tests run the kernels under ``TRITON_INTERPRET=1`` in fp32/fp16 at small shapes, and
``benchmarks/kernels.py`` checks bf16 at the benchmark's shape (head_dim 128). This script runs
the rest of the correctness matrix on the GPU, where the compiled kernels (not the interpreter) run:

  head_dim 64, 80, 96, 128, 256  x  fp16, bf16

and for each pair:

- ``mixed_gqa{1,4,8}``: a layer of 8 query heads over 8 / 2 / 1 KV heads mixing every pattern
  (dense, A-shape, vertical-slash from the estimate, block-sparse), a batch of 2 with
  different lengths (the second left-padded), an odd length; against the float32 reference of
  the same selection; the kernel's own walk covers exactly the reference mask, each pair once;
  padded rows are 0; the padded sequence equals the same sequence run alone;
- ``adaptive_gqa{1,4}``: the same for a layer mixing tri-shape, XAttention, FlexPrefill,
  vertical-slash in whole blocks, vertical-slash and dense;
- ``wide``: a layer of only dense / A-shape heads (the 128-row kernel, head_dim <= 128);
- ``hopper_wide``, ``hopper_ws``, ``hopper_ws_persist``: the opt-in Gluon kernels (``MI_COMPILE_HOPPER=1`` /
  ``=ws`` / ``=ws_persist``;
  sm_90 with Gluon, head_dim 64 / 128, else recorded as skipped with the reason): the WIDE
  layer padded with GQA, a dense-only layer through strided K/V views, a chunk; against the
  float32 reference;
- ``hopper_sparse``, ``hopper_sparse_pipe``, ``hopper_sparse_ws``: the opt-in Gluon kernel for any
  index, plain, software-pipelined and warp-specialised (``=sparse`` / ``=ws_sparse`` / ``=sparse_ws``,
  same conditions): the MIXED and ADAPTIVE layers padded with GQA 4 and a chunk of MIXED, against
  the float32 reference (``hopper_sparse_ws`` runs last of a head dim's checks);
- ``full_selection_vs_sdpa``: every pattern with a selection covering the whole causal square
  equals ``F.scaled_dot_product_attention(is_causal=True)`` in the same dtype;
- ``chunk_gqa{1,4}``: a chunk of 700 queries continuing a cache of the mixed layer (``nq < nk``,
  bottom-right causal, the padded batch): against its reference, its walk exactly its selection,
  its rows equal to the whole prefill's where the selection does not depend on the chunk;
- ``backend_chunk``: a tiny Llama's chunk continuing a ``DynamicCache`` through the backend;
- ``backend_tiny_llama``: a 2-layer random-weight ``LlamaForCausalLM`` with that head_dim under
  ``torch.compile(backend="minference")`` (per-head config of full-coverage patterns, so the
  answer must equal dense attention's), a padded batch: every attention call rewritten, and
  the logits as close to the float32 model's as eager's in the same dtype are (within 2x).

Each (head_dim, dtype) runs in its own process so Triton and Inductor compile in parallel. Each
process saves its results after every check; with ``--timeout-s`` a process still running then
(a kernel that never returns, e.g. a deadlocked warp-specialised one) is killed, so its GPU is
free for what comes next, and the check it was in is a failure ("timed out") beside the ones
it finished. Writes ``$OUT/gpu_checks.json`` and prints one table; exits 1 if any check fails.

    OUT=$OUT python3 -m benchmarks.gpu_checks [--timeout-s 240]   # on the device
    python3 -m benchmarks.gpu_checks --one 128 bfloat16  # one pair, in this process
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F


import mi_compile
from mi_compile.kernels import sparse_attention as kernel_module
from mi_compile.kernels.sparse_attention import count_visited_pairs
from mi_compile.models import tiny_model
from mi_compile.patterns.reference import reference_attention
from mi_compile.patterns.spec import HeadPattern as HP
from mi_compile.sparse import (build_sparse_index, selection_mask, sparse_attention,
                               sparse_attention_from_index)

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = ("float16", "bfloat16")
# rel. error against the float32 reference; the kernels keep P in the input dtype for the PV
# product, so the error is a few units of that dtype's rounding (bf16 measured ~2e-3 at D=128)
TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}
# GPU_CHECKS_DEVICE=cpu GPU_CHECKS_N=... with TRITON_INTERPRET=1 (fp16 only): a dry run of this
# script on a machine without a GPU (slow; small N)
DEV = os.environ.get("GPU_CHECKS_DEVICE", "cuda")
HQ, N = 8, int(os.environ.get("GPU_CHECKS_N", "3001"))   # odd length: partial last blocks everywhere
START, LENGTH = (0, N // 6), (N, N - N // 6)            # the second sequence is left-padded
MIXED = [HP("dense"), HP("a_shape", sink=64, local=700), HP("vertical_slash", vertical=300, slash=500),
         HP("block_sparse", topk=6, last=64), HP("vertical_slash", vertical=40, slash=1500),
         HP("a_shape", sink=0, local=257), HP("block_sparse", topk=1), HP("vertical_slash", vertical=1, slash=3)]
# the input-adaptive patterns and tri-shape, with vertical-slash (dense last rows) and dense beside them
ADAPTIVE = [HP("tri_shape", sink=64, local=300, last=100), HP("xattention", threshold=900, stride=8, max_blocks=12),
            HP("flex_prefill", gamma=900, tau=100, min_budget=64), HP("vertical_slash_tiled", vertical=200, slash=400, last=64),
            HP("xattention", threshold=600, stride=16, max_blocks=64), HP("flex_prefill", gamma=950, tau=833,
                                                                           min_budget=128),
            HP("vertical_slash", vertical=100, slash=300, last=130), HP("dense")]
WIDE = [HP("dense"), HP("a_shape", sink=128, local=1024), HP("a_shape", sink=0, local=65),
        HP("a_shape", sink=300, local=1)] * 2


def full_selection(n: int) -> list:
    """One head of every pattern with a selection covering the whole causal square at ``n``."""
    blocks = (n + 63) // 64
    return [HP("dense"), HP("a_shape", sink=0, local=n), HP("vertical_slash", vertical=1, slash=n),
            HP("block_sparse", topk=blocks), HP("tri_shape", sink=0, local=n, last=0),
            HP("xattention", threshold=1000, stride=8, max_blocks=blocks),
            HP("flex_prefill", gamma=1000, tau=100, min_budget=0), HP("vertical_slash_tiled", vertical=1, slash=n)]


# selections that cover the whole causal square at N: each must equal dense attention
FULL = full_selection(N)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


def worst_row_err(out, ref):
    """The largest relative error of one output row: a pair left out or computed twice moves its
    row by far more than rounding does, however small its share of the whole output."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-3)).max().item()


def inputs(seed, B, Hkv, n, D, dtype):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(B, h, n, D, device=DEV, dtype=dtype, generator=g) for h in (HQ, Hkv, Hkv))


def run_kernel(q, k, v, index):
    out = torch.full_like(q, float("nan"))
    sparse_attention_from_index(q, k, v, index, out=out)
    assert not out.isnan().any(), "the kernel left output elements unwritten (or wrote NaN)"
    return out


def check_mixed(D, dtype, ratio, heads=MIXED):
    start = torch.tensor(START, dtype=torch.int32, device=DEV)
    length = torch.tensor(LENGTH, dtype=torch.int32, device=DEV)
    q, k, v = inputs(100 * D + ratio, 2, HQ // ratio, N, D, dtype)
    index = build_sparse_index(q, k, heads, seq_start=start, seq_len=length)
    out = run_kernel(q, k, v, index)
    assert kernel_module.LAST_COMPILE.get("kernel") == "general"
    err = rel_err(out, reference_attention(q, k, v, index, D ** -0.5))
    visits = count_visited_pairs(q, k, v, index)
    mask = selection_mask(q, k, heads, start, length)
    assert visits.max().item() <= 1, "the kernel computed a pair twice"
    assert torch.equal(visits.bool(), mask), (
        f"the kernel's coverage differs from the reference mask in {(visits.bool() ^ mask).sum().item()} pairs")
    del visits, mask
    s = START[1]
    assert torch.equal(out[1, :, :s], torch.zeros_like(out[1, :, :s])), "padded rows must be 0"
    alone_in = tuple(x[1:2, :, s:] for x in (q, k, v))
    alone = run_kernel(*alone_in, build_sparse_index(alone_in[0], alone_in[1], heads))
    err_alone = rel_err(out[1:2, :, s:], alone)
    assert err < TOL[dtype] and err_alone < TOL[dtype], f"rel err {err:.2e}, padded vs alone {err_alone:.2e}"
    return {"rel_err": round(err, 6), "padded_vs_alone": round(err_alone, 6)}


def check_wide(D, dtype):
    q, k, v = inputs(7 * D, 1, 2, N, D, dtype)
    index = build_sparse_index(q, k, WIDE)
    out = run_kernel(q, k, v, index)
    kernel = kernel_module.LAST_COMPILE.get("kernel")
    assert kernel == ("wide" if D <= 128 else "general"), kernel
    err = rel_err(out, reference_attention(q, k, v, index, D ** -0.5))
    assert err < TOL[dtype], f"rel err {err:.2e}"
    return {"rel_err": round(err, 6), "kernel": kernel}


class Skipped(Exception):
    """A check that does not apply here (recorded with its reason, not as a failure)."""


def _gluon_ready(D):
    """Skip unless a Gluon kernel can run here at this head dim."""
    from mi_compile.kernels import hopper_wide
    if DEV != "cuda":
        raise Skipped(f"device {DEV}")
    if D not in hopper_wide.HEAD_DIMS:
        raise Skipped(f"head_dim {D}: the kernels take {list(hopper_wide.HEAD_DIMS)}")
    why = hopper_wide.unavailable_reason()
    if why:
        raise Skipped(why)


def _gluon_against_triton(cases, opt_in, kernel_name, D, dtype):
    """Each case ``name -> (q, k, v, heads, seq_start, seq_len)`` run with
    ``MI_COMPILE_HOPPER=opt_in`` (must run ``kernel_name``) and without (the Triton kernels), both
    against the float32 reference of the index: within the tolerance, the worst row within
    rounding of the Triton kernels' worst row (whose coverage check_mixed / check_wide prove
    exact: a pair left out or doubled moves its row), padded rows 0, every element written."""
    from mi_compile.kernels.dispatch import HOPPER_ENV
    result = {}
    saved = os.environ.get(HOPPER_ENV)
    try:
        for name, (qx, kx, vx, heads, st, ln) in cases.items():
            index = build_sparse_index(qx, kx, heads, seq_start=st, seq_len=ln)
            os.environ[HOPPER_ENV] = opt_in
            out = run_kernel(qx, kx, vx, index)
            kernel = kernel_module.LAST_COMPILE.get("kernel")
            assert kernel == kernel_name, f"{name}: ran {kernel}"
            os.environ.pop(HOPPER_ENV)
            triton_out = run_kernel(qx, kx, vx, index)
            ref = reference_attention(qx, kx, vx, index, D ** -0.5)
            err, err_triton = rel_err(out, ref), rel_err(triton_out, ref)
            assert err < TOL[dtype], f"{name}: rel err {err:.2e} (Triton kernels {err_triton:.2e})"
            row, row_triton = worst_row_err(out, ref), worst_row_err(triton_out, ref)
            assert row <= 2 * row_triton + 1e-3, f"{name}: worst row {row:.2e} (Triton {row_triton:.2e})"
            if st is not None and qx.shape[2] == N:
                s = START[1]
                assert torch.equal(out[1, :, :s], torch.zeros_like(out[1, :, :s])), f"{name}: padded rows must be 0"
            result.update({name: round(err, 6), name + "_triton": round(err_triton, 6),
                           name + "_worst_row": round(row, 6)})
    finally:
        os.environ.pop(HOPPER_ENV, None)
        if saved is not None:
            os.environ[HOPPER_ENV] = saved
    return {"kernel": kernel_name, **result}


def check_hopper(D, dtype, variant):
    """A Gluon kernel for the wide layers (``MI_COMPILE_HOPPER=1`` for ``"wide"``, else ``=variant``:
    ``"ws"``, ``"ws_persist"``; sm_90, head_dim 64 / 128): the WIDE layer as a padded batch of 2 over 2 KV heads,
    a dense-only layer with K/V read through views of ``[B, n, Hkv, D]`` storage (4D TMA
    strides), and a chunk of the WIDE layer continuing a cache (:func:`_gluon_against_triton`)."""
    _gluon_ready(D)
    start = torch.tensor(START, dtype=torch.int32, device=DEV)
    length = torch.tensor(LENGTH, dtype=torch.int32, device=DEV)
    nq = max(64, N * 7 // 30)
    q, k, v = inputs(11 * D, 2, 2, N, D, dtype)
    kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs(13 * D, 1, 2, N, D, dtype)[1:])
    cases = {"wide_padded_gqa4": (q, k, v, WIDE, start, length),
             "dense_gqa4_strided": (q[:1], kt, vt, [HP("dense")] * HQ, None, None),
             "wide_chunk": (q[:, :, N - nq:].contiguous(), k, v, WIDE, start, length)}
    return _gluon_against_triton(cases, "1" if variant == "wide" else variant, f"hopper_{variant}", D, dtype)


SPARSE_OPT_IN = {"sparse": "sparse", "sparse_pipe": "ws_sparse", "sparse_ws": "sparse_ws"}


def check_hopper_sparse(D, dtype, variant="sparse"):
    """The Gluon kernel for any index (``MI_COMPILE_HOPPER=sparse``; ``variant`` ``"sparse_pipe"``:
    its software-pipelined schedule, ``=ws_sparse``; ``"sparse_ws"``: that schedule fed by a
    producer warp, ``=sparse_ws``; sm_90, head_dim 64 / 128): the MIXED and ADAPTIVE layers as
    padded batches over 2 KV heads, and a chunk of the MIXED layer continuing a cache
    (:func:`_gluon_against_triton`)."""
    _gluon_ready(D)
    start = torch.tensor(START, dtype=torch.int32, device=DEV)
    length = torch.tensor(LENGTH, dtype=torch.int32, device=DEV)
    nq = max(64, N * 7 // 30)
    q, k, v = inputs(17 * D, 2, 2, N, D, dtype)
    cases = {"mixed_padded_gqa4": (q, k, v, MIXED, start, length),
             "adaptive_padded_gqa4": (q, k, v, ADAPTIVE, start, length),
             "mixed_chunk": (q[:, :, N - nq:].contiguous(), k, v, MIXED, start, length)}
    return _gluon_against_triton(cases, SPARSE_OPT_IN[variant], f"hopper_{variant}", D, dtype)


def check_full_selection(D, dtype):
    q, k, v = inputs(3 * D, 1, 2, N, D, dtype)
    out = sparse_attention(q, k, v, FULL)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    err, err_sdpa = rel_err(out, ref), rel_err(ref, F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True))
    assert err < TOL[dtype], f"rel err vs SDPA {err:.2e}"
    return {"rel_err_vs_sdpa": round(err, 6), "sdpa_vs_float32": round(err_sdpa, 6)}


def check_backend(D, dtype):
    torch._dynamo.reset()
    layers, n = 2, min(700, N)
    model = tiny_model("llama", num_layers=layers, num_heads=HQ, num_kv_heads=2, head_dim=D,
                       vocab=128, max_position_embeddings=1024).to(DEV)
    g = torch.Generator().manual_seed(D)
    ids = torch.randint(3, 128, (2, n), generator=g).to(DEV)
    mask = torch.ones(2, n, dtype=torch.long, device=DEV)
    mask[0, :37] = 0                                            # left padding
    full = full_selection(n)
    config = {"format": "mi-compile/v1", "layers": {
        str(layer): {str(h): {"pattern": p.kind, **p.params} for h, p in enumerate(full)} for layer in range(layers)}}
    with torch.no_grad():
        ref32 = model(ids, attention_mask=mask, use_cache=False).logits
        model = model.to(dtype)
        eager = model(ids, attention_mask=mask, use_cache=False).logits
        backend = mi_compile.backend({"config": config, "min_seq_len": 0})
        out = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
    (report,) = backend.reports
    assert report.rewritten == layers, mi_compile.debug.format_table(report.sites)
    valid = mask.bool()
    err, err_eager = rel_err(out[valid], ref32[valid]), rel_err(eager[valid], ref32[valid])
    assert torch.isfinite(out).all() and err <= 2 * err_eager + 1e-4, (
        f"compiled vs float32 {err:.2e}, eager {dtype} vs float32 {err_eager:.2e}")
    return {"rewritten": report.rewritten, "compiled_vs_fp32": round(err, 6),
            "eager_vs_fp32": round(err_eager, 6)}


def check_chunk(D, dtype, ratio):
    """A chunk continuing a cache (``nq < nk``, bottom-right causal) of the mixed layer, batch of
    2 with the second left-padded: against the float32 reference of the chunk's own index, its
    walk exactly the chunk's selection, and its rows equal to the whole prefill's last rows."""
    nq = max(64, N * 7 // 30)      # 700 of 3001
    start = torch.tensor(START, dtype=torch.int32, device=DEV)
    length = torch.tensor(LENGTH, dtype=torch.int32, device=DEV)
    q, k, v = inputs(300 * D + ratio, 2, HQ // ratio, N, D, dtype)
    qc = q[:, :, N - nq:].contiguous()
    index = build_sparse_index(qc, k, MIXED, seq_start=start, seq_len=length)
    out = run_kernel(qc, k, v, index)
    err = rel_err(out, reference_attention(qc, k, v, index, D ** -0.5))
    visits = count_visited_pairs(qc, k, v, index)
    mask = selection_mask(qc, k, MIXED, start, length)
    assert visits.max().item() <= 1 and torch.equal(visits.bool(), mask), "the chunk's walk differs from its selection"
    # the patterns whose selection of these rows does not depend on the chunk's pooled blocks
    same = [h for h, p in enumerate(MIXED) if p.kind != "block_sparse"]
    whole = run_kernel(q, k, v, build_sparse_index(q, k, MIXED, seq_start=start, seq_len=length))
    err_whole = rel_err(out[:, same], whole[:, same, N - nq:])
    assert err < TOL[dtype] and err_whole < TOL[dtype], f"rel err {err:.2e}, chunk vs whole prefill {err_whole:.2e}"
    # the dense-rows block (block_sparse last=64) with its keys split over ~6 programs and merged
    saved, per_part = kernel_module.KERNEL_CONFIG["split_tiles"], max(1, N // 64 // 6)
    kernel_module.KERNEL_CONFIG["split_tiles"] = per_part
    try:
        split = run_kernel(qc, k, v, index)
        splits = kernel_module.LAST_COMPILE.get("dense_splits")
    finally:
        kernel_module.KERNEL_CONFIG["split_tiles"] = saved
    err_split = rel_err(split, reference_attention(qc, k, v, index, D ** -0.5))
    assert splits == -(-(N // 64) // per_part) and err_split < TOL[dtype], f"split dense rows: rel err {err_split:.2e}"
    return {"rel_err": round(err, 6), "chunk_vs_whole": round(err_whole, 6), "split_rel_err": round(err_split, 6),
            "split_vs_walk": round(rel_err(split, out), 6)}


def check_backend_chunk(D, dtype):
    """A tiny Llama prefilled into a DynamicCache, then a chunk continuing it through the
    backend (full-coverage config): the chunk's attention calls rewritten, its logits as close to
    the float32 model's as eager's are (within 2x)."""
    from transformers import DynamicCache

    torch._dynamo.reset()
    layers, n, nq = 2, 600, 200
    model = tiny_model("llama", num_layers=layers, num_heads=HQ, num_kv_heads=2, head_dim=D,
                       vocab=128, max_position_embeddings=1024).to(DEV)
    ids = torch.randint(3, 128, (1, n + nq), generator=torch.Generator().manual_seed(D)).to(DEV)
    full = full_selection(n + nq)
    config = {"format": "mi-compile/v1", "default": {"pattern": "dense"}, "layers": {
        str(layer): {str(h): {"pattern": p.kind, **p.params} for h, p in enumerate(full) if p.kind not in (
            "xattention", "flex_prefill")} for layer in range(layers)}}

    def chunk_logits(m):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :n], past_key_values=cache, use_cache=True)
            return m(ids[:, n:], past_key_values=cache, use_cache=True).logits

    ref32 = chunk_logits(model)
    model = model.to(dtype)
    eager = chunk_logits(model)
    backend = mi_compile.backend({"config": config, "min_seq_len": 0})
    out = chunk_logits(torch.compile(model, backend=backend, dynamic=True))
    rewritten = max(r.rewritten for r in backend.reports)
    assert rewritten == layers, mi_compile.debug.format_table(backend.reports[-1].sites)
    err, err_eager = rel_err(out, ref32), rel_err(eager, ref32)
    assert torch.isfinite(out).all() and err <= 2 * err_eager + 1e-4, (
        f"compiled vs float32 {err:.2e}, eager {dtype} vs float32 {err_eager:.2e}")
    return {"rewritten": rewritten, "compiled_vs_fp32": round(err, 6), "eager_vs_fp32": round(err_eager, 6)}


def check_top_select():
    """The vertical-slash top-k kernel (what ``top_rows`` runs on CUDA) against torch.topk and a
    sort, on rows of 131072 (CUDA) and N scores with keys outside the sequence, counts 0 /
    between / past the width."""
    from mi_compile.kernels.constants import FORCED
    from mi_compile.kernels.top_select import top_select
    from mi_compile.patterns.vertical_slash import top_rows_torch
    g = torch.Generator(device=DEV).manual_seed(11)
    checked = []
    for m, width in ((131072, 8192), (N, N - 64)) if DEV == "cuda" else ((N, N - 64),):
        scores = torch.randn(2, 12, m, device=DEV, generator=g) * 3
        scores[1, :, m - 700:] = float("-inf")
        scores[0, 3, ::2] = float("-inf")
        limits = torch.randint(0, width + 100, (12,), device=DEV, generator=g)
        limits[0], limits[1] = 0, width + 50
        got, ref = top_select(scores[..., FORCED:], limits, width), top_rows_torch(scores, limits, width)
        assert torch.equal(got, ref), f"m={m}: {int((got != ref).sum())} entries differ"
        checked.append([m, width])
    return {"rows_by_width": checked}


def _save(path, results, running=None):
    """The results so far (and the check now running) at ``path``, replaced atomically."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump({"results": results, "running": running}, f)
        os.replace(path + ".tmp", path)


def run_one(D, dtype_name, only=(), path=None):
    """The checks of one (head_dim, dtype), those whose names start with one of ``only`` if
    given; returns a list of result dicts, saved to ``path`` (if given) after every check."""
    dtype = getattr(torch, dtype_name)
    torch.backends.cuda.matmul.allow_tf32 = False      # the float32 references stay float32
    checks = [(f"mixed_gqa{r}", lambda r=r: check_mixed(D, dtype, r)) for r in (1, 4, 8)]
    checks += [(f"adaptive_gqa{r}", lambda r=r: check_mixed(D, dtype, r, ADAPTIVE)) for r in (1, 4)]
    checks += [("wide", lambda: check_wide(D, dtype)),
               ("full_selection_vs_sdpa", lambda: check_full_selection(D, dtype)),
               ("backend_tiny_llama", lambda: check_backend(D, dtype)),
               ("hopper_wide", lambda: check_hopper(D, dtype, "wide")),
               ("hopper_ws", lambda: check_hopper(D, dtype, "ws")),
               ("hopper_sparse", lambda: check_hopper_sparse(D, dtype)),
               ("hopper_sparse_pipe", lambda: check_hopper_sparse(D, dtype, "sparse_pipe"))]
    checks += [(f"chunk_gqa{r}", lambda r=r: check_chunk(D, dtype, r)) for r in (1, 4)]
    checks += [("backend_chunk", lambda: check_backend_chunk(D, dtype)), ("top_select", check_top_select),
               # last: a warp-specialised kernel that deadlocks would hang the checks after it
               ("hopper_ws_persist", lambda: check_hopper(D, dtype, "ws_persist")),
               ("hopper_sparse_ws", lambda: check_hopper_sparse(D, dtype, "sparse_ws"))]
    if only:
        checks = [(name, fn) for name, fn in checks if name.startswith(tuple(only))]
    results = []
    for name, fn in checks:
        _save(path, results, running=name)
        t = time.time()
        try:
            results.append({"head_dim": D, "dtype": dtype_name, "check": name, "ok": True, **fn()})
        except Skipped as e:
            results.append({"head_dim": D, "dtype": dtype_name, "check": name, "ok": True, "skipped": str(e)})
        except Exception as e:  # noqa: BLE001  (report every failure, go on with the rest)
            traceback.print_exc()
            results.append({"head_dim": D, "dtype": dtype_name, "check": name, "ok": False,
                            "error": f"{type(e).__name__}: {e}"[:400]})
        results[-1]["s"] = round(time.time() - t, 1)
        print(json.dumps(results[-1]), flush=True)
        _save(path, results)
        torch.cuda.empty_cache()
    return results


def collect_pair(d, t, path, log, proc, deadline):
    """Wait for one pair's process until ``deadline`` (None: no limit); kill it past that. Its
    results: those it saved, plus a failure for the check it was in when killed or crashed."""
    try:
        proc.wait(timeout=None if deadline is None else max(deadline - time.time(), 0.1))
        killed = False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    log.close()
    saved = {"results": [], "running": None}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        os.remove(path)
    results = saved["results"]
    if killed or proc.returncode != 0:
        why = "timed out (a hang?): the process was killed" if killed else f"process exit {proc.returncode}"
        results.append({"head_dim": d, "dtype": t, "check": saved["running"] or "process", "ok": False,
                        "error": f"{why}; see the log"})
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", nargs=2, metavar=("HEAD_DIM", "DTYPE"), help="run one pair here")
    ap.add_argument("--json", help="with --one: write the results there")
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--checks", default="", help="comma-separated name prefixes: only those checks (e.g. hopper)")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="kill a pair's process still running this long after the start (its check fails)")
    args = ap.parse_args()
    only = [c for c in args.checks.split(",") if c]
    if args.one:
        results = run_one(int(args.one[0]), args.one[1], only, args.json)
        sys.exit(0 if all(r["ok"] for r in results) else 1)

    out_dir = os.environ.get("OUT", "/tmp")
    pairs = [(int(d), t) for d in args.head_dims.split(",") for t in args.dtypes.split(",")]
    t0 = time.time()
    deadline = None if args.timeout_s is None else t0 + args.timeout_s
    procs = []
    for d, t in pairs:
        path = os.path.join(out_dir, f".gpu_checks_{d}_{t}.json")
        log = open(os.path.join(out_dir, f".gpu_checks_{d}_{t}.log"), "w")
        procs.append((d, t, path, log, subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu_checks", "--one", str(d), t, "--json", path,
             "--checks", args.checks],
            stdout=log, stderr=subprocess.STDOUT)))
    results = []
    for d, t, path, log, p in procs:
        results += collect_pair(d, t, path, log, p, deadline)
        with open(log.name) as f:
            text = f.read()
        os.remove(log.name)
        if p.returncode != 0:
            print(f"--- log of head_dim {d} {t} (exit {p.returncode}) ---\n{text[-4000:]}")
        # each pair's verdicts as soon as it is done (a stage's timeout keeps what finished)
        pair = [r for r in results if (r["head_dim"], r["dtype"]) == (d, t)]
        print(f"head_dim {d} {t}: {sum(r['ok'] for r in pair)} of {len(pair)} passed", flush=True)
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
            "triton": __import__("triton").__version__, "wall_s": round(time.time() - t0, 1)}
    with open(os.path.join(out_dir, "gpu_checks.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\n{meta}\n{'head_dim':>8} {'dtype':>9} {'check':<24} {'ok':<4} detail")
    for r in results:
        detail = {k: v for k, v in r.items() if k not in ("head_dim", "dtype", "check", "ok")}
        print(f"{r['head_dim']:>8} {r['dtype']:>9} {r['check']:<24} {'yes' if r['ok'] else 'NO':<4} {detail}")
    failed = [r for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
