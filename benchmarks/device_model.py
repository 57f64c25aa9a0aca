"""Move the Qwen2.5-Coder-1.5B GGUF to the GPU machine, which has no network, in 50 MiB calls.

A device call carries at most ~64 MiB (the repository takes ~10), and /root survives between
calls made within 30 s of each other. So the 1.1 GB GGUF travels as its 22 parts, one per call:

    python3 -m benchmarks.device_model split     # here: .devmodel/part01..22.bin + the gguf wheel
    python3 -m benchmarks.device_model join      # there, once per call: appends the carried part
    python3 -m benchmarks.device_model status    # either side: how far the join is

``join`` appends every ``.devmodel/partNN.bin`` present to an assembly in the cache
(``$MI_COMPILE_CACHE`` or ``~/.cache/mi_compile``), in order: a part already in is skipped (the
device keeps earlier calls' carried files), a part that would leave a gap is refused. Each part
is checked against its size and sha256 as it is appended; after the last, the whole file is
checked and published atomically where ``mi_compile.models.qwen_gguf_path`` finds it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

from mi_compile import models
from mi_compile.models import AssemblyError, SplitFile

PART_DIR = ROOT / ".devmodel"


def _paths(spec: SplitFile, cache: pathlib.Path):
    """(published file, partial assembly, its state file) in ``cache``."""
    return cache / spec.name, cache / f".{spec.name}.join", cache / f".{spec.name}.join.json"


def join_status(spec: SplitFile, cache: pathlib.Path) -> dict:
    """How far the assembly in ``cache`` is: ``{"done": parts in, "parts": n, "published": bool}``."""
    target, partial, state_file = _paths(spec, cache)
    if target.is_file():
        return {"done": spec.parts, "parts": spec.parts, "published": True}
    done = json.loads(state_file.read_text())["done"] if state_file.is_file() else 0
    if not partial.is_file():
        done = 0
    return {"done": done, "parts": spec.parts, "published": False}


def _save_state(state_file: pathlib.Path, done: int) -> None:
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, state_file)


def join(spec: SplitFile, part_dir: pathlib.Path, cache: pathlib.Path, log=print) -> pathlib.Path | None:
    """Append the parts present in ``part_dir`` to the assembly in ``cache``, in order.

    Parts already in are skipped; a part past the next one needed raises :class:`AssemblyError`
    (after the earlier parts present were appended). The state file records how many parts are
    in; the partial file is cut back to that length first, so a call killed mid-append loses
    only that part. Returns the published file once the last part is in and the whole file
    verifies (else ``None``); a whole file that fails is deleted so the join starts over.
    """
    target, partial, state_file = _paths(spec, cache)
    if target.is_file():
        log(f"{target} is already published ({target.stat().st_size} bytes); nothing to do")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    done = join_status(spec, cache)["done"]
    offset = sum(spec.part_sizes[:done])
    if partial.is_file() and partial.stat().st_size < offset:
        log(f"{partial} is shorter than its {done} parts: starting over")
        done, offset = 0, 0
    with open(partial, "ab") as f:
        f.truncate(offset)  # drops the tail of a part whose append was cut short
    present = sorted(n for n in range(1, spec.parts + 1) if (part_dir / spec.part_file(n)).is_file())
    if not present:
        log(f"no {part_dir}/partNN.bin carried; {done}/{spec.parts} parts in")
    for n in present:
        if n <= done:
            log(f"part {n:02d}: already in, skipped")
            continue
        if n > done + 1:
            raise AssemblyError(f"part {n:02d} is out of order: parts 01..{done:02d} are in, so part "
                                f"{done + 1:02d} must be carried (and joined) first")
        with models.part_source(part_dir, spec)(n) as src, open(partial, "r+b") as dst:
            dst.seek(offset)
            try:
                offset += models.append_part(spec, n, src, dst)
            except AssemblyError:
                dst.truncate(offset)
                raise
        done = n
        _save_state(state_file, done)
        log(f"part {n:02d}: appended, {done}/{spec.parts} parts in ({offset} bytes)")
    if done < spec.parts:
        log(f"next: carry {part_dir.name}/{spec.part_file(done + 1)}")
        return None
    try:
        models.check_whole(spec, partial.stat().st_size, models.file_sha256(partial))
    except AssemblyError:
        partial.unlink()
        state_file.unlink()
        raise
    os.chmod(partial, 0o644)
    os.replace(partial, target)
    state_file.unlink()
    log(f"verified ({spec.size} bytes, sha256 {spec.sha256[:16]}...) and published: {target}")
    return target


def split(spec: SplitFile, part_dir: pathlib.Path, source: pathlib.Path, log=print) -> list[pathlib.Path]:
    """Cut the verified file ``source`` into ``part_dir/partNN.bin`` (each checked as written)."""
    part_dir.mkdir(parents=True, exist_ok=True)
    out = []
    with open(source, "rb") as src:
        for n in range(1, spec.parts + 1):
            path = part_dir / spec.part_file(n)
            with open(path, "wb") as dst:
                models.append_part(spec, n, _Limited(src, spec.part_sizes[n - 1]), dst)
            out.append(path)
    log(f"{spec.parts} parts in {part_dir}")
    return out


class _Limited:
    """Reads at most ``size`` bytes of ``f`` (one part of the whole file)."""

    def __init__(self, f, size):
        self.f, self.left = f, size

    def read(self, n):
        chunk = self.f.read(min(n, self.left))
        self.left -= len(chunk)
        return chunk


def device_calls(spec: SplitFile, wheel: str) -> list[tuple[list[str], str]]:
    """The device calls, in order, as (carry, command)."""
    join_cmd = "python3 -m benchmarks.device_model join"
    install = f"python3 -m pip install -q --no-index --no-deps --target /root/site .devmodel/{wheel}"
    calls = [([f".devmodel/{spec.part_file(n)}"], join_cmd) for n in range(1, spec.parts)]
    calls.append(([f".devmodel/{spec.part_file(spec.parts)}", f".devmodel/{wheel}"],
                  f"{join_cmd} && {install}"))
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("split", help="here: write .devmodel/partNN.bin and the gguf wheel, "
                                 "print the device calls")
    sub.add_parser("join", help="on the device: append the carried part(s) to the assembly in the cache")
    sub.add_parser("status", help="how many parts are in the assembly")
    a = p.parse_args(argv)
    spec, cache = models.QWEN_GGUF, models._cache_dir(None).expanduser()
    try:
        if a.cmd == "join":
            join(spec, PART_DIR, cache)
        elif a.cmd == "status":
            s = join_status(spec, cache)
            done = "published" if s["published"] else f"{s['done']}/{s['parts']} parts in"
            print(f"{cache / spec.name}: {done}")
        else:
            split(spec, PART_DIR, models.qwen_gguf_path())
            for old in PART_DIR.glob("gguf-*.whl"):
                old.unlink()
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "gguf",
                            "-d", str(PART_DIR)], check=True)
            wheel = sorted(PART_DIR.glob("gguf-*.whl"))[-1].name
            print("device calls, back to back (each within 30 s of the last):")
            for i, (carry, command) in enumerate(device_calls(spec, wheel), 1):
                print(f"  {i:2d}. carry {json.dumps(carry)}  command: {command}")
            print("later calls: export PYTHONPATH=/root/site (gguf, needed by the first load only)")
    except AssemblyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
