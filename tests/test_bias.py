"""The score bias of attention_pool (`bias=`, docs/contract.md section 1.1): every layout, bias
kind (shared by the N queries or one per query), Hb in {1, H}, shared K/V heads, N > 1 (the
tiled CPU kernels from N = 16), low-precision and float32 biases, -inf entries and empty rows,
NaN at valid and at unused positions, block-boundary lengths, against the float64 reference
(itself checked against the loop oracle) with the suite's tolerance rule (attnkern.testing);
float64 gradcheck, opcheck, torch.compile, determinism, and the backends without a bias path
refusing it."""

from __future__ import annotations

import math

import pytest
import torch

import attnkern
from attnkern import testing
from conftest import check_backend, make_problem
from test_backends import assert_compiles_fullgraph
from test_cpu import assert_thread_count_independent

CPU = attnkern.backends()["cpu"].available
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not CPU, reason="no CPU kernels"))]
FUSED = pytest.mark.skipif(not CPU, reason="the attnkern C++ extension (CPU kernels) is not built")


def _problem(layout="lengths", kind="shared", Hb=2, H=2, Hkv=None, N=3, L=19, dtype=torch.float32,
             bias_dtype=None, B=5, Dk=8, Dv=6, **kw):
    return make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=Dv, dtype=dtype, layout=layout, bias=kind,
                        bias_heads=Hb, bias_dtype=bias_dtype, **kw)


def _call(backend, args, kwargs, **extra):
    q, k, v, bias = args
    return attnkern.attention_pool(q, k, v, **kwargs, bias=bias, return_lse=True, backend=backend, **extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged", "full"])
@pytest.mark.parametrize("kind", testing.BIAS_KINDS)
@pytest.mark.parametrize("Hb", [1, 2])
@pytest.mark.parametrize("N,Hkv", [(1, 2), (3, 1)])
def test_bias_against_the_reference(backend, layout, kind, Hb, N, Hkv):
    args, kwargs = _problem(layout, kind, Hb, Hkv=Hkv, N=N)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,bias_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                              (torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_bias_dtypes(backend, dtype, bias_dtype, layout):
    args, kwargs = _problem(layout, "per_query", 2, Hkv=1, N=2, dtype=dtype, bias_dtype=bias_dtype)
    out, lse, grads = check_backend(backend, args, kwargs)
    assert grads[3].dtype == bias_dtype


@FUSED
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("kind,Hb,Hkv", [("shared", 1, 2), ("shared", 2, 1), ("per_query", 2, 2),
                                         ("per_query", 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_many_queries(layout, kind, Hb, Hkv, dtype):
    """N >= 16: the tiled CPU kernels (a remainder query tile; two key blocks)."""
    args, kwargs = _problem(layout, kind, Hb, Hkv=Hkv, N=17, L=70, B=3, Dk=16, Dv=8, dtype=dtype)
    check_backend("cpu", args, kwargs)


@FUSED
@pytest.mark.parametrize("N", [1, 4, 16])
@pytest.mark.parametrize("L", [15, 16, 17, 31, 32, 33, 63, 64, 65])
def test_bias_block_boundaries(N, L):
    """Rows ending just before, at and after every SIMD width and key block; each row is full,
    so the last lane of a block is a valid position."""
    args, kwargs = _problem("lengths", "per_query" if N == 4 else "shared", 2, N=N, L=L, B=2,
                            lengths=[L, L - 1])
    check_backend("cpu", args, kwargs)


@FUSED
@pytest.mark.parametrize("N,L", [(1, 1100), (17, 1100), (130, 40)])
def test_bias_split_paths(N, L):
    """A long row split into slices (merged forward, per-slice backward) and the forward's
    query chunks (many queries, one row: the chunks' bias rows start at their first query)."""
    args, kwargs = make_problem(B=1, N=N, H=2, L=L, Dk=16, Dv=8, layout="lengths", lengths=[L - 3],
                                bias="per_query", bias_heads=2)
    check_backend("cpu", args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("N", [1, 17])
def test_minus_inf_bias_drops_positions_and_empties_rows(backend, layout, N):
    args, kwargs = _problem(layout, "per_query", 2, N=N, L=20, B=4, lengths=[20, 5, 0, 11])
    q, k, v, bias = args
    g = torch.Generator().manual_seed(7)
    bias = torch.where(torch.rand(bias.shape, generator=g) < 0.3, -math.inf, bias)
    # Row 1: every logit of query 0's head 1 is -inf (that (query, head) is empty); row 3: all.
    if layout == "jagged":
        o = kwargs["offsets"]
        bias[o[1]:o[2], 0, 1] = -math.inf
        bias[o[3]:o[4]] = -math.inf
    else:
        bias[1, 0, 1] = -math.inf
        bias[3] = -math.inf
    out, lse, grads = check_backend(backend, [q, k, v, bias], kwargs)
    assert torch.isneginf(lse[1, 0, 1]) and torch.isneginf(lse[3]).all()
    assert (out[3] == 0).all() and (out[1, 0, 1] == 0).all()
    for t in grads:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("N", [2, 17])
def test_nan_bias(backend, layout, N):
    """A NaN at a valid position makes that (query, head)'s out and lse NaN, as in the reference;
    a NaN at an unused position changes nothing (it is never read)."""
    args, kwargs = _problem(layout, "per_query", 2, N=N, L=12, B=3, lengths=[12, 4, 0], extra_rows=3)
    q, k, v, bias = args
    want_out, want_lse = _call("reference", args, kwargs)
    unused = testing.unused_positions(k, kwargs)
    poisoned = bias.clone()
    if layout == "jagged":
        poisoned[unused] = math.nan
    else:
        poisoned.movedim(-1, 1)[unused] = math.nan
    out, lse = _call(backend, [q, k, v, poisoned], kwargs)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)

    valid = bias.clone()  # row 1, position 2, query 1, head 0
    if layout == "jagged":
        valid[int(kwargs["offsets"][1]) + 2, 1, 0] = math.nan
    else:
        valid[1, 1, 0, 2] = math.nan
    out, lse = _call(backend, [q, k, v, valid], kwargs)
    ref_out, ref_lse = _call("reference", [q, k, v, valid], kwargs)
    assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.isnan(out[1, 1, 0]).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(ref_lse))
    assert torch.isnan(lse).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_bias_broadcasts_like_its_expansion(backend, layout):
    """A shared bias with Hb = 1 gives what its expansion to [.., N, H, ..] gives, and its
    gradient is the expansion's summed over the queries and heads."""
    args, kwargs = _problem(layout, "shared", 1, H=4, Hkv=2, N=3)
    q, k, v, bias = args
    jagged = layout == "jagged"
    full = (bias.unsqueeze(1).expand(-1, 3, 4) if jagged else bias.unsqueeze(1).expand(-1, 3, 4, -1))
    go = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    grads = []
    for b in (bias, full.contiguous()):
        leaf = b.detach().requires_grad_()
        out, _ = _call(backend, [q, k, v, leaf], kwargs)
        grads.append((out, torch.autograd.grad(out, leaf, go)[0]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    summed = grads[1][1].sum((1, 2)).unsqueeze(-1 if jagged else 1)
    torch.testing.assert_close(grads[0][1], summed, atol=1e-5, rtol=1e-5)


@FUSED
@pytest.mark.parametrize("N", [2, 17])
def test_bias_gradient_is_deterministic(N):
    """A bias shared by the queries and heads (its gradient sums over both): bitwise the same
    results with 1, 2 and 3 threads, on the split path (L = 300) too."""
    (q, k, v, bias), kwargs = _problem("mask", "shared", 1, N=N, L=300, B=2)
    assert_thread_count_independent(q, k, v, kwargs, testing.random_grad_out(q, v), bias.unsqueeze(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,kind,Hb", [("lengths", "shared", 1), ("mask", "per_query", 2),
                                            ("jagged", "shared", 2)])
def test_bias_gradcheck_float64(backend, layout, kind, Hb):
    args, kwargs = make_problem(B=3, N=2, H=2, L=5, Dk=3, Dv=2, layout=layout, lengths=[5, 0, 2],
                                dtype=torch.float64, bias=kind, bias_heads=Hb)
    leaves = [a.detach().requires_grad_() for a in args]

    def f(q, k, v, bias):
        return attnkern.attention_pool(q, k, v, **kwargs, bias=bias, backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


@FUSED
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("bias_shape", ["shared", "per_query_heads"])
def test_bias_opcheck(layout, bias_shape):
    args, kwargs = make_problem(B=3, N=2, H=2, L=6, Dk=4, Dv=3, layout=layout, lengths=[6, 0, 3],
                                dtype=torch.float64)
    q, k, v = [a.detach().requires_grad_() for a in args]
    T = k.shape[0]
    shape = ({"shared": (T, 1, 1), "per_query_heads": (T, 2, 2)} if layout == "jagged" else
             {"shared": (3, 1, 1, 6), "per_query_heads": (3, 2, 2, 6)})[bias_shape]
    bias = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    prefix = "jagged_attention_pool" if layout == "jagged" else "attention_pool"
    fwd, bwd = getattr(torch.ops.attnkern, prefix + "_fwd"), getattr(torch.ops.attnkern, prefix + "_bwd")
    index = (kwargs["offsets"], 6) if layout == "jagged" else (kwargs["lengths"], None)
    fargs = (q, k, v) + index + (0.5, bias)
    torch.library.opcheck(fwd, fargs)
    out, lse = fwd(*fargs)
    grad_out = torch.randn_like(out)
    delta = (grad_out * out.detach()).sum(-1)
    bargs = (grad_out, q.detach(), k.detach(), v.detach()) + index + (lse.detach(), delta, 0.5, bias.detach())
    torch.library.opcheck(bwd, bargs)
    assert bwd(*bargs)[3].shape == bias.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_bias_torch_compile_fullgraph(backend, layout):
    args, kwargs = _problem(layout, "shared", 2, H=2, Hkv=1, N=2, L=8, B=3)
    assert_compiles_fullgraph(lambda q, k, v, bias: attnkern.attention_pool(q, k, v, **kwargs, bias=bias,
                                                                           backend=backend), args)


def test_the_ops_bias_layout_is_checked():
    """The fused ops (C++ and Triton) take the op layout [B, Nb, Hb, L], with the query axis."""
    from attnkern.ops import checks

    args, _ = _problem("lengths", "shared", 2, N=2)
    q, k, v, bias = args
    dims = (5, 2, 2, 8, 6, 19)
    checks.bias(dims, q, bias.unsqueeze(1), jagged=False)
    with pytest.raises(ValueError, match="bias must be"):
        checks.bias(dims, q, bias, jagged=False)  # the op's layout has the query axis