"""Small device constants without host-to-device copies inside CUDA-graph capture.

Every table built here is cached for the life of the process and never evicted: a CUDA graph
captured once keeps reading these tensors' addresses on every replay, so freeing one would
leave a graph reading reused memory. Entries are small (per-head ints), keyed by values, not
by the sequence length.
"""
from __future__ import annotations

import torch

_CACHE: dict = {}


def capturing(device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fill_on_device(values, device, dtype) -> torch.Tensor:
    """The same tensor as ``torch.tensor(values)``, written by device fills (capturable)."""
    t = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        t[i].fill_(v)
    return t


def device_ints(values, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Tensor of ``values`` on ``device`` (int64 unless ``dtype``), cached: the first (eager)
    call copies it there, later calls (e.g. while a CUDA graph is being captured) reuse it, so
    no copy is issued. A first call during a capture writes it with device fills instead and
    does not cache it (memory allocated in a capture belongs to that graph)."""
    key = (tuple(int(v) for v in values), str(torch.device(device)), dtype)
    t = _CACHE.get(key)
    if t is None:
        if capturing(device):
            return _fill_on_device(key[0], device, dtype)
        t = _CACHE[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return t


def contiguous_last(*tensors: torch.Tensor):
    """The tensors with a unit stride in the last dim (copied only where they lack one): what
    the kernels' tile loads assume. One tensor in, one out; several in, a tuple out."""
    out = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)
    return out[0] if len(out) == 1 else out


def cached(key, device, build):
    """``build()`` once per ``(key, device)``, kept for the process (see the module doc); while a
    CUDA graph is being captured on ``device`` a missing entry is built but not kept. ``build``
    must then avoid host-to-device copies (:func:`device_ints` does)."""
    full = (key, device if isinstance(device, torch.device) else torch.device(device))
    value = _CACHE.get(full)
    if value is None:
        value = build()
        if not capturing(device):
            _CACHE[full] = value
    return value
