"""The README's examples run as written.

Every ```python block of README.md must be immediately preceded by the marker line
``<!-- runs-on-cpu -->`` (a fast example: tiny models, seconds) or ``<!-- runs-on-cpu slow -->``
(an example with a real model: skipped unless ``--runslow``, as the other real-model tests).
Each block runs on its own, in a fresh namespace, so none may depend on another's names. The
block marked ``<!-- config-example -->`` (JSON) must load as a config.
"""
import json
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.M | re.S)
_MARKER = re.compile(r"<!--\s*([\w -]+?)\s*-->\s*$")


def _blocks():
    """(language, marker or None, first line number, code) of every fenced block."""
    text = README.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        line = text.count("\n", 0, m.start()) + 2
        out.append((m.group(1), marker.group(1) if marker else None, line, m.group(2)))
    return out


def _python(kind):
    return [pytest.param(code, id=f"README.md:{line}") for lang, marker, line, code in _blocks()
            if lang == "python" and marker == kind]


def test_every_python_block_is_marked():
    python = [(line, marker) for lang, marker, line, _ in _blocks() if lang == "python"]
    assert python, "README.md has no python examples"
    unmarked = [line for line, marker in python if marker not in ("runs-on-cpu", "runs-on-cpu slow")]
    assert not unmarked, f"python blocks without a runs-on-cpu marker at README.md lines {unmarked}"


def _run(code, line_id):
    import torch

    torch._dynamo.reset()
    try:
        exec(compile(code, line_id, "exec"), {"__name__": "__readme__"})
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("code", _python("runs-on-cpu"))
def test_readme_example(code, request):
    _run(code, request.node.callspec.id)


@pytest.mark.slow
@pytest.mark.parametrize("code", _python("runs-on-cpu slow"))
def test_readme_example_real_model(code, request):
    _run(code, request.node.callspec.id)


def test_readme_config_example_loads():
    from mi_compile.config import load_config

    blocks = [code for lang, marker, _, code in _blocks() if marker == "config-example"]
    assert len(blocks) == 1 and blocks[0].strip().startswith("{")
    config = load_config(json.loads(blocks[0]))
    assert config.num_layers == 30 and config.num_heads == 9


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text(), "the README's test command must be the one .ci/run runs"
