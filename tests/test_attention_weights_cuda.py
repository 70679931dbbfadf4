"""attnkern.attention_weights on the "cuda" backend (csrc/cuda/attention_weights_*): every layout,
N > 1 across query groups, shared K/V heads, the score bias, float32 / bfloat16 / float16,
exact zeros and unit sums, non-finite logits as the reference, the op's lse, never-read padding,
the gradients (attnkern/ops/weights.py's autograd over the CUDA op's weights) through the
suite's checking body, and opcheck.

Runs on a GPU, or on CPU tensors in the CUDA emulation build (scripts/cuda_emu.sh, where every
access is checked: tiny shapes); skips elsewhere.
"""

import pytest
import torch

import attnkern
from attnkern import testing
from attnkern.ops.schemas import WEIGHTS_OPS
from conftest import CUDA_DEVICE, cuda_op, make_problem, needs_cuda_backend, on_cuda_device
from test_attention_weights import _check, _op_args, _row_sums, _valid, _weights

pytestmark = needs_cuda_backend


def on_device(args, kw):
    *args, kw = on_cuda_device(*args, kw)
    return args, kw


@pytest.mark.parametrize("layout,N,H,Hkv,bias,Hb", [("lengths", 5, 4, 2, "shared", 1),
                                                    ("jagged", 2, 2, 1, "per_query", 2),
                                                    ("mask", 1, 2, 2, None, 1)])
def test_cuda_weights_against_the_reference(layout, N, H, Hkv, bias, Hb):
    # Forward and every gradient, on CUDA_DEVICE's tensors.
    args, kw = make_problem(B=3, N=N, H=H, Hkv=Hkv, L=13, Dk=7, Dv=5, layout=layout, bias=bias,
                            bias_heads=Hb, device=CUDA_DEVICE)
    _check("cuda", args, kw)


@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "full"), (torch.float16, "jagged")])
def test_cuda_weights_dtypes(dtype, layout):
    args, kw = make_problem(B=3, N=2, H=2, Hkv=1, L=11, Dk=40, Dv=3, dtype=dtype, layout=layout,
                            bias="per_query", bias_heads=2, device=CUDA_DEVICE)
    w = _weights("cuda", args, kw)
    assert w.dtype == torch.float32
    want = _weights("reference", *on_cpu(args, kw))
    torch.testing.assert_close(w.cpu(), want, atol=1e-6, rtol=1e-5)


def on_cpu(args, kw):
    return ([t.cpu() for t in args],
            {n: t.cpu() if isinstance(t, torch.Tensor) else t for n, t in kw.items()})


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_cuda_weights_exact_zeros_sums_and_non_finite(layout):
    B, N, H = 5, 2, 2
    args, kw = make_problem(B=B, N=N, H=H, Hkv=1, L=9, Dk=4, Dv=1, layout=layout, bias="per_query",
                            bias_heads=H, magnitude=30.0)
    bias = args[3]
    if layout == "jagged":
        o = kw["offsets"].long()
        bias[o[2]:o[3]] = float("-inf")  # row 2: every position dropped
    else:
        bias[2] = float("-inf")
    w = _weights("cuda", *on_device(args, kw)).cpu()
    valid = _valid(args[1], kw, N, H)
    assert torch.isfinite(w).all() and (w[~valid] == 0).all()
    sums = _row_sums(w, kw)
    _, lse = attnkern.attention_pool(*args[:3], **kw, bias=bias, return_lse=True, backend="reference")
    empty = torch.isneginf(lse)
    assert empty[2].all() and (sums[empty] == 0).all()
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]), atol=1e-6, rtol=0)
    # A NaN logit makes its row NaN, +inf gives NaN there and 0 elsewhere: the reference's.
    if layout == "jagged":
        bias[o[1], 0, 0], bias[o[3] + 1, 1, 1] = float("nan"), float("inf")
    else:
        bias[1, 0, 0, 0], bias[3, 1, 1, 1] = float("nan"), float("inf")
    got, want = _weights("cuda", *on_device(args, kw)).cpu(), _weights("reference", args, kw)
    assert got.isnan().any()
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["mask", "jagged"])
def test_cuda_weights_op_lse_padding_and_opcheck(layout):
    op_args, args, kw = _op_args(layout, bias="shared", L=9)
    unused = testing.unused_positions(args[1], kw)
    poisoned = list(op_args)
    poisoned[1] = op_args[1].clone()
    poisoned[1][unused] = float("nan")  # never read
    op_args, poisoned = on_cuda_device(*op_args), on_cuda_device(*poisoned)
    op = cuda_op(WEIGHTS_OPS["jagged" if "offsets" in kw else "padded"])
    w, lse = op(*op_args)
    _, want = attnkern.attention_pool(*args[:3], **kw, bias=args[3], return_lse=True, backend="reference")
    torch.testing.assert_close(lse.cpu(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.cpu(), _weights("reference", args, kw), atol=1e-6, rtol=1e-5)
    assert torch.equal(op(*poisoned)[0], w)
    torch.library.opcheck(op.default, tuple(op_args))
