"""The backend's options: ``torch.compile(model, backend="minference", options={...})``.

=============== ========================================================================
option          meaning
=============== ========================================================================
config          per-head pattern config: a path to a JSON file (our format or MInference's
                published per-layer lists) or the same data as a dict/list. Default: the
                default policy (every head vertical_slash(1000, 6096)), logged.
min_seq_len     prompts shorter than this run dense attention inside the op (sparse
                attention does not pay off on short prompts). Default 65536 (measured, see README).
dense_layers    layer indices to leave dense (the original SDPA call is kept), e.g. [0, 1].
dump_dir        write each graph before/after the passes (readable code) and the explain
                table there; the same artifacts always go to TORCH_TRACE / tlparse.
=============== ========================================================================
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from .kernels.op import DEFAULT_MIN_SEQ_LEN


class OptionsError(ValueError):
    """A backend option with a bad name or value."""


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    config: Any = None
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    dense_layers: tuple[int, ...] = ()
    dump_dir: Optional[str] = None

    @classmethod
    def from_user(cls, options: Optional[dict]) -> "BackendOptions":
        if options is None:
            return cls()
        if isinstance(options, BackendOptions):
            return options
        if not isinstance(options, dict):
            raise OptionsError(f"backend='minference' options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(f"unknown backend='minference' option(s) {unknown}; known: {sorted(known)}")
        opts = dict(options)
        cfg = opts.get("config")
        if cfg is not None and not isinstance(cfg, (str, os.PathLike, dict, list)):
            raise OptionsError(f"option 'config' must be a path, a dict or a list, got {type(cfg).__name__}")
        msl = opts.get("min_seq_len", DEFAULT_MIN_SEQ_LEN)
        if isinstance(msl, bool) or not isinstance(msl, int) or msl < 0:
            raise OptionsError(f"option 'min_seq_len' must be an int >= 0, got {msl!r}")
        dl = opts.get("dense_layers", ())
        if isinstance(dl, int) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dl):
            raise OptionsError(f"option 'dense_layers' must be a list of layer indices >= 0, got {dl!r}")
        opts["dense_layers"] = tuple(dl)
        dd = opts.get("dump_dir")
        if dd is not None and not isinstance(dd, (str, os.PathLike)):
            raise OptionsError(f"option 'dump_dir' must be a path, got {type(dd).__name__}")
        if dd is not None:
            opts["dump_dir"] = os.fspath(dd)
        return cls(**opts)
