"""``model.generate`` over a static cache with the attention mask built inside the compiled forward.

For a compileable cache (``StaticCache``, ``cache_implementation="static"``) transformers'
``generate`` turns the 2D attention mask into the 4D one before calling the model
(``create_masks_for_generate``), so that its own compiled decode graph sees fixed shapes. The 4D
mask then reaches the compiled graph as data, which the passes cannot prove causal: a question
chunk continuing a cached document stays dense. :func:`masks_in_forward` makes ``generate`` pass
the 2D mask on; the forward builds the 4D mask itself, inside the graph, where the passes read
it (``causal_static_offset``) and the chunk runs sparse. Logits are the same either way.
"""
from __future__ import annotations

_MARK = "_mi_compile_masks_in_forward"


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
