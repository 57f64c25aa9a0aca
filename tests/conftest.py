"""Test session set-up.

The Triton kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before any test module imports mi_compile.
"""
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def benchmark_module():
    """``load(name)``: the benchmark ``benchmarks.<name>`` imported, for tests of its pure parts."""
    import importlib

    def load(name: str):
        return importlib.import_module(f"benchmarks.{name}")
    return load


@pytest.fixture
def tiny_llama_logits():
    """``(compiled, eager, report) = f(entry)``: a tiny random Llama's logits on 150 tokens,
    compiled with every head given the config head ``entry`` (``min_seq_len`` 0), and eager;
    ``report``: what the passes did (every layer rewritten, asserted)."""
    import mi_compile
    from mi_compile.models import tiny_model

    def run(entry: dict):
        torch._dynamo.reset()
        try:
            model = tiny_model("llama")
            ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                eager = model(ids, use_cache=False).logits
            backend = mi_compile.backend({"config": {"format": "mi-compile/v1", "default": entry},
                                          "min_seq_len": 0})
            with torch.no_grad():
                compiled = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
            (report,) = backend.reports
            assert report.rewritten == model.config.num_hidden_layers
            return compiled, eager, report
        finally:
            torch._dynamo.reset()
    return run


@pytest.fixture
def minference_llama_config():
    return DATA / "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json"


@pytest.fixture
def generate_eager_and_compiled():
    """``(eager, compiled) = f(model, backend, ids, **generate_kwargs)``: ``model.generate``
    as is, then with the module compiled in place through ``backend`` (the README's way to
    have ``generate`` use the compiled forward), undone afterwards for the next test."""
    def run(model, backend, ids, **kwargs):
        with torch.no_grad():
            eager = model.generate(ids, **kwargs)
            model.compile(backend=backend, dynamic=True)
            try:
                compiled = model.generate(ids, **kwargs)
            finally:
                model._compiled_call_impl = None
        return eager, compiled
    return run


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the slow real-model tests (CI and the README's test command do)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("MI_COMPILE_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-model test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and the pass counters cleared before and after the test."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()
