"""Triton kernels and the torch.library op that calls them (:mod:`.op`)."""
from . import op  # noqa: F401  registers torch.ops.mi_compile.sparse_attention
