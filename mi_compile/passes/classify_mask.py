"""Pass 2: find out what each attention mask *means*, so the O(n^2) tensor need never exist.

transformers builds its masks inside the traced graph. Seen in real graphs (torch 2.13 with
transformers 5.23 and 5.17, Llama/Qwen2/Mistral/Phi3, ``use_cache=False`` or a padded batch)::

    q_arange  = torch.arange(n) + 0              q_idx  = q_arange[None, None, :, None]
    kv_arange = torch.arange(n) + 0              kv_idx = kv_arange[None, None, None, :]
    b_idx     = torch.arange(b)[:, None, None, None]
    m = ones & (kv_idx <= q_idx)                                   # causal
          & padding_bool[b_idx, kv_idx]                            # 2D attention_mask (padding)
          & (pos[b_idx, kv_idx] > pos[b_idx, q_idx] - window)      # Mistral-style sliding window
          & (packed[b_idx, q_idx] == packed[b_idx, kv_idx])        # packed-sequence detection
    mask = m.expand(b, -1, n, n)                                   # n x n bool: 16 GiB at 128K
    sdpa(q, k, v, attn_mask=mask, is_causal=False)

With a KV cache and no padding transformers 5.23 instead calls ``sdpa(..., attn_mask=None,
is_causal=True, enable_gqa=True)``; that form needs no probing.

Rather than pattern-match every way a library may write a mask (the sub-graphs above differ
between transformers versions, models and call arguments), this pass *evaluates* the mask
sub-graph on a probe: the ``arange`` behind ``q_idx`` is replaced by a few sampled query rows
(first, last and random ones), every key column is kept, the 2D padding mask is replaced by
random padding (left, right and with holes), and the result is compared with
``causal & padding[b, kv] & (q - kv < window)``. Memory is O(rows x n), never n x n. Symbolic
lengths are bound to a probe length (and a second, long probe looks for sliding windows up to
~1M tokens); static lengths are probed at their real size.

A mask that matches is recorded as ``causal``, ``causal+padding``, ``sliding_window`` or
``sliding_window+padding`` with the node of the 2D padding mask, which is all the sparse op
needs (O(batch x n)). Anything else is ``unknown`` with the reason; the call then stays dense.

Prefill chunks that continue a cache (``nq`` new queries over ``nk = past + nq`` keys, as
``model(chunk, past_key_values=DynamicCache(...))`` runs them). transformers 5.17-5.25 offset
the query index by the cache length (``s_past`` symbolic, or a constant when Dynamo
specialised it)::

    keys  = torch.cat([past_keys, k], dim=-2)                      # [b, hkv, s_past + nq, d]
    q_idx = (torch.arange(nq) + s_past)[None, None, :, None]
    kv_idx = (torch.arange(s_past + nq) + 0)[None, None, None, :]
    m = ones & (kv_idx <= q_idx) & padding_bool[b_idx, kv_idx]     # padding: [b, past + nq]
    sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=m.expand(b, -1, nq, s_past + nq))

The probe binds the lengths' symbols twice (a long chunk over a short past and the other way
round) and compares with the bottom-right-aligned causal mask, query row ``r`` seeing key
``j`` iff ``j <= (nk - nq) + r`` (``& padding[b, j]``), plus a long probe for sliding
windows. A match is ``causal_bottom_right`` / ``causal_bottom_right+padding``: the contract of
``mi_compile::sparse_attention`` for ``nq < nk``.

Causal aligned top-left over more keys than queries: query ``r`` sees key ``j`` iff ``j <= r``
(``& padding[b, j]``). PyTorch's ``is_causal=True`` with ``nq < nk`` means that (no probing
needed), and so does a static cache's prefill in transformers 5.17, masking every slot of the
cache with no offset::

    q_idx  = torch.arange(nq)[None, None, :, None]
    kv_idx = torch.arange(max_cache_len)[None, None, None, :]      # slots past nq: only causality masks them
    m = ones & (kv_idx <= q_idx) & padding_bool[b_idx, kv_idx]     # padding: attention_mask padded to the slots
    sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=m.expand(b, -1, nq, max_cache_len))

The chunk probe finds that alignment at every binding (query lengths bound below the key length,
which a static number of slots caps) and no sliding window on a long probe (up to ~1M queries). A match
is ``causal_top_left`` / ``causal_top_left+padding``: exactly causal prefill attention over the
first ``nq`` keys (and the first ``nq`` columns of the padding mask), which is what the rewrite
runs.

A static cache's continuation offsets the queries by a runtime tensor, the cache's filled
length ``c`` (transformers 5.17 and 5.25: the 0-d ``cumulative_length``), over all of its
slots, filled or not::

    q_idx  = (torch.arange(nq) + cumulative_length.to(device))[None, None, :, None]
    kv_idx = torch.arange(max_cache_len)[None, None, None, :]      # slots past c + nq: only causality masks them
    m = ones & (kv_idx <= q_idx) & padding_bool[b_idx, kv_idx]     # padding: attention_mask padded to the slots
    sdpa(q, repeat_kv(keys), repeat_kv(values), attn_mask=m.expand(b, -1, nq, max_cache_len))

The probe gives that 0-d integer input several values ``c`` (0, ``nk - nq`` and one between)
at every binding of the lengths (and ~1M slots where symbolic) and compares with query row
``r`` seeing slot ``j`` iff ``j <= c + r`` (``& padding[b, j]``); the input must not be written
in place before the mask reads it. A match is ``causal_static_offset`` /
``causal_static_offset+padding``, carrying that input (``offset_source``).

Not matched (the call stays dense, with the reason): a sliding window over a cached prefix or
aligned top-left, any other offset (a static cache's mask reading its runtime offset otherwise
keeps the reason ``static cache: ...``), and a mask that is an input of the graph (as
``generate`` passes a static cache's), data with nothing to evaluate.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from torch.fx.experimental.symbolic_shapes import statically_known_true

from .find_attention import fake_shape, sdpa_arg
from .site import AttentionSite, MaskInfo, bump

log = logging.getLogger(__name__)

PROBE_LEN = 4099            # symbolic lengths are bound to this for the detailed probe
LONG_PROBE_LEN = 1 << 20    # ... and to this (few rows, batch 1) to look for long sliding windows
PROBE_BATCH = 2


CHUNK_BINDINGS = ((613, 1499), (1201, 331))  # (query symbols, other symbols): chunk over a long / short past


class ProbeError(Exception):
    """The mask sub-graph could not be evaluated on a probe (the reason is the message)."""


class TopLeftWindowError(ProbeError):
    """A mask over more keys than queries that is causal aligned top-left with a sliding window
    (left dense: only plain top-left causal is run as a prefill over the first keys)."""


class RuntimeInputError(ProbeError):
    """The mask reads an integer tensor input the probe cannot synthesise (``input``: its name)."""

    def __init__(self, message: str, input_name: str, node: torch.fx.Node | None = None):
        super().__init__(message)
        self.input_name = input_name
        self.node = node


def _index_tuple(node: torch.fx.Node):
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        return node.args[1]
    return None


def _is_full_slice(x) -> bool:
    return isinstance(x, slice) and x == slice(None, None, None)


def _index_role(node: torch.fx.Node) -> str | None:
    """``q`` / ``kv`` / ``batch`` for the 4D broadcast index grids transformers builds."""
    idx = _index_tuple(node)
    if idx is None or len(idx) != 4:
        return None
    shape = ["s" if _is_full_slice(i) else ("n" if i is None else "x") for i in idx]
    return {"nnsn": "q", "nnns": "kv", "snnn": "batch"}.get("".join(shape))


def _arange_behind(node: torch.fx.Node) -> torch.fx.Node:
    """Walk ``arange(n) + offset`` back to the ``arange`` call (so offsets still get evaluated)."""
    cur = node
    for _ in range(4):
        if cur.op == "call_function" and cur.target is torch.arange:
            return cur
        if cur.op == "call_function" and cur.target in (operator.add, operator.sub) and isinstance(cur.args[0], torch.fx.Node):
            cur = cur.args[0]
            continue
        break
    return node


def _reachable(node: torch.fx.Node, step) -> set[torch.fx.Node]:
    """``node`` and every node reached from it by ``step`` (a node -> its neighbours), repeatedly."""
    seen, stack = {node}, [node]
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _ancestors(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(_reachable(node, lambda n: n.all_input_nodes))


def _strip_expand(node: torch.fx.Node) -> torch.fx.Node:
    while (node.op == "call_method" and node.target in ("expand", "expand_as")) or (
            node.op == "call_function" and getattr(node.target, "__name__", "") in ("expand",)):
        node = node.args[0]
    return node


def _sym_expr(x):
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return x


class _MaskProbe:
    """Evaluates a mask sub-graph with sampled query rows and synthetic padding."""

    def __init__(self, mask_node: torch.fx.Node):
        self.mask_node = _strip_expand(mask_node)
        self.nodes = _ancestors(self.mask_node)
        self.q_sources, self.kv_sources, self.batch_sources, self.padding_sources = [], [], [], []
        for n in self.nodes:
            role = _index_role(n)
            if role == "q":
                self.q_sources.append(_arange_behind(n.args[0]))
            elif role == "kv":
                self.kv_sources.append(_arange_behind(n.args[0]))
            elif role == "batch":
                self.batch_sources.append(_arange_behind(n.args[0]))
            idx = _index_tuple(n)
            if idx is not None and len(idx) == 2 and all(isinstance(i, torch.fx.Node) for i in idx):
                if _index_role(idx[0]) == "batch" and _index_role(idx[1]) == "kv":
                    val = n.args[0].meta.get("example_value")
                    if isinstance(val, torch.Tensor) and val.dtype == torch.bool and val.dim() == 2:
                        self.padding_sources.append(n.args[0])

    @property
    def padding_source(self):
        return self.padding_sources[0] if len(set(self.padding_sources)) == 1 else None

    def run(self, nq: int, nk: int, batch: int, rows: torch.Tensor, padding: torch.Tensor | None,
            symbols: dict, inputs: dict | None = None) -> torch.Tensor:
        """Evaluate the mask at query ``rows`` (of ``nq``; all ``nk`` keys), with ``inputs``
        (placeholder node -> value) for inputs the probe cannot make up itself."""
        env: dict[torch.fx.Node, object] = dict(inputs or {})
        for src in self.q_sources:
            env[src] = rows.to(self._device(src))
        for src in self.kv_sources:
            env[src] = torch.arange(nk, device=self._device(src))
        for src in self.batch_sources:
            env[src] = torch.arange(batch, device=self._device(src))
        if padding is not None:
            for src in self.padding_sources:
                env[src] = padding.to(self._device(src))
        return self._eval(self.mask_node, env, nq, nk, symbols)

    @staticmethod
    def _device(node):
        val = node.meta.get("example_value")
        return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")

    def _eval(self, target, env, nq, nk, symbols):
        # only what the mask needs beyond the replaced nodes (the 2D padding mask's own input,
        # of a length of its own, is never evaluated)
        needed, stack = {target}, [target]
        while stack:
            cur = stack.pop()
            if cur in env:
                continue
            for inp in cur.all_input_nodes:
                if inp not in needed:
                    needed.add(inp)
                    stack.append(inp)
        order = [x for x in self.mask_node.graph.nodes if x in needed]
        for node in order:
            if node in env:
                continue
            if node.op == "placeholder":
                env[node] = self._placeholder_value(node, nq, nk, symbols)
            elif node.op in ("call_function", "call_method"):
                args = torch.fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: env[a])
                if node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                else:
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                raise ProbeError(f"mask reads module attribute {node.target}")
            else:
                raise ProbeError(f"cannot evaluate {node.op} node {node.name}")
        return env[target]

    @staticmethod
    def _concrete(x, symbols):
        x = _sym_expr(x)
        if isinstance(x, int):
            return x
        try:
            return int(x.subs(symbols))
        except Exception as e:  # noqa: BLE001
            raise ProbeError(f"size {x} depends on more than the sequence length and batch") from e

    def _placeholder_value(self, node, nq, nk, symbols):
        val = node.meta.get("example_value")
        if isinstance(val, (torch.SymInt, int)):
            return self._concrete(val, symbols)
        if isinstance(val, torch.Tensor):
            shape = [self._concrete(s, symbols) for s in val.shape]
            integer = not val.dtype.is_floating_point and val.dtype != torch.bool
            if integer and nq == nk and shape and shape[-1] == nq:
                # position_ids / cache_position of a prefill from an empty cache: 0..n-1
                return torch.arange(nq, device=val.device).expand(*shape).clone()
            what = f"mask depends on input {node.target!r} of shape {tuple(val.shape)}"
            if integer:
                # with a cache, positions are the cache's business (a static cache's
                # cumulative_length): never guessed
                raise RuntimeInputError(what, str(node.target), node)
            raise ProbeError(what)
        raise ProbeError(f"mask depends on input {node.target!r}")


def _sample_rows(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    edge = min(n, count // 3)
    rows = set(range(edge)) | set(range(max(0, n - edge), n))
    rows |= set(torch.randint(0, n, (count - len(rows) if count > len(rows) else 0,), generator=gen).tolist())
    return torch.tensor(sorted(rows), dtype=torch.long)


def _synthetic_padding(batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Row 0 left-padded, row 1 right-padded, later rows random holes."""
    pad = torch.ones(batch, n, dtype=torch.bool)
    for b in range(batch):
        k = int(torch.randint(1, max(2, n // 4), (1,), generator=gen))
        if b % 3 == 0:
            pad[b, :k] = False
        elif b % 3 == 1:
            pad[b, n - k:] = False
        else:
            pad[b] = torch.rand(n, generator=gen) > 0.3
    return pad


def _explain(result: torch.Tensor, rows: torch.Tensor, nq: int, nk: int, padding,
             batch: int, offset: int | None = None) -> tuple[str, int]:
    """Match a probed mask [B?, 1?, R, nk] against causal/padding/window, bottom-right aligned
    (query row ``r`` is key position ``nk - nq + r``; for a prefill ``nq == nk``, the usual
    causal mask) unless ``offset`` says where row 0 is; returns (kind, window)."""
    if result.dtype != torch.bool:
        raise ProbeError(f"mask has dtype {result.dtype}, not bool")
    res = result.to("cpu")
    while res.dim() < 4:
        res = res.unsqueeze(0)
    if res.shape[1] != 1:
        raise ProbeError("mask differs between heads")
    res = res.expand(batch, 1, len(rows), nk)[:, 0]
    offset = nk - nq if offset is None else offset
    q = rows[:, None] + offset
    kv = torch.arange(nk)[None, :]
    allowed = (kv <= q)[None].expand(batch, -1, -1)
    if padding is not None:
        allowed = allowed & padding[:, None, :]
    rule = "causal+padding" if not offset else f"causal aligned bottom-right ({nq} queries over {nk} keys)+padding"
    if (res & ~allowed).any():
        b, r, c = (res & ~allowed).nonzero()[0].tolist()
        raise ProbeError(f"mask lets query {int(rows[r])} see key {c} (batch {b}), which {rule} forbids")
    missing = allowed & ~res
    window = 0
    if missing.any():
        dist = (q - kv)[None].expand(batch, -1, -1)[missing]
        window = int(dist.min())
        if window <= 0 or not torch.equal(res, allowed & ((q - kv) < window)[None]):
            if offset:
                raise ProbeError(f"mask hides keys that {rule} allows, and is not a sliding window")
            raise ProbeError("mask is not causal, padding or a sliding window")
    kind = "sliding_window" if window else "causal"
    return kind, window


def _free_symbols(*exprs) -> set:
    out = set()
    for e in exprs:
        e = _sym_expr(e)
        if not isinstance(e, int):
            out |= set(e.free_symbols)
    return out


def _known(cond) -> bool:
    """``cond`` (a bool or SymBool on the fake shapes) holds for every size, without a guard."""
    try:
        return bool(statically_known_true(cond))
    except Exception:  # noqa: BLE001
        return False


def lengths_equal(q_len, kv_len) -> bool:
    """The query and key lengths are provably equal (a prefill), adding no guard."""
    return _sym_expr(q_len) == _sym_expr(kv_len) or _known(q_len == kv_len)


class ClassifyMaskPass:
    """Attach a :class:`MaskInfo` to every site."""

    name = "classify_mask"

    def __call__(self, gm: torch.fx.GraphModule, sites: list[AttentionSite]) -> None:
        cache: dict[torch.fx.Node, MaskInfo] = {}
        for site in sites:
            mask = sdpa_arg(site.node, "attn_mask")
            if isinstance(mask, torch.fx.Node) and mask in cache:
                site.mask = cache[mask]
                continue
            site.mask = self.classify(site)
            if isinstance(mask, torch.fx.Node):
                cache[mask] = site.mask
        counts: dict[str, int] = {}
        for s in sites:
            counts[s.mask.kind] = counts.get(s.mask.kind, 0) + 1
            bump(f"mask_{s.mask.kind}")
        log.info("mi_compile: %s: %s", self.name, counts)

    def classify(self, site: AttentionSite) -> MaskInfo:
        node = site.node
        mask = sdpa_arg(node, "attn_mask")
        is_causal = bool(sdpa_arg(node, "is_causal", False))
        qs, ks = fake_shape(sdpa_arg(node, "query")), fake_shape(sdpa_arg(node, "key"))
        shapes = qs is not None and ks is not None and len(qs) == 4 and len(ks) == 4
        if mask is None:
            if is_causal:
                if shapes and not lengths_equal(qs[2], ks[2]) and not _known(qs[2] > ks[2]):
                    return MaskInfo("causal_top_left",
                                    how=f"is_causal=True with query length {qs[2]} and key length {ks[2]}: "
                                        f"PyTorch aligns the mask top-left (query r sees keys 0..r), a prefill "
                                        f"over the first {qs[2]} keys")
                return MaskInfo("causal", how="is_causal=True")
            return MaskInfo("none", how="no mask, is_causal=False")
        if is_causal:
            return MaskInfo("unknown", reason="both attn_mask and is_causal given")
        if not isinstance(mask, torch.fx.Node):
            return MaskInfo("unknown", reason=f"mask is a constant {type(mask).__name__}")
        if not shapes:
            return MaskInfo("unknown", reason="query/key shapes unknown")
        chunk = not lengths_equal(qs[2], ks[2])
        try:
            if chunk:
                info = self._probe_chunk(mask, qs[2], ks[2], qs[0])
                if info.chunk and not _known(qs[2] <= ks[2]):
                    return MaskInfo("unknown", reason=f"query length {qs[2]} may exceed key length {ks[2]}")
                return info
            return self._probe(mask, qs[2], qs[0])
        except TopLeftWindowError as e:
            return MaskInfo("unknown", reason=f"{e} over the {ks[2]} keys: left dense (plain top-left causal runs "
                                              f"as a prefill over the first {qs[2]} keys; a window does not)")
        except RuntimeInputError as e:
            if chunk:
                return self._static_chunk(e, mask, qs, ks)
            return MaskInfo("unknown", reason=f"mask probe: {e}")
        except ProbeError as e:
            return MaskInfo("unknown", reason=f"mask probe: {e}")
        except Exception as e:  # noqa: BLE001  - any failure to evaluate means "not understood"
            return MaskInfo("unknown", reason=f"mask probe failed: {type(e).__name__}: {e}")

    def _static_chunk(self, error: RuntimeInputError, mask, qs, ks) -> MaskInfo:
        """A chunk whose mask reads a runtime integer input (a static cache's length):
        ``causal_static_offset`` where :meth:`_probe_static_offset` proves it, else dense."""
        reason = (f"static cache: query positions come from runtime tensor {error.input_name!r} (the cache "
                  f"position) and the {ks[2]} keys are the cache's slots, filled or not")
        if error.node is None:
            return MaskInfo("unknown", reason=reason)
        try:
            return self._probe_static_offset(mask, qs[2], ks[2], qs[0], error.node)
        except ProbeError as e:
            return MaskInfo("unknown", reason=f"{reason}; not proven causal over the filled slots: {e}")
        except Exception as e:  # noqa: BLE001
            return MaskInfo("unknown", reason=f"{reason}; offset probe failed: {type(e).__name__}: {e}")

    @staticmethod
    def _new_probe(mask_node) -> _MaskProbe:
        probe = _MaskProbe(mask_node)
        if probe.mask_node.op == "placeholder":
            raise ProbeError("the mask is an input of the compiled graph, built outside it (as generate builds a "
                             "static cache's; mi_compile.masks_in_forward(model) leaves it to the forward): "
                             "data, nothing to evaluate")
        if not probe.q_sources or not probe.kv_sources:
            raise ProbeError("no query/key index grid found in the mask sub-graph")
        if len(set(probe.padding_sources)) > 1:
            raise ProbeError("mask reads more than one 2D padding mask")
        return probe

    def _probe(self, mask_node, q_len, batch) -> MaskInfo:
        probe = self._new_probe(mask_node)
        gen = torch.Generator().manual_seed(0)
        symbolic = not isinstance(_sym_expr(q_len), int)
        n = PROBE_LEN if symbolic else int(q_len)
        b = PROBE_BATCH if not isinstance(_sym_expr(batch), int) else int(batch)
        symbols = {}
        if symbolic:
            symbols[_sym_expr(q_len)] = n
        if not isinstance(_sym_expr(batch), int):
            symbols[_sym_expr(batch)] = b
        rows = _sample_rows(n, 96 if n > 2048 else n, gen)
        padding = _synthetic_padding(b, n, gen) if probe.padding_source is not None else None
        result = probe.run(n, n, b, rows, padding, symbols)
        kind, window = _explain(result, rows, n, n, padding, b)
        how = f"probe at {n} tokens x {len(rows)} rows"
        if symbolic and not window:
            # Long windows (e.g. 4096, 32768) only show on long sequences: a few last rows of a
            # ~1M-token probe, batch 1, no padding.
            n_long = LONG_PROBE_LEN + 7
            symbols[_sym_expr(q_len)] = n_long
            if not isinstance(_sym_expr(batch), int):
                symbols[_sym_expr(batch)] = 1
            b_long = 1 if not isinstance(_sym_expr(batch), int) else int(batch)
            rows_long = torch.arange(n_long - 4, n_long)
            pad_long = torch.ones(b_long, n_long, dtype=torch.bool) if padding is not None else None
            result = probe.run(n_long, n_long, b_long, rows_long, pad_long, symbols)
            kind, window = _explain(result, rows_long, n_long, n_long, pad_long, b_long)
            how += f", and at {n_long} tokens x {len(rows_long)} rows"
        if padding is not None:
            kind += "+padding"
        return MaskInfo(kind, window=window, padding_source=probe.padding_source, how=how)

    def _probe_chunk(self, mask_node, q_len, kv_len, batch) -> MaskInfo:
        """A chunk of ``q_len`` queries over ``kv_len > q_len`` keys: the mask must be causal
        (``+ padding``) with one alignment at every binding of the lengths' symbols probed (two,
        so an offset that only matches one length is caught) and, when the lengths are symbolic,
        on a ~1M-key probe (no sliding window): bottom-right (a cache continuation) or top-left
        (a static cache's prefill)."""
        probe = self._new_probe(mask_node)
        gen = torch.Generator().manual_seed(0)
        sizes = _ChunkSizes(q_len, kv_len, batch)
        aligned, hows = None, []
        for symbols, nq, nk, b in sizes.bindings():
            rows = _sample_rows(nq, 96 if nq > 2048 else nq, gen)
            padding = _synthetic_padding(b, nk, gen) if probe.padding_source is not None else None
            result = probe.run(nq, nk, b, rows, padding, symbols)
            aligned = _same_alignment(aligned, _chunk_alignment(result, rows, nq, nk, padding, b))
            hows.append(f"{nq} queries over {nk} keys x {len(rows)} rows")
        if sizes.symbolic:
            # a long range: sliding windows up to ~1M tokens show here. Bottom-right: a short
            # chunk's last rows at the end of ~1M keys; top-left: the last rows of ~1M queries.
            if aligned == "bottom_right":
                symbols, nq, nk, b = sizes.long_bottom_right()
            else:
                symbols, nq, nk, b = sizes.long(LONG_PROBE_LEN + 7, LONG_PROBE_LEN + 71)
            rows = torch.arange(max(0, nq - 4), nq)
            pad_long = torch.ones(b, nk, dtype=torch.bool) if probe.padding_source is not None else None
            result = probe.run(nq, nk, b, rows, pad_long, symbols)
            aligned = _same_alignment(aligned, _chunk_alignment(result, rows, nq, nk, pad_long, b))
            hows.append(f"{nq} queries over {nk} keys x {len(rows)} rows")
        how = "probe at " + ", ".join(hows)
        padded = "+padding" if probe.padding_source is not None else ""
        if aligned == "top_left":
            return MaskInfo("causal_top_left" + padded, padding_source=probe.padding_source,
                            how=f"{how}: causal aligned top-left (query r sees keys 0..r), a prefill over "
                                f"the first {q_len} keys")
        return MaskInfo("causal_bottom_right" + padded, padding_source=probe.padding_source, how=how)

    def _probe_static_offset(self, mask_node, q_len, kv_len, batch, offset: torch.fx.Node) -> MaskInfo:
        """A static cache's continuation: ``q_len`` queries over the cache's ``kv_len`` slots, the
        mask offsetting the queries by ``offset``, a 0-d integer input (the cache's filled length
        ``c``). The probe gives ``offset`` several values ``c`` (0, the full cache ``nk - nq`` and
        one between) at every binding of the lengths' symbols, and, when the key length is
        symbolic, on ~1M slots (no sliding window); every probe must equal query row ``r``
        seeing slot ``j`` iff ``j <= c + r`` (``& padding[b, j]``). The mask must also read
        ``offset`` before anything in the graph writes it in place (the cache's length grows
        by ``add_`` in the graph), so that the rewrite can read the same value at the start."""
        val = offset.meta.get("example_value")
        if not (isinstance(val, torch.Tensor) and val.dim() == 0 and not val.dtype.is_floating_point
                and val.dtype != torch.bool):
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise ProbeError(f"runtime tensor {offset.target!r} ({shape}) is not a 0-d integer cache length")
        _check_read_before_written(offset, mask_node)
        probe = self._new_probe(mask_node)
        gen = torch.Generator().manual_seed(0)
        sizes = _ChunkSizes(q_len, kv_len, batch)

        def check(symbols, nq, nk, b, rows, padding, offsets) -> str:
            for c in offsets:
                value = torch.tensor(c, dtype=val.dtype, device=val.device)
                result = probe.run(nq, nk, b, rows, padding, symbols, {offset: value})
                _, window = _explain(result, rows, nq, nk, padding, b, offset=c)
                if window:
                    raise ProbeError(f"sliding window ({window}) at {offset.target!r} = {c}")
            return f"{nq} queries over {nk} slots x {len(rows)} rows at c = {', '.join(map(str, offsets))}"

        hows = []
        for symbols, nq, nk, b in sizes.bindings():
            rows = _sample_rows(nq, 96 if nq > 2048 else nq, gen)
            padding = _synthetic_padding(b, nk, gen) if probe.padding_source is not None else None
            hows.append(check(symbols, nq, nk, b, rows, padding, sorted({0, (nk - nq) // 2, nk - nq})))
        if sizes.other:   # windows up to ~1M slots: a short chunk's last rows, the cache full or half full
            symbols, nq, nk, b = sizes.long_bottom_right()
            pad_long = torch.ones(b, nk, dtype=torch.bool) if probe.padding_source is not None else None
            hows.append(check(symbols, nq, nk, b, torch.arange(max(0, nq - 4), nq), pad_long,
                              sorted({(nk - nq) // 2, nk - nq})))
        padded = "+padding" if probe.padding_source is not None else ""
        return MaskInfo("causal_static_offset" + padded, padding_source=probe.padding_source, offset_source=offset,
                        how=f"probe at {'; '.join(hows)}: query r sees slots 0..c + r (c = runtime tensor "
                            f"{offset.target!r}, the cache's filled length), a chunk over the filled slots")


class _ChunkSizes:
    """The sizes a chunk's mask (``q_len`` queries over ``kv_len`` keys, ``batch`` rows) is probed at."""

    def __init__(self, q_len, kv_len, batch):
        self.q_len, self.kv_len = q_len, kv_len
        self.batch_sym = None if isinstance(_sym_expr(batch), int) else _sym_expr(batch)
        self.b = PROBE_BATCH if self.batch_sym is not None else int(batch)
        self.q_syms = sorted(_free_symbols(q_len) - {self.batch_sym}, key=str)
        self.other = sorted(_free_symbols(kv_len) - set(self.q_syms) - {self.batch_sym}, key=str)
        self.symbolic = bool(self.q_syms or self.other)

    def bindings(self):
        """``(symbols, nq, nk, batch)``: the real sizes where static, else each of
        ``CHUNK_BINDINGS`` (a second, shorter query length where the first two coincide)."""
        seen = set()
        for q_val, other_val in (CHUNK_BINDINGS if self.symbolic else ((None, None),)):
            symbols, nq, nk = _chunk_binding(self.q_len, self.kv_len, self.q_syms, self.other, q_val, other_val)
            if (nq, nk) in seen:   # the query length was cut to fit a static key length: a shorter one
                symbols, nq, nk = _chunk_binding(self.q_len, self.kv_len, self.q_syms, self.other,
                                                 max(1, nq // 2), other_val)
            seen.add((nq, nk))
            if self.batch_sym is not None:
                symbols[self.batch_sym] = self.b
            yield symbols, nq, nk, self.b

    def long(self, q_val, other_val):
        """A long binding, batch 1 where the batch is symbolic."""
        symbols, nq, nk = _chunk_binding(self.q_len, self.kv_len, self.q_syms, self.other, q_val, other_val)
        if self.batch_sym is not None:
            symbols[self.batch_sym] = 1
        return symbols, nq, nk, (1 if self.batch_sym is not None else self.b)

    def long_bottom_right(self):
        """A short chunk at the end of ~1M keys (or ~1M queries where only they are symbolic)."""
        return self.long(*((64, LONG_PROBE_LEN + 7) if self.other else (LONG_PROBE_LEN + 7, None)))


def _check_read_before_written(offset: torch.fx.Node, mask_node: torch.fx.Node) -> None:
    """ProbeError unless nothing writes ``offset`` (or a tensor computed from it) in place
    before ``mask_node``: then the mask read the graph's input value."""
    from .rewrite_attention import has_side_effects   # (that module imports this one)

    order = {n: i for i, n in enumerate(mask_node.graph.nodes)}
    derived = _reachable(offset, lambda n: n.users)
    for node in derived:
        if (order[node] < order[mask_node] and has_side_effects(node) and node.args
                and node.args[0] in derived):
            raise ProbeError(f"{node.name} writes runtime tensor {offset.target!r} in place before the mask reads it")


def _chunk_binding(q_len, kv_len, q_syms, other, q_val, other_val) -> tuple[dict, int, int]:
    """Bind the query length's symbols to ``q_val`` (``+ 2 i``) and the key length's others to
    ``other_val``: ``(symbols, nq, nk)`` with ``0 < nq < nk``. Where that binding has
    ``nq >= nk`` (a static key length such as a static cache's slots, or another symbol bound
    shorter), the query symbols get the largest value below ``q_val`` that fits."""
    def bind(v):
        symbols = {s: v + 2 * i for i, s in enumerate(q_syms)}
        symbols.update({s: other_val + 2 * i for i, s in enumerate(other)})
        return symbols, _MaskProbe._concrete(q_len, symbols), _MaskProbe._concrete(kv_len, symbols)

    def fits(v):
        _, nq, nk = bind(v)
        return 0 < nq < nk

    if q_val is None or fits(q_val):
        symbols, nq, nk = bind(q_val)
        if not 0 < nq < nk:
            raise ProbeError(f"query length {nq} {'exceeds' if nq > nk else 'is not below'} key length {nk} "
                             f"at the probe")
        return symbols, nq, nk
    if not fits(1):
        symbols, nq, nk = bind(q_val)
        raise ProbeError(f"query length {nq} exceeds key length {nk} at the probe")
    lo, hi = 1, q_val            # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return bind(lo)


def _chunk_alignment(result, rows, nq, nk, padding, batch) -> str:
    """``bottom_right`` or ``top_left``: where the probed mask of ``nq < nk`` rows puts query row 0
    (key ``nk - nq`` or key 0); a sliding window or anything else is a ProbeError."""
    try:
        _, window = _explain(result, rows, nq, nk, padding, batch)
    except ProbeError as e:
        try:
            _, window = _explain(result, rows, nq, nk, padding, batch, offset=0)
        except ProbeError:
            raise e from None
        if window:
            raise TopLeftWindowError(f"causal aligned top-left with a sliding window ({window})") from None
        return "top_left"
    if window:
        raise ProbeError(f"sliding window ({window}) over a cached prefix: the op's window is for prefills")
    return "bottom_right"


def _same_alignment(before: str | None, now: str) -> str:
    if before is not None and now != before:
        raise ProbeError(f"mask is causal aligned {before.replace('_', '-')} at one probe and "
                         f"{now.replace('_', '-')} at another")
    return now
