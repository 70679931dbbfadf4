"""Triton activation-unit pooling against the reference: forward and every gradient, every layout,
activation, one and two hidden layers, raw and softmax weights, empty rows, N > 1; the custom
ops' input checks, index clamping, fake impls and torch.compile (the CUDA kernels' tests:
tests/test_activation_unit_cuda.py).

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); with a GPU the same tests run on CUDA tensors. Shapes are tiny: the interpreter is
slow. Forward and gradients go through the suite's one checking body
(attnkern.testing.check_activation_backend: the public function with backend="triton" / "cuda" against
the float64 reference under the project's tolerance rule); lse through the raw op.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.ops.availability import extension  # noqa: E402
from attnkern.ops.schemas import ACTIVATION_GRAD_ARGS as GRAD_ARGS  # noqa: E402
from attnkern.reference import activation_unit_pool_ref  # noqa: E402
from attnkern.testing import activation_unused_rows as unused_rows  # noqa: E402
from attnkern.testing import random_activation_problem  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

from attnkern.triton_kernels import activation_unit as K  # noqa: E402
from activation_unit_cases import bad as _bad, check_backend, cover as _cover  # noqa: E402

TRITON_FWD = torch.ops.attnkern.triton_activation_unit_pool_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(dtype=torch.float32, device=DEVICE, **kw):
    return random_activation_problem(dtype=dtype, device=device, **kw)


def _run(fn, a, grad_out):
    """(out, lse, {name: grad}) of fn on leaf copies of a's differentiable tensors."""
    a = dict(a)
    names = [n for n in GRAD_ARGS if a[n] is not None]
    for n in names:
        a[n] = a[n].detach().clone().requires_grad_(True)
    out, lse = fn(*a.values())
    gs = torch.autograd.grad(out, [a[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
    return out, lse, {n: (torch.zeros_like(a[n]) if g is None else g) for n, g in zip(names, gs)}


@pytest.mark.parametrize("layout,activation,units,softmax", _cover())
def test_matches_reference(layout, activation, units, softmax):
    # B = 5 cycles through empty, one, full, half and nearly-full rows; N = 2 queries per row.
    a = _problem(B=5, N=2, L=6, E=3, Dv=4, units=units, activation=activation, softmax=softmax,
                 layout=layout, seed=7)
    check_backend("triton", a)


@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("L", [16, 17])
def test_block_boundary_lengths(L, softmax):
    """Rows of exactly one interpreter tile (16) and one past it; odd E, Dv and unit widths."""
    a = _problem(B=3, N=1, L=L, E=5, Dv=3, units=(17,), activation="dice", softmax=softmax,
                 layout="lengths", lengths=[L, L - 1, 2], seed=2)
    check_backend("triton", a)


@pytest.mark.parametrize("layout,softmax", [("lengths", False), ("jagged", True)])
def test_shared_keys_and_values(layout, softmax):
    """value None: the keys are pooled; grad_key holds both contributions, grad_value is [0]."""
    a = _problem(B=5, N=2, L=6, E=4, Dv=4, units=(5, 3), activation="dice", softmax=softmax,
                 layout=layout, seed=17, shared_value=True)
    assert a["value"] is None
    check_backend("triton", a)
    g, lse, delta = _bwd_args(a)
    grads = torch.ops.attnkern.triton_activation_unit_pool_bwd(g, *a.values(), lse, delta)
    assert grads[2].numel() == 0 and grads[1].shape == a["key"].shape


def test_bfloat16_two_layers():
    a = _problem(B=3, N=2, L=5, E=4, Dv=2, units=(6, 5), activation="prelu", softmax=True,
                 layout="jagged", dtype=torch.bfloat16, seed=4)
    check_backend("triton", a)


@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_empty_rows_and_unused_positions_never_read(softmax):
    """NaN/Inf at positions of no row change nothing; empty rows give 0 and zero gradients."""
    a = _problem(B=4, N=3, L=5, E=3, Dv=2, units=(4, 3), activation="sigmoid", softmax=softmax,
                 layout="lengths", lengths=[0, 2, 0, 5], seed=5)
    unused = unused_rows(a).to(DEVICE)
    a["key"] = a["key"].masked_fill(unused[..., None], float("nan"))
    a["value"] = a["value"].masked_fill(unused[..., None], float("inf"))
    out, lse, gr = _run(TRITON_FWD, a, torch.ones(4, 3, 2, device=DEVICE))
    assert torch.isfinite(out).all()
    empty = torch.tensor([True, False, True, False], device=DEVICE)
    assert (out[empty] == 0).all()
    if softmax:
        assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    else:
        assert (lse == 0).all()
    for n, g in gr.items():
        assert torch.isfinite(g).all(), n
    assert (gr["key"][unused] == 0).all() and (gr["value"][unused] == 0).all()
    assert (gr["query"][empty] == 0).all()
    # Against the reference on the same inputs (its masking zeroes the NaN first).
    ref_out, _, ref_gr = _run(activation_unit_pool_ref, a, torch.ones(4, 3, 2, device=DEVICE))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for n in gr:
        torch.testing.assert_close(gr[n], ref_gr[n], atol=1e-5, rtol=1e-5, msg=n)


def test_all_rows_empty():
    a = _problem(B=2, N=2, L=3, E=2, Dv=2, units=(3,), activation="relu", softmax=True,
                 layout="jagged", lengths=[0, 0], seed=6)
    out, lse, gr = _run(TRITON_FWD, a, torch.ones(2, 2, 2, device=DEVICE))
    assert (out == 0).all() and torch.isneginf(lse).all()
    for n, g in gr.items():
        assert (g == 0).all(), n


def _bwd_args(a, seed=0):
    out, lse = K.activation_unit_fwd(*a.values())
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    delta = (g.float() * out.float()).sum(-1)
    return g, lse, delta


def test_weight_gradient_partials_are_deterministic():
    """The weight gradients are one partial per program summed in a fixed order: the same
    result for any program count up to rounding, and bit-identical across reruns."""
    a = _problem(B=5, N=2, L=4, E=3, Dv=2, units=(4, 3), activation="dice", softmax=True,
                 layout="mask", seed=8)
    g, lse, delta = _bwd_args(a)
    args = list(a.values())
    one = K.activation_unit_bwd(g, *args, lse, delta, num_programs=1)
    three = K.activation_unit_bwd(g, *args, lse, delta, num_programs=3)
    again = K.activation_unit_bwd(g, *args, lse, delta, num_programs=3)
    for x, y, z in zip(one, three, again):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        assert torch.equal(y, z)


def test_index_values_are_checked_then_clamped_in_kernel():
    """The op rejects bad lengths/offsets values it can read (CPU tensors) with a ValueError; the
    kernels clamp rows whatever the values (lengths > L act as L, < 0 as 0; offsets past T or
    decreasing give clamped or empty rows), so nothing is read out of bounds either way."""
    a = _problem(B=3, N=1, L=4, E=2, Dv=2, units=(3,), activation="relu", softmax=False,
                 layout="lengths", seed=9)
    a["lengths"] = torch.tensor([9, -3, 2], dtype=torch.int32, device=DEVICE)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="lengths must be"):
            TRITON_FWD(*a.values())
    out, _ = K.activation_unit_fwd(*a.values())
    b = dict(a)
    b["lengths"] = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
    want, _ = activation_unit_pool_ref(*b.values())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    j = _problem(B=2, N=1, L=3, E=2, Dv=2, units=(3,), activation="relu", softmax=True,
                 layout="jagged", seed=9)
    T_rows = j["key"].shape[0]
    j["offsets"] = torch.tensor([2, 1, T_rows + 50], dtype=torch.int64, device=DEVICE)
    j["max_length"] = -1
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="offsets"):
            TRITON_FWD(*j.values())
    out, lse = K.activation_unit_fwd(*j.values())
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()  # end < start: empty row
    g = torch.ones_like(out)
    grads = K.activation_unit_bwd(g, *j.values(), lse, (g * out).sum(-1))
    assert all(torch.isfinite(t).all() for t in grads)


def test_non_contiguous_inputs():
    a = _problem(B=3, N=2, L=5, E=3, Dv=3, units=(4,), activation="prelu", softmax=True,
                 layout="lengths", seed=10)
    a["key"] = a["key"].transpose(1, 2).contiguous().transpose(1, 2)
    a["query"] = a["query"].transpose(0, 1).contiguous().transpose(0, 1)
    a["w1"] = a["w1"].t().contiguous().t()
    assert not a["key"].is_contiguous() and not a["w1"].is_contiguous()
    check_backend("triton", a)


def test_input_checks():
    a = _problem(B=2, N=1, L=3, E=2, Dv=2, units=(3,), activation="prelu", softmax=False,
                 layout="lengths", seed=11)
    op = torch.ops.attnkern.triton_activation_unit_pool_fwd
    cases = [
        (ValueError, "w1 must be", dict(w1=a["w1"][:, :-1])),
        (ValueError, "b1 must have shape", dict(b1=a["b1"][:-1])),
        (ValueError, "give w2 and b2 together", dict(w2=torch.zeros(2, 3, device=DEVICE))),
        (ValueError, "w_out must have shape", dict(w_out=a["w_out"][:, :-1])),
        (ValueError, "act1 must have shape", dict(act1=torch.zeros(3, 3, device=DEVICE))),
        (ValueError, "act1 is required", dict(act1=None)),
        (ValueError, "activation must be relu", dict(activation="gelu")),
        (ValueError, "padded key", dict(key=a["key"][:, :, :1])),
        (ValueError, "lengths must have shape", dict(lengths=a["lengths"][:1])),
        (TypeError, "lengths must be int32 or int64", dict(lengths=a["lengths"].float())),
        (ValueError, "give lengths or mask", dict(mask=torch.ones(2, 3, dtype=torch.bool,
                                                                  device=DEVICE))),
        (TypeError, "must have the dtype of query", dict(b_out=a["b_out"].double())),
        (TypeError, "float16, bfloat16 or float32",
         {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for n, t in a.items()}),
    ]
    for exc, msg, change in cases:
        with pytest.raises(exc, match=msg):
            op(*_bad(a, **change))
    r = dict(a, activation="relu", act1=None)
    with pytest.raises(ValueError, match="act1 must be None"):
        op(*_bad(r, act1=a["act1"]))
    j = _problem(B=2, N=1, L=3, E=2, Dv=2, units=(3,), activation="relu", softmax=False,
                 layout="jagged", seed=11)
    with pytest.raises(ValueError, match="offsets must have shape"):
        op(*_bad(j, offsets=j["offsets"][:-1]))
    with pytest.raises(ValueError, match="max_length must be"):
        op(*_bad(j, max_length=-2))
    g, lse, delta = _bwd_args(a)
    bwd = torch.ops.attnkern.triton_activation_unit_pool_bwd
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bwd(g[:, :, :1], *a.values(), lse, delta)
    with pytest.raises(TypeError, match="lse must be torch.float32"):
        bwd(g, *a.values(), lse.double(), delta)


def test_schema_matches_cpp_op():
    """The Triton ops take exactly the C++ ops' arguments (same names, types, defaults)."""
    if extension()[0] is None or not hasattr(torch.ops.attnkern, "activation_unit_pool_fwd"):
        pytest.skip("the compiled extension with the activation-unit schemas is not built")
    for suffix in ("fwd", "bwd"):
        cpp = getattr(torch.ops.attnkern, "activation_unit_pool_" + suffix).default._schema
        tri = getattr(torch.ops.attnkern, "triton_activation_unit_pool_" + suffix).default._schema
        assert [(x.name, str(x.type)) for x in cpp.arguments] == \
            [(x.name, str(x.type)) for x in tri.arguments]
        assert [(x.name, str(x.type)) for x in cpp.returns] == \
            [(x.name, str(x.type)) for x in tri.returns]


def test_opcheck():
    a = _problem(B=2, N=2, L=3, E=2, Dv=2, units=(3, 2), activation="dice", softmax=True,
                 layout="lengths", seed=12)
    args = [t.detach().clone().requires_grad_(n in GRAD_ARGS) if isinstance(t, torch.Tensor)
            and t.is_floating_point() else t for n, t in a.items()]
    torch.library.opcheck(torch.ops.attnkern.triton_activation_unit_pool_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    g, lse, delta = _bwd_args(a)
    torch.library.opcheck(torch.ops.attnkern.triton_activation_unit_pool_bwd.default,
                          [g, *a.values(), lse, delta],
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    a = _problem(B=3, N=1, L=4, E=2, Dv=2, units=(3,), activation="sigmoid", softmax=False,
                 layout="jagged", seed=13)

    def f(*args):
        out, lse = TRITON_FWD(*args)
        return out.sum() + lse.sum()

    # aot_eager traces through the fake impls and the autograd formula without a C++ compiler.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = {n: (t.detach().clone().requires_grad_(True) if n in GRAD_ARGS and t is not None
                  else t) for n, t in a.items()}
    y = compiled(*leaves.values())
    y.backward()
    want = f(*a.values())
    torch.testing.assert_close(y.detach(), want, atol=1e-5, rtol=1e-5)
    assert leaves["w1"].grad is not None and torch.isfinite(leaves["w1"].grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("units", [(64,), (80, 40), (256,)], ids=["64", "80-40", "256"])
def test_triton_on_gpu_bench_like_shape(units):
    """The compiled (non-interpreted) Triton kernels at a realistic size: E = 64, long rows."""
    a = _problem(B=64, N=2, L=200, E=64, Dv=64, units=units, activation="dice", softmax=False,
                 layout="lengths", device="cuda", seed=15)
    check_backend("triton", a)
