"""MInference's own kernels, for side-by-side timing only (never vendored into this repository).

MInference (github.com/microsoft/MInference, MIT licence) is published on PyPI as a source
distribution: its Triton kernels are plain Python files, and the vertical-slash index conversion
is a small CUDA extension. ``pip install minference`` needs a CUDA toolchain at install time and
pulls in its own dependency pins, so this module does the minimum by hand instead:

* :func:`fetch_sdist` downloads ``minference-<version>.tar.gz`` from PyPI into the mi_compile
  cache (``$MI_COMPILE_CACHE`` or ``~/.cache/mi_compile``), checking the sha256 that PyPI's JSON
  API publishes. The GPU machine has no network: copy the file into the repository's ignored
  ``.whl/`` directory and name it in the device call's ``carry`` (see benchmarks/README.md).
* :func:`load` extracts it into a temporary directory, builds the CUDA extension with
  ``torch.utils.cpp_extension.load`` (needs ``nvcc`` and ``ninja`` on the GPU machine), and
  imports the kernel modules under a private package name so that MInference's package
  ``__init__`` (which imports its transformers patches) never runs.

It returns a :class:`MInferenceOps` with the three entry points the benchmark times, called
exactly as MInference calls them (K/V repeated to every query head first, as its kernels need).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
import sys
import tarfile
import tempfile
import types
import urllib.request

VERSION = "0.1.6.0"
PACKAGE = "_minference_reference"     # private name: never collides with an installed minference


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MI_COMPILE_CACHE") or pathlib.Path.home() / ".cache" / "mi_compile")


def fetch_sdist(version: str = VERSION, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of ``minference-<version>.tar.gz`` in the cache, downloaded from PyPI if missing."""
    cache = pathlib.Path(cache_dir) if cache_dir else _cache_dir()
    target = cache / f"minference-{version}.tar.gz"
    if target.is_file():
        return target
    with urllib.request.urlopen(f"https://pypi.org/pypi/minference/{version}/json", timeout=60) as r:
        meta = json.load(r)
    sdists = [u for u in meta["urls"] if u["packagetype"] == "sdist"]
    if not sdists:
        raise RuntimeError(f"PyPI lists no source distribution for minference {version}")
    url, sha = sdists[0]["url"], sdists[0]["digests"]["sha256"]
    with urllib.request.urlopen(url, timeout=120) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"sha256 mismatch for {url}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


@dataclasses.dataclass
class MInferenceOps:
    """MInference's public kernel entry points (all take K/V already repeated to Hq heads)."""
    version: str
    vertical_slash: object      # (q, k, v, vertical_idx [B,H,V], slash_idx [B,H,S]) -> out
    block_sparse: object        # (q, k, v, top_k) -> out   (builds its own block index)
    streaming: object | None    # (q, k, v, n_init, n_local) -> out   (A-shape)
    convert_vertical_slash: object   # the CUDA index conversion, for its density count


def load(sdist: str | os.PathLike, build_dir: str | os.PathLike | None = None,
         verbose: bool = False) -> MInferenceOps:
    """Extract ``sdist``, build its CUDA extension and import the kernel modules."""
    import torch.utils.cpp_extension as cpp

    work = pathlib.Path(build_dir or tempfile.mkdtemp(prefix="minference_ref_"))
    with tarfile.open(sdist) as tar:
        root = work / tar.getnames()[0].split("/")[0]
        if not root.exists():
            tar.extractall(work)
    src = root / "minference"
    if not (src / "ops").is_dir():
        raise RuntimeError(f"{sdist}: no minference/ops directory")
    ext_build = work / "ext_build"
    ext_build.mkdir(exist_ok=True)
    ext = cpp.load(name=f"{PACKAGE}_cuda",
                   sources=[str(root / "csrc" / "kernels.cpp"), str(root / "csrc" / "vertical_slash_index.cu")],
                   extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=["-O3", "-std=c++17"],
                   build_directory=str(ext_build), verbose=verbose)
    # A namespace for the package without running its __init__; ``from ..cuda import`` inside
    # the ops modules resolves to the extension just built.
    pkg = types.ModuleType(PACKAGE)
    pkg.__path__ = [str(src)]
    sys.modules[PACKAGE] = pkg
    sys.modules[f"{PACKAGE}.cuda"] = ext
    ops_pkg = types.ModuleType(f"{PACKAGE}.ops")
    ops_pkg.__path__ = [str(src / "ops")]
    sys.modules[f"{PACKAGE}.ops"] = ops_pkg
    vs = importlib.import_module(f"{PACKAGE}.ops.pit_sparse_flash_attention_v2")
    bs = importlib.import_module(f"{PACKAGE}.ops.block_sparse_flash_attention")
    try:
        streaming = importlib.import_module(f"{PACKAGE}.ops.streaming_kernel").streaming_forward
    except Exception:  # noqa: BLE001 - optional; the A-shape comparison is skipped without it
        streaming = None
    version = (root.name.split("-", 1) + [VERSION])[1]
    return MInferenceOps(version=version, vertical_slash=vs.vertical_slash_sparse_attention,
                         block_sparse=bs.block_sparse_attention, streaming=streaming,
                         convert_vertical_slash=ext.convert_vertical_slash_indexes)


if __name__ == "__main__":
    print(fetch_sdist())
