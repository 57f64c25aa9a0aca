"""The pattern registry: a pattern is one registered spec object.

A toy pattern registered here, at test time, goes through config loading, HeadPattern
validation and encoding, the index builder (both table builders), the reference mask, the
kernel, the search's candidates and plots without any other module knowing its name. Every
registered pattern round-trips its parameters and reports the same validation errors.
"""
import dataclasses
import json

import pytest
import torch

from mi_compile.config import ConfigError, load_config
from mi_compile.kernels import constants
from mi_compile.patterns import a_shape, block_sparse, index as index_module, registry, vertical_slash
from mi_compile.kernels.constants import BLOCK, KIND_A_SHAPE
from mi_compile.patterns.index import build_index, head_selection_mask
from mi_compile.patterns.registry import PatternSpec
from mi_compile.patterns.spec import (PARAM_FIELDS, PATTERN_IDS, PATTERN_PARAMS, HeadPattern, PatternError, decode_heads,
                                     encode_heads)

BUILTIN = ("dense", "a_shape", "vertical_slash", "block_sparse", "tri_shape", "xattention", "flex_prefill",
           "vertical_slash_tiled")


class LocalWindowSpec(PatternSpec):
    """``local_window(local)``: query ``i`` sees keys ``i - local < j <= i`` (``local >= 1``).

    Expressed through the A-shape kernel tables with no sinks: one static slash group
    ``[0, local - 1]`` with the exact band test ``i - j < local``.
    """

    name = "local_window"
    params = ("local",)
    kernel_kind = KIND_A_SHAPE
    color = "#e15759"

    def validate(self, head):
        if head.local < 1:
            raise PatternError("local_window needs local >= 1")

    def head_tables(self, head):
        return {"prefix": 0, "sink": 0, "band": head.local, "group": (0, head.local - 1)}

    def meta_params(self, head):
        return (0, head.local)

    def max_tiles(self, head, n):
        return -(-n // BLOCK) + 2

    def mask(self, i, j, head):
        return i - j < head.local

    def candidates(self, n):
        return [(self.candidate_rank, HeadPattern(self.name, local=w)) for w in (BLOCK, 4 * BLOCK) if w < n]

    def label(self, head):
        return f"w{head.local}"


@pytest.fixture
def local_window():
    spec = registry.register(LocalWindowSpec())
    try:
        yield spec
    finally:
        registry.unregister(spec.name)


def _qk(n, B=2, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)


def _tables(index):
    return {f.name: getattr(index, f.name) for f in dataclasses.fields(index)
            if isinstance(getattr(index, f.name), torch.Tensor)}


# ---------------------------------------------------------------------- a toy pattern

def test_toy_pattern_is_a_head_pattern(local_window):
    assert registry.get("local_window") is local_window
    assert registry.names()[:len(BUILTIN)] == BUILTIN and registry.names()[-1] == "local_window"
    p = HeadPattern("local_window", local=100)
    assert p.params == {"local": 100} and p.describe() == "local_window(100)"
    others = [code for name, code in PATTERN_IDS.items() if name != "local_window"]
    assert PATTERN_IDS["local_window"] == local_window.code == max(others) + 1
    assert decode_heads(encode_heads([p, HeadPattern("dense")])) == [p, HeadPattern("dense")]
    with pytest.raises(PatternError, match="local_window needs local >= 1"):
        HeadPattern("local_window")
    with pytest.raises(PatternError, match="local_window takes no parameter 'sink'"):
        HeadPattern("local_window", sink=3, local=4)


def test_toy_pattern_in_configs(local_window):
    doc = {"num_heads": 2, "default": {"pattern": "local_window", "local": 128},
           "layers": {"1": {"0": {"pattern": "dense"}, "1": {"pattern": "local_window", "local": 64, "score": 0.5}}}}
    cfg = load_config(doc)
    assert cfg.heads_for(0, 2) == [HeadPattern("local_window", local=128)] * 2
    assert cfg.heads_for(1, 2) == [HeadPattern("dense"), HeadPattern("local_window", local=64)]
    again = load_config(json.loads(json.dumps(cfg.to_json())))
    assert again.to_json() == cfg.to_json() and again.scores == {1: {1: 0.5}}
    cases = [({"pattern": "local_window"}, "local_window is missing parameter 'local'"),
             ({"pattern": "local_window", "local": 0}, "default: local_window needs local >= 1"),
             ({"pattern": "local_window", "local": 8, "sink": 1}, "local_window does not take 'sink'"),
             ({"pattern": "local_window", "local": -1}, "local must be >= 0, got -1")]
    for entry, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config({"default": entry})
    with pytest.raises(ConfigError, match="expected one of .*'local_window'"):
        load_config({"default": {"pattern": "no_such_pattern"}})
    with pytest.raises(ConfigError, match="unknown pattern 'local_window'"):   # not a MInference name
        load_config([{"0": ["local_window", 0, 64]}])


def test_toy_pattern_index_and_reference(local_window):
    n, local = 200, 70
    q, k = _qk(n)
    seq_start = torch.tensor([0, 9], dtype=torch.int32)
    seq_len = torch.tensor([n, n - 30], dtype=torch.int32)
    toy = HeadPattern("local_window", local=local)
    same = HeadPattern("a_shape", sink=0, local=local)
    mixed = [toy, HeadPattern("vertical_slash", vertical=70, slash=100), HeadPattern("dense"),
             HeadPattern("block_sparse", topk=2)]
    as_a_shape = [same] + mixed[1:]
    for tables in ("torch", "triton"):
        got = build_index(q, k, mixed, 0.25, seq_start, seq_len, tables=tables)
        want = build_index(q, k, as_a_shape, 0.25, seq_start, seq_len, tables=tables)
        for name, t in _tables(want).items():
            assert torch.equal(_tables(got)[name], t), (tables, name)
        # the reference mask follows the toy's own definition
        t = torch.arange(n)
        i = t[None, :, None] - seq_start.long()[:, None, None]
        j = t[None, None, :] - seq_start.long()[:, None, None]
        inside = (j >= 0) & (j <= i) & (i < seq_len.long()[:, None, None])
        assert torch.equal(head_selection_mask(got, 0), inside & (i - j < local))
        assert torch.equal(head_selection_mask(got, 0), head_selection_mask(want, 0))


def test_toy_pattern_through_the_kernel(local_window):
    from mi_compile.sparse import sparse_attention

    q, k = _qk(130, B=1, Hq=2, Hkv=1)
    v = torch.randn_like(k)
    heads = [HeadPattern("local_window", local=40), HeadPattern("dense")]
    out = sparse_attention(q, k, v, heads, impl="triton")
    ref = sparse_attention(q, k, v, heads, impl="reference")
    assert (out - ref).abs().max() < 1e-4


def test_toy_pattern_in_the_search_and_plots(local_window):
    from mi_compile.search.candidates import candidate_patterns
    from mi_compile.search.plot import _budget_text, colors

    cands = candidate_patterns(1024)
    toy = [c for c in cands if c.kind == "local_window"]
    assert toy == [HeadPattern("local_window", local=64), HeadPattern("local_window", local=256)]
    assert cands[-1] == HeadPattern("dense")               # dense stays last
    assert colors()["local_window"] == "#e15759" and _budget_text(toy[0]) == "w64"


def test_unregistered_pattern_is_unknown():
    assert "local_window" not in registry.names() and "local_window" not in PATTERN_PARAMS
    with pytest.raises(PatternError, match="unknown pattern 'local_window'"):
        HeadPattern("local_window", local=3)
    with pytest.raises(ConfigError, match="unknown pattern 'local_window'"):
        load_config({"default": {"pattern": "local_window", "local": 3}})


def test_registry_rejects_clashes(local_window):
    with pytest.raises(PatternError, match="already registered"):
        registry.register(LocalWindowSpec())

    class Taken(LocalWindowSpec):
        name, code = "taken", 2

    class BadParam(LocalWindowSpec):
        name, params = "bad_param", ("width",)

    class Alias(LocalWindowSpec):
        name, minference_names = "alias", ("stream_llm",)

    for spec, message in ((Taken(), "id 2 .* is taken by 'vertical_slash'"),
                          (BadParam(), "not HeadPattern fields"),
                          (Alias(), "'stream_llm' already maps to 'a_shape'")):
        with pytest.raises(PatternError, match=message):
            registry.register(spec)
        assert spec.name not in registry.names()


# ---------------------------------------------------------------------- every pattern

def _example(spec):
    """A valid pattern of ``spec``: its first search candidate at 4K tokens, with every optional
    parameter set (so the round trips carry it)."""
    p = spec.candidates(4096)[0][1]
    return dataclasses.replace(p, **{name: 64 for name in spec.optional})


BAD = {"a_shape": [({"local": 0}, "a_shape needs sink \\+ local > 0"),
                   ({"sink": 4, "local": 0}, "a_shape needs local >= 1")],
       "vertical_slash": [({"vertical": 0, "slash": 5}, "vertical_slash needs vertical >= 1 and slash >= 1"),
                          ({"vertical": 5}, "vertical_slash needs vertical >= 1 and slash >= 1")],
       "block_sparse": [({}, "block_sparse needs topk >= 1")],
       "tri_shape": [({"sink": 4, "last": 64}, "tri_shape needs local >= 1"),
                     ({}, "tri_shape needs local >= 1")],
       "xattention": [({"threshold": 0, "stride": 8, "max_blocks": 4}, "xattention needs threshold in 1..1000"),
                      ({"threshold": 900, "stride": 3, "max_blocks": 4}, "xattention needs stride in"),
                      ({"threshold": 900, "stride": 8}, "xattention needs max_blocks >= 1")],
       "flex_prefill": [({"gamma": 0, "tau": 100}, "flex_prefill needs gamma in 1..1000"),
                        ({"gamma": 900, "tau": 1001}, "flex_prefill needs tau in 0..1000")],
       "vertical_slash_tiled": [({"vertical": 0, "slash": 200},
                                 "vertical_slash_tiled needs vertical >= 1 and slash >= 1")]}


def test_builtin_patterns_are_registered_with_stable_ids():
    assert registry.names()[:len(BUILTIN)] == BUILTIN
    assert {name: PATTERN_IDS[name] for name in BUILTIN} == {n: i for i, n in enumerate(BUILTIN)}
    assert registry.MINFERENCE_NAMES == {"vertical_and_slash": "vertical_slash", "a_shape": "a_shape",
                                         "stream_llm": "a_shape", "block_sparse": "block_sparse",
                                         "tri_shape": "tri_shape"}


@pytest.mark.parametrize("name", BUILTIN)
def test_every_pattern_round_trips_its_parameters(name):
    spec = registry.get(name)
    p = _example(spec)
    assert p.kind == name and tuple(p.params) == spec.params == PATTERN_PARAMS[name]
    assert HeadPattern.decode(p.encode()) == p and p.encode()[0] == spec.code
    assert HeadPattern(name, **p.params) == p
    entry = {"pattern": name, **p.params}
    cfg = load_config({"default": entry})
    assert cfg.default == p and cfg.to_json()["default"] == entry
    assert isinstance(spec.label(p), str) and spec.color.startswith("#")
    for alias in spec.minference_names:
        mi = load_config([{"0": [alias, 100, 300]}])
        assert mi.heads_for(0, 1) == [HeadPattern(name, **spec.from_minference(100, 300))]
    # the shared checks, for every parameter
    for param in spec.params:
        for bad in (-1, 2**31, 1.5, True):
            with pytest.raises(PatternError, match=f"{name}: {param} must be an int in 0..2\\*\\*31 - 1"):
                HeadPattern(name, **{**p.params, param: bad})
    for other in PARAM_FIELDS:
        if other not in spec.params:
            with pytest.raises(PatternError, match=f"{name} takes no parameter '{other}'"):
                HeadPattern(name, **{**p.params, other: 1})
    # the pattern's own checks, through HeadPattern and through a config (same message)
    for params, message in BAD.get(name, []):
        with pytest.raises(PatternError, match=message):
            HeadPattern(name, **params)
        with pytest.raises(ConfigError, match=f"<dict>: default: {message}"):
            load_config({"default": {"pattern": name, **{n: params.get(n, 0) for n in spec.params}}})


@pytest.mark.parametrize("name", BUILTIN)
def test_every_pattern_builds_an_index_matching_its_reference(name):
    n = 150
    q, k = _qk(n, B=1)
    p = _example(registry.get(name))
    index = build_index(q, k, [p] * 4, 0.25, torch.zeros(1, dtype=torch.int32),
                        torch.full((1,), n, dtype=torch.int32))
    mask = head_selection_mask(index, 0)
    assert mask.shape == (1, n, n) and bool(mask.diagonal(dim1=1, dim2=2).all())
    assert not bool(mask.triu(1).any())


def test_shared_constants_are_defined_once():
    assert index_module.BLOCK is constants.BLOCK and block_sparse.BLOCK is constants.BLOCK
    assert index_module.SENTINEL is constants.SENTINEL is vertical_slash.SENTINEL is block_sparse.SENTINEL
    assert vertical_slash.FORCED == vertical_slash.LAST_QUERIES == constants.BLOCK
    assert index_module.WIDE is constants.WIDE and index_module.KIND_VS is constants.KIND_VS
    assert a_shape.A_SHAPE_SINK == 64
