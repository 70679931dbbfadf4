"""attnkern.activation_unit_weights on the fused backends (attnkern::activation_unit_scores_fwd,
attnkern/ops/activation_scores.py): the weights and the gradients of query, key, every MLP weight
and the activation parameters against the float64 reference under the suite's tolerance rule
(attnkern.testing.compare), exact zeros outside the rows and on empty rows, lse equal to the
pooling op's; the backward's identity (the pooling backward with the upstream gradient as values)
by float64 gradcheck; opcheck, torch.compile, every CPU instruction set, Dice with batch
statistics, the Triton kernels (interpreter on CPU) and the CUDA kernels (GPU or emulation)."""

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import testing
from attnkern.ops import activation_scores_op
from attnkern.ops.activation_scores import MAX_QUERIES_PER_CALL, SCORES_OP
from attnkern.ops.schemas import ACTIVATION_GRAD_ARGS, ACTIVATION_SCORES_SCHEMAS
from attnkern.functional import dice_batch_statistics
from attnkern.reference import dice_params
from conftest import CUDA_DEVICE, cuda_op

CPU = attnkern.backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not CPU, reason="extension not built")
# Every (activation, raw/softmax) pair once; layouts, depths and N spread over them.
CASES = [("relu", False, "lengths", (7,), 3), ("relu", True, "jagged", (6, 3), 2),
         ("sigmoid", False, "mask", (6, 3), 2), ("sigmoid", True, "full", (5,), 1),
         ("prelu", False, "jagged", (5,), 2), ("prelu", True, "lengths", (7, 3), 3),
         ("dice", False, "full", (6, 3), 2), ("dice", True, "mask", (5,), 2)]


def _ids(c):
    return "%s-%s-%s-%s-N%d" % (c[0], "softmax" if c[1] else "raw", c[2], "x".join(map(str, c[3])), c[4])


def _problem(case, dtype=torch.float32, device="cpu", B=4, L=21, E=5, seed=3):
    activation, softmax, layout, units, N = case
    return testing.random_activation_problem(B=B, N=N, L=L, E=E, Dv=1, units=units, activation=activation,
                                             softmax=softmax, layout=layout, dtype=dtype, device=device,
                                             seed=seed)


def _run(backend, a, grad, dtype=None):
    """(weights, {name: gradient}) of the public function on problem `a`, inputs cast to dtype."""
    leaves = dict(a)
    names = [n for n in ACTIVATION_GRAD_ARGS if n != "value" and a[n] is not None]
    for n in names:
        t = a[n].detach()
        leaves[n] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_(True)
    (q, k, _, weights), kw = testing.to_public(leaves)
    w = attnkern.activation_unit_weights(q, k, weights, **kw, backend=backend)
    grads = torch.autograd.grad(w, [leaves[n] for n in names], grad.to(w), allow_unused=True)
    return w.detach(), {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}


def check_weights(backend, a, seed=1):
    """`backend` against the float64 reference: weights and every gradient under the tolerance
    rule (attnkern.testing.compare), exact zeros at positions in no row and on empty rows."""
    dtype = a["query"].dtype
    shape = testing.activation_unused_rows(a).shape
    N = a["query"].shape[1]
    out_shape = (shape[0], N) if a["offsets"] is not None else (shape[0], N, shape[1])
    grad = torch.randn(out_shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in a.items()}
    w64, g64 = _run("reference", cpu, grad, torch.float64)
    wlp, glp = (w64, g64) if dtype == torch.float64 else _run("reference", cpu, grad)
    w, g = _run(backend, a, grad.to(a["query"].device))
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and w.shape == w64.shape
    failures = []
    for name, got, lp, want in [("weights", w, wlp, w64)] + [(n, g[n], glp[n], g64[n]) for n in g64]:
        c = testing.compare(name, got.cpu(), lp, want, dtype)
        if not c.ok:
            failures.append(c.message())
    unused = testing.activation_unused_rows(a)
    zeros = w.cpu()[unused] if a["offsets"] is not None else w.cpu().transpose(1, 2)[unused]
    if (zeros != 0).any():
        failures.append("weights must be exactly 0 at positions in no row")
    if (g["key"].cpu()[unused] != 0).any():
        failures.append("grad key must be exactly 0 at positions in no row")
    assert not failures, "; ".join(failures)


def _scores_op(backend):
    op = activation_scores_op(backend)
    assert op is not None, "backend %r has no activation_unit_scores_fwd" % backend
    return op


def _lse_matches_the_pool(backend, a):
    """The scores op's lse is the pooling op's (same pass)."""
    args = [v for n, v in a.items() if n != "value"]
    pool = (torch.ops.attnkern.activation_unit_pool_fwd if backend == "cpu"
            else torch.ops.attnkern.triton_activation_unit_pool_fwd if backend == "triton"
            else cuda_op("activation_unit_pool_fwd"))
    with torch.no_grad():
        _, lse = _scores_op(backend)(*args)
        _, want = pool(*a.values())
    torch.testing.assert_close(lse, want, rtol=0, atol=0)


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_cpu_matches_reference(case):
    a = _problem(case)
    check_weights("cpu", a)
    _lse_matches_the_pool("cpu", a)


@needs_cpu
@pytest.mark.parametrize("dtype,case", [(torch.bfloat16, CASES[5]), (torch.float16, CASES[1]),
                                        (torch.float64, CASES[7])], ids=str)
def test_cpu_dtypes(dtype, case):
    check_weights("cpu", _problem(case, dtype=dtype))


@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_backward_identity_gradcheck(case):
    """The fused backward (the pooling backward with dW as values, delta = sum w dW with
    softmax) is the exact gradient: float64 gradcheck w.r.t. every differentiable input."""
    a = _problem(case, dtype=torch.float64, B=3, L=5, E=3, seed=9)
    names = [n for n in ACTIVATION_GRAD_ARGS if n != "value" and a[n] is not None]

    def f(*xs):
        b = dict(a)
        b.update(zip(names, xs))
        (q, k, _, weights), kw = testing.to_public(b)
        return attnkern.activation_unit_weights(q, k, weights, **kw, backend="cpu")

    xs = [a[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-7)


@needs_cpu
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_more_queries_than_one_backward_call(layout):
    """N beyond the pooling backward's Dv limit: the backward runs in query chunks."""
    a = testing.random_activation_problem(B=2, N=MAX_QUERIES_PER_CALL + 3, L=4, E=3, Dv=1, units=(4,),
                                          activation="prelu", softmax=layout == "jagged", layout=layout,
                                          dtype=torch.float64, seed=5)
    check_weights("cpu", a)


@needs_cpu
@pytest.mark.parametrize("layout", ["mask", "jagged"])
def test_opcheck(layout):
    a = _problem(("dice", True, layout, (5, 3), 2))
    args = tuple(t.requires_grad_(True) if n in ACTIVATION_GRAD_ARGS and t is not None else t
                 for n, t in a.items() if n != "value")
    torch.library.opcheck(torch.ops.attnkern.activation_unit_scores_fwd.default, args)


@needs_cpu
def test_torch_compile_fullgraph():
    from test_backends import assert_compiles_fullgraph

    a = _problem(("prelu", True, "jagged", (6,), 2))
    (q, k, _, weights), kw = testing.to_public(a)

    def f(q, k, w1):
        return attnkern.activation_unit_weights(q, k, [(w1, weights[0][1])] + list(weights[1:]), **kw,
                                                backend="cpu")

    assert_compiles_fullgraph(f, (q, k, weights[0][0]))


@needs_cpu
@pytest.mark.parametrize("softmax", [False, True])
def test_no_position_at_all(softmax):
    """L = 0 (padded) and T = 0 (jagged): empty weights, lse of empty rows, zero gradients."""
    E = 3
    layers = [(torch.randn(4, 4 * E), torch.randn(4)), (torch.randn(1, 4), torch.randn(1))]
    normalize = "softmax" if softmax else None
    for key, kw in ((torch.randn(2, 0, E), dict(lengths=torch.zeros(2, dtype=torch.long))),
                    (torch.randn(0, E), dict(offsets=torch.zeros(3, dtype=torch.long)))):
        q = torch.randn(2, 2, E, requires_grad=True)
        k = key.requires_grad_(True)
        w = attnkern.activation_unit_weights(q, k, layers, **kw, normalize=normalize, backend="cpu")
        assert w.shape == attnkern.activation_unit_weights(q, k, layers, **kw, normalize=normalize,
                                                           backend="reference").shape
        gq, = torch.autograd.grad(w.sum(), [q], allow_unused=True)
        assert gq is None or (gq == 0).all()
        args = (q, k, kw.get("lengths"), None, kw.get("offsets"), -1, *layers[0], None, None, *layers[1],
                None, None, "relu", softmax)
        _, lse = torch.ops.attnkern.activation_unit_scores_fwd(*args)
        assert (lse == (float("-inf") if softmax else 0.0)).all()


@needs_cpu
def test_cpp_schema_matches_the_declaration():
    """The C++ op's schema is the Python declaration the Triton op and the fake impl use."""
    schema = str(torch.ops.attnkern.activation_unit_scores_fwd.default._schema)
    assert schema == "attnkern::" + SCORES_OP + ACTIVATION_SCORES_SCHEMAS[SCORES_OP]


@needs_cpu
def test_raw_op_checks_its_inputs():
    a = _problem(CASES[0])
    args = dict((n, v) for n, v in a.items() if n != "value")
    args["key"] = args["key"][..., :-1]
    with pytest.raises(ValueError, match="key"):
        torch.ops.attnkern.activation_unit_scores_fwd(*args.values())


@needs_cpu
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_dice_with_batch_statistics(layout):
    """Dice in training mode: statistics from attnkern.dice_batch_statistics, folded by
    dice_params into the activation parameters, differentiated through the fused weights."""
    a = _problem(("dice", True, layout, (6, 3), 2), dtype=torch.float64)
    (q, k, _, weights), kw = testing.to_public(a)
    kw.pop("activation_params")
    alphas = [a["act1"][0], a["act2"][0]]
    mask_kw = {n: kw[n] for n in ("lengths", "mask", "offsets", "max_length") if n in kw}

    def f(backend, q, k, w1):
        layers = [(w1, weights[0][1])] + list(weights[1:])
        stats = dice_batch_statistics(q, k, layers, **mask_kw, dice_alpha=alphas)
        params = [dice_params(al, m, v, 1e-8) for al, (m, v, _) in zip(alphas, stats)]
        return attnkern.activation_unit_weights(q, k, layers, **kw, activation_params=params, backend=backend)

    xs = [t.detach().clone().requires_grad_(True) for t in (q, k, weights[0][0])]
    ys = [t.detach().clone().requires_grad_(True) for t in xs]
    got, want = f("cpu", *xs), f("reference", *ys)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for x, y in zip(torch.autograd.grad(got, xs, grad), torch.autograd.grad(want, ys, grad)):
        torch.testing.assert_close(x, y)


@pytest.mark.slow
@needs_cpu
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_isa_path_matches(isa):
    """The scores pass on the narrower instruction sets' kernels (ATTNKERN_CPU_ISA, chosen once
    per process); the widest this CPU has (avx512 on AVX-512 machines, which avx512_bf16 and amx
    also run for this op) is the other tests' in-process default. 40 units leave a column panel
    of one vector next to a full one."""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "from test_activation_unit_weights import check_weights, _problem\n"
        "for case in (('dice', True, 'jagged', (7, 3), 2), ('relu', False, 'mask', (40,), 2)):\n"
        "    for dt in (torch.float32, torch.bfloat16):\n"
        "        check_weights('cpu', _problem(case, dtype=dt, L=60))\n"
        "print('ok')\n" % os.path.dirname(os.path.abspath(__file__))
    )
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---- the Triton kernels (interpreter on CPU) and the CUDA kernels (GPU or emulation) ------------

TRITON_CASES = [CASES[1], CASES[2], CASES[5], CASES[6]]


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_triton_matches_reference(backend, case):
    if not attnkern.backends()["triton"].available:
        pytest.skip(attnkern.backends()["triton"].reason)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = _problem(case, device=device, B=3, L=20)
    check_weights(backend, a)
    _lse_matches_the_pool(backend, a)


@pytest.mark.skipif(CUDA_DEVICE is None, reason="no CUDA GPU (and not the CUDA emulation build)")
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_cuda_matches_reference(case):
    # Through the emulation every thread is a fiber: three rows of two key tiles keep it short.
    a = _problem(case, device=CUDA_DEVICE, B=3, L=20)
    check_weights("cuda", a)
    _lse_matches_the_pool("cuda", a)
