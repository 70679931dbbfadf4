"""The activation-unit test cases and checking body shared by the Triton tests
(test_activation_unit_triton.py) and the CUDA kernels' tests (test_activation_unit_cuda.py)."""

import pytest
import torch

from attnkern.reference import activation_unit_pool_ref
from attnkern.testing import FLOOR, LOW_PRECISION_FACTOR, check_activation_backend as check
from conftest import cuda_op

ACTS = ["relu", "sigmoid", "prelu", "dice"]
LAYOUTS = ["lengths", "mask", "jagged", "full"]
UNITS = [(5,), (7, 3)]


def to(a, dtype=None, device=None):
    return {n: (t.to(device=device or t.device,
                     dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
                if isinstance(t, torch.Tensor) else t) for n, t in a.items()}


def _err(x, y):
    return 0.0 if x.numel() == 0 else (x.double().cpu() - y.double().cpu()).abs().max().item()


def _scale(t):
    return 1.0 if t.numel() == 0 else max(1.0, t.double().abs().max().item())


def check_backend(backend, a):
    """`backend` through the public function against the float64 reference (out and every
    gradient, exact zeros on empty rows and unused positions: the shared checking body), and the
    raw op's lse: -inf exactly on empty rows with softmax, 0 without, close elsewhere."""
    ok, errors, why = check(backend, a)
    assert ok, why + " " + str({k: "%.2g" % v for k, v in errors.items()})
    op = (torch.ops.attnkern.triton_activation_unit_pool_fwd if backend == "triton"
          else cuda_op("activation_unit_pool_fwd"))
    with torch.no_grad():
        _, lse = op(*a.values())
        _, lse64 = activation_unit_pool_ref(*to(a, torch.float64, "cpu").values())
        _, lse_lp = activation_unit_pool_ref(*a.values())
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    if not a["softmax"]:
        assert (lse == 0).all()
    fin = ~empty
    allowed = (LOW_PRECISION_FACTOR * _err(lse_lp.cpu()[fin], lse64[fin])
               + FLOOR[a["query"].dtype] * _scale(lse64[fin]))
    assert _err(lse.cpu()[fin], lse64[fin]) <= allowed


def cover():
    """Every (activation, units, raw/softmax) triple once, spread so that each layout meets every
    activation and both depths and normalisations: 16 cases instead of the 64 of a product."""
    cases = []
    for ai, act in enumerate(ACTS):
        for j in range(4):
            units, softmax = UNITS[j // 2], bool(j % 2)
            layout = LAYOUTS[(ai + j) % 4]
            ident = "%s-%s-%s-%s" % (layout, act, "two" if len(units) == 2 else "one",
                                     "softmax" if softmax else "raw")
            cases.append(pytest.param(layout, act, units, softmax, id=ident))
    return cases


def bad(a, **changes):
    """The op's positional arguments of problem `a` with some replaced."""
    b = dict(a)
    b.update(changes)
    return list(b.values())
