"""Count the torch ops a piece of code dispatches (the op's host cost is mostly their number)."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.counts``: ATen op name -> calls (Triton launches
    are not torch ops and are not counted)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
