"""The activation-unit reference against the float64 loop oracle (explicit concatenation)."""

import pytest
import torch

from attnkern.ops.schemas import ACTIVATION_GRAD_ARGS as GRAD_ARGS
from attnkern.reference import activate, activation_unit_pool_ref, dice_params
from attnkern.testing import activation_loop_oracle as loop_oracle, random_activation_problem

ACTS = ["relu", "sigmoid", "prelu", "dice"]


def _leaves(a):
    a = dict(a)
    for n in GRAD_ARGS:
        if a[n] is not None:
            a[n] = a[n].detach().clone().requires_grad_(True)
    return a


def _grads(a, out, grad_out):
    names = [n for n in GRAD_ARGS if a[n] is not None]
    gs = torch.autograd.grad(out, [a[n] for n in names], grad_out, allow_unused=True)
    return {n: (torch.zeros_like(a[n]) if g is None else g) for n, g in zip(names, gs)}


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged", "full"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("units", [(5,), (7, 3)], ids=["one", "two"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_reference_matches_loop_oracle(layout, activation, units, softmax):
    a = random_activation_problem(B=5, N=2, L=6, E=3, Dv=4, units=units, activation=activation,
                                  softmax=softmax, layout=layout, dtype=torch.float64, seed=3)
    a = _leaves(a)
    out, lse = activation_unit_pool_ref(*a.values())
    want, want_lse = loop_oracle(a)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    assert lse.dtype == torch.float64
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[fin], want_lse[fin], atol=1e-12, rtol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _grads(a, out, g)
    ref = _grads(a, want, g)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], atol=1e-11, rtol=1e-10, msg=n)


@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_reference_empty_rows_and_unused_positions(softmax):
    """Empty rows give 0 and zero gradients; NaN at unused positions reaches nothing."""
    a = random_activation_problem(B=5, N=1, L=6, E=4, Dv=3, units=(8,), activation="dice",
                                  softmax=softmax, layout="lengths", dtype=torch.float64)
    lengths = a["lengths"].long()
    unused = torch.arange(6)[None, :] >= lengths[:, None]
    a["key"] = a["key"].masked_fill(unused[..., None], float("nan"))
    a["value"] = a["value"].masked_fill(unused[..., None], float("inf"))
    a = _leaves(a)
    out, lse = activation_unit_pool_ref(*a.values())
    assert torch.isfinite(out).all()
    empty = lengths == 0
    assert (out[empty] == 0).all()
    if softmax:
        assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    gr = _grads(a, out, torch.ones_like(out))
    for n, g in gr.items():
        assert torch.isfinite(g).all(), n
    assert (gr["key"][unused] == 0).all() and (gr["value"][unused] == 0).all()
    assert (gr["query"][empty] == 0).all()


def test_dice_params_fold_batchnorm():
    """dice_params folds an eval-mode BatchNorm1d into (alpha, scale, shift)."""
    g = torch.Generator().manual_seed(0)
    bn = torch.nn.BatchNorm1d(6, eps=1e-5).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
        bn.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        bn.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    alpha = torch.rand(6, generator=g, dtype=torch.float64)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    p = torch.sigmoid(bn(x))
    want = p * x + alpha * (1 - p) * x
    d = dice_params(alpha, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    torch.testing.assert_close(activate(x, "dice", d), want, atol=1e-13, rtol=1e-13)
