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
from mi_compile.patterns.spec import HeadPattern, PatternError  # noqa: E402
from mi_compile.sparse import selection_mask, sparse_attention  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}      # as in tests/test_kernels.py
GOOD_HEAD_DIMS = (16, 32, 64, 80)
BAD_HEAD_DIMS = (12, 60, 300)
ROOT = pathlib.Path(__file__).parents[1]
MINFERENCE_FILE = ROOT / "tests" / "data" / "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json"
QWEN_FILE = ROOT / "mi_compile" / "configs" / "qwen2.5-coder-1.5b-128k.json"

# examples per test: (default, --runslow)
BUDGET = {"reference": (300, 2500), "triton": (100, 500), "config_random": (300, 3000),
          "config_mutated": (200, 2000)}


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


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12)).item()


# ------------------------------------------------------------------ attention cases

@st.composite
def head_patterns(draw, n, invalid):
    """One head's pattern with parameters around the edges: 1, near n, past n, 2**31 - 1, and
    with ``invalid`` also 0 and 2**40. Returns a HeadPattern, or the PatternError its
    construction raised."""
    low = 0 if invalid else 1
    edges = [v for v in (0, 1, 2, 63, 64, 65, n - 1, n, n + 1, 10**6, 2**31 - 1) if v >= low]
    size = st.one_of(st.sampled_from(edges + ([2**40] if invalid else [])), st.integers(low, n + 70))
    kind = draw(st.sampled_from(["dense", "a_shape", "vertical_slash", "block_sparse"]))
    try:
        if kind == "a_shape":
            return HeadPattern(kind, sink=draw(size), local=draw(size))
        if kind == "vertical_slash":
            return HeadPattern(kind, vertical=draw(size), slash=draw(size))
        if kind == "block_sparse":
            return HeadPattern(kind, topk=draw(size))
        return HeadPattern(kind)
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
         "vertical", "slash", "sink", "local", "topk", "score", "model"])), inner, max_size=4)),
    max_leaves=20)


_PATTERN_NAMES = st.sampled_from(["dense", "a_shape", "vertical_slash", "block_sparse",
                                  "vertical_and_slash", "stream_llm", "Dense", ""])
# head entries close to valid ones: a pattern name and random parameter values
near_entries = st.fixed_dictionaries(
    {"pattern": _PATTERN_NAMES},
    optional={k: st.one_of(st.integers(-5, 2**32), json_scalars)
              for k in ("sink", "local", "vertical", "slash", "topk", "score")})
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
