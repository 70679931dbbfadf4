"""The score bias on the cuda backend (docs/contract.md section 1.1): forward and every
gradient, the bias's included, against the float64 reference with the suite's tolerance rule,
for each way its gradient is gathered (per head and query, summed over the queries, over the
heads: then one warp takes every head of its positions), padded and jagged, shared K/V heads,
a float32 bias with 16-bit inputs, -inf entries and empty rows, NaN where no row reads, the
split-L paths, and the ops' results run twice being identical.

Runs on a GPU, or on CPU tensors in the CUDA emulation build (scripts/cuda_emu.sh, where
every access is checked: tiny shapes); skips elsewhere.
"""

import pytest
import torch

import attnkern
from conftest import CUDA_DEVICE, check_backend, cuda_op, make_problem, needs_cuda_backend

pytestmark = needs_cuda_backend


def _problem(layout, kind, Hb, Hkv=2, N=2, L=13, B=3, dtype=torch.float32, bias_dtype=None, **kw):
    return make_problem(B=B, N=N, H=2, Hkv=Hkv, L=L, Dk=8, Dv=8, dtype=dtype, layout=layout,
                        device=CUDA_DEVICE, bias=kind, bias_heads=Hb, bias_dtype=bias_dtype, **kw)


@pytest.mark.parametrize("layout,kind,Hb,Hkv,N", [
    ("lengths", "shared", 2, 2, 3),    # shared by the queries, per head
    ("jagged", "shared", 1, 2, 2),     # one row for every head: a warp takes all heads
    ("mask", "per_query", 2, 1, 2),    # per query and head, the heads folded into a group
    ("jagged", "per_query", 1, 2, 2),  # per query, shared by the heads
])
def test_cuda_bias_against_the_reference(layout, kind, Hb, Hkv, N):
    args, kwargs = _problem(layout, kind, Hb, Hkv=Hkv, N=N)
    check_backend("cuda", args, kwargs)


def test_cuda_bias_float32_with_half_inputs():
    args, kwargs = _problem("lengths", "shared", 2, dtype=torch.float16, bias_dtype=torch.float32)
    out, lse, grads = check_backend("cuda", args, kwargs)
    assert grads[3].dtype == torch.float32


def test_cuda_bias_minus_inf_and_unread_nan():
    (q, k, v, bias), kwargs = _problem("lengths", "shared", 2, lengths=[13, 6, 0])
    bias = bias.clone()
    bias[0, :, 4] = float("-inf")  # a dropped position
    bias[1] = float("-inf")  # every logit of row 1: an empty row
    bias[1, :, 6:] = float("nan")  # past row 1's length: never read
    out, lse, grads = check_backend("cuda", [q, k, v, bias], kwargs)
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert (grads[3][1] == 0).all() and torch.isfinite(lse[0]).all()


def test_cuda_bias_split_paths():
    # One long row: the forward and dq passes split it (the emulation plans for 4 SMs).
    args, kwargs = _problem("lengths", "per_query", 2, N=1, B=1, L=300, lengths=[290])
    check_backend("cuda", args, kwargs)


def test_cuda_bias_ops_are_deterministic():
    (q, k, v, bias), kwargs = _problem("jagged", "shared", 1, N=3)
    bias = bias.unsqueeze(1)  # the op's layout [T, Nb, Hb]
    fwd, bwd = cuda_op("jagged_attention_pool_fwd"), cuda_op("jagged_attention_pool_bwd")
    offsets = kwargs["offsets"]
    scale = q.shape[-1] ** -0.5
    out, lse = fwd(q, k, v, offsets, -1, scale, bias)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    delta = (go * out).sum(-1)
    first = bwd(go, q, k, v, offsets, -1, lse, delta, scale, bias)
    second = bwd(go, q, k, v, offsets, -1, lse, delta, scale, bias)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[3].shape == bias.shape and first[3].dtype == bias.dtype
