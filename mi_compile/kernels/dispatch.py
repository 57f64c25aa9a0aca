"""Which implementation runs each step of the sparse op: decided here, and only here.

=============  ====================================  ================================================
step           CUDA tensors                          CPU tensors
=============  ====================================  ================================================
attention      the Triton kernels                    ``impl="auto"``: the Triton kernels when
                                                     ``TRITON_INTERPRET=1`` (the interpreter), else
                                                     the float32 PyTorch reference; the compiled op:
                                                     the reference, unless ``MI_COMPILE_CPU_IMPL=triton``
selection      Triton estimates, fused tables        PyTorch (the interpreter would be far slower)
=============  ====================================  ================================================

On sm_90 the attention may run in Gluon instead of Triton, opt-in only (``MI_COMPILE_HOPPER``,
:func:`hopper_opt_in`): ``=1`` / ``=ws`` / ``=ws_persist`` run layers whose heads are all dense or
A-shape by a kernel of :mod:`mi_compile.kernels.hopper_wide` (the lock-step, the warp-specialised
or the persistent warp-specialised one) and
leave every other layer to Triton, whose general kernel outran the Gluon one for any index
(docs/kernels.md); ``=sparse`` / ``=ws_sparse`` / ``=sparse_ws`` also send those layers to
:mod:`mi_compile.kernels.hopper_sparse` (plain / software-pipelined / pipelined and fed by a
producer warp), to measure it.

"selection" is everything that builds the index: the vertical-slash and XAttention estimates
and the fused table builder. Dense-versus-sparse (``min_seq_len``) is the op's own decision
(:mod:`mi_compile.op`), made before any of these.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

ATTENTION_IMPLS = ("auto", "triton", "reference")
HOPPER_ENV = "MI_COMPILE_HOPPER"


def interpreting() -> bool:
    """Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def attention_impl(q, impl: str = "auto") -> str:
    """``"triton"`` or ``"reference"`` for an attention call on ``q`` asked to run ``impl``."""
    if impl == "triton" and q.is_cuda:
        return impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "auto":
        return "triton" if (q.is_cuda or interpreting()) else "reference"
    if impl == "triton" and not q.is_cuda and not interpreting():
        raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1")
    return impl


def op_attention_impl(q) -> str:
    """What the compiled op runs: the kernels on CUDA; on the CPU the PyTorch reference, unless
    ``MI_COMPILE_CPU_IMPL=triton`` asks for the kernels (which then need the interpreter)."""
    if q.is_cuda:
        return "triton"
    impl = os.environ.get("MI_COMPILE_CPU_IMPL", "reference")
    if impl not in ("reference", "triton"):
        raise ValueError(f"MI_COMPILE_CPU_IMPL must be 'reference' or 'triton', got {impl!r}")
    return impl


def selection_impl(q) -> str:
    """``"triton"`` (estimates and fused table builder) on CUDA, ``"torch"`` elsewhere."""
    return "triton" if q.is_cuda else "torch"


class HopperChoice(NamedTuple):
    """The Gluon kernels asked for: ``wide`` (``"wide"``, ``"ws"`` or ``"ws_persist"``) for layers of dense /
    A-shape heads, ``sparse`` (``"sparse"``, ``"sparse_pipe"``, ``"sparse_ws"`` or None: Triton) for the others."""
    wide: str
    sparse: Optional[str]


HOPPER_VARIANTS = {"1": HopperChoice("wide", None), "wide": HopperChoice("wide", None),
                   "ws": HopperChoice("ws", None), "ws_persist": HopperChoice("ws_persist", None),
                   "sparse": HopperChoice("wide", "sparse"),
                   "ws_sparse": HopperChoice("ws", "sparse_pipe"), "sparse_ws": HopperChoice("ws", "sparse_ws")}


def kernels_line(device) -> str:
    """Which attention kernels the sparse op runs on ``device``, in words (the explain table's
    ``kernels:`` line): the decision of :func:`op_attention_impl` and :func:`hopper_opt_in`, and
    for the Gluon kernels whether they can run here (else why the Triton kernels stay)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        if os.environ.get("MI_COMPILE_CPU_IMPL", "reference") == "triton":
            return "kernels: the Triton kernels in the CPU interpreter (MI_COMPILE_CPU_IMPL=triton)"
        return "kernels: the float32 PyTorch reference of each selection (CPU)"
    choice = hopper_opt_in()
    if choice is None:
        return f"kernels: Triton ({HOPPER_ENV}=1 opts into the Gluon Hopper kernels on sm_90)"
    from . import hopper_wide
    why = hopper_wide.unavailable_reason(device)
    if why:
        return f"kernels: Triton ({HOPPER_ENV}={os.environ[HOPPER_ENV]} asked for Gluon, not available: {why})"
    others = f"hopper_{choice.sparse}" if choice.sparse else "Triton"
    return (f"kernels: Gluon on sm_90: hopper_{choice.wide} for layers of dense / A-shape heads, {others} for the "
            "others (head dim 64 / 128, fp16 / bf16, TMA-aligned K / V; otherwise Triton)")


def hopper_opt_in() -> HopperChoice | None:
    """Which Gluon Hopper kernels ``MI_COMPILE_HOPPER`` asks for (module docstring), or None.
    Read at each launch, so a benchmark can set it per run; whether they can run is
    :func:`mi_compile.kernels.hopper_wide.usable`'s."""
    value = os.environ.get(HOPPER_ENV, "")
    if value in ("", "0"):
        return None
    if value not in HOPPER_VARIANTS:
        raise ValueError(f"{HOPPER_ENV} must be one of {sorted(HOPPER_VARIANTS)} or 0, got {value!r}")
    return HOPPER_VARIANTS[value]
