"""benchmarks/chunked.py on the CPU: the absolute-config writer, a tiny end-to-end run of the
chunked phase with ``--absolute-chunks`` (per-piece times included), and the chunked profile's
file and row writing with the GPU profiler stubbed out."""
import json
import types

import pytest
import torch

from mi_compile.eval.harness import parse_config_spec

SPEC = "vertical_slash:16:64"


def _config_with_length(tmp_path, length=256):
    doc = {**parse_config_spec(SPEC)[0], "length": length}
    path = tmp_path / "with_length.json"
    path.write_text(json.dumps(doc))
    return path, doc


def test_write_absolute_config(benchmark_module, tmp_path):
    chunked = benchmark_module("chunked")
    path, doc = _config_with_length(tmp_path)
    out, length = chunked.write_absolute_config(str(path), str(tmp_path / "a"))
    assert length == 256 and out == str(tmp_path / "a" / "absolute_config.json")
    written = json.loads(open(out).read())
    assert "length" not in written and written == {k: v for k, v in doc.items() if k != "length"}

    out, length = chunked.write_absolute_config(SPEC, str(tmp_path / "b"))   # no length: the same config
    assert length is None and json.loads(open(out).read()) == parse_config_spec(SPEC)[0]


def test_absolute_name_clash_rejected(benchmark_module):
    chunked = benchmark_module("chunked")
    with pytest.raises(SystemExit):
        chunked.parse_args(["--absolute-chunks", "--configs", f"absolute={SPEC}"])


@pytest.mark.parametrize("flags, modes", [
    ([], ["eager", "searched"]),
    (["--cudagraphs"], ["eager", "searched", "searched_cg"]),
    (["--cudagraphs-only"], ["eager", "searched_cg"]),
])
def test_make_modes_cudagraphs(benchmark_module, flags, modes):
    """--cudagraphs adds each compiled mode under CUDA graphs; --cudagraphs-only keeps only those
    (eager stays the plain model), and only they copy their cache out of the graphs' pool."""
    chunked = benchmark_module("chunked")
    args = chunked.parse_args(["--config", SPEC, "--device", "cpu", *flags])
    model = torch.nn.Linear(2, 2)
    fns = chunked.make_modes(model, args)
    assert list(fns) == modes and fns["eager"] is model
    assert [m for m, f in fns.items() if getattr(f, "_mi_cudagraphs", False)] == [m for m in modes if m.endswith("_cg")]


def test_main_cpu_absolute_chunks(benchmark_module, tmp_path):
    chunked = benchmark_module("chunked")
    path, _ = _config_with_length(tmp_path)
    out = tmp_path / "out"
    torch._dynamo.reset()
    try:
        chunked.main(["--model", "tiny:qwen2", "--device", "cpu", "--no-inductor", "--context", "256",
                      "--turn", "64", "--chunk", "128", "--config", str(path), "--min-seq-len", "0",
                      "--phases", "chunked", "--reps", "1", "--absolute-chunks", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    data = json.loads((out / "chunked.json").read_text())
    assert data["meta"]["absolute"]["length_removed"] == 256
    assert "length" not in json.loads((out / "absolute_config.json").read_text())
    rows = [r for r in data["rows"] if r["kind"] == "chunked"]
    by = {(r["mode"], r["chunk"]): r for r in rows}
    assert set(by) == {("eager", None), ("searched", None), ("searched", 128), ("absolute", None), ("absolute", 128)}
    for mode in ("searched", "absolute"):
        piece_s = by[(mode, 128)]["piece_s"]
        assert len(piece_s) == 2 and all(isinstance(t, float) and t >= 0 for t in piece_s)
        assert "piece_s" not in by[(mode, None)]
        assert by[(mode, 128)]["sites"]["sparse"] > 0
    assert by[("eager", None)]["sites"] is None       # the backend is not set on the shared model
    assert not [r for r in data["rows"] if r["kind"] == "chunked_warmup" and r.get("error")]


def test_profile_chunked_writes_and_survives_failure(benchmark_module, tmp_path, monkeypatch):
    chunked = benchmark_module("chunked")
    from mi_compile.debug import gpu_profile

    calls = []

    def fake_kernel_times(fn, top=60):
        fn()
        if len(calls) == 4:                 # the last profile fails: recorded, not raised
            raise RuntimeError("profiler broke")
        ms = 1.5 + 0.5 * len(calls)         # each profile a little slower than the last
        return dict(total_ms=ms, sparse_op_host_ms=0.0, sparse_op_calls=0, categories={"gemm": ms},
                    kernels=[dict(name="k", ms=ms, calls=1, category="gemm")])

    monkeypatch.setattr(gpu_profile, "kernel_times", fake_kernel_times)
    dev = types.SimpleNamespace(free=lambda: None, sync=lambda: None, cuda=True)

    class Rows(list):
        def add(self, **row):
            self.append(row)

    rows = Rows()
    fns = {"eager": "E", "searched": "S", "absolute": "A"}
    times = {("eager", None): [1.0], ("searched", None): [1.0], ("searched", 64): [1.2],
             ("absolute", None): [1.0], ("absolute", 64): [1.1]}
    args = types.SimpleNamespace(out=str(tmp_path))
    chunked.profile_chunked(args, dev, rows, fns, lambda f, c=None: calls.append((f, c)), times, 128)
    assert calls == [("S", None), ("S", 64), ("A", None), ("A", 64)]
    assert [(r["kind"], r["mode"], r["chunk"], "error" in r) for r in rows] == [
        ("chunked_profile", "searched", None, False), ("chunked_profile", "searched", 64, False),
        ("chunked_profile", "absolute", None, False), ("chunked_profile", "absolute", 64, True),
        ("chunked_profile_diff", "searched", 64, False)]     # no diff without absolute's chunk profile
    assert rows[-1]["total"] == dict(base_ms=2.0, other_ms=2.5, diff_ms=0.5)
    assert {p.name for p in tmp_path.iterdir()} == {
        "profile_chunked_searched_whole.txt", "profile_chunked_searched_chunk64.txt",
        "profile_chunked_absolute_whole.txt", "profile_chunked_searched_diff.txt"}
    assert "+0.50  all kernels" in (tmp_path / "profile_chunked_searched_diff.txt").read_text()
    assert "prefilled in 64-token chunks" in (tmp_path / "profile_chunked_searched_chunk64.txt").read_text()


def test_chunk_work_dry_run(benchmark_module, tmp_path):
    """benchmarks/chunk_work.py on the CPU: whole, scaled and absolute chunks of two layers of the
    shipped Qwen config; the scaled chunks never compute more pairs than the absolute ones."""
    chunk_work = benchmark_module("chunk_work")
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG
    from mi_compile.kernels.top_select import SELECT_CONFIG
    default_split = KERNEL_CONFIG["split_tiles"]
    out = tmp_path / "cw.json"
    summary = chunk_work.main(["--device", "cpu", "--n", "512", "--chunk", "128", "--length", "2048",
                               "--min-seq-len", "256", "--layers", "0,1", "--reps", "1", "--out", str(out),
                               "--split-tiles", "2", "--compare-topk", "--profile"])     # --profile: CUDA only, noted
    assert set(summary) == {"whole", "chunks", "absolute", "chunks_split2", "whole_top_select",
                            "chunks_top_select"} and summary["whole"]["vs_whole"] == 1.0
    assert summary["chunks_top_select"]["pairs_vs_whole"] == summary["chunks"]["pairs_vs_whole"]
    # another split of the dense rows changes the time only
    assert summary["chunks_split2"]["pairs_vs_whole"] == summary["chunks"]["pairs_vs_whole"]
    assert KERNEL_CONFIG["split_tiles"] == default_split and SELECT_CONFIG["kernel"] is False
    with pytest.raises(SystemExit):
        chunk_work.parse_args(["--split-tiles", "0"])
    assert summary["chunks"]["pairs_vs_whole"] < summary["absolute"]["pairs_vs_whole"]
    rows = json.loads(out.read_text())
    assert rows["meta"]["length"] == 2048 and [r["layer"] for r in rows["layers"]] == [0, 1]
    assert "profile" not in rows


def test_chunk_work_profile_variants(benchmark_module, monkeypatch):
    """Each variant profiled once, and the chunks against the whole."""
    chunk_work = benchmark_module("chunk_work")
    from mi_compile.debug import gpu_profile

    def fake_kernel_times(fn, top=60):
        ms = fn()
        return dict(total_ms=ms, sparse_op_host_ms=0.0, sparse_op_calls=0, categories={"index tables": ms},
                    kernels=[dict(name="_block_rows_kernel", ms=ms, calls=1, category="index tables")])

    monkeypatch.setattr(gpu_profile, "kernel_times", fake_kernel_times)
    prof = chunk_work.profile_variants({"whole": lambda: 2.0, "chunks": lambda: 3.5})
    assert set(prof["reports"]) == {"whole", "chunks"} and prof["diff"]["total"]["diff_ms"] == 1.5
    assert "chunks against whole" in prof["text"] and "+1.50  all kernels" in prof["text"]
    assert chunk_work.profile_variants({"whole": lambda: 2.0})["diff"] is None


def test_with_top_select_sets_the_kernel_flag_only_during_the_call(benchmark_module):
    chunked = benchmark_module("chunked")
    from mi_compile.kernels.top_select import SELECT_CONFIG

    seen = []

    def fn(x):
        seen.append(SELECT_CONFIG["kernel"])
        if x is None:
            raise ValueError("bad input")
        return x + 1

    fn._mi_backend = "backend"
    wrapped = chunked.with_top_select(fn)
    before = SELECT_CONFIG["kernel"]
    assert wrapped(1) == 2 and seen == [True] and SELECT_CONFIG["kernel"] == before
    with pytest.raises(ValueError, match="bad input"):
        wrapped(None)
    assert seen == [True, True] and SELECT_CONFIG["kernel"] == before
    assert wrapped._mi_backend == "backend"          # its sites are the compiled mode's


def test_compare_topk_adds_a_mode_per_compiled_mode(benchmark_module):
    chunked = benchmark_module("chunked")
    args = chunked.parse_args(["--compare-topk", "--config", SPEC, "--configs", f"other={SPEC}",
                               "--device", "cpu", "--no-inductor"])
    fns = chunked.make_modes(torch.nn.Identity(), args)
    assert set(fns) == {"eager", "searched", "other", "searched@top_select", "other@top_select"}
    assert fns["searched@top_select"]._mi_backend is fns["searched"]._mi_backend


def test_cudagraphs_adds_a_reduce_overhead_mode_per_compiled_mode(benchmark_module):
    chunked = benchmark_module("chunked")
    args = chunked.parse_args(["--cudagraphs", "--compare-topk", "--config", SPEC, "--device", "cpu"])
    fns = chunked.make_modes(torch.nn.Identity(), args)
    assert set(fns) == {"eager", "searched", "searched_cg", "searched@top_select", "searched_cg@top_select"}
    assert fns["searched_cg"]._mi_backend.mode == "reduce-overhead"
    assert fns["searched"]._mi_backend.mode is None
    # a graph replays what it recorded: the select kernel's graph mode is a compile of its own
    assert fns["searched_cg@top_select"]._mi_backend is not fns["searched_cg"]._mi_backend
    assert fns["searched_cg@top_select"]._mi_backend.mode == "reduce-overhead"


def test_cudagraph_modes_own_their_cache_between_calls(benchmark_module, monkeypatch):
    """A ``_cg`` mode's call is a CUDA-graph step of its own and leaves the cache holding copies
    (a replay would overwrite the graph's outputs); other modes leave the cache's tensors as they are."""
    chunked = benchmark_module("chunked")
    from transformers import DynamicCache

    from mi_compile.models import tiny_model

    args = chunked.parse_args(["--cudagraphs", "--compare-topk", "--config", SPEC, "--device", "cpu"])
    fns = chunked.make_modes(torch.nn.Identity(), args)
    assert {m for m, f in fns.items() if getattr(f, "_mi_cudagraphs", False)} == {"searched_cg", "searched_cg@top_select"}

    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = tiny_model("qwen2").eval()
    ids = torch.randint(0, 100, (1, 16))
    for graphs in (False, True):
        cache = DynamicCache(config=model.config)
        fn = (lambda *a, **k: model(*a, **k))
        fn._mi_cudagraphs = graphs
        with torch.no_grad():
            chunked.call_continuing(model, cache, ids)            # a plain callable: no step, no copies
            held = [(layer.keys, layer.values) for layer in cache.layers]
            out = chunked.call_continuing(fn, cache, ids[:, :4], logits_to_keep=1)
        assert out.logits.shape[1] == 1 and cache.get_seq_length() == 20
        now = [(layer.keys, layer.values) for layer in cache.layers]
        if graphs:
            copies = [t for pair in now for t in pair]
            assert steps == [1] and all(t._base is None for t in copies)
            assert len({t.data_ptr() for t in copies}) == len(copies)
        else:
            assert steps == [] and [k.shape[-2] for k, _ in now] == [20] * len(now)
        assert [k.shape[-2] for k, _ in held] == [16] * len(held)


def test_timed_rounds_drops_a_failing_mode_and_keeps_the_others(benchmark_module):
    chunked = benchmark_module("chunked")

    class Rows(list):
        def add(self, **row):
            self.append(row)

    rows, calls = Rows(), []

    def run(key):
        calls.append(key)
        if key == ("searched_cg", 64) and len(calls) > 3:
            raise AssertionError("graph tree broke")
        return 1.0

    times = {("eager", None): [], ("searched_cg", 64): [], ("searched", 64): []}
    chunked.timed_rounds(3, times, run, rows, "chunked")
    assert times == {("eager", None): [1.0] * 3, ("searched", 64): [1.0] * 3}
    assert rows == [dict(kind="chunked_error", mode="searched_cg", chunk=64, error="AssertionError: graph tree broke")]
    turn_times = {"eager": [], "bad": []}
    chunked.timed_rounds(2, turn_times, lambda m: 1 / 0 if m == "bad" else 2.0, rows, "turn")
    assert turn_times == {"eager": [2.0, 2.0]} and rows[-1]["kind"] == "turn_error" and rows[-1]["mode"] == "bad"


def test_main_cpu_static_cache_chunks(benchmark_module, tmp_path, monkeypatch):
    """``--cache static``: the chunks continue a ``StaticCache`` (rewritten as static-cache
    chunks, the same next token as the whole prefill); a ``_cg`` call leaves its tensors in place."""
    chunked = benchmark_module("chunked")
    from transformers import StaticCache
    from torch._dynamo.utils import counters

    out = tmp_path / "out"
    torch._dynamo.reset()
    counters.clear()
    try:
        chunked.main(["--model", "tiny:qwen2", "--device", "cpu", "--no-inductor", "--context", "256",
                      "--chunk", "128", "--config", SPEC, "--min-seq-len", "0", "--phases", "chunked",
                      "--reps", "1", "--cache", "static", "--out", str(out)])
    finally:
        torch._dynamo.reset()
    data = json.loads((out / "chunked.json").read_text())
    assert data["meta"]["cache"] == "static"
    by = {(r["mode"], r["chunk"]): r for r in data["rows"] if r["kind"] == "chunked"}
    assert set(by) == {("eager", None), ("searched", None), ("searched", 128)}
    assert by[("searched", 128)]["sites"]["sparse"] > 0 and by[("searched", 128)]["same_next_token"]
    assert counters["mi_compile"]["rewritten_static_chunk"] > 0
    with pytest.raises(SystemExit):
        chunked.parse_args(["--cache", "static"])                # the turn phase sets its cache back

    from mi_compile.models import tiny_model
    model = tiny_model("qwen2").eval()
    cache = StaticCache(config=model.config, max_cache_len=32)
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    fn = (lambda *a, **k: model(*a, **k))
    fn._mi_cudagraphs = True
    with torch.no_grad():
        chunked.call_continuing(fn, cache, torch.randint(0, 100, (1, 8)))
        held = [layer.keys for layer in cache.layers]
        chunked.call_continuing(fn, cache, torch.randint(0, 100, (1, 8)))
    assert steps == [1, 1] and all(a is layer.keys for a, layer in zip(held, cache.layers))
