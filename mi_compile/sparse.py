"""Public entry point: MInference-style sparse attention for causal prefill.

``sparse_attention(q, k, v, heads)`` builds the per-head sparse index on the inputs' device
(vertical-slash estimate, block-sparse pooling, top-k in PyTorch; on CUDA the tables after the
top-k in two fused launches; no host synchronisation) and runs one Triton launch for all heads,
or the float32 PyTorch reference. A q shorter than k/v is a chunk that continues a cache
(chunked prefill, a later turn): its rows are the last rows of the whole sequence's prefill.
A compiled model calls it with the same few signatures over and over, so inputs are validated
and heads decoded once per signature, and each layer's static tables are built once
(:func:`mi_compile.patterns.index.index_plan`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .kernels.dispatch import attention_impl
from .patterns.index import (SparseIndex, build_index, chunk_reason, normalize_sequences,
                             selection_mask_from_index)
from .patterns.reference import reference_attention
from .patterns.spec import HeadPattern, PatternError, decode_heads

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

__all__ = ["sparse_attention", "selection_mask", "selection_density", "build_sparse_index",
           "sparse_attention_from_index", "check_index", "SparseIndex", "HeadPattern"]


_PATTERNS: dict = {}      # tuple(heads) -> tuple of HeadPattern
_VALIDATED: dict = {}     # input signature -> tuple of HeadPattern (inputs known good)
_CACHE_LIMIT = 4096       # plain Python entries; cleared when full (dynamic lengths)


def _as_patterns(heads) -> tuple:
    """HeadPattern objects, pattern names, or the flat ``int[]`` of :func:`encode_heads`, as a
    tuple of HeadPattern (decoded once per distinct list)."""
    key = tuple(heads)
    try:
        hash(key)
    except TypeError:
        raise ValueError("heads must be HeadPattern objects, pattern names or an encoded int list; got "
                         f"unhashable entries ({', '.join(sorted({type(h).__name__ for h in key}))})") from None
    patterns = _PATTERNS.get(key)
    if patterns is None:
        patterns = _decode_patterns(key)
        if len(_PATTERNS) >= _CACHE_LIMIT:
            _PATTERNS.clear()
        _PATTERNS[key] = patterns
    return patterns


def _decode_patterns(heads: tuple) -> tuple:
    if heads and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        try:
            return tuple(decode_heads(heads))
        except PatternError as e:
            raise ValueError(f"bad encoded head list: {e}") from None
    out = []
    for h in heads:
        if isinstance(h, HeadPattern):
            out.append(h)
        elif isinstance(h, str):
            out.append(HeadPattern(h))
        else:
            raise ValueError(f"heads must be HeadPattern objects, got {type(h).__name__}")
    return tuple(out)


def _validate(q, k, v, heads, seq_start, seq_len, check_v=True) -> tuple:
    """Check shapes, dtypes and heads; returns the heads as a tuple of HeadPattern.

    Checked once per distinct signature (shapes, dtypes, devices, head count, the sequence
    tables' shapes, dtypes and devices; never their values, see :func:`_check_sequence_values`):
    a compiled model calls the op with the same few signatures over and over. (The heads
    themselves are checked when first decoded.)"""
    _check_tensors(q, k, v, check_v)
    if isinstance(heads, (str, HeadPattern)) or not hasattr(heads, "__iter__"):
        raise ValueError(f"heads must be a sequence of HeadPattern (one per query head), got {type(heads).__name__}")
    heads = _as_patterns(heads)
    key = (q.shape, k.shape, v.shape if check_v else None, q.dtype, k.dtype, v.dtype if check_v else None,
           q.device, len(heads), *(None if t is None else (t.shape, t.dtype, t.device) for t in (seq_start, seq_len)))
    if key in _VALIDATED:
        return heads
    _check_inputs(q, k, v, heads, seq_start, seq_len, check_v)
    if len(_VALIDATED) >= _CACHE_LIMIT:
        _VALIDATED.clear()
    _VALIDATED[key] = True
    return heads


def _check_tensors(q, k, v, check_v=True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v))[:3 if check_v else 2]:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_inputs(q, k, v, heads, seq_start, seq_len, check_v):
    if q.dim() != 4 or k.dim() != 4 or (check_v and v.dim() != 4):
        raise ValueError(f"expected q [B, Hq, q_len, D] and k/v [B, Hkv, kv_len, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}" + (f", v {tuple(v.shape)}" if check_v else ""))
    B, Hq, n, D = q.shape
    if check_v and k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if n > k.shape[2]:
        raise ValueError(f"q_len {n} > kv_len {k.shape[2]}: a prefill has q_len == kv_len, a chunk that "
                         "continues a cache q_len < kv_len (its queries are the last q_len positions)")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    dtypes = {q.dtype, k.dtype} | ({v.dtype} if check_v else set())
    if len(dtypes) != 1:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}" + (f", {v.dtype}" if check_v else ""))
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} unsupported; use float16, bfloat16 or float32")
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM) or D % 8:
        raise ValueError(f"head_dim {D} unsupported: need {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM} "
                         "and D a multiple of 8")
    if n == 0:
        raise ValueError("empty sequence (n == 0)" if k.shape[2] == 0 else "empty query chunk (q_len == 0)")
    if len(heads) != Hq:
        raise ValueError(f"got {len(heads)} head patterns for {Hq} query heads")
    if n < k.shape[2]:
        reason = chunk_reason(heads)
        if reason is not None:
            raise ValueError(f"q_len {n} < kv_len {k.shape[2]} (a chunk) is not supported for these heads: {reason}")
    for name, t in (("seq_start", seq_start), ("seq_len", seq_len)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"{name} must have shape [B] = [{B}], got {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int32), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}; they must be on the same device")


def _check_sequence_values(q, seq_start, seq_len, n=None) -> None:
    """Raise ValueError unless every sequence ``[start, start + len)`` lies inside ``[0, n)``
    (``n``: the key length, q's length unless given), and, for a chunk (q shorter than ``n``),
    ends at ``n`` (left padding only; empty sequences aside).

    The values live on the device, so this costs one host sync; it runs in the public entry
    points only (never cached: values are not part of a signature). The compiled op derives
    the ranges from a padding mask itself and skips it. Out-of-range values would make the
    kernels read and write out of bounds. While a CUDA graph is being captured the check is a
    ``torch._assert_async`` instead (no sync)."""
    if seq_start is None and seq_len is None:
        return
    n = q.shape[2] if n is None else n
    chunk = q.shape[2] < n
    start = None if seq_start is None else seq_start.to(torch.int64)
    length = None if seq_len is None else seq_len.to(torch.int64)
    if start is None:
        start = torch.zeros_like(length)
    if length is None:
        length = n - start
    checks = (("seq_start", start, start < 0, "must be >= 0"),
              ("seq_start", start, start > n, f"must be <= n = {n}"),
              ("seq_len", length, length < 0, "must be >= 0"),
              ("seq_start + seq_len", start + length, start + length > n, f"must be <= n = {n}"))
    if chunk:
        checks += (("seq_start + seq_len", start + length, (start + length != n) & (length > 0),
                    f"must be kv_len = {n} for a chunk (q_len {q.shape[2]} < kv_len: left padding only)"),)
    bad = torch.stack([c[2] for c in checks])
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        torch._assert_async(~bad.any(), "mi_compile.sparse_attention: seq_start/seq_len out of range "
                            f"(need 0 <= seq_start, 0 <= seq_len, seq_start + seq_len <= n = {n}"
                            + (", and == n for a chunk: left padding only)" if chunk else ")"))
        return
    if not bool(bad.any()):
        return
    for name, values, fails, rule in checks:
        if bool(fails.any()):
            b = int(fails.nonzero()[0, 0])
            extra = (f" (seq_start {int(start[b])}, seq_len {int(length[b])})"
                     if name == "seq_start + seq_len" else "")
            raise ValueError(f"{name} {rule}; got {int(values[b])} for sequence {b}{extra}")


def _scale(q, scale) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    try:
        value = None if isinstance(scale, (bool, str)) else float(scale)
    except (TypeError, ValueError, RuntimeError):
        value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"scale must be a finite number (default 1/sqrt(head_dim)), got {scale!r}")
    return value


def _check_vs_selection(q, vs_selection) -> None:
    """``vs_selection`` must be ``(keys, offsets)``, integer tensors ``[B, Hq, *]`` on q's device
    (any values: out-of-range entries are dropped by the builder)."""
    if vs_selection is None:
        return
    if not isinstance(vs_selection, (tuple, list)) or len(vs_selection) != 2:
        raise ValueError(f"vs_selection must be a pair (keys, offsets) of int tensors [B, Hq, *], "
                         f"got {type(vs_selection).__name__}")
    B, H = q.shape[:2]
    for name, t in zip(("keys", "offsets"), vs_selection):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"vs_selection {name} must be a tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"vs_selection {name} must be an integer tensor, got {t.dtype}")
        if t.dim() != 3 or tuple(t.shape[:2]) != (B, H):
            raise ValueError(f"vs_selection {name} must have shape [B, Hq, *] = [{B}, {H}, *], got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"vs_selection {name} is on {t.device}, q on {q.device}")


def _build(q, k, heads: tuple, scale: float, seq_start, seq_len, vs_selection=None,
           prompt_length: int = 0) -> SparseIndex:
    """The index for validated inputs."""
    unpadded = seq_start is None and seq_len is None
    seq_start, seq_len = normalize_sequences(q, seq_start, seq_len, k.shape[2])
    with torch.no_grad():
        return build_index(q, k, heads, scale, seq_start, seq_len, vs_selection, unpadded=unpadded,
                           prompt_length=_prompt_length(prompt_length))


def _prompt_length(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"prompt_length must be an int >= 0 (the prompt length the heads' counts were "
                         f"chosen for, 0: not given), got {value!r}")
    return value


def build_sparse_index(q, k, heads, *, scale=None, seq_start=None, seq_len=None,
                       vs_selection=None, prompt_length: int = 0) -> SparseIndex:
    """Validate and build the unified index (estimate + top-k + conversion) on q's device.

    ``vs_selection=(keys, offsets)`` (int tensors ``[B, Hq, *]``) gives vertical-slash heads an
    explicit selection instead of the estimate (timing on a fixed index); ``prompt_length`` as
    :func:`sparse_attention`'s."""
    heads = _validate(q, k, None, heads, seq_start, seq_len, check_v=False)
    _check_sequence_values(q, seq_start, seq_len, k.shape[2])
    _check_vs_selection(q, vs_selection)
    return _build(q, k, heads, _scale(q, scale), seq_start, seq_len, vs_selection, prompt_length)


# (table, dtype, shape) of every SparseIndex table, shapes in terms of B, H, n (keys), NQB; a name
# ends the shape with a free width (>= 1) shared by the tables that name it.
_INDEX_TABLES = (
    ("seq_start", torch.int32, ("B",)), ("seq_len", torch.int32, ("B",)),
    ("prefix", torch.int32, ("H",)), ("sink", torch.int32, ("H",)), ("band", torch.int32, ("H",)),
    ("last", torch.int32, ("H",)),
    ("group_lo", torch.int32, ("B", "H", "G")), ("group_hi", torch.int32, ("B", "H", "G")),
    ("groups_upto", torch.int32, ("B", "H", "NQB")),
    ("tile_start", torch.int32, ("B", "H", "T")), ("tile_end", torch.int32, ("B", "H", "T")),
    ("tiles_upto", torch.int32, ("B", "H", "NQB")),
    ("columns", torch.int32, ("B", "H", "V")), ("columns_upto", torch.int32, ("B", "H", "NQB")),
    ("covered", torch.uint8, ("B", "H", "n+64")),
    ("blocks", torch.int32, ("B", "H", "NQB", "K")), ("block_count", torch.int32, ("B", "H", "NQB")),
    ("offsets", torch.int32, ("B", "H", "S")),
)


def check_index(q, k, index) -> None:
    """Raise ValueError (naming the table) unless ``index`` fits ``q`` / ``k``: its lengths
    (keys ``n``, queries ``q_len``) and heads, and every table's dtype, shape, device and (the
    kernels compute flat offsets) contiguity. Values are not checked here (that would cost a
    host sync); the kernels mask every position they derive from a table to its valid range
    instead."""
    if not isinstance(index, SparseIndex):
        raise ValueError(f"index must be a SparseIndex, got {type(index).__name__}")
    B, H, nq, _ = q.shape
    n = k.shape[2]
    if index.n != n:
        have = f"q has n = {n}" if nq == n else f"k has kv_len = {n}"
        raise ValueError(f"index.n is {index.n!r}, {have} (the index was built for another length)")
    if index.num_queries != nq:
        raise ValueError(f"index.q_len is {index.q_len!r}, q has q_len = {nq} (the index was built for "
                         "another chunk; None means a whole prefill, q_len = n)")
    heads = tuple(index.heads) if isinstance(index.heads, (tuple, list)) else None
    if heads is None or len(heads) != H or not all(isinstance(h, HeadPattern) for h in heads):
        got = f"{len(heads)} entries" if heads is not None else type(index.heads).__name__
        raise ValueError(f"index.heads must hold {H} HeadPattern (one per query head of q), got {got}")
    sizes = {"B": B, "H": H, "n+64": n + 64, "NQB": index.num_query_blocks}
    for name, dtype, dims in _INDEX_TABLES:
        t = getattr(index, name)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"index.{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"index.{name} must be {dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"index.{name} is on {t.device}, q on {q.device}; they must be on the same device")
        if t.dim() != len(dims):
            raise ValueError(f"index.{name} must have {len(dims)} dims [{', '.join(dims)}], got {tuple(t.shape)}")
        for size, dim in zip(t.shape, dims):
            want = sizes.setdefault(dim, size)
            if size != want or size < 1:
                shape = ", ".join(f"{d}={sizes[d]}" if d in sizes else d for d in dims)
                raise ValueError(f"index.{name} has shape {tuple(t.shape)}, expected [{shape}] "
                                 f"(dim {dim} must be {want} and >= 1)")
        if not t.is_contiguous():
            raise ValueError(f"index.{name} must be contiguous (strides {t.stride()})")


def _check_reference_values(q, index) -> None:
    """The reference path scatters the raw selection into tables; negative entries would fail
    deep inside PyTorch, so they are refused here (the reference is slow anyway: one sync)."""
    _check_sequence_values(q, index.seq_start, index.seq_len, index.n)
    for name in ("columns", "offsets", "blocks"):
        t = getattr(index, name)
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"index.{name} must be >= 0 (SENTINEL = 2**30 for unused slots); "
                             f"got {int(t.min())}")


def sparse_attention_from_index(q, k, v, index: SparseIndex, *, scale=None, impl="auto",
                                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attend exactly the pairs ``index`` selects (kernel or reference); see
    :func:`sparse_attention`. ``out`` (q's shape and dtype, last dim contiguous; any other
    layout) is written in full and returned.

    A hand-made or edited ``index`` is checked against q/k (:func:`check_index`: ValueError
    naming the table). Its values are trusted only as far as the kernels' bounds contract
    goes: garbage entries can make a wrong answer but never an out-of-bounds access."""
    if not isinstance(index, SparseIndex):
        raise ValueError(f"index must be a SparseIndex, got {type(index).__name__}")
    if not isinstance(index.heads, (tuple, list)) or not all(isinstance(h, HeadPattern) for h in index.heads):
        raise ValueError("index.heads must be a tuple of HeadPattern, one per query head")
    _check_tensors(q, k, v)
    _check_inputs(q, k, v, tuple(index.heads), None, None, True)   # not cached: a user's index
    check_index(q, k, index)
    _check_out(q, out)
    return _attend_index(q, k, v, index, scale, impl, out, user_index=True)


def _check_out(q, out) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"out must have q's shape, dtype and device ({tuple(q.shape)} {q.dtype} on {q.device}), "
                         f"got {got}")
    if out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")


def _attend_index(q, k, v, index, scale, impl, out, user_index=False):
    """:func:`sparse_attention_from_index` without the checks (the index was built here)."""
    scale = _scale(q, scale)
    if attention_impl(q, impl) == "reference":
        if user_index:
            _check_reference_values(q, index)
        res = reference_attention(q, k, v, index, scale).to(q.dtype)
        return res if out is None else out.copy_(res)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "mi_compile.sparse_attention with impl='triton' is inference-only (the kernels have no "
            "backward, the output would silently carry no gradient); run it under torch.no_grad() / "
            "torch.inference_mode(), detach the inputs, or use impl='reference' to differentiate")
    from .kernels.sparse_attention import sparse_attention_from_index as run_kernel
    if _interpreter_bf16(q):
        res = run_kernel(q.float(), k.float(), v.float(), index, scale).to(q.dtype)
        return res if out is None else out.copy_(res)
    return run_kernel(q, k, v, index, scale, out=out)


def _interpreter_bf16(q) -> bool:
    """True for bf16 CPU tensors under ``TRITON_INTERPRET=1``: Triton's interpreter computes
    bf16 wrongly (values ~1e9), so such calls run the kernels in float32 (bf16 converts to
    float32 exactly) and cast the result back."""
    return q.dtype == torch.bfloat16 and not q.is_cuda


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     heads: Sequence[HeadPattern], *, scale: Optional[float] = None,
                     seq_start: Optional[torch.Tensor] = None,
                     seq_len: Optional[torch.Tensor] = None, impl: str = "auto",
                     out: Optional[torch.Tensor] = None, prompt_length: int = 0) -> torch.Tensor:
    """Causal sparse attention for a prefill, one pattern per query head.

    q ``[B, Hq, nq, D]``, k/v ``[B, Hkv, n, D]``, ``nq <= n`` (``Hq % Hkv == 0``; query head
    ``h`` reads KV head ``h // (Hq // Hkv)``); ``heads``: ``Hq`` :class:`HeadPattern`; ``scale``
    defaults to ``1/sqrt(D)``. ``seq_start``/``seq_len`` (int32 ``[B]``): sequence ``b`` is key
    rows ``[start, start + len)``, treated as if alone (its own positions, sinks and estimate);
    other output rows are 0. ``nq < n`` is a chunk continuing a cache: query row ``r`` is key
    position ``n - nq + r`` and computes the row of that position in the whole sequence's
    prefill (bottom-right aligned causal; every pattern defined on the whole sequence;
    vertical-slash estimated from the chunk's last ``min(64, nq)`` queries, block-sparse and
    xattention from the chunk's own query blocks, flex_prefill from both); sequences must then
    end at ``n`` (left padding only). ``prompt_length``: the prompt length the heads' counts
    were chosen for; a chunk with fewer keys keeps its share of each vertical-slash head's
    columns (:func:`mi_compile.patterns.index.chunk_heads`; 0, the default: the full counts).
    ``impl``: "triton", "reference" (float32 PyTorch) or "auto" (triton on CUDA or under
    ``TRITON_INTERPRET=1``, else reference). Returns q's dtype, in ``out`` when given (q's
    shape and dtype, last dim contiguous, any layout).

    Sync-free and CUDA-graph capturable on GPU, except that given ``seq_start``/``seq_len``
    are range-checked (``0 <= start``, ``0 <= len``, ``start + len <= n``, ``== n`` for a
    chunk; a ValueError otherwise) with one host sync, or a ``torch._assert_async`` while a
    CUDA graph is being captured. Extra memory O(n) per head (the estimate's float32 buffer is chunked to ~256
    MiB). Inputs are validated once per signature, the heads' static tables built once per
    layer (``mi_compile.patterns.index.index_plan``). The Triton path is inference-only
    (NotImplementedError when an input requires grad in grad mode); bf16 under Triton's
    interpreter runs the kernels in float32 and casts back.
    """
    heads = _validate(q, k, v, heads, seq_start, seq_len)
    _check_sequence_values(q, seq_start, seq_len, k.shape[2])
    return _sparse_attention(q, k, v, heads, scale, seq_start, seq_len, impl, out, prompt_length)


def _sparse_attention(q, k, v, heads, scale, seq_start, seq_len, impl, out, prompt_length=0):
    """:func:`sparse_attention` without the value check of ``seq_start`` / ``seq_len`` (a host
    sync): the compiled op calls this with ranges it derived from a padding mask itself."""
    heads = _validate(q, k, v, heads, seq_start, seq_len)
    impl = attention_impl(q, impl)
    scale = _scale(q, scale)
    index = _build(q, k, heads, scale, seq_start, seq_len, prompt_length=prompt_length)
    return _attend_index(q, k, v, index, scale, impl, out)


def selection_mask(q, k, heads, seq_start=None, seq_len=None, *, scale=None, prompt_length=0) -> torch.Tensor:
    """bool ``[B, Hq, nq, n]`` (tensor coordinates; ``nq < n``: a chunk, query row ``r`` is key
    position ``n - nq + r``): exactly the pairs the kernel computes. Small n only (nq x n per head)."""
    index = build_sparse_index(q, k, heads, scale=scale, seq_start=seq_start, seq_len=seq_len,
                               prompt_length=prompt_length)
    return selection_mask_from_index(index)


def index_density(index: SparseIndex, q, k, v=None) -> torch.Tensor:
    """float64 ``[B, Hq]``: computed pairs / ``len (len + 1) / 2`` per sequence and head (a
    chunk: over the causal pairs of its rows).

    On CUDA (or under the interpreter) the kernel walks the index in counting mode (no
    attention, O(pairs / 64^2) tile steps, no n x n memory); on plain CPU it sums each head's
    reference mask (n x n per head at a time).
    """
    _check_tensors(q, k, k if v is None else v)
    check_index(q, k, index)
    length = index.seq_len.double()
    before = (length - index.num_queries).clamp(min=0)          # rows before a chunk
    causal = ((length * (length + 1) - before * (before + 1)) / 2).clamp(min=1)[:, None]
    if attention_impl(q) == "triton":
        from .kernels.sparse_attention import count_pairs_per_head
        v = k if v is None else v
        if _interpreter_bf16(q):
            q, k, v = q.float(), k.float(), v.float()
        pairs = count_pairs_per_head(q, k, v, index)
    else:
        from .patterns.index import head_selection_mask
        pairs = torch.stack([head_selection_mask(index, h).sum((1, 2)) for h in range(len(index.heads))], 1)
    return pairs.double() / causal


def selection_density(q, k, heads, seq_start=None, seq_len=None, *, scale=None) -> torch.Tensor:
    """float64 ``[B, Hq]``: fraction of each sequence's causal square computed per head."""
    index = build_sparse_index(q, k, heads, scale=scale, seq_start=seq_start, seq_len=seq_len)
    return index_density(index, q, k)
