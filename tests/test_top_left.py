"""Causal attention aligned top-left over more keys than queries (query ``r`` sees keys ``0..r``).

PyTorch's ``is_causal=True`` with ``nq < nk`` means that, and so does the mask transformers
builds for a ``StaticCache`` prefill (every slot of the cache, no offset; the padding mask padded
with False to the slots). Either is exactly a causal prefill over the first ``nq`` keys: the
passes classify it ``causal_top_left`` (``+padding``) and rewrite it to
``mi_compile::sparse_attention`` over K/V (and the padding mask) narrowed to those keys, asserted
by op target and by the ``rewritten_top_left`` counter; the outputs must be eager's (the config's
heads cover every key). Beside each positive case a negative one stays dense with its reason: a
top-left sliding window, more queries than keys.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import StaticCache

import mi_compile
from mi_compile.backend import MInferenceBackend
from mi_compile.config import load_config
from mi_compile.models import tiny_model
from mi_compile.options import BackendOptions
from mi_compile.passes import run_passes
from mi_compile.passes.find_attention import SDPA_TARGETS

SPARSE = torch.ops.mi_compile.sparse_attention.default
# a_shape whose local window is longer than every sequence here: every causal key is seen, so
# the op's sparse path must give eager's output; min_seq_len 0 sends these short lengths there
COVER = {"format": "mi-compile/v1", "default": {"pattern": "a_shape", "sink": 4, "local": 4096}}
OPTS = {"config": COVER, "min_seq_len": 0}
LENGTHS = ((70, 100), (50, 90), (66, 80))     # (nq, nk): more than one 64-query block


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _repeat_kv(x, groups):
    """transformers' ``repeat_kv`` (the passes undo it)."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


class _Attention(torch.nn.Module):
    """SDPA of 4 query heads over 2 KV heads. ``form``: ``is_causal`` (PyTorch's flag) or
    ``mask`` (built as transformers builds a static cache's prefill mask, query row 0 at key
    ``offset``, ``& padding[b, kv]`` when given, ``& window`` when set); ``gqa``: ``repeat_kv``
    or ``enable_gqa``."""

    def __init__(self, form="mask", gqa="repeat_kv", window=0, offset=0):
        super().__init__()
        self.form, self.gqa, self.window, self.offset = form, gqa, window, offset

    def forward(self, q, k, v, padding=None):
        native = self.gqa == "enable_gqa"
        if not native:
            k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
        if self.form == "is_causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=native)
        nq, nk = q.shape[2], k.shape[2]
        q_idx = (torch.arange(nq) + self.offset)[None, None, :, None]
        kv_idx = (torch.arange(nk) + 0)[None, None, None, :]
        mask = kv_idx <= q_idx
        if self.window:
            mask = mask & (q_idx - kv_idx < self.window)
        if padding is not None:
            b_idx = torch.arange(q.shape[0])[:, None, None, None]
            mask = mask & padding[b_idx, kv_idx]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(q.shape[0], -1, nq, nk),
                                              enable_gqa=native)


class _Model(torch.nn.Module):
    """One decoder "layer" (``layers.0``: the passes read the layer index from the module path)."""

    def __init__(self, attention):
        super().__init__()
        self.layers = torch.nn.ModuleList([attention])

    def forward(self, *args):
        return self.layers[0](*args)


def _inputs(nq, nk, padded=False, seed=0, batch=None):
    """q ``[b, 4, nq, 16]``, k/v ``[b, 2, nk, 16]``; padded: batch 2 and a static cache's padding
    mask (the prompt's attention_mask, row 0 left-padded by 9, then False up to the slots)."""
    g = torch.Generator().manual_seed(seed)
    b = batch or (2 if padded else 1)
    q = torch.randn(b, 4, nq, 16, generator=g)
    k, v = torch.randn(b, 2, nk, 16, generator=g), torch.randn(b, 2, nk, 16, generator=g)
    if not padded:
        return q, k, v
    padding = torch.zeros(b, nk, dtype=torch.bool)
    padding[:, :nq] = True
    padding[0, :9] = False
    return q, k, v, padding


def _mark_lengths(args):
    for t in args[:3]:
        torch._dynamo.mark_dynamic(t, 2)
    if len(args) > 3:
        torch._dynamo.mark_dynamic(args[3], 1)


def _run(model, backend, shapes, padded, lengths=LENGTHS):
    """Each (nq, nk) of ``lengths`` through ``torch.compile(model, backend)`` (``shapes``:
    ``static`` the first only, ``automatic`` all (a dynamic graph from the second),
    ``marked`` all with the lengths marked dynamic); returns [(args, compiled, eager)]."""
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = []
    for seed, (nq, nk) in enumerate(lengths[:1] if shapes == "static" else lengths):
        args = _inputs(nq, nk, padded, seed)
        if shapes == "marked":
            _mark_lengths(args)
        with torch.no_grad():
            out.append((args, compiled(*args), model(*args)))
    return out


def _assert_close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def _no_visible_key(args):
    """``[b, 1, nq, 1]``: query rows whose top-left causal keys are all padding."""
    q, padding = args[0], args[3]
    nq = q.shape[2]
    allowed = torch.ones(nq, nq, dtype=torch.bool).tril()[None] & padding[:, None, :nq]
    return ~allowed.any(-1)[:, None, :, None]


# -- rewritten: by op target and counters, and eager's output ----------------------------------------

@pytest.mark.parametrize("shapes", ["static", "automatic", "marked"])
@pytest.mark.parametrize("form,padded,gqa", [("is_causal", False, "enable_gqa"), ("is_causal", False, "repeat_kv"),
                                             ("mask", False, "repeat_kv"), ("mask", True, "repeat_kv"),
                                             ("mask", True, "enable_gqa")])
def test_top_left_is_a_prefill_over_the_first_keys(form, padded, gqa, shapes):
    model = _Model(_Attention(form, gqa))
    backend = MInferenceBackend(OPTS, use_inductor=False)
    runs = _run(model, backend, shapes, padded)
    kind = "causal_top_left+padding" if padded else "causal_top_left"
    sites = [s for r in backend.reports for s in r.sites]
    assert len(backend.reports) == (1 if shapes in ("static", "marked") else 2)
    assert [(s.mask.kind, s.action, s.node.target) for s in sites] == [(kind, "sparse", SPARSE)] * len(sites), \
        [s.reason for s in sites]
    assert all(s.gqa == ("native" if gqa == "enable_gqa" else "undone") for s in sites)
    assert counters["mi_compile"]["rewritten_top_left"] == len(sites)
    assert counters["mi_compile"]["rewritten_sparse"] == len(sites) and counters["mi_compile"]["left_dense"] == 0
    assert "a prefill over the first" in sites[0].mask.how
    if shapes != "static":                  # the lengths of the (last) graph are symbolic
        assert not sites[-1].q_len.isdigit() and not sites[-1].kv_len.isdigit()
    for report in backend.reports:
        call = next(iter(report.sites)).node
        assert call.args[1].target == "narrow" and call.args[2].target == "narrow"     # K, V: first nq keys
        assert (call.args[5].target == "narrow") if padded else call.args[5] is None
    for args, out, ref in runs:
        if padded:
            # A query row with no visible key (row 0's left padding): the op gives 0 there, as for
            # a causal+padding prefill (dense_attention and the sparse path alike); eager SDPA
            # gives 0 too on torch 2.11/2.13 CPU (NaN on some backends), so only valid rows are compared.
            empty = _no_visible_key(args)
            assert empty.any() and bool((out.masked_select(empty.expand_as(out)) == 0).all())
            out, ref = out.masked_fill(empty, 0), ref.masked_fill(empty, 0)
        _assert_close(out, ref)


def test_padding_rows_as_the_causal_padding_prefill_gives_them():
    """Every row, padding rows included, equals the ordinary causal+padding prefill over the first
    nq keys (K/V and padding cut by hand), compiled through the same backend."""
    model = _Model(_Attention("mask"))
    q, k, v, padding = _inputs(70, 100, padded=True)
    backend = MInferenceBackend(OPTS, use_inductor=False)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(q, k, v, padding)
        torch._dynamo.reset()
        prefill = torch.compile(model, backend=backend)(q, k[:, :, :70], v[:, :, :70], padding[:, :70].clone())
    kinds = [s.mask.kind for r in backend.reports for s in r.sites]
    assert kinds == ["causal_top_left+padding", "causal+padding"]
    assert all(s.action == "sparse" for r in backend.reports for s in r.sites)
    torch.testing.assert_close(out, prefill, rtol=0, atol=0)
    assert bool((out[0, :, :9] == 0).all())


@pytest.mark.parametrize("form,padded", [("is_causal", False), ("mask", True)])
def test_top_left_through_inductor_with_dynamic_lengths(form, padded):
    model = _Model(_Attention(form))
    backend = mi_compile.backend(OPTS)
    runs = _run(model, backend, "automatic", padded)
    assert all(s.action == "sparse" for r in backend.reports for s in r.sites)
    assert counters["mi_compile"]["rewritten_top_left"] >= 2    # a static graph, then a dynamic one
    for args, out, ref in runs:
        valid = ~_no_visible_key(args) if padded else torch.ones((), dtype=torch.bool)
        _assert_close(out * valid, ref * valid)


def test_pass_level_rewrite_narrows_to_the_query_length():
    """The graph the passes leave: no SDPA, the op reads ``k.narrow(2, 0, q.size(2))`` (the
    query's symbolic length) and the padding mask's first nq columns."""
    graphs = []
    model = _Model(_Attention("mask"))
    args = _inputs(70, 100, padded=True)
    _mark_lengths(args)
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, _: graphs.append(gm) or gm.forward)(*args)
    (gm,) = graphs
    report = run_passes(gm, BackendOptions.from_user(OPTS), load_config(COVER))
    assert [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS] == []
    (call,) = gm.graph.find_nodes(op="call_function", target=SPARSE)
    assert report.rewritten == 1 and counters["mi_compile"]["rewritten_top_left"] == 1
    key, padding = call.args[1], call.args[5]
    assert key.target == "narrow" and key.args[1:3] == (2, 0)
    length = key.args[3]
    assert length.op == "call_method" and length.target == "size" and length.args == (call.args[0], 2)
    assert padding.target == "narrow" and padding.args[1:] == (1, 0, length)


def test_explain_shows_top_left_as_sparse_and_how():
    result = mi_compile.explain(_Model(_Attention("mask")), *_inputs(70, 100, padded=True), options=OPTS)
    table = result.table()
    assert "causal_top_left+padding" in table and "1 attention call(s): 1 sparse, 0 dense" in table
    assert "the same as a prefill over the first nq keys, which a sparse call runs" in table
    assert "probe at 70 queries over 100 keys" in table and "causal aligned top-left" in table


# -- a real model: transformers' StaticCache prefill ---------------------------------------------------

@pytest.mark.parametrize("family,dynamic", [("llama", None), ("qwen2", True)])
def test_static_cache_prefill_is_rewritten_and_matches_eager(family, dynamic):
    """A left-padded batch prefilled into a fresh StaticCache: the mask covers every slot of
    the cache, causal aligned top-left (``+ padding``). Sparse, and eager's logits on real
    tokens, at two prompt lengths (the second one through a dynamic graph)."""
    model = tiny_model(family, num_layers=2)
    backend = mi_compile.backend(OPTS)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)
    for n in (70, 66):
        ids = torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(n))
        am = torch.ones(2, n, dtype=torch.long)
        am[0, :9] = 0
        with torch.no_grad():
            ref = model(ids, attention_mask=am, past_key_values=StaticCache(config=model.config, max_cache_len=100)).logits
            out = compiled(ids, attention_mask=am,
                           past_key_values=StaticCache(config=model.config, max_cache_len=100)).logits
        valid = am.bool()
        _assert_close(out[valid], ref[valid])
    sites = [s for r in backend.reports for s in r.sites]
    assert sites and all(s.action == "sparse" and s.mask.kind == "causal_top_left+padding" for s in sites), \
        mi_compile.debug.format_table(sites)
    assert counters["mi_compile"]["rewritten_top_left"] >= len(sites)
    assert any(not s.q_len.isdigit() for s in sites)


# -- left dense, with the reason -------------------------------------------------------------------

def test_top_left_sliding_window_stays_dense_with_its_reason():
    model = _Model(_Attention("mask", window=8))
    backend = MInferenceBackend(OPTS, use_inductor=False)
    runs = _run(model, backend, "automatic", padded=False)
    sites = [s for r in backend.reports for s in r.sites]
    assert len(sites) == 2 and all(s.action == "dense" and s.mask.kind == "unknown" for s in sites)
    assert all(s.reason.startswith("causal aligned top-left with a sliding window (8)") for s in sites), \
        [s.reason for s in sites]
    assert counters["mi_compile"]["rewritten_top_left"] == 0 and counters["mi_compile"]["rewritten_sparse"] == 0
    for _, out, ref in runs:
        _assert_close(out, ref)


@pytest.mark.parametrize("form", ["is_causal", "mask"])
def test_more_queries_than_keys_stay_dense(form):
    """With symbolic lengths of their own, the traced input decides ``nq <= nk`` and a guard
    holds it: an input with more queries than keys recompiles and stays dense (top-left over
    fewer keys than queries is no prefill); a shorter query again reuses the sparse graph."""
    model = _Model(_Attention(form))
    backend = MInferenceBackend(OPTS, use_inductor=False)
    runs = _run(model, backend, "marked", padded=False, lengths=((70, 100), (100, 70), (66, 80)))
    assert len(backend.reports) == 2
    first, second = (r.sites[0] for r in backend.reports)
    assert first.action == "sparse" and first.mask.kind == "causal_top_left"
    assert second.action == "dense" and "exceeds key length" in second.reason, second.reason
    assert counters["mi_compile"]["rewritten_top_left"] == 1
    for _, out, ref in runs:
        _assert_close(out, ref)


def test_static_more_queries_than_keys_stays_dense():
    model = _Model(_Attention("is_causal"))
    backend = MInferenceBackend(OPTS, use_inductor=False)
    ((_, out, ref),) = _run(model, backend, "static", padded=False, lengths=((100, 70),))
    (site,) = backend.reports[0].sites
    assert site.action == "dense" and site.reason == "query length 100 != key length 70 (not a prefill)"
    assert counters["mi_compile"]["rewritten_top_left"] == 0
    _assert_close(out, ref)
