"""``torch.ops.mi_compile.sparse_attention``: the op the rewritten graphs call.

Why an opaque op (registered below) and not ``triton_op`` + ``wrap_triton``: the op decides at run
time, from the actual sequence length, whether to run sparse or dense (short prompts and the
``min_seq_len`` threshold go dense), and its index builders size their top-k by the length.
Inside a ``triton_op`` those Python branches on symbolic sizes would be traced by Inductor and
turn into shape guards (recompiles per length class) on torch 2.11/2.13, and the vertical-slash
index builder mixes torch ops with Triton launches in ways that ``wrap_triton`` tracing does not
cover on both versions. An opaque custom op with a fake (meta) implementation keeps the
whole model one graph with no guards on the length; Inductor still fuses everything around it.
The op is sync-free, so the compiled model stays CUDA-graph capturable.

Arguments:
    q ``[B, Hq, nq, D]``, k/v ``[B, Hkv, nk, D]``, ``nq <= nk`` (Hq % Hkv == 0; K/V are not
    repeated),
    heads: the layer's per-head patterns, flattened by :func:`mi_compile.patterns.spec.encode_heads`,
    scale: softmax scale (None: 1/sqrt(D)),
    key_padding_mask: optional ``[B, nk]`` bool (True = real token), left or right padding
    (``nq < nk``: left padding only, asserted on the device where the sparse path runs),
    window: sliding-window size of the original mask (0 = none), used by the dense path,
    min_seq_len: below this many keys the op runs dense attention (sparse does not pay off),
    layer: the decoder layer this call belongs to (-1 if unknown), for observers (see
    :func:`observe_attention`) and error messages,
    prompt_length: the prompt length the heads' counts were chosen for (the config's
    ``length``; 0: not given); a chunk with fewer keys keeps that share of each vertical-slash
    head's columns (:func:`mi_compile.patterns.index.chunk_heads`),
    family: empty, or a config family's members (:class:`mi_compile.config.ConfigFamily`) in
    ascending length as ``(length, table_end)`` pairs; ``heads`` is then the concatenation of
    the members' head tables, member ``i``'s being ``heads[end_{i-1}:end_i]`` (``end_{-1} = 0``).
    Each call first picks the member from its key count ``nk``: the first with ``nk <= length``,
    else the last; it then runs as above with that member's table and ``prompt_length`` its
    ``length``. The choice reads a tensor shape: no host sync, no guard, one graph for all
    lengths.
Semantics: causal attention restricted to each head's pattern for prefills of at least
``min_seq_len`` tokens; otherwise exactly the dense attention of the original call. Where the
kernels would run, an unpadded layer whose heads are all dense runs SDPA instead (flash /
cuDNN: the same pairs, faster than the sparse kernels on dense work).

``nq < nk`` is a prefill that continues a cache (chunked prefill, a later turn): query row
``r`` is key position ``nk - nq + r`` (bottom-right aligned causal) and gets that position's
row of the whole sequence's sparse prefill (see :func:`mi_compile.sparse.sparse_attention`).
Such a call runs dense when ``nk < min_seq_len``, when ``nq < 64`` (less than one query block:
the index costs more than it saves), and for layers :func:`chunk_dense_reason` names (none of
the registered patterns: every one takes a chunk).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .kernels.constants import BLOCK, INTS_PER_HEAD
from .kernels.dispatch import op_attention_impl

# Below this many tokens (keys: the context length) the op runs dense attention. Measured on the
# H100 (README, "Measured"): the 8B model with MInference's per-head Llama-3.1 config breaks even with eager
# cuDNN attention at 64K tokens (1.00x) and wins at 128K (0.80x); at 8K-32K sparse loses
# (1.11x-1.20x), and the vertical-slash kernel alone loses to cuDNN at 32K (0.58x) and wins at
# 128K (1.24x).
DEFAULT_MIN_SEQ_LEN = 65536


def padding_to_ranges(key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, n]`` bool mask of real tokens -> (seq_start, seq_len) int32 ``[B]``, without a host sync.

    Left and right padding are both contiguous runs; a mask with holes cannot be expressed as a
    range and fails loudly (``torch._assert_async``) rather than giving a wrong answer.
    """
    valid = key_padding_mask.to(torch.bool)
    n = valid.shape[-1]
    as_int = valid.to(torch.int32)
    seq_len = as_int.sum(-1, dtype=torch.int32)
    first = torch.argmax(as_int, dim=-1).to(torch.int32)
    last = (n - 1) - torch.argmax(as_int.flip(-1), dim=-1).to(torch.int32)
    contiguous = (seq_len == 0) | (last - first + 1 == seq_len)
    torch._assert_async(contiguous.all(), "mi_compile.sparse_attention: attention_mask has holes "
                        "(only left or right padding is supported)")
    return first * (seq_len > 0), seq_len


def dense_attention(q, k, v, scale, key_padding_mask=None, window: int = 0):
    """The original call's meaning: causal (+ padding, + sliding window) dense attention;
    with ``nq < nk`` bottom-right aligned (query row ``r`` is key position ``nk - nq + r``)."""
    gqa = q.shape[1] != k.shape[1]
    nq, nk = q.shape[-2], k.shape[-2]
    if key_padding_mask is None and not window and nq == nk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    i = torch.arange(nq, device=q.device) + (nk - nq)
    j = torch.arange(nk, device=q.device)
    allowed = j[None, :] <= i[:, None]
    if window:
        allowed = allowed & (i[:, None] - j[None, :] < window)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    # A query with no visible key (a padding row) would be NaN; its value is never used.
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


def _output_like(q, v) -> torch.Tensor:
    """The op's output: shape ``[B, Hq, nq, Dv]`` laid out as ``[B, nq, Hq, Dv]``.

    That is the layout the model's next step wants (``out.transpose(1, 2).reshape(b, n, -1)``
    is then free), and the fake implementation promises exactly these strides to Inductor.
    """
    b, h, n, _ = q.shape
    return q.new_empty((b, n, h, v.shape[-1])).transpose(1, 2)


_OBSERVERS: list = []


@contextlib.contextmanager
def observe_attention(fn):
    """Call ``fn(layer, q, k, v, key_padding_mask)`` at every run of the op inside the block.

    This is how tools see each layer's real q/k through the backend itself, with no
    model-specific patches (the offline pattern search uses it). Observers run eagerly, in
    the op's implementation, also when Inductor compiled the rest of the model.
    """
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


def _sparse_attention_impl(q, k, v, heads, scale, key_padding_mask, window, min_seq_len, layer, prompt_length=0,
                           family=()):
    for fn in list(_OBSERVERS):
        fn(layer, q, k, v, key_padding_mask)
    if family:
        heads, prompt_length = _family_member(family, heads, k.shape[-2], layer)
    out = _output_like(q, v)
    res = _sparse_or_dense(q, k, v, heads, scale, key_padding_mask, window, min_seq_len, layer, out,
                           prompt_length)
    if res is out or res.stride() == out.stride():
        return res
    return out.copy_(res)


def chunk_dense_reason(heads_patterns) -> str | None:
    """Why a layer with these heads (a sequence of
    :class:`~mi_compile.patterns.spec.HeadPattern`) cannot run a ``q_len < kv_len`` call (a
    chunk continuing a cache) sparse, or None when it can; such calls then run dense. Every
    registered pattern can (static patterns by position, the selecting ones from the chunk's
    own queries); a pattern whose selection could not take a chunk would say why
    (``PatternSpec.chunk_reason``)."""
    from .patterns.index import chunk_reason

    return chunk_reason(tuple(heads_patterns))


_LAYER_FACTS: dict = {}      # flat head table -> (every head dense, chunk_dense_reason)


def _layer_facts(heads) -> tuple:
    """``(every head dense, why a chunk runs dense or None)`` of a flat head table, worked out
    once per distinct table (a model has a few), from the decode the sparse path shares."""
    key = tuple(heads)
    facts = _LAYER_FACTS.get(key)
    if facts is None:
        from .sparse import _as_patterns

        patterns = _as_patterns(key)
        facts = (all(h.kind == "dense" for h in patterns), chunk_dense_reason(patterns))
        if len(_LAYER_FACTS) >= 4096:
            _LAYER_FACTS.clear()
        _LAYER_FACTS[key] = facts
    return facts


def family_member(members, n_k: int):
    """The member of ``members`` (``(length, ...)`` tuples in ascending length) that a call over
    ``n_k`` keys runs: the first with ``n_k <= length``, else the last. The one rule of a config
    family, shared by :class:`~mi_compile.config.ConfigFamily`, the op, the passes' sites and the
    explain table."""
    for member in members:
        if n_k <= member[0]:
            return member
    return members[-1]


_FAMILIES: dict = {}         # (family list, flat head tables) -> ((length, member table), ...)


def _family_members(family, heads, layer) -> tuple:
    """``((length, member head table), ...)`` in ascending length of a ``family`` argument over
    the concatenated ``heads``, checked and split once per distinct pair of lists."""
    key = (tuple(family), tuple(heads))
    members = _FAMILIES.get(key)
    if members is None:
        members = _split_family(*key, layer)
        if len(_FAMILIES) >= 4096:
            _FAMILIES.clear()
        _FAMILIES[key] = members
    return members


def _split_family(family: tuple, heads: tuple, layer) -> tuple:
    where = f"mi_compile.sparse_attention (layer {layer}): family {list(family)}"
    if len(family) % 2:
        raise ValueError(f"{where}: must hold (length, table_end) pairs, got an odd count {len(family)}")
    lengths, ends = family[0::2], family[1::2]
    if any(int(n) < 1 for n in lengths) or any(a >= b for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"{where}: member lengths {list(lengths)} must be positive and strictly ascending")
    starts = (0,) + tuple(ends[:-1])
    if any(a >= b for a, b in zip(starts, ends)) or ends[-1] != len(heads):
        raise ValueError(f"{where}: table ends {list(ends)} must increase from above 0 to the head table's "
                         f"length {len(heads)}")
    sizes = {b - a for a, b in zip(starts, ends)}
    if any(size % INTS_PER_HEAD for size in sizes) or len(sizes) != 1:
        raise ValueError(f"{where}: member tables of {sorted(sizes)} ints: each must hold the same heads, "
                         f"{INTS_PER_HEAD} ints a head")
    return tuple((int(n), heads[a:b]) for n, a, b in zip(lengths, starts, ends))


def _family_member(family, heads, n_k: int, layer) -> tuple:
    """``(head table, prompt_length)`` of the family member a call over ``n_k`` keys runs: the
    first in ascending length with ``n_k <= length``, else the last."""
    length, table = family_member(_family_members(family, heads, layer), n_k)
    return table, length


def _sparse_or_dense(q, k, v, heads, scale, key_padding_mask, window, min_seq_len, layer, out=None,
                     prompt_length=0):
    """Dense attention below ``min_seq_len``, else the sparse path, written into ``out`` when
    the sparse path runs (the kernel stores straight into the op's output layout).

    ``min_seq_len`` is compared with the key length: a chunk's rows see as many keys as the
    last rows of a whole prefill of that length, so they save what those rows save."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q > n_k:
        raise ValueError(f"mi_compile.sparse_attention (layer {layer}): query length {n_q} > key length {n_k} "
                         "(a prefill has them equal, a chunk that continues a cache fewer queries)")
    # a chunk runs dense below one query block, or for heads that cannot take one
    if n_k < max(int(min_seq_len), 1) or (n_q < n_k and (n_q < BLOCK or _layer_facts(heads)[1] is not None)):
        return dense_attention(q, k, v, scale, key_padding_mask, window)
    impl = op_attention_impl(q)
    if impl == "triton" and key_padding_mask is None and not window and _layer_facts(heads)[0]:
        # a layer of dense heads (TriangleMix's shallow layers, a searched all-dense layer):
        # flash / cuDNN attention computes the same, faster than the sparse kernels do
        return dense_attention(q, k, v, scale)
    from .sparse import _sparse_attention  # the Triton kernels and their PyTorch reference

    seq_start = seq_len = None
    if key_padding_mask is not None:
        seq_start, seq_len = padding_to_ranges(key_padding_mask)
        if n_q < n_k:
            torch._assert_async(((seq_start + seq_len == n_k) | (seq_len == 0)).all(),
                                "mi_compile.sparse_attention: a chunk (q_len < kv_len) needs left padding "
                                "only (every input's real tokens must end at kv_len)")
    # heads stay the flat int list: mi_compile.sparse decodes each distinct list once. The
    # ranges come from the padding mask, so they are valid: no value check (a host sync) here.
    return _sparse_attention(q, k, v, heads, scale, seq_start, seq_len, impl, out, int(prompt_length))


# Registered with torch.library.Library rather than torch.library.custom_op: custom_op wraps
# the kernel in two Python layers (an autograd function and an aliasing check) that cost ~0.1 ms
# a call on the GPU host; here the dispatcher calls the implementation directly. The schema
# is custom_op's for this signature. The op has no autograd formula (inference only: the
# backend leaves graphs that need gradients alone).
_LIB = torch.library.Library("mi_compile", "FRAGMENT")
_LIB.define("sparse_attention(Tensor q, Tensor k, Tensor v, SymInt[] heads, float? scale, "
            "Tensor? key_padding_mask, SymInt window, SymInt min_seq_len, SymInt layer, "
            "SymInt prompt_length=0, SymInt[] family=[]) -> Tensor",
            tags=(torch.Tag.pt2_compliant_tag,))
# CPU: the PyTorch reference of the same selection (MI_COMPILE_CPU_IMPL=triton: the Triton
# kernels through the interpreter); CUDA: the Triton kernels.
_LIB.impl("sparse_attention", _sparse_attention_impl, "CPU")
_LIB.impl("sparse_attention", _sparse_attention_impl, "CUDA")


def _sparse_attention_fake(q, k, v, heads, scale, key_padding_mask, window, min_seq_len, layer, prompt_length=0,
                           family=()):
    return _output_like(q, v)


torch.library.register_fake("mi_compile::sparse_attention", _sparse_attention_fake, lib=_LIB)
sparse_attention_op = torch.ops.mi_compile.sparse_attention.default
