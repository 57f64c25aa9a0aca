"""Prefill chunks that continue a ``StaticCache`` (``nq`` new queries over all ``max_cache_len`` slots).

transformers offsets the chunk's queries by the cache's filled length ``c``, a runtime 0-d
tensor (``cumulative_length``), and masks every slot, filled or not: query ``r`` sees slot ``j``
iff ``j <= c + r`` (``& padding[b, j]``). The classifier proves that by giving ``c`` several
values on the probe (``causal_static_offset``); the rewrite gathers K/V so the filled slots come
last and runs ``mi_compile::sparse_attention`` as for a ``DynamicCache`` chunk (asserted by op
target and the ``rewritten_static_chunk`` counter). Tiny random Llama / Qwen2 models (fp32,
CPU), the config covering every key: the compiled logits must be eager's, also for consecutive
chunks through one compiled graph (``c`` changes, the graph does not) and through ``generate``.
Beside them, masks with another offset, or that read the offset after it was written, stay
dense with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import StaticCache

import mi_compile
from mi_compile.backend import MInferenceBackend
from mi_compile.models import tiny_model
from test_chunked_passes import (CHUNK, LAYERS, OPTS, PAST, SPARSE, _assert_close, _classified, _continue,
                                 _OneLayer, _sparse_nodes, _tokens, traced_chunk_graph)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
OLD_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13)
# torch 2.11's C++ Inductor fails to compile a padded dynamic-shape StaticCache chunk, with or
# without the passes (the same kernel of transformers' own code)
INDUCTOR_211 = pytest.mark.xfail(OLD_TORCH, strict=True, raises=torch._inductor.exc.InductorError,
                                 reason="torch 2.11 Inductor (CPU) cannot compile this graph, passes or not")


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("padded", [False, True])
def test_static_chunk_mask_is_causal_over_the_filled_slots(padded, dynamic):
    gm = traced_chunk_graph(batch=2 if padded else 1, padded=padded, dynamic=dynamic, cache_cls=StaticCache)
    sites = _classified(gm)
    kind = "causal_static_offset+padding" if padded else "causal_static_offset"
    assert [s.mask.kind for s in sites] == [kind] * LAYERS, [s.mask.reason for s in sites]
    assert all(s.mask.static_chunk and not s.mask.chunk and not s.mask.top_left for s in sites)
    assert all((s.mask.padding_source is not None) == padded for s in sites)
    for site in sites:
        offset = site.mask.offset_source
        assert offset.op == "placeholder" and "cumulative_length" in str(offset.target)
        assert "query r sees slots 0..c + r" in site.mask.how and "c = 0, " in site.mask.how
    assert counters["mi_compile"][f"mask_{kind}"] == LAYERS


@pytest.mark.parametrize("family,padded,dynamic,inductor", [
    ("llama", False, None, True), pytest.param("llama", True, True, True, marks=INDUCTOR_211),
    ("llama", True, True, False), ("qwen2", True, None, False), ("qwen2", False, True, False)])
def test_static_chunk_is_rewritten_and_matches_eager(family, padded, dynamic, inductor):
    model = tiny_model(family, num_layers=LAYERS)
    batch = 2 if padded else 1
    ref = _continue(model, model, batch=batch, padded=padded, cache_cls=StaticCache)
    backend = MInferenceBackend(OPTS, use_inductor=inductor)
    out = _continue(model, torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic),
                    batch=batch, padded=padded, cache_cls=StaticCache)
    (report,) = backend.reports
    # torch 2.11's Dynamo leaves layer 0's head count symbolic in a dynamic graph (that
    # call stays dense, with the reason, as any call with symbolic heads does)
    symbolic_heads = [s for s in report.sites if s.reason == "head counts or head_dim are symbolic"]
    assert not symbolic_heads or (OLD_TORCH and dynamic)
    sparse = LAYERS - len(symbolic_heads)
    assert len(_sparse_nodes(report)) == sparse, mi_compile.debug.format_table(report.sites)
    assert {s.mask.kind for s in report.sites} == {"causal_static_offset+padding" if padded
                                                   else "causal_static_offset"}
    # (Dynamo may trace a dynamic graph twice, restarting its analysis: counters add up)
    assert counters["mi_compile"]["rewritten_static_chunk"] >= sparse
    assert counters["mi_compile"]["rewritten_static_chunk"] == counters["mi_compile"]["rewritten_sparse"]
    assert counters["mi_compile"]["left_dense"] == 0 or symbolic_heads
    # every key the op reads went through the rotation: K/V gathered along the slots
    for site in _sparse_nodes(report):
        args = site.node.args
        assert all(a.op == "call_method" and a.target == "index_select" for a in (args[1], args[2]))
    _assert_close(out, ref)


def _chunks(model, run, chunks, batch=1, padded=False, past=PAST, chunk=CHUNK):
    """Prefill ``past`` tokens eagerly into a fresh ``StaticCache``, then ``chunks`` chunks of
    ``chunk`` tokens through ``run``; returns each chunk's logits (the last row of batch 0
    left-padded by 9 when ``padded``)."""
    cache = StaticCache(config=model.config, max_cache_len=past + chunks * chunk + 16)
    mask = None
    if padded:
        mask = torch.ones(batch, past, dtype=torch.long)
        mask[0, :9] = 0
    outs = []
    with torch.no_grad():
        model(_tokens(batch, past, 0), past_key_values=cache, **({} if mask is None else {"attention_mask": mask}))
        for i in range(chunks):
            if mask is not None:
                mask = torch.cat([mask, torch.ones(batch, chunk, dtype=torch.long)], 1)
            outs.append(run(_tokens(batch, chunk, i + 1), past_key_values=cache,
                            **({} if mask is None else {"attention_mask": mask})).logits)
    return outs


@pytest.mark.parametrize("padded,dynamic", [(False, None), pytest.param(True, True, marks=INDUCTOR_211)])
def test_consecutive_chunks_share_one_graph(padded, dynamic):
    """Three chunks after a prefill: the cache's length (a tensor) changes between the calls,
    the compiled graph does not (no recompile), and every chunk is eager's."""
    model = tiny_model("llama", num_layers=LAYERS)
    batch = 2 if padded else 1
    refs = _chunks(model, model, 3, batch=batch, padded=padded)
    backend = mi_compile.backend(OPTS)
    outs = _chunks(model, torch.compile(model, backend=backend, dynamic=dynamic), 3, batch=batch, padded=padded)
    for out, ref in zip(outs, refs):
        _assert_close(out, ref)
    (report,) = backend.reports
    assert report.rewritten == LAYERS and all(s.mask.static_chunk for s in report.sites)


class _RuntimeOffset(torch.nn.Module):
    """SDPA under a mask built as transformers builds a static cache's chunk mask from a runtime
    offset tensor: query row ``r`` sees key ``j`` iff ``j <= offset + r + shift``; ``write``:
    the offset is written in place (as the cache's length is) before the mask reads it."""

    def __init__(self, shift=0, write=False):
        super().__init__()
        self.shift, self.write = shift, write

    def forward(self, q, k, v, offset):
        if self.write:
            offset.add_(0)
        nq, nk = q.shape[2], k.shape[2]
        q_idx = (torch.arange(nq) + offset.to(q.device) + self.shift)[None, None, :, None]
        kv_idx = (torch.arange(nk) + 0)[None, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(kv_idx <= q_idx).expand(q.shape[0], -1, nq, nk))


class _Layer(_OneLayer):
    def forward(self, q, k, v, offset):
        return self.layers[0](q, k, v, offset)


@pytest.mark.parametrize("shift,write,offset,reason", [
    (0, False, torch.tensor(20), ""),
    (-1, False, torch.tensor(20), "not proven causal over the filled slots: mask is not causal"),
    (1, False, torch.tensor(20), "not proven causal over the filled slots: mask lets query"),
    (0, True, torch.tensor(20), "writes runtime tensor"),
    (0, False, torch.arange(20, 90), "is not a 0-d integer cache length"),
])
def test_runtime_offset_masks(shift, write, offset, reason):
    """``j <= c + r`` is rewritten; another offset, an offset written before the mask reads it
    and a position tensor rather than a length stay dense with the reason. Each gives eager's
    output (70 queries at 20..89 over 100 keys)."""
    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16)
    backend = MInferenceBackend(OPTS, use_inductor=False)
    model = _Layer(_RuntimeOffset(shift, write))
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(q, k, v, offset.clone())
        ref = model(q, k, v, offset.clone())
    (site,) = backend.reports[0].sites
    if not reason:
        assert site.mask.kind == "causal_static_offset" and site.action == "sparse", site.reason
        assert site.node.target is SPARSE and counters["mi_compile"]["rewritten_static_chunk"] == 1
    else:
        assert site.mask.kind == "unknown" and site.action == "dense"
        assert site.reason.startswith("static cache: query positions come from runtime tensor"), site.reason
        assert reason in site.reason, site.reason
        assert counters["mi_compile"]["rewritten_sparse"] == 0
    _assert_close(out, ref)


def test_generate_with_a_static_cache(generate_eager_and_compiled):
    """``generate`` with a static cache (``cache_implementation="static"``): the prompt's
    prefill from an empty cache (sparse) and decode steps, no continuation chunk. ``generate``
    over a ``StaticCache`` that holds a document does run the question as a chunk, but under a
    4D mask ``generate`` builds outside the model (for any compileable cache): an input of the
    compiled graph, data the passes cannot prove causal, so that chunk stays dense with the
    reason (``mi_compile.masks_in_forward`` moves the mask into the forward: the next test).
    Tokens and logits are eager's either way."""
    model = tiny_model("llama", num_layers=LAYERS, max_position_embeddings=512)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    backend = mi_compile.backend(OPTS)
    ref, out = generate_eager_and_compiled(model, backend, _tokens(1, 70, 0), cache_implementation="static", **kwargs)
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    prefill = [s for r in backend.reports for s in r.sites if s.q_len != "1"]
    assert prefill and all(s.action == "sparse" for s in prefill)

    doc, question = _tokens(1, 96, 1), _tokens(1, 70, 2)
    backend = mi_compile.backend(OPTS)
    results = []
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=200)
        with torch.no_grad():
            model(doc, past_key_values=cache)
            if compiled:
                model.compile(backend=backend, dynamic=True)
            try:
                results.append(model.generate(torch.cat([doc, question], 1), past_key_values=cache, **kwargs))
            finally:
                model._compiled_call_impl = None
    ref, out = results
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    chunk_sites = [s for r in backend.reports for s in r.sites if s.q_len != "1"]
    assert chunk_sites
    for site in chunk_sites:
        assert site.action == "dense" and "mask probe: the mask is an input of the compiled graph" in site.reason, site.reason


@pytest.mark.parametrize("padded", [False, True])
def test_generate_with_masks_in_forward_runs_the_static_chunk_sparse(padded):
    """With ``mi_compile.masks_in_forward(model)`` ``generate`` passes its 2D mask to the forward,
    which builds the 4D one inside the compiled graph: the question chunk over a ``StaticCache``
    holding a document is ``causal_static_offset`` and sparse; tokens and logits are eager's
    (left padding included)."""
    model = tiny_model("llama", num_layers=LAYERS, max_position_embeddings=512)
    batch = 2 if padded else 1
    doc, question = _tokens(batch, 96, 1), _tokens(batch, 70, 2)
    mask = torch.ones(batch, 96 + 70, dtype=torch.long)
    if padded:
        mask[1, :9] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    backend = mi_compile.backend(OPTS)
    results = []
    for compiled in (False, True):
        cache = StaticCache(config=model.config, max_cache_len=200)
        with torch.no_grad():
            model(doc, attention_mask=mask[:, :96], past_key_values=cache)
            if compiled:
                model.compile(backend=backend, dynamic=True)
                assert mi_compile.masks_in_forward(model) is model
            try:
                results.append(model.generate(torch.cat([doc, question], 1), attention_mask=mask,
                                              past_key_values=cache, **kwargs))
            finally:
                model._compiled_call_impl = None
                mi_compile.masks_in_forward(model, enable=False)
    ref, out = results
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    chunk_sites = [s for r in backend.reports for s in r.sites if s.q_len != "1"]
    assert chunk_sites and all(s.action == "sparse" for s in chunk_sites), [s.reason for s in chunk_sites]
    assert {s.mask.kind for s in chunk_sites} == {"causal_static_offset" + ("+padding" if padded else "")}
    assert counters["mi_compile"]["rewritten_static_chunk"] >= LAYERS
    assert "create_masks_for_generate" not in vars(model)          # restored


def test_masks_in_forward_refuses_models_with_their_own_masks():
    model = tiny_model("llama", num_layers=1)
    mine = lambda **kw: kw["attention_mask"]   # noqa: E731
    model.create_masks_for_generate = mine
    with pytest.raises(ValueError, match="already has a create_masks_for_generate"):
        mi_compile.masks_in_forward(model)
    assert model.create_masks_for_generate is mine
    del model.create_masks_for_generate

    class OwnMasks(type(model)):
        def create_masks_for_generate(self, **kwargs):
            return kwargs["attention_mask"]

    model.__class__ = OwnMasks
    with pytest.raises(ValueError, match="OwnMasks defines its own create_masks_for_generate"):
        mi_compile.masks_in_forward(model)
    assert mi_compile.masks_in_forward(tiny_model("qwen2", num_layers=1), enable=False) is not None   # nothing to undo


def test_explain_tells_what_a_static_chunk_is():
    model = tiny_model("qwen2", num_layers=LAYERS)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(_tokens(1, 20, 0), past_key_values=cache)
    table = mi_compile.explain(model, _tokens(1, 8, 1), past_key_values=cache, options=OPTS).table()
    assert "causal_static_offset" in table and "2 sparse, 0 dense" in table
    assert "a prefill chunk that continues a static cache" in table
    assert "query r sees slots 0..c + r" in table
