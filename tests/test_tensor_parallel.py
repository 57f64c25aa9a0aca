"""The backend under tensor parallelism: each rank runs its own slice of a whole-model config.

Unit tests of :mod:`mi_compile.tensor_parallel`, one single-process test of the option ``tp`` on
a traced model, and a two-process gloo run of a tiny Llama loaded with ``tp_plan="auto"``
(this file is also the worker script those processes run: ``python test_tensor_parallel.py
--worker DIR``).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

N = 128          # tokens: short enough for CPU, long enough for the patterns below to be sparse
HQ, HKV = 8, 4   # whole-model query / KV heads; 4 / 2 per rank at tp size 2

DENSE = {"format": "mi-compile/v1", "num_layers": 2, "num_heads": HQ, "default": {"pattern": "dense"}}
# Every rank-sized half of every layer differs from the other half, so a rank that ran the other
# rank's slice (or heads 0..3 unsliced) would compute something else.
_LAYERS = {
    "0": {"0": {"pattern": "dense"},
          "1": {"pattern": "vertical_slash", "vertical": 8, "slash": 16},
          "2": {"pattern": "a_shape", "sink": 2, "local": 8},
          "3": {"pattern": "vertical_slash", "vertical": 4, "slash": 32}},
    "1": {"*": {"pattern": "vertical_slash", "vertical": 8, "slash": 16},
          "2": {"pattern": "dense"},
          "6": {"pattern": "a_shape", "sink": 2, "local": 8}},
}
MIXED = {"format": "mi-compile/v1", "num_layers": 2, "num_heads": HQ,
         "default": {"pattern": "a_shape", "sink": 4, "local": 16}, "layers": _LAYERS}
# No num_heads and entries only for heads 0..3: it also fits one rank's 4 heads, so applied
# unsliced (option tp=False) it runs, with heads 0..3's patterns on rank 1's heads 4..7.
LOW = {"format": "mi-compile/v1", "default": {"pattern": "a_shape", "sink": 4, "local": 16},
       "layers": {"0": _LAYERS["0"], "1": {k: v for k, v in _LAYERS["1"].items() if k != "6"}}}


def _ids():
    return torch.randint(3, 128, (1, N), generator=torch.Generator().manual_seed(0))


def _save_model(path):
    from mi_compile.models import tiny_model

    tiny_model("llama", num_heads=HQ, num_kv_heads=HKV, head_dim=16).save_pretrained(path)


def _load(path, tp: bool):
    from transformers import AutoModelForCausalLM

    kw = {"tp_plan": "auto"} if tp else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # 5.24: tp_plan= -> distributed_config=
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32,
                                                    **kw).eval()


def _compiled_logits(model, options, use_inductor=True):
    """Logits of ``model`` compiled with the backend, and the backend's reports."""
    from mi_compile.backend import MInferenceBackend

    torch._dynamo.reset()
    backend = MInferenceBackend(options, use_inductor=use_inductor)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(_ids(), use_cache=False).logits
    return out, backend.reports


# ---------------------------------------------------------------------------- unit tests
def test_slice_heads_and_its_errors():
    from mi_compile.tensor_parallel import slice_heads

    heads = list(range(8))
    assert slice_heads(heads, 0, 2) == [0, 1, 2, 3]
    assert slice_heads(heads, 1, 2) == [4, 5, 6, 7]
    assert slice_heads(heads, 3, 4) == [6, 7]
    assert slice_heads(heads, 0, 1) == heads
    with pytest.raises(ValueError, match="rank must be an int in 0..1"):
        slice_heads(heads, 2, 2)
    with pytest.raises(ValueError, match="rank must be"):
        slice_heads(heads, -1, 2)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        slice_heads(heads, 0, 0)
    with pytest.raises(ValueError, match="8 heads cannot be split over tensor-parallel size 3"):
        slice_heads(heads, 0, 3)


def test_option_tp_is_validated():
    from mi_compile.options import BackendOptions, OptionsError
    from mi_compile.tensor_parallel import TPSlice

    assert BackendOptions.from_user({}).tp is None
    assert BackendOptions.from_user({"tp": False}).tp is False
    tp = BackendOptions.from_user({"tp": {"rank": 1, "size": 2}}).tp
    assert (tp.rank, tp.size) == (1, 2) and isinstance(tp, TPSlice)
    assert BackendOptions.from_user({"tp": {"rank": 1, "size": 2}}).with_mode("default").tp == tp
    for bad, msg in [({"rank": 2, "size": 2}, "rank must be an int in 0..1"),
                     ({"rank": 0, "size": 0}, "size must be an int >= 1"),
                     ({"rank": True, "size": 2}, "rank must be"),
                     ({"rank": 0}, "must be {'rank': r, 'size': T}"),
                     ({"rank": 0, "size": 2, "offset": 4}, "must be {'rank': r, 'size': T}"),
                     (2, "must be {'rank': r, 'size': T}"), (True, "must be")]:
        with pytest.raises(OptionsError, match="option 'tp'.*" + msg.replace("(", r"\(").replace("{", r"\{")):
            BackendOptions.from_user({"tp": bad})


def test_config_view_gives_each_rank_its_heads_and_checks_the_count():
    from mi_compile.config import ConfigError, load_config
    from mi_compile.tensor_parallel import TPConfigView, TPSlice, check_slice

    cfg = load_config(MIXED)
    full = cfg.heads_for(0, HQ)
    assert TPConfigView(cfg, TPSlice(0, 2)).heads_for(0, 4) == full[:4]
    assert TPConfigView(cfg, TPSlice(1, 2)).heads_for(0, 4) == full[4:]
    assert TPConfigView(cfg, TPSlice(3, 4)).heads_for(1, 2) == cfg.heads_for(1, HQ)[6:]
    assert full[:4] != full[4:]
    TPConfigView(cfg, TPSlice(1, 2)).check_model(2, 4)
    with pytest.raises(ConfigError, match=r"rank 1 of tensor-parallel size 2 .* sees 2 query heads, "
                                          r"and 2 x 2 = 4 != 8"):
        TPConfigView(cfg, TPSlice(1, 2)).heads_for(0, 2)
    with pytest.raises(ConfigError, match="8 heads per layer, not divisible by the tensor-parallel size 3"):
        check_slice(TPSlice(0, 3), 3, cfg)
    with pytest.raises(ConfigError, match="has 2 layers"):
        TPConfigView(cfg, TPSlice(0, 2)).check_model(3, 4)


def test_resolve_tp_without_distributed():
    from mi_compile.config import ConfigError, load_config
    from mi_compile.tensor_parallel import TPSlice, resolve_tp

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    cfg = load_config(MIXED)
    assert resolve_tp(gm, None, HQ, cfg) is None                     # one process, whole model
    assert resolve_tp(gm, TPSlice(1, 2), 4, cfg) == TPSlice(1, 2)
    assert resolve_tp(gm, TPSlice(0, 1), HQ, cfg) is None            # size 1: nothing to slice
    with pytest.raises(ConfigError, match=r"has 8 heads per layer, the model's attention calls have 4: if "
                                          r"the model is tensor-parallel \(2 ranks\).*option tp="):
        resolve_tp(gm, None, 4, cfg)
    with pytest.raises(ConfigError, match="sees 8 query heads, and 8 x 2 = 16 != 8"):
        resolve_tp(gm, TPSlice(0, 2), HQ, cfg)                       # option given to an unsharded model
    assert resolve_tp(gm, False, 4, cfg) is None                     # tp=False: never slice


def test_resolve_tp_from_torch_distributed_world(monkeypatch):
    """No DTensor in the graph (a model sharded by hand into plain tensors): the default
    group's rank and world size, only when they explain the config's head count."""
    import torch.distributed as dist

    from mi_compile.config import load_config
    from mi_compile.tensor_parallel import TPSlice, resolve_tp

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert resolve_tp(gm, None, 4, load_config(MIXED)) == TPSlice(1, 2, "torch.distributed world")
    assert resolve_tp(gm, None, HQ, load_config(MIXED)) is None      # data parallel: whole model per rank
    assert resolve_tp(gm, None, 4, load_config(LOW)) is None         # nothing to compare with: no slicing


def test_option_tp_slices_the_config_on_a_traced_model():
    """One process, a model with the local shape of rank 1 (4 query / 2 KV heads): option tp
    makes its calls use heads 4..7 of the 8-head config, and the explain table says so."""
    import mi_compile
    from mi_compile.config import load_config
    from mi_compile.models import tiny_model

    model = tiny_model("llama", num_heads=4, num_kv_heads=2)
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    cfg = load_config(MIXED)
    result = mi_compile.explain(model, ids, use_cache=False,
                                options={"config": MIXED, "min_seq_len": 0, "tp": {"rank": 1, "size": 2}})
    assert [s.heads for s in result.sites] == [cfg.heads_for(layer, HQ)[4:] for layer in (0, 1)]
    text = str(result)
    assert "tensor parallel: rank 1 of 2 (option tp): query heads 4..7 of 8, KV heads 2..3 of 4" in text
    torch._dynamo.reset()
    with pytest.raises(Exception, match="if the model is tensor-parallel"):
        mi_compile.explain(model, ids, use_cache=False, options={"config": MIXED, "min_seq_len": 0})
    torch._dynamo.reset()


# ---------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, world: int = 2, timeout: float = 900.0) -> None:
    """Run this file as ``world`` torchrun-style worker processes (gloo, CPU)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(workdir)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-6000:]}"


def _worker(workdir: str) -> None:
    """One rank: the model loaded with tp_plan="auto", eager and compiled; results to rank<r>.pt."""
    import torch.distributed as dist

    import mi_compile  # noqa: F401  (registers the op and backend="minference")
    from mi_compile.tensor_parallel import tp_option_from_model

    model = _load(os.path.join(workdir, "model"), tp=True)
    rank = dist.get_rank()
    res = {"tp_option": tp_option_from_model(model)}
    with torch.no_grad():
        res["eager"] = model(_ids(), use_cache=False).logits
    res["dense"], _ = _compiled_logits(model, {"config": DENSE, "min_seq_len": 0})
    res["mixed"], reports = _compiled_logits(model, {"config": MIXED, "min_seq_len": 0})
    (report,) = reports
    res["heads"] = [s.heads for s in report.sites]
    res["actions"] = [s.action for s in report.sites]
    res["q_heads"] = [s.q_heads for s in report.sites]
    from mi_compile.debug.explain import format_table

    res["table"] = format_table(report.sites, report.config_source, tp=report.tp)
    # the same slice given as the option (passes only: no Inductor)
    res["mixed_option"], _ = _compiled_logits(
        model, {"config": MIXED, "min_seq_len": 0, "tp": {"rank": rank, "size": 2}}, use_inductor=False)
    # a config that does not pin num_heads: sliced by the mesh all the same
    res["low"], _ = _compiled_logits(model, {"config": LOW, "min_seq_len": 0}, use_inductor=False)
    # negative cases: no slicing (every rank takes heads 0..3), and the other rank's slice
    res["low_unsliced"], _ = _compiled_logits(model, {"config": LOW, "min_seq_len": 0, "tp": False},
                                              use_inductor=False)
    res["other_slice"], _ = _compiled_logits(
        model, {"config": MIXED, "min_seq_len": 0, "tp": {"rank": 1 - rank, "size": 2}}, use_inductor=False)
    try:
        _compiled_logits(model, {"config": MIXED, "min_seq_len": 0, "tp": False}, use_inductor=False)
        res["unsliced_error"] = ""
    except Exception as e:   # noqa: BLE001 - Dynamo wraps the backend's ConfigError
        res["unsliced_error"] = str(e)
    torch.save(res, os.path.join(workdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_ranks_run_their_own_slice_and_match_one_process(tmp_path):
    _save_model(tmp_path / "model")
    t0 = time.monotonic()
    _launch(tmp_path)
    t_tp = time.monotonic() - t0
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    model = _load(tmp_path / "model", tp=False)
    with torch.no_grad():
        eager = model(_ids(), use_cache=False).logits
    dense, _ = _compiled_logits(model, {"config": DENSE, "min_seq_len": 0})
    mixed, (report,) = _compiled_logits(model, {"config": MIXED, "min_seq_len": 0})
    low, _ = _compiled_logits(model, {"config": LOW, "min_seq_len": 0}, use_inductor=False)
    torch._dynamo.reset()
    assert report.tp is None and all(s.action == "sparse" for s in report.sites)
    close = dict(rtol=1e-5, atol=1e-5)
    assert (mixed - eager).abs().max() > 1e-2, "the mixed config should really be sparse at this length"
    cfg_heads = [s.heads for s in report.sites]            # whole model: 8 heads per layer

    for r, res in enumerate(ranks):
        assert res["tp_option"] == {"rank": r, "size": 2}
        assert res["q_heads"] == [HQ // 2] * 2 and res["actions"] == ["sparse"] * 2
        assert res["heads"] == [h[r * 4:(r + 1) * 4] for h in cfg_heads]
        assert (f"tensor parallel: rank {r} of 2 (device mesh of the graph's DTensor parameters): "
                f"query heads {4 * r}..{4 * r + 3} of 8, KV heads {2 * r}..{2 * r + 1} of 4") in res["table"]
        torch.testing.assert_close(res["eager"], eager, **close)
        torch.testing.assert_close(res["dense"], eager, **close)
        torch.testing.assert_close(res["dense"], dense, **close)
        torch.testing.assert_close(res["mixed"], mixed, **close)
        torch.testing.assert_close(res["mixed_option"], mixed, **close)
        torch.testing.assert_close(res["low"], low, **close)
        # the wrong slice computes something else, and a pinned config unsliced is refused
        assert (res["other_slice"] - mixed).abs().max() > 1e-3
        assert (res["low_unsliced"] - low).abs().max() > 1e-3
        assert "has 8 heads per layer, the model has 4" in res["unsliced_error"]
    d = lambda a, b: f"{(a - b).abs().max().item():.2e}"  # noqa: E731
    print(f"\ntp=2 workers: {t_tp:.1f} s; max |diff| rank 1 vs one process: eager {d(ranks[1]['eager'], eager)}, "
          f"mixed {d(ranks[1]['mixed'], mixed)}; wrong slice {d(ranks[1]['other_slice'], mixed)}, unsliced "
          f"{d(ranks[1]['low_unsliced'], low)}; mixed vs eager {d(mixed, eager)}")


def test_e2e_tp_option_parses(benchmark_module):
    e2e = benchmark_module("e2e")
    assert e2e.parse_args(["--tp", "2"]).tp == 2 and e2e.parse_args([]).tp == 0
    assert callable(e2e.run_tp) and callable(e2e._tp_checkpoint)
    for bad in ("1", "-2"):
        with pytest.raises(SystemExit):
            e2e.parse_args(["--tp", bad])


@pytest.mark.slow
def test_e2e_tp2_cpu_smoke(tmp_path):
    """``torchrun --nproc-per-node 2 -m benchmarks.e2e --tp 2`` on gloo (passes only): rank 0
    reports TTFT rows with each compiled mode's head slice."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "benchmarks.e2e", "--tp", "2", "--device", "cpu", "--tiny", "--lengths", "256",
           "--modes", "eager,minference_llama31", "--no-inductor"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = {r["mode"]: r for r in json.load(open(tmp_path / "e2e.json"))["rows"] if r["kind"] == "tp_ttft"}
    assert set(rows) == {"eager", "minference_llama31"} and all("ttft_s" in r for r in rows.values())
    assert rows["minference_llama31"]["sparse_sites"] == 2
    assert rows["minference_llama31"]["tp_slice"].startswith("tensor parallel: rank 0 of 2")
    assert "query heads 0..15 of 32, KV heads 0..3 of 8" in rows["minference_llama31"]["tp_slice"]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
