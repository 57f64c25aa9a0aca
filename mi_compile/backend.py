"""The Dynamo backend: ``torch.compile(model, backend="minference")``.

Dynamo hands us the captured FX graph (torch IR, before AOTAutograd). We run the passes in
:mod:`mi_compile.passes` (find SDPA calls, understand their masks, undo repeat_kv, rewrite to
``mi_compile::sparse_attention`` with the layer's per-head config), dump what we did when asked,
then hand the graph to Inductor's ``compile_fx`` exactly as ``backend="inductor"`` would.

The backend is registered under the ``torch_dynamo_backends`` entry point (pyproject.toml), so
``backend="minference"`` works without importing this package; ``mi_compile.backend(...)``
returns a configured callable for code that prefers an object.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

import torch
from torch._dynamo.exc import RestartAnalysis

from . import op as _op  # noqa: F401  (registers torch.ops.mi_compile.*)
from .config import load_config
from .debug.dump import dump_report
from .debug.explain import ExplainResult
from .options import BackendOptions, OptionsError
from .passes import run_passes

log = logging.getLogger("mi_compile")
_graph_ids = itertools.count()


class MInferenceBackend:
    """A configured backend: ``torch.compile(model, backend=MInferenceBackend({...}))``.

    ``mode`` (or the option of that name) and the option ``cudagraphs`` become Inductor config
    patches, so ``mode="reduce-overhead"`` CUDA-graphs the compiled model as it does for
    ``backend="inductor"``; the sparse op is sync-free and capturable."""

    def __init__(self, options: dict | BackendOptions | None = None, *, use_inductor: bool = True, mode=None,
                 keep_code: bool | None = None):
        self.options = BackendOptions.from_user(options).with_mode(mode)
        if not use_inductor and self.options.inductor_patches():
            raise OptionsError(f"options mode={self.options.mode!r} / cudagraphs={self.options.cudagraphs!r} "
                               "configure Inductor, but this backend runs without it (use_inductor=False)")
        self.config = load_config(self.options.config)
        explicit = isinstance(options, BackendOptions) or (isinstance(options, dict) and "min_seq_len" in options)
        if self.config.min_seq_len is not None and not explicit:
            # the config knows from which length it pays (measured); the option, when given, wins
            self.options = dataclasses.replace(self.options, min_seq_len=self.config.min_seq_len)
        if self.config.is_default_policy:
            log.warning("mi_compile: no per-head config given; using the default policy (%s)", self.config.source)
        self.use_inductor = use_inductor
        self.keep_code = keep_code  # None: only when dump_dir or TORCH_TRACE will show it
        self.reports = []

    @property
    def mode(self):
        return self.options.mode

    def inductor_patches(self) -> dict:
        """What ``compile_fx`` gets as ``config_patches`` (from the mode and ``cudagraphs``)."""
        return self.options.inductor_patches()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        """Run the passes on ``gm`` and compile it. Dynamo may call this again for the same frame
        when compilation restarts its analysis; ``reports`` keeps only graphs actually compiled."""
        if any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs) and torch.is_grad_enabled():
            log.warning("mi_compile: graph needs gradients; sparse attention is inference-only, graph left as is "
                        "(call the model under torch.no_grad() or torch.inference_mode() for sparse attention)")
            report = None
        else:
            report = run_passes(gm, self.options, self.config, graph_id=next(_graph_ids), keep_code=self.keep_code)
        if not self.use_inductor:
            self._record(report)
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        try:
            compiled = compile_fx(gm, example_inputs, config_patches=self.inductor_patches())
        except RestartAnalysis:
            # Dynamo throws this graph away and traces the frame again (e.g. Inductor's float
            # tensorify pass under dynamic=True), then calls the backend with the new graph: only
            # that one is compiled, so only it is reported.
            raise
        except BaseException:
            self._record(report)    # a real failure: keep what the passes did for the dump
            raise
        self._record(report)
        return compiled

    def _record(self, report) -> None:
        if report is not None:
            self.reports.append(report)
            dump_report(report, self.options.dump_dir)


def backend(options: dict | None = None, *, keep_code: bool | None = None, mode: str | None = None,
            **kw) -> MInferenceBackend:
    """``torch.compile(model, backend=mi_compile.backend({"config": "llama.json"}))``.

    ``mode`` is an Inductor mode (``"reduce-overhead"`` for CUDA graphs), the same as the option
    ``"mode"``. ``keep_code=True`` keeps each graph's readable code before/after the passes in
    ``.reports`` (otherwise only kept when ``dump_dir`` or TORCH_TRACE asks for it)."""
    if kw:
        options = {**(options or {}), **kw}
    return MInferenceBackend(options, keep_code=keep_code, mode=mode)


def minference_backend(gm, example_inputs, options: dict | None = None, mode=None):
    """Entry point behind ``backend="minference"``; torch passes ``options=`` (or ``mode=``:
    torch.compile takes one of the two) through."""
    return MInferenceBackend(options, mode=mode)(gm, example_inputs)


def explain(model, *args, options: dict | None = None, dynamic=None, **kwargs) -> ExplainResult:
    """Run ``model(*args, **kwargs)`` once through the backend's passes (no Inductor: fast) and
    report each attention call site (``print(result)`` gives the explain table)."""
    backend = MInferenceBackend(options, use_inductor=False, keep_code=True)
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    with torch.no_grad():
        compiled(*args, **kwargs)
    ids = args[0] if args else kwargs.get("input_ids")
    length = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None
    device = ids.device if isinstance(ids, torch.Tensor) else None
    return ExplainResult(list(backend.reports), backend.options.min_seq_len, length, device)
