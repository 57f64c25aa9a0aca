"""Property-based fuzzing (hypothesis) of ``sparse_attention`` and ``load_config``.

Every generated case must end either in a result that matches an independent computation or
in a clean ``ValueError`` / ``PatternError`` (``ConfigError`` for configs) naming the problem;
any other exception, a crash or a wrong answer fails. Runs are derandomized (the same examples
every time); ``--runslow`` raises the example budgets. Each test prints how many cases it ran,
by outcome, and its wall time (shown with ``pytest -rA`` or ``-s``).

The Triton cases run under ``TRITON_INTERPRET=1`` in a subprocess: the interpreter can take
the whole process down on an out-of-bounds access, and a crash must fail the test, not pytest.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mi_compile.config import ConfigError, SparseConfig, load_config  # noqa: E402
from mi_compile.patterns import registry  # noqa: E402
from mi_compile.patterns.spec import HeadPattern, PatternError  # noqa: E402
from mi_compile.sparse import selection_mask, sparse_attention  # noqa: E402

from kernel_checks import rel_err  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}      # as in tests/test_kernels.py
GOOD_HEAD_DIMS = (16, 32, 64, 80)
BAD_HEAD_DIMS = (12, 60, 300)
ROOT = pathlib.Path(__file__).parents[1]
MINFERENCE_FILE = ROOT / "tests" / "data" / "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json"
QWEN_FILE = ROOT / "mi_compile" / "configs" / "qwen2.5-coder-1.5b-128k.json"

# examples per test: (default, --runslow)
BUDGET = {"reference": (300, 2500), "triton": (100, 500), "config_random": (300, 3000),
          "config_mutated": (200, 2000), "entry_points": (150, 1500), "index_tables": (100, 1000)}


@pytest.fixture
def budget(request):
    """``budget(name)`` -> hypothesis settings for that test (larger with ``--runslow``)."""
    slow = request.config.getoption("--runslow") or os.environ.get("MI_COMPILE_RUNSLOW") == "1"
    return lambda name: _settings(BUDGET[name][1 if slow else 0])


def _settings(n):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _report(name, counts, start):
    print(f"\n[fuzz] {name}: {sum(counts.values())} cases in {time.perf_counter() - start:.1f} s "
          f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")


# ------------------------------------------------------------------ attention cases

@st.composite
def head_patterns(draw, n, invalid):
    """One head's pattern with parameters around the edges: 1, near n, past n, 2**31 - 1, and
    with ``invalid`` also 0 and 2**40. Returns a HeadPattern, or the PatternError its
    construction raised."""
    low = 0 if invalid else 1
    edges = [v for v in (0, 1, 2, 63, 64, 65, n - 1, n, n + 1, 10**6, 2**31 - 1) if v >= low]
    size = st.one_of(st.sampled_from(edges + ([2**40] if invalid else [])), st.integers(low, n + 70))
    # per-mille fractions and strides have their own ranges (outside them: PatternError)
    mille = st.one_of(st.sampled_from([1, 500, 900, 999, 1000] + ([0, 1001, 2**31 - 1] if invalid else [])),
                      st.integers(low, 1000))
    special = {"threshold": mille, "gamma": mille, "tau": st.one_of(st.sampled_from([0, 833, 1000]), mille),
               "stride": st.sampled_from([2, 4, 8, 16] + ([0, 3, 32] if invalid else []))}
    kind = draw(st.sampled_from(registry.names()))          # every registered pattern
    try:
        return HeadPattern(kind, **{p: draw(special.get(p, size)) for p in registry.get(kind).params})
    except PatternError as e:
        assert str(e), "empty PatternError message"
        return e


@st.composite
def attention_cases(draw, max_n, max_b=2, max_hkv=3):
    """A random call: shapes, dtype, heads and (maybe invalid) padding tables.

    ``expect`` is None for a valid call, else the word the ValueError must name."""
    B = draw(st.integers(1, max_b))
    Hkv = draw(st.integers(1, max_hkv))
    Hq = Hkv * draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(1, max_n))
    bad_dim = draw(st.integers(0, 9)) == 0
    D = draw(st.sampled_from(BAD_HEAD_DIMS if bad_dim else GOOD_HEAD_DIMS))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    invalid = draw(st.integers(0, 5)) == 0
    heads = [draw(head_patterns(n, invalid)) for _ in range(Hq)]
    mode = draw(st.sampled_from(["none", "len", "start", "both", "bad"]))
    start = [draw(st.integers(0, n)) for _ in range(B)]
    length = [draw(st.integers(0, n - s)) for s in start]
    expect = "head_dim" if bad_dim else None
    seq_start = seq_len = None
    if mode == "none":
        start, length = [0] * B, [n] * B
    elif mode == "len":                             # right padding: start 0
        length = [draw(st.integers(0, n)) for _ in range(B)]
        start, seq_len = [0] * B, list(length)
    elif mode == "start":                           # left padding: len defaults to n - start
        seq_start, length = list(start), [n - s for s in start]
    else:
        seq_start, seq_len = list(start), list(length)
    if mode == "bad":
        b = draw(st.integers(0, B - 1))
        how = draw(st.sampled_from(["neg_start", "neg_len", "past_end", "start_past_n"]))
        if how == "neg_start":
            seq_start[b] = -draw(st.integers(1, n + 5))
        elif how == "neg_len":
            seq_len[b] = -draw(st.integers(1, n + 5))
        elif how == "past_end":
            seq_len[b] = n - seq_start[b] + draw(st.integers(1, 2**20))
        else:
            seq_start[b], seq_len[b] = n + draw(st.integers(1, 100)), 0
        expect = expect or "seq_"
    seed = draw(st.integers(0, 2**16))
    return dict(B=B, Hq=Hq, Hkv=Hkv, n=n, D=D, dtype=dtype, heads=heads, seq_start=seq_start,
                seq_len=seq_len, start=start, length=length, expect=expect, seed=seed)


def make_tensors(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, n, D = case["B"], case["n"], case["D"]
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(case["dtype"])
               for h in (case["Hq"], case["Hkv"], case["Hkv"]))
    i32 = (lambda x: None if x is None else torch.tensor(x, dtype=torch.int32))
    return q, k, v, i32(case["seq_start"]), i32(case["seq_len"])


def run_case(case, check):
    """Run one case; returns its outcome name. ``check(q, k, v, heads, start, len, out)`` checks
    a valid call's result."""
    bad_heads = [h for h in case["heads"] if isinstance(h, PatternError)]
    if bad_heads:
        return "PatternError"
    q, k, v, seq_start, seq_len = make_tensors(case)
    try:
        out = check(q, k, v, case["heads"], seq_start, seq_len)
    except ValueError as e:
        if case["expect"] is None:
            raise AssertionError(f"valid case raised {e!r}: {describe(case)}") from e
        assert case["expect"] in str(e), f"error {e!r} does not name {case['expect']!r}"
        return "ValueError"
    assert case["expect"] is None, f"expected a ValueError naming {case['expect']!r}: {describe(case)}"
    # padding rows are exactly 0
    for b in range(case["B"]):
        s, L = case["start"][b], case["length"][b]
        pad = torch.ones(case["n"], dtype=torch.bool)
        pad[s:s + L] = False
        assert not out[b, :, pad].any(), f"padding rows of sequence {b} not zero: {describe(case)}"
    return "ok"


def describe(case):
    c = {k: v for k, v in case.items() if k != "heads"}
    return f"{c} heads={[h.describe() for h in case['heads']]}"


def brute_force(q, k, v, mask, scale):
    """float64 softmax over the selected pairs; rows that select nothing give 0."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def check_mask_shape(case, mask):
    """The selection stays causal inside each sequence; dense / A-shape heads select exactly
    their definition (in the sequence's own positions)."""
    n = case["n"]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    for b in range(case["B"]):
        s, L = case["start"][b], case["length"][b]
        inside = (i >= s) & (i < s + L) & (j >= s) & (j <= i)
        for h, pat in enumerate(case["heads"]):
            m = mask[b, h]
            assert not (m & ~inside).any(), f"pair outside the causal sequence b={b} h={h}: {describe(case)}"
            if pat.kind == "dense":
                assert torch.equal(m, inside), f"dense head b={b} h={h} not full causal"
            elif pat.kind == "a_shape":
                want = inside & (((j - s) < pat.sink) | ((i - j) < pat.local))
                assert torch.equal(m, want), f"a_shape head b={b} h={h} mask differs: {describe(case)}"


def test_reference_matches_brute_force(budget):
    """impl="reference" equals a float64 masked softmax over ``selection_mask`` (small n)."""
    counts, t0 = Counter(), time.perf_counter()

    def check(case):
        def call(q, k, v, heads, seq_start, seq_len):
            out = sparse_attention(q, k, v, heads, seq_start=seq_start, seq_len=seq_len, impl="reference")
            assert out.dtype == q.dtype and out.shape == q.shape
            mask = selection_mask(q, k, heads, seq_start, seq_len)
            check_mask_shape(case, mask)
            ref = brute_force(q, k, v, mask, q.shape[-1] ** -0.5)
            err = rel_err(out, ref) if ref.norm() > 0 else out.float().abs().max().item()
            assert err < TOL[q.dtype], f"rel err {err:.2e}: {describe(case)}"
            return out
        return call

    @budget("reference")
    @given(attention_cases(max_n=300))
    def prop(case):
        counts[run_case(case, check(case))] += 1

    prop()
    _report("reference vs brute force", counts, t0)


def triton_examples(max_examples: int) -> Counter:
    """The Triton-path property (run in a subprocess by the test below): impl="triton" under
    the interpreter agrees with impl="reference", NaN-poisoned ``out`` fully written."""
    counts = Counter()

    def call(q, k, v, heads, seq_start, seq_len):
        out = torch.full_like(q, float("nan"))
        res = sparse_attention(q, k, v, heads, seq_start=seq_start, seq_len=seq_len,
                               impl="triton", out=out)
        assert res is out and not out.isnan().any(), "kernel left output elements unwritten"
        ref = sparse_attention(q, k, v, heads, seq_start=seq_start, seq_len=seq_len, impl="reference")
        err = rel_err(out, ref) if ref.float().norm() > 0 else out.float().abs().max().item()
        assert err < TOL[q.dtype], f"rel err {err:.2e}"
        return out

    @_settings(max_examples)
    @given(attention_cases(max_n=200, max_b=2, max_hkv=2))
    def prop(case):
        try:
            counts[run_case(case, call)] += 1
        except AssertionError as e:
            raise AssertionError(f"{e} | {describe(case)}") from None

    prop()
    return counts


def max_param_case() -> None:
    """Every parameter at 2**31 - 1 (the largest allowed; 2**40 once overflowed the int32
    tables with a RuntimeError) selects the full causal square on both paths."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 70, 16, generator=g) for h in (4, 2, 2))
    big = 2**31 - 1
    heads = [HeadPattern("a_shape", sink=big, local=big), HeadPattern("vertical_slash", vertical=big, slash=big),
             HeadPattern("block_sparse", topk=big), HeadPattern("a_shape", sink=0, local=big)]
    seq_len = torch.tensor([70, 33], dtype=torch.int32)
    dense = sparse_attention(q, k, v, [HeadPattern("dense")] * 4, seq_len=seq_len, impl="reference")
    for impl in ("reference", "triton"):
        out = sparse_attention(q, k, v, heads, seq_len=seq_len, impl=impl)
        assert rel_err(out, dense) < 1e-4, impl


def test_triton_matches_reference_in_subprocess(budget):
    """The interpreted kernels against the reference, crash-proof (see the module docstring)."""
    t0 = time.perf_counter()
    n = budget("triton").max_examples
    code = (f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
            f"import json, test_fuzz; test_fuzz.max_param_case(); "
            f"print('COUNTS', json.dumps(test_fuzz.triton_examples({n})))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(ROOT), timeout=1200)
    assert res.returncode == 0, f"rc {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    line = [x for x in res.stdout.splitlines() if x.startswith("COUNTS ")][-1]
    counts = Counter(json.loads(line[len("COUNTS "):]))
    assert counts["ok"] > 0
    _report("triton (interpreter) vs reference", counts, t0)


# ------------------------------------------------------------------ config files

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                         st.sampled_from(["dense", "a_shape", "vertical_slash", "block_sparse",
                                          "vertical_and_slash", "stream_llm", "*", "0", "1",
                                          "pattern", "layers", "default", "format", "num_heads",
                                          "mi-compile/v1"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(
        ["0", "1", "*", "pattern", "layers", "default", "format", "num_heads", "num_layers",
         "vertical", "slash", "sink", "local", "topk", "score", "model", "triangle_mix", "dense_layers",
         "tri_shape", "last"])), inner, max_size=4)),
    max_leaves=20)


_PATTERN_NAMES = st.sampled_from(list(registry.names()) + ["vertical_and_slash", "stream_llm", "Dense", ""])
# head entries close to valid ones: a pattern name and random parameter values
near_entries = st.fixed_dictionaries(
    {"pattern": _PATTERN_NAMES},
    optional={k: st.one_of(st.integers(-5, 2**32), json_scalars)
              for k in ("sink", "local", "vertical", "slash", "topk", "last", "threshold", "stride",
                        "max_blocks", "gamma", "tau", "min_budget", "score")})
near_minference = st.tuples(_PATTERN_NAMES, st.one_of(st.integers(-5, 2**32), json_scalars),
                            st.one_of(st.integers(-5, 2**32), json_scalars),
                            st.one_of(st.floats(), json_scalars)).map(list)


def _load_outcome(doc, via_file):
    """``load_config`` on ``doc`` (a dict/list, or written to a JSON file): the outcome name;
    anything but a SparseConfig or a ConfigError fails."""
    try:
        if via_file:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(doc, f)
            try:
                cfg = load_config(f.name)
            finally:
                os.unlink(f.name)
        else:
            cfg = load_config(doc)
    except ConfigError as e:
        assert str(e), "empty ConfigError message"
        return "ConfigError"
    assert isinstance(cfg, SparseConfig)
    return "SparseConfig"


def test_random_json_configs(budget):
    counts, t0 = Counter(), time.perf_counter()

    @budget("config_random")
    @given(json_values, near_entries, near_minference,
           st.sampled_from(["top", "entry", "default", "minference", "near", "near_minference"]),
           st.integers(0, 9))
    def prop(value, near, near_mi, where, coin):
        # random values at the top level and where a head entry goes, in either format
        doc = {"top": value, "entry": {"layers": {"0": {"0": value}}},
               "default": {"default": value}, "minference": [{"0": value}],
               "near": {"layers": {"0": {"0": near, "*": near}}},
               "near_minference": [{"0": near_mi}]}[where]
        counts[_load_outcome(doc, via_file=coin == 0)] += 1

    prop()
    _report("random JSON configs", counts, t0)


_BASES = {"minference": json.loads(MINFERENCE_FILE.read_text()), "qwen": json.loads(QWEN_FILE.read_text())}
_REPLACEMENTS = st.one_of(json_scalars, json_values, st.sampled_from(
    [-1, -2**31, 0, 2**31, 2**63, 10**30, 10**400, 1.5, float("inf"), "1000", [], {}, None, True]))


@st.composite
def mutated_configs(draw):
    """A shipped/MInference config with 1-3 random edits along random paths."""
    name = draw(st.sampled_from(sorted(_BASES)))
    doc = copy.deepcopy(_BASES[name])
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = doc
        depth = draw(st.integers(0, 4))
        for _ in range(depth):
            if isinstance(node, dict) and node:
                k = draw(st.sampled_from(sorted(node, key=str)))
            elif isinstance(node, list) and node:
                k = draw(st.integers(0, len(node) - 1))
            else:
                break
            parent, key, node = node, k, node[k]
        if parent is None:
            continue
        op = draw(st.sampled_from(["drop", "replace", "pattern", "number", "rename"]))
        if op == "drop":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(_REPLACEMENTS)
        elif op == "pattern":
            parent[key] = draw(st.sampled_from(["vertical_slash", "vertical_and_slash", "stream_llm",
                                                "a_shape", "block_sparse", "dense", "nope", ""]))
        elif op == "number":
            parent[key] = draw(st.sampled_from([-1, -10**9, 0, 1, 2**31 - 1, 2**31, 10**18, 10**400]))
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["-1", "01", "x", "*", "99999", " 1", "٣"]))] = parent.pop(key)
    return doc


def test_mutated_configs(budget):
    counts, t0 = Counter(), time.perf_counter()

    @budget("config_mutated")
    @given(mutated_configs(), st.integers(0, 9))
    def prop(doc, coin):
        counts[_load_outcome(doc, via_file=coin == 0)] += 1

    prop()
    assert counts["ConfigError"] > 0
    _report("mutated configs", counts, t0)


def test_unmutated_bases_load():
    for doc in _BASES.values():
        assert isinstance(load_config(copy.deepcopy(doc)), SparseConfig)


@pytest.mark.parametrize("doc", [
    {"layers": {"0": {"0": {"pattern": ["dense"]}}}},                        # unhashable name
    {"default": {"pattern": {"a": 1}}},
    [{"0": [["vertical_and_slash"], 1, 1, 0.5]}],
    [{"0": ["vertical_and_slash", 1, 1, 10**400]}],                        # score past float
    {"layers": {"0": {"0": {"pattern": "dense", "score": -10**400}}}},
], ids=["list_pattern", "dict_pattern", "minference_list_name", "minference_huge_score", "huge_score"])
def test_config_bugs_found_by_fuzzing_are_config_errors(doc):
    """These raised TypeError / OverflowError instead of ConfigError."""
    with pytest.raises(ConfigError):
        load_config(doc)


@pytest.mark.parametrize("value", [-1, 2**31, 2**40])
def test_pattern_parameters_outside_int32_are_pattern_errors(value):
    with pytest.raises(PatternError, match=r"must be an int in 0..2\*\*31 - 1"):
        HeadPattern("block_sparse", topk=value)
    with pytest.raises(ConfigError, match="local"):
        load_config({"default": {"pattern": "a_shape", "sink": 4, "local": value}})


# ------------------------------------------------------------------ the other entry points

ARG_WORDS = ("q ", "k ", "q,", "heads", "head patterns", "seq_start", "seq_len", "scale", "head_dim", "dtype",
             "vs_selection", "batch", "q_len", "KV heads", "n == 0", "index")


@st.composite
def entry_calls(draw):
    """A call of ``build_sparse_index`` / ``selection_mask`` / ``selection_density`` with
    arguments near valid ones: each is either valid or broken in one of a few ways."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    n, D = draw(st.integers(1, 90)), draw(st.sampled_from([16, 32, 16, 12]))
    q_shape, k_shape = [B, Hq, n, D], [B, Hkv, n, D]
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.float32, torch.float64, torch.int64]))
    what = draw(st.sampled_from(["ok"] * 6 + ["q_rank", "k_len", "k_heads", "k_dim", "k_dtype", "not_tensor",
                                 "heads_count", "heads_type", "config_heads", "seq", "scale", "vs_selection"]))
    if what == "q_rank":
        q_shape = q_shape[1:]
    elif what == "k_len":
        k_shape[2] = n - 1                  # q longer than k (shorter is a chunk: valid)
    elif what == "k_heads":
        k_shape[1] = Hq + 1
    elif what == "k_dim":
        k_shape[3] = D + 8
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(q_shape, generator=g).to(dtype)
    k = torch.randn(k_shape, generator=g).to(draw(st.sampled_from([dtype, torch.float16])) if what == "k_dtype"
                                             else dtype)
    if what == "not_tensor":
        q = draw(st.sampled_from([None, 3.0, [[1.0]], "q"]))
    heads = [draw(st.sampled_from([HeadPattern("dense"), HeadPattern("a_shape", sink=4, local=20),
                                   HeadPattern("vertical_slash", vertical=64, slash=8),
                                   HeadPattern("block_sparse", topk=1), "dense"])) for _ in range(Hq)]
    if what == "heads_count":
        heads = heads + heads[:1] if draw(st.booleans()) else heads[:-1]
    elif what == "heads_type":
        heads = draw(st.sampled_from([None, 5, "dense", HeadPattern("dense"), [["dense"]] * Hq, [None] * Hq,
                                      [1.5] * Hq, ["nope"] * Hq]))
    elif what == "config_heads":              # heads from a config, asked for a random head count
        cfg = load_config(_BASES["qwen"])
        heads = ("config", cfg, draw(st.integers(-1, 20)), draw(st.integers(0, 30)))
    seq_start = seq_len = None
    if what == "seq":
        bad = draw(st.sampled_from(["neg", "past", "float", "shape", "bool", "ok"]))
        start = torch.tensor([draw(st.integers(0, n)) for _ in range(B)], dtype=torch.int32)
        length = n - start
        if bad == "neg":
            length[0] = -draw(st.integers(1, 10**6))
        elif bad == "past":
            length[0] = n + draw(st.integers(1, 2**20))
        elif bad == "float":
            length = length.float()
        elif bad == "shape":
            length = length[None]
        elif bad == "bool":
            start = start > 0
        seq_start, seq_len = start, length
    scale = draw(st.sampled_from([None, 0.5, float("nan"), float("inf"), "x", True])) if what == "scale" else None
    vs_selection = None
    if what == "vs_selection":
        vs_selection = draw(st.sampled_from([
            "ok", "float", "shape", "single", (None, None)]))
        keys = torch.randint(-5, n + 70, (B, Hq, 6), generator=g)
        offs = torch.randint(-5, n + 70, (B, Hq, 4), generator=g)
        vs_selection = {"ok": (keys, offs), "float": (keys.float(), offs), "shape": (keys[0], offs),
                        "single": keys, (None, None): (None, None)}[vs_selection] \
            if not isinstance(vs_selection, tuple) else vs_selection
    fn = draw(st.sampled_from(["build", "mask", "density"]))
    return dict(q=q, k=k, heads=heads, seq_start=seq_start, seq_len=seq_len, scale=scale,
                vs_selection=vs_selection, fn=fn, what=what)


def _entry_outcome(call):
    from mi_compile.sparse import SparseIndex, build_sparse_index, selection_density
    q, k, heads = call["q"], call["k"], call["heads"]
    try:
        if isinstance(heads, tuple) and heads and heads[0] == "config":
            heads = heads[1].heads_for(heads[2], heads[3])
        kw = dict(seq_start=call["seq_start"], seq_len=call["seq_len"], scale=call["scale"])
        if call["fn"] == "build" or call["vs_selection"] is not None:
            res = build_sparse_index(q, k, heads, vs_selection=call["vs_selection"], **kw)
            assert isinstance(res, SparseIndex) and res.n == q.shape[2]
        elif call["fn"] == "mask":
            res = selection_mask(q, k, heads, **kw)
            B, H, n = q.shape[0], q.shape[1], q.shape[2]
            assert res.shape == (B, H, n, n) and res.dtype == torch.bool
            assert not (res & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "mask not causal"
        else:
            res = selection_density(q, k, heads, **kw)
            assert res.shape == q.shape[:2] and torch.isfinite(res).all()
            assert ((res >= 0) & (res <= 1 + 1e-9)).all(), f"density {res}"
    except (ValueError, ConfigError, PatternError) as e:
        assert str(e), "empty error message"
        if isinstance(e, ValueError) and not isinstance(e, (ConfigError, PatternError)):
            assert any(w in str(e) for w in ARG_WORDS), f"error names no argument: {e!r}"
        return type(e).__name__
    assert call["what"] in ("ok", "seq", "vs_selection", "config_heads", "scale", "k_dtype"), \
        f"broken call ({call['what']}) returned a result"
    return "ok"


def test_entry_points_validate_their_arguments(budget):
    """build_sparse_index / selection_mask / selection_density: a result that checks out or a
    clean error naming the argument, for near-valid calls with one thing broken."""
    counts, t0 = Counter(), time.perf_counter()

    @budget("entry_points")
    @given(entry_calls())
    def prop(call):
        counts[_entry_outcome(call)] += 1

    prop()
    assert counts["ok"] > 0 and counts["ValueError"] > 0
    _report("entry points", counts, t0)


# hand-made / edited index tables through sparse_attention_from_index: shapes, dtypes and
# devices the host check must refuse (values are the kernels' bounds contract:
# tests/test_kernel_bounds.py runs those in a subprocess)
_TABLES = ("seq_start", "seq_len", "prefix", "sink", "band", "group_lo", "group_hi", "groups_upto",
           "tile_start", "tile_end", "tiles_upto", "columns", "columns_upto", "covered", "blocks",
           "block_count", "offsets")


@st.composite
def index_edits(draw):
    table = draw(st.sampled_from(_TABLES + ("n", "heads")))
    how = draw(st.sampled_from(["dtype", "drop_dim", "add_dim", "grow", "shrink", "strided", "none"]))
    return table, how, draw(st.sampled_from([torch.int64, torch.int16, torch.uint8, torch.float32, torch.bool]))


def _edit(index, table, how, dtype):
    import dataclasses
    if table == "n":
        return dataclasses.replace(index, n=index.n + (1 if how in ("grow", "add_dim") else -1)), True
    if table == "heads":
        if how == "none":
            return index, False
        heads = index.heads + index.heads[:1] if how == "grow" else index.heads[:-1]
        return dataclasses.replace(index, heads=heads), True
    t = getattr(index, table)
    if how == "dtype":
        new = t.to(dtype)
        broken = new.dtype != t.dtype
    elif how == "drop_dim":
        new, broken = t[..., 0], True
    elif how == "add_dim":
        new, broken = t[..., None], True
    elif how == "grow":
        new, broken = torch.cat([t, t[:1]], 0), True
    elif how == "shrink":
        new, broken = t[..., :-1], True
    elif how == "strided":
        new = torch.stack([t, t], -1)[..., 0]
        broken = t.numel() > 1 and not new.is_contiguous()
    else:
        new, broken = t, False
    return dataclasses.replace(index, **{table: new}), broken


def test_edited_index_tables_are_refused_by_name(budget):
    """An index whose tables no longer fit q/k: ValueError naming the table (or n / heads),
    before any kernel; an unchanged one still gives the reference result."""
    from mi_compile.sparse import build_sparse_index, sparse_attention_from_index
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 16, generator=g) for h in (4, 2, 2))
    heads = [HeadPattern("vertical_slash", vertical=64, slash=8), HeadPattern("block_sparse", topk=1),
             HeadPattern("a_shape", sink=4, local=20), HeadPattern("dense")]
    index = build_sparse_index(q, k, heads, seq_len=torch.tensor([70, 41], dtype=torch.int32))
    good = sparse_attention_from_index(q, k, v, index, impl="reference")
    counts, t0 = Counter(), time.perf_counter()

    @budget("index_tables")
    @given(index_edits())
    def prop(edit):
        table, how, dtype = edit
        bad, broken = _edit(index, table, how, dtype)
        if not broken:
            assert torch.equal(sparse_attention_from_index(q, k, v, bad, impl="reference"), good)
            counts["ok"] += 1
            return
        with pytest.raises(ValueError) as exc:
            sparse_attention_from_index(q, k, v, bad, impl="reference")
        msg = str(exc.value)
        assert (f"index.{table}" in msg if table in _TABLES else
                ("index.n" in msg if table == "n" else "head patterns" in msg)), f"{table}/{how}: {msg}"
        counts["ValueError"] += 1

    prop()
    _report("edited index tables", counts, t0)
