"""Capture each layer's q, k and v through the backend itself (no model-specific patches).

The model is compiled with a dense per-head config and the passes only (no Inductor: fast to
compile). Every attention call then runs ``torch.ops.mi_compile.sparse_attention``, whose
observers (:func:`mi_compile.op.observe_attention`) see the call's q ``[B, Hq, n, D]``
and k/v ``[B, Hkv, n, D]`` exactly as the sparse kernels would. We keep the first call of each
layer and read each layer's softmax scale from the rewritten graph. On a GPU the tensors stay
there in the model's dtype (28 layers of a 1.5B model at 128K tokens: ~15 GB in bf16), so the
scoring runs there too; on the CPU they are kept as float32. Only the last position's logits
are computed (``logits_to_keep=1`` where the model takes it): at 128K tokens the full logits
alone would be tens of GB.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math

import torch

log = logging.getLogger("mi_compile")

#: The config the capture compiles with: every head dense (so the outputs are the model's own).
DENSE_CONFIG = {"format": "mi-compile/v1", "default": {"pattern": "dense"}}


@dataclasses.dataclass
class Capture:
    """q/k/v of every layer the backend rewrote, for one calibration input."""

    q: dict[int, torch.Tensor]          # layer -> [B, Hq, n, D] (model dtype on CUDA, float32 on CPU)
    k: dict[int, torch.Tensor]          # layer -> [B, Hkv, n, D] (likewise)
    scale: dict[int, float]             # layer -> softmax scale of that call
    dense_layers: dict[int, str]        # layers the passes left dense -> reason (not searchable)
    v: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)   # like k (output-error scoring)

    @property
    def layers(self) -> list[int]:
        return sorted(self.q)


def _site_scale(site) -> float | None:
    """The softmax scale the rewritten op was given (args[4]), or None when not a constant."""
    node = site.node
    scale = node.args[4] if node is not None and len(node.args) > 4 else None
    if scale is None:
        return 1.0 / math.sqrt(site.head_dim) if isinstance(site.head_dim, int) else None
    if isinstance(scale, (int, float)):
        return float(scale)
    return None


ALWAYS_DENSE = 2**31 - 1   # the largest option min_seq_len: no prompt reaches it


def capture_qk(model, input_ids: torch.Tensor, *, min_seq_len: int = ALWAYS_DENSE, **forward_kwargs) -> Capture:
    """Run ``model(input_ids)`` once through the backend with every head dense; keep q/k per layer.

    The default ``min_seq_len`` keeps the op on its dense SDPA path (fast); the observer sees
    the same q/k whichever path the op then takes.
    """
    from ..backend import MInferenceBackend
    from ..op import observe_attention

    qs: dict[int, torch.Tensor] = {}
    ks: dict[int, torch.Tensor] = {}
    vs: dict[int, torch.Tensor] = {}

    def keep(layer, q, k, v, key_padding_mask):
        if layer < 0 or layer in qs:
            return
        store = (lambda t: t.detach().clone()) if q.is_cuda else \
            (lambda t: t.detach().to("cpu", torch.float32).clone())
        qs[layer], ks[layer], vs[layer] = store(q), store(k), store(v)

    backend = MInferenceBackend({"config": DENSE_CONFIG, "min_seq_len": int(min_seq_len)},
                                use_inductor=False)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend)
        forward_kwargs.setdefault("use_cache", False)
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            forward_kwargs.setdefault("logits_to_keep", 1)
        with torch.no_grad(), observe_attention(keep):
            compiled(input_ids, **forward_kwargs)
    finally:
        torch._dynamo.reset()

    scales: dict[int, float] = {}
    dense: dict[int, str] = {}
    for report in backend.reports:
        for site in report.sites:
            if site.layer is None:
                continue
            if site.action != "sparse":
                dense.setdefault(site.layer, site.reason)
                continue
            if site.mask is not None and site.mask.window:
                dense.setdefault(site.layer, f"sliding window {site.mask.window}: the model's own "
                                 "a_shape, whatever the config says")
            scale = _site_scale(site)
            if scale is None:
                scale = 1.0 / math.sqrt(qs[site.layer].shape[-1]) if site.layer in qs else None
                log.warning("mi_compile.search: layer %s: softmax scale is not a constant in the "
                            "graph; assuming 1/sqrt(head_dim)", site.layer)
            if scale is not None:
                scales.setdefault(site.layer, scale)
    for layer in list(qs):
        if layer in dense:          # sliding-window layers run a fixed a_shape: nothing to search
            del qs[layer], ks[layer], vs[layer]
        scales.setdefault(layer, 1.0 / math.sqrt(qs[layer].shape[-1]) if layer in qs else 0.0)
    scales = {l: s for l, s in scales.items() if l in qs}
    if not qs:
        raise RuntimeError("mi_compile.search: no attention call reached the sparse op; "
                           "see `python -m mi_compile explain` for why")
    return Capture(q=qs, k=ks, scale=scales, dense_layers=dense, v=vs)
