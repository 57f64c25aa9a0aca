"""How often the backend and its passes run per compiled graph.

Under ``dynamic=True`` Dynamo hands the backend a graph, Inductor's float tensorify pass (inside
``compile_fx``) asks Dynamo to restart its analysis (a Python float attribute, the embedding's
``norm_type``, was traced as a symbolic input), and Dynamo traces the frame again and calls the
backend a second time with the new graph. So the passes run twice for that one compile, but
only the second graph is compiled; the backend reports (and dumps) only that one. Automatic
dynamic shapes (``dynamic=None``) are a different thing: a static graph for the first length,
then one dynamic graph from the second length on.
"""
from __future__ import annotations

import sys

import pytest
import torch

import mi_compile
from mi_compile.models import tiny_model

DENSE_OPTS = {"config": {"format": "mi-compile/v1", "default": {"pattern": "dense"}}, "min_seq_len": 0}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_and_count(monkeypatch, dynamic, lengths=(24, 40)):
    """Run a tiny Llama at ``lengths``; returns the backend, how many times the passes ran and
    the ``(compile id, attempt)`` of each run."""
    backend_module = sys.modules["mi_compile.backend"]
    runs = []
    real = backend_module.run_passes

    def counting(gm, *args, **kwargs):
        cid = torch._guards.CompileContext.current_compile_id()
        runs.append((None if cid is None else (cid.frame_id, cid.frame_compile_id)))
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(backend_module, "run_passes", counting)
    backend = mi_compile.backend(DENSE_OPTS)
    model = tiny_model("llama")
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    per_length = []
    with torch.no_grad():
        for n in lengths:
            before = len(backend.reports)
            compiled(torch.randint(0, 128, (1, n)), use_cache=False)
            per_length.append(len(backend.reports) - before)
    return backend, runs, per_length


def test_dynamic_compile_reports_one_graph(monkeypatch):
    """dynamic=True: one compiled graph for both lengths, reported once, every call rewritten;
    the passes may run once more for that same compile (the restarted trace), never again
    for the second length."""
    backend, runs, per_length = _compile_and_count(monkeypatch, dynamic=True)
    assert per_length == [1, 0]
    assert len(backend.reports) == 1 and backend.reports[0].rewritten == 2
    assert 1 <= len(runs) <= 2 and len(set(runs)) == 1, f"pass runs by compile id: {runs}"


def test_automatic_dynamic_is_static_then_dynamic(monkeypatch):
    """dynamic=None: a static graph for the first length, one dynamic graph at the second,
    none for a third; one report per compiled graph."""
    backend, runs, per_length = _compile_and_count(monkeypatch, dynamic=None, lengths=(24, 40, 57))
    assert per_length == [1, 1, 0]
    assert all(r.rewritten == 2 for r in backend.reports)
    assert len(set(runs)) == 2, f"pass runs by compile id: {runs}"
