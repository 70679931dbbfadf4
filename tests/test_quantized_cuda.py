"""Quantized keys and values on the "cuda" backend against the reference over dequantized rows
(docs/quantized.md): int8 / uint8 / float8_e4m3fn / float8_e5m2, every layout, N = 1 and two
query groups, shared K/V heads (folded by the wrapper), odd and large head dims, the score bias
with -inf entries, empty rows, rows whose scale is 0, extreme scales, the NaN rules, strided
(FBGEMM fused) rows, and opcheck.

Runs on a GPU, or on CPU tensors in the CUDA emulation build (scripts/cuda_emu.sh, where every
access is checked: tiny shapes); skips elsewhere.
"""

import pytest
import torch

from attnkern.testing import make_problem
from conftest import CUDA_DEVICE, cuda_op, needs_cuda_backend, on_cuda_device
from test_quantized import (assert_matches, check_empty_and_zero_scale_rows_and_extremes,
                            check_non_finite_rules, check_strided_rows_and_fused_layout, quantized, run)

pytestmark = needs_cuda_backend


def run_cuda(q, kd, vd, params, kw, **extra):
    """The cuda backend's (out, lse) of CPU inputs, run on CUDA_DEVICE and brought back."""
    dq, dk, dv, dp, dkw, dextra = on_cuda_device(q, kd, vd, params, kw, extra)
    return tuple(t.cpu() for t in run("cuda", dq, dk, dv, dp, dkw, **dextra))


def both(q, kd, vd, params, kw, **extra):
    """(the cuda backend's (out, lse), brought back; the reference's on the CPU)."""
    return run_cuda(q, kd, vd, params, kw, **extra), run("reference", q, kd, vd, params, kw, **extra)


@pytest.mark.parametrize("qdtype,layout", [(torch.int8, "lengths"), (torch.uint8, "mask"),
                                           (torch.float8_e4m3fn, "jagged"), (torch.float8_e5m2, "full")])
def test_cuda_quant_matches_reference(qdtype, layout):
    # (N, H, Hkv, Dk, Dv, dtype): one query a warp; two query groups with shared heads and odd
    # dims; the largest head bucket (two vectors a lane).
    for N, H, Hkv, Dk, Dv, dtype in ((1, 1, 1, 16, 16, torch.float32), (5, 4, 2, 7, 19, torch.bfloat16),
                                     (2, 1, 1, 130, 33, torch.float16)):
        args, kw = make_problem(B=4, N=N, H=H, Hkv=Hkv, L=21, Dk=Dk, Dv=Dv, layout=layout, seed=N)
        q, kd, vd, params = quantized(args, kw, qdtype, bias_free=N == 5)
        assert_matches(*both(q.to(dtype), kd, vd, params, kw), dtype)


@pytest.mark.parametrize("kind,N,H,Hkv,layout", [("shared", 1, 2, 2, "jagged"), ("per_query", 5, 4, 2, "mask")])
def test_cuda_quant_score_bias(kind, N, H, Hkv, layout):
    args, kw = make_problem(B=3, N=N, H=H, Hkv=Hkv, L=17, Dk=8, Dv=8, layout=layout, bias=kind,
                            bias_heads=1 if N == 1 else H, seed=3)
    q, kd, vd, params = quantized(args, kw, torch.int8)
    bias = args[3]
    bias.view(-1)[::7] = float("-inf")  # dropped positions
    assert_matches(*both(q, kd, vd, params, kw, bias=bias), torch.float32)


def test_cuda_quant_empty_zero_scale_and_extreme_rows():
    check_empty_and_zero_scale_rows_and_extremes(run_cuda)


@pytest.mark.parametrize("qdtype", [torch.uint8, torch.float8_e4m3fn])
def test_cuda_quant_non_finite_rules(qdtype):
    check_non_finite_rules(run_cuda, qdtype)


def test_cuda_quant_strided_fused_rows():
    check_strided_rows_and_fused_layout(run_cuda)


def test_cuda_quant_opcheck():
    args, kw = make_problem(B=2, N=3, H=2, L=9, Dk=4, Dv=4, layout="lengths")
    q, kd, vd, p = on_cuda_device(*quantized(args, kw, torch.int8))
    (lengths,) = on_cuda_device(kw["lengths"])
    torch.library.opcheck(cuda_op("attention_pool_quant_fwd").default,
                          (q, kd, vd, p["key_scale"], p["key_bias"], p["value_scale"], p["value_bias"],
                           lengths, None, None, -1, 0.5), test_utils=("test_schema", "test_faketensor"))
