"""The offline per-head pattern search (mi_compile.search): capture, scoring, choice, config, plots."""
from __future__ import annotations

import json
import math
import time

import pytest
import torch

import mi_compile
from mi_compile.config import load_config
from mi_compile.models import tiny_model
from mi_compile.patterns.spec import HeadPattern
from mi_compile.search import (calibration_ids, candidate_patterns, choose, choose_config, dense_probs, random_ids,
                               score_candidates, score_rows, search_config)
from mi_compile.patterns.cost import computed_density, computed_pairs
from mi_compile.sparse import build_sparse_index, selection_density, selection_mask


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny():
    return tiny_model("llama", max_position_embeddings=4096)


# ----------------------------------------------------------------------------- scoring is exact
@pytest.mark.parametrize("n", [200, 333])
def test_scores_match_selection_mask_and_density(n):
    """The fast scorer (selections at the scored rows' query blocks) equals selection_mask, and
    its density is the computed (tile) density of the op's own index."""
    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, 4, n, 16, generator=g) * 2
    k = torch.randn(1, 2, n, 16, generator=g) * 2
    cands = [HeadPattern("a_shape", sink=16, local=40), HeadPattern("vertical_slash", vertical=70, slash=70),
             HeadPattern("vertical_slash", vertical=100, slash=90), HeadPattern("block_sparse", topk=2),
             HeadPattern("block_sparse", topk=3), HeadPattern("dense")]
    rows = score_rows(n, 64, 32, seed=1)
    assert len(rows) == 96 and rows.unique().numel() == 96 and int(rows[-1]) == n - 1
    scale = 0.3
    recall, density = score_candidates(q, k, cands, rows=rows, scale=scale)
    probs = dense_probs(q, k, rows, scale)
    for c, p in enumerate(cands):
        mask = selection_mask(q, k, [p] * 4, scale=scale)
        index = build_sparse_index(q, k, [p] * 4, scale=scale)
        assert torch.equal(density[c], computed_density(index)[0]), p
        assert (computed_pairs(index)[0] >= selection_density(q, k, [p] * 4, scale=scale)[0] * n * (n + 1) / 2
                - 1e-6).all(), p
        expect = (probs * mask[:, :, rows]).sum(-1).mean(-1)[0].double()
        torch.testing.assert_close(recall[c], expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(recall[-1], torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- planted structure
def _planted(n=2048, D=16, hot=(100, 230, 301, 415, 520, 611, 640, 777, 850, 901, 1200, 1433, 1600)):
    """Head 0: sinks (first 8 keys) + a sharp local window; head 1: a set of hot key columns."""
    i = torch.arange(n, dtype=torch.float32)
    q = torch.zeros(1, 2, n, D)
    k = torch.zeros(1, 2, n, D)
    w = math.pi / n                                   # one slow rotation: q.k falls with i - j
    a = math.sqrt(20.0 / (w * w * 64 * 64))           # score drop of ~20 at distance 64
    q[0, 0, :, 0], q[0, 0, :, 1] = a * torch.cos(w * i), a * torch.sin(w * i)
    k[0, 0, :, 0], k[0, 0, :, 1] = a * torch.cos(w * i), a * torch.sin(w * i)
    q[0, 0, :, 2] = 3.0
    k[0, 0, :8, 2] = 3.0                              # sinks: +9 on the first 8 keys
    q[0, 1, :, 3] = 4.0
    k[0, 1, list(hot), 3] = 4.0                       # hot columns: +16
    g = torch.Generator().manual_seed(0)
    q[0, 1, :, 4:] = 0.1 * torch.randn(n, D - 4, generator=g)
    k[0, 1, :, 4:] = 0.1 * torch.randn(n, D - 4, generator=g)
    return q, k


def test_planted_a_shape_and_vertical_heads_are_recognised():
    q, k = _planted()
    n = q.shape[2]
    cands = candidate_patterns(n)
    rows = score_rows(n, 128, 64, seed=0)
    recall, density = score_candidates(q, k, cands, rows=rows, scale=1.0)
    pick = choose(recall, density, 0.3)
    a, v = cands[pick[0]], cands[pick[1]]
    # sinks + a local window: A-shape, or vertical-slash with only its forced sink columns and
    # local diagonals, which walks the same tiles (computed density) and keeps their whole
    # rectangles, so on equal cost it may win the tie on recall; flex_prefill, which keeps just the
    # sink columns and local diagonals that carry the mass, can be cheaper still
    local = a.kind in ("a_shape", "flex_prefill") or (a.kind == "vertical_slash" and a.vertical <= 64
                                                      and a.slash <= 64)
    assert local, [(p.describe(), float(r), float(d)) for p, r, d in zip(cands, recall[:, 0], density[:, 0])]
    assert recall[pick[0], 0] > 0.99 and density[pick[0], 0] <= 0.3
    assert v.kind == "vertical_slash" and v.vertical > 64, v
    assert recall[pick[1], 1] > 0.99 and density[pick[1], 1] <= 0.3
    # the other kinds really are worse there: A-shape misses the hot columns, block-sparse
    # cannot keep ten scattered blocks within budget
    for c, p in enumerate(cands):
        if p.kind in ("a_shape", "block_sparse") and density[c, 1] <= 0.3:
            assert recall[c, 1] < 0.9, p


def test_choose_ties_fallbacks_and_min_recall():
    recall = torch.tensor([[0.90], [0.95], [0.95 - 1e-6], [1.0]], dtype=torch.float64)
    density = torch.tensor([[0.10], [0.25], [0.20], [1.0]], dtype=torch.float64)
    assert choose(recall, density, 0.3) == [2]                  # tie on recall -> lower density
    assert choose(recall, density, 0.15) == [0]                 # only one fits
    assert choose(recall, density, 0.05) == [0]                 # none fits -> the cheapest
    assert choose(recall, density, 0.3, min_recall=0.99, dense_index=3) == [3]
    assert choose(recall, density, 1.0) == [3]                  # dense fits a budget of 1


# ----------------------------------------------------------------------------- end to end (tiny)
def test_search_on_tiny_model_gives_a_config_the_backend_runs(tmp_path):
    model = _tiny()
    ids = random_ids(128, 512, seed=0)
    config, report = search_config(model, ids, budget=0.6, progress=False)
    path = tmp_path / "searched.json"
    config.save(path)
    loaded = load_config(path)
    assert loaded.num_layers == 2 and loaded.num_heads == 4
    assert loaded.length == 512            # the searched length: a chunk's share of the columns
    assert sorted(loaded.layers) == [0, 1] and all(sorted(h) == [0, 1, 2, 3] for h in loaded.layers.values())
    assert loaded.to_json() == {**config.to_json()}
    assert len(report.heads) == 8 and all(h.density <= 0.6 for h in report.heads)
    for h in report.heads:
        assert loaded.scores[h.layer][h.head] == pytest.approx(h.recall, abs=1e-5)
        assert loaded.layers[h.layer][h.head] == h.pattern
    table = report.table()
    assert "mean recall" in table and "all" in table
    out = torch.compile(model, backend="minference", options={"config": str(path), "min_seq_len": 0})(
        ids[:, :200], use_cache=False).logits
    assert out.shape == (1, 200, 128) and torch.isfinite(out).all()


def test_choose_config_rechooses_a_scored_search_at_any_budget():
    model = _tiny()
    ids = random_ids(128, 256, seed=1)
    config, report = search_config(model, ids, budget=0.5, sample_queries=32, progress=False)
    again, same = choose_config(report, 0.5)
    assert json.dumps(again.to_json()) == json.dumps(config.to_json())
    loose, wide = choose_config(report, 1.0)
    tight, narrow = choose_config(report, 0.2)
    assert narrow.mean_density <= report.mean_density <= wide.mean_density
    assert narrow.mean_recall <= report.mean_recall <= wide.mean_recall
    # within the budget, or (no candidate fits at 256 tokens) the sparsest candidate
    assert all(h.density <= 0.2 or h.density == pytest.approx(float(report.density[h.layer][:, h.head].min()))
               for h in narrow.heads) and narrow.budget == 0.2
    with pytest.raises(ValueError, match="budget"):
        choose_config(report, 0)


def test_global_allocation_spends_a_shared_budget_where_it_keeps_most():
    from mi_compile.search.search import allocate_globally
    # layer 0: head 0 easy (cheap pattern keeps 0.99), head 1 hard (needs the dense one)
    recall = {0: torch.tensor([[0.99, 0.50], [1.00, 0.70], [1.00, 1.00]], dtype=torch.float64)}
    density = {0: torch.tensor([[0.10, 0.10], [0.30, 0.30], [1.00, 1.00]], dtype=torch.float64)}
    assert allocate_globally(recall, density, 0.55) == {0: [0, 2]}     # mean 0.55: hard head dense
    assert choose(recall[0], density[0], 0.55) == [1, 1]               # a per-head cap cannot do that
    assert allocate_globally(recall, density, 0.2) == {0: [0, 1]}      # mean 0.2
    assert allocate_globally(recall, density, 0.05) == {0: [0, 0]}     # nothing fits: sparsest


def test_output_error_sees_the_values():
    """The output error of a selection is |O_sel - O|^2 / |O|^2 with the kept mass renormalised;
    keys that are left out cost nothing when their values equal the kept ones (recall < 1 still),
    and a lot when they carry an outlier value."""
    n, D = 256, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, n, D, generator=g)
    k = torch.randn(1, 1, n, D, generator=g)
    v = torch.zeros(1, 1, n, D)
    v[..., 0] = 1.0                                    # every value the same ...
    v_outlier = v.clone()
    v_outlier[0, 0, 20:40, 1] = 50.0                   # ... except keys 20..39, far outside the window
    cands = [HeadPattern("a_shape", sink=4, local=64), HeadPattern("dense")]
    rows = score_rows(n, 32, 0)
    recall, density, flat = score_candidates(q, k, cands, rows=rows, scale=0.5, v=v)
    _, _, outlier = score_candidates(q, k, cands, rows=rows, scale=0.5, v=v_outlier)
    assert (recall[0] < 0.9).all()                     # the window misses real mass ...
    assert flat[0].max() < 1e-10                       # ... which costs nothing on equal values
    assert (outlier[0] > 1e-3).all()                   # and a lot on the outlier
    assert flat[1].abs().max() == 0 and outlier[1].abs().max() == 0     # dense: no error
    # the definition, by hand, for head 0 of the A-shape
    probs = dense_probs(q, k, rows, 0.5)[0, 0]
    keep = selection_mask(q, k, [cands[0]] * 2, scale=0.5)[0, 0][rows]
    dense_out, sel = probs @ v_outlier[0, 0], probs * keep
    sel_out = (sel @ v_outlier[0, 0]) / sel.sum(-1, keepdim=True)
    want = ((sel_out - dense_out).pow(2).sum(-1) / dense_out.pow(2).sum(-1)).mean()
    torch.testing.assert_close(outlier[0, 0], want.double(), rtol=1e-4, atol=0)


def test_allocation_objectives_and_early_weight():
    from mi_compile.search.search import allocate_globally, allocation_utility
    # two heads, three candidates: cheap, middle, dense (densities 0.1 / 0.3 / 1.0)
    density = {0: torch.tensor([[0.1, 0.1], [0.3, 0.3], [1.0, 1.0]], dtype=torch.float64)}
    # head 0 misses 10% cheaply and 0% at the middle; head 1 misses 4% cheaply, 2.5% at the middle
    recall = {0: torch.tensor([[0.90, 0.96], [1.00, 0.975], [1.0, 1.0]], dtype=torch.float64)}
    # mass: the 0.2 of extra density buys 0.10 on head 0 vs 0.015 on head 1 -> both pick head 0
    assert allocate_globally(allocation_utility(recall, "mass"), density, 0.2) == {0: [1, 0]}
    # squared miss: the worst head first as well, and the utility is -(miss)^2
    u = allocation_utility(recall, "squared-miss")[0]
    torch.testing.assert_close(u[0], torch.tensor([-0.01, -0.0016], dtype=torch.float64))
    # output error: whatever the mass says, the head whose output suffers most gets the budget
    error = {0: torch.tensor([[0.001, 0.05], [0.0, 0.001], [0.0, 0.0]], dtype=torch.float64)}
    assert allocate_globally(allocation_utility(recall, "output", error=error), density, 0.2) == {0: [0, 1]}
    with pytest.raises(ValueError, match="output errors"):
        allocation_utility(recall, "output")
    with pytest.raises(ValueError, match="objective"):
        allocation_utility(recall, "bogus")
    # early weight: layer 0 (of 0..2) counts 1 + w, layer 2 counts 1
    three = {l: torch.tensor([[0.5]], dtype=torch.float64) for l in range(3)}
    w = allocation_utility(three, "mass", early_weight=2.0)
    assert [float(w[l]) for l in range(3)] == [1.5, 1.0, 0.5]


def test_global_allocation_and_rechoosing_from_a_saved_report(tmp_path):
    from mi_compile.__main__ import main
    from mi_compile.search import SearchReport

    model = _tiny()
    ids = random_ids(128, 256, seed=2)
    _, report = search_config(model, ids, budget=0.5, sample_queries=32, progress=False)
    all_d = torch.cat([report.density[l] for l in sorted(report.density)], 1)
    budget = round(float(all_d.min(0).values.mean() + all_d.max(0).values.mean()) / 2, 3)   # feasible
    glob_cfg, glob = choose_config(report, budget, allocate="global")
    assert glob.mean_density <= budget + 1e-9 and glob.allocate == "global"
    # the shared budget keeps at least as much mass as capping every head at the same mean
    assert sum(h.recall for h in glob.heads) >= sum(h.recall for h in report.heads) - 1e-9 \
        or glob.mean_density >= report.mean_density
    path = tmp_path / "scored.report.json"
    path.write_text(json.dumps(report.to_json()))
    again = SearchReport.from_json(json.loads(path.read_text()))
    assert again.candidates == report.candidates
    assert all(torch.allclose(again.recall[l], report.recall[l].double(), atol=1e-6) for l in report.recall)
    assert sorted(again.error) == sorted(report.error)      # output errors travel too
    assert all(torch.allclose(again.error[l], report.error[l].double(), rtol=1e-3, atol=1e-12)
               for l in report.error)
    out_cfg, by_output = choose_config(again, budget, allocate="global", objective="output")
    assert by_output.mean_density <= budget + 1e-9 and by_output.mean_error is not None
    assert {h.error for h in by_output.heads} != {None}
    with pytest.raises(ValueError, match="global"):
        choose_config(again, budget, objective="output")         # per-head caps have no objective
    out = tmp_path / "global.json"
    assert main(["search", "--from-report", str(path), "--budget", str(budget), "--allocate", "global",
                 "--dense-last", "0", "--out", str(out)]) == 0
    assert load_config(out).to_json()["layers"] == glob_cfg.to_json()["layers"]
    assert "mean over heads" in (tmp_path / "global.summary.txt").read_text()
    assert main(["search", "--from-report", str(path), "--budget", str(budget), "--allocate", "global",
                 "--objective", "output", "--early-weight", "1", "--out", str(tmp_path / "o.json")]) == 0
    summary = (tmp_path / "o.summary.txt").read_text()
    assert "objective output, early weight 1" in summary and "output error" in summary
    # --dense-last (64 unless given): the same choice, every head that takes it with its last 64
    # queries dense (the main config and the --also-budgets ones)
    assert main(["search", "--from-report", str(path), "--budget", str(budget), "--allocate", "global",
                 "--also-budgets", "0.9", "--out", str(tmp_path / "l.json")]) == 0
    takes = []
    for written, plain in ((tmp_path / "l.json", glob_cfg),
                           (tmp_path / "l_b0.9.json", choose_config(again, 0.9, allocate="global")[0])):
        got = load_config(written)
        assert got.layers == plain.with_dense_last(64).layers
        takes += [p for heads in got.layers.values() for p in heads.values() if "last" in p.params]
    assert takes and all(p.last == 64 for p in takes)
    with pytest.raises(SystemExit):
        main(["search", "--from-report", str(path), "--dense-last", "-1", "--out", str(tmp_path / "x.json")])



def test_reports_of_several_calibration_prompts_are_averaged(tmp_path):
    from mi_compile.__main__ import main
    from mi_compile.search import SearchReport

    model = _tiny()
    _, r0 = search_config(model, random_ids(128, 256, seed=4), budget=0.6, sample_queries=16, seed=4,
                          progress=False)
    _, r1 = search_config(model, random_ids(128, 256, seed=5), budget=0.6, sample_queries=16, seed=5,
                          progress=False)
    assert not torch.equal(r0.recall[0], r1.recall[0])       # other prompt, other scores
    mean = SearchReport.average([r0, r1])
    assert mean.seeds == [4, 5] and mean.heads == []
    for field in ("recall", "density", "error"):
        for l in r0.recall:
            torch.testing.assert_close(getattr(mean, field)[l],
                                       (getattr(r0, field)[l] + getattr(r1, field)[l]) / 2)
    _, chosen = choose_config(mean, 1.15, allocate="global", objective="output")
    assert chosen.mean_density <= 1.15 + 1e-9 and "seeds 4,5" in chosen.table()
    # through the CLI: two saved reports in, their mean chosen, the seeds kept in the new report
    paths = []
    for r in (r0, r1):
        paths.append(tmp_path / f"s{r.seed}.report.json")
        paths[-1].write_text(json.dumps(r.to_json()))
    assert main(["search", "--from-report", *map(str, paths), "--budget", "0.8", "--allocate", "global",
                 "--objective", "output", "--out", str(tmp_path / "mean.json")]) == 0
    assert json.loads((tmp_path / "mean.report.json").read_text())["seeds"] == [4, 5]
    def patterns(cfg):       # the saved scores are rounded to 6 digits before averaging
        return {l: {h: p.describe() for h, p in heads.items()} for l, heads in cfg.layers.items()}
    assert patterns(load_config(tmp_path / "mean.json")) == \
        patterns(choose_config(mean, 0.8, allocate="global", objective="output")[0].with_dense_last(64))
    # reports that do not describe the same search are refused, naming the difference
    _, other = search_config(model, random_ids(128, 192, seed=4), budget=0.6, sample_queries=16, progress=False)
    with pytest.raises(ValueError, match="prompt length"):
        SearchReport.average([r0, other])
    (tmp_path / "bad.report.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["search", "--from-report", str(paths[0]), str(tmp_path / "bad.report.json"), "--budget", "0.8",
              "--out", str(tmp_path / "x.json")])

def test_search_is_deterministic_for_a_seed():
    model = _tiny()
    ids = random_ids(128, 256, seed=3)
    a, _ = search_config(model, ids, budget=0.8, sample_queries=32, seed=3, progress=False)
    b, _ = search_config(model, ids, budget=0.8, sample_queries=32, seed=3, progress=False)
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())
    assert torch.equal(random_ids(128, 256, seed=3), ids)


def test_cli_search_and_plot(tmp_path):
    from mi_compile.__main__ import main

    out = tmp_path / "cfg.json"
    assert main(["search", "--model", "tiny:llama", "--length", "256", "--budget", "0.8", "--sample-queries",
                 "16", "--out", str(out), "--no-progress", "--plot", "--also-budgets", "0.9,1.3"]) == 0
    load_config(out)
    # same scoring, other budgets (computed density: dense is 1)
    for b, most in (("0.9", 0.9), ("1.3", 1.3)):
        reported = json.loads((tmp_path / f"cfg_b{b}.report.json").read_text())
        assert reported["budget"] == most and all(h["density"] <= most for h in reported["heads"])
        assert load_config(tmp_path / f"cfg_b{b}.json").num_layers == 2
    assert json.loads((tmp_path / "cfg_b1.3.report.json").read_text())["mean_recall"] == pytest.approx(1.0)
    assert (tmp_path / "cfg.summary.txt").read_text().startswith("pattern search")
    png = tmp_path / "cfg.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # one head's attention beside its mask, from the command line (the model is loaded there)
    assert main(["plot", str(out), "--attention", "1,0", "--model", "tiny:llama", "--length", "128",
                 "--device", "cpu"]) == 0
    assert (tmp_path / "cfg.L1H0.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_search_at_several_lengths_writes_a_family(tmp_path):
    """``--length 256,128``: one search per length (ascending), each member saved beside the
    family, which loads with the member lengths the searches recorded and picks them by key count."""
    from mi_compile.__main__ import main
    from mi_compile.config import ConfigFamily

    out = tmp_path / "fam.json"
    assert main(["search", "--model", "tiny:llama", "--length", "256,128", "--budget", "0.8", "--sample-queries",
                 "16", "--out", str(out), "--no-progress", "--also-budgets", "0.9"]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "mi-compile/family-v1" and doc["members"] == ["fam_128.json", "fam_256.json"]
    family = load_config(out)
    assert isinstance(family, ConfigFamily) and family.lengths == (128, 256)
    assert family.member_for(100).length == 128 and family.member_for(200).length == 256
    assert family.member_for(4096).length == 256
    for n in (128, 256):   # each member is a whole search's output, other budgets included
        assert load_config(tmp_path / f"fam_{n}.json").length == n
        assert json.loads((tmp_path / f"fam_{n}.report.json").read_text())["heads"]
        assert load_config(tmp_path / f"fam_{n}_b0.9.json").num_layers == 2
    # the family is only the members: choosing again from one report takes one length
    with pytest.raises(SystemExit):
        main(["search", "--from-report", str(tmp_path / "fam_128.report.json"), "--length", "128,256",
              "--out", str(tmp_path / "x.json")])
    for bad in ("", "256,x", "0,256"):
        with pytest.raises(SystemExit):
            main(["search", "--model", "tiny:llama", "--length", bad, "--out", str(tmp_path / "y.json")])
    assert not (tmp_path / "y.json").exists()


def test_plot_attention_writes_png(tmp_path):
    from mi_compile.search.plot import plot_attention, plot_config

    model = _tiny()
    ids = random_ids(128, 192, seed=0)
    cfg = {"format": "mi-compile/v1", "num_layers": 2, "num_heads": 4, "default": {"pattern": "dense"},
           "layers": {"1": {"0": {"pattern": "vertical_slash", "vertical": 80, "slash": 70, "score": 0.9},
                            "1": {"pattern": "a_shape", "sink": 16, "local": 64},
                            "2": {"pattern": "block_sparse", "topk": 2}}}}
    out = plot_attention(model, ids, cfg, 1, 0, tmp_path / "att.png")
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    grid = plot_config(cfg, tmp_path / "grid.png")
    assert grid.stat().st_size > 1000


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_search_smollm2_512(tmp_path):
    from mi_compile.models import load_smollm2

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    ids = calibration_ids(tok, 512, seed=0)
    assert ids.shape == (1, 512) and torch.equal(ids, calibration_ids(tok, 512, seed=0))
    # computed density counts whole tiles: at 512 tokens (8 query blocks) even a window costs much
    config, report = search_config(model, ids, budget=0.7, progress=False)
    config.save(tmp_path / "s.json")
    loaded = load_config(tmp_path / "s.json")
    loaded.check_model(30, 9)
    assert len(report.heads) == 30 * 9
    assert report.mean_recall > 0.8 and report.mean_density <= 0.7
    assert time.perf_counter() - t0 < 120


def test_global_allocation_with_a_recall_floor():
    """--min-recall with --allocate global: no head is given a candidate below the floor (a
    head where none reaches it keeps its best one)."""
    from mi_compile.search.search import allocate_globally, recall_floor

    # candidates (rows) x heads (columns)
    recall = {0: torch.tensor([[0.30, 0.50, 0.20], [0.92, 0.99, 0.40], [1.0, 1.0, 0.45]], dtype=torch.float64)}
    density = {0: torch.tensor([[0.05, 0.05, 0.05], [0.30, 0.10, 0.10], [1.0, 1.0, 0.30]], dtype=torch.float64)}
    assert allocate_globally(recall, density, 0.1) == {0: [0, 1, 1]}        # head 0 sacrificed
    floored = allocate_globally(recall, density, 0.1, allowed=recall_floor(recall, 0.9))
    assert floored == {0: [1, 1, 2]}            # >= 0.9 where reachable, else the best candidate
    assert recall_floor(recall, 0.0) is None


def test_estimates_are_charged_like_density():
    """A pattern whose estimate costs kernel time (XAttention) pays it from the budget: the same
    scores choose it when it fits with its estimate, and a static pattern when it does not."""
    from mi_compile.patterns.xattention import XA_ESTIMATE_COST
    from mi_compile.search import SearchReport
    from mi_compile.search.search import estimate_costs

    cands = [HeadPattern("a_shape", sink=64, local=1024), HeadPattern("xattention", threshold=900, stride=8,
                                                                      max_blocks=2048),
             HeadPattern("vertical_slash", vertical=1000, slash=64), HeadPattern("dense")]
    cost = estimate_costs(cands, 131072)[:, 0].tolist()
    assert cost[0] == 0 and cost[1] == XA_ESTIMATE_COST[8] and 0 < cost[2] < cost[1] and cost[3] == 0
    recall = {0: torch.tensor([[0.70, 0.70], [0.95, 0.95], [0.80, 0.80], [1.0, 1.0]], dtype=torch.float64)}
    density = {0: torch.tensor([[0.03, 0.03], [0.05, 0.05], [0.06, 0.06], [1.0, 1.0]], dtype=torch.float64)}
    scored = SearchReport(model="toy", n=131072, budget=0.1, seed=0, score_queries=256, sample_queries=0,
                          candidates=cands, heads=[], recall=recall, density=density, skipped_layers={})
    for allocate in ("head", "global"):
        _, cheap = choose_config(scored, 0.1, allocate=allocate)        # 0.05 + 0.15 does not fit 0.1
        assert [h.pattern.kind for h in cheap.heads] == ["vertical_slash"] * 2
        assert cheap.mean_charged == pytest.approx(0.06 + cost[2]) and cheap.mean_charged <= 0.1
        _, rich = choose_config(scored, 0.25, allocate=allocate)        # now it does
        assert [h.pattern.kind for h in rich.heads] == ["xattention"] * 2
        assert rich.mean_density == pytest.approx(0.05) and rich.mean_charged == pytest.approx(0.05 + cost[1])
        assert "+ estimates" in rich.table()
