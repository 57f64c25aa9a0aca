"""The explain table: module paths as the user names them, and what min_seq_len means for an input."""
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
