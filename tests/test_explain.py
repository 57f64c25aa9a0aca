"""The explain table: module paths as the user names them, and what min_seq_len means for an input."""
import pytest
import torch

import mi_compile
from mi_compile.models import tiny_model
from mi_compile.passes.find_attention import _clean_path


def test_module_paths_drop_dynamo_prefixes():
    assert _clean_path("L['self'].model.layers[3].self_attn") == "model.layers.3.self_attn"
    assert _clean_path("L['args'][0].model.layers[3].self_attn") == "model.layers.3.self_attn"
    assert _clean_path("L.args.0.model.layers.3.self_attn") == "model.layers.3.self_attn"
    assert _clean_path("model.layers.3.self_attn") == "model.layers.3.self_attn"
    assert _clean_path("L.selfish.x") == "L.selfish.x"          # only the whole prefix goes


def test_explain_states_the_threshold_for_this_input():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 96))
    short = mi_compile.explain(model, ids, options={"min_seq_len": 128}).table()
    assert "model.layers.0.self_attn" in short and "L.args" not in short
    assert "min_seq_len 128" in short and "this input (96 tokens) runs dense" in short
    torch._dynamo.reset()
    long = mi_compile.explain(model, ids, options={"min_seq_len": 64}).table()
    assert "this input (96 tokens) runs the sparse patterns" in long
    torch._dynamo.reset()


def test_eager_attention_models_are_told_why_nothing_is_sparse(caplog):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    with caplog.at_level("WARNING", logger="mi_compile"):
        result = mi_compile.explain(model, torch.randint(3, 100, (1, 32)))
    torch._dynamo.reset()
    assert not result.sites
    assert any('attn_implementation="sdpa"' in r.getMessage() for r in caplog.records)


def test_search_summary_says_when_the_budget_was_exceeded():
    from mi_compile.search import choose_config
    from mi_compile.search.search import SearchReport
    from mi_compile.patterns.spec import HeadPattern
    cands = [HeadPattern("a_shape", sink=64, local=64), HeadPattern("dense")]
    scored = SearchReport(model="m", n=256, budget=0.5, seed=0, score_queries=64, sample_queries=0,
                          candidates=cands, heads=[], skipped_layers={},
                          recall={0: torch.tensor([[0.9], [1.0]], dtype=torch.float64)},
                          density={0: torch.tensor([[0.6], [1.0]], dtype=torch.float64)})
    _, report = choose_config(scored, 0.05, allocate="global")
    assert "> 0.05 (even the cheapest candidates exceed the budget)" in report.table()
    _, report = choose_config(scored, 0.7, allocate="global")
    assert "<= 0.7" in report.table()


@pytest.mark.parametrize("args, message", [
    (["--length", "0"], "--length: expected a positive integer, got 0"),
    (["--dense-layers", "0,x"], "--dense-layers: expected comma-separated layer indices"),
    (["--model", "tiny:bogus"], "unknown model family 'bogus'"),
])
def test_explain_cli_rejects_bad_values_cleanly(args, message, capsys):
    from mi_compile.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["explain", "--model", "tiny:llama", *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_explain_says_which_kernels_run_on_the_input_device(monkeypatch):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 96))
    monkeypatch.delenv("MI_COMPILE_CPU_IMPL", raising=False)
    table = mi_compile.explain(model, ids, options={"min_seq_len": 64}).table()
    torch._dynamo.reset()
    assert "kernels: the float32 PyTorch reference of each selection (CPU)" in table


def test_kernels_line_on_cuda_names_the_opt_in_and_why_gluon_cannot_run(monkeypatch):
    from mi_compile.kernels import hopper_wide
    from mi_compile.kernels.dispatch import kernels_line
    monkeypatch.delenv("MI_COMPILE_HOPPER", raising=False)
    assert "MI_COMPILE_HOPPER=1 opts into the Gluon Hopper kernels" in kernels_line("cuda")
    monkeypatch.setenv("MI_COMPILE_HOPPER", "ws")
    line = kernels_line("cuda")
    if hopper_wide.unavailable_reason("cuda"):       # no GPU / not sm_90 / no Gluon: Triton, and why
        assert line.startswith("kernels: Triton (MI_COMPILE_HOPPER=ws asked for Gluon, not available: ")
    else:
        assert "hopper_ws for layers of dense / A-shape heads, Triton for the others" in line
        monkeypatch.setenv("MI_COMPILE_HOPPER", "ws_sparse")
        assert "hopper_sparse_pipe for the others" in kernels_line("cuda")
