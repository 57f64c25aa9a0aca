"""Per-head config reader: both formats, resolution rules, and the error messages users see."""
import json
import re
from pathlib import Path

import pytest

from mi_compile.config import (DEFAULT_PATTERN, DEFAULT_POLICY, FORMAT, ConfigError,
                               load_config)
from mi_compile.patterns.spec import HeadPattern

DATA = Path(__file__).parent / "data"
LLAMA = DATA / "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern.json"
QWEN = DATA / "Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern.json"

VS = lambda v, s: HeadPattern("vertical_slash", vertical=v, slash=s)  # noqa: E731


def ours(**extra):
    """A small valid config in our format; ``extra`` overrides top-level keys."""
    doc = {
        "format": FORMAT,
        "model": "test",
        "num_layers": 4,
        "num_heads": 3,
        "default": {"pattern": "vertical_slash", "vertical": 1000, "slash": 6096},
        "layers": {
            "0": {"0": {"pattern": "a_shape", "sink": 128, "local": 1024},
                  "1": {"pattern": "dense"},
                  "2": {"pattern": "vertical_slash", "vertical": 30, "slash": 800, "score": 0.97}},
            "3": {"*": {"pattern": "block_sparse", "topk": 100},
                  "1": {"pattern": "dense"}},
        },
    }
    doc.update(extra)
    return doc


def raises(match, fn, *args):
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args)
    return str(info.value)


# ---------------------------------------------------------------- our format
def test_resolution_explicit_star_default():
    cfg = load_config(ours())
    assert cfg.source == "<dict>" and cfg.model == "test" and not cfg.is_default_policy
    assert cfg.heads_for(0, 3) == [HeadPattern("a_shape", sink=128, local=1024),
                                   HeadPattern("dense"), VS(30, 800)]
    assert cfg.heads_for(1, 3) == [VS(1000, 6096)] * 3                     # default
    bs = HeadPattern("block_sparse", topk=100)
    assert cfg.heads_for(3, 3) == [bs, HeadPattern("dense"), bs]            # "*", head 1 wins
    assert cfg.scores == {0: {2: 0.97}}
    cfg.check_model(4, 3)


def test_round_trip(tmp_path):
    cfg = load_config(ours())
    assert load_config(cfg.to_json()) == cfg  # dict round trip (both sources are <dict>)
    path = tmp_path / "cfg.json"
    cfg.save(path)
    again = load_config(path)
    assert again.source == str(path)
    for field in ("num_layers", "num_heads", "layers", "layer_defaults", "default", "scores",
                  "model"):
        assert getattr(again, field) == getattr(cfg, field), field
    assert again.to_json() == cfg.to_json() == json.loads(path.read_text())


def test_without_default_missing_head_is_error_at_resolution():
    doc = ours()
    del doc["default"]
    cfg = load_config(doc)
    assert cfg.heads_for(0, 3)[1] == HeadPattern("dense")
    msg = raises("no entry", cfg.heads_for, 1, 3)
    assert msg.startswith("<dict>: layer 1, head 0: no entry for this head")
    raises(r"<dict>: layer 1, head 0", cfg.check_model, 4, 3)  # check_model resolves eagerly


def test_undeclared_counts_accept_any_model_that_fits():
    cfg = load_config({"layers": {"2": {"5": {"pattern": "dense"}}},
                       "default": {"pattern": "dense"}})
    assert cfg.num_layers is None and cfg.num_heads is None
    assert len(cfg.heads_for(2, 8)) == 8 and cfg.heads_for(2, 8)[5] == HeadPattern("dense")
    cfg.check_model(3, 6)
    raises(r"^config <dict> has entries for head 5, the model has 4 heads", cfg.heads_for, 0, 4)
    raises(r"^config <dict> has entries for layer 2, the model has 2 layers", cfg.check_model, 2, 6)


def test_head_pattern_values_accepted_in_python_dicts():
    cfg = load_config({"num_heads": 2, "layers": {1: {0: HeadPattern("dense"), 1: VS(1, 2)}},
                       "default": DEFAULT_PATTERN})
    assert cfg.heads_for(1, 2) == [HeadPattern("dense"), VS(1, 2)]


def test_default_policy():
    cfg = load_config(None)
    assert cfg.is_default_policy and cfg == DEFAULT_POLICY and cfg is not DEFAULT_POLICY
    assert DEFAULT_PATTERN == VS(1000, 6096)
    assert cfg.heads_for(17, 9) == [VS(1000, 6096)] * 9
    cfg.check_model(30, 9)
    assert "default policy" in cfg.summary()


# ---------------------------------------------------------------- MInference format
@pytest.mark.parametrize("path, n", [(LLAMA, 32), (QWEN, 28)])
def test_minference_files_load(path, n):
    cfg = load_config(path)
    assert (cfg.num_layers, cfg.num_heads) == (n, n)
    cfg.check_model(n, n)
    raw = json.loads(path.read_text())
    for layer in range(n):
        heads = cfg.heads_for(layer, n)
        assert len(heads) == n and all(h.kind == "vertical_slash" for h in heads)
        for head, (name, v, s, score) in raw[layer].items():
            assert heads[int(head)] == VS(v, s)
            assert cfg.scores[layer][int(head)] == score
    assert str(path) in cfg.summary()


def test_minference_known_heads():
    qwen = load_config(QWEN)
    assert qwen.heads_for(0, 28)[:7] == [VS(3500, 100), VS(1000, 6096), VS(1000, 6096),
                                         VS(500, 700), VS(3500, 100), VS(1000, 6096),
                                         VS(30, 800)]
    llama = load_config(str(LLAMA))
    budgets = {(h.vertical, h.slash) for layer in range(32) for h in llama.heads_for(layer, 32)}
    assert budgets == {(1000, 6096), (100, 800), (30, 800), (3500, 100), (500, 700), (100, 750)}


def test_minference_other_pattern_names_and_round_trip():
    cfg = load_config([{"0": ["a_shape", 64, 512, 0.5], "1": ["stream_llm", 4, 1024],
                        "2": ["block_sparse", 100, 0, 0.9], "3": ["vertical_and_slash", 30, 800]}])
    assert cfg.source == "<list>"
    assert cfg.heads_for(0, 4) == [HeadPattern("a_shape", sink=64, local=512),
                                   HeadPattern("a_shape", sink=4, local=1024),
                                   HeadPattern("block_sparse", topk=100), VS(30, 800)]
    assert cfg.scores == {0: {0: 0.5, 2: 0.9}}
    assert load_config(cfg.to_json()).heads_for(0, 4) == cfg.heads_for(0, 4)


# ---------------------------------------------------------------- errors
def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "llama3.json"
    bad.write_text('{"format": "mi-compile/v1",\n "default": {"pattern": "dense",}\n}\n')
    msg = raises("invalid JSON", load_config, bad)
    assert re.match(rf"^{re.escape(str(bad))}: invalid JSON at line 2, column \d+: ", msg)


def test_missing_file():
    raises(r"^/nonexistent/x\.json: cannot read config file: No such file", load_config,
           "/nonexistent/x.json")


def test_wrong_layer_count_via_check_model():
    cfg = load_config(LLAMA)
    raises(rf"^config {re.escape(str(LLAMA))} has 32 layers, the model has 30$",
           cfg.check_model, 30, 32)


def test_wrong_head_count():
    cfg = load_config(LLAMA)
    raises(rf"^config {re.escape(str(LLAMA))} has 32 heads per layer, the model has 9$",
           cfg.heads_for, 0, 9)
    raises("has 32 heads per layer, the model has 9", cfg.check_model, 32, 9)
    raises("has 3 heads per layer, the model has 9", load_config(ours()).heads_for, 0, 9)


def test_unknown_pattern_name(tmp_path):
    raw = json.loads(LLAMA.read_text())
    raw[3]["7"][0] = "vertical_and_slashh"
    path = tmp_path / "llama3.json"
    path.write_text(json.dumps(raw))
    from mi_compile.patterns.registry import MINFERENCE_NAMES, PATTERN_IDS   # every registered name
    raises(rf"^{re.escape(str(path))}: layer 3, head 7: unknown pattern 'vertical_and_slashh'; "
           rf"expected one of {re.escape(str(sorted(MINFERENCE_NAMES)))}$",
           load_config, path)
    assert {"a_shape", "block_sparse", "stream_llm", "tri_shape", "vertical_and_slash"} <= set(MINFERENCE_NAMES)
    doc = ours()
    doc["layers"]["0"]["2"]["pattern"] = "vertical_and_slash"
    msg = raises(r"^<dict>: layer 0, head 2: unknown pattern 'vertical_and_slash'; expected one "
                 rf"of {re.escape(str(sorted(PATTERN_IDS)))}", load_config, doc)
    assert "MInference's name" in msg


def test_negative_size():
    doc = ours()
    doc["layers"]["0"]["0"]["sink"] = -1
    raises(r"^<dict>: layer 0, head 0: sink must be >= 0, got -1$", load_config, doc)
    raises(r"^<list>: layer 0, head 1: slash_size must be >= 0, got -5$", load_config,
           [{"0": ["vertical_and_slash", 1, 2], "1": ["vertical_and_slash", 1, -5]}])


def test_missing_parameter():
    doc = ours()
    del doc["layers"]["3"]["*"]["topk"]
    raises(r"^<dict>: layer 3, head '\*': block_sparse is missing parameter 'topk'", load_config,
           doc)
    raises(r"^<dict>: default: vertical_slash is missing parameter 'slash'", load_config,
           ours(default={"pattern": "vertical_slash", "vertical": 10}))


def test_layer_and_head_beyond_declared_counts():
    doc = ours()
    doc["layers"]["4"] = {"0": {"pattern": "dense"}}
    raises(r"^<dict>: layer 4 is beyond num_layers=4$", load_config, doc)
    raises(r"^<dict>: layer 4: the config has only 4 layers \(0\.\.3\)$", load_config(ours()).heads_for,
           4, 3)
    doc = ours()
    doc["layers"]["1"] = {"3": {"pattern": "dense"}}
    raises(r"^<dict>: layer 1: head 3 is beyond num_heads=3$", load_config, doc)


@pytest.mark.parametrize("doc, message", [
    (ours(extra=1), r"^<dict>: unknown top-level key\(s\) 'extra'"),
    (ours(format="mi-compile/v2"), r"^<dict>: format is 'mi-compile/v2'"),
    (ours(num_layers="30"), r"^<dict>: num_layers must be a positive int, got '30'"),
    (ours(num_heads=0), r"^<dict>: num_heads must be a positive int, got 0"),
    (ours(layers=[]), r"^<dict>: layers must be an object"),
    ({"format": FORMAT}, r"^<dict>: the config has neither 'layers' nor 'default'"),
    (ours(default={"pattern": "dense", "sink": 3}), r"^<dict>: default: dense does not take 'sink'"),
    (ours(default={"pattern": "block_sparse", "topk": 1.5}),
     r"^<dict>: default: topk must be an int, got 1\.5"),
    (ours(default={"pattern": "block_sparse", "topk": True}), r"topk must be an int, got True"),
    (ours(default={"pattern": "block_sparse", "topk": 0}),
     r"^<dict>: default: block_sparse needs topk >= 1"),
    (ours(default="dense"), r"^<dict>: default: a head entry must be an object"),
    (ours(default={"vertical": 3}), r"^<dict>: default: missing 'pattern'"),
    (ours(layers={"x": {}}), r"^<dict>: bad layer key 'x'"),
    (ours(layers={"0": {"h1": {"pattern": "dense"}}}), r"^<dict>: layer 0: bad head key 'h1'"),
    (ours(layers={"0": {}}), r"^<dict>: layer 0: must be a non-empty object"),
    (ours(layers={"0": {"0": {"pattern": "dense", "score": "high"}}}),
     r"^<dict>: layer 0, head 0: score must be a finite number"),
    ([], r"^<list>: MInference config is an empty list"),
    ([{"0": ["vertical_and_slash", 1, 2]}, {"0": ["vertical_and_slash", 1, 2],
                                            "1": ["vertical_and_slash", 1, 2]}],
     r"^<list>: layer 1: has 2 heads, layer 0 has 1"),
    ([{"0": ["vertical_and_slash", 1, 2], "2": ["vertical_and_slash", 1, 2]}],
     r"^<list>: layer 0: missing head 1"),
    ([{"0": ["vertical_and_slash", 1]}], r"^<list>: layer 0, head 0: expected \[pattern, "),
    ([["vertical_and_slash", 1, 2]], r"^<list>: layer 0: expected a non-empty object"),
    ([{"0": ["vertical_and_slash", 0, 2]}],
     r"^<list>: layer 0, head 0: vertical_slash needs vertical >= 1"),
])
def test_bad_input(doc, message):
    raises(message, load_config, doc)


def test_bad_source_type_and_top_level(tmp_path):
    raises(r"cannot read a config from int", load_config, 3)
    path = tmp_path / "s.json"
    path.write_text('"hello"')
    raises(rf"^{re.escape(str(path))}: top level must be an object", load_config, path)


def test_resolution_argument_checks():
    cfg = load_config(None)
    raises(r"layer index must be a non-negative int, got -1", cfg.heads_for, -1, 4)
    raises(r"num_heads must be a positive int, got 0", cfg.heads_for, 0, 0)


def test_config_min_seq_len_round_trips_and_is_validated():
    doc = {"format": "mi-compile/v1", "min_seq_len": 32768, "default": {"pattern": "dense"}}
    cfg = load_config(doc)
    assert cfg.min_seq_len == 32768
    assert load_config(cfg.to_json()).min_seq_len == 32768
    assert load_config({"default": {"pattern": "dense"}}).min_seq_len is None
    for bad in (-1, 2**31, 1.5, "32768", True):
        with pytest.raises(ConfigError, match="min_seq_len must be an int"):
            load_config({**doc, "min_seq_len": bad})


def test_config_length_round_trips_and_is_validated():
    """``length``: the prompt length the counts were chosen for (it scales a chunk's columns)."""
    doc = {"length": 131072, "default": {"pattern": "vertical_slash", "vertical": 4096, "slash": 64}}
    cfg = load_config(doc)
    assert cfg.length == 131072
    assert load_config(cfg.to_json()).length == 131072
    assert cfg.with_dense_last(64).length == 131072
    assert load_config({"default": {"pattern": "dense"}}).length is None
    for bad in (-1, 0, 63, 2**31, 1.5, "131072", True):
        with pytest.raises(ConfigError, match="length must be an int >= 64"):
            load_config({**doc, "length": bad})
    assert load_config("qwen2.5-coder-1.5b-128k").length == 131072
    assert load_config("qwen2.5-coder-1.5b-32k").length == 32768


def test_benchmark_configs_load_and_fit_their_models():
    """Every config the benchmarks run loads; the Qwen ones give all 28 x 12 heads."""
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
    paths = sorted(root.rglob("*.json"))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(str(path))
        if "qwen" in path.name:
            assert [len(cfg.heads_for(layer, 12)) for layer in range(28)] == [12] * 28, path.name
    mix = load_config(str(root / "adaptive" / "qwen_flex_triangle.json"))
    assert {h.kind for layer in range(8) for h in mix.heads_for(layer, 12)} == {"flex_prefill"}
    assert {h.kind for layer in range(8, 28) for h in mix.heads_for(layer, 12)} == {"tri_shape"}


def test_backend_takes_min_seq_len_from_the_config_unless_the_option_is_given():
    from mi_compile.backend import MInferenceBackend

    doc = {"min_seq_len": 4096, "default": {"pattern": "a_shape", "sink": 64, "local": 64}}
    assert MInferenceBackend({"config": doc}).options.min_seq_len == 4096
    assert MInferenceBackend({"config": doc, "min_seq_len": 0}).options.min_seq_len == 0
    assert MInferenceBackend({"config": {"default": doc["default"]}}).options.min_seq_len == 65536
    assert load_config("qwen2.5-coder-1.5b-128k").min_seq_len == 32768
    assert load_config("qwen2.5-coder-1.5b-32k").min_seq_len == 32768
