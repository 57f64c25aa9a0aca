"""Small device constants without host-to-device copies inside CUDA-graph capture."""
from __future__ import annotations

import torch

_CACHE: dict = {}


def device_ints(values, device) -> torch.Tensor:
    """int64 tensor of ``values`` on ``device``, cached: the first (eager) call copies it there,
    later calls (e.g. while a CUDA graph is being captured) reuse it, so no copy is issued."""
    key = (tuple(int(v) for v in values), str(torch.device(device)))
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = torch.tensor(key[0], dtype=torch.int64, device=device)
    return t
