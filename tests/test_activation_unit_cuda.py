"""The activation unit's CUDA kernels (csrc/cuda/activation_unit_*.cu) against the reference:
their registration wherever they are built, and forward and every gradient on CUDA tensors with a
GPU, or on CPU tensors through the harness of csrc/cuda_emu in the CUDA emulation build
(scripts/cuda_emu.sh; tests/conftest.py CUDA_DEVICE)."""

import pytest
import torch

from activation_unit_cases import bad, check_backend, cover
from attnkern.ops.availability import cuda_kernels_built
from attnkern.reference import activation_unit_pool_ref
from attnkern.testing import random_activation_problem
from conftest import CUDA_DEVICE, cuda_op, needs_cuda_backend


def _problem(**kw):
    """A problem on CUDA_DEVICE. Through the emulation (CPU tensors) rows, queries and positions
    are cut to what still takes every path (two key tiles a row, N > 1, an empty row from the
    generator's lengths): there every thread is a fiber and every access is checked."""
    if CUDA_DEVICE == "cpu":
        kw.update(B=min(kw["B"], 3), N=min(kw["N"], 2), L=min(kw["L"], 20))
    return random_activation_problem(device=CUDA_DEVICE, **kw)


@pytest.mark.skipif(not cuda_kernels_built(), reason="attnkern._C was built without CUDA kernels")
def test_cuda_kernels_registered():
    for op in ("attnkern::activation_unit_pool_fwd", "attnkern::activation_unit_pool_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def _cover_cuda():
    return [pytest.param(*c.values[:2], (80, 40) if len(c.values[2]) == 2 else (5,), c.values[3],
                         dt, id=c.id.replace("-two-", "-80x40-") + "-" + name)
            for c in cover() for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))]


@needs_cuda_backend
@pytest.mark.parametrize("layout,activation,units,softmax,dtype", _cover_cuda())
def test_cuda_kernels_match_reference(layout, activation, units, softmax, dtype):
    a = _problem(B=7, N=3, L=70, E=13, Dv=9, units=units, activation=activation, softmax=softmax,
                 layout=layout, dtype=dtype, seed=14)
    check_backend("cuda", a)


@needs_cuda_backend
@pytest.mark.parametrize("E,Dv,units", [(256, 256, (256,)), (130, 7, (256, 256)), (64, 64, (64,))],
                         ids=["wide-unstaged", "odd-two-wide", "bench"])
def test_cuda_kernels_wide_layers(E, Dv, units):
    """Layers whose M_q does not fit in shared memory (recomputed from W1), odd E, and the
    vectorised key loads (E = 64)."""
    a = _problem(B=5, N=2, L=40, E=E, Dv=Dv, units=units, activation="dice", softmax=True,
                 layout="jagged", seed=16)
    check_backend("cuda", a)


@needs_cuda_backend
@pytest.mark.parametrize("layout,softmax", [("mask", False), ("jagged", True)])
def test_cuda_shared_keys_and_values(layout, softmax):
    a = _problem(B=6, N=2, L=40, E=64, Dv=64, units=(80, 40), activation="prelu",
                 softmax=softmax, layout=layout, seed=18, shared_value=True)
    check_backend("cuda", a)


@needs_cuda_backend
def test_cuda_input_checks_and_clamping():
    a = _problem(B=3, N=1, L=4, E=2, Dv=2, units=(3,), activation="relu", softmax=False,
                 layout="lengths", seed=9)
    op = cuda_op("activation_unit_pool_fwd")
    with pytest.raises(ValueError, match="w1 must be"):
        op(*bad(a, w1=a["w1"][:, :-1]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        op(*bad(a, lengths=a["lengths"][:1]))
    a["lengths"] = torch.tensor([9, -3, 2], dtype=torch.int32, device=CUDA_DEVICE)
    out, _ = op(*a.values())
    b = dict(a, lengths=torch.tensor([4, 0, 2], dtype=torch.int32, device=CUDA_DEVICE))
    want, _ = activation_unit_pool_ref(*b.values())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
