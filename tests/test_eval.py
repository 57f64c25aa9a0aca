"""The accuracy harness: task generators (noise and Python haystacks), scorers (string match and
teacher forcing), fast masks, report plumbing (fast: pure text, a byte tokenizer, a tiny model)
and, behind ``--runslow``, the generators with the real SmolLM2 tokenizer and smoke runs of the
harness on the real model."""
from __future__ import annotations

import dataclasses
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


def test_sign_test():
    """Exact two-sided binomial: 11 : 5 is p ~ 0.21, 8 : 0 is 2 / 2**8, no untied pair is 1."""
    assert H.sign_test(11, 5) == pytest.approx(0.2101, abs=1e-4)
    assert H.sign_test(5, 11) == H.sign_test(11, 5)
    assert H.sign_test(8, 0) == pytest.approx(2 / 256)
    assert H.sign_test(0, 0) == 1.0 and H.sign_test(3, 3) == 1.0


def test_paired_with_dense():
    """A mode is compared with dense on the same (length, task, example index) only: an example
    dense did not run is not paired, and dense is not paired with itself."""
    def cell(mode, task, scores, lps):
        return dict(mode=mode, task=task, length=4096, accuracy=sum(scores) / len(scores),
                    examples=[dict(index=i, score=sc, logprob_mean=lp) for i, (sc, lp) in enumerate(zip(scores, lps))])
    rep = dict(meta=dict(tasks=["passkey", "kv"]), natural=[], results=[
        cell("dense", "passkey", [1, 1, 0, 1], [-0.1, -0.2, -2.0, -0.3]),
        cell("dense", "kv", [1, 0], [-0.5, -1.5]),
        cell("sparse", "passkey", [1, 0, 1, 1, 1], [-0.05, -3.0, -0.5, -0.3, -0.1]),   # index 4: no dense pair
        cell("sparse", "kv", [0, 0], [-0.9, -1.0])])
    p = H.paired_with(rep)
    assert set(p) == {"sparse"}
    c = p["sparse"]["4096"]
    assert (c["pairs"], c["gained"], c["lost"]) == (6, 1, 2)
    assert (c["logprob_higher"], c["logprob_pairs"]) == (3, 6)
    assert c["p_sign"] == pytest.approx(1.0)
    rep["summary"] = H.summarize(rep)
    rep["paired"] = p
    assert "sparse 4096: +1 / -2 of 6" in H.format_table(rep)


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
        assert s["density"] > 0.0
    # computed density counts the tiles walked: dense is 1; at 1K tokens the default policy
    # (1000 columns, 6096 diagonals) also walks column tiles its diagonals already cover
    assert rep["summary"]["dense"]["1024"]["density"] == 1.0
    assert rep["summary"]["dense"]["1024"]["top1_agreement"] == 1.0
    # two natural documents per length, each run through every mode in turn (dense first) and
    # compared with its own dense run, then averaged
    assert [(n["mode"], n["doc_seed"]) for n in rep["natural"]] == [
        ("dense", 0), ("default", 0), ("dense", 1), ("default", 1)]
    docs = [n for n in rep["natural"] if n["mode"] == "default"]
    assert rep["summary"]["default"]["1024"]["top1_agreement"] == pytest.approx(
        sum(n["top1_agreement"] for n in docs) / 2)
    assert rep["summary"]["default"]["1024"]["top1_min"] == min(n["top1_agreement"] for n in docs)
    assert "doc 1" in H.format_table(rep)
    # At 1K the default budget (slash 6096) covers every diagonal, so it selects every pair,
    # and its 936 extra columns add tiles on top: more kernel work than dense
    assert rep["summary"]["default"]["1024"]["density"] > 1.0
    assert rep["summary"]["default"]["1024"]["top1_agreement"] > 0.99
    H.plot(rep, tmp_path / "r.png")


@pytest.mark.slow
@pytest.mark.parametrize("target", [4096, 16384])
def test_code_examples_fit_length_with_real_tokenizer(smollm2, target):
    """The Python-haystack prompts with a real BPE tokenizer: the requested length within 1%
    (they are assembled from separately tokenized pieces, so the count is of what the model
    reads), the needle at its depth, the answer tokens decoding to the answer after the prompt,
    and re-tokenizing the decoded prompt gives about as many tokens (SmolLM2's GPT-2-style
    pre-tokenizer splits runs of newlines differently at piece boundaries; Qwen2's does not)."""
    _, tok = smollm2
    for task in T.TASKS:
        exs = T.make_examples(tok, task, target, 3, seed=0, haystack="python")
        for e in exs:
            assert abs(e.n_tokens - target) <= max(64, 0.01 * target), (task, e.n_tokens)
            assert abs(e.needle_token_depth - e.depth) <= (0.06 if target < 8192 else 0.03), (task, e.depth,
                                                                                               e.needle_token_depth)
            text = tok.decode(e.input_ids)
            assert text.count(e.needle.strip()) == 1 and "<|im_start|>assistant" in text
            assert tok.decode(e.input_ids + e.answer_ids).endswith(e.target)
            assert tok.decode(e.answer_ids).strip() == e.target
            again = len(tok(text, add_special_tokens=False).input_ids)
            assert abs(again - e.n_tokens) <= 0.03 * target, (task, again, e.n_tokens)
        assert [e.depth for e in exs] == pytest.approx([0.05, 0.5, 0.95])
    doc = T.code_document(tok, target, seed=0)
    assert len(doc) == target


@pytest.mark.slow
def test_forced_scoring_agrees_with_greedy_on_smollm2(smollm2):
    """The 1K passkey that dense greedy decoding solves (test_harness_smoke) is also solved
    under teacher forcing, and a wrong key is not."""
    model, tok = smollm2
    torch._dynamo.reset()
    ex = T.make_examples(tok, "passkey", 1024, 1, seed=0)[0]
    runner = H.ModeRunner(model, H.Mode("dense", H.DENSE_CONFIG, ""), use_inductor=False)
    ids = torch.tensor([tok(ex.prompt, add_special_tokens=False).input_ids])
    out, _ = runner.generate(ids, ex.max_new_tokens)
    assert T.score(ex, tok.decode(out)) == 1.0
    p_ids, a_ids = T.prompt_and_answer_ids(tok, ex)
    v = H.forced_verdict(runner.answer_logits(torch.tensor([p_ids]), a_ids)[0], a_ids)
    assert v["correct"] and v["logprob_mean"] > -1.0
    wrong = T.prompt_and_answer_ids(tok, dataclasses.replace(ex, target=" " + str(int(ex.answers[0]) ^ 1)))[1]
    assert not H.forced_verdict(runner.answer_logits(torch.tensor([p_ids]), wrong)[0], wrong)["correct"]
    torch._dynamo.reset()


def test_main_one_kernel_and_dtype_flags(monkeypatch, tmp_path):
    """--one-kernel sends dense layers through the general kernel for the run only; --dtype
    reaches the model loader; both are recorded in the report's meta."""
    import mi_compile.models as models
    from mi_compile.kernels.sparse_attention import KERNEL_CONFIG

    seen = {}

    def fake_load(name, dtype, device):
        seen["dtype"], seen["model"] = dtype, name
        return object(), object()

    def fake_run_eval(model, tok, modes, lengths, examples, tasks, **kw):
        seen["wide_during_run"] = KERNEL_CONFIG["wide"]
        seen["meta_extra"] = kw["meta_extra"]
        seen["natural_docs"] = kw["natural_docs"]
        seen["kw"] = kw
        return {"meta": {"wall_s": 0.0}, "results": [], "natural": [], "summary": {}, "modes": {}}

    monkeypatch.setattr(H, "load_model", fake_load)
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
    # SmolLM2 keeps the first version's tasks and scoring; another model gets the Python haystack,
    # teacher forcing, the last 512 positions of a Python document and the budget as a deadline
    assert seen["model"] == "smollm2" and seen["kw"]["haystack"] == "noise" and seen["kw"]["scoring"] is None
    assert seen["kw"]["natural_last"] is None and seen["kw"]["deadline"] is None
    H.main(["--model", "qwen", "--modes", "dense", "--lengths", "16384,131072", "--budget-s", "60",
            "--out", str(tmp_path / "q.json")])
    kw = seen["kw"]
    assert seen["model"] == "qwen" and kw["haystack"] == "python" and kw["natural_last"] == 512
    assert kw["density"] == "first" and kw["yarn"] == "auto" and kw["min_seq_len"] == 0
    assert kw["deadline"] is not None and kw["meta_extra"]["budget_s"] == 60


# ----------------------------------------------------------------------------- Python haystack, teacher forcing


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255), a two-tag chat template: enough of a tokenizer
    for the task builders and the harness, with exact, predictable token counts."""

    chat_template = "user/assistant tags"
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [list(t.encode("utf-8")) for t in text] if isinstance(text, list) else list(text.encode("utf-8"))
        if return_tensors == "pt":
            ids = torch.tensor([ids])

        class Out(dict):
            input_ids = ids
        out = Out(input_ids=ids)
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def convert_tokens_to_ids(self, token):
        return None


class MergingTokenizer(ByteTokenizer):
    """Bytes, except that ' "' followed by a letter is one token (as some BPE vocabularies do)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        ids, i = [], 0
        while i < len(text):
            if text.startswith(' "', i) and i + 2 < len(text) and text[i + 2].isalpha():
                ids.append(1000 + ord(text[i + 2]))
                i += 3
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


SAMPLE = '''"""A module."""
import os


def small(x):
    return x + 1


@decorator
class Big:
    """Doc."""

    def a(self):
        return 1

    def b(self):
        y = 2
        return y
'''


def test_split_source_pieces_cover_the_text_at_statement_starts():
    pieces = T.split_source(SAMPLE, "sample.py", max_lines=4)
    assert "".join(p.text for p in pieces) == "# file: sample.py\n\n" + SAMPLE
    assert all(p.text.endswith("\n") for p in pieces)
    starts = [p.text.splitlines()[0] for p in pieces]
    assert starts == ["# file: sample.py", "import os", "def small(x):", "@decorator", '    """Doc."""',
                      "    def a(self):", "    def b(self):"]
    assert [p.indent for p in pieces] == ["", "", "", "", "    ", "    ", "    "]
    # an uncut long statement (a literal) is chunked and no needle goes inside it
    lit = "X = [\n" + "".join(f"    {i},\n" for i in range(30)) + "]\n"
    chunks = T.split_source(lit, max_lines=5)
    assert "".join(p.text for p in chunks) == lit and chunks[0].indent == "" and all(
        p.indent is None for p in chunks[1:])
    gen = T.synthetic_module(3)
    assert gen == T.synthetic_module(3) and gen != T.synthetic_module(4)
    assert "".join(p.text for p in T.split_source(gen)) == gen      # it parses


@pytest.mark.parametrize("task", T.TASKS)
def test_code_draft_needles_and_answer(task):
    d = T.code_draft(task, 0.3, seed=1, index=2)
    assert d == T.code_draft(task, 0.3, seed=1, index=2)
    assert d.answers != T.code_draft(task, 0.3, seed=2, index=2).answers
    targets = [n for n in d.needles if n.target]
    assert len(targets) == 1 and targets[0].depth == 0.3 and d.needle == targets[0].text
    assert len(d.answers) == 1 and d.target == d.answers[0]
    text = "".join(n.text for n in d.needles)
    if task == "passkey":
        assert re.fullmatch(r"PASS_KEY = (\d{5})  # the pass key: remember it\n\n", d.needle).group(1) == d.target
    elif task == "multikey":
        found = dict(re.findall(r"(MAGIC_NUMBER_[A-Z]+_[A-Z]+) = (\d{7})", text))
        asked = re.search(r"(MAGIC_NUMBER_[A-Z]+_[A-Z]+)", d.question).group(1)
        assert len(found) == 6 and found[asked] == d.target and list(found.values()).count(d.target) == 1
        words = asked.split("_")[2:]
        sharing = [k for k in found if k != asked and set(k.split("_")[2:]) & set(words)]
        assert len(sharing) == 2                  # two distractors share a word with the asked key
    elif task == "kv":
        found = dict(re.findall(r'KV_REGISTRY\["([0-9a-f]{8})"\] = "([0-9a-f]{8})"', text))
        asked = re.search(r'KV_REGISTRY\["([0-9a-f]{8})"\]', d.question).group(1)
        assert len(found) == 32 and found[asked] == d.target and d.answer_prefix.endswith('"')
    else:
        env = {}
        for n in sorted(d.needles, key=lambda n: n.depth):
            name, rhs = n.text.strip().split(" = ")
            env[name] = env[rhs] if rhs in env else rhs
        asked = re.search(r"variable ([a-z]{5}) hold", d.question).group(1)
        assert env[asked] == d.target and len(env) == 4 and len(set(env.values())) == 2
        assert d.needle.startswith(next(k for k, v in env.items() if v == d.target))


@pytest.mark.parametrize("task", T.TASKS)
def test_code_examples_fit_length_and_depth(task):
    tok = ByteTokenizer()
    for target in (8192, 32768):        # bytes: about 2K and 9K tokens of a BPE vocabulary
        exs = T.make_examples(tok, task, target, 3, seed=0, haystack="python")
        assert [e.input_ids for e in exs] == [e.input_ids for e in T.make_examples(tok, task, target, 3, seed=0,
                                                                                    haystack="python")]
        for e in exs:
            assert e.n_tokens == len(e.input_ids) and abs(e.n_tokens - target) <= 160, (target, e.n_tokens)
            assert abs(e.needle_token_depth - e.depth) <= (0.1 if target < 16384 else 0.05), (e.depth,
                                                                                               e.needle_token_depth)
            text = tok.decode(e.input_ids)
            assert text.count(e.needle.strip()) == 1 and text.startswith("<user>Below is a long Python source")
            assert text.endswith("</user><assistant>" + T.code_draft(task, e.depth, 0, e.index).answer_prefix)
            assert tok.decode(e.answer_ids) == e.target == e.answers[0]
            assert T.prompt_and_answer_ids(tok, e) == (e.input_ids, e.answer_ids)
        assert [e.depth for e in exs] == pytest.approx([0.05, 0.5, 0.95])
    # a prompt too short for every distractor keeps the target needle and fewer distractors
    short = T.make_code_example(tok, "kv", 1200, 0.5)
    assert short.needle.strip() in tok.decode(short.input_ids)
    assert tok.decode(short.input_ids).count("KV_REGISTRY[") < 33


def test_code_document_is_exact_and_seeded():
    tok = ByteTokenizer()
    a = T.code_document(tok, 3000, seed=1)
    assert len(a) == 3000 and a == T.code_document(tok, 3000, seed=1) and a != T.code_document(tok, 3000, seed=2)
    assert T.code_document(tok, 5000, seed=1)[:3000] == a          # a longer document extends the shorter one


def test_split_answer_and_noise_targets():
    tok = MergingTokenizer()
    drop, ans = T.split_answer(tok, "The value is ", "71d")
    assert drop == 0 and ans == [ord(c) for c in "71d"]
    drop, ans = T.split_answer(tok, 'The value is "', "b71d")   # ' "' + 'b' merge: the prefix gives back 2 tokens
    assert drop == 2 and ans == [1000 + ord("b")] + [ord(c) for c in "71d"]
    drop, ans = T.split_answer(tok, "The value is", ' "b71d"')    # ' "b' merges across the boundary
    assert drop == 0 and ans[0] == 1000 + ord("b")
    drop, ans = T.split_answer(tok, 'key "', "x")                # the prefix's last two bytes merge with x
    assert drop == 2 and ans == [1000 + ord("x")]
    # noise-haystack examples: the target follows the answer prefix; its tokens are split off the prompt
    btok = ByteTokenizer()
    for task in T.TASKS:
        ex = T.make_example(btok, task, 2000, 0.5)
        p_ids, a_ids = T.prompt_and_answer_ids(btok, ex)
        assert btok.decode(p_ids) == ex.prompt and btok.decode(a_ids) == ex.target
        assert all(a in ex.target for a in ex.answers)


def test_spread_order_prefixes_cover_the_depths():
    for n in (1, 2, 3, 7, 20, 33):
        order = H.spread_order(n)
        assert sorted(order) == list(range(n)) and order[:2] == ([0, n - 1] if n > 1 else [0])
    depths = T.example_depths(20)
    first = sorted(depths[i] for i in H.spread_order(20)[:5])
    assert first[0] == pytest.approx(0.05) and first[-1] == pytest.approx(0.95)
    assert max(b - a for a, b in zip(first, first[1:])) <= 0.3


def test_forced_verdict_on_constructed_logits():
    answer = [5, 7, 2]
    logits = torch.full((3, 10), -5.0)
    logits[torch.arange(3), torch.tensor(answer)] = 5.0
    v = H.forced_verdict(logits, answer)
    assert v["correct"] and v["score"] == 1.0 and v["tokens_correct"] == 3 and v["argmax"] == answer
    assert v["logprob_mean"] == pytest.approx(float(torch.log_softmax(logits[0], -1)[5]), rel=1e-4)
    logits[2, 3] = 6.0                               # the last token is not the argmax any more
    v = H.forced_verdict(logits, answer)
    assert not v["correct"] and v["score"] == 0.0 and v["tokens_correct"] == 2 and v["first_token_correct"]
    assert v["argmax"] == [5, 7, 3]
    with pytest.raises(ValueError):
        H.forced_verdict(logits[:2], answer)


def test_a_shape_pairs_and_layer_density_match_the_reference():
    from mi_compile import HeadPattern
    from mi_compile.patterns.index import head_selection_mask
    from mi_compile.sparse import build_sparse_index, selection_density

    for n, sink, local in ((100, 0, 7), (100, 16, 30), (333, 64, 64), (50, 100, 200)):
        index = build_sparse_index(torch.randn(1, 1, n, 16), torch.randn(1, 1, n, 16),
                                   [HeadPattern("a_shape", sink=sink, local=local)])
        assert H.a_shape_pairs(n, sink, local) == int(head_selection_mask(index, 0).sum())
    heads = [HeadPattern("dense"), HeadPattern("a_shape", sink=16, local=100),
             HeadPattern("vertical_slash", vertical=30, slash=40), HeadPattern("block_sparse", topk=3)]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g)
    # the harness reports computed (tile) density, the search's measure
    from mi_compile.patterns.cost import computed_density
    computed = H.layer_density(q, k, heads)
    assert computed == pytest.approx(float(computed_density(build_sparse_index(q, k, heads)).mean()))
    assert computed < 1
    assert H.layer_density(q, k, [HeadPattern("dense")] * 4) == 1.0


@pytest.fixture
def tiny_qwen():
    from mi_compile.models import tiny_model

    return tiny_model("qwen2", vocab=256, max_position_embeddings=512)


def test_teacher_forcing_agrees_with_greedy_decoding(tiny_qwen):
    """On a tiny model, dense and sparse: forcing the greedy continuation is scored correct,
    token for token, and changing any one of its tokens is scored wrong from that token on."""
    torch._dynamo.reset()
    ids = torch.randint(3, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    for mode in (H.Mode("dense", H.DENSE_CONFIG, ""), H.Mode("ashape", H.parse_config_spec("a_shape:4:16")[0], "")):
        runner = H.ModeRunner(tiny_qwen, mode, use_inductor=False)
        greedy, _ = runner.generate(ids, 6)
        logits, info = runner.answer_logits(ids, greedy)
        v = H.forced_verdict(logits, greedy)
        assert v["correct"] and v["argmax"] == greedy, mode.name
        assert info["density"] is not None and not info["compiled"]         # compiled by generate
        for j in (0, 3, 5):
            wrong = list(greedy)
            wrong[j] = (wrong[j] + 1) % 256
            v = H.forced_verdict(runner.answer_logits(ids, wrong)[0], wrong)
            assert not v["correct"] and v["tokens_correct"] >= j and v["argmax"][:j + 1] == greedy[:j + 1]
        if mode.name == "ashape":   # data-independent: the tile count of a_shape(4, 16) at this length
            from mi_compile.patterns.cost import computed_density
            from mi_compile.sparse import build_sparse_index
            z = torch.zeros(1, 1, ids.shape[1], 16)
            from mi_compile import HeadPattern
            expect = float(computed_density(build_sparse_index(z, z, [HeadPattern("a_shape", sink=4, local=16)]))[0, 0])
            assert info["density"] == pytest.approx(expect)
    torch._dynamo.reset()


def test_run_eval_python_haystack_forced_yarn_budget(tiny_qwen, tmp_path):
    """A whole run on the tiny model with the byte tokenizer: Python haystack, teacher forcing,
    a length past the native context (YaRN on, then restored), modes side by side with the same
    examples, one JSON line per row, the report on disk; then a run whose deadline has passed
    stops cleanly with what it has."""
    tok = ByteTokenizer()
    torch._dynamo.reset()
    modes, _ = H.resolve_modes(["dense"], {"ashape": "a_shape:8:64"})
    out = tmp_path / "r.json"
    rep = H.run_eval(tiny_qwen, tok, modes, [1024], 2, ["passkey", "kv"], haystack="python", natural_last=64,
                     use_inductor=False, out_path=str(out), log=lambda *a: None, density="first")
    torch._dynamo.reset()
    assert rep["meta"]["scoring"] == "forced" and rep["meta"]["yarn"] == {"1024": 4.0}
    assert rep["meta"]["native_context"] == 512 and "stopped" not in rep["meta"]
    assert tiny_qwen.config.rope_parameters.get("rope_type", "default") != "yarn"      # restored
    assert {(r["mode"], r["task"], r["n"]) for r in rep["results"]} == {
        (m, t, 2) for m in ("dense", "ashape") for t in ("passkey", "kv")}
    for r in rep["results"]:
        assert r["density"] is not None and "logprob_mean" in r
        assert [e["density"] is None for e in r["examples"]] == [False, True]     # density="first"
        for e in r["examples"]:
            assert {"correct", "score", "logprob_mean", "tokens_correct", "n_answer_tokens", "output", "answer_ids",
                    "prefill_s", "decode_s", "yarn", "target"} <= set(e)
            assert e["yarn"] == 4.0 and abs(e["n_tokens"] - 1024) <= 160
    dense = {(r["task"], e["index"]): e["n_tokens"] for r in rep["results"] if r["mode"] == "dense"
             for e in r["examples"]}
    assert dense == {(r["task"], e["index"]): e["n_tokens"] for r in rep["results"] if r["mode"] == "ashape"
                     for e in r["examples"]}
    nat = {n["mode"]: n for n in rep["natural"]}
    assert nat["dense"]["top1_agreement"] == 1.0 and nat["ashape"]["positions"] == 64
    # no head has dense last rows: every compared position is decided by the patterns
    assert nat["ashape"]["top1_sparse_rows"] == nat["ashape"]["top1_agreement"]
    assert nat["ashape"]["sparse_rows"] == 64
    assert nat["ashape"]["first_position"] == 1024 - 64
    assert rep["modes"]["ashape"]["compiles"] and rep["summary"]["ashape"]["1024"]["density"] < 0.5
    lines = (tmp_path / "r.rows.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 2 * 2 * 2
    assert json.loads(out.read_text())["summary"] == json.loads(json.dumps(rep["summary"]))
    assert "logprob" in H.format_table(rep)
    # round robin over lengths and tasks: the rows alternate lengths after the documents
    rr = H.run_eval(tiny_qwen, tok, modes, [1024, 912], 2, ["passkey"], haystack="python", natural_last=64,
                    use_inductor=False, out_path=str(tmp_path / "o.json"), log=lambda *a: None, order="example")
    torch._dynamo.reset()
    rows = [json.loads(x) for x in (tmp_path / "o.rows.jsonl").read_text().splitlines()]
    seq = [(r["kind"], r["length"], r.get("index")) for r in rows if r["mode"] == "dense"]
    assert seq == [("natural", 1024, None), ("natural", 912, None), ("example", 1024, 0), ("example", 912, 0),
                   ("example", 1024, 1), ("example", 912, 1)]
    assert rr["meta"]["order"] == "example" and rr["meta"]["yarn"] == {"1024": 4.0, "912": 4.0}
    # a deadline already past: nothing is run, and the report says why
    stopped = H.run_eval(tiny_qwen, tok, modes, [1024], 2, ["passkey"], haystack="python", use_inductor=False,
                         out_path=str(tmp_path / "s.json"), log=lambda *a: None, deadline=0.0)
    torch._dynamo.reset()
    assert stopped["meta"]["stopped"].startswith("deadline") and stopped["results"] == []
    assert json.loads((tmp_path / "s.json").read_text())["meta"]["stopped"]


def test_searched_defaults_and_shipped_names(monkeypatch, tmp_path):
    """The searched mode's default config per model, and configs named as shipped in the package."""
    assert H.searched_default("smollm2", 8192) == H.SEARCHED_DEFAULT
    monkeypatch.setattr(H, "PACKAGE_CONFIGS", tmp_path)
    assert H.searched_default("qwen", 131072) == str(tmp_path / "qwen2.5-coder-1.5b-128k.json")   # not there yet
    (tmp_path / "qwen2.5-coder-1.5b-128k.json").write_text(json.dumps(H.DEFAULT_CONFIG))
    (tmp_path / "qwen2.5-coder-1.5b_32k.json").write_text(json.dumps(H.DENSE_CONFIG))
    assert H.searched_default("qwen", 131072) == str(tmp_path / "qwen2.5-coder-1.5b-128k.json")
    assert H.searched_default("qwen2.5-coder-1.5b", 32768) == str(tmp_path / "qwen2.5-coder-1.5b_32k.json")
    (tmp_path / "qwen2.5-coder-1.5b.json").write_text("{}")                  # a family: it wins at every length
    assert H.searched_default("qwen", 32768) == H.searched_default("qwen", 131072) == str(tmp_path / "qwen2.5-coder-1.5b.json")
    monkeypatch.setattr(H, "_shipped_configs", lambda: {"q-128k": str(tmp_path / "qwen2.5-coder-1.5b-128k.json")})
    assert H.parse_config_spec("q-128k")[0] == str(tmp_path / "qwen2.5-coder-1.5b-128k.json")
    modes, skipped = H.resolve_modes(["searched"], searched_path="q-128k")
    assert [m.name for m in modes] == ["dense", "searched"] and not skipped


def test_sparse_rows_before_the_dense_last_blocks():
    assert H.sparse_rows_before(1024, 512, 0) == 512                 # no dense rows: all compared
    assert H.sparse_rows_before(1024, 512, 64) == 448                # the last block is dense
    assert H.sparse_rows_before(1000, 488, 64) == 408                # 1000 - 64 = 936: blocks from 896
    assert H.sparse_rows_before(1024, 512, 1) == 448                 # one row: its whole block
    assert H.sparse_rows_before(1024, 960, 512) == 0                 # the window is all dense rows


@pytest.mark.slow
def test_conversation_turns_continue_the_context(smollm2):
    """A multi-turn conversation: the shared context at its length with every task's needle, and
    each turn's tokens continuing the cache (the previous answer's last token first), ending
    with the task's answer prefix; its answer ids spell the target."""
    _, tok = smollm2
    conv = T.make_conversation(tok, 4096, index=1, turn_tokens=256)
    assert abs(conv.n_tokens - 4096) <= 41
    context = tok.decode(conv.context_ids)
    assert "PASS_KEY = " in context and "KV_REGISTRY[" in context and "MAGIC_NUMBER_" in context
    assert [t.task for t in conv.turns] == list(T.TASKS)
    for k, turn in enumerate(conv.turns):
        text = tok.decode(turn.ids)
        assert "in the first file" in text and "in the code above" not in text
        assert 256 < len(turn.ids) < 256 + 120
        assert tok.decode(turn.answer_ids).strip() == turn.target == turn.answers[0]
        if k:
            assert turn.ids[0] == conv.turns[k - 1].answer_ids[-1]
        assert 0.0 < turn.depth < 1.0
    assert T.make_conversation(tok, 4096, index=1, turn_tokens=256).turns[2].ids == conv.turns[2].ids
    with pytest.raises(ValueError, match="tasks must be"):
        T.make_conversation(tok, 4096, tasks=("passkey", "nope"))


@pytest.mark.slow
def test_harness_conversations_and_chunks(smollm2):
    """Conversation turns and chunked prefills through the compiled decoder: with a config that
    selects every pair, the chunked answers equal the unchunked ones and every turn scores as
    the dense mode's; the cached calls went through the sparse op."""
    model, tok = smollm2
    torch._dynamo.reset()
    modes, _ = H.resolve_modes(["dense", "full"], extra={"full": "a_shape:0:100000"})
    rep = H.run_eval(model, tok, modes, [1024], 1, ("passkey",), haystack="python", natural=False,
                     use_inductor=False, conversations=1, turn_tokens=96, chunks=(400,), log=lambda *a: None)
    torch._dynamo.reset()
    cells = {(r["mode"], r["task"]): r for r in rep["results"]}
    assert set(cells) == {(m, t) for m in ("dense", "full") for t in ("passkey", "mt_passkey")} | {
        ("full@400", "passkey"), ("dense@400", "passkey")}
    assert cells["full@400", "passkey"]["same_answer"] == 1.0
    assert cells["dense@400", "passkey"]["same_answer"] == 1.0
    assert rep["meta"]["chunk_modes"] == ["dense", "full"]
    for t in ("passkey", "mt_passkey"):
        assert cells["full", t]["accuracy"] == cells["dense", t]["accuracy"]
        assert cells["full", t]["logprob_mean"] == pytest.approx(cells["dense", t]["logprob_mean"], abs=1e-3)
    turn = cells["full", "mt_passkey"]["examples"][0]
    assert turn["turn"] == 1 and turn["turn_tokens"] > 96 and turn["context_prefill_s"] > 0
    assert "full@400" in H.format_table(rep) and "mt_passkey" in H.format_table(rep)
    with pytest.raises(ValueError, match="teacher-forced"):
        H.run_eval(model, tok, modes, [1024], 1, haystack="noise", conversations=1)


def test_run_eval_chunk_modes_checked():
    """``chunk_modes`` must name modes of the run; the check comes before any model work."""
    modes, _ = H.resolve_modes(["dense", "full"], extra={"full": "a_shape:0:100000"})
    with pytest.raises(ValueError, match=r"chunk_modes \['nope'\] are not among the modes"):
        H.run_eval(None, None, modes, [1024], 1, ("passkey",), haystack="python", chunks=(400,),
                   chunk_modes=["full", "nope"])


def test_chunked_prefills_compile_two_graphs_a_mode(tiny_qwen):
    """A mode's whole prompts and its chunked prefills run on two graphs: the first chunk on the
    whole prompt's (contiguous pieces), the later chunks on one chunk graph (the cache left
    contiguous after each piece)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    modes, _ = H.resolve_modes(["dense"], {"ashape": "a_shape:8:64"})
    rep = H.run_eval(tiny_qwen, ByteTokenizer(), modes, [1024], 1, ["passkey"], haystack="python", natural=False,
                     use_inductor=False, chunks=(300,), log=lambda *a: None)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert {r["mode"] for r in rep["results"]} == {"dense", "ashape", "dense@300", "ashape@300"}
    assert graphs == 2 * 2


def _paired_report(sparse_scores, dense_scores, density, top1):
    """A report of two modes over the same indexed examples of one task at 131072."""
    def result(mode, scores, dens):
        return dict(mode=mode, task="kv", length=131072, accuracy=sum(scores) / len(scores),
                    examples=[dict(index=i, score=s, density=dens) for i, s in enumerate(scores)])
    rep = dict(meta=dict(tasks=["kv"], natural_last=512, model="m", device="cpu"),
               results=[result("dense", dense_scores, 1.0), result("sparse", sparse_scores, density)],
               natural=[dict(mode="dense", length=131072, density=1.0, top1_agreement=1.0, kl_mean=0.0),
                        dict(mode="sparse", length=131072, density=density, top1_agreement=top1, kl_mean=0.1)])
    rep["summary"] = H.summarize(rep)
    return rep


def test_frontier_pairs_each_mode_with_its_own_runs_dense(tmp_path):
    """Two runs whose dense differ: each mode's delta is against the dense of its own run on the
    prompts both answered, with the paired split; the table and the plot are written."""
    a = _paired_report([1, 0, 1, 1], [1, 1, 1, 1], density=0.1, top1=0.95)      # loses one prompt
    b = _paired_report([1, 1, 0, 0], [0, 1, 0, 0], density=0.3, top1=0.97)      # gains one prompt
    b["results"][1]["examples"].append(dict(index=9, score=1, density=0.3))    # no dense twin: not paired
    rows = {r["report"]: r for r in H.frontier([("a", a), ("b", b)], 131072)}
    assert rows["a"]["delta"] == -0.25 and (rows["a"]["gained"], rows["a"]["lost"], rows["a"]["pairs"]) == (0, 1, 4)
    assert rows["b"]["delta"] == 0.25 and rows["b"]["pairs"] == 4 and rows["b"]["reference_accuracy"] == 0.25
    assert rows["a"]["top1"] == 0.95 and rows["a"]["density"] == pytest.approx(0.1)
    assert H.frontier([("a", a)], 32768) == []                                  # nothing at that length
    table = H.format_frontier(list(rows.values()))
    assert "+0 / -1 of 4" in table and "-0.250" in table
    H.plot_frontier(list(rows.values()), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no mode"):
        H.plot_frontier([], tmp_path / "none.png")
