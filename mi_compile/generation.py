"""``model.generate`` over a static cache with the attention mask built inside the compiled forward.

For a compileable cache (``StaticCache``, ``cache_implementation="static"``) transformers'
``generate`` turns the 2D attention mask into the 4D one before calling the model
(``create_masks_for_generate``), so that its own compiled decode graph sees fixed shapes. The 4D
mask then reaches the compiled graph as data, which the passes cannot prove causal: a question
chunk continuing a cached document stays dense. :func:`masks_in_forward` makes ``generate`` pass
the 2D mask on; the forward builds the 4D mask itself, inside the graph, where the passes read
it (``causal_static_offset``) and the chunk runs sparse. Logits are the same either way.

Chunks fed by hand: :func:`standard_strides` and :func:`contiguous_cache` keep a whole prompt
and its chunks on two compiled graphs (Dynamo guards strides; see each).
"""
from __future__ import annotations

import torch

_MARK = "_mi_compile_masks_in_forward"


def standard_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its strides are the contiguous ones, else a copy that has them.

    Dynamo guards an input's strides, size-1 dimensions included: a piece of ``ids.split(c,
    dim=1)`` keeps the row stride of ``ids`` (``is_contiguous()`` says True all the same), so a
    model compiled on a whole prompt compiles again for the first chunk. Feeding chunks
    through this keeps them on the graph a contiguous prompt compiled."""
    expected, step = [], 1
    for size in reversed(t.shape):
        expected.append(step)
        step *= size
    if tuple(reversed(expected)) == tuple(t.stride()):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def contiguous_cache(cache, *, copy: bool = False):
    """Give every key / value tensor of a transformers cache contiguous strides: a copy of those
    that have others (``copy=True``: of every one, e.g. to take them out of a CUDA graph's
    memory pool). Returns ``cache``.

    A prefill from an empty cache leaves views in it (the projections' ``[B, S, H, D]``
    transposed), a chunk that continued it the concatenated, contiguous tensors. Dynamo guards
    the cache's strides, so between the first chunk and the next the model would compile its
    chunk graph twice. A cache written in place (``StaticCache``: ``is_compileable``) is left as
    it is: its tensors' addresses are part of it."""
    if getattr(cache, "is_compileable", False):
        return cache
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, t.clone(memory_format=torch.contiguous_format) if copy else standard_strides(t))
    return cache


def _pass_2d_mask(**kwargs):
    """``create_masks_for_generate`` that leaves the mask to the forward: the 2D mask as given."""
    return kwargs["attention_mask"]


setattr(_pass_2d_mask, _MARK, True)


def masks_in_forward(model, enable: bool = True):
    """Make ``model.generate`` leave the causal mask to ``model``'s forward (``enable=False``
    restores transformers' behaviour). Returns ``model``.

    Use it with ``model.compile(backend="minference", dynamic=True)`` when ``generate`` runs over
    a ``StaticCache``: prefill chunks continuing the cache then run sparse. Decode steps stay
    dense as always. A model class that builds its own masks for ``generate`` (it defines
    ``create_masks_for_generate``, e.g. for token types) is refused: dropping its mask would
    change what it computes.
    """
    own = getattr(type(model), "create_masks_for_generate", None)
    if own is not None:
        raise ValueError(f"{type(model).__name__} defines its own create_masks_for_generate (its masks for "
                         "generate are not the plain causal one); mi_compile.masks_in_forward would drop them")
    current = vars(model).get("create_masks_for_generate")
    if current is not None and not getattr(current, _MARK, False):
        raise ValueError(f"{type(model).__name__} instance already has a create_masks_for_generate of its own "
                         f"({current!r}); mi_compile.masks_in_forward would replace it")
    if enable:
        model.create_masks_for_generate = _pass_2d_mask
    elif current is not None:
        del model.create_masks_for_generate
    return model
