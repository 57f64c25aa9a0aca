"""Each pass on graphs traced from real transformers models: which pass fired, asserted by op
target and by the ``counters["mi_compile"]`` each pass bumps, with a negative case beside each."""
import pytest
import torch
from torch._dynamo.utils import counters

from mi_compile.config import load_config
from mi_compile.options import BackendOptions
from mi_compile.passes import run_passes
from mi_compile.passes.classify_mask import ClassifyMaskPass
from mi_compile.passes.find_attention import SDPA_TARGETS, FindAttentionPass
from mi_compile.passes.undo_repeat_kv import UndoRepeatKVPass
from mi_compile.models import tiny_model

SPARSE = torch.ops.mi_compile.sparse_attention.default
LAYERS = 2


def traced_graph(family="llama", num_kv_heads=2, n=128, batch=1, padded=False, **kw):
    """The FX graph Dynamo hands a backend for ``model(ids)`` (no passes run)."""
    model = tiny_model(family, num_layers=LAYERS, num_kv_heads=num_kv_heads, **kw)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ids = torch.randint(3, model.config.vocab_size, (batch, n))
    mask = torch.ones(batch, n, dtype=torch.long)
    if padded:
        mask[0, : n // 4] = 0
    with torch.no_grad():
        torch.compile(model, backend=capture)(input_ids=ids, attention_mask=mask if padded else None,
                                              use_cache=False)
    assert len(graphs) == 1, "expected one graph (no graph break)"
    return graphs[0]


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


@pytest.fixture(autouse=True)
def fresh_counters():
    counters.clear()
    yield
    counters.clear()


def test_find_attention_finds_every_layer():
    gm = traced_graph()
    sites = FindAttentionPass()(gm)
    assert [s.layer for s in sites] == list(range(LAYERS))
    assert counters["mi_compile"]["attention_found"] == LAYERS


def test_find_attention_on_a_graph_without_attention():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert FindAttentionPass()(gm) == []
    assert counters["mi_compile"]["attention_found"] == 0


def test_classify_mask_causal_and_padding():
    gm = traced_graph()
    sites = FindAttentionPass()(gm)
    ClassifyMaskPass()(gm, sites)
    assert {s.mask.kind for s in sites} == {"causal"}
    assert counters["mi_compile"]["mask_causal"] == LAYERS

    counters.clear()
    gm = traced_graph(batch=2, padded=True)
    sites = FindAttentionPass()(gm)
    ClassifyMaskPass()(gm, sites)
    assert {s.mask.kind for s in sites} == {"causal+padding"}
    assert counters["mi_compile"]["mask_causal+padding"] == LAYERS
    assert counters["mi_compile"]["mask_causal"] == 0


def test_undo_repeat_kv_on_gqa_and_not_on_mha():
    gm = traced_graph(num_kv_heads=2)          # 4 query heads over 2 KV heads: repeat_kv in the graph
    sites = FindAttentionPass()(gm)
    UndoRepeatKVPass()(gm, sites)
    assert counters["mi_compile"]["repeat_kv_undone"] == LAYERS
    assert all(s.kv_heads == 2 and s.gqa == "undone" for s in sites)

    counters.clear()
    gm = traced_graph(num_kv_heads=4)          # MHA: nothing to undo
    sites = FindAttentionPass()(gm)
    UndoRepeatKVPass()(gm, sites)
    assert counters["mi_compile"]["repeat_kv_undone"] == 0
    assert all(s.gqa == "mha" for s in sites)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_rewrite_replaces_every_sdpa_with_the_sparse_op(family):
    gm = traced_graph(family)
    report = run_passes(gm, BackendOptions.from_user({"min_seq_len": 0}), load_config(None))
    assert len(gm.graph.find_nodes(op="call_function", target=SPARSE)) == LAYERS
    assert sdpa_nodes(gm) == []
    assert report.rewritten == LAYERS
    assert counters["mi_compile"]["rewritten_sparse"] == LAYERS
    assert counters["mi_compile"]["left_dense"] == 0


def test_rewrite_leaves_dense_layers_as_sdpa():
    gm = traced_graph()
    run_passes(gm, BackendOptions.from_user({"dense_layers": [0]}), load_config(None))
    assert len(gm.graph.find_nodes(op="call_function", target=SPARSE)) == LAYERS - 1
    assert len(sdpa_nodes(gm)) == 1
    assert counters["mi_compile"]["rewritten_sparse"] == LAYERS - 1
    assert counters["mi_compile"]["left_dense"] == 1


def test_dead_code_keeps_in_place_methods_and_drops_pure_dunders():
    """The rewrite's dead-code rule: an unused in-place method (``add_``, ``__iadd__``,
    ``__setitem__``) stays, an unused comparison (``__eq__``: the ``n x n`` mask torch 2.11 traces
    from transformers' masking code) goes."""
    from mi_compile.passes.rewrite_attention import has_side_effects

    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    kept = [graph.call_method(name, (x, y)) for name in ("add_", "__iadd__", "__setitem__")]
    dropped = [graph.call_method(name, (x, y)) for name in ("__eq__", "__and__", "add")]
    graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
    left = {n.target for n in gm.graph.nodes if n.op == "call_method"}
    assert left == {n.target for n in kept}
    assert not left & {n.target for n in dropped}
