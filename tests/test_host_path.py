"""The op's host path: fused index tables, caches, op counts, CUDA-graph options.

The fused table builder (``mi_compile.kernels.index_tables``, the default on CUDA) runs here
through Triton's interpreter and must give the PyTorch builder's tables bit for bit. What
needs a GPU (capture, replay, timing) is in ``benchmarks/host_overhead.py``, whose CPU dry run
is the slow test at the end.
"""
import collections
import json
import os
import pathlib
import random
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from mi_compile.debug.op_count import OpCounter  # noqa: E402

import mi_compile  # noqa: E402
import mi_compile.kernels.index_tables as index_tables  # noqa: E402
import mi_compile.op as op_module  # noqa: E402
import mi_compile.sparse as sparse_module  # noqa: E402
from mi_compile import OptionsError  # noqa: E402
from mi_compile.options import BackendOptions  # noqa: E402
from mi_compile.kernels import _device  # noqa: E402
from mi_compile.patterns import index as index_module  # noqa: E402
from mi_compile.patterns.index import build_index, normalize_sequences  # noqa: E402
from mi_compile.patterns.spec import HeadPattern as HP, encode_heads  # noqa: E402

FIELDS = ["prefix", "sink", "band", "group_lo", "group_hi", "groups_upto", "tile_start", "tile_end",
          "tiles_upto", "columns", "columns_upto", "covered", "blocks", "block_count", "offsets"]
POOL = [HP("dense"), HP("a_shape", sink=4, local=40), HP("a_shape", sink=0, local=1),
        HP("a_shape", sink=70, local=300), HP("vertical_slash", vertical=68, slash=70),
        HP("vertical_slash", vertical=10, slash=3), HP("vertical_slash", vertical=200, slash=150),
        HP("vertical_slash", vertical=1000, slash=6096), HP("block_sparse", topk=1),
        HP("block_sparse", topk=3), HP("block_sparse", topk=100)]
MIX = ([HP("vertical_slash", vertical=1000, slash=6096), HP("vertical_slash", vertical=100, slash=800),
        HP("block_sparse", topk=8), HP("a_shape", sink=64, local=256)] * 3)


def total_ops(counter: OpCounter) -> int:
    return sum(counter.counts.values())


def _tables(case_seed, n, heads, hkv, batch, padded):
    g = torch.Generator().manual_seed(case_seed)
    q = torch.randn(batch, len(heads), n, 32, generator=g)
    k = torch.randn(batch, hkv, n, 32, generator=g)
    if padded:
        lens = torch.tensor([n, max(1, n // 2)], dtype=torch.int32)
        ss, sl = normalize_sequences(q, n - lens, lens)
    else:
        ss, sl = normalize_sequences(q, None, None)
    return [build_index(q, k, heads, 32 ** -0.5, ss, sl, unpadded=not padded, tables=t) for t in ("torch", "triton")]


def _cases(count):
    rng = random.Random(7)
    for c in range(count):
        hkv, group = rng.choice([1, 2]), rng.choice([1, 2, 4])
        batch = rng.choice([1, 2])
        yield (c, rng.choice([1, 63, 64, 65, 130, 191, 300]), [rng.choice(POOL) for _ in range(hkv * group)],
               hkv, batch, batch == 2 and rng.random() < 0.7)


@pytest.mark.parametrize("case", list(_cases(14)), ids=lambda c: f"case{c[0]}_n{c[1]}")
def test_fused_tables_equal_torch_tables(case):
    seed, n, heads, hkv, batch, padded = case
    plain, fused = _tables(seed, n, heads, hkv, batch, padded)
    for f in FIELDS:
        a, b = getattr(plain, f), getattr(fused, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f


def test_fused_tables_interleaved_parameter_groups():
    """Heads of one (V, S) not adjacent: top-k per group into shared buffers, rows mapped back."""
    heads = [MIX[h] for h in (0, 1, 0, 2, 1, 3, 0, 1)]
    plain, fused = _tables(3, 513, heads, 2, 2, True)
    for f in FIELDS:
        assert torch.equal(getattr(plain, f), getattr(fused, f)), f


def test_fused_tables_any_number_of_parameter_groups():
    """Eight distinct (V, S) in a layer, tiled heads among them (the shipped Qwen config has up
    to 8 a layer): the fused builder takes the layer and gives the PyTorch builder's tables."""
    heads = [HP("vertical_slash", vertical=64 + 40 * i, slash=[3, 64, 70, 150, 300][i % 5]) for i in range(6)]
    heads += [HP("vertical_slash_tiled", vertical=100, slash=200), HP("vertical_slash_tiled", vertical=70, slash=130)]
    q = torch.randn(2, len(heads), 300, 32)
    plan = index_module.index_plan(tuple(heads), q.device)
    assert index_module._use_fused(plan, 300, "triton", q, None)
    for seed, padded in ((5, True), (6, False)):
        plain, fused = _tables(seed, 300, heads, 2, 2, padded)
        for f in FIELDS:
            assert torch.equal(getattr(plain, f), getattr(fused, f)), f


def test_vertical_slash_top_k_is_two_calls_a_layer(monkeypatch):
    """The top-k of a layer's vertical-slash heads is one torch.topk for the columns and one for
    the diagonals, however many distinct (V, S) the layer has: a head's best c keys are the
    first c of the layer's widest top-k."""
    from mi_compile.patterns import vertical_slash
    _stub_launches(monkeypatch)
    heads = [HP("vertical_slash", vertical=64 + 32 * i, slash=64 + 48 * i) for i in range(8)]
    q, k = torch.randn(1, 8, 512, 32), torch.randn(1, 2, 512, 32)
    ss, sl = normalize_sequences(q, None, None)
    scores = vertical_slash.estimate_scores_torch(q, k, list(range(8)), ss, sl, 0.2)
    monkeypatch.setattr(vertical_slash, "estimate_scores", lambda *a, **kw: scores)
    build_index(q, k, heads, 0.2, ss, sl, unpadded=True, tables="triton")
    with OpCounter() as counter:
        build_index(q, k, heads, 0.2, ss, sl, unpadded=True, tables="triton")
    assert counter.counts["topk"] == 2 and counter.counts["sort"] == 2, counter.counts


def test_shipped_qwen_config_builds_every_layer_fused():
    """benchmarks.index_ops on the shipped 128K config: every layer takes the fused builder, with
    at most 3 top-k a layer (vertical-slash columns, diagonals, block-sparse)."""
    from benchmarks.index_ops import count_forward
    from mi_compile.config import load_config
    counts = count_forward(load_config("qwen2.5-coder-1.5b-128k"), 12, 2, 256)
    assert counts["fused_layers"] == counts["layers"] == 28
    assert counts["topk"] <= 3 * 28 and counts["ops"] < 60 * 28, counts


def _stub_launches(monkeypatch):
    launches = collections.Counter()

    class NoLaunch:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches[self.name] += 1
            return run

    monkeypatch.setattr(index_tables, "_head_rows_kernel", NoLaunch("head_rows"))
    monkeypatch.setattr(index_tables, "_block_rows_kernel", NoLaunch("block_rows"))
    return launches


def test_fused_build_op_count(monkeypatch):
    """The fused build of a 12-head mixed layer dispatches few torch ops (the PyTorch builder
    ~250): no per-head loops, no host-to-device copies once the plan is cached."""
    from mi_compile.patterns import vertical_slash
    launches = _stub_launches(monkeypatch)
    n = 256
    q, k = torch.randn(1, 12, n, 32), torch.randn(1, 2, n, 32)
    ss, sl = normalize_sequences(q, None, None)
    # the estimate is two Triton launches on the GPU, not part of the table path: precompute it
    vs_ids = [h for h, p in enumerate(MIX) if p.kind == "vertical_slash"]
    scores = vertical_slash.estimate_scores_torch(q, k, vs_ids, ss, sl, 0.2)
    monkeypatch.setattr(vertical_slash, "estimate_scores", lambda *a, **kw: scores)

    def build(tables):
        return build_index(q, k, MIX, 0.2, ss, sl, unpadded=True, tables=tables)

    build("triton")
    launches.clear()
    with OpCounter() as fused:
        build("triton")
    with OpCounter() as plain:
        build("torch")
    assert launches == {"head_rows": 1, "block_rows": 1}
    # no torch.tensor / .to(device); the two _to_copy are the top-k indices cast to int32 (sorted
    # as int32: half the radix passes)
    assert fused.counts["lift_fresh"] == 0 and fused.counts["_to_copy"] == 2
    assert total_ops(fused) <= 80, fused.counts
    assert total_ops(plain) > 3 * total_ops(fused)


def test_plan_and_validation_are_cached(monkeypatch):
    q, k, v = torch.randn(1, 4, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    heads = encode_heads(MIX[:4])
    checked = []
    real = sparse_module._check_inputs
    monkeypatch.setattr(sparse_module, "_check_inputs", lambda *a: (checked.append(1), real(*a)))
    monkeypatch.setattr(sparse_module, "_VALIDATED", {})     # signatures other tests validated do not count
    a = sparse_module.sparse_attention(q, k, v, heads)
    b = sparse_module.sparse_attention(q, k, v, list(heads))
    assert torch.equal(a, b) and len(checked) == 1            # one signature, one check
    sparse_module.sparse_attention(q[:, :, :129], k[:, :, :129], v[:, :, :129], heads)
    assert len(checked) == 2                                  # a new shape is checked again
    plan = index_module.index_plan(sparse_module._as_patterns(heads), q.device)
    assert plan is index_module.index_plan(sparse_module._as_patterns(heads), q.device)
    for _ in range(2):                                         # bad inputs keep failing
        with pytest.raises(ValueError, match="multiple of KV heads"):
            sparse_module.sparse_attention(q, torch.randn(1, 3, 130, 16), torch.randn(1, 3, 130, 16), heads)


def test_device_ints_inside_capture_are_not_cached(monkeypatch):
    """While a CUDA graph is being captured a missing constant is written by device fills and
    not kept (its memory would belong to the graph)."""
    monkeypatch.setattr(_device, "capturing", lambda device: True)
    values = (3, 1, 4, 1, 5, 92653)
    t = _device.device_ints(values, "cpu", torch.int32)
    assert t.tolist() == list(values) and t.dtype == torch.int32
    assert (values, "cpu", torch.int32) not in _device._CACHE
    built = []
    assert _device.cached("probe", "cpu", lambda: built.append(1) or 7) == 7
    assert _device.cached("probe", "cpu", lambda: built.append(1) or 7) == 7 and len(built) == 2


def test_op_writes_its_output_layout_directly(monkeypatch):
    """The kernel stores straight into the op's [B, n, Hq, D]-laid-out output (no copy)."""
    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "triton")       # the kernels, under the interpreter
    allocated = []
    real = op_module._output_like
    monkeypatch.setattr(op_module, "_output_like", lambda q, v: allocated.append(real(q, v)) or allocated[-1])
    q, k, v = torch.randn(1, 4, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    heads = encode_heads(MIX[:4])
    out = op_module._sparse_attention_impl(q, k, v, heads, None, None, 0, 0, 0)
    assert len(allocated) == 1 and out.data_ptr() == allocated[0].data_ptr()
    assert out.stride() == (130 * 4 * 16, 16, 4 * 16, 1)
    assert torch.equal(out, sparse_module.sparse_attention(q, k, v, heads, impl="triton"))


def test_all_dense_layer_runs_sdpa_not_the_kernels(monkeypatch):
    """Where the kernels would run, a layer whose heads are all dense (and unpadded) takes
    SDPA (flash / cuDNN on a GPU): the same answer, faster; one sparse head brings the kernels back."""
    monkeypatch.setenv("MI_COMPILE_CPU_IMPL", "triton")
    kernel_calls = []
    real = sparse_module._sparse_attention
    monkeypatch.setattr(sparse_module, "_sparse_attention", lambda *a: kernel_calls.append(1) or real(*a))
    q, k, v = torch.randn(1, 4, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    dense = encode_heads([HP("dense")] * 4)
    out = op_module._sparse_attention_impl(q, k, v, dense, None, None, 0, 0, 0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert kernel_calls == [] and torch.equal(out, sdpa)
    mixed = encode_heads([HP("dense")] * 3 + [HP("a_shape", sink=4, local=32)])
    op_module._sparse_attention_impl(q, k, v, mixed, None, None, 0, 0, 0)
    padded = torch.ones(1, 130, dtype=torch.bool)
    padded[0, :5] = False
    op_module._sparse_attention_impl(q, k, v, dense, None, padded, 0, 0, 0)
    assert kernel_calls == [1, 1]                           # a sparse head, a padded batch: the kernels


def test_op_is_not_cudagraph_unsafe():
    tags = torch.ops.mi_compile.sparse_attention.default.tags
    assert getattr(torch.Tag, "cudagraph_unsafe", None) not in tags


# ---- CUDA-graph options ------------------------------------------------------------------

def test_mode_and_cudagraphs_options_become_inductor_patches():
    assert BackendOptions.from_user({"mode": "reduce-overhead"}).inductor_patches() == {"triton.cudagraphs": True}
    assert BackendOptions.from_user({"cudagraphs": True}).inductor_patches() == {"triton.cudagraphs": True}
    assert BackendOptions.from_user({"cudagraphs": False}).inductor_patches() == {"triton.cudagraphs": False}
    patches = BackendOptions.from_user({"mode": "max-autotune-no-cudagraphs", "cudagraphs": False}).inductor_patches()
    assert patches["max_autotune"] and patches["triton.cudagraphs"] is False
    assert BackendOptions.from_user({"mode": "default"}).inductor_patches() == {}
    assert BackendOptions.from_user(None).inductor_patches() == {}


@pytest.mark.parametrize("options,message", [
    ({"mode": "fast"}, "option 'mode' must be one of"),
    ({"mode": 3}, "option 'mode' must be one of"),
    ({"cudagraphs": "yes"}, "option 'cudagraphs' must be True or False"),
    ({"mode": "reduce-overhead", "cudagraphs": False}, "contradict"),
    ({"mode": "max-autotune", "cudagraphs": False}, "contradict"),
    ({"mode": "max-autotune-no-cudagraphs", "cudagraphs": True}, "contradict"),
])
def test_bad_mode_options(options, message):
    with pytest.raises(OptionsError, match=message):
        mi_compile.backend({"config": {"default": {"pattern": "dense"}}, **options})


def test_backend_accepts_and_forwards_a_mode():
    dense = {"config": {"default": {"pattern": "dense"}}}
    assert mi_compile.backend(dense, mode="reduce-overhead").inductor_patches() == {"triton.cudagraphs": True}
    assert mi_compile.backend({**dense, "mode": "reduce-overhead"}, mode="reduce-overhead").mode == "reduce-overhead"
    with pytest.raises(OptionsError, match="give it once"):
        mi_compile.backend({**dense, "mode": "max-autotune"}, mode="reduce-overhead")
    with pytest.raises(OptionsError, match="contradict"):
        mi_compile.backend({**dense, "cudagraphs": False}, mode="reduce-overhead")
    with pytest.raises(OptionsError, match="without it"):
        mi_compile.MInferenceBackend({**dense, "mode": "reduce-overhead"}, use_inductor=False)


def _record_compile_fx(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module
    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    return seen


def test_mode_reaches_inductor_through_every_entry(monkeypatch):
    """torch.compile(backend="minference", mode=...), options={"mode": ...}, and the object."""
    seen = _record_compile_fx(monkeypatch)
    dense = {"config": {"default": {"pattern": "dense"}}}

    def f(x):
        return torch.nn.functional.relu(x) * 2

    x = torch.randn(8)
    for kwargs in (dict(backend="minference", mode="reduce-overhead"),
                   dict(backend="minference", options={**dense, "mode": "reduce-overhead"}),
                   dict(backend="minference", options={**dense, "cudagraphs": True}),
                   dict(backend=mi_compile.backend(dense, mode="reduce-overhead")),
                   dict(backend="minference", options=dense)):
        torch._dynamo.reset()
        torch.compile(f, **kwargs)(x)
    assert seen == [{"triton.cudagraphs": True}] * 4 + [{}]


def test_cudagraphs_option_reaches_inductor_config():
    """A real Inductor compile on the CPU: with CUDA graphs asked for, Inductor records that it
    skipped them (a CPU graph), which it only does when its config has them on."""
    from torch._dynamo.utils import counters

    def f(x):
        return torch.sin(x) + 1

    skips = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        options = {"config": {"default": {"pattern": "dense"}}}
        if mode != "default":
            options["mode"] = mode
        torch.compile(f, backend=mi_compile.backend(options))(torch.randn(16))
        skips[mode] = counters["inductor"].get("cudagraph_skips", 0)
    assert skips == {"default": 0, "reduce-overhead": 1}


@pytest.mark.slow
def test_host_overhead_benchmark_dry_run_on_cpu(tmp_path):
    """``benchmarks/host_overhead.py`` (GPU host-overhead benchmark) runs end to end on the CPU
    (tiny lengths, reference impl, fused tables under the interpreter), so it does not rot."""
    out = tmp_path / "host_overhead.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--device", "cpu", "--out", str(out)],
                          cwd=pathlib.Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["n"] for r in result["rows"]] == [256, 512]
    assert all(r["ops_per_call"] > 0 and r["host_ms_mean"] > 0 for r in result["rows"])
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    model = result["model"]
    assert model["default"]["rewritten"] == 2 and model["reduce-overhead"]["rewritten"] == 2
    assert model["reduce-overhead"]["inductor_patches"] == {"triton.cudagraphs": True}
    assert model["logits_max_abs_diff"] == 0.0
