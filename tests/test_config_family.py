"""Config families: configs searched at several prompt lengths, one chosen per call by its key count.

The format and its errors, the member rule, the shipped Qwen family, the op's ``family`` argument
on small CPU tensors, and a tiny model compiled once with a family (one graph for two lengths,
each running the member for its length).
"""
from __future__ import annotations

import json

import pytest
import torch

import mi_compile
from mi_compile.backend import MInferenceBackend
from mi_compile.config import FAMILY_FORMAT, ConfigError, ConfigFamily, SparseConfig, load_config, shipped_configs
from mi_compile.models import tiny_model
from mi_compile.patterns.spec import HeadPattern, encode_heads

SPARSE = torch.ops.mi_compile.sparse_attention.default
DENSE = {"pattern": "dense"}
A_SHAPE = {"pattern": "a_shape", "sink": 16, "local": 32}
VS = {"pattern": "vertical_slash", "vertical": 48, "slash": 48}


def member(length, entry, **extra):
    return {"format": "mi-compile/v1", "length": length, "default": entry, **extra}


def family(*members, **extra):
    return {"format": FAMILY_FORMAT, "members": list(members), **extra}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- format
@pytest.mark.parametrize("doc,message", [
    (family(member(128, DENSE), {"default": A_SHAPE}),
     r"^<dict>: member 1 \(<dict>#1\) has no 'length' \(the prompt length it was searched at\)"),
    (family(member(128, DENSE), member(256, A_SHAPE), member(128, VS)),
     r"^<dict>: members 0 \(<dict>#0\) and 2 \(<dict>#2\) both have length 128"),
    (family(member(128, DENSE, num_heads=2), member(256, A_SHAPE, num_heads=4)),
     r"^<dict>: member 0 \(<dict>#0\) has num_heads=2, member 1 \(<dict>#1\) has num_heads=4"),
    (family(member(128, DENSE, num_layers=2), member(256, A_SHAPE), member(512, VS, num_layers=3)),
     r"num_layers=2, member 2 \(<dict>#2\) has num_layers=3"),
    (family(member(128, DENSE), family(member(256, A_SHAPE))),
     r"^<dict>#1: this member is itself a config family; a family cannot contain a family"),
    (family(member(128, DENSE), extra=1), r"^<dict>: unknown top-level key\(s\) 'extra' of a config family"),
    (family(member(128, DENSE), "no-such-config"),
     r"^<dict>#1: unknown member 'no-such-config': no file .* and no shipped config of that name \(shipped: "),
    (family(), r"^<dict>: a config family needs 'members': a non-empty array"),
    (family(member(128, DENSE), 7), r"^<dict>#1: a family member must be a shipped config's name, a path or an "
                                    r"inline config object, got int"),
    (family(member(128, {"pattern": "a_shape", "sink": 16})), r"^<dict>#0: default: a_shape is missing parameter"),
    (family([{"0": ["vertical_and_slash", 10, 20]}]), r"^<dict>#0: a family member must be .* got list"),
    ({"members": [member(128, DENSE)]}, r"unknown top-level key\(s\) 'members'.*a config family needs "
                                        r"\"format\": \"mi-compile/family-v1\""),
])
def test_family_format_errors_name_the_problem(doc, message):
    with pytest.raises(ConfigError, match=message):
        load_config(doc)


def test_family_files_resolve_members_and_refuse_a_nested_family(tmp_path, monkeypatch):
    """A relative member path is the family file's neighbour (not the working directory's);
    a member file holding a family is refused, naming that file; a broken member file is named."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "short.json").write_text(json.dumps(member(128, A_SHAPE)))
    path = tmp_path / "configs" / "fam.json"
    path.write_text(json.dumps(family("short.json", member(256, VS), model="two lengths")))
    monkeypatch.chdir(tmp_path)
    fam = load_config(str(path))
    assert isinstance(fam, ConfigFamily) and fam.model == "two lengths"
    assert [m.source for m in fam.members] == [str(tmp_path / "configs" / "short.json"), f"{path}#1"]
    assert fam.members[0].heads_for(0, 2) == [HeadPattern("a_shape", sink=16, local=32)] * 2
    assert load_config(fam) is fam

    nested = tmp_path / "configs" / "nested.json"
    nested.write_text(json.dumps(family("fam.json")))
    with pytest.raises(ConfigError, match=rf"^{nested}#0: {path} is itself a config family"):
        load_config(str(nested))
    (tmp_path / "configs" / "broken.json").write_text("{")
    broken = tmp_path / "configs" / "broken_member.json"
    broken.write_text(json.dumps(family("broken.json")))
    with pytest.raises(ConfigError, match=rf"^{broken}#0: .*broken\.json: invalid JSON"):
        load_config(str(broken))


def test_member_for_takes_the_first_member_not_shorter_than_the_keys_else_the_last():
    fam = load_config(family(member(512, VS, min_seq_len=4096), member(128, DENSE),
                             member(256, A_SHAPE, min_seq_len=1024)))
    assert fam.lengths == (128, 256, 512)                   # sorted by length
    picks = {n: fam.member_for(n).length for n in (1, 127, 128, 129, 256, 257, 512, 513, 10**6)}
    assert picks == {1: 128, 127: 128, 128: 128, 129: 256, 256: 256, 257: 512, 512: 512, 513: 512, 10**6: 512}
    assert fam.min_seq_len == 1024 and fam.length is None and not fam.is_default_policy
    assert fam.heads_for(0, 3) == [HeadPattern("vertical_slash", vertical=48, slash=48)] * 3   # the longest's
    assert str(fam) == ("config family <dict>: keys <= 128: <dict>#1; <= 256: <dict>#2; "
                        "<= 512 (and longer): <dict>#0")
    again = load_config(fam.to_json())
    assert [(m.length, m.heads_for(0, 2)) for m in again.members] == \
        [(m.length, m.heads_for(0, 2)) for m in fam.members]
    assert load_config(family(member(128, DENSE))).min_seq_len is None


def test_family_checks_every_member_against_the_model():
    both_layers = {"length": 256, "layers": {"0": {"*": A_SHAPE}, "1": {"*": A_SHAPE}}}
    fam = load_config(family(member(128, DENSE, num_layers=2), both_layers))
    fam.check_model(2, 4)
    with pytest.raises(ConfigError, match=r"<dict>#0 has 2 layers, the model has 3"):
        fam.check_layers(3)
    gap = load_config(family(member(128, DENSE), {"length": 256, "layers": {"1": {"*": A_SHAPE}}}))
    with pytest.raises(ConfigError, match=r"^<dict>#1: layer 0, head 0: no entry for this head"):
        gap.check_model(2, 4)


def test_shipped_qwen_family():
    """``qwen2.5-coder-1.5b`` as a config is the family of the 32K and 128K configs; as a model
    name (the harness's searched default) it still means the model's own configs."""
    from mi_compile.eval.harness import searched_default

    assert "qwen2.5-coder-1.5b" in shipped_configs()
    fam = load_config("qwen2.5-coder-1.5b")
    assert isinstance(fam, ConfigFamily)
    short, long = load_config("qwen2.5-coder-1.5b-32k"), load_config("qwen2.5-coder-1.5b-128k")
    assert isinstance(short, SparseConfig) and isinstance(long, SparseConfig)
    assert [m.source for m in fam.members] == [short.source, long.source]
    assert fam.members == (short, long) and fam.lengths == (32768, 131072)
    assert (fam.num_layers, fam.num_heads, fam.min_seq_len) == (28, 12, 32768)
    fam.check_model(28, 12)
    assert fam.member_for(32768) == short and fam.member_for(32769) == long
    assert fam.heads_for(5, 12) == long.heads_for(5, 12) != short.heads_for(5, 12)
    assert "Qwen2.5-Coder-1.5B-Instruct" in fam.model
    backend = MInferenceBackend({"config": "qwen2.5-coder-1.5b"})
    assert backend.config == fam and backend.options.min_seq_len == 32768
    # the harness's and e2e's searched mode default to the model's family, whatever the length
    assert searched_default("qwen2.5-coder-1.5b", 32768).endswith("qwen2.5-coder-1.5b.json")
    assert searched_default("qwen", 131072).endswith("qwen2.5-coder-1.5b.json")


# ----------------------------------------------------------------------------- the op
HEADS = 2           # query heads (one KV head)
TABLES = [(128, [HeadPattern("dense")] * HEADS),
          (192, [HeadPattern("a_shape", sink=16, local=32)] * HEADS),
          (256, [HeadPattern("vertical_slash", vertical=40, slash=16)] * HEADS)]


def _family_args(tables):
    heads, members = [], []
    for length, patterns in tables:
        heads += encode_heads(patterns)
        members += [length, len(heads)]
    return heads, members


def _qkv(n_q, n_k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, n_q, 16, generator=g)
    k, v = (torch.randn(1, 1, n_k, 16, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("n_q,n_k,pick", [
    (100, 100, 0), (128, 128, 0), (129, 129, 1), (192, 192, 1), (193, 193, 2), (256, 256, 2), (300, 300, 2),
    (64, 160, 1), (64, 200, 2), (96, 320, 2),        # chunks continuing a cache
])
def test_op_runs_the_member_for_its_key_count(n_q, n_k, pick):
    """Each call equals the op given that member's table alone (and, for a chunk, that member's
    length as its prompt length), and differs from every other member's: a wrong pick fails."""
    q, k, v = _qkv(n_q, n_k, seed=n_k)
    heads, members = _family_args(TABLES)
    got = SPARSE(q, k, v, heads, None, None, 0, 0, 3, 0, members)
    outputs = [SPARSE(q, k, v, encode_heads(patterns), None, None, 0, 0, 3, length if n_q < n_k else 0)
               for length, patterns in TABLES]
    torch.testing.assert_close(got, outputs[pick], rtol=0, atol=0)
    for i, other in enumerate(outputs):
        if i != pick:
            assert not torch.allclose(other, outputs[pick], atol=1e-3), f"members {i} and {pick} agree at {n_k}"


def test_a_chunk_takes_its_members_length_as_prompt_length():
    """A chunk over fewer keys than its member's length keeps that share of the vertical-slash
    columns (vertical 160 -> 130 at 200 of 256 keys), as a single config with that length does."""
    wide = [HeadPattern("vertical_slash", vertical=160, slash=16)] * HEADS
    heads, members = _family_args([(128, TABLES[0][1]), (256, wide)])
    q, k, v = _qkv(64, 200, seed=1)
    got = SPARSE(q, k, v, heads, None, None, 0, 0, 0, 0, members)
    torch.testing.assert_close(got, SPARSE(q, k, v, encode_heads(wide), None, None, 0, 0, 0, 256), rtol=0, atol=0)
    assert not torch.allclose(got, SPARSE(q, k, v, encode_heads(wide), None, None, 0, 0, 0), atol=1e-3)


@pytest.mark.parametrize("members,message", [
    ([128, 8, 256], r"must hold \(length, table_end\) pairs, got an odd count 3"),
    ([256, 8, 128, 16], r"member lengths \[256, 128\] must be positive and strictly ascending"),
    ([128, 8, 128, 16], r"member lengths \[128, 128\] must be positive and strictly ascending"),
    ([0, 8, 128, 16], r"member lengths \[0, 128\] must be positive"),
    ([128, 8, 256, 12], r"table ends \[8, 12\] must increase from above 0 to the head table's length 16"),
    ([128, 0, 256, 16], r"table ends \[0, 16\] must increase"),
    ([128, 6, 256, 16], r"member tables of \[6, 10\] ints: each must hold the same heads, 4 ints a head"),
])
def test_op_refuses_a_bad_family_naming_the_layer(members, message):
    q, k, v = _qkv(128, 128, seed=0)
    heads, _ = _family_args(TABLES[:2])
    assert len(heads) == 16
    with pytest.raises(ValueError, match=r"mi_compile.sparse_attention \(layer 7\): family .*: " + message):
        SPARSE(q, k, v, heads, None, None, 0, 0, 7, 0, members)


def test_op_with_a_family_is_traceable_without_a_guard_on_the_length():
    """The fake implementation takes the argument: the op traces under dynamic shapes with the
    family as a constant list and the choice left to run time."""
    heads, members = _family_args(TABLES)

    def f(q, k, v):
        return SPARSE(q, k, v, heads, None, None, 0, 0, 0, 0, members)

    compiled = torch.compile(f, backend="eager", dynamic=True, fullgraph=True)
    for n, pick in ((100, 0), (150, 1), (250, 2)):
        q, k, v = _qkv(n, n, seed=n)
        expected = SPARSE(q, k, v, encode_heads(TABLES[pick][1]), None, None, 0, 0, 0)
        torch.testing.assert_close(compiled(q, k, v), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- a compiled model
SHORT = member(128, A_SHAPE)
LONG = member(256, {"pattern": "vertical_slash", "vertical": 32, "slash": 32})
FAMILY = family(SHORT, LONG)
LENGTHS = {100: SHORT, 200: LONG}       # prompt length -> the member it runs


def _family_arg(node) -> list:
    """The ``family`` argument of an op node, defaults applied (an empty list when not given)."""
    from torch.fx.operator_schemas import normalize_function

    _, kwargs = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    return list(kwargs["family"])


def _logits(model, config, lengths):
    """Logits at each length from one compile with ``config``, and the backend."""
    backend = MInferenceBackend({"config": config, "min_seq_len": 0}, use_inductor=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    out = {}
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(n))
            out[n] = compiled(ids, use_cache=False).logits
    return out, backend


def test_one_graph_runs_each_length_with_its_member():
    from torch._dynamo.utils import counters

    model = tiny_model("qwen2")
    counters.clear()
    got, backend = _logits(model, FAMILY, LENGTHS)
    (report,) = backend.reports                           # one graph for both lengths: no recompile
    layers = model.config.num_hidden_layers
    assert report.rewritten == layers and counters["mi_compile"]["rewritten_family"] == layers
    short_heads = encode_heads([HeadPattern("a_shape", sink=16, local=32)] * 4)
    for site in report.sites:
        assert site.node.target is SPARSE
        assert _family_arg(site.node) == [128, len(short_heads), 256, 2 * len(short_heads)]
        assert site.node.args[3][:len(short_heads)] == short_heads
        assert [length for length, _ in site.family] == [128, 256] and site.heads == site.family[-1][1]
    assert report.family == [(128, "<dict>#0"), (256, "<dict>#1")]

    references = {}
    for config in (SHORT, LONG):
        torch._dynamo.reset()
        references[id(config)], single = _logits(model, config, LENGTHS)
        assert all(_family_arg(s.node) == [] for s in single.reports[0].sites)    # a single config: none
    for n, config in LENGTHS.items():
        torch.testing.assert_close(got[n], references[id(config)][n], rtol=0, atol=1e-5)
        other = references[id(LONG if config is SHORT else SHORT)][n]
        assert not torch.allclose(other, got[n], atol=1e-3), f"both members give the same logits at {n}"


def test_explain_lists_the_members_and_the_one_this_input_runs():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    text = str(mi_compile.explain(model, ids, use_cache=False, options={"config": FAMILY, "min_seq_len": 0}))
    assert "<= 128: 4x a_shape(16,32) | <= 256: 4x vertical_slash(32,32)" in text
    assert ("config family: each sparse call runs the first member whose length its key count does not exceed, "
            "else the last:\n  <= 128: <dict>#0\n  <= 256 (and longer): <dict>#1\n"
            "this input (100 tokens) runs the member for <= 128: <dict>#0") in text
    torch._dynamo.reset()
    single = str(mi_compile.explain(model, ids, use_cache=False, options={"config": SHORT, "min_seq_len": 0}))
    assert "config family" not in single and "| <= 256" not in single


def test_tensor_parallel_slices_every_member():
    """Option tp on a model with rank 1's shape (4 of 8 query heads): each member is sliced to
    heads 4..7 of its own whole-model config."""
    short = member(128, A_SHAPE, num_heads=8, layers={"0": {"5": DENSE}})
    long = member(256, VS, num_heads=8, layers={"1": {"6": DENSE}})
    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    result = mi_compile.explain(model, ids, use_cache=False,
                                options={"config": family(short, long), "min_seq_len": 0, "tp": {"rank": 1, "size": 2}})
    whole = [load_config(short), load_config(long)]
    for site in result.sites:
        assert site.family == [(c.length, c.heads_for(site.layer, 8)[4:]) for c in whole]
    assert result.sites[0].family[0][1][1] == HeadPattern("dense")         # global head 5 of layer 0
    assert result.sites[1].family[1][1][2] == HeadPattern("dense")         # global head 6 of layer 1
    assert "tensor parallel: rank 1 of 2 (option tp)" in str(result)
    from mi_compile.tensor_parallel import TPConfigView, TPSlice

    with pytest.raises(TypeError, match=r"TPConfigView takes a single config, got the config family <dict>: "
                                        r"use rank_config\(\)"):
        TPConfigView(load_config(family(short, long)), TPSlice(1, 2))


def test_single_config_refuses_a_family_naming_its_members(tmp_path):
    from mi_compile.config import ConfigError, load_config, single_config
    from mi_compile.search.plot import plot_config

    one = load_config("qwen2.5-coder-1.5b-32k")
    assert single_config(one, "plot") is one
    with pytest.raises(ConfigError, match=r"is a config family; plot one of its members: .*1\.5b-32k.*1\.5b-128k"):
        plot_config("qwen2.5-coder-1.5b", tmp_path / "family.png")
    assert not (tmp_path / "family.png").exists()
