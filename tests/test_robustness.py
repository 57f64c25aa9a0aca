"""Bad inputs raise clear errors (never a crash, never a silently wrong answer); calls the
sparse kernels cannot take stay dense with the reason recorded."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mi_compile import HeadPattern as HP
from mi_compile import OptionsError, sparse_attention
from mi_compile.sparse import build_sparse_index, selection_density, selection_mask
from mi_compile.backend import explain

HEADS = [HP("a_shape", sink=16, local=32), HP("dense")]


def inputs(n=128, d=16, dtype=torch.float32, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, n, d, generator=g).to(dtype) for _ in range(3)]


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


# ------------------------------------------------------------------ seq_start / seq_len values

_INTERPRETER_CASE = textwrap.dedent("""
    import torch
    from mi_compile import HeadPattern as HP, sparse_attention
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    try:
        out = sparse_attention(q, k, v, [HP("a_shape", sink=16, local=32), HP("dense")],
                               seq_start=torch.tensor([100], dtype=torch.int32),
                               seq_len=torch.tensor([100], dtype=torch.int32), impl="triton")
    except ValueError as e:
        print("VALUEERROR", e)
    else:
        print("RETURNED nan" if out.isnan().any() else "RETURNED")
""")


def test_out_of_range_sequence_raises_before_the_interpreted_kernel():
    """start 100 + len 100 > n 128 made the interpreted kernel segfault, abort (double free) or
    return NaN; run in a subprocess so a crash fails this test instead of killing pytest."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _INTERPRETER_CASE], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, f"crashed (rc {res.returncode}): {res.stderr[-2000:]}"
    assert "VALUEERROR" in res.stdout, res.stdout
    assert "seq_start + seq_len must be <= n = 128; got 200" in res.stdout


@pytest.mark.parametrize("start, length, message", [
    ((100,), (100,), "seq_start + seq_len must be <= n = 128; got 200 for sequence 0 (seq_start 100, seq_len 100)"),
    ((0,), (-1,), "seq_len must be >= 0; got -1"),
    ((-3,), (10,), "seq_start must be >= 0; got -3"),
    ((200,), (0,), "seq_start must be <= n = 128; got 200"),
    ((0, 120), (128, 9), "seq_start + seq_len must be <= n = 128; got 129 for sequence 1"),
])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_sequence_values_checked(start, length, message, impl):
    """The reference path silently clamped these; both paths now refuse them up front."""
    b = len(start)
    q, k, v = inputs(b=b)
    with pytest.raises(ValueError) as exc:
        sparse_attention(q, k, v, HEADS, seq_start=i32(*start), seq_len=i32(*length), impl=impl)
    assert message in str(exc.value)


def test_sequence_value_checks_in_every_public_entry():
    q, k, v = inputs()
    for fn in (build_sparse_index, ):
        with pytest.raises(ValueError, match="seq_len must be >= 0"):
            fn(q, k, HEADS, seq_len=i32(-5))
    with pytest.raises(ValueError, match="seq_start \\+ seq_len must be <= n"):
        selection_mask(q, k, HEADS, i32(100), i32(100))
    with pytest.raises(ValueError, match="seq_start \\+ seq_len must be <= n"):
        selection_density(q, k, HEADS, i32(100), i32(100))
    # only seq_start given: seq_len defaults to n - start, so a start past n is the error
    with pytest.raises(ValueError, match="seq_start must be <= n = 128; got 129"):
        sparse_attention(q, k, v, HEADS, seq_start=i32(129), impl="reference")


def test_sequence_values_checked_every_call_not_per_signature():
    """A good call first must not let a bad one with the same signature through."""
    q, k, v = inputs()
    sparse_attention(q, k, v, HEADS, seq_start=i32(10), seq_len=i32(100), impl="reference")
    with pytest.raises(ValueError, match="got 140"):
        sparse_attention(q, k, v, HEADS, seq_start=i32(40), seq_len=i32(100), impl="reference")


def test_sequence_tables_dtype_and_device():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="seq_len must be an integer tensor"):
        sparse_attention(q, k, v, HEADS, seq_len=torch.tensor([100.0]), impl="reference")
    with pytest.raises(ValueError, match="seq_start must be an integer tensor"):
        sparse_attention(q, k, v, HEADS, seq_start=torch.tensor([False]), impl="reference")
    with pytest.raises(ValueError, match="seq_len is on meta, q on cpu"):
        sparse_attention(q, k, v, HEADS, seq_len=torch.tensor([100], dtype=torch.int32, device="meta"),
                         impl="reference")


def test_valid_sequences_still_work():
    q, k, v = inputs(b=2)
    start, length = i32(0, 28), i32(128, 100)
    ref = sparse_attention(q, k, v, HEADS, seq_start=start, seq_len=length, impl="reference")
    tri = sparse_attention(q, k, v, HEADS, seq_start=start, seq_len=length, impl="triton")
    assert torch.allclose(ref, tri, atol=1e-4)
    empty = sparse_attention(q, k, v, HEADS, seq_start=i32(128, 0), seq_len=i32(0, 0), impl="reference")
    assert not empty.isnan().any()


# ------------------------------------------------------------------ bf16 under the interpreter

def test_bf16_under_the_interpreter_runs_in_float32():
    """The interpreter computed bf16 as ~1e9; the Triton path now runs such calls in float32."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    q, k, v = inputs(dtype=torch.bfloat16)
    out = sparse_attention(q, k, v, HEADS, impl="triton")
    assert out.dtype == torch.bfloat16
    ref = sparse_attention(q, k, v, HEADS, impl="reference")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    dest = torch.empty_like(q)
    assert sparse_attention(q, k, v, HEADS, impl="triton", out=dest) is dest
    assert torch.equal(dest, out)
    dens = selection_density(q, k, HEADS)
    assert torch.allclose(dens, selection_density(q.float(), k.float(), HEADS))


# ------------------------------------------------------------------ gradients

def test_triton_path_refuses_inputs_that_need_grad():
    q, k, v = inputs()
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="inference-only"):
        sparse_attention(q, k, v, HEADS, impl="triton")
    with torch.no_grad():
        assert sparse_attention(q, k, v, HEADS, impl="triton").grad_fn is None
    out = sparse_attention(q, k, v, HEADS, impl="reference")     # the reference differentiates
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_backend_leaves_training_graphs_alone():
    """Under grad mode with parameters that need grads, the graph keeps its SDPA (and its
    gradients); with no_grad the same model is rewritten."""
    from mi_compile.backend import MInferenceBackend
    from mi_compile.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    backend = MInferenceBackend({"min_seq_len": 0}, use_inductor=False)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(ids, use_cache=False).logits
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert backend.reports == []


# ------------------------------------------------------------------ what the rewrite pass leaves dense

class _Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _OneLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Attn()])

    def forward(self, q, k, v):
        return self.layers[0](q, k, v)


def _site(q, k, v, dynamic_len=False):
    torch._dynamo.reset()
    if dynamic_len:                          # symbolic sequence lengths, static heads / head_dim
        for t in (q, k, v):
            torch._dynamo.mark_dynamic(t, 2)
    sites = explain(_OneLayer(), q, k, v, options={"min_seq_len": 0}).sites
    assert len(sites) == 1
    return sites[0]


def test_supported_call_is_rewritten():
    assert _site(*inputs(64, 16)).action == "sparse"


@pytest.mark.parametrize("d", [60, 8, 264])
def test_unsupported_head_dim_stays_dense(d):
    site = _site(*inputs(64, d))
    assert site.action == "dense"
    assert site.reason == f"head_dim {d} unsupported by the sparse kernels (need 16..256, a multiple of 8)"


def test_unsupported_dtype_stays_dense():
    site = _site(*inputs(64, 16, dtype=torch.float64))
    assert site.action == "dense"
    assert "dtype torch.float64 unsupported by the sparse kernels" in site.reason


def test_causal_query_shorter_than_key_runs_over_the_first_keys():
    """is_causal=True with 32 queries over 128 keys is PyTorch's top-left causal mask (query r
    sees keys 0..r): a prefill over the first 32 keys, which the op runs."""
    q, _, _ = inputs(32, 16)
    _, k, v = inputs(128, 16)
    site = _site(q, k, v)
    assert site.action == "sparse", site.reason
    assert site.mask.kind == "causal_top_left"
    assert "PyTorch aligns the mask top-left" in site.mask.how
    torch._dynamo.reset()
    from mi_compile.backend import MInferenceBackend
    out = torch.compile(_OneLayer(), backend=MInferenceBackend({"min_seq_len": 0}, use_inductor=False))(q, k, v)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)


def test_causal_symbolic_lengths_of_their_own_follow_the_input():
    """Symbolic lengths the shapes do not relate: the traced input decides (and a guard holds)
    whether the query is no longer than the key (top-left over the first nq keys, sparse) or
    longer (not a prefill, dense)."""
    q, _, _ = inputs(32, 16)
    _, k, v = inputs(128, 16)
    site = _site(q, k, v, dynamic_len=True)
    assert site.action == "sparse" and site.mask.kind == "causal_top_left", site.reason
    site = _site(k, q, q, dynamic_len=True)           # 128 queries over 32 keys
    assert site.action == "dense"
    assert "exceeds key length" in site.reason and "not a prefill" in site.reason


def test_causal_symbolic_equal_lengths_still_sparse():
    x = inputs(64, 16)[0]                     # one tensor: q, k and v share the length symbol
    site = _site(x, x, x, dynamic_len=True)
    assert site.action == "sparse", site.reason


# ------------------------------------------------------------------ options and the command line

@pytest.mark.parametrize("value", [10**30, 2**31, -1])
def test_min_seq_len_bounded(value):
    with pytest.raises(OptionsError, match=r"'min_seq_len' must be an int >= 0 and <= 2\*\*31 - 1"):
        from mi_compile.options import BackendOptions
        BackendOptions.from_user({"min_seq_len": value})


def test_min_seq_len_largest_allowed():
    from mi_compile.options import BackendOptions
    assert BackendOptions.from_user({"min_seq_len": 2**31 - 1}).min_seq_len == 2**31 - 1


@pytest.mark.parametrize("value", [None, 3, "0,1", 1.5, [1.0], [-1]])
def test_dense_layers_type_errors_are_options_errors(value):
    from mi_compile.options import BackendOptions
    with pytest.raises(OptionsError, match="option 'dense_layers' must be a list of layer indices"):
        BackendOptions.from_user({"dense_layers": value})


def test_dense_layers_past_the_model_is_an_error():
    from mi_compile.models import tiny_model

    model = tiny_model("llama")                      # 2 layers
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with pytest.raises(Exception) as exc:
        explain(model, ids, options={"dense_layers": [99]}, use_cache=False)
    assert "option 'dense_layers' names layer(s) [99], the model has 2 layers" in str(exc.value)
    torch._dynamo.reset()
    sites = explain(model, ids, options={"dense_layers": [1], "min_seq_len": 0}, use_cache=False).sites
    assert [s.action for s in sites] == ["sparse", "dense"]


def test_cli_usage():
    from mi_compile.__main__ import main
    for flag in ("--help", "-h"):
        res = subprocess.run([sys.executable, "-m", "mi_compile", flag], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and "usage: python -m mi_compile" in res.stdout and "explain" in res.stdout
    res = subprocess.run([sys.executable, "-m", "mi_compile"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "usage: python -m mi_compile" in res.stderr
    assert main(["nope"]) == 2
