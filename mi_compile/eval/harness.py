"""Accuracy harness: run the synthetic tasks and a natural-text document through the backend
in several modes (configs) and compare them.

A *mode* is a per-head config given to ``mi_compile.backend({"config": ..., "min_seq_len": 0})``:

``dense``     every head dense (the reference: same graph, same op, full causal attention)
``default``   ``vertical_slash(1000, 6096)`` everywhere (MInference's default budget)
``searched``  a config file (``--searched``; by default the project's config for the model, when
              it exists: :data:`SEARCHED_DEFAULT` for SmolLM2, ``mi_compile/configs/<model>-128k.json``
              for the others)
extra         ``--configs name=path`` (a JSON config) or ``name=<inline spec>``, e.g.
              ``vs=vertical_slash:100:500``, ``ashape=a_shape:64:512``, ``bs=block_sparse:8``

Every mode's decoder (``model.model``) is compiled once with ``torch.compile(..., dynamic=True)``
and its own backend object, and all of them stay alive side by side (Dynamo keeps one cache
entry per backend), so the run goes length by length and, within a length, example by example
through every mode in turn (dense first): a run stopped early (``budget_s``) has the same
examples in every mode. Each prompt is prefilled through the compiled decoder (a fresh
``DynamicCache``; the prefill goes through ``torch.ops.mi_compile.sparse_attention``).

Scoring (``scoring=``):

``forced`` (teacher forcing; the default for the Python haystack)
    one prefill of the prompt, then the answer's tokens but the last as one short chunk through
    the eager model on that cache, as cached decode steps run (the eager model: dense). The logits at the answer positions only are read: the
    example is correct when every answer token is the argmax at its position, which is exactly
    when greedy decoding would write the answer (:func:`forced_verdict`); the mean log-prob of
    the answer tokens is recorded too. The answer tokens are not part of the sparse prefill, so
    the vertical-slash estimate (made from the last 64 queries) does not see the answer it is
    being tested on.
``greedy`` (the first version; the default for the noise haystack)
    the answer decoded greedily, one token at a time, by the eager model on that cache, scored
    by string match (:func:`mi_compile.eval.tasks.score`).

Prefills that continue a cache (``conversations``, ``chunks``; teacher-forced):

``mt_<task>``
    SCBench-style multi-turn: one shared context holding the needles of every task is
    prefilled once per mode, then one turn per task -- new code (``turn_tokens``) and the
    task's question -- each prefilled through the compiled decoder on that cache (a query
    shorter than its keys: the backend's chunk path) and its answer scored as above.
``<mode>@<size>``
    the task prompts prefilled in pieces of ``size`` tokens, each continuing the cache;
    ``same_answer`` is the fraction of examples whose argmax answer equals the unchunked one
    (``dense@<size>`` too: the rounding of the chunks alone, the floor for the sparse modes).

Measured per mode:

* accuracy per task and length (and, when forced, the answers' mean log-prob);
* the attention density actually computed: :func:`mi_compile.op.observe_attention`
  sees every op call and the tiles the kernel walks for each head's pattern on those very q/k
  are counted (:func:`layer_density`; mean over layers and heads; a layer the backend left
  dense, or a prompt shorter than ``min_seq_len``, counts as 1.0). ``density="first"`` counts
  only on the first example of each (mode, task, length) and on the documents, since at 128K
  the count costs about as much as the prefill;
* on a document of each length (:func:`mi_compile.eval.tasks.natural_document`, story-like
  text, or :func:`mi_compile.eval.tasks.code_document`, Python source): top-1 next-token
  agreement with the dense mode and mean ``KL(dense || mode)`` over the last ``natural_last``
  positions (or the positions after the first ``natural_skip``); only those positions' logits
  are computed. Where a head's ``last`` makes the final query blocks dense, ``top1_sparse_rows``
  is the agreement over the positions before them (``sparse_rows`` of them), which the
  patterns alone decide.

Long contexts: with ``yarn="auto"`` each length past the model's native context runs with
YaRN (:func:`mi_compile.models.set_yarn` with :func:`mi_compile.models.yarn_factor_for`), which
recompiles each mode once when it switches. ``deadline`` / ``budget_s`` stop the run cleanly
before the next example that would not finish in time, and the report (plus one JSON line per
scored example in ``<out>.rows.jsonl``) is written as the run goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mi_compile.patterns import registry
from mi_compile.patterns.registry import PATTERN_PARAMS
from mi_compile.patterns.registry import get as pattern_spec

from . import tasks as T

# SmolLM2's searched config, shipped in the package: 8K, scores averaged over 7 calibration
# prompts (seeds 0-6), global budget 0.385, objective output, early weight 1 (docs/kernels.md)
SEARCHED_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                "smollm2-8k.json")
FORMAT = "mi-compile/v1"
DENSE_CONFIG = {"format": FORMAT, "default": {"pattern": "dense"}}
DEFAULT_CONFIG = {"format": FORMAT, "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096}}
#: Pattern name -> parameter names of an inline config spec (``pattern:p1:p2``): a view of
#: the pattern registry.
_INLINE_PARAMS = PATTERN_PARAMS
#: ``min_seq_len`` that keeps the op on its dense (SDPA) path at any length.
ALWAYS_DENSE = 2**31 - 1
#: Where the per-model configs ship (package data): ``<model>-128k.json``, ``<model>-32k.json``.
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: The values :func:`run_eval` takes for ``scoring``, ``natural_kind``, ``density`` and
#: ``order`` (the command line adds ``auto`` to the first three).
SCORINGS = ("forced", "greedy")
NATURAL_KINDS = ("story", "python")
DENSITIES = ("all", "first", "none")
ORDERS = ("length", "example")


@dataclasses.dataclass
class Mode:
    name: str
    config: object        # dict or path, as the backend's "config" option takes it
    source: str           # where it came from, for the report


def _shipped_configs() -> dict:
    try:
        from mi_compile.config import shipped_configs
    except ImportError:                                   # an older config.py
        return {}
    return shipped_configs()


def parse_config_spec(spec: str):
    """A config path (existing file), the name of a config shipped in the package
    (``mi_compile/configs/<name>.json``) or an inline ``pattern:p1:p2`` applied to every head."""
    if os.path.exists(spec):
        return str(spec), f"file {spec}"
    shipped = _shipped_configs()
    if spec in shipped:
        return shipped[spec], f"shipped config {spec} ({shipped[spec]})"
    parts = spec.split(":")
    name, args = parts[0], parts[1:]
    if name not in _INLINE_PARAMS:
        raise ValueError(f"config {spec!r} is neither an existing file nor an inline spec "
                         f"({', '.join(f'{k}:' + ':'.join(v) for k, v in _INLINE_PARAMS.items())})")
    params = _INLINE_PARAMS[name]
    required = len(params) - len(registry.get(name).optional)
    if not required <= len(args) <= len(params):
        raise ValueError(f"inline config {spec!r}: {name} takes {required}"
                         f"{'' if required == len(params) else f'-{len(params)}'} parameter(s) {params}")
    entry = {"pattern": name, **{p: int(a) for p, a in zip(params, args)}}
    return {"format": FORMAT, "default": entry}, f"inline {spec}"


def canonical_model_name(name: str) -> str:
    """``qwen`` -> ``qwen2.5-coder-1.5b`` (the aliases of :func:`mi_compile.models.load_model`)."""
    try:
        from mi_compile.models import MODEL_ALIASES
    except ImportError:                                   # an older models.py
        MODEL_ALIASES = {"qwen": "qwen2.5-coder-1.5b"}
    return MODEL_ALIASES.get(name.lower(), name.lower())


def searched_default(model_name: str = "smollm2", length: int | None = None) -> str:
    """The searched mode's config when none is given: :data:`SEARCHED_DEFAULT` for SmolLM2,
    else the package's config family for the model (``mi_compile/configs/<model>.json``: each
    call runs the member searched for its length) when it exists, else its config searched at
    32K for runs up to 32K, else at 128K: ``<model>-32k.json`` / ``<model>-128k.json`` (``_32k`` /
    ``_128k`` spellings too). The 128K path is returned even when it does not exist, so that the
    skip says which file was looked for."""
    key = canonical_model_name(model_name)
    if key == "smollm2":
        return SEARCHED_DEFAULT
    family = PACKAGE_CONFIGS / f"{key}.json"
    if family.exists():
        return str(family)
    suffixes = (["32k"] if length is not None and length <= 32768 else []) + ["128k"]
    for suffix in suffixes:
        for sep in ("-", "_"):
            path = PACKAGE_CONFIGS / f"{key}{sep}{suffix}.json"
            if path.exists():
                return str(path)
    return str(PACKAGE_CONFIGS / f"{key}-128k.json")


def resolve_modes(names, extra: Optional[dict] = None, searched_path: Optional[str] = None):
    """``(modes, skipped)``: the :class:`Mode` list (dense first, always present: it is the
    reference for the natural-text comparison) and ``{name: why}`` for modes left out."""
    extra = dict(extra or {})
    modes, skipped = [], {}
    names = list(names)
    for n in extra:
        if n not in names:
            names.append(n)
    if "dense" not in names:
        names.insert(0, "dense")
    names = ["dense"] + [n for n in names if n != "dense"]
    for n in dict.fromkeys(names):
        if n in extra:
            cfg, src = parse_config_spec(extra[n])
            modes.append(Mode(n, cfg, src))
        elif n == "dense":
            modes.append(Mode(n, DENSE_CONFIG, "all heads dense"))
        elif n == "default":
            modes.append(Mode(n, DEFAULT_CONFIG, "vertical_slash(1000, 6096) everywhere"))
        elif n == "searched":
            path = searched_path or SEARCHED_DEFAULT
            shipped = _shipped_configs()
            if os.path.exists(path):
                modes.append(Mode(n, str(path), f"file {path}"))
            elif path in shipped:
                modes.append(Mode(n, shipped[path], f"shipped config {path}"))
            else:
                skipped[n] = f"{path} does not exist"
        else:
            raise ValueError(f"unknown mode {n!r}: use dense, default, searched or --configs {n}=...")
    return modes, skipped


# ----------------------------------------------------------------------------- density

def a_shape_pairs(n: int, sink: int, local: int) -> int:
    """Causal (query, key) pairs an ``a_shape(sink, local)`` head selects over ``n`` tokens:
    row ``i`` keeps ``min(i + 1, local)`` window keys plus the sink keys before the window."""
    i = torch.arange(n, dtype=torch.int64)
    window = torch.clamp(i + 1, max=max(local, 0))
    sinks = torch.clamp(torch.clamp(i - local + 1, min=0), max=max(sink, 0))
    return int((window + sinks).sum())


def layer_density(q, k, heads, key_padding_mask=None) -> float:
    """Mean over heads of the fraction of the causal square the kernel *computes* for the
    layer's patterns on these q/k: whole tiles, masked pairs included
    (:func:`mi_compile.patterns.cost.computed_density`, read from the op's own index, O(n/64)
    per head), the same measure the pattern search charges. An all-dense layer counts 1.0."""
    from mi_compile.op import padding_to_ranges
    from mi_compile.patterns.cost import computed_density
    from mi_compile.sparse import build_sparse_index

    if all(pattern_spec(h.kind).full for h in heads):
        return 1.0
    start = length = None
    if key_padding_mask is not None:
        start, length = padding_to_ranges(key_padding_mask)
    index = build_sparse_index(q, k, heads, seq_start=start, seq_len=length)
    return float(computed_density(index).mean())


# ----------------------------------------------------------------------------- one mode

def forced_verdict(logits: torch.Tensor, answer_ids) -> dict:
    """Teacher-forced verdict from ``logits`` ``[k, vocab]``, row ``t`` being the next-token
    logits where answer token ``t`` must come: correct when every answer token is the argmax
    (exactly when greedy decoding writes the answer), with the answer's log-probs."""
    answer = torch.as_tensor(list(answer_ids), device=logits.device, dtype=torch.long)
    if logits.dim() != 2 or logits.shape[0] != answer.numel() or answer.numel() == 0:
        raise ValueError(f"need logits [k, vocab] for k = {answer.numel()} answer tokens, got {tuple(logits.shape)}")
    lp = torch.log_softmax(logits.float(), -1)
    tok_lp = lp.gather(-1, answer[:, None])[:, 0]
    argmax = lp.argmax(-1)
    hits = argmax == answer
    return dict(correct=bool(hits.all()), score=float(hits.all()), tokens_correct=int(hits.sum()),
                n_answer_tokens=int(answer.numel()), first_token_correct=bool(hits[0]),
                logprob_mean=float(tok_lp.mean()), logprob_sum=float(tok_lp.sum()), argmax=argmax.tolist())


class ModeRunner:
    """The model's decoder compiled with the backend for one mode, plus the density observer."""

    def __init__(self, model, mode: Mode, use_inductor: bool = True, *, reset: bool = True, min_seq_len: int = 0,
                 dense_sdpa: bool = False):
        from mi_compile.backend import MInferenceBackend

        if reset:
            torch._dynamo.reset()
        self.model, self.mode = model, mode
        # dense_sdpa: the all-dense mode takes the op's dense path (SDPA: flash / cuDNN, as the model
        # runs without the backend) instead of the sparse kernels with every head dense
        self.min_seq_len = ALWAYS_DENSE if dense_sdpa and mode.config == DENSE_CONFIG else int(min_seq_len)
        self.backend = MInferenceBackend({"config": mode.config, "min_seq_len": self.min_seq_len},
                                         use_inductor=use_inductor)
        self.decoder = torch.compile(model.model, backend=self.backend, dynamic=True)
        self.num_layers = model.config.num_hidden_layers
        self.observe = True                 # count the density on the next prefills
        self._heads: dict[int, object] = {}   # layer -> its sparse AttentionSite
        self._density: dict[int, float] = {}
        self.compile_s: Optional[float] = None
        self.compiles: list[dict] = []      # every prefill that compiled a graph: when and how long
        self.observe_s = 0.0
        self.busy_s = 0.0                   # prefill and answer time, compiles excluded

    def dense_tail(self) -> int:
        """The most any head's ``last`` asks for (after the first compile): the prompt's last
        rows some head computes densely; 0 for none."""
        return max((h.last for report in self.backend.reports for site in report.sites
                    if site.action == "sparse" and site.heads for heads in site.head_tables() for h in heads),
                   default=0)

    # -- density observer
    def _layer_heads(self, layer, n_k: int):
        """The patterns ``layer``'s op runs over ``n_k`` keys (a config family's member for that count)."""
        if layer not in self._heads:
            for report in self.backend.reports:
                for site in report.sites:
                    if site.action == "sparse" and site.heads and site.layer is not None:
                        self._heads.setdefault(site.layer, site)
        site = self._heads.get(layer)
        return None if site is None else site.heads_at(n_k)

    def _observe(self, layer, q, k, v, key_padding_mask):
        if not self.observe:
            return
        t = time.perf_counter()
        heads = self._layer_heads(layer, k.shape[-2])
        if heads is None:
            raise RuntimeError(f"mode {self.mode.name}: no patterns found for layer {layer} in the backend's reports")
        if q.shape[-2] == 1 or q.shape[-2] < self.min_seq_len:
            d = 1.0
        else:
            d = layer_density(q, k, heads, key_padding_mask)
        self._density[layer] = d
        self.observe_s += time.perf_counter() - t

    def prefill(self, ids: torch.Tensor, use_cache: bool = True, *, cache=None, chunk: Optional[int] = None):
        """Run the compiled decoder on ``ids`` (1 x n): ``(last_hidden_state, cache, info)``;
        ``info`` has the density (mean over all layers/heads; ``None`` when not observed),
        layers observed, seconds, and whether this call compiled a graph. ``cache``: a filled
        cache that ``ids`` continue (updated in place); ``chunk``: prefill ``ids`` in pieces of
        this many tokens, each continuing the cache of the ones before (the hidden states
        returned are the last piece's). Pieces go in with contiguous strides (the backend stores a
        prefill's K / V contiguous), so a whole prompt, its first chunk and every later chunk or
        turn run on two graphs."""
        from transformers import DynamicCache

        from mi_compile.generation import standard_strides
        from mi_compile.op import observe_attention

        self._density = {}
        if cache is None and (use_cache or chunk):
            cache = DynamicCache(config=self.model.config)
        pieces = [standard_strides(p) for p in ([ids] if not chunk else ids.split(int(chunk), dim=1))]
        graphs = len(self.backend.reports)
        t = time.perf_counter()
        obs0 = self.observe_s
        with torch.no_grad(), observe_attention(self._observe):
            for piece in pieces:
                out = self.decoder(input_ids=piece, past_key_values=cache, use_cache=cache is not None)
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        wall = time.perf_counter() - t
        compiled = len(self.backend.reports) > graphs
        if self.compile_s is None:
            self.compile_s = wall
        if compiled:
            self.compiles.append(dict(n=int(ids.shape[1]), wall_s=round(wall, 2)))
        else:
            self.busy_s += wall
        if self.observe:
            per_layer = [self._density.get(i, 1.0) for i in range(self.num_layers)]
            density = sum(per_layer) / len(per_layer)
        else:
            density = None
        info = dict(density=density, layers_observed=len(self._density),
                    prefill_s=wall - (self.observe_s - obs0), observe_s=self.observe_s - obs0, compiled=compiled)
        if cache is not None and out.past_key_values is not None:
            cache = out.past_key_values
        return out.last_hidden_state, cache, info

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_ids=()):
        """Greedy continuation: prefill through the compiled decoder, then eager decode steps."""
        hidden, cache, info = self.prefill(ids)
        t = time.perf_counter()
        out_ids = []
        with torch.no_grad():
            logits = self.model.lm_head(hidden[:, -1:])
            for step in range(max_new_tokens):
                nxt = int(logits[0, -1].argmax())
                out_ids.append(nxt)
                if nxt in eos_ids or step == max_new_tokens - 1:
                    break
                logits = self.model(input_ids=torch.tensor([[nxt]], device=ids.device),
                                    past_key_values=cache, use_cache=True).logits
        info["decode_s"] = time.perf_counter() - t
        self.busy_s += info["decode_s"]
        return out_ids, info

    def answer_logits(self, ids: torch.Tensor, answer_ids, *, cache=None,
                      chunk: Optional[int] = None) -> tuple[torch.Tensor, dict]:
        """Teacher forcing: ``(logits [k, vocab], info)`` at the ``k`` answer positions. One
        prefill of the prompt through the compiled decoder (continuing ``cache`` when given,
        in pieces of ``chunk`` tokens when given); the answer's tokens but the last go through
        the eager model as one chunk on that cache (attending densely, as decode steps do), so
        only ``k`` positions' logits are ever computed. A given ``cache`` keeps prompt and answer."""
        answer_ids = list(answer_ids)
        hidden, cache, info = self.prefill(ids, use_cache=True, cache=cache, chunk=chunk)
        t = time.perf_counter()
        with torch.no_grad():
            logits = self.model.lm_head(hidden[:, -1:])
            if len(answer_ids) > 1:
                chunk = torch.tensor([answer_ids[:-1]], device=ids.device)
                rest = self.model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=0).logits
                logits = torch.cat([logits, rest.to(logits.dtype)], 1)
        del cache, hidden
        info["decode_s"] = time.perf_counter() - t
        self.busy_s += info["decode_s"]
        return logits[0], info


# ----------------------------------------------------------------------------- comparisons

def compare_logits(model, h_ref: torch.Tensor, h: torch.Tensor, skip: int, chunk: int = 512):
    """Top-1 agreement and mean KL(ref || other) of next-token distributions from final hidden
    states (``[1, n, d]``), over positions ``>= skip``, computed in chunks."""
    n = h_ref.shape[1]
    agree, kl, count = 0, 0.0, 0
    with torch.no_grad():
        for s in range(skip, n, chunk):
            e = min(n, s + chunk)
            lr = torch.log_softmax(model.lm_head(h_ref[:, s:e]).float(), -1)
            lo = torch.log_softmax(model.lm_head(h[:, s:e]).float(), -1)
            agree += int((lr.argmax(-1) == lo.argmax(-1)).sum())
            kl += float((lr.exp() * (lr - lo)).sum(-1).clamp_min(0).sum())
            count += e - s
    return dict(top1_agreement=agree / max(1, count), kl_mean=kl / max(1, count), positions=count)


def sparse_rows_before(n: int, start: int, dense_tail: int) -> int:
    """How many of the compared positions ``[start, n)`` lie before the 64-row query blocks that
    a head with ``last = dense_tail`` computes densely (all of them when ``dense_tail`` is 0)."""
    if dense_tail <= 0:
        return n - start
    return max(0, min(n, (n - dense_tail) // 64 * 64) - start)


# ----------------------------------------------------------------------------- the run

def spread_order(n: int) -> list[int]:
    """``0 .. n-1`` in an order whose every prefix spreads over the range (the ends, then
    bit-reversed fractions 1/2, 1/4, 3/4, ...): examples are spread over depths by index, so a
    run cut short still covers them."""
    def frac(k):
        if k < 2:
            return float(k)
        k, f, x = k - 1, 0.5, 0.0
        while k:
            x, k, f = x + f * (k & 1), k >> 1, f / 2
        return x

    out, seen, k = [], set(), 0
    while len(out) < n:
        i = min(n - 1, int(frac(k) * (n - 1) + 0.5))
        k += 1
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


class Stop(Exception):
    """The run's deadline came (``budget_s``/``deadline``) or SIGTERM arrived: stop, keep what was measured."""


def _yarn_plan(model, lengths, yarn):
    """``{length: factor or None}`` and the model's native context, for ``yarn`` = ``"auto"``
    (YaRN past the native context), ``"off"`` or a fixed factor (every length)."""
    try:
        from mi_compile.models import native_context, yarn_factor_for
    except ImportError:
        native_context = yarn_factor_for = None
    native = native_context(model) if native_context else int(model.config.max_position_embeddings)
    if yarn in (None, "off"):
        return {L: None for L in lengths}, native
    if yarn == "auto":
        if yarn_factor_for is None:
            return {L: None for L in lengths}, native
        return {L: yarn_factor_for(L, native) for L in lengths}, native
    return {L: float(yarn) for L in lengths}, native


class _Report:
    """The report dict, rebuilt from the scored rows and written as the run goes."""

    def __init__(self, meta, out_path, skipped_modes, log):
        self.data = dict(meta=meta, modes={}, skipped_modes=dict(skipped_modes or {}), results=[], natural=[],
                         summary={})
        self.cells: dict[tuple, list] = {}
        self.out_path = out_path
        self.rows_path = Path(out_path).with_suffix(".rows.jsonl") if out_path else None
        self.log = log
        self._written = 0.0
        if self.rows_path:
            self.rows_path.parent.mkdir(parents=True, exist_ok=True)
            self.rows_path.write_text("")

    def row(self, kind: str, row: dict):
        if self.rows_path:
            with open(self.rows_path, "a") as f:
                f.write(json.dumps(dict(kind=kind, **row), default=str) + "\n")

    def add_example(self, mode, task, L, row):
        self.cells.setdefault((mode, task, L), []).append(row)
        self.row("example", dict(mode=mode, task=task, length=L, **row))

    def add_natural(self, row):
        self.data["natural"].append(row)
        self.row("natural", row)

    def build(self):
        results = []
        for (mode, task, L), rows in self.cells.items():
            dens = [r["density"] for r in rows if r.get("density") is not None]
            warm = [r["prefill_s"] for r in rows if not r.get("compiled")] or [r["prefill_s"] for r in rows]
            cell = dict(mode=mode, task=task, length=L, n=len(rows),
                        accuracy=sum(r["score"] for r in rows) / max(1, len(rows)),
                        density=sum(dens) / len(dens) if dens else None,
                        prefill_s=sum(warm) / len(warm), examples=rows)
            lps = [r["logprob_mean"] for r in rows if r.get("logprob_mean") is not None]
            if lps:
                cell["logprob_mean"] = sum(lps) / len(lps)
            same = [r["same_answer"] for r in rows if r.get("same_answer") is not None]
            if same:
                cell["same_answer"] = sum(same) / len(same)
            results.append(cell)
        self.data["results"] = results
        self.data["summary"] = summarize(self.data)
        self.data["paired"] = paired_with(self.data)
        return self.data

    def write(self, force: bool = False):
        if not self.out_path or (not force and time.perf_counter() - self._written < 10):
            return
        self.build()
        write_json(self.data, self.out_path)
        self._written = time.perf_counter()


def run_eval(model, tokenizer, modes, lengths, examples: int, task_names=T.TASKS, *, seed: int = 0,
             natural: bool = True, natural_skip: int = 1024, natural_last: Optional[int] = None,
             natural_docs: int = 1, use_inductor: bool = True, out_path: Optional[str] = None, log=print,
             skipped_modes=None, meta_extra: Optional[dict] = None, haystack: str = "noise",
             scoring: Optional[str] = None, natural_kind: Optional[str] = None, budget_s: Optional[float] = None,
             deadline: Optional[float] = None, yarn="auto", density: str = "all", min_seq_len: int = 0,
             dense_sdpa: Optional[bool] = None, order: str = "length", conversations: int = 0,
             turn_tokens: int = 2048, chunks=(), chunk_modes=None):
    """Run every mode over every (task, length) and the natural documents; returns the report
    dict (written to ``out_path`` as the run goes, so partial runs keep what they measured).

    ``haystack``: ``"noise"`` or ``"python"`` (:mod:`.tasks`); ``scoring``: ``"forced"`` or
    ``"greedy"`` (default: forced for the Python haystack, greedy for the noise one);
    ``natural_kind``: ``"story"`` or ``"python"`` documents (default: as the haystack);
    ``natural_last``: compare the last this many positions (default: those after
    ``natural_skip``); ``natural_docs``: documents per length (seeds ``seed`` ... ``seed +
    natural_docs - 1``; top-1 / KL reported per document and as their mean and minimum);
    ``density``: ``"all"``, ``"first"`` or ``"none"`` (see the module doc); ``yarn``: ``"auto"``,
    ``"off"`` or a factor; ``budget_s`` (from the call) or ``deadline`` (a
    ``time.perf_counter()`` value): stop before an example that would end after it;
    ``min_seq_len``: the backend option (0: every prompt goes through the sparse patterns);
    ``order``: ``"length"`` (length by length; within a length task by task) or ``"example"``
    (round robin: example ``i`` of every task at every length, then the next, so that a run cut
    by its deadline has every (task, length) cell with about as many examples); either way the
    examples of a cell come in :func:`spread_order`, so a cut cell still spans the depths;
    ``dense_sdpa``: the dense mode runs SDPA inside the op (flash / cuDNN, faster at long
    lengths) rather than the sparse kernels with every head dense (one kernel's rounding for
    every mode); default: SDPA for the Python haystack, the kernels for the noise one;
    ``conversations``: per length, this many SCBench-style multi-turn conversations
    (:func:`mi_compile.eval.tasks.make_conversation`: one shared context, then one turn of
    ``turn_tokens`` new tokens and a question per task, each turn a prefill continuing the
    cache), scored per turn as tasks ``mt_<task>``; ``chunks``: the task prompts are also
    prefilled in pieces of each of these sizes by every mode, reported as modes
    ``<mode>@<size>`` with ``same_answer``, the fraction of examples whose argmax answer equals
    the unchunked prefill's (``dense@<size>``: how often the chunks' rounding alone changes an
    answer, the floor the sparse modes' fraction is read against); ``chunk_modes``: the names of
    the modes chunked (default: every mode)."""
    if haystack not in T.HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; choose from {T.HAYSTACKS}")
    scoring = scoring or ("forced" if haystack == "python" else "greedy")
    dense_sdpa = (haystack == "python") if dense_sdpa is None else bool(dense_sdpa)
    natural_kind = natural_kind or ("python" if haystack == "python" else "story")
    if scoring not in SCORINGS or natural_kind not in NATURAL_KINDS or density not in DENSITIES or order not in ORDERS:
        raise ValueError(f"bad scoring {scoring!r} / natural_kind {natural_kind!r} / density {density!r} / "
                         f"order {order!r}")
    if natural_docs < 1:
        raise ValueError(f"natural_docs must be >= 1, got {natural_docs}")
    chunks = sorted({int(c) for c in chunks})
    if (conversations or chunks) and scoring != "forced":
        raise ValueError("conversations and chunked prefills are scored teacher-forced (scoring='forced')")
    if any(c < 1 for c in chunks) or conversations < 0 or turn_tokens < 1:
        raise ValueError(f"bad chunks {chunks} / conversations {conversations} / turn_tokens {turn_tokens}")
    names = [m.name for m in modes]
    chunk_modes = set(names if chunk_modes is None else chunk_modes)
    if chunk_modes - set(names):
        raise ValueError(f"chunk_modes {sorted(chunk_modes - set(names))} are not among the modes {names}")
    if tokenizer is None:
        raise ValueError("the harness needs a tokenizer (tiny:<family> models have none)")
    device = next(model.parameters()).device
    eos_ids = {tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None})
    t0 = time.perf_counter()
    if deadline is None and budget_s is not None:
        deadline = t0 + float(budget_s)
    yarn_by_length, native = _yarn_plan(model, lengths, yarn)
    doc_seeds = list(range(seed, seed + natural_docs)) if natural else []
    meta = dict(model=getattr(model.config, "_name_or_path", "") or model.config.model_type,
                device=str(device), dtype=str(next(model.parameters()).dtype), torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(),
                lengths=list(lengths), examples=examples, tasks=list(task_names), seed=seed,
                haystack=haystack, scoring=scoring, natural_kind=natural_kind, natural_skip=natural_skip,
                natural_last=natural_last, natural_doc_seeds=doc_seeds, inductor=use_inductor,
                density_policy=density, min_seq_len=min_seq_len, dense_sdpa=dense_sdpa, native_context=native,
                conversations=conversations, turn_tokens=turn_tokens, chunks=chunks,
                chunk_modes=[n for n in names if n in chunk_modes] if chunks else [],
                yarn={str(L): f for L, f in yarn_by_length.items()},
                cpu_impl=os.environ.get("MI_COMPILE_CPU_IMPL", "reference"),
                started=time.strftime("%Y-%m-%d %H:%M:%S"), **(meta_extra or {}))
    rep = _Report(meta, out_path, skipped_modes, log)
    if haystack == "python" or natural_kind == "python":
        meta["python_haystack"] = T.code_pool(tokenizer).ensure(T.POOL_SPAN).describe()

    torch._dynamo.reset()
    runners = [ModeRunner(model, m, use_inductor=use_inductor, reset=False, min_seq_len=min_seq_len,
                          dense_sdpa=dense_sdpa) for m in modes]
    for r in runners:
        rep.data["modes"][r.mode.name] = dict(source=r.mode.source, config=r.mode.config)
        for c in chunks if r.mode.name in chunk_modes else ():
            rep.data["modes"][f"{r.mode.name}@{c}"] = dict(source=f"{r.mode.name}, prefilled in pieces of {c}",
                                                          config=r.mode.config)
    unit_s: dict[tuple, float] = {}     # seconds of the last (kind, length) unit that compiled nothing

    def check_time(key, what):
        """Stop before a unit that would end after the deadline (estimated from the last one of the
        same kind and length, else from the nearest length measured, scaled by length^1.6)."""
        if deadline is None:
            return
        est = unit_s.get(key)
        if est is None and unit_s:
            (kind, Lp), t = min(unit_s.items(), key=lambda kv: (kv[0][0] != key[0], abs(kv[0][1] - key[1])))
            est = t * (key[1] / Lp) ** 1.6
        if time.perf_counter() + (est or 0.0) > deadline:
            raise Stop(f"deadline: {what} would end after it (estimate {est or 0:.1f} s)")

    current_yarn = None

    def set_length(L):
        nonlocal current_yarn
        factor = yarn_by_length[L]
        if factor != current_yarn:
            from mi_compile.models import set_yarn

            set_yarn(model, factor, original=native)
            current_yarn = factor
            log(f"== {L}: YaRN {'off' if factor is None else f'factor {factor} (native {native})'}")
        return factor

    def run_document(L, d):
        factor = set_length(L)
        ids = T.natural_document(tokenizer, L, seed=d) if natural_kind == "story" else \
            T.code_document(tokenizer, L, seed=d)
        ids = torch.tensor([ids], device=device)
        start = max(0, L - natural_last) if natural_last else min(natural_skip, L - 1)
        ref = None
        compiled = False
        for r in runners:
            r.observe = density != "none"
            # with a cache, as the task prompts are run: one compiled graph serves both
            hidden, _, info = r.prefill(ids, use_cache=True)
            tail = hidden[:, start:].clone()
            del hidden
            if r.mode.name == "dense":
                ref = tail
            cmp = compare_logits(model, ref, tail, 0) if ref is not None else \
                dict(top1_agreement=None, kl_mean=None, positions=0)
            # the same before the query blocks a head's `last` makes dense (only the patterns
            # decide those positions)
            cut = sparse_rows_before(int(ids.shape[1]), start, r.dense_tail())
            if ref is None or cut == tail.shape[1]:
                sparse_rows = cmp
            elif cut == 0:
                sparse_rows = dict(top1_agreement=None, positions=0)
            else:
                sparse_rows = compare_logits(model, ref[:, :cut], tail[:, :cut], 0)
            cmp.update(top1_sparse_rows=sparse_rows["top1_agreement"], sparse_rows=sparse_rows["positions"])
            row = dict(mode=r.mode.name, length=L, doc_seed=d, n_tokens=int(ids.shape[1]),
                       density=info["density"], prefill_s=info["prefill_s"], compiled=info["compiled"],
                       first_position=start, yarn=factor, **cmp)
            compiled |= info["compiled"]
            rep.add_natural(row)
            before = "" if row["sparse_rows"] == row["positions"] else \
                f" (before the dense last rows: {_fmt(row['top1_sparse_rows'], '.4f')} on {row['sparse_rows']})"
            log(f"   natural {L} doc {d} {r.mode.name:<10} density {_fmt(row['density'], '.3f')} top1 "
                f"{_fmt(row['top1_agreement'], '.4f')}{before} KL {_fmt(row['kl_mean'], '.5f')} "
                f"({info['prefill_s']:.1f}s{', compiled' if info['compiled'] else ''})")
        return compiled

    def run_example(L, task, index):
        factor = set_length(L)
        ex = T.make_example_at(tokenizer, task, L, examples, index, seed=seed, haystack=haystack)
        if scoring == "forced":
            p_ids, a_ids = T.prompt_and_answer_ids(tokenizer, ex)
        else:
            p_ids = tokenizer(ex.prompt, add_special_tokens=False).input_ids if ex.input_ids is None \
                else ex.input_ids
        ids = torch.tensor([p_ids], device=device)
        compiled = False
        for r in runners:
            r.observe = density == "all" or (density == "first" and index == order_of_examples[0])
            row = dict(index=ex.index, depth=ex.depth, needle_token_depth=ex.needle_token_depth,
                       n_tokens=int(ids.shape[1]), answers=ex.answers, yarn=factor)
            if scoring == "forced":
                logits, info = r.answer_logits(ids, a_ids)
                v = forced_verdict(logits, a_ids)
                row.update(target=ex.target, answer_ids=a_ids, output=tokenizer.decode(v.pop("argmax")), **v, **info)
            else:
                out_ids, info = r.generate(ids, ex.max_new_tokens, eos_ids)
                text = tokenizer.decode(out_ids, skip_special_tokens=True)
                row.update(output=text, score=T.score(ex, text), **info)
            compiled |= info["compiled"]
            log_example(r.mode.name, task, L, row)
            for c in chunks if r.mode.name in chunk_modes and scoring == "forced" else ():
                r.observe = False
                logits, info = r.answer_logits(ids, a_ids, chunk=c)
                v = forced_verdict(logits, a_ids)
                output = tokenizer.decode(v.pop("argmax"))
                crow = dict(row, output=output, same_answer=float(output == row["output"]), chunk=c, **v, **info)
                compiled |= info["compiled"]
                log_example(f"{r.mode.name}@{c}", task, L, crow)
        return compiled

    def log_example(mode, task, L, row):
        rep.add_example(mode, task, L, row)
        log(f"   {task:<9} {L:>6} #{row['index']} depth {row['depth']:.2f} {mode:<10} score {row['score']:.2f}"
            + (f" lp {row['logprob_mean']:.2f}" if "logprob_mean" in row else "")
            + f" density {_fmt(row['density'], '.3f')} prefill {row['prefill_s']:.2f}s"
            + (" (compiled)" if row["compiled"] else "") + f"  {row['output'].strip()[:40]!r}")

    def run_conversation(L, index):
        """One shared context prefilled once per mode, then its turns in order on that cache."""
        factor = set_length(L)
        conv = T.make_conversation(tokenizer, L, index=index, seed=seed, tasks=task_names, turn_tokens=turn_tokens)
        context = torch.tensor([conv.context_ids], device=device)
        compiled = False
        for r in runners:
            r.observe = density == "all" or (density == "first" and index == 0)
            _, cache, info = r.prefill(context, use_cache=True)
            compiled |= info["compiled"]
            r.observe = False
            for k, turn in enumerate(conv.turns):
                logits, tinfo = r.answer_logits(torch.tensor([turn.ids], device=device), turn.answer_ids, cache=cache)
                v = forced_verdict(logits, turn.answer_ids)
                row = dict(index=index, turn=k + 1, depth=turn.depth, n_tokens=conv.n_tokens,
                           turn_tokens=len(turn.ids), answers=turn.answers, yarn=factor, target=turn.target,
                           answer_ids=turn.answer_ids, output=tokenizer.decode(v.pop("argmax")),
                           context_density=info["density"], context_prefill_s=info["prefill_s"], **v, **tinfo)
                compiled |= tinfo["compiled"]
                log_example(r.mode.name, f"mt_{turn.task}", L, row)
            del cache
        return compiled

    # Examples in an order whose every prefix spreads over the depths (a cut run is not all shallow).
    order_of_examples = spread_order(examples)
    units = [("document", L, d) for L in lengths for d in doc_seeds]
    if order == "length":
        units = [u for L in lengths for u in [("document", L, d) for d in doc_seeds]
                 + [("example", L, t, i) for t in task_names for i in order_of_examples]
                 + [("conversation", L, c) for c in range(conversations)]]
    else:   # "example": round robin over lengths and tasks, so a cut run has every cell
        for i in range(max(examples, conversations)):
            units += [("example", L, t, order_of_examples[i]) for L in lengths for t in task_names if i < examples]
            units += [("conversation", L, i) for L in lengths if i < conversations]
    meta["order"] = order
    dyn = torch._dynamo.config
    saved = (dyn.recompile_limit, dyn.accumulated_recompile_limit)
    # every mode keeps its own cache entries (and YaRN switches add one each): never fall back to eager
    dyn.recompile_limit, dyn.accumulated_recompile_limit = max(64, 4 * len(runners)), max(1024, saved[1])
    try:
        for unit in units:
            kind, L = unit[0], unit[1]
            check_time((kind, L), f"{kind} {unit[2:]} at {L}")
            tu = time.perf_counter()
            compiled = run_document(L, unit[2]) if kind == "document" else \
                run_conversation(L, unit[2]) if kind == "conversation" else run_example(L, unit[2], unit[3])
            if not compiled:
                unit_s[kind, L] = time.perf_counter() - tu
            rep.write()
    except Stop as exc:
        meta["stopped"] = str(exc)
        log(f"== stopped: {exc}")
    finally:
        dyn.recompile_limit, dyn.accumulated_recompile_limit = saved
        if current_yarn is not None:
            from mi_compile.models import set_yarn

            set_yarn(model, None)
        for r in runners:
            rep.data["modes"][r.mode.name].update(
                compile_s=r.compile_s, compiles=r.compiles, observe_s=r.observe_s, busy_s=r.busy_s,
                sites=_site_summary(r.backend))
        meta["wall_s"] = time.perf_counter() - t0
        rep.build()
        if out_path:
            write_json(rep.data, out_path)
    return rep.data


def _site_summary(backend):
    rows = {}
    for r in backend.reports:
        for s in r.sites:
            if s.layer is not None and s.q_len != "1":
                rows.setdefault(s.layer, dict(action=s.action, patterns=s.pattern_summary(), reason=s.reason))
    return {str(k): v for k, v in sorted(rows.items())}


def summarize(report) -> dict:
    """``{mode: {length: {accuracy: mean over tasks, per-task accuracies, density, top1, kl}}}``."""
    out = {}
    for r in report["results"]:
        s = out.setdefault(r["mode"], {}).setdefault(str(r["length"]), {"tasks": {}, "_d": []})
        s["tasks"][r["task"]] = r["accuracy"]
        if r.get("logprob_mean") is not None:
            s.setdefault("logprob", {})[r["task"]] = r["logprob_mean"]
        s.setdefault("n", {})[r["task"]] = r.get("n", len(r["examples"]))
        s["_d"] += [e["density"] for e in r["examples"] if e.get("density") is not None]
    by_key = {}
    for n in report["natural"]:
        by_key.setdefault((n["mode"], str(n["length"])), []).append(n)
    for (mode, L), rows in by_key.items():
        s = out.setdefault(mode, {}).setdefault(L, {"tasks": {}, "_d": []})
        top1 = [r["top1_agreement"] for r in rows if r["top1_agreement"] is not None]
        kl = [r["kl_mean"] for r in rows if r["kl_mean"] is not None]
        s.update(top1_sparse_rows=_mean([r["top1_sparse_rows"] for r in rows if r.get("top1_sparse_rows") is not None]),
                 top1_agreement=sum(top1) / len(top1) if top1 else None,
                 top1_min=min(top1) if top1 else None, top1_max=max(top1) if top1 else None,
                 kl_mean=sum(kl) / len(kl) if kl else None,
                 natural_density=_mean([r["density"] for r in rows if r.get("density") is not None]),
                 natural_docs=len(rows))
    for m in out.values():
        for s in m.values():
            d = s.pop("_d")
            s["density"] = sum(d) / len(d) if d else s.get("natural_density")
            s["accuracy"] = sum(s["tasks"].values()) / len(s["tasks"]) if s["tasks"] else None
            if s.get("logprob"):
                s["logprob_mean"] = sum(s["logprob"].values()) / len(s["logprob"])
    return out


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, under "neither side is better" (each untied
    pair a fair coin), of a split at least as uneven as ``wins`` : ``losses``."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_with(report, reference: str = "dense") -> dict:
    """Each mode against ``reference`` on the same examples (same length, task and example
    index): ``{mode: {length: {pairs, gained, lost, p_sign, logprob_higher, logprob_pairs,
    score, reference_score}}}`` (the last two: mean scores over the pairs).

    ``gained`` / ``lost``: examples the mode answers and the reference does not / the other way;
    ``p_sign``: :func:`sign_test` of the two, i.e. how likely so uneven a split is if the mode
    were as accurate as the reference. With a handful of examples a task, one example moves a
    task's score by 10-25 points; the paired split over every task is what such a run can tell.
    """
    by_key = {}
    for r in report["results"]:
        for e in r["examples"]:
            by_key[(r["mode"], str(r["length"]), r["task"], e.get("index"))] = e
    out = {}
    for (mode, L, task, index), e in by_key.items():
        ref = by_key.get((reference, L, task, index))
        if mode == reference or ref is None or index is None:
            continue
        c = out.setdefault(mode, {}).setdefault(L, dict(pairs=0, gained=0, lost=0, logprob_higher=0,
                                                         logprob_pairs=0, score=0.0, reference_score=0.0))
        c["pairs"] += 1
        c["score"] += e["score"]
        c["reference_score"] += ref["score"]
        c["gained"] += int(e["score"] > ref["score"])
        c["lost"] += int(e["score"] < ref["score"])
        if e.get("logprob_mean") is not None and ref.get("logprob_mean") is not None:
            c["logprob_pairs"] += 1
            c["logprob_higher"] += int(e["logprob_mean"] > ref["logprob_mean"])
    for per_len in out.values():
        for c in per_len.values():
            c["p_sign"] = sign_test(c["gained"], c["lost"])
            c["score"] /= c["pairs"]
            c["reference_score"] /= c["pairs"]
    return out


def write_json(report, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def format_table(report) -> str:
    task_names = list(report["meta"]["tasks"])
    task_names += sorted({r["task"] for r in report["results"]} - set(task_names))   # conversation turns
    head = f"{'mode':<10} {'length':>6} " + " ".join(f"{t:>8}" for t in task_names) + \
        f" {'mean':>6} {'logprob':>7} {'density':>8} {'top1':>7} {'KL':>9}"
    lines = [head, "-" * len(head)]
    by_length = {}
    for mode, per_len in report["summary"].items():
        for L, s in per_len.items():
            by_length.setdefault(int(L), []).append((mode, s))
    for L in sorted(by_length):
        for mode, s in by_length[L]:
            lines.append(f"{mode:<10} {L:>6} " + " ".join(f"{_fmt(s['tasks'].get(t), '.2f'):>8}" for t in task_names)
                         + f" {_fmt(s['accuracy'], '.3f'):>6} {_fmt(s.get('logprob_mean'), '.2f'):>7}"
                         f" {_fmt(s['density'], '.4f'):>8}"
                         f" {_fmt(s.get('top1_agreement'), '.4f'):>7} {_fmt(s.get('kl_mean'), '.2e'):>9}")
    docs = len(report["meta"].get("natural_doc_seeds") or [0])
    if docs > 1:
        lines.append("natural text, per document: " + "; ".join(
            f"{n['mode']} {n['length']} doc {n['doc_seed']}: top1 {_fmt(n['top1_agreement'], '.4f')} at "
            f"{_fmt(n.get('density'), '.3f')}" for n in report["natural"] if n["mode"] != "dense"))
    same = [f"{r['mode']} {r['length']} {r['task']}: {r['same_answer']:.2f}" for r in report["results"]
            if r.get("same_answer") is not None]
    if same:
        lines.append("chunked prefill, answers equal to the unchunked prefill's: " + "; ".join(same))
    paired = [f"{mode} {L}: +{c['gained']} / -{c['lost']} of {c['pairs']} (sign test p {c['p_sign']:.2f})"
              + (f", log-prob higher on {c['logprob_higher']} of {c['logprob_pairs']}" if c["logprob_pairs"] else "")
              for mode, per_len in report.get("paired", {}).items() for L, c in per_len.items()]
    if paired:
        lines.append("against dense, the same examples (answered where dense did not / the reverse): "
                     + "; ".join(paired))
    meta = report["meta"]
    counts = sorted({n for m in report["summary"].values() for s in m.values() for n in s.get("n", {}).values()})
    if meta.get("scoring", "greedy") == "forced":
        how = "fraction of examples whose every answer token is the argmax (teacher-forced); logprob: mean " \
              "log-prob of the answer tokens"
    else:
        how = "fraction of examples solved by greedy decoding, vartrack: fraction of variables named"
    lines.append(f"(accuracy: {how}; examples per cell: {', '.join(map(str, counts)) or '-'}; density: computed "
                 f"fraction of the causal square, mean over layers/heads and the examples counted; top1/KL: "
                 f"{meta.get('natural_kind', 'story')} document vs dense, {_positions(meta)}"
                 + (f", mean over {docs} documents" if docs > 1 else "") + ")")
    if meta.get("stopped"):
        lines.append(f"(run stopped early: {meta['stopped']})")
    return "\n".join(lines)


def _positions(meta) -> str:
    return f"last {meta['natural_last']} positions" if meta.get("natural_last") else \
        f"positions >= {meta.get('natural_skip', 1024)}"


def plot(report, path):
    """The density / accuracy trade-off, one point per (mode, length): density vs mean task
    accuracy, and density vs top-1 agreement on natural text (with the range over documents
    when there are several). A panel without data (e.g. ``--tasks ""``) is left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    modes = list(summary)
    lengths = sorted({int(L) for m in summary.values() for L in m})
    has_tasks = any(s.get("accuracy") is not None for m in summary.values() for s in m.values())
    has_text = any(s.get("top1_agreement") is not None for m in summary.values() for s in m.values())
    panels = (["tasks"] if has_tasks else []) + (["text"] if has_text else [])
    if not panels:
        raise ValueError("plot: the report has neither task accuracies nor natural-text agreement")

    markers = "os^Dvp*"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) + 1.5, 4.4), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    for mi, mode in enumerate(modes):
        for li, L in enumerate(lengths):
            s = summary[mode].get(str(L))
            if not s:
                continue
            kw = dict(color=colors[mi % len(colors)], marker=markers[li % len(markers)], markersize=7,
                      linestyle="none", label=f"{mode} @ {L}")
            if "tasks" in ax_of and s.get("accuracy") is not None and s.get("density") is not None:
                ax_of["tasks"].plot(s["density"], s["accuracy"], **kw)
            if "text" in ax_of and s.get("top1_agreement") is not None:
                y = s["top1_agreement"]
                err = [[y - s["top1_min"]], [s["top1_max"] - y]] if s.get("natural_docs", 1) > 1 else None
                x = s["natural_density"] if s.get("natural_density") is not None else s.get("density")
                if x is not None:
                    ax_of["text"].errorbar(x, y, yerr=err, capsize=3, **kw)
    if "tasks" in ax_of:
        ax_of["tasks"].set(xlabel="attention density computed (fraction of the causal square)",
                           ylabel="accuracy (mean over tasks)", title="synthetic tasks", ylim=(-0.05, 1.05))
    if "text" in ax_of:
        docs = len(report["meta"].get("natural_doc_seeds") or [0])
        ax_of["text"].set(xlabel="attention density computed", ylabel="top-1 agreement with dense",
                          title=f"natural text ({_positions(report['meta'])}"
                                + (f"; mean and range over {docs} documents)" if docs > 1 else ")"))
    for ax in ax_of.values():
        ax.grid(alpha=0.3)
        ax.set_xlim(-0.02, 1.05)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{report['meta']['model']}: density / accuracy trade-off ({report['meta']['device']})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def frontier(reports, length: int, reference: str = "dense") -> list[dict]:
    """Modes of several reports side by side at ``length``, each against the ``reference`` of
    its own report on the same prompts (runs differ in device, prompts and how far their budget
    got, so only paired numbers compare across them). ``reports``: ``(tag, report)`` pairs.
    One row per non-reference mode (:func:`paired_with`): its computed density, its task
    accuracy and the reference's on the prompts both answered (``delta`` = the difference), the
    paired ``gained`` / ``lost`` / ``pairs`` and sign test, and top-1 / KL against the reference."""
    rows = []
    L = str(length)
    for tag, report in reports:
        summary = report.get("summary") or summarize(report)
        for mode, per_len in paired_with(report, reference).items():
            c = per_len.get(L)
            if c is None:
                continue
            s = summary.get(mode, {}).get(L, {})
            rows.append(dict(report=tag, mode=mode, density=s.get("density"), accuracy=round(c["score"], 4),
                             reference_accuracy=round(c["reference_score"], 4),
                             delta=round(c["score"] - c["reference_score"], 4), pairs=c["pairs"],
                             gained=c["gained"], lost=c["lost"], p_sign=c["p_sign"],
                             top1=s.get("top1_agreement"), kl=s.get("kl_mean")))
    return rows


def format_frontier(rows) -> str:
    head = f"{'report':<22} {'mode':<12} {'density':>8} {'accuracy':>8} {'dense':>6} {'delta':>6} " \
           f"{'+/- of pairs':>14} {'p':>5} {'top1':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["density"] is None, r["density"] or 0)):
        split = f"+{r['gained']} / -{r['lost']} of {r['pairs']}"
        lines.append(f"{r['report']:<22} {r['mode']:<12} {_fmt(r['density'], '.4f'):>8} {r['accuracy']:>8.3f} "
                     f"{r['reference_accuracy']:>6.3f} {r['delta']:>+6.3f} {split:>14} "
                     f"{r['p_sign']:>5.2f} {_fmt(r['top1'], '.4f'):>7}")
    lines.append("(delta: the mode's task accuracy minus dense's on the same prompts of its own run; +/-: prompts "
                 "answered where dense did not / the reverse; p: sign test; top1: agreement with dense on the "
                 "run's natural text)")
    return "\n".join(lines)


def plot_frontier(rows, path, title: str = ""):
    """Density against the paired accuracy difference to dense, and against top-1 agreement:
    one point per (report, mode), labelled with the mode, one colour per report."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("plot_frontier: no mode with prompts paired to dense")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    tags = list(dict.fromkeys(r["report"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        if r["density"] is None:
            continue
        c = colors[tags.index(r["report"]) % len(colors)]
        points = [(axes[0], r["delta"])] + ([(axes[1], r["top1"])] if r["top1"] is not None else [])
        for ax, y in points:
            ax.plot(r["density"], y, "o", color=c, label=r["report"])
            ax.annotate(r["mode"], (r["density"], y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0].set(xlabel="attention density computed", ylabel="task accuracy minus dense's (same prompts)",
                title="synthetic tasks, paired with dense")
    axes[1].set(xlabel="attention density computed", ylabel="top-1 agreement with dense", title="natural text")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    one_each = dict(zip(labels, handles))           # one legend entry per report
    axes[1].legend(one_each.values(), one_each.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title or "density / accuracy across runs", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI

def _csv(s, conv=str):
    return [conv(x) for x in s.split(",") if x.strip()]


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy",
                                description="Accuracy / density harness for mi-compile.")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default), qwen2.5-coder-1.5b (alias qwen), a .gguf path or a Hugging Face folder "
                        "(mi_compile.models.load_model)")
    p.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens (default 4096)")
    p.add_argument("--examples", type=int, default=2, help="examples per task and length (default 2)")
    p.add_argument("--tasks", default=",".join(T.TASKS), help=f"comma-separated, from {','.join(T.TASKS)}")
    p.add_argument("--modes", default="dense,default,searched",
                   help="comma-separated: dense, default, searched, and names given with --configs "
                        "(dense always runs first: it is the reference)")
    p.add_argument("--configs", nargs="*", default=[], metavar="NAME=PATH_OR_SPEC",
                   help="extra modes: a config JSON path, or inline pattern:params for every head "
                        "(vertical_slash:V:S, a_shape:SINK:LOCAL, block_sparse:TOPK, dense)")
    p.add_argument("--searched", default=None,
                   help=f"config for the searched mode (default: {SEARCHED_DEFAULT} for smollm2, "
                        "mi_compile/configs/<model>-32k.json up to 32K or <model>-128k.json for other models)")
    p.add_argument("--haystack", choices=("auto",) + T.HAYSTACKS, default="auto",
                   help="task haystack: noise (the first version) or python (source code); auto: noise for "
                        "smollm2, python otherwise")
    p.add_argument("--scoring", choices=("auto",) + SCORINGS, default="auto",
                   help="forced: teacher-forced, one prefill per example, correct when every answer token is the "
                        "argmax; greedy: decode and match strings; auto: forced for the python haystack")
    p.add_argument("--natural-kind", choices=("auto",) + NATURAL_KINDS, default="auto",
                   help="natural-text document: story sentences or Python source (auto: as the haystack)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--natural-skip", type=int, default=1024,
                   help="compare next-token distributions only after this many tokens (default 1024)")
    p.add_argument("--natural-last", type=int, default=None,
                   help="compare only the last N positions (default: 512 for the python document, else "
                        "--natural-skip applies; 0: --natural-skip)")
    p.add_argument("--no-natural", action="store_true", help="skip the natural-text comparison")
    p.add_argument("--docs", type=int, default=1,
                   help="natural-text documents per length (seeds --seed, --seed+1, ...; top-1/KL averaged)")
    p.add_argument("--density", choices=("auto",) + DENSITIES, default="auto",
                   help="count the computed density on every example, on the first of each (mode, task, length) "
                        "and the documents, or never (auto: all up to 16K, else first)")
    p.add_argument("--yarn", default="auto",
                   help="RoPE scaling: auto (YaRN past the model's native context), off, or a factor for every length")
    p.add_argument("--min-seq-len", type=int, default=0,
                   help="backend min_seq_len (default 0: every prompt through the sparse patterns)")
    p.add_argument("--dense", choices=("auto", "sdpa", "kernel"), default="auto",
                   help="how the dense mode attends: sdpa (flash/cuDNN inside the op, faster at long lengths) or "
                        "kernel (the sparse kernels with every head dense: the same kernel as the other modes); "
                        "auto: sdpa for the python haystack, kernel for the noise one (the first version's)")
    p.add_argument("--order", choices=ORDERS, default="length",
                   help="length: length by length; example: round robin over lengths and tasks (a run cut by "
                        "--budget-s then has every cell, with fewer examples)")
    p.add_argument("--conversations", type=int, default=0,
                   help="SCBench-style multi-turn conversations per length: one shared context holding every "
                        "task's needles, then one turn per task (new code and its question), each turn a prefill "
                        "continuing the cache; scored as tasks mt_<task> (default 0)")
    p.add_argument("--turn-tokens", type=int, default=2048, help="new tokens of code in each conversation turn")
    p.add_argument("--chunks", default="",
                   help="comma-separated chunk sizes: every mode (dense too: the chunks' rounding alone) also prefills the task prompts in pieces "
                        "of this many tokens (mode <name>@<size>, with the fraction of answers equal to unchunked)")
    p.add_argument("--chunk-modes", default="",
                   help="comma-separated modes prefilled in --chunks pieces (default: every mode; leaving out "
                        "dense saves its chunked prefills, the rounding floor)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop cleanly (writing what was measured) before an example that would end later than "
                        "this many seconds after the start")
    p.add_argument("--no-inductor", action="store_true",
                   help="run the rewritten graph without Inductor (faster to compile; same attention)")
    p.add_argument("--one-kernel", action="store_true",
                   help="CUDA: run all-dense/A-shape layers through the general 64-row kernel too (not the "
                        "128-row one), so that dense and sparse modes share one kernel's rounding and top-1/KL "
                        "measure the selection, not bf16 accumulation order")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="benchmarks/results/accuracy.json", help="JSON report path")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--replot", default=None, metavar="REPORT_JSON",
                   help="run nothing: print the table of a saved report and draw its plot again "
                        "(to --plot, default the report's path with .png)")
    p.add_argument("--frontier", nargs="+", default=None, metavar="TAG=REPORT_JSON",
                   help="run nothing: the modes of several saved reports at the first of --lengths, each "
                        "paired with its own run's dense; a table, and a plot to --plot (required)")
    return p


def load_model(name: str, dtype, device):
    """``(model, tokenizer)`` through :func:`mi_compile.models.load_model`."""
    from mi_compile import models

    if hasattr(models, "load_model"):
        return models.load_model(name, dtype=dtype, device=device)
    if canonical_model_name(name) == "smollm2":         # an older models.py
        return models.load_smollm2(dtype=dtype, device=device)
    raise SystemExit(f"this mi_compile.models has no load_model: cannot load {name!r}")


def main(argv=None):
    t_start = time.perf_counter()
    a = build_parser().parse_args(argv)
    if a.frontier:
        if not a.plot:
            raise SystemExit("--frontier needs --plot PNG")
        reports = []
        for spec in a.frontier:
            tag, _, path = spec.rpartition("=")
            reports.append((tag or Path(path).stem, json.loads(Path(path).read_text())))
        length = _csv(a.lengths, int)[0]
        rows = frontier(reports, length)
        print(format_frontier(rows))
        plot_frontier(rows, a.plot, f"{len(reports)} runs at {length} tokens, each mode paired with its own run's dense")
        print(f"wrote {a.plot}")
        return rows
    if a.replot:
        report = json.loads(Path(a.replot).read_text())
        report["summary"] = summarize(report)   # reports written before a summary field existed
        report["paired"] = paired_with(report)  # or a paired field
        png = a.plot or str(Path(a.replot).with_suffix(".png"))
        print(format_table(report))
        plot(report, png)
        print(f"wrote {png}")
        return report
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    extra = {}
    for spec in a.configs:
        if "=" not in spec:
            raise SystemExit(f"--configs takes NAME=PATH_OR_SPEC, got {spec!r}")
        k, v = spec.split("=", 1)
        extra[k] = v
    task_names = _csv(a.tasks)
    for t in task_names:
        if t not in T.TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {','.join(T.TASKS)}")
    lengths = _csv(a.lengths, int)
    is_smollm2 = canonical_model_name(a.model) == "smollm2"
    haystack = a.haystack if a.haystack != "auto" else ("noise" if is_smollm2 else "python")
    scoring = None if a.scoring == "auto" else a.scoring
    natural_kind = None if a.natural_kind == "auto" else a.natural_kind
    kind = natural_kind or ("python" if haystack == "python" else "story")
    natural_last = a.natural_last if a.natural_last is not None else (512 if kind == "python" else None)
    density = a.density if a.density != "auto" else ("all" if max(lengths, default=0) <= 16384 else "first")
    yarn = a.yarn if a.yarn in ("auto", "off") else float(a.yarn)
    searched = a.searched or searched_default(a.model, max(lengths, default=None))
    modes, skipped = resolve_modes(_csv(a.modes), extra, searched)
    for n, why in skipped.items():
        print(f"mode {n} skipped: {why}", file=sys.stderr)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG
    t = time.perf_counter()
    model, tok = load_model(a.model, dtype, dev)
    load_s = time.perf_counter() - t
    saved = dict(KERNEL_CONFIG)
    if a.one_kernel:
        KERNEL_CONFIG["wide"] = False

    def on_sigterm(signum, frame):
        raise Stop(f"signal {signum}")

    old_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = run_eval(model, tok, modes, lengths, a.examples, task_names, seed=a.seed,
                          natural=not a.no_natural, natural_skip=a.natural_skip, natural_last=natural_last or None,
                          natural_docs=a.docs, use_inductor=not a.no_inductor,
                          out_path=a.out, skipped_modes=skipped, haystack=haystack, scoring=scoring,
                          natural_kind=natural_kind, deadline=t_start + a.budget_s if a.budget_s else None,
                          yarn=yarn, density=density, min_seq_len=a.min_seq_len,
                          dense_sdpa=None if a.dense == "auto" else a.dense == "sdpa", order=a.order,
                          conversations=a.conversations, turn_tokens=a.turn_tokens, chunks=_csv(a.chunks, int),
                          chunk_modes=_csv(a.chunk_modes) or None,
                          meta_extra=dict(model_name=a.model, load_s=round(load_s, 1), budget_s=a.budget_s,
                                          one_kernel=bool(a.one_kernel), kernel_config=dict(KERNEL_CONFIG)))
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        KERNEL_CONFIG.clear()
        KERNEL_CONFIG.update(saved)
    print()
    print(format_table(report))
    png = a.plot or str(Path(a.out).with_suffix(".png"))
    try:
        plot(report, png)
    except ValueError as exc:       # nothing to draw (e.g. stopped before the first row)
        print(f"no plot: {exc}")
    print(f"wrote {a.out} and {png} ({report['meta']['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
