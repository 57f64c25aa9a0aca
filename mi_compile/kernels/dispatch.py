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

On sm_90 the attention may run in Gluon instead of Triton, opt-in only (``MI_COMPILE_HOPPER=1``
or ``=ws``, :func:`hopper_opt_in`) until it beats the Triton kernels by enough to be the
default: layers whose heads are all dense or A-shape by a kernel of
:mod:`mi_compile.kernels.hopper_wide`, any other layer by :mod:`mi_compile.kernels.hopper_sparse`;
``ws`` picks the overlapped schedules (the warp-specialised wide kernel, the software-pipelined
sparse one).

"selection" is everything that builds the index: the vertical-slash and XAttention estimates
and the fused table builder. Dense-versus-sparse (``min_seq_len``) is the op's own decision
(:mod:`mi_compile.op`), made before any of these.
"""
from __future__ import annotations

import os

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


HOPPER_VARIANTS = {"1": "wide", "wide": "wide", "ws": "ws"}


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
    variant = hopper_opt_in()
    if variant is None:
        return f"kernels: Triton ({HOPPER_ENV}=1 opts into the Gluon Hopper kernels on sm_90)"
    from . import hopper_wide
    why = hopper_wide.unavailable_reason(device)
    if why:
        return f"kernels: Triton ({HOPPER_ENV}={os.environ[HOPPER_ENV]} asked for Gluon, not available: {why})"
    wide, sparse = ("hopper_ws", "hopper_sparse_pipe") if variant == "ws" else ("hopper_wide", "hopper_sparse")
    return (f"kernels: Gluon on sm_90: {wide} for layers of dense / A-shape heads, {sparse} for the others "
            "(head dim 64 / 128, fp16 / bf16, TMA-aligned K / V; otherwise Triton)")


def hopper_opt_in() -> str | None:
    """Which Gluon Hopper kernels were asked for: ``"wide"`` (``MI_COMPILE_HOPPER=1``: the first
    ones), ``"ws"`` (``=ws``: the overlapped schedules) or None. Read at each launch, so a benchmark can set it
    per run; whether it can run is :func:`mi_compile.kernels.hopper_wide.usable`'s."""
    value = os.environ.get(HOPPER_ENV, "")
    if value in ("", "0"):
        return None
    if value not in HOPPER_VARIANTS:
        raise ValueError(f"{HOPPER_ENV} must be one of {sorted(HOPPER_VARIANTS)} or 0, got {value!r}")
    return HOPPER_VARIANTS[value]
