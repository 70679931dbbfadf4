"""Property suite of activation-unit pooling: every backend against the float64 reference (and
the reference against the float64 loop oracle in test_activation_unit_reference.py), forward and
every gradient; layouts, dtypes, odd sizes, block boundaries, empty rows, N > 1, strides;
gradcheck, opcheck, torch.compile and bad input."""

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.ops.schemas import ACTIVATION_FWD_ARGS as FWD_ARGS, ACTIVATION_GRAD_ARGS as GRAD_ARGS, ACTIVATION_SCHEMAS
from attnkern.testing import (activation_loop_oracle as loop_oracle, activation_unused_rows,
                              check_activation_backend as check, random_activation_problem, to_public)

ACTS = ["relu", "sigmoid", "prelu", "dice"]
LAYOUTS = ["lengths", "mask", "jagged", "full"]
# The half-precision rows of the grid are slow-marked: the fast subset keeps float32/float64.
DTYPES = [torch.float32, torch.float64,
          pytest.param(torch.bfloat16, marks=pytest.mark.slow, id="torch.bfloat16"),
          pytest.param(torch.float16, marks=pytest.mark.slow, id="torch.float16")]


def backends():
    info = attnkern.backends()
    out = [pytest.param("reference", id="reference")]
    for name in ("cpu", "triton"):
        marks = []
        if not info[name].available:
            marks.append(pytest.mark.skip(reason=info[name].reason))
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def _assert_check(backend, a):
    ok, errors, why = check(backend, a)
    assert ok, why + " " + str({k: "%.2g" % v for k, v in errors.items()})


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTS)
def test_layouts_dtypes_activations(backend, layout, dtype, activation):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton takes no float64")
    a = random_activation_problem(B=6, N=2, L=50, E=7, Dv=5, units=(9, 5), activation=activation,
                                  softmax=activation in ("sigmoid", "dice"), layout=layout, dtype=dtype, seed=2)
    _assert_check(backend, a)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
@pytest.mark.parametrize("shape", [
    # (B, N, L, E, Dv, units): odd E and widths, block boundaries (48 keys), the widest layers.
    (3, 1, 47, 1, 1, (1,)),
    (4, 1, 48, 13, 3, (17,)),
    (3, 3, 49, 40, 7, (33, 2)),
    (2, 1, 97, 64, 64, (80, 40)),
    (2, 2, 5, 130, 9, (256, 256)),
    (1, 1, 1, 256, 256, (7,)),
], ids=lambda s: "B%dN%dL%dE%dDv%d-%s" % (s[0], s[1], s[2], s[3], s[4], "x".join(map(str, s[5]))))
def test_shapes(backend, softmax, shape):
    B, N, L, E, Dv, units = shape
    a = random_activation_problem(B=B, N=N, L=L, E=E, Dv=Dv, units=units, activation="prelu",
                                  softmax=softmax, layout="lengths", dtype=torch.float32, seed=5)
    _assert_check(backend, a)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_against_loop_oracle(backend, layout):
    """The fused backend directly against the float64 loop oracle (explicit concatenation)."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    for activation, units, softmax in (("dice", (6, 4), True), ("relu", (5,), False)):
        a = random_activation_problem(B=5, N=2, L=7, E=3, Dv=4, units=units, activation=activation,
                                      softmax=softmax, layout=layout, dtype=dtype, seed=4)
        args, kw = to_public(a)
        out = attnkern.activation_unit_pool(*args, **kw, backend=backend)
        want, _ = loop_oracle(a)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", backends())
def test_empty_batch_and_all_empty_rows(backend):
    for B, lengths in ((0, []), (3, [0, 0, 0])):
        a = random_activation_problem(B=B, N=1, L=4, E=3, Dv=2, units=(4,), softmax=True,
                                      lengths=torch.tensor(lengths, dtype=torch.long), seed=1)
        _assert_check(backend, a)
        args, kw = to_public(a)
        out = attnkern.activation_unit_pool(*args, **kw, backend=backend)
        assert out.shape == (B, 1, 2) and (out == 0).all()


@pytest.mark.parametrize("backend", backends())
def test_unused_positions_are_never_read(backend):
    """NaN/inf in padding, masked-out positions and jagged rows past offsets[-1] reach nothing."""
    for layout in ("lengths", "mask", "jagged"):
        a = random_activation_problem(B=5, N=2, L=11, E=6, Dv=3, units=(8,), activation="sigmoid",
                                      layout=layout, seed=3)
        unused = activation_unused_rows(a)
        a["key"] = a["key"].masked_fill(unused[..., None], float("nan"))
        a["value"] = a["value"].masked_fill(unused[..., None], float("inf"))
        _assert_check(backend, a)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_non_contiguous_inputs(backend, layout):
    a = random_activation_problem(B=4, N=3, L=20, E=6, Dv=5, units=(7, 3), activation="dice",
                                  softmax=True, layout=layout, seed=7)
    # Strided views: every other element of wider buffers, transposed weights.
    for n in ("query", "key", "value"):
        t = a[n]
        wide = torch.randn(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        a[n] = wide[..., ::2]
        assert not a[n].is_contiguous()
    a["w1"] = a["w1"].t().contiguous().t()
    a["act1"] = a["act1"].t().contiguous().t()
    assert not a["w1"].is_contiguous()
    _assert_check(backend, a)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_keys_as_values(backend, layout):
    """value None (or the key tensor itself): one key gradient holding both contributions, equal
    to passing a separate copy of the keys and summing their two gradients."""
    a = random_activation_problem(B=5, N=2, L=50, E=6, units=(7, 3), activation="dice", softmax=True,
                                  layout=layout, seed=8, shared_value=True)
    _assert_check(backend, a)
    args, kw = to_public(a)
    q, k, _, weights = args
    k1 = k.detach().clone().requires_grad_(True)
    k2 = k.detach().clone().requires_grad_(True)
    k3 = k.detach().clone().requires_grad_(True)
    go = torch.randn(q.shape[0], q.shape[1], k.shape[-1], generator=torch.Generator().manual_seed(0))
    shared = attnkern.activation_unit_pool(q, k1, None, weights, **kw, backend=backend)
    same = attnkern.activation_unit_pool(q, k3, k3, weights, **kw, backend=backend)
    k4 = k.detach().clone().requires_grad_(True)
    apart = attnkern.activation_unit_pool(q, k2, k4, weights, **kw, backend=backend)
    torch.testing.assert_close(shared, apart)
    torch.testing.assert_close(same, apart)
    g1, = torch.autograd.grad(shared, [k1], go)
    g3, = torch.autograd.grad(same, [k3], go)
    g2, g4 = torch.autograd.grad(apart, [k2, k4], go)
    torch.testing.assert_close(g1, g2 + g4, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g3, g2 + g4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", backends())
def test_shared_prelu_slope_and_no_bias(backend):
    """A single PReLU slope (DeepCTR's nn.PReLU()) and bias-free layers."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    w1, w2, wo = torch.randn(4, 20, generator=g), torch.randn(3, 4, generator=g), torch.randn(1, 3, generator=g)
    slope = torch.tensor([0.3])
    lengths = torch.tensor([6, 0, 2])
    out = attnkern.activation_unit_pool(q, k, k, [(w1, None), (w2, None), (wo, None)], lengths,
                                        activation="prelu", activation_params=[slope, slope], backend=backend)
    z = torch.zeros
    want = attnkern.activation_unit_pool(q, k, k, [(w1, z(4)), (w2, z(3)), (wo, z(1))], lengths,
                                         activation="prelu", activation_params=[slope.expand(4), slope.expand(3)],
                                         backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("activation,units,softmax", [("dice", (4, 3), True), ("prelu", (5,), False),
                                                      ("sigmoid", (3, 2), False)])
def test_gradcheck_float64(backend, layout, activation, units, softmax):
    if not attnkern.backends()[backend].available:
        pytest.skip(attnkern.backends()[backend].reason)
    a = random_activation_problem(B=4, N=2, L=5, E=3, Dv=2, units=units, activation=activation,
                                  softmax=softmax, layout=layout, dtype=torch.float64, seed=9)
    names = [n for n in GRAD_ARGS if a[n] is not None]

    def f(*xs):
        b = dict(a)
        b.update(zip(names, xs))
        args, kw = to_public(b)
        return attnkern.activation_unit_pool(*args, **kw, backend=backend)

    xs = [a[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7)


def _op_args(layout, dtype=torch.float32, activation="dice", units=(5, 3), softmax=True, shared=False):
    a = random_activation_problem(B=3, N=2, L=6, E=4, Dv=3, units=units, activation=activation,
                                  softmax=softmax, layout=layout, dtype=dtype, seed=11, shared_value=shared)
    for n in GRAD_ARGS:
        if a[n] is not None:
            a[n] = a[n].requires_grad_(True)
    return a


@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("activation,units,shared", [("dice", (5, 3), False), ("relu", (4,), False),
                                                     ("prelu", (4, 2), True)])
def test_opcheck(layout, activation, units, shared):
    a = _op_args(layout, activation=activation, units=units, shared=shared)
    torch.library.opcheck(torch.ops.attnkern.activation_unit_pool_fwd.default, tuple(a.values()))
    out, lse = torch.ops.attnkern.activation_unit_pool_fwd(*a.values())
    go = torch.randn_like(out)
    delta = (go * out).sum(-1).detach()
    bargs = (go,) + tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in a.values()) + (lse.detach(), delta)
    torch.library.opcheck(torch.ops.attnkern.activation_unit_pool_bwd.default, bargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_torch_compile_fullgraph(backend, layout):
    if not attnkern.backends()[backend].available:
        pytest.skip(attnkern.backends()[backend].reason)
    a = _op_args(layout, activation="prelu", units=(6,), softmax=False)
    args, kw = to_public(a)

    def f(q, k, w1):
        (_, _, v, weights) = args
        return attnkern.activation_unit_pool(q, k, v, [(w1, weights[0][1])] + list(weights[1:]), **kw,
                                             backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(a["query"], a["key"], a["w1"])
    want = f(a["query"], a["key"], a["w1"])
    torch.testing.assert_close(out, want)
    g = torch.autograd.grad(out.sum(), [a["w1"], a["query"]])
    gw = torch.autograd.grad(want.sum(), [a["w1"], a["query"]])
    for x, y in zip(g, gw):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16", "amx"])
def test_every_isa_path_matches(isa):
    """The kernels of each instruction set (ATTNKERN_CPU_ISA, chosen once per process) in a
    subprocess: a cap this CPU does not reach runs its widest set below, avx512_bf16 and amx run
    this op's avx512 kernels, float64 its generic ones; 40 units leave a column panel of one
    AVX-512 vector next to a full one."""
    code = (
        "import torch, attnkern\n"
        "from attnkern.testing import check_activation_backend as check, random_activation_problem as r\n"
        "for act, sm in (('dice', True), ('relu', False), ('sigmoid', False), ('prelu', True)):\n"
        "    for dt in (torch.float32, torch.bfloat16, torch.float64):\n"
        "        for units in ((7, 3), (40,)):\n"
        "            ok, e, why = check('cpu', r(B=4, N=2, L=50, E=9, Dv=5, units=units, activation=act, softmax=sm,\n"
        "                                        seed=1, dtype=dt))\n"
        "            assert ok, why\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- bad input ----------------------------------------------------------------------------------


def _public(**over):
    a = random_activation_problem(B=3, N=1, L=5, E=4, Dv=3, units=(6,), activation="prelu", seed=0)
    args, kw = to_public(a)
    q, k, v, w = args
    call = dict(query=q[:, 0], key=k, value=v, weights=w, **kw)
    call.update(over)
    return call


@pytest.mark.parametrize("over,exc,words", [
    (dict(query=torch.randn(3, 4, dtype=torch.float64)), TypeError, "query"),
    (dict(query=torch.randn(3)), ValueError, "query"),
    (dict(key=torch.randn(3, 5, 7)), ValueError, "key"),
    (dict(value=torch.randn(2, 5, 3)), ValueError, "value"),
    (dict(weights=[]), ValueError, "weights"),
    (dict(weights=torch.randn(3)), TypeError, "weights"),
    (dict(weights=[(torch.randn(6, 15), None), (torch.randn(1, 6), None)]), ValueError, "weights[0]"),
    (dict(weights=[(torch.randn(300, 16), None), (torch.randn(1, 300), None)]), ValueError, "hidden units"),
    (dict(weights=[(torch.randn(6, 16), torch.randn(5)), (torch.randn(1, 6), None)]), ValueError, "bias"),
    (dict(weights=[(torch.randn(6, 16), None), (torch.randn(2, 6), None)]), ValueError, "weights[1]"),
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(activation_params=None), ValueError, "activation_params"),
    (dict(activation_params=[torch.randn(5)]), ValueError, "prelu slopes"),
    (dict(activation="relu"), ValueError, "activation_params"),
    (dict(normalize="sum"), ValueError, "normalize"),
    (dict(lengths=torch.tensor([1, 2])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1, 2, 9])), ValueError, "lengths"),
    (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, "lengths"),
    (dict(mask=torch.ones(3, 5), lengths=None), TypeError, "mask"),
    (dict(mask=torch.ones(3, 5, dtype=torch.bool), lengths=torch.tensor([1, 2, 3])), ValueError, "not both"),
    (dict(max_length=3), ValueError, "max_length"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(over, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        attnkern.activation_unit_pool(**_public(**over))


def test_bad_jagged_input():
    a = random_activation_problem(B=3, N=1, L=5, E=4, Dv=3, units=(6,), layout="jagged", seed=0)
    args, kw = to_public(a)
    with pytest.raises(ValueError, match="offsets"):
        attnkern.activation_unit_pool(*args, **dict(kw, offsets=torch.tensor([0, 3, 2, 4])))
    with pytest.raises(ValueError, match="offsets"):
        attnkern.activation_unit_pool(*args, **dict(kw, offsets=torch.tensor([0, 3, 4, 99]), max_length=None))
    with pytest.raises(ValueError, match="max_length"):
        attnkern.activation_unit_pool(*args, **dict(kw, max_length=1))
    with pytest.raises(ValueError, match="jagged"):
        attnkern.activation_unit_pool(args[0], args[1][None], args[2], args[3], **kw)


@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
@pytest.mark.parametrize("name,bad,words", [
    ("key", torch.randn(3, 6, 5), "key"),
    ("value", torch.randn(2, 6, 3), "value"),
    ("lengths", torch.tensor([1, 2, 99], dtype=torch.int32), "lengths"),
    ("lengths", torch.tensor([1, -2, 3], dtype=torch.int32), "lengths"),
    ("mask", torch.ones(3, 5, dtype=torch.bool), "mask"),
    ("w1", torch.randn(5, 15), "w1"),
    ("w1", torch.randn(300, 16), "hidden units"),
    ("b1", torch.randn(4), "b1"),
    ("w2", None, "w2 and b2"),
    ("w_out", torch.randn(2, 3), "w_out"),
    ("act1", None, "act1"),
    ("act2", torch.randn(1, 3), "act2"),
    ("activation", "tanh", "activation"),
    ("query", torch.randn(3, 2, 4, dtype=torch.float64), "dtype"),
])
def test_raw_op_checks_its_inputs(name, bad, words):
    """A direct torch.ops call with bad input raises (never reads out of bounds)."""
    a = random_activation_problem(B=3, N=2, L=6, E=4, Dv=3, units=(5, 3), activation="dice", seed=0)
    a[name] = bad
    with pytest.raises((ValueError, TypeError, RuntimeError), match=words):
        torch.ops.attnkern.activation_unit_pool_fwd(*a.values())


@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
def test_raw_op_checks_jagged_offsets_and_bwd_extras():
    a = random_activation_problem(B=3, N=2, L=6, E=4, Dv=3, units=(5,), layout="jagged", seed=0)
    for bad in ([0, 2, 1, 3], [1, 2, 3, 4], [0, 2, 3, 999]):
        b = dict(a, offsets=torch.tensor(bad), max_length=-1)
        with pytest.raises(ValueError, match="offsets"):
            torch.ops.attnkern.activation_unit_pool_fwd(*b.values())
    with pytest.raises(ValueError, match="max_length"):
        torch.ops.attnkern.activation_unit_pool_fwd(*dict(a, max_length=1).values())
    out, lse = torch.ops.attnkern.activation_unit_pool_fwd(*a.values())
    go = torch.zeros_like(out)
    for g, l, d, words in ((go[:, :1], lse, lse, "grad_out"), (go, lse.double(), lse, "lse"),
                           (go, lse, lse[:1], "delta")):
        with pytest.raises((ValueError, TypeError), match=words):
            torch.ops.attnkern.activation_unit_pool_bwd(g, *a.values(), l, d)


@pytest.mark.parametrize("name", sorted(ACTIVATION_SCHEMAS))
def test_cpp_schemas_match_the_declaration(name):
    if not attnkern.backends()["cpu"].available:
        pytest.skip("extension not built")
    assert str(getattr(torch.ops.attnkern, name).default._schema) == "attnkern::" + name + ACTIVATION_SCHEMAS[name]
    schema = torch.ops.attnkern.activation_unit_pool_fwd.default._schema
    assert tuple(arg.name for arg in schema.arguments) == FWD_ARGS
