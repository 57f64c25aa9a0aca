"""The backend's options: ``torch.compile(model, backend="minference", options={...})``.

=============== ========================================================================
option          meaning
=============== ========================================================================
config          per-head pattern config: a path to a JSON file (our format or MInference's
                published per-layer lists), a shipped config's name, the same data as a
                dict/list, or a loaded :class:`~mi_compile.config.SparseConfig`
                (``triangle_mix_config(...)``); or a config family (configs searched at several
                lengths, each call running the one for its length: ``"qwen2.5-coder-1.5b"``, a
                :class:`~mi_compile.config.ConfigFamily`). Default: the default policy (every
                head vertical_slash(1000, 6096)), logged.
min_seq_len     prompts shorter than this run dense attention inside the op (sparse
                attention does not pay off on short prompts). Default: the config's own
                ``min_seq_len`` when it has one (the shipped Qwen2.5-Coder configs: 32768; a
                family: its members' smallest), else 65536 (measured on the Llama-3-8B shape,
                docs/results.md).
dense_layers    layer indices to leave dense (the original SDPA call is kept), e.g. [0, 1];
                an index past the model's last layer is an error once the graph shows it.
dump_dir        write each graph before/after the passes (readable code) and the explain
                table there; the same artifacts always go to TORCH_TRACE / tlparse.
mode            an Inductor mode, as ``torch.compile(mode=...)`` takes it ("default",
                "reduce-overhead", "max-autotune", ...): torch.compile refuses ``mode`` and
                ``options`` together, so with the backend's options the mode goes here.
cudagraphs      True / False: Inductor's ``triton.cudagraphs`` (CUDA-graph the compiled
                graph; "reduce-overhead" sets it), on its own or to confirm the mode's.
tp              tensor parallelism: ``{"rank": r, "size": T}`` makes this rank use global
                query heads ``[r*Hq/T, (r+1)*Hq/T)`` of the whole-model config; ``False``
                never slices (the config is for the heads the graph shows). Default (None):
                learned from the graph's DTensor parameters or torch.distributed
                (:mod:`mi_compile.tensor_parallel`).
=============== ========================================================================
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from .op import DEFAULT_MIN_SEQ_LEN


MAX_MIN_SEQ_LEN = 2**31 - 1   # no prompt is longer; larger values overflow the op's int argument


class OptionsError(ValueError):
    """A backend option with a bad name or value."""


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    config: Any = None
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    dense_layers: tuple[int, ...] = ()
    dump_dir: Optional[str] = None
    mode: Optional[str] = None
    cudagraphs: Optional[bool] = None
    tp: Any = None              # None | False | tensor_parallel.TPSlice

    def inductor_patches(self) -> dict:
        """The Inductor config patches these options ask for (``compile_fx(config_patches=)``)."""
        import torch._inductor

        patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
        if self.cudagraphs is not None:
            patches["triton.cudagraphs"] = self.cudagraphs
        return patches

    @property
    def uses_cudagraphs(self) -> bool:
        return bool(self.inductor_patches().get("triton.cudagraphs", False))

    def with_mode(self, mode: Optional[str]) -> "BackendOptions":
        """These options with ``mode`` (from ``torch.compile(mode=...)`` or
        ``mi_compile.backend(mode=...)``) merged in; a different mode already set is an error."""
        if mode is None or mode == self.mode:
            return self
        if self.mode is not None:
            raise OptionsError(f"mode {mode!r} given while option 'mode' is {self.mode!r}; give it once")
        return BackendOptions.from_user({**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                                         "mode": mode})

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
        from .config import ConfigFamily, SparseConfig      # not at import time: config.py imports this module

        if cfg is not None and not isinstance(cfg, (str, os.PathLike, dict, list, SparseConfig, ConfigFamily)):
            raise OptionsError(f"option 'config' must be a path, a dict, a list or a SparseConfig (or a "
                               f"ConfigFamily), got {type(cfg).__name__}")
        msl = opts.get("min_seq_len", DEFAULT_MIN_SEQ_LEN)
        if isinstance(msl, bool) or not isinstance(msl, int) or not 0 <= msl <= MAX_MIN_SEQ_LEN:
            raise OptionsError(f"option 'min_seq_len' must be an int >= 0 and <= 2**31 - 1, got {msl!r}")
        dl = opts.get("dense_layers", ())
        if (not isinstance(dl, (list, tuple, set, frozenset, range))
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in dl)):
            raise OptionsError(f"option 'dense_layers' must be a list of layer indices >= 0 "
                               f"(leave it out or give [] for none), got {dl!r}")
        opts["dense_layers"] = tuple(dl)
        dd = opts.get("dump_dir")
        if dd is not None and not isinstance(dd, (str, os.PathLike)):
            raise OptionsError(f"option 'dump_dir' must be a path, got {type(dd).__name__}")
        if dd is not None:
            opts["dump_dir"] = os.fspath(dd)
        _check_mode(opts.get("mode"), opts.get("cudagraphs"))
        if "tp" in opts:
            from .tensor_parallel import parse_tp_option

            opts["tp"] = parse_tp_option(opts["tp"])
        return cls(**opts)


def _check_mode(mode, cudagraphs):
    if cudagraphs is not None and not isinstance(cudagraphs, bool):
        raise OptionsError(f"option 'cudagraphs' must be True or False, got {cudagraphs!r}")
    if mode is None:
        return
    import torch._inductor

    modes = torch._inductor.list_mode_options()
    if not isinstance(mode, str) or mode not in modes:
        raise OptionsError(f"option 'mode' must be one of {sorted(modes)}, got {mode!r}")
    implied = modes[mode].get("triton.cudagraphs")
    if cudagraphs is False and implied:
        raise OptionsError(f"options mode={mode!r} and cudagraphs=False contradict each other "
                           f"({mode!r} turns CUDA graphs on)")
    if cudagraphs is True and "no-cudagraphs" in mode:
        raise OptionsError(f"options mode={mode!r} and cudagraphs=True contradict each other")
