"""The backend and its FX passes, on graphs Dynamo traces from real transformers models.

Every test compiles a real (tiny, random-weight) model; nothing here builds FX graphs by hand.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import mi_compile
from mi_compile.models import TINY_FAMILIES, tiny_model
from mi_compile.patterns.spec import HeadPattern

DENSE_CONFIG = {"format": "mi-compile/v1", "default": {"pattern": "dense"}}
# min_seq_len=0 sends even these short test prompts down the sparse op.
DENSE_OPTS = {"config": DENSE_CONFIG, "min_seq_len": 0}
N = 40


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(batch: int, n: int = N, padded: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, n), generator=g)
    if not padded:
        return ids, {}
    am = torch.ones(batch, n, dtype=torch.long)
    am[0, :7] = 0            # left padding
    if batch > 1:
        am[1, n - 5:] = 0    # right padding
    return ids, {"attention_mask": am}


def _valid(ids, kw):
    return kw["attention_mask"].bool() if kw else torch.ones(ids.shape, dtype=torch.bool)


def _eager_logits(model, ids, kw, use_cache):
    with torch.no_grad():
        return model(ids, use_cache=use_cache, **kw).logits


# (family, use_cache, padded): use_cache=False makes transformers build the n x n mask in the
# graph; use_cache=True without padding gives SDPA(is_causal=True, enable_gqa=True) on 5.23.
CASES = [(f, uc, pad) for f in TINY_FAMILIES for uc, pad in ((False, False), (True, False), (False, True))]


@pytest.mark.parametrize("family,use_cache,padded", CASES)
def test_every_attention_call_is_rewritten_and_matches_eager(family, use_cache, padded):
    model = tiny_model(family)
    ids, kw = _inputs(2 if padded else 1, padded=padded)
    ref = _eager_logits(model, ids, kw, use_cache)

    backend = mi_compile.backend(DENSE_OPTS, keep_code=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids, use_cache=use_cache, **kw).logits

    (report,) = backend.reports
    layers = model.config.num_hidden_layers
    assert len(report.sites) == layers
    assert report.rewritten == layers, mi_compile.debug.format_table(report.sites)
    for site in report.sites:
        assert site.mask.kind == ("causal+padding" if padded else "causal")
        assert site.gqa in ("undone", "native")  # 4 query heads over 2 KV heads: K/V never repeated
    before, after = _code(report.before_code), _code(report.after_code)
    assert "scaled_dot_product_attention(" not in after
    assert after.count("torch.ops.mi_compile.sparse_attention.default(") == layers
    if not use_cache or padded:
        assert before.count("scaled_dot_product_attention(") == layers
        assert _has_square_mask(before) and not _has_square_mask(after)
    valid = _valid(ids, kw)
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-4)


def _code(readable: str) -> str:
    """The graph's code without the source-line comments print_readable adds."""
    return "\n".join(line for line in readable.splitlines() if not line.strip().startswith("#"))


def _has_square_mask(code: str) -> bool:
    """transformers' mask ends in ``.expand(b, -1, n, n)`` (the repeat_kv expands have 5 dims);
    any node left that holds an ``n x n`` bool tensor (``b8[b, 1, n, n]``) counts too."""
    import re
    return (re.search(r"\.expand\([^,()]+, -1, (\w+), \1\)", code) is not None
            or re.search(r'"b8\[\w+, \w+, (\w+), \1\]"', code) is not None)


def test_sliding_window_becomes_exact_local_attention():
    """Mistral's sliding window (here 8 tokens, shorter than the prompt) is an A-shape with no sinks."""
    model = tiny_model("mistral", sliding_window=8)
    ids, kw = _inputs(1)
    ref = _eager_logits(model, ids, kw, use_cache=False)
    backend = mi_compile.backend({"min_seq_len": 0})   # default policy: the window overrides it
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
    sites = backend.reports[0].sites
    assert [s.mask.kind for s in sites] == ["sliding_window"] * 2
    assert all(s.mask.window == 8 for s in sites)
    assert all(h == HeadPattern("a_shape", sink=0, local=8) for s in sites for h in s.heads)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_sparse_patterns_change_the_answer_and_stay_finite():
    """With a narrow A-shape the op really computes something else than dense attention."""
    model = tiny_model("llama")
    ids, _ = _inputs(1)
    ref = _eager_logits(model, ids, {}, use_cache=False)
    cfg = {"format": "mi-compile/v1", "default": {"pattern": "a_shape", "sink": 2, "local": 4}}
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options={"config": cfg, "min_seq_len": 0})(
            ids, use_cache=False).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3
    # the first 4 positions see all their keys under a_shape(2, 4): identical to dense there
    torch.testing.assert_close(out[:, :4], ref[:, :4], rtol=1e-4, atol=1e-4)


def test_below_min_seq_len_the_op_is_dense():
    model = tiny_model("llama")
    ids, _ = _inputs(1)
    ref = _eager_logits(model, ids, {}, use_cache=False)
    cfg = {"format": "mi-compile/v1", "default": {"pattern": "a_shape", "sink": 2, "local": 4}}
    with torch.no_grad():
        out = torch.compile(model, backend="minference", options={"config": cfg, "min_seq_len": N + 1})(
            ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_three_lengths_compile_twice_then_never_again():
    """Dynamo compiles static first, then once with a dynamic length; a third length reuses it."""
    model = tiny_model("llama")
    backend = mi_compile.backend(DENSE_OPTS)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for n in (24, 40, 57, 33):
            compiled(torch.randint(0, 128, (1, n)), use_cache=False)
    assert len(backend.reports) == 2
    assert all(r.rewritten == 2 for r in backend.reports)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_generate_with_kv_cache_matches_eager(cache, generate_eager_and_compiled):
    """``model.generate`` with the module compiled in place: prefill through the sparse op,
    decode steps dense. A static cache is written in place (``keys.index_copy_(...)``, result
    unused, read back by the attention): dead-code elimination after the rewrite must keep those
    writes (it once dropped them, and the static-cache prefill attended to an empty cache)."""
    model = tiny_model("llama", max_position_embeddings=256)
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation=cache, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    backend = mi_compile.backend(DENSE_OPTS)
    ref, out = generate_eager_and_compiled(model, backend, ids, **kwargs)
    # logits, not only tokens: this small random model's greedy tokens can survive a prefill
    # that attended to zeros
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    prefill = [s for r in backend.reports for s in r.sites if s.q_len != "1"]
    assert prefill
    for site in prefill:
        # a static-cache prefill: transformers 5.24 attends to the filled part of the buffer
        # with is_causal; 5.17 to the whole preallocated buffer under an explicit mask, causal
        # aligned top-left (run over the first nq keys): rewritten either way
        assert site.action == "sparse", (site.mask.kind, site.reason)


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_padded_batch_generate_matches_eager_every_family(family, cache, generate_eager_and_compiled):
    """The same through every tiny family (Mistral with a sliding window) on a left-padded
    batch of two: the logits of every step equal eager's, whatever the passes decided; a prefill
    they cannot prove causal stays dense with a recorded reason."""
    extra = {"sliding_window": 24} if family in ("mistral", "qwen2") else {}
    model = tiny_model(family, max_position_embeddings=256, **extra)
    ids = torch.randint(3, 128, (2, 60), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :9] = 0
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation=cache, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True, attention_mask=mask)
    backend = mi_compile.backend({"min_seq_len": 0})
    ref, out = generate_eager_and_compiled(model, backend, ids, **kwargs)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    sites = [s for r in backend.reports for s in r.sites]
    assert sites and all(s.action == "sparse" or s.reason for s in sites)


def test_entry_point_registers_backend():
    assert "minference" in torch._dynamo.list_backends()


def test_dump_dir_writes_before_after_and_table(tmp_path):
    model = tiny_model("qwen2")
    ids, _ = _inputs(1)
    with torch.no_grad():
        torch.compile(model, backend="minference", options={**DENSE_OPTS, "dump_dir": str(tmp_path)})(
            ids, use_cache=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith("_before.py") for f in files) and any(f.endswith("_after.py") for f in files)
    table = next(tmp_path.glob("*_explain.txt")).read_text()
    assert "model.layers.1.self_attn" in table and "sparse" in table
    after = next(tmp_path.glob("*_after.py")).read_text()
    assert "mi_compile.sparse_attention" in after


def test_explain_table_lists_every_site():
    model = tiny_model("phi3")
    ids, _ = _inputs(1)
    result = mi_compile.explain(model, ids, use_cache=False, options=DENSE_OPTS)
    text = str(result)
    for column in ("layer", "heads", "kv", "mask", "gqa", "action"):
        assert column in text
    assert "2 attention call(s): 2 sparse, 0 dense" in text


def test_dense_layers_option_keeps_layer_dense_with_reason():
    model = tiny_model("llama")
    ids, _ = _inputs(1)
    result = mi_compile.explain(model, ids, use_cache=False, options={**DENSE_OPTS, "dense_layers": [1]})
    by_layer = {s.layer: s for s in result.sites}
    assert by_layer[0].action == "sparse"
    assert by_layer[1].action == "dense" and "dense_layers" in by_layer[1].reason


# ---------------------------------------------------------------- unsupported attention forms


class _Encoder(torch.nn.Module):
    """Attention the passes must not touch: bidirectional, and with an additive float bias."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x, bias):
        q, k, v = self.proj(x).view(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)                     # no mask, not causal
        b = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)     # float mask from an input
        return a + b


def test_unknown_attention_forms_stay_dense_with_reason():
    mod = _Encoder().eval()
    x, bias = torch.randn(1, 12, 16), torch.randn(12, 12)
    result = mi_compile.explain(mod, x, bias, options={"min_seq_len": 0})
    reasons = [s.reason for s in result.sites]
    assert [s.action for s in result.sites] == ["dense", "dense"]
    assert reasons[0] == "not causal (no mask, is_causal=False)"
    assert reasons[1].startswith("mask not understood: mask probe")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(mod, backend="minference")(x, bias)
    torch.testing.assert_close(out, mod(x, bias))


def _compile_error(model, options, match):
    ids, _ = _inputs(1)
    with pytest.raises(Exception, match=match):
        with torch.no_grad():
            torch.compile(model, backend="minference", options=options)(ids, use_cache=False)


def test_config_for_wrong_number_of_layers_is_an_error(minference_llama_config):
    _compile_error(tiny_model("llama"), {"config": str(minference_llama_config)},
                   r"32 layers.*model has 2")


def test_config_for_wrong_number_of_heads_is_an_error():
    cfg = {"format": "mi-compile/v1", "num_heads": 9, "default": {"pattern": "dense"}}
    _compile_error(tiny_model("llama"), {"config": cfg}, r"9 heads.*4")


def test_unknown_pattern_name_is_an_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "mi-compile/v1", "default": {"pattern": "vertical_and_slashh"}}))
    _compile_error(tiny_model("llama"), {"config": str(path)}, r"bad\.json.*unknown pattern 'vertical_and_slashh'")


def test_malformed_config_is_an_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "mi-compile/v1", "default": ')
    _compile_error(tiny_model("llama"), {"config": str(path)}, r"broken\.json")


@pytest.mark.parametrize("options,match", [
    ({"min_seq_length": 5}, r"unknown backend='minference' option\(s\) \['min_seq_length'\]"),
    ({"min_seq_len": -1}, r"'min_seq_len' must be an int >= 0"),
    ({"dense_layers": 3}, r"'dense_layers' must be a list"),
    ({"config": 3.5}, r"'config' must be a path, a dict, a list or a SparseConfig"),
])
def test_bad_options_are_errors(options, match):
    with pytest.raises(mi_compile.OptionsError, match=match):
        mi_compile.backend(options)


def test_padding_mask_with_holes_fails_loudly():
    from mi_compile.op import padding_to_ranges
    mask = torch.tensor([[1, 1, 0, 1, 1]], dtype=torch.bool)
    with pytest.raises(RuntimeError, match="holes"):
        padding_to_ranges(mask)
    start, length = padding_to_ranges(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool))
    assert start.tolist() == [2, 0] and length.tolist() == [3, 3]


def test_artifacts_go_to_structured_trace(monkeypatch):
    """TORCH_TRACE / tlparse see the before/after graphs and the table as named artifacts."""
    import mi_compile.debug.dump as dump

    seen = {}

    def fake_trace(kind, metadata_fn, payload_fn):
        seen[metadata_fn()["name"]] = payload_fn()

    monkeypatch.setattr(dump, "trace_structured", fake_trace)
    model = tiny_model("llama")
    ids, _ = _inputs(1)
    mi_compile.explain(model, ids, use_cache=False, options=DENSE_OPTS)
    names = sorted(seen)
    assert [n.rsplit("_", 1)[1] for n in names] == ["after", "before", "explain"]
    assert "sparse_attention" in seen[names[0]] and "2 sparse" in seen[names[2]]


def test_observers_see_each_layers_q_and_k_through_the_compiled_model():
    """The pattern search reads real q/k this way: no model-specific patches."""
    from mi_compile.op import observe_attention

    model = tiny_model("qwen2")
    ids, _ = _inputs(1)
    seen = []
    compiled = torch.compile(model, backend="minference", options=DENSE_OPTS)
    with torch.no_grad(), observe_attention(lambda layer, q, k, v, pad: seen.append((layer, q.shape, k.shape))):
        compiled(ids, use_cache=False)
    assert seen == [(0, (1, 4, N, 16), (1, 2, N, 16)), (1, (1, 4, N, 16), (1, 2, N, 16))]


def test_long_sliding_window_found_on_symbolic_lengths():
    """With a dynamic length the probe must look past the prompt: Mistral's default 4096 window."""
    model = tiny_model("mistral")
    assert model.config.sliding_window == 4096
    ids, _ = _inputs(1)
    result = mi_compile.explain(model, ids, use_cache=False, dynamic=True, options={"min_seq_len": 0})
    assert [(s.mask.kind, s.mask.window) for s in result.sites] == [("sliding_window", 4096)] * 2
    assert all(h == HeadPattern("a_shape", sink=0, local=4096) for s in result.sites for h in s.heads)
