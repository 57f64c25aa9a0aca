"""The accuracy harness: task generators, scorer, fast masks, report plumbing (fast, pure text /
small tensors) and, behind ``--runslow``, the generators with the real SmolLM2 tokenizer and a
smoke run of the harness on the real model."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mi_compile.eval import harness as H
from mi_compile.eval import tasks as T

# ----------------------------------------------------------------------------- pure text


@pytest.mark.parametrize("task", T.TASKS)
def test_draft_is_deterministic_and_seeded(task):
    a = T.draft(task, 40, 0.3, seed=1, index=2)
    b = T.draft(task, 40, 0.3, seed=1, index=2)
    assert a == b
    others = [T.draft(task, 40, 0.3, seed=s, index=i).answers for s, i in ((2, 2), (1, 3), (7, 0))]
    assert all(o != a.answers for o in others)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_is_at_the_requested_depth(task, depth):
    n = 200
    d = T.draft(task, n, depth, seed=0, index=1)
    assert d.units[d.needle_unit] == d.needle
    assert d.context.count(d.needle) == 1
    hay = [u for u in d.units if u == T.NOISE] if task != "kv" else d.units
    assert len(hay) == n
    # Position counted in haystack units before the needle.
    before = sum(1 for u in d.units[:d.needle_unit] if task == "kv" or u == T.NOISE)
    assert abs(before / n - depth) <= 1.0 / n + 1e-9
    assert all(a in d.context for a in d.answers)


def test_example_depths_spread():
    assert T.example_depths(1) == [0.5]
    ds = T.example_depths(5)
    assert ds[0] == pytest.approx(0.05) and ds[-1] == pytest.approx(0.95)
    assert all(b > a for a, b in zip(ds, ds[1:]))


def test_passkey_text():
    d = T.draft("passkey", 30, 0.5)
    (key,) = d.answers
    assert re.fullmatch(r"\d{5}", key)
    assert d.context.count(key) == 2               # "The pass key is K. ... K is the pass key."
    assert "pass key" in d.question and d.answer_prefix.startswith("The pass key")


def test_multikey_distractors_have_other_keys():
    d = T.draft("multikey", 100, 0.7, seed=3)
    found = re.findall(r"One of the magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", d.context)
    assert len(found) == 4
    keys = [k for k, _ in found]
    assert len(set(keys)) == 4
    target_key = re.search(r"for ([a-z]+-[a-z]+) mentioned", d.question).group(1)
    assert dict(found)[target_key] == d.answers[0]
    assert sum(v == d.answers[0] for _, v in found) == 1


def test_kv_context_is_json_and_answer_is_the_keys_value():
    d = T.draft("kv", 30, 0.4, seed=5)
    obj = json.loads(d.context[len("JSON data:\n"):])
    assert len(obj) == 30
    key = re.search(r'key "([0-9a-f-]{36})"', d.question).group(1)
    assert obj[key] == d.answers[0]
    assert list(obj).index(key) == round(0.4 * 30)


def test_vartrack_chain_resolves_to_the_answers():
    d = T.draft("vartrack", 80, 0.2, seed=4)
    value = re.search(r"value (\d{5})", d.question).group(1)
    env = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", d.context):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs   # links follow what they refer to
    assert sorted(n for n, v in env.items() if v == value) == sorted(d.answers)
    assert len(d.answers) == 5 and len(env) == 10    # plus a distractor chain with another value
    assert len({v for v in env.values()}) == 2


def test_scorer():
    assert T.score(["12345"], " 12345.") == 1.0
    assert T.score(["12345"], " 1234") == 0.0
    assert T.score(["12345"], " 123456") == 0.0      # no match inside a longer number
    assert T.score(["ABCDE", "FGHIJ"], " ABCDE, XFGHIJ") == 0.5
    assert T.score(["ABCDE", "FGHIJ"], "FGHIJ and ABCDE") == 1.0
    u = "0b6d7d52-9e1f-4b7a-8c1e-2f3a4b5c6d7e"
    assert T.score([u], f' {u}"') == 1.0 and T.score([u], u[:-1]) == 0.0
    d = T.draft("passkey", 10, 0.5)
    assert T.score(d, f" {d.answers[0]}.") == 1.0 and T.score(d, " 00000.") == 0.0


def test_natural_text_deterministic_and_varied():
    a, b = T.natural_text(300, seed=0), T.natural_text(300, seed=0)
    assert a == b and a != T.natural_text(300, seed=1)
    sentences = re.split(r"(?<=[.?])\s+", a)
    assert len(set(sentences)) > 0.8 * len(sentences)


# ----------------------------------------------------------------------------- fast masks


def test_fast_density_equals_package_reference():
    from mi_compile import HeadPattern
    from mi_compile.eval.fastref import fast_density, head_pairs
    from mi_compile.patterns.index import head_selection_mask
    from mi_compile.sparse import build_sparse_index, selection_density

    heads = [HeadPattern("dense"), HeadPattern("a_shape", sink=16, local=100),
             HeadPattern("vertical_slash", vertical=30, slash=40), HeadPattern("vertical_slash", vertical=500, slash=64),
             HeadPattern("block_sparse", topk=3), HeadPattern("vertical_slash", vertical=3, slash=7)]
    g = torch.Generator().manual_seed(0)
    for n in (130, 333):
        q = torch.randn(1, 6, n, 32, generator=g)
        k = torch.randn(1, 3, n, 32, generator=g)
        index = build_sparse_index(q, k, heads)
        for h in range(len(heads)):
            ref = head_selection_mask(index, h)
            assert torch.equal(head_pairs(index, h), ref.sum((1, 2))), (n, h)
        assert torch.equal(fast_density(q, k, heads), selection_density(q, k, heads))


# ----------------------------------------------------------------------------- harness plumbing


def test_resolve_modes(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(H.DENSE_CONFIG))
    modes, skipped = H.resolve_modes(["default", "searched"], {"vs": "vertical_slash:100:400", "file": str(cfg)},
                                     searched_path=str(tmp_path / "missing.json"))
    assert [m.name for m in modes] == ["dense", "default", "vs", "file"]
    assert "searched" in skipped
    assert modes[2].config["default"] == {"pattern": "vertical_slash", "vertical": 100, "slash": 400}
    assert modes[3].config == str(cfg)
    with pytest.raises(ValueError):
        H.parse_config_spec("vertical_slash:100")
    with pytest.raises(ValueError):
        H.resolve_modes(["nope"])


def test_compare_logits():
    torch.manual_seed(0)

    class M:
        lm_head = torch.nn.Linear(8, 50)

    h = torch.randn(1, 40, 8)
    same = H.compare_logits(M, h, h, skip=10, chunk=7)
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert same["positions"] == 30
    other = H.compare_logits(M, h, h + torch.randn_like(h), skip=10)
    assert other["kl_mean"] > 0 and other["top1_agreement"] < 1.0


def _fake_report():
    rep = dict(meta=dict(tasks=["passkey", "kv"], natural_skip=1024, model="m", device="cpu"),
               results=[], natural=[], summary={})
    for mode, dens, acc in (("dense", 1.0, 1.0), ("sparse", 0.2, 0.5)):
        for task in ("passkey", "kv"):
            rep["results"].append(dict(mode=mode, task=task, length=4096, accuracy=acc,
                                       examples=[dict(density=dens)]))
        rep["natural"].append(dict(mode=mode, length=4096, density=dens, top1_agreement=acc, kl_mean=1 - acc))
    rep["summary"] = H.summarize(rep)
    return rep


def test_summary_table_and_plot(tmp_path):
    rep = _fake_report()
    s = rep["summary"]["sparse"]["4096"]
    assert s["accuracy"] == 0.5 and s["density"] == 0.2 and s["top1_agreement"] == 0.5
    table = H.format_table(rep)
    assert "sparse" in table and "passkey" in table
    H.plot(rep, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_replot_natural_only_report(tmp_path, capsys):
    """``--replot`` redraws a saved report without a model; a report with no task rows (run
    with ``--tasks ""``) gets only the natural-text panel, with a range over documents; a
    report with nothing to draw is refused by name."""
    rep = _fake_report()
    rep["results"] = []
    rep["meta"]["tasks"] = []
    rep["meta"]["natural_doc_seeds"] = [0, 1]
    rep["natural"].append(dict(mode="sparse", length=4096, density=0.22, top1_agreement=0.7, kl_mean=0.3))
    for row, seed in zip(rep["natural"], (0, 0, 1)):
        row["doc_seed"] = seed
    rep["summary"] = H.summarize(rep)
    assert rep["summary"]["sparse"]["4096"]["top1_min"] == 0.5
    path = tmp_path / "r.json"
    H.write_json(rep, path)
    H.main(["--replot", str(path)])
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "sparse" in capsys.readouterr().out
    rep["natural"] = []
    rep["summary"] = H.summarize(rep)
    with pytest.raises(ValueError, match="neither task accuracies nor natural-text"):
        H.plot(rep, tmp_path / "empty.png")


# ----------------------------------------------------------------------------- real tokenizer / model


@pytest.fixture(scope="module")
def smollm2():
    from mi_compile.models import load_smollm2

    return load_smollm2(dtype=torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("target", [1024, 4096])
def test_examples_fit_length_and_depth_with_real_tokenizer(smollm2, target):
    _, tok = smollm2
    for task in T.TASKS:
        exs = T.make_examples(tok, task, target, 3, seed=0)
        again = T.make_examples(tok, task, target, 3, seed=0)
        assert [e.prompt for e in exs] == [e.prompt for e in again]
        for e in exs:
            n = len(tok(e.prompt, add_special_tokens=False).input_ids)
            assert n == e.n_tokens
            assert abs(n - target) <= 0.03 * target, (task, n)
            tol = 0.1 if target < 2048 else 0.06     # a kv unit is ~75 tokens; vartrack adds links
            assert abs(e.needle_token_depth - e.depth) <= tol, (task, e.depth, e.needle_token_depth)
            assert e.prompt.count(e.needle) == 1
            assert e.prompt.startswith("<|im_start|>") and "<|im_start|>assistant" in e.prompt
        assert [e.depth for e in exs] == pytest.approx([0.05, 0.5, 0.95])


@pytest.mark.slow
def test_harness_smoke(smollm2, tmp_path):
    """~1K tokens, one example per task, dense + default: dense solves the passkey and the
    report carries every field."""
    model, tok = smollm2
    torch._dynamo.reset()
    modes, _ = H.resolve_modes(["dense", "default"])
    out = tmp_path / "r.json"
    rep = H.run_eval(model, tok, modes, [1024], 1, natural_skip=256, natural_docs=2, use_inductor=False,
                     out_path=str(out), log=lambda *a: None)
    torch._dynamo.reset()
    on_disk = json.loads(out.read_text())
    assert set(on_disk) >= {"meta", "modes", "results", "natural", "summary", "skipped_modes"}
    assert set(on_disk["modes"]) == {"dense", "default"}
    assert len(rep["results"]) == 2 * len(T.TASKS)
    for r in rep["results"]:
        assert {"mode", "task", "length", "n", "accuracy", "density", "prefill_s", "examples"} <= set(r)
        for e in r["examples"]:
            assert {"output", "score", "density", "layers_observed", "prefill_s", "decode_s"} <= set(e)
            assert e["layers_observed"] == 30
    passkey = [r for r in rep["results"] if r["mode"] == "dense" and r["task"] == "passkey"][0]
    assert passkey["accuracy"] == 1.0
    for mode in ("dense", "default"):
        s = rep["summary"][mode]["1024"]
        assert set(s["tasks"]) == set(T.TASKS)
        assert {"accuracy", "density", "top1_agreement", "kl_mean"} <= set(s)
        assert 0.0 < s["density"] <= 1.0
    assert rep["summary"]["dense"]["1024"]["top1_agreement"] == 1.0
    # two natural documents per length, each compared with its own dense run, then averaged
    assert [(n["mode"], n["doc_seed"]) for n in rep["natural"]] == [
        ("dense", 0), ("dense", 1), ("default", 0), ("default", 1)]
    docs = [n for n in rep["natural"] if n["mode"] == "default"]
    assert rep["summary"]["default"]["1024"]["top1_agreement"] == pytest.approx(
        sum(n["top1_agreement"] for n in docs) / 2)
    assert rep["summary"]["default"]["1024"]["top1_min"] == min(n["top1_agreement"] for n in docs)
    assert "doc 1" in H.format_table(rep)
    # At 1K the default budget (slash 6096) covers every diagonal: dense in effect.
    assert rep["summary"]["default"]["1024"]["density"] == pytest.approx(1.0)
    assert rep["summary"]["default"]["1024"]["top1_agreement"] > 0.99
    H.plot(rep, tmp_path / "r.png")


def test_main_one_kernel_and_dtype_flags(monkeypatch, tmp_path):
    """--one-kernel sends dense layers through the general kernel for the run only; --dtype
    reaches the model loader; both are recorded in the report's meta."""
    import mi_compile.models as models
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG

    seen = {}

    def fake_load(dtype, device):
        seen["dtype"] = dtype
        return object(), object()

    def fake_run_eval(model, tok, modes, lengths, examples, tasks, **kw):
        seen["wide_during_run"] = KERNEL_CONFIG["wide"]
        seen["meta_extra"] = kw["meta_extra"]
        seen["natural_docs"] = kw["natural_docs"]
        return {"meta": {"wall_s": 0.0}, "results": [], "natural": [], "summary": {}, "modes": {}}

    monkeypatch.setattr(models, "load_smollm2", fake_load)
    monkeypatch.setattr(H, "run_eval", fake_run_eval)
    monkeypatch.setattr(H, "format_table", lambda report: "")
    monkeypatch.setattr(H, "plot", lambda report, path: None)
    before = dict(KERNEL_CONFIG)
    H.main(["--modes", "dense", "--one-kernel", "--dtype", "float16", "--out", str(tmp_path / "r.json")])
    assert seen["dtype"] == torch.float16 and seen["wide_during_run"] is False
    assert seen["meta_extra"]["one_kernel"] is True and seen["meta_extra"]["kernel_config"]["wide"] is False
    assert KERNEL_CONFIG == before                                       # restored
    H.main(["--modes", "dense", "--docs", "3", "--out", str(tmp_path / "r.json")])
    assert seen["dtype"] == torch.float32 and seen["wide_during_run"] == before["wide"]
    assert seen["natural_docs"] == 3
