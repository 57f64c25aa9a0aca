"""Compile the attention kernels for a GPU without one: registers, spills, shared memory, SASS.

    python3 -m benchmarks.kernel_resources                  # sm_90, bf16, head_dim 64 and 128
    python3 -m benchmarks.kernel_resources --arch 90 --head-dims 128 --json out.json
    PYTHONPATH=/tmp/t36 python3 -m benchmarks.kernel_resources --hopper   # the Gluon kernel (triton 3.6)

Triton compiles ahead of time for any target it ships a backend for (the NVIDIA one brings
``ptxas`` and ``cuobjdump``), so a CPU machine can check that a kernel change still compiles
for the H100/H200, and whether it changes the machine code: the digest covers the SASS
instructions, so a refactor that leaves it unchanged cannot change speed. Pointers and the
strides the JIT would see as multiples of 16 get the same ``tt.divisibility`` hint the JIT
derives (without it the build would show no ``cp.async`` pipelining); launch parameters are
the kernels' defaults (``KERNEL_CONFIG``). Another triton version (e.g. the GPU machine's) runs
this from a venv with that version installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mi_compile.kernels import estimate as vs_estimate
from mi_compile.kernels import sparse_attention as kernels
from mi_compile.kernels import xattention_estimate


def _signature(fn, dtype: str, constexprs: dict, pointers: dict):
    """Argument types and divisibility hints of a kernel as its launcher passes them: q/k/v/out
    of ``dtype``, ``pointers`` (name -> element type) where they differ, other pointers int32."""
    names = fn.arg_names
    unspecialised = {names[i] if isinstance(i, int) else i for i in (fn.do_not_specialize or ())}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_strides"):         # a tensor's (batch, head, row) strides
            sig[name] = ("i32",) * 3
            if name not in unspecialised:
                attrs.update({(i, j): [["tt.divisibility", 16]] for j in range(3)})
            continue
        if name in pointers:
            sig[name] = f"*{pointers[name]}"
        elif name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr"):
            sig[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            sig[name] = "*i32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if (name.endswith("_ptr") or name.startswith("stride_")) and name not in unspecialised:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_kernel(fn, dtype: str, constexprs: dict, num_warps: int, num_stages: int, arch: int,
                   pointers: dict | None = None):
    sig, attrs = _signature(fn, dtype, constexprs, pointers or {})
    names = fn.arg_names
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cuobjdump(compiled, *flags) -> list[str]:
    """``cuobjdump <flag>`` of the compiled cubin, one output per flag (the tool ships with
    triton's NVIDIA backend)."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return [subprocess.run([os.path.join(tools, "cuobjdump"), flag, path],
                               capture_output=True, text=True, check=True).stdout for flag in flags]


def resources(compiled) -> dict:
    """Registers, stack (spills), static and dynamic shared memory, SASS size and digest."""
    usage, sass = _cuobjdump(compiled, "-res-usage", "-sass")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    instructions = [re.sub(r"/\*[0-9a-f]+\*/", "", line).split(";")[0].strip()
                    for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2)),
            "shared_static": int(found.group(3)), "shared_dynamic": compiled.metadata.shared,
            "instructions": len(instructions),
            "sass_md5": hashlib.md5("\n".join(instructions).encode()).hexdigest()}


def kernel_builds(head_dim: int, dtype: str):
    """``(name, fn, constexprs, warps, stages, pointer types)`` of the launches at this head dim:
    the attention kernels that run at it, the vertical-slash estimate's two and the XAttention
    estimate (strides 8 and 16)."""
    cfg = kernels.KERNEL_CONFIG
    block_d = max(16, triton.next_power_of_2(head_dim))
    warps = cfg["num_warps"] or (4 if block_d <= 128 else 8)
    general = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=cfg["block_n"], BLOCK_C=cfg["block_c"],
                   MODE=0, GROUP=1)
    wide = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=128, BLOCK_N=cfg["wide_block_n"], MODE=0, GROUP=1)
    builds = [("general", kernels._sparse_attention_kernel, general, warps, cfg["num_stages"], {"covered_ptr": "u8"})]
    split = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=64)
    builds.append(("dense_rows_part", kernels._dense_rows_part_kernel, split, warps, cfg["num_stages"],
                   {"part_ptr": "fp32"}))
    builds.append(("dense_rows_merge", kernels._dense_rows_merge_kernel, dict(split, ROWS=kernels.MERGE_ROWS), warps,
                   cfg["num_stages"], {"part_ptr": "fp32"}))
    if block_d <= 128:                                     # the 128-row kernel is not launched past 128
        builds.append(("wide", kernels._wide_attention_kernel, wide, cfg["wide_warps"], cfg["wide_stages"], {}))
    vs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, R=vs_estimate.ROWS, BLOCK_N=vs_estimate.BLOCK_N)
    vs_warps = 4 if block_d <= 128 else 8
    floats = {name: "fp32" for name in ("stats_ptr", "lse_ptr", "vertical_ptr", "slash_main_ptr", "slash_tail_ptr")}
    builds.append(("vs_estimate_row_stats", vs_estimate._row_stats_kernel, vs, vs_warps, 3,
                   dict(floats, head_ids_ptr="i64")))
    builds.append(("vs_estimate_scores", vs_estimate._scores_kernel,
                   dict(vs, KEY_BLOCKS=vs_estimate.ESTIMATE_CONFIG["key_blocks"]), vs_warps, 3,
                   dict(floats, head_ids_ptr="i64")))
    for stride in (8, 16):
        launch = xattention_estimate.estimate_launch(head_dim, stride)
        warps_xa, stages_xa = launch.pop("num_warps"), launch.pop("num_stages")
        builds.append((f"xattention_estimate_s{stride}", xattention_estimate._block_mass_kernel, launch,
                       warps_xa, stages_xa, {"out_ptr": "fp32", "head_ids_ptr": "i64"}))
    return builds


def sass_opcodes(compiled, opcodes=("HGMMA", "UTMALDG")) -> dict:
    """How often each opcode (the part before the first ``.``) occurs in the SASS."""
    (sass,) = _cuobjdump(compiled, "-sass")
    found = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return {op: found.count(op) for op in opcodes}


def compile_hopper(head_dim: int, dtype: str, arch: int = 90, variant: str = "wide"):
    """A Gluon kernel at its launch configuration, K/V as the launcher's TMA descriptors:
    ``variant`` ``"wide"`` / ``"ws"`` of :mod:`mi_compile.kernels.hopper_wide`, ``"sparse"``
    of :mod:`mi_compile.kernels.hopper_sparse`; needs a triton with Gluon's Hopper API (3.6:
    ``PYTHONPATH=/tmp/t36``)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from mi_compile.kernels import hopper_sparse, hopper_wide
    if hopper_wide.GLUON_ERROR:
        raise RuntimeError(hopper_wide.GLUON_ERROR)
    options = {}
    if variant.startswith("sparse"):
        fn, warps = hopper_sparse.hopper_sparse_kernel, hopper_sparse.NUM_WARPS
        options = hopper_sparse.launch_options(variant)
        cfg = {"block_n": 64, **hopper_sparse.CONFIG[head_dim]}
    else:
        fn, warps = hopper_wide.KERNELS[variant]
        cfg = hopper_wide.CONFIGS[variant][head_dim]
    gl = hopper_wide.gl
    layout = hopper_wide.kv_layout({"bf16": gl.bfloat16, "fp16": gl.float16}[dtype], cfg["block_n"], head_dim)
    descriptor = f"tensordesc<{dtype}[1, 1, {cfg['block_n']}, {head_dim}],{layout!r}>"
    constexprs = dict(HEAD_DIM=head_dim, STAGES=cfg["stages"])
    if variant.startswith("sparse"):
        constexprs.update(PIPELINE=variant != "sparse", WARP_SPECIALIZE=variant == "sparse_ws")
    else:
        constexprs.update(BLOCK_N=cfg["block_n"], WARP_SPECIALIZE=variant != "wide",
                          PERSISTENT=variant == "ws_persist")
    sig, attrs = _signature(fn, dtype, constexprs, {})
    for name in ("k_desc", "v_desc"):
        sig[name] = descriptor
    names = fn.arg_names
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                         attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, **options})
    return compiled, cfg


def hopper_main(args) -> list:
    """``--hopper``: the Gluon kernels (both variants) for fp16 and bf16 at the head dims.
    With warp specialisation the registers reported are the launch's; each partition's budget
    is set by ``setmaxnreg`` (the row's ``setmaxnreg``)."""
    from mi_compile.kernels import hopper_wide
    rows = []
    builds = [(variant, int(d), dtype) for variant in (*hopper_wide.CONFIGS, "sparse", "sparse_pipe", "sparse_ws")
              for d in args.head_dims.split(",") for dtype in ("bf16", "fp16")]
    for variant, head_dim, dtype in builds:
        compiled, cfg = compile_hopper(head_dim, dtype, args.arch, variant)
        row = {"kernel": f"hopper_{variant}", "head_dim": head_dim, "dtype": dtype, "arch": args.arch,
               "triton": triton.__version__, "num_warps": compiled.metadata.num_warps,
               "block_n": cfg["block_n"], "stages": cfg["stages"], **resources(compiled),
               **sass_opcodes(compiled),
               "setmaxnreg": sorted(set(map(int, re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                            compiled.asm["ptx"]))))}
        rows.append(row)
        print(f"{row['kernel']:<12s} D={head_dim:<4d} {dtype} sm_{args.arch} triton {triton.__version__} "
              f"(BLOCK_N {cfg['block_n']}, {cfg['stages']} stages): {row['registers']} registers, "
              f"{row['stack_bytes']} B stack, {row['shared_dynamic'] // 1024} KiB shared, "
              f"{row['instructions']} instructions, HGMMA x{row['HGMMA']}, UTMALDG x{row['UTMALDG']}, "
              f"sass {row['sass_md5'][:12]}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80")
    p.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--hopper", action="store_true",
                   help="the Gluon Hopper kernel instead (fp16 and bf16; triton with Gluon, e.g. PYTHONPATH=/tmp/t36)")
    args = p.parse_args(argv)
    rows = hopper_main(args) if args.hopper else []
    for head_dim in (int(d) for d in args.head_dims.split(",") if not args.hopper):
        for name, fn, constexprs, warps, stages, pointers in kernel_builds(head_dim, args.dtype):
            row = {"kernel": name, "head_dim": head_dim, "dtype": args.dtype, "arch": args.arch,
                   "triton": triton.__version__, "num_warps": warps, "num_stages": stages,
                   **resources(compile_kernel(fn, args.dtype, constexprs, warps, stages, args.arch, pointers))}
            rows.append(row)
            print(f"{name:22s} D={head_dim:<4d} {args.dtype} sm_{args.arch} triton {triton.__version__}: "
                  f"{row['registers']} registers, {row['stack_bytes']} B stack, "
                  f"{row['shared_dynamic'] // 1024} KiB shared, {row['instructions']} instructions, "
                  f"sass {row['sass_md5'][:12]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
