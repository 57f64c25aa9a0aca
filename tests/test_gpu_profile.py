"""The profiling helpers' pure parts: kernel categories and the peak live set of an allocator trace."""
from mi_compile.debug import gpu_profile


def _frames(line):
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/repo/mi_compile/sparse.py", "line": line, "name": "f"}]


def test_peak_live_set_groups_what_is_alive_at_the_peak():
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": _frames(10)},
        {"action": "alloc", "addr": 2, "size": 50, "frames": _frames(20)},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},
        {"action": "alloc", "addr": 3, "size": 70, "frames": _frames(10)},   # peak: 100 + 70
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": _frames(30)},   # 130 < 170
        {"action": "free_requested", "addr": 99, "size": 5},                 # freed block from before the trace
    ]
    best, rows = gpu_profile.peak_live_set(trace)
    assert best == 170
    assert rows == [("mi_compile/sparse.py:10 f", 170, 2)]


def test_peak_live_set_of_an_empty_trace():
    assert gpu_profile.peak_live_set([]) == (0, [])


def test_kernel_categories():
    cat = gpu_profile._category
    assert cat("_sparse_attention_kernel") == "sparse attention kernel"
    assert cat("_block_mass_kernel") == "xattention estimate" and cat("_scores_kernel") == "vertical-slash estimate"
    assert cat("triton_poi_fused_add_mul_0") == "Inductor fused (triton_)"
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert cat("void at::native::vectorized_elementwise_kernel") == "other"


def test_formatting():
    text = gpu_profile.format_memory_peak(dict(before_call_gib=1.0, peak_allocated_gib=2.0, traced_peak_extra_gib=1.0,
                                               trace_events=3, live_at_peak=[dict(owner="a.py:1 f", gib=1.0, tensors=2)]))
    assert "a.py:1 f" in text and "peak 2.00 GiB" in text
    text = gpu_profile.format_kernel_times(dict(total_ms=10.0, categories={"GEMM": 6.0, "other": 4.0},
                                                kernels=[dict(name="k", ms=6.0, calls=3, category="GEMM")]))
    assert "60.0%" in text and "x3" in text


def test_fused_kernel_named_after_attention_is_inductor_not_dense_attention():
    name = "triton_poi_fused__to_copy_add_bmm_cat_cos_mul_neg_sin_slice_sparse_attention_transpose_2"
    assert gpu_profile._category(name) == "Inductor fused (triton_)"
    assert gpu_profile._category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma") == \
        "dense attention (flash/cuDNN)"


def test_kernel_time_diff():
    """Chunks against a whole prefill: totals, every category of either report, kernels by how
    far they moved (one only in the chunks' list counts 0 in the whole's)."""
    whole = dict(total_ms=10.0, categories={"GEMM": 6.0, "sparse attention kernel": 4.0},
                 kernels=[dict(name="gemm", ms=6.0, calls=2, category="GEMM"),
                          dict(name="_sparse_attention_kernel", ms=4.0, calls=2, category="sparse attention kernel")])
    chunks = dict(total_ms=12.0, categories={"GEMM": 6.5, "sparse attention kernel": 3.5, "index tables": 2.0},
                  kernels=[dict(name="gemm", ms=6.5, calls=8, category="GEMM"),
                           dict(name="_sparse_attention_kernel", ms=3.5, calls=8, category="sparse attention kernel"),
                           dict(name="_block_rows_kernel", ms=2.0, calls=8, category="index tables")])
    diff = gpu_profile.kernel_time_diff(whole, chunks)
    assert diff["total"] == dict(base_ms=10.0, other_ms=12.0, diff_ms=2.0)
    assert {r["category"]: r["diff_ms"] for r in diff["categories"]} == {
        "index tables": 2.0, "GEMM": 0.5, "sparse attention kernel": -0.5}
    assert diff["categories"][0]["category"] == "index tables"       # the largest move first
    assert diff["kernels"][0] == dict(name="_block_rows_kernel", category="index tables", base_ms=0.0, other_ms=2.0,
                                      diff_ms=2.0)
    text = gpu_profile.format_kernel_diff(diff, "whole", "chunks")
    assert "+2.00  all kernels" in text and "-0.50  sparse attention kernel" in text
    assert gpu_profile._category("_dense_rows_part_kernel") == "dense last rows, split"

