"""benchmarks/e2e.py with --model: the sweep's control flow on the CPU with a tiny Qwen2 (random
weights, no tokenizer), including YaRN past its native context, and its helpers."""
from __future__ import annotations

import json

import pytest
import torch



@pytest.fixture(scope="module")
def e2e(benchmark_module):
    return benchmark_module("e2e")


def test_measure_order_and_args(e2e):
    assert e2e.measure_order([8192, 16384, 32768, 65536, 131072]) == [8192, 131072, 65536, 32768, 16384]
    a = e2e.parse_args(["--model", "qwen", "--config", "vertical_slash:100:800", "--configs", "s32=x.json"])
    assert a.lengths == [8192, 16384, 32768, 65536, 131072] and a.min_seq_len == 32768 and a.reps == 2
    assert a.modes == ["eager", "searched", "minference", "inductor", "s32"] and a.extra_configs == {"s32": "x.json"}
    a = e2e.parse_args(["--model", "qwen2.5-coder-1.5b"])
    assert a.config.endswith("qwen2.5-coder-1.5b.json")      # the shipped family (32K + 128K configs)
    old = e2e.parse_args(["--device", "cpu", "--tiny"])            # the first version's smoke path
    assert old.model is None and old.lengths == [256, 512] and "minference_llama31" in old.modes
    with pytest.raises(SystemExit):
        e2e.parse_args(["--model", "tiny:qwen2", "--tiny"])


def test_yarn_switch_probe(e2e):
    from mi_compile.models import native_context, tiny_model

    model = tiny_model("qwen2")
    probe = e2e.yarn_switch_probe(model, 4.0, native_context(model))
    assert probe["rotary"] == "model.rotary_emb" and not probe["stale"]
    assert isinstance(probe["recompiles"], bool) and len(probe["backend_calls_after"]) == 3
    assert model.config.rope_parameters.get("rope_type", "default") != "yarn"     # left native


def test_model_sweep_smoke_tiny_qwen2_cpu(e2e, tmp_path):
    """--model tiny:qwen2 on the CPU: every mode at every length (one past the native 2048, so
    YaRN is on), rows with TTFT and compile counts, the goal checks, no recompiles."""
    torch._dynamo.reset()
    rec = e2e.main(["--model", "tiny:qwen2", "--device", "cpu", "--modes", "eager,searched,minference",
                    "--config", "vertical_slash:16:64", "--no-inductor", "--lengths", "256,2304",
                    "--out", str(tmp_path)])
    torch._dynamo.reset()
    data = json.loads((tmp_path / "e2e.json").read_text())
    rows = {(r["mode"], r["n"]): r for r in data["rows"] if r.get("kind") == "prefill"}
    assert set(rows) == {(m, n) for m in ("eager", "searched", "minference") for n in (256, 2304)}
    assert all(r.get("ttft_s") for r in rows.values()), rows
    # YaRN at 2304; at 256 too when switching per length would recompile (what the probe found)
    per_length = data["meta"]["yarn"]["policy"].startswith("per length")
    assert all(rows[(m, 2304)]["yarn_factor"] == 4.0 for m in ("eager", "searched", "minference"))
    assert rows[("eager", 256)]["yarn_factor"] == (None if per_length else 4.0)
    probe = next(r for r in data["rows"] if r["kind"] == "yarn_probe")
    assert per_length == (not probe["recompiles"] and not probe["stale"])
    assert rows[("searched", 256)]["compile_s"] > 0 and rows[("searched", 2304)]["recompiled"] is False
    assert rows[("searched", 2304)]["sites"]["last_graph_sparse"] == 2
    assert "random ids" in rows[("eager", 256)]["input"]
    kinds = {r["kind"] for r in data["rows"]}
    assert {"model", "yarn_probe", "yarn", "compiles"} <= kinds
    assert data["meta"]["yarn"]["native"] == 2048
    checks = {c["check"]: c["status"] for c in data["checks"]}
    assert checks["searched no recompiles across lengths"] == "PASS"
    assert checks["searched TTFT <= 0.3x eager at 131072"] == "SKIP"
    assert rec.rows


def test_gluon_modes_share_the_compiled_model_and_set_the_opt_in(e2e, monkeypatch):
    """``<mode>@gluon``: accepted for any known mode, the same compiled callable with
    MI_COMPILE_HOPPER=1 set for each call only; an unknown base mode is refused."""
    a = e2e.parse_args(["--model", "qwen", "--modes", "eager,searched,searched@gluon,searched@gluon_ws",
                        "--config", "dense"])
    assert a.modes == ["eager", "searched", "searched@gluon", "searched@gluon_ws"]
    with pytest.raises(SystemExit):
        e2e.parse_args(["--model", "qwen", "--modes", "eager,nothing@gluon"])
    monkeypatch.delenv("MI_COMPILE_HOPPER", raising=False)
    seen = []
    base = lambda *args, **kwargs: seen.append(__import__("os").environ.get("MI_COMPILE_HOPPER"))  # noqa: E731
    fns, counters = {"searched": base}, {"searched": lambda: 1}
    fn, counter = e2e.make_model_mode("searched@gluon", None, a, fns, counters)
    fn()
    e2e.make_model_mode("searched@gluon_ws", None, a, fns, counters)[0]()
    e2e.make_model_mode("searched@gluon_all", None, a, fns, counters)[0]()
    e2e.make_model_mode("searched@gluon_sparse_ws", None, a, fns, counters)[0]()
    assert seen == ["1", "ws", "ws_sparse", "sparse_ws"]
    assert "MI_COMPILE_HOPPER" not in __import__("os").environ and counter() == 1
