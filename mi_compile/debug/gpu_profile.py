"""Where one call's GPU time and memory go: a kernel-time table and the live set at the peak.

``kernel_times(fn)`` runs ``fn()`` once under ``torch.profiler`` and sums device time per kernel
name and per :data:`CATEGORIES` group (the sparse kernels, the estimate, the index build,
GEMMs, Inductor's fused kernels, the rest). ``memory_peak(fn)`` runs it once with the CUDA
caching allocator's history on and reports what was allocated, by whom (the nearest Python
frame outside torch), at the moment the call's allocated memory was largest. Both return plain
dicts (JSON-ready) and have a ``format_*`` companion for a readable text report.
"""
from __future__ import annotations

import collections
import re

import torch

# (group, regex on the kernel name), first match wins
CATEGORIES = (
    ("sparse attention kernel", r"_sparse_attention_kernel|_wide_attention_kernel"),
    ("vertical-slash estimate", r"_row_stats_kernel|_scores_kernel"),
    ("xattention estimate", r"_block_mass_kernel"),
    ("index tables", r"_head_rows_kernel|_block_rows_kernel"),
    ("dense last rows, split", r"_dense_rows_part_kernel|_dense_rows_merge_kernel"),
    ("Inductor fused (triton_)", r"^triton_"),      # before the others: fused names list their ops
    ("dense attention (flash/cuDNN)", r"flash|fmha|cudnn"),
    ("top-k / sort", r"topk|sort|radix|bitonic|_top_select_kernel"),
    ("GEMM", r"gemm|cutlass|xmma|nvjet|wgmma|matmul"),
)


def _category(name: str) -> str:
    for group, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return group
    return "other"


def kernel_times(fn, top: int = 60) -> dict:
    """Device milliseconds of one ``fn()`` call, by category and by kernel (the ``top`` largest)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per_kernel: dict = collections.defaultdict(lambda: [0.0, 0])
    op_host = [0.0, 0]     # host time inside the sparse op (its index building and launches)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name == "mi_compile::sparse_attention":
            op_host[0] += ev.time_range.elapsed_us() / 1000.0
            op_host[1] += 1
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name][0] += ev.time_range.elapsed_us() / 1000.0
            per_kernel[ev.name][1] += 1
    groups: dict = collections.defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        groups[_category(name)] += ms
    kernels = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(total_ms=round(sum(v[0] for v in per_kernel.values()), 3),
                sparse_op_host_ms=round(op_host[0], 3), sparse_op_calls=op_host[1],
                categories={k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
                kernels=[dict(name=k[:160], ms=round(ms, 3), calls=c, category=_category(k))
                         for k, (ms, c) in kernels])


def kernel_time_diff(base: dict, other: dict, top: int = 20) -> dict:
    """``other - base`` of two :func:`kernel_times` reports (say a prompt in chunks against its
    whole prefill): the totals, every category, and the ``top`` kernels whose time moved most
    (a kernel outside a report's list of largest kernels counts 0 there, so small ones are
    approximate)."""
    def by_name(report):
        return {k["name"]: k for k in report["kernels"]}

    def row(a, b, **extra):
        return dict(extra, base_ms=round(a, 3), other_ms=round(b, 3), diff_ms=round(b - a, 3))

    cats = set(base["categories"]) | set(other["categories"])
    categories = [row(base["categories"].get(c, 0.0), other["categories"].get(c, 0.0), category=c) for c in cats]
    kb, ko = by_name(base), by_name(other)
    kernels = [row(kb[n]["ms"] if n in kb else 0.0, ko[n]["ms"] if n in ko else 0.0, name=n,
                   category=(ko.get(n) or kb[n])["category"]) for n in set(kb) | set(ko)]
    return dict(total=row(base["total_ms"], other["total_ms"]),
                categories=sorted(categories, key=lambda r: -abs(r["diff_ms"])),
                kernels=sorted(kernels, key=lambda r: -abs(r["diff_ms"]))[:top])


def format_kernel_diff(diff: dict, base_name: str = "base", other_name: str = "other") -> str:
    """A readable table of :func:`kernel_time_diff`."""
    head = f"  {base_name:>12s} {other_name:>12s} {'difference':>12s}  (device ms)"
    line = lambda r, what: f"  {r['base_ms']:12.2f} {r['other_ms']:12.2f} {r['diff_ms']:+12.2f}  {what}"  # noqa: E731
    lines = [head, line(diff["total"], "all kernels"), "", "by category:"]
    lines += [line(r, r["category"]) for r in diff["categories"]]
    lines += ["", "kernels that moved most:"]
    lines += [line(r, f"{r['category']:<30s} {r['name']}") for r in diff["kernels"]]
    return "\n".join(lines)


def format_kernel_times(report: dict) -> str:
    lines = [f"device time {report['total_ms']:.1f} ms"]
    if report.get("sparse_op_calls"):
        lines.append(f"host time in the sparse op {report['sparse_op_host_ms']:.1f} ms "
                     f"({report['sparse_op_calls']} calls)")
    lines += ["", "by category:"]
    lines += [f"  {ms:10.2f} ms  {100 * ms / max(report['total_ms'], 1e-9):5.1f}%  {k}"
              for k, ms in report["categories"].items()]
    lines += ["", "largest kernels:"]
    lines += [f"  {k['ms']:10.2f} ms  x{k['calls']:<5d} {k['category']:<30s} {k['name']}" for k in report["kernels"]]
    return "\n".join(lines)


_SKIP_FRAMES = ("/torch/", "/contextlib.py", "/functools.py", "<frozen", "/site-packages/triton/")


def _frame_text(f) -> str:
    return f"{'/'.join(f.get('filename', '').split('/')[-2:])}:{f.get('line')} {f.get('name')}"


def _owner(frames) -> str:
    """The first two frames outside torch's own machinery (the allocating line and its caller)."""
    mine = [f for f in frames if not any(s in f.get("filename", "") for s in _SKIP_FRAMES)][:2]
    return " <- ".join(_frame_text(f) for f in (mine or frames[:1])) or "(no frame)"


def peak_live_set(trace: list, top: int = 15):
    """From allocator history events (``alloc`` / ``free_requested`` / ``free_completed`` with
    ``addr``, ``size``, ``frames``): the largest sum of live allocations and, at that moment,
    ``[(owner, bytes, count)]`` grouped by :func:`_owner`, largest first."""
    def replay(stop=None):
        live, cur, best, best_at = {}, 0, 0, -1
        for i, ev in enumerate(trace):
            action, addr = ev.get("action"), ev.get("addr")
            if action == "alloc":
                live[addr] = (ev.get("size", 0), ev.get("frames", []))
                cur += live[addr][0]
                if cur > best:
                    best, best_at = cur, i
            elif action in ("free_requested", "free_completed") and addr in live:
                cur -= live.pop(addr)[0]
            if i == stop:
                break
        return live, best, best_at

    _, best, best_at = replay()
    groups: dict = collections.defaultdict(lambda: [0, 0])
    for size, frames in (replay(best_at)[0] if best_at >= 0 else {}).values():
        g = groups[_owner(frames)]
        g[0] += size
        g[1] += 1
    rows = sorted(((k, b, c) for k, (b, c) in groups.items()), key=lambda r: -r[1])[:top]
    return best, rows


def memory_peak(fn, top: int = 15, device=None) -> dict:
    """Run ``fn()`` once with the allocator history on; the live allocations at the call's
    peak (bytes allocated after the call started), grouped by owning frame."""
    device = torch.device(device or "cuda")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    try:
        fn()
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak_allocated = torch.cuda.max_memory_allocated(device)
    trace = snap["device_traces"][device.index or 0] if snap.get("device_traces") else []
    best, rows = peak_live_set(trace, top)
    gib = 1 << 30
    return dict(before_call_gib=round(base / gib, 3), peak_allocated_gib=round(peak_allocated / gib, 3),
                traced_peak_extra_gib=round(best / gib, 3), trace_events=len(trace),
                live_at_peak=[dict(owner=k, gib=round(b / gib, 3), tensors=c) for k, b, c in rows])


def format_memory_peak(report: dict) -> str:
    lines = [f"allocated before the call {report['before_call_gib']:.2f} GiB; peak {report['peak_allocated_gib']:.2f} GiB; "
             f"traced extra at the peak {report['traced_peak_extra_gib']:.2f} GiB ({report['trace_events']} events)",
             "", "live at the peak, by owner:"]
    lines += [f"  {r['gib']:8.3f} GiB  x{r['tensors']:<4d} {r['owner']}" for r in report["live_at_peak"]]
    return "\n".join(lines)
