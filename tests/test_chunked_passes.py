"""Prefill chunks that continue a cache (``nq`` new queries over ``nk = past + nq`` keys).

Tiny random Llama / Qwen2 models (fp32, CPU) prefill a prompt into a ``DynamicCache``, then a
continuation chunk runs through ``torch.compile(model, backend="minference")``: the passes
must classify its mask as bottom-right-aligned causal and rewrite the call to
``mi_compile::sparse_attention`` (asserted by op target and by the passes' counters), and the
logits must be eager's (the config's heads cover every key). Beside each positive case a
negative one stays dense with its reason: a mask with another offset, a decode step. A
``StaticCache`` continuation is rewritten too (here in brief, in full in ``test_static_chunk.py``). Top-left-aligned causal masks over more keys than queries (``is_causal=True``
with ``nq < nk``, a static cache's prefill) run as a prefill over the first ``nq`` keys (here in
brief, in full in ``test_top_left.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import DynamicCache, StaticCache

import mi_compile
from mi_compile import op as mi_op
from mi_compile.backend import MInferenceBackend
from mi_compile.config import load_config
from mi_compile.models import tiny_model
from mi_compile.options import BackendOptions
from mi_compile.passes import run_passes
from mi_compile.passes.classify_mask import ClassifyMaskPass
from mi_compile.passes.find_attention import SDPA_TARGETS, FindAttentionPass

SPARSE = torch.ops.mi_compile.sparse_attention.default
LAYERS = 2
# a_shape whose local window is longer than every sequence here: every causal key is seen, so
# the op's sparse path must give eager's logits; min_seq_len 0 sends these short lengths there
COVER = {"format": "mi-compile/v1", "default": {"pattern": "a_shape", "sink": 4, "local": 4096}}
OPTS = {"config": COVER, "min_seq_len": 0}
PAST, CHUNK = 80, 70          # the chunk is longer than one 64-query block: the sparse path runs


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture
def op_takes_chunks(monkeypatch):
    """Pass-level tests of the rewrite: the op's answer for every layer is "can run sparse"."""
    monkeypatch.setattr(mi_op, "chunk_dense_reason", lambda heads: None)


def _tokens(batch, n, seed):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


def _padding(batch, past, chunk, padded):
    """``(prompt mask, chunk mask)``: row 0 of the prompt left-padded, or both None."""
    if not padded:
        return None, None
    am = torch.ones(batch, past, dtype=torch.long)
    am[0, :9] = 0
    return am, torch.cat([am, torch.ones(batch, chunk, dtype=torch.long)], 1)


def _chunk_kwargs(mask):
    return {} if mask is None else {"attention_mask": mask}


def _continue(model, run, batch=1, past=PAST, chunk=CHUNK, padded=False, cache_cls=DynamicCache, seed=0,
              prefill=None):
    """Prefill ``past`` tokens into a fresh cache with ``prefill`` (default: eager ``model``),
    then run the ``chunk`` through ``run``; returns the chunk's logits."""
    ids1, ids2 = _tokens(batch, past, seed), _tokens(batch, chunk, seed + 1)
    m1, m2 = _padding(batch, past, chunk, padded)
    if cache_cls is StaticCache:
        cache = StaticCache(config=model.config, max_cache_len=past + chunk + 16)
    else:
        cache = DynamicCache(config=model.config)
    with torch.no_grad():
        (model if prefill is None else prefill)(ids1, past_key_values=cache, use_cache=True, **_chunk_kwargs(m1))
        return run(ids2, past_key_values=cache, use_cache=True, **_chunk_kwargs(m2)).logits


def _sparse_nodes(report):
    return [s for s in report.sites if s.action == "sparse" and s.node.target is SPARSE]


def _assert_close(out, ref, valid=None):
    if valid is not None:
        out, ref = out[valid], ref[valid]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# -- classification and rewrite on the graphs transformers traces ---------------------------------

def traced_chunk_graph(family="llama", batch=1, padded=False, dynamic=None, cache_cls=DynamicCache):
    """The FX graph Dynamo hands a backend for a chunk continuing a cache (no passes run)."""
    model = tiny_model(family, num_layers=LAYERS)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=capture, dynamic=dynamic)
    _continue(model, compiled, batch=batch, past=20, chunk=8, padded=padded, cache_cls=cache_cls)
    assert len(graphs) == 1, "expected one graph (no graph break)"
    return graphs[0]


def _classified(gm):
    sites = FindAttentionPass()(gm)
    ClassifyMaskPass()(gm, sites)
    return sites


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("padded", [False, True])
def test_chunk_mask_is_bottom_right_causal(padded, dynamic):
    """Concrete (20 cached + 8 new) and symbolic (``arange(s_q) + s_past``) offsets alike."""
    gm = traced_chunk_graph(batch=2 if padded else 1, padded=padded, dynamic=dynamic)
    sites = _classified(gm)
    kind = "causal_bottom_right+padding" if padded else "causal_bottom_right"
    assert [s.mask.kind for s in sites] == [kind] * LAYERS, [s.mask.reason for s in sites]
    assert all(s.mask.chunk for s in sites)
    assert counters["mi_compile"][f"mask_{kind}"] == LAYERS
    assert all((s.mask.padding_source is not None) == padded for s in sites)


def test_chunk_rewrite_fires_by_op_target(op_takes_chunks):
    gm = traced_chunk_graph(batch=2, padded=True, dynamic=True)
    report = run_passes(gm, BackendOptions.from_user(OPTS), load_config(COVER))
    assert len(gm.graph.find_nodes(op="call_function", target=SPARSE)) == LAYERS
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS] == []
    assert report.rewritten == LAYERS
    assert counters["mi_compile"]["rewritten_sparse"] == LAYERS
    assert counters["mi_compile"]["left_dense"] == 0
    # the attention_mask's length is a symbol of its own: cut to the keys' length for the op
    for node in gm.graph.find_nodes(op="call_function", target=SPARSE):
        pad = node.args[5]
        assert pad.op == "call_method" and pad.target == "narrow"


def test_chunk_call_carries_the_config_length(op_takes_chunks):
    """A config with ``length`` gives the chunk's op call that prompt length (which scales its
    vertical counts); without one the call has none, and a whole prefill's call never does."""
    gm = traced_chunk_graph()
    run_passes(gm, BackendOptions.from_user(OPTS), load_config({**COVER, "length": 131072}))
    assert [n.args[9:] for n in gm.graph.find_nodes(op="call_function", target=SPARSE)] == [(131072,)] * LAYERS
    gm = traced_chunk_graph()
    run_passes(gm, BackendOptions.from_user(OPTS), load_config(COVER))
    assert [len(n.args) for n in gm.graph.find_nodes(op="call_function", target=SPARSE)] == [9] * LAYERS
    graphs = []
    model = tiny_model("llama", num_layers=LAYERS)
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward)(_tokens(1, 20, 0))
    run_passes(graphs[0], BackendOptions.from_user(OPTS), load_config({**COVER, "length": 131072}))
    assert [len(n.args) for n in graphs[0].graph.find_nodes(op="call_function", target=SPARSE)] == [9] * LAYERS


def test_chunk_stays_dense_where_the_op_says_so(monkeypatch):
    monkeypatch.setattr(mi_op, "chunk_dense_reason", lambda heads: "these heads cannot take a chunk")
    gm = traced_chunk_graph()
    report = run_passes(gm, BackendOptions.from_user(OPTS), load_config(COVER))
    assert report.rewritten == 0
    assert gm.graph.find_nodes(op="call_function", target=SPARSE) == []
    assert {s.reason for s in report.sites} == {"prefill chunk over a cache: these heads cannot take a chunk"}


def test_static_cache_chunk_is_rewritten_over_the_filled_slots(op_takes_chunks):
    """StaticCache offsets the queries by a runtime tensor over all of its slots: proven causal
    over the filled ones (``causal_static_offset``), rewritten with K/V rotated so they end at
    the last query (in full in ``test_static_chunk.py``). A mask whose runtime offset is off
    by one stays dense with the static-cache reason (there too)."""
    gm = traced_chunk_graph(cache_cls=StaticCache)
    report = run_passes(gm, BackendOptions.from_user(OPTS), load_config(COVER))
    assert report.rewritten == LAYERS
    assert len(gm.graph.find_nodes(op="call_function", target=SPARSE)) == LAYERS
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS] == []
    assert {s.mask.kind for s in report.sites} == {"causal_static_offset"}
    assert counters["mi_compile"]["rewritten_static_chunk"] == LAYERS
    assert counters["mi_compile"]["left_dense"] == 0


class _OneLayer(torch.nn.Module):
    """``attention`` as layer 0 (``layers.0``: the passes read the layer index from the path)."""

    def __init__(self, attention):
        super().__init__()
        self.layers = torch.nn.ModuleList([attention])

    def forward(self, q, k, v):
        return self.layers[0](q, k, v)


class _TopLeft(torch.nn.Module):
    """An attention whose SDPA gets ``is_causal=True`` with fewer queries than keys."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_is_causal_with_a_shorter_query_runs_over_the_first_keys():
    """PyTorch aligns that mask top-left (query r sees keys 0..r): a prefill over the first 70 keys."""
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16)
    backend = mi_compile.backend(OPTS)
    with torch.no_grad():
        out = torch.compile(_OneLayer(_TopLeft()), backend=backend, fullgraph=True)(q, k, v)
    (report,) = backend.reports
    (site,) = report.sites
    assert site.mask.kind == "causal_top_left" and site.action == "sparse" and site.node.target is SPARSE
    assert "PyTorch aligns the mask top-left" in site.mask.how
    assert counters["mi_compile"]["rewritten_top_left"] == 1 and counters["mi_compile"]["rewritten_sparse"] == 1
    _assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class _ExplicitMask(torch.nn.Module):
    """SDPA under a mask built the way transformers builds one, query row 0 at key ``offset``
    (``None``: bottom-right, ``nk - nq``); 0 is a static-cache prefill (causal aligned top-left
    over every slot of the cache)."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, q, k, v):
        nq, nk = q.shape[2], k.shape[2]
        off = nk - nq if self.offset is None else self.offset
        q_idx = (torch.arange(nq) + off)[None, None, :, None]
        kv_idx = (torch.arange(nk) + 0)[None, None, None, :]
        mask = (kv_idx <= q_idx).expand(q.shape[0], -1, nq, nk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("offset,kind", [(None, "causal_bottom_right"), (0, "causal_top_left"), (3, "unknown")])
def test_explicit_masks_over_more_keys(offset, kind):
    """Bottom-right is the chunk; top-left is a prefill over the first nq keys; another offset is
    not understood. Each gives eager's output."""
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16)
    backend = MInferenceBackend(OPTS, use_inductor=False)
    model = _OneLayer(_ExplicitMask(offset))
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(q, k, v)
        ref = model(q, k, v)
    (site,) = backend.reports[0].sites
    assert site.mask.kind == kind, site.mask.reason
    if offset == 3:
        assert site.action == "dense" and site.reason.startswith("mask not understood: mask probe:"), site.reason
    else:
        assert site.action == "sparse" and site.node.target is SPARSE, site.reason
    assert counters["mi_compile"]["rewritten_top_left"] == (offset == 0)
    assert counters["mi_compile"]["rewritten_sparse"] == (offset != 3)
    _assert_close(out, ref)


# -- end to end: compiled chunk against eager ------------------------------------------------------

@pytest.mark.parametrize("family,padded,dynamic", [("llama", False, None), ("llama", True, True),
                                                   ("qwen2", False, True), ("qwen2", True, None)])
def test_chunk_is_rewritten_and_matches_eager(family, padded, dynamic):
    model = tiny_model(family, num_layers=LAYERS)
    batch = 2 if padded else 1
    ref = _continue(model, model, batch=batch, padded=padded)
    backend = mi_compile.backend(OPTS)
    out = _continue(model, torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic),
                    batch=batch, padded=padded)
    (report,) = backend.reports
    assert len(_sparse_nodes(report)) == LAYERS, mi_compile.debug.format_table(report.sites)
    # (Dynamo may trace a dynamic graph twice, restarting its analysis: counters add up)
    assert counters["mi_compile"]["rewritten_sparse"] >= LAYERS and counters["mi_compile"]["left_dense"] == 0
    assert {s.mask.kind for s in report.sites} == {"causal_bottom_right+padding" if padded else "causal_bottom_right"}
    _assert_close(out, ref)


def test_chunk_with_the_config_length_matches_eager_through_inductor():
    """A vertical-slash config stating its ``length``: the compiled chunk call carries it and the
    op scales the chunk's columns (4096 -> 256 at 150 of 4096 keys), still covering every key
    here, so the logits are eager's."""
    model = tiny_model("qwen2", num_layers=LAYERS)
    ref = _continue(model, model)
    config = {"length": 4096, "default": {"pattern": "vertical_slash", "vertical": 4096, "slash": 4096}}
    backend = mi_compile.backend({"config": config, "min_seq_len": 0})
    out = _continue(model, torch.compile(model, backend=backend, fullgraph=True, dynamic=True))
    (report,) = backend.reports
    assert [s.node.args[9:] for s in _sparse_nodes(report)] == [(4096,)] * LAYERS
    _assert_close(out, ref)


def test_prefill_then_chunks_of_other_lengths_one_graph_each():
    """A compiled prefill from an empty cache and compiled chunks are different graphs (the
    cache's tensors are inputs of the second); both rewritten, both eager's; chunks of new
    lengths reuse the dynamic chunk graph."""
    model = tiny_model("llama", num_layers=LAYERS)
    backend = mi_compile.backend(OPTS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for seed, (past, chunk) in enumerate(((80, 70), (96, 66), (70, 90))):
        ref = _continue(model, model, past=past, chunk=chunk, seed=seed)
        out = _continue(model, compiled, past=past, chunk=chunk, seed=seed, prefill=compiled)
        _assert_close(out, ref)
    kinds = [{s.mask.kind for s in r.sites} for r in backend.reports]
    assert kinds == [{"causal"}, {"causal_bottom_right"}], kinds
    assert all(r.rewritten == LAYERS for r in backend.reports)


def test_chunks_split_from_a_prompt_reuse_the_prompt_graph():
    """A whole prompt, then the same prompt in pieces of ``ids.split``: with ``standard_strides``
    on each piece and ``contiguous_cache`` after each, the first piece (no cache yet) runs on
    the whole prompt's graph and the later ones on one chunk graph: two graphs in all, the
    logits eager's."""
    model = tiny_model("llama", num_layers=LAYERS)
    backend = mi_compile.backend(OPTS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    ids = _tokens(1, 4 * CHUNK, 5)

    def chunks(run):
        cache = DynamicCache(config=model.config)
        logits = []
        for piece in ids.split(CHUNK, dim=1):
            logits.append(run(mi_compile.standard_strides(piece), past_key_values=cache, use_cache=True).logits)
            mi_compile.contiguous_cache(cache)
        return logits

    with torch.no_grad():
        compiled(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        got, want = chunks(compiled), chunks(model)
    assert [{s.mask.kind for s in r.sites} for r in backend.reports] == [{"causal"}, {"causal_bottom_right"}]
    for g, w in zip(got, want):
        _assert_close(g, w)


def test_contiguous_cache_copies_views_and_leaves_a_static_cache():
    model = tiny_model("llama", num_layers=LAYERS)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_tokens(1, 8, 1), past_key_values=cache, use_cache=True)
    for layer in cache.layers:      # as a compiled prefill leaves them: [B, S, H, D] storage, transposed
        layer.keys = layer.keys.transpose(1, 2).contiguous().transpose(1, 2)
    views = [layer.keys for layer in cache.layers]
    assert all(v.stride() != torch.empty(v.shape).stride() for v in views)
    mi_compile.contiguous_cache(cache)
    for layer, v in zip(cache.layers, views):
        assert torch.equal(layer.keys, v) and layer.keys.stride() == torch.empty(v.shape).stride()
    kept = [layer.keys for layer in cache.layers]
    assert all(a is layer.keys for a, layer in zip(kept, mi_compile.contiguous_cache(cache).layers))
    copied = [layer.keys for layer in mi_compile.contiguous_cache(cache, copy=True).layers]
    assert all(c is not k and torch.equal(c, k) for c, k in zip(copied, kept))
    static = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(_tokens(1, 8, 1), past_key_values=static, use_cache=True)
    held = [layer.keys for layer in static.layers]
    mi_compile.contiguous_cache(static, copy=True)
    assert all(h is layer.keys for h, layer in zip(held, static.layers))


@pytest.mark.parametrize("shape,view", [((1, 9), lambda t: t.split(3, dim=1)[1]), ((4, 6), lambda t: t[:, 2:5]),
                                        ((2, 3, 4), lambda t: t.transpose(0, 1))])
def test_standard_strides_copies_only_other_strides(shape, view):
    t = torch.arange(torch.Size(shape).numel()).reshape(shape)
    assert mi_compile.standard_strides(t) is t
    v = view(t)
    got = mi_compile.standard_strides(v)
    assert got is not v and torch.equal(got, v)
    assert got.stride() == torch.empty(got.shape).stride()


def test_generate_compiles_one_graph_for_prefill_and_one_for_decode():
    """``generate`` after ``model.compile``: the prefill's K / V go into the cache contiguous
    (``contiguous_cache_outputs``), so the decode steps run on one graph (three graphs when the
    prefill left views: the first decode step's graph recompiles for the second's cache)."""
    model = tiny_model("llama", num_layers=LAYERS)
    ids = _tokens(1, PAST, 0)
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    backend = mi_compile.backend(OPTS)
    model.compile(backend=backend, dynamic=True)
    try:
        with torch.no_grad():
            compiled = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    finally:
        model._compiled_call_impl = None
    assert compiled.tolist() == eager.tolist()
    assert [[s.action for s in r.sites] for r in backend.reports] == [["sparse"] * LAYERS, ["dense"] * LAYERS]
    # K and V of every rewritten prefill call (each time the passes ran on that graph)
    assert counters["mi_compile"]["contiguous_cache_outputs"] == 2 * counters["mi_compile"]["rewritten_sparse"] > 0


def test_prefill_without_a_cache_returns_no_kv_to_make_contiguous():
    model = tiny_model("llama", num_layers=LAYERS)
    backend = mi_compile.backend(OPTS)
    with torch.no_grad():
        torch.compile(model, backend=backend)(_tokens(1, PAST, 0), use_cache=False)
    assert backend.reports[0].rewritten == LAYERS
    assert counters["mi_compile"]["contiguous_cache_outputs"] == 0


def test_decode_step_after_a_chunk_stays_dense():
    model = tiny_model("llama", num_layers=LAYERS)
    backend = mi_compile.backend(OPTS)
    compiled = torch.compile(model, backend=backend)
    cache_e, cache_c = DynamicCache(config=model.config), DynamicCache(config=model.config)
    ids, nxt = _tokens(1, PAST, 0), _tokens(1, 1, 1)
    with torch.no_grad():
        model(ids, past_key_values=cache_e)
        model(ids, past_key_values=cache_c)
        ref = model(nxt, past_key_values=cache_e).logits
        out = compiled(nxt, past_key_values=cache_c).logits
    (report,) = backend.reports
    assert report.rewritten == 0
    assert {s.reason for s in report.sites} == {"decode step (one query token)"}
    _assert_close(out, ref)


def test_generate_turns_over_a_cached_document():
    """Prefill a document once, then two question turns by ``generate`` on the same cache
    (each turn's question is a chunk over the cache, then decode steps): greedy tokens equal
    eager's."""
    model = tiny_model("llama", num_layers=LAYERS)
    doc, questions = _tokens(1, 96, 0), [_tokens(1, 66, 1), _tokens(1, 70, 2)]
    backend = mi_compile.backend(OPTS)

    def turns(compiled: bool):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(doc, past_key_values=cache)
            if compiled:
                model.compile(backend=backend, dynamic=True)
            try:
                ids, answers = doc, []
                for q in questions:
                    ids = torch.cat([ids, q], 1)
                    ids = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False,
                                         pad_token_id=0)
                    answers.append(ids[:, -4:])
            finally:
                model._compiled_call_impl = None
        return answers

    eager, compiled = turns(False), turns(True)
    assert [a.tolist() for a in compiled] == [a.tolist() for a in eager]
    chunk_sites = [s for r in backend.reports for s in r.sites if s.mask and s.mask.chunk and s.q_len != "1"]
    assert chunk_sites and all(s.action == "sparse" for s in chunk_sites)
    assert counters["mi_compile"]["rewritten_sparse"] >= LAYERS


def test_generate_prefills_a_prompt_in_chunks():
    """``generate(..., prefill_chunk_size=C)`` (transformers' chunked prefill): the first chunk
    is a causal prefill, every later one a chunk over the cache, all sparse; greedy tokens equal
    eager's chunked and unchunked ones."""
    model = tiny_model("llama", num_layers=LAYERS)
    ids = _tokens(1, 300, 0)
    backend = mi_compile.backend(OPTS)

    def generate(**kwargs):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)[:, -4:]

    whole, eager = generate(), generate(prefill_chunk_size=128)
    model.compile(backend=backend, dynamic=True)
    try:
        compiled = generate(prefill_chunk_size=128)
    finally:
        model._compiled_call_impl = None
    assert compiled.tolist() == eager.tolist() == whole.tolist()
    kinds = [{s.mask.kind for s in r.sites} for r in backend.reports]
    assert kinds[0] == {"causal"} and {"causal_bottom_right"} in kinds      # 128, then 128 and 44 over the cache
    prefill_sites = [s for r in backend.reports for s in r.sites if s.q_len != "1"]
    assert prefill_sites and all(s.action == "sparse" for s in prefill_sites)
    assert counters["mi_compile"]["mask_causal_bottom_right"] >= LAYERS


def test_generate_in_chunks_compiles_three_graphs_without_duck_sizing():
    """The README's recipe: with Dynamo's duck sizing off, ``generate(prefill_chunk_size=C)``
    compiles the first chunk, the later chunks and the decode steps once each."""
    import torch.fx.experimental._config as fx_config

    model = tiny_model("llama", num_layers=LAYERS)
    backend = mi_compile.backend(OPTS)
    model.compile(backend=backend, dynamic=True)
    try:
        with fx_config.patch(use_duck_shape=False), torch.no_grad():
            model.generate(_tokens(1, 300, 0), max_new_tokens=4, do_sample=False, pad_token_id=0,
                           prefill_chunk_size=128)
    finally:
        model._compiled_call_impl = None
    kinds = [sorted({s.mask.kind for s in r.sites}) for r in backend.reports]
    assert kinds == [["causal"], ["causal_bottom_right"], ["none"]], kinds


def test_explain_tells_what_a_chunk_is():
    model = tiny_model("qwen2", num_layers=LAYERS)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_tokens(1, 20, 0), past_key_values=cache)
    table = mi_compile.explain(model, _tokens(1, 8, 1), past_key_values=cache, options=OPTS).table()
    assert "causal_bottom_right" in table
    assert "a prefill chunk that continues a cache" in table
    assert "config length" not in table
    with_length = {**OPTS, "config": {**COVER, "length": 4096}}
    table = mi_compile.explain(model, _tokens(1, 8, 1), past_key_values=cache, options=with_length).table()
    assert "config length 4096: a chunk with fewer keys keeps nk / length" in table


def test_explain_cli_past(capsys):
    from mi_compile.__main__ import main

    main(["explain", "--model", "tiny:llama", "--length", "8", "--past", "20", "--padded", "--batch", "2",
          "--min-seq-len", "0"])
    out = capsys.readouterr().out
    assert "causal_bottom_right+padding" in out and "a prefill chunk that continues a cache" in out
