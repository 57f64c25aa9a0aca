"""What a Triton flash-attention inner loop can reach on this GPU, by query-tile height.

Our general kernel computes 64-row query blocks (the unit of MInference's vertical-slash and
block-sparse selections), and every 64 x 64 tile of scores needs its own 64 keys of K and V
(32 KiB at D=128, bf16) for 2.1 MFLOP of work: twice the bytes per FLOP of a 128-row tile.
This script measures the ceiling that sets, with nothing sparse in the way: one program per
query tile folds ``T`` key tiles into an online softmax (QK^T, exp2, PV, as our kernels do),
the key tiles taken at random offsets from a list (like slash groups / gathered blocks) or
in order (like a dense row), from a K/V buffer that fits in L2 or one that does not.

    python3 -m benchmarks.ceilings            # prints a table, writes $OUT/ceilings.json

Rows: rows per program (64: 4 warps, 128: 8 warps), tile order, K/V buffer size, ms,
TFLOP/s (4 * rows * 64 * D per tile), and the L2 -> SM traffic that implies (K + V tile bytes
per program-tile). A bf16 GEMM and a device copy give the machine's two ceilings.
"""
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

OUT = os.environ.get("OUT", "/tmp")
D = 128


@triton.jit
def _flash_loop(q_ptr, k_ptr, v_ptr, o_ptr, tiles_ptr, num_tiles, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    offs = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(0, num_tiles):
        start = tl.load(tiles_ptr + pid.to(tl.int64) * num_tiles + t)
        keys = (start + offs).to(tl.int64)
        k = tl.load(k_ptr + keys[:, None] * HEAD_DIM + dims[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + keys[:, None] * HEAD_DIM + dims[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    tl.store(o_ptr + rows.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :], (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


def flash_loop(block_m: int, kv_rows: int, order: str, tiles: int = 256, stages: int = 3) -> dict:
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    programs = sms * 16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(programs * block_m, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(kv_rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(kv_rows, D, device=dev, dtype=torch.bfloat16, generator=g)
    out = torch.empty_like(q)
    if order == "random":
        table = torch.randint(0, kv_rows - 64, (programs, tiles), device=dev, generator=g, dtype=torch.int32)
    else:   # in order, each program its own stretch
        base = torch.randint(0, max(1, kv_rows - 64 * tiles), (programs, 1), device=dev, generator=g)
        table = (base + 64 * torch.arange(tiles, device=dev)).to(torch.int32) % (kv_rows - 64)
    warps = 4 if block_m == 64 else 8

    def run():
        _flash_loop[(programs,)](q, k, v, out, table, tiles, D ** -0.5 * 1.4426950408889634,
                                 BLOCK_M=block_m, BLOCK_N=64, HEAD_DIM=D, num_warps=warps, num_stages=stages)
    run()
    assert torch.isfinite(out.float()).all()
    ms = do_bench(run, warmup=25, rep=100, return_mode="median")
    flops = 4.0 * programs * tiles * block_m * 64 * D
    tile_bytes = 2 * 64 * D * 2
    return dict(test="flash_loop", rows=block_m, order=order, kv_mib=round(2 * kv_rows * D * 2 / 2**20),
                ms=ms, tflops=flops / ms / 1e9, l2_to_sm_tbs=programs * tiles * tile_bytes / ms / 1e9)


def machine() -> list[dict]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    x = torch.randn(2**28, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms_copy = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return [dict(test="gemm_bf16_8192", ms=ms, tflops=2 * 8192 ** 3 / ms / 1e9),
            dict(test="copy_512MiB", ms=ms_copy, hbm_tbs=2 * x.numel() * 2 / ms_copy / 1e9)]


def main():
    results = machine()
    for rows in (64, 128):
        for order in ("random", "in_order"):
            for kv_rows in (16384, 4 * 2**20):   # 8 MiB of K+V (L2-resident) / 2 GiB
                try:
                    results.append(flash_loop(rows, kv_rows, order))
                except Exception as e:  # noqa: BLE001
                    results.append(dict(test="flash_loop", rows=rows, order=order, error=repr(e)[:200]))
    with open(os.path.join(OUT, "ceilings.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "results": results}, f, indent=1)
    print(f"\nceilings on {torch.cuda.get_device_name()} (triton {triton.__version__}):")
    for r in results:
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()
