"""Kernel benchmark on one CUDA GPU: dense SDPA / FlexAttention anchors next to our kernels.

Shape (as /work/shared/anchors/attention_anchors.py): B=1, Hq=32, Hkv=8, D=128, bf16, causal,
n in NS (env, default 32768,131072). One process, everything in one call:

1. correctness in bf16 at CHECK_N (default 4096) against the float32 reference selection,
   a padded batch, and a CUDA-graph capture of the whole op;
2. a launch-parameter sweep at SWEEP_N (default the last n; SWEEP=0 to skip);
3. timings (median of triton.testing.do_bench), density from the index (kernel counting
   mode), effective TFLOP/s = 4 * D * computed pairs / time, ratio to cuDNN, peak extra memory.

Prints a table at the end, writes $OUT/kernels.json (rewritten after every size).
"""
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench


from mi_compile.kernels import sparse_attention as kernel_module
from mi_compile.kernels.estimate import ESTIMATE_CONFIG
from mi_compile.patterns import vertical_slash, xattention
from mi_compile.patterns.reference import reference_attention
from mi_compile.patterns.spec import HeadPattern as HP
from mi_compile.sparse import (build_sparse_index, index_density, sparse_attention,
                               sparse_attention_from_index)

DEV, DT = "cuda", torch.bfloat16
B, HQ, HKV, D = 1, 32, 8, 128
NS = [int(x) for x in os.environ.get("NS", "32768,131072").split(",")]
CHECK_N = int(os.environ.get("CHECK_N", "4096"))
OUT = os.environ.get("OUT", "/tmp")
FLEX = os.environ.get("FLEX", "1") == "1"
SWEEP = os.environ.get("SWEEP", "1") == "1"
# MInference's own kernels side by side: path of its PyPI sdist (benchmarks/minference_ref.py)
MINFERENCE_SDIST = os.environ.get("MINFERENCE_SDIST")
SCALE = D ** -0.5
rows, checks = [], []

A_SHAPE = [HP("a_shape", sink=128, local=4096)] * HQ
VS = [HP("vertical_slash", vertical=1000, slash=6096)] * HQ
BS = [HP("block_sparse", topk=100)] * HQ


def log(*a):
    print(*a, flush=True)


def save():
    with open(os.path.join(OUT, "kernels.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "checks": checks, "rows": rows, "config": kernel_module.KERNEL_CONFIG}, f, indent=1)


def bench(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def inputs(n, b=B, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(b, h, n, D, device=DEV, dtype=DT, generator=g) for h in (HQ, HKV, HKV))


def structured_selection(n):
    """The anchors' "structured" vertical-slash index, same recipe and seed."""
    g = torch.Generator(device=DEV).manual_seed(1)
    hot = torch.randint(64, n, (B, HQ, 1000 - 64), device=DEV, generator=g)
    vtop = torch.cat([torch.arange(64, device=DEV).expand(B, HQ, 64), hot], -1)
    far = torch.randint(5000, n, (B, HQ, 6096 - 5000), device=DEV, generator=g)
    stop = torch.cat([torch.arange(5000, device=DEV).expand(B, HQ, 5000), far], -1)
    return vtop, stop


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def record(**kw):
    rows.append(kw)
    log(json.dumps(kw))


def check(name, fn):
    try:
        t = time.time()
        value = fn()
        checks.append({"check": name, "value": value, "s": round(time.time() - t, 1)})
        log(f"CHECK {name}: {value}")
    except Exception as e:  # noqa: BLE001
        checks.append({"check": name, "error": repr(e)[:300]})
        log(f"CHECK {name} FAILED: {e!r}")
        traceback.print_exc()


def correctness():
    n = CHECK_N
    q, k, v = inputs(n, seed=10)

    def vs_ref(heads, **kw):
        index = build_sparse_index(q, k, heads, **kw)
        out = torch.full_like(q, float("nan"))
        sparse_attention_from_index(q, k, v, index, out=out)
        assert not out.isnan().any(), "unwritten or NaN output"
        return round(rel_err(out, reference_attention(q, k, v, index, SCALE)), 5)

    def structured_check():
        # the anchors' recipe needs n > 5000
        q8, k8, v8 = inputs(8192, seed=13)
        index = build_sparse_index(q8, k8, VS, vs_selection=structured_selection(8192))
        out = torch.full_like(q8, float("nan"))
        sparse_attention_from_index(q8, k8, v8, index, out=out)
        assert not out.isnan().any(), "unwritten or NaN output"
        return round(rel_err(out, reference_attention(q8, k8, v8, index, SCALE)), 5)

    small_vs = [HP("vertical_slash", vertical=200, slash=300)] * HQ
    mixed = [[HP("dense"), HP("a_shape", sink=64, local=512), HP("vertical_slash", vertical=300, slash=500),
              HP("block_sparse", topk=8)][h % 4] for h in range(HQ)]
    check("a_shape_128_1024", lambda: vs_ref([HP("a_shape", sink=128, local=1024)] * HQ))
    check("vs_structured_8192", lambda: structured_check())
    check("vs_estimate_200_300", lambda: vs_ref(small_vs))

    def estimate_kernels_vs_torch(nn, b, start, length):
        """The fused Triton estimate against the PyTorch definition on the same bf16 inputs:
        max abs score difference, and the share of the top-(1000, 6096) picks both make (the
        PyTorch path rounds scores to bf16 before its softmax; the kernels keep float32)."""
        qe, ke, _ = inputs(nn, b=b, seed=16)
        start = torch.tensor(start, dtype=torch.int32, device=DEV)
        length = torch.tensor(length, dtype=torch.int32, device=DEV)
        heads = list(range(HQ))
        got = vertical_slash.estimate_scores(qe, ke, heads, start, length, SCALE, impl="triton")
        want = vertical_slash.estimate_scores(qe, ke, heads, start, length, SCALE, impl="torch")
        result = {}
        for name, g, w in (("vertical", got[0], want[0]), ("slash", got[1], want[1])):
            assert torch.equal(torch.isfinite(g), torch.isfinite(w)), f"{name}: -inf pattern differs"
            real = torch.isfinite(w)
            result[f"{name}_max_abs_diff"] = float((g[real] - w[real]).abs().max())
        params = [(1000, 6096)] * HQ
        sel_got = vertical_slash.select_vertical_slash(*got, params, length)
        sel_want = vertical_slash.select_vertical_slash(*want, params, length)
        for name, g, w in zip(("columns", "offsets"), sel_got, sel_want):
            same = sum(len((set(a.tolist()) & set(c.tolist())) - {vertical_slash.SENTINEL})
                       for a, c in zip(g.flatten(0, 1), w.flatten(0, 1)))
            result[f"{name}_agree"] = round(same / max(1, (w < vertical_slash.SENTINEL).sum().item()), 4)
        return result
    check("estimate_kernels_vs_torch_8192", lambda: estimate_kernels_vs_torch(8192, 1, [0], [8192]))
    check("estimate_kernels_vs_torch_padded", lambda: estimate_kernels_vs_torch(
        8192, 2, [0, 1000], [8000, 7192]))
    check("block_sparse_top8", lambda: vs_ref([HP("block_sparse", topk=8)] * HQ))
    check("mixed_layer", lambda: vs_ref(mixed))
    check("dense_vs_sdpa", lambda: round(rel_err(
        sparse_attention(q, k, v, [HP("dense")] * HQ),
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)), 5))

    def padded_vs_alone(heads, seed):
        qb, kb, vb = inputs(2048, b=2, seed=seed)
        start = torch.tensor([300, 0], dtype=torch.int32, device=DEV)
        length = torch.tensor([1700, 1111], dtype=torch.int32, device=DEV)
        out = sparse_attention(qb, kb, vb, heads, seq_start=start, seq_len=length)
        errs = []
        for b in range(2):
            s, L = int(start[b]), int(length[b])
            alone = sparse_attention(qb[b:b + 1, :, s:s + L], kb[b:b + 1, :, s:s + L], vb[b:b + 1, :, s:s + L], heads)
            errs.append(round(rel_err(out[b:b + 1, :, s:s + L], alone), 5))
            keep = torch.ones(2048, dtype=torch.bool, device=DEV)
            keep[s:s + L] = False
            assert out[b][:, keep].abs().max().item() == 0, "padding rows not zero"
        return errs
    check("padded_batch_vs_alone", lambda: padded_vs_alone(mixed, 11))
    wide_heads = [[HP("dense"), HP("a_shape", sink=100, local=700)][h % 2] for h in range(HQ)]
    check("padded_wide_path_vs_alone", lambda: padded_vs_alone(wide_heads, 14))
    check("wide_mixed_dense_ashape", lambda: vs_ref(wide_heads))

    def dense_odd():
        q3, k3, v3 = inputs(3000, seed=15)
        return round(rel_err(sparse_attention(q3, k3, v3, [HP("dense")] * HQ),
                             F.scaled_dot_product_attention(q3, k3, v3, is_causal=True, enable_gqa=True)), 5)
    check("dense_vs_sdpa_n3000", dense_odd)
    check("block_sparse_top8_padded_vs_unpadded_index", lambda: bool(torch.equal(
        build_sparse_index(q, k, [HP("block_sparse", topk=8)] * HQ).blocks,
        build_sparse_index(q, k, [HP("block_sparse", topk=8)] * HQ,
                           seq_start=torch.zeros(1, dtype=torch.int32, device=DEV)).blocks)))

    def graph():
        heads = mixed
        static = [x.clone() for x in (q, k, v)]
        eager = sparse_attention(*static, heads)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            sparse_attention(*static, heads)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = sparse_attention(*static, heads)
        fresh = inputs(n, seed=12)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        want = sparse_attention(*fresh, heads)
        return {"replay_vs_eager_same_inputs": round(rel_err(captured, want), 6),
                "first_vs_new_inputs_differ": rel_err(eager, want) > 1e-3}
    check("cuda_graph_capture", graph)


def ours(name, n, fn, index, q, k, v, cudnn_ms, **extra):
    try:
        fn()
        ms, mem = bench(fn)
        extra.setdefault("compile", dict(kernel_module.LAST_COMPILE))   # the timed kernel's, not the density pass's
        pairs = index_density(index, q, k, v)
        length = n * (n + 1) / 2
        dens = pairs.mean().item()
        work = pairs.sum().item() * length
        record(op=name, n=n, ms=ms, density=dens, eff_tflops=4 * D * work / ms / 1e9,
               x_cudnn=cudnn_ms / ms if cudnn_ms else None, mem_mib=mem, **extra)
    except Exception as e:  # noqa: BLE001
        record(op=name, n=n, error=repr(e)[:300])
        traceback.print_exc()


def hopper_rows(n, q, k, v, cudnn_ms, index_a):
    """The opt-in Gluon kernels (``MI_COMPILE_HOPPER=1``: "wide", ``=ws``: warp-specialised,
    ``=ws_persist``: the same persistent; skipped with ``HOPPER_WS_PERSIST=0``) on
    the dense and the A-shape 128+4096 layers, each next to the Triton wide kernel on the same
    index; a row ``skipped`` with the reason where they cannot run (not sm_90, no Gluon)."""
    from mi_compile.kernels import hopper_wide
    why = hopper_wide.unavailable_reason()
    if why:
        record(op="hopper_wide", n=n, skipped=why)
        return
    index_d = build_sparse_index(q, k, [HP("dense")] * HQ)
    variants = [("0", "triton_wide"), ("1", "hopper_wide"), ("ws", "hopper_ws"), ("ws_persist", "hopper_ws_persist")]
    if os.environ.get("HOPPER_WS_PERSIST", "1") == "0":     # its check did not pass: a hang would lose the rest
        record(op="hopper_ws_persist_kernel", n=n, skipped="HOPPER_WS_PERSIST=0")
        variants.pop()
    try:
        for layer, index in (("dense", index_d), ("ashape_128_4096", index_a)):
            outs = []
            for opt_in, name in variants:
                os.environ[hopper_wide.ENV] = opt_in
                ours(f"{name}_{layer}_kernel", n, lambda index=index: sparse_attention_from_index(q, k, v, index),
                     index, q, k, v, cudnn_ms)
                outs.append(sparse_attention_from_index(q, k, v, index))
            for i in range(1, len(outs)):
                rows[i - len(outs)]["rel_err_vs_triton_wide"] = rel_err(outs[i], outs[0])
            del outs
    finally:
        os.environ.pop(hopper_wide.ENV, None)


def hopper_sparse_row(label, n, q, k, v, cudnn_ms, index):
    """The opt-in Gluon kernel for any index on ``index``, plain (``MI_COMPILE_HOPPER=sparse``) and
    software-pipelined (``=ws_sparse``) and warp-specialised (``=sparse_ws``), recorded as
    ``hopper_sparse[_pipe|_ws]_<label>_kernel`` with its
    difference from the Triton general kernel's output (same index); skipped with the reason
    where it cannot run."""
    from mi_compile.kernels import hopper_sparse
    why = hopper_sparse.unavailable_reason()
    if why:
        record(op=f"hopper_sparse_{label}_kernel", n=n, skipped=why)
        return
    triton_out = sparse_attention_from_index(q, k, v, index)
    try:
        variants = [("sparse", "hopper_sparse"), ("ws_sparse", "hopper_sparse_pipe"), ("sparse_ws", "hopper_sparse_ws")]
        if os.environ.get("HOPPER_SPARSE_WS", "1") == "0":     # its check did not pass: a hang would lose the rest
            record(op=f"hopper_sparse_ws_{label}_kernel", n=n, skipped="HOPPER_SPARSE_WS=0")
            variants.pop()
        for opt_in, name in variants:
            os.environ[hopper_sparse.hopper_wide.ENV] = opt_in
            ours(f"{name}_{label}_kernel", n, lambda: sparse_attention_from_index(q, k, v, index), index,
                 q, k, v, cudnn_ms)
            rows[-1]["rel_err_vs_triton"] = rel_err(sparse_attention_from_index(q, k, v, index), triton_out)
    finally:
        os.environ.pop(hopper_sparse.hopper_wide.ENV, None)


def load_minference():
    """MInference's kernels from its sdist, or None (the reason is recorded as a check)."""
    if not MINFERENCE_SDIST:
        return None
    try:
        from benchmarks import minference_ref
        t = time.time()
        ops = minference_ref.load(MINFERENCE_SDIST)
        checks.append({"check": "minference_loaded", "value": ops.version, "s": round(time.time() - t, 1)})
        log("MInference", ops.version, "loaded in", round(time.time() - t, 1), "s")
        return ops
    except Exception as e:  # noqa: BLE001
        checks.append({"check": "minference_loaded", "error": repr(e)[:600]})
        log("MInference unavailable:", repr(e)[:600])
        traceback.print_exc()
        return None


def minference_correctness(mi):
    """Sanity of how we call MInference: every slash kept equals dense causal attention."""
    n = 4096
    q, k, v = inputs(n, seed=16)
    rep = HQ // HKV
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    every_slash = torch.arange(n - 1, -1, -1, device=DEV).expand(B, HQ, n)
    sinks = torch.arange(64, device=DEV).expand(B, HQ, 64)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    check("minference_vs_all_slashes_vs_sdpa", lambda: round(rel_err(mi.vertical_slash(q, kr, vr, sinks, every_slash),
                                                                     dense), 5))
    check("minference_block_sparse_all_blocks_vs_sdpa", lambda: round(rel_err(mi.block_sparse(q, kr, vr, n // 64),
                                                                              dense), 5))


def minference_timings(mi, n, q, k, v, cudnn_ms):
    """MInference's kernels at the same shape, as MInference runs them (K/V repeated first)."""
    rep = HQ // HKV
    try:
        ms, _ = bench(lambda: (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
        record(op="minference_repeat_kv", n=n, ms=ms)
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        vtop, stop = structured_selection(n)
        # density as MInference's own conversion counts it (whole 64x64 blocks + single columns)
        vi = vtop.to(torch.int32).sort(-1)[0]
        si = stop.to(torch.int32).sort(-1, descending=True)[0]
        bc, _, cc, _ = mi.convert_vertical_slash(torch.tensor([n], dtype=torch.int32, device=DEV), vi, si, n, 64, 64)
        pairs = (bc.sum().item() * 64 + cc.sum().item()) * 64
        dens = pairs / (B * HQ * n * (n + 1) / 2)
        ms, mem = bench(lambda: mi.vertical_slash(q, kr, vr, vtop, stop))
        record(op="minference_vs_structured_kernel", n=n, ms=ms, density=dens, eff_tflops=4 * D * pairs / ms / 1e9,
               x_cudnn=cudnn_ms / ms if cudnn_ms else None, mem_mib=mem,
               note="index conversion + kernel on the anchors' structured index; K/V repeated beforehand")

        def with_repeat():
            kr2, vr2 = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            return mi.vertical_slash(q, kr2, vr2, vtop, stop)
        ms, mem = bench(with_repeat)
        record(op="minference_vs_structured_with_repeat", n=n, ms=ms, density=dens, mem_mib=mem,
               x_cudnn=cudnn_ms / ms if cudnn_ms else None)
        ms, mem = bench(lambda: mi.block_sparse(q, kr, vr, 100))
        dens = min(1.0, 100 * 64 * n / (n * (n + 1) / 2))
        record(op="minference_bs_top100_full_op", n=n, ms=ms, density=dens,
               eff_tflops=4 * D * B * HQ * dens * n * (n + 1) / 2 / ms / 1e9,
               x_cudnn=cudnn_ms / ms if cudnn_ms else None, mem_mib=mem)
        if mi.streaming is not None:
            ms, mem = bench(lambda: mi.streaming(q, kr, vr, 128, 4096))
            record(op="minference_ashape_128_4096", n=n, ms=ms, x_cudnn=cudnn_ms / ms if cudnn_ms else None,
                   mem_mib=mem)
        del kr, vr
    except Exception as e:  # noqa: BLE001
        record(op="minference", n=n, error=repr(e)[:300])
        traceback.print_exc()
    torch.cuda.empty_cache()


def sweep(n):
    """Variants side by side at n: the general kernel (VS structured index, block-sparse) and
    the 128-row kernel (A-shape); keeps the fastest of each in KERNEL_CONFIG."""
    q, k, v = inputs(n)
    index_vs = build_sparse_index(q, k, VS, vs_selection=structured_selection(n))
    index_bs = build_sparse_index(q, k, BS)
    index_a = build_sparse_index(q, k, A_SHAPE)
    base = dict(kernel_module.KERNEL_CONFIG)
    general = [dict(num_stages=3), dict(num_stages=2), dict(num_stages=3)]   # last: repeat (spread)
    best = None
    for cfg in general:
        kernel_module.KERNEL_CONFIG.update(base, **cfg)
        try:
            ms_vs, _ = bench(lambda: sparse_attention_from_index(q, k, v, index_vs))
            comp = dict(kernel_module.LAST_COMPILE)
            ms_bs, _ = bench(lambda: sparse_attention_from_index(q, k, v, index_bs))
            record(op="sweep_general", n=n, cfg=dict(cfg), vs_structured_ms=ms_vs, bs_top100_ms=ms_bs,
                   compile=comp)
            if best is None or ms_vs + ms_bs < best[0]:
                best = (ms_vs + ms_bs, dict(cfg))
        except Exception as e:  # noqa: BLE001
            record(op="sweep_general", n=n, cfg=dict(cfg), error=repr(e)[:300])
    if best:
        base.update(best[1])
    wide = [dict(wide=False), dict(wide=True, wide_block_n=64, wide_warps=8, wide_stages=3),
            dict(wide=True, wide_block_n=64, wide_warps=8, wide_stages=2),
            dict(wide=True, wide_block_n=64, wide_warps=8, wide_stages=4),
            dict(wide=True, wide_block_n=128, wide_warps=8, wide_stages=2),
            dict(wide=True, wide_block_n=64, wide_warps=8, wide_stages=3)]   # repeat (spread)
    best = None
    for cfg in wide:
        kernel_module.KERNEL_CONFIG.update(base, **cfg)
        try:
            ms_a, _ = bench(lambda: sparse_attention_from_index(q, k, v, index_a))
            record(op="sweep_wide", n=n, cfg=dict(cfg), ashape_ms=ms_a, compile=dict(kernel_module.LAST_COMPILE))
            if best is None or ms_a < best[0]:
                best = (ms_a, dict(cfg))
        except Exception as e:  # noqa: BLE001
            record(op="sweep_wide", n=n, cfg=dict(cfg), error=repr(e)[:300])
    if best:
        base.update(best[1])
    kernel_module.KERNEL_CONFIG.clear()
    kernel_module.KERNEL_CONFIG.update(base)
    log("chosen config", kernel_module.KERNEL_CONFIG)


def timings(n, mi=None):
    q, k, v = inputs(n)
    causal_flops = 4 * B * HQ * D * n * (n + 1) / 2
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cudnn_ms = None
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms, mem = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            cudnn_ms = cudnn_ms or ms
            record(op=name, n=n, ms=ms, density=1.0, eff_tflops=causal_flops / ms / 1e9,
                   x_cudnn=cudnn_ms / ms, mem_mib=mem)
        except Exception as e:  # noqa: BLE001
            record(op=name, n=n, error=repr(e)[:300])
    if FLEX:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
            create_block_mask = torch.compile(create_block_mask)   # eager would build n x n
            for name, mod, dens in (
                    ("flex_causal", lambda b, h, qi, ki: ki <= qi, 1.0),
                    ("flex_ashape_128_4096", lambda b, h, qi, ki: (ki <= qi) & ((ki < 128) | (qi - ki < 4096)),
                     None)):
                bm = create_block_mask(mod, None, None, n, n, device=DEV)
                flex(q, k, v, block_mask=bm, enable_gqa=True)
                ms, mem = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
                if dens is None:
                    i = torch.arange(n, device=DEV, dtype=torch.float64)
                    dens = ((torch.minimum(i + 1, torch.full_like(i, 4096)) +
                             (i + 1 - 4096).clamp(min=0).clamp(max=128)).sum() / (n * (n + 1) / 2)).item()
                record(op=name, n=n, ms=ms, density=dens, eff_tflops=causal_flops * dens / ms / 1e9,
                       x_cudnn=cudnn_ms / ms if cudnn_ms else None, mem_mib=mem)
        except Exception as e:  # noqa: BLE001
            record(op="flex", n=n, error=repr(e)[:300])
            traceback.print_exc()

    index_a = build_sparse_index(q, k, A_SHAPE)
    ours("ours_ashape_128_4096", n, lambda: sparse_attention(q, k, v, A_SHAPE), index_a, q, k, v, cudnn_ms)
    ours("ours_ashape_128_4096_kernel", n, lambda: sparse_attention_from_index(q, k, v, index_a), index_a,
         q, k, v, cudnn_ms)
    hopper_rows(n, q, k, v, cudnn_ms, index_a)
    del index_a
    index_s = build_sparse_index(q, k, VS, vs_selection=structured_selection(n))
    ours("ours_vs_structured_kernel", n, lambda: sparse_attention_from_index(q, k, v, index_s), index_s,
         q, k, v, cudnn_ms)
    hopper_sparse_row("vs_structured", n, q, k, v, cudnn_ms, index_s)
    selection = structured_selection(n)

    def vs_full_structured():
        # as the anchors' full op: estimate + top-k + conversion run, kernel on the structured index
        build_sparse_index(q, k, VS)
        index = build_sparse_index(q, k, VS, vs_selection=selection)
        return sparse_attention_from_index(q, k, v, index)
    ours("ours_vs_full_op_structured", n, vs_full_structured, index_s, q, k, v, cudnn_ms)
    del index_s
    index_v = build_sparse_index(q, k, VS)
    ours("ours_vs_1000_6096_full_op", n, lambda: sparse_attention(q, k, v, VS), index_v, q, k, v, cudnn_ms)
    ours("ours_vs_kernel_on_estimated_index", n, lambda: sparse_attention_from_index(q, k, v, index_v),
         index_v, q, k, v, cudnn_ms)
    hopper_sparse_row("vs_estimated", n, q, k, v, cudnn_ms, index_v)
    del index_v
    length = torch.full((B,), n, dtype=torch.int32, device=DEV)
    start = torch.zeros(B, dtype=torch.int32, device=DEV)
    try:
        heads = list(range(HQ))
        params = [(1000, 6096)] * HQ

        def estimate(impl=None):   # impl="torch": the PyTorch definition, the default before step 9
            vert, sl = vertical_slash.estimate_scores(q, k, heads, start, length, SCALE, impl=impl)
            return vertical_slash.select_vertical_slash(vert, sl, params, length)
        ms, mem = bench(estimate)
        record(op="ours_vs_estimate_topk", n=n, ms=ms, mem_mib=mem)
        ms, mem = bench(lambda: vertical_slash.estimate_scores(q, k, heads, start, length, SCALE))
        record(op="ours_vs_estimate_only", n=n, ms=ms, mem_mib=mem, key_blocks=ESTIMATE_CONFIG["key_blocks"])
        default_scores = vertical_slash.estimate_scores(q, k, heads, start, length, SCALE)
        for per_program in (2, 4):       # key blocks per scores program (ESTIMATE_CONFIG)
            saved, ESTIMATE_CONFIG["key_blocks"] = ESTIMATE_CONFIG["key_blocks"], per_program
            try:
                ms, mem = bench(lambda: vertical_slash.estimate_scores(q, k, heads, start, length, SCALE))
                got = vertical_slash.estimate_scores(q, k, heads, start, length, SCALE)
            finally:
                ESTIMATE_CONFIG["key_blocks"] = saved
            same = all(torch.equal(a, b) for a, b in zip(got, default_scores))
            record(op=f"ours_vs_estimate_only_kb{per_program}", n=n, ms=ms, mem_mib=mem, equal_to_default=same)
        del default_scores
        ms, mem = bench(lambda: estimate("torch"))
        record(op="ours_vs_estimate_topk_torch", n=n, ms=ms, mem_mib=mem)
        ms, mem = bench(lambda: build_sparse_index(q, k, VS))
        record(op="ours_vs_index_build_total", n=n, ms=ms, mem_mib=mem)
    except Exception as e:  # noqa: BLE001
        record(op="ours_vs_estimate", n=n, error=repr(e)[:300])
    try:
        ms, mem = bench(lambda: build_sparse_index(q, k, BS))
        record(op="ours_bs_index_build", n=n, ms=ms, mem_mib=mem)
    except Exception as e:  # noqa: BLE001
        record(op="ours_bs_index_build", n=n, error=repr(e)[:300])
    for stride in (8, 16):
        # the XAttention estimate, every query head in one launch: two passes over the causal
        # half of the strided logits, 2 * (n / S)^2 / 2 cells of S * D multiply-adds each
        try:
            ms, mem = bench(lambda: xattention.block_mass(q, k, list(range(HQ)), start, length, SCALE, stride))
            flops = 2 * 2 * B * HQ * (n // stride) ** 2 / 2 * stride * D
            record(op=f"ours_xa_estimate_s{stride}", n=n, ms=ms, eff_tflops=flops / ms / 1e9, mem_mib=mem)
        except Exception as e:  # noqa: BLE001
            record(op=f"ours_xa_estimate_s{stride}", n=n, error=repr(e)[:300])
    if n <= 32768:
        dense = [HP("dense")] * HQ
        index_d = build_sparse_index(q, k, dense)
        ours("ours_dense_causal", n, lambda: sparse_attention_from_index(q, k, v, index_d), index_d,
             q, k, v, cudnn_ms)
        del index_d
    index_b = build_sparse_index(q, k, BS)
    ours("ours_bs_top100_full_op", n, lambda: sparse_attention(q, k, v, BS), index_b, q, k, v, cudnn_ms)
    ours("ours_bs_top100_kernel", n, lambda: sparse_attention_from_index(q, k, v, index_b), index_b,
         q, k, v, cudnn_ms)
    hopper_sparse_row("bs_top100", n, q, k, v, cudnn_ms, index_b)
    del index_b
    if mi is not None:
        minference_timings(mi, n, q, k, v, cudnn_ms)
    del q, k, v
    torch.cuda.empty_cache()


def main():
    import triton
    log("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    t0 = time.time()
    correctness()
    mi = load_minference()
    if mi is not None:
        minference_correctness(mi)
    save()
    log("correctness s", round(time.time() - t0, 1))
    if SWEEP:
        sweep(int(os.environ.get("SWEEP_N", NS[-1])))
        save()
    for n in NS:
        timings(n, mi)
        save()
        log("elapsed s", round(time.time() - t0, 1))
    log("\nchecks (rel err vs float32 reference selection, bf16):")
    for c in checks:
        log("  ", c)
    log("\n%-36s %7s %9s %8s %8s %7s %8s" % ("op", "n", "ms", "density", "TFLOP/s", "x_cuDNN", "MiB"))
    for r in rows:
        if "ms" in r:
            fmt = lambda x, f: (f % x) if isinstance(x, (int, float)) else "-"  # noqa: E731
            log("%-36s %7d %9.3f %8s %8s %7s %8s" % (r["op"], r["n"], r["ms"], fmt(r.get("density"), "%.4f"),
                                                    fmt(r.get("eff_tflops"), "%.0f"), fmt(r.get("x_cudnn"), "%.2f"),
                                                    fmt(r.get("mem_mib"), "%.0f")))
        elif "error" in r:
            log("%-36s %7d ERROR %s" % (r["op"], r["n"], r["error"][:100]))
        elif "skipped" in r:
            log("%-36s %7d skipped: %s" % (r["op"], r["n"], r["skipped"]))
        elif r.get("op") == "sweep":
            log("sweep", r)


if __name__ == "__main__":
    main()
