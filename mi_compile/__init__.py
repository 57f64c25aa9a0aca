"""mi-compile: MInference-style sparse attention for long-context prefill, as a torch.compile backend.

    model = torch.compile(model, backend="minference")
"""
from . import op as _op  # noqa: F401  (registers torch.ops.mi_compile.sparse_attention)
from .backend import MInferenceBackend, backend, explain
from .config import ConfigError, ConfigFamily, SparseConfig, load_config
from .generation import contiguous_cache, masks_in_forward, standard_strides
from .options import BackendOptions, OptionsError
from .patterns.spec import HeadPattern

__all__ = ["backend", "MInferenceBackend", "BackendOptions", "OptionsError", "load_config", "SparseConfig",
           "ConfigFamily", "ConfigError", "HeadPattern", "explain", "masks_in_forward", "standard_strides", "contiguous_cache",
           "sparse_attention"]


def __getattr__(name):
    if name == "sparse_attention":
        from .sparse import sparse_attention
        return sparse_attention
    raise AttributeError(name)
