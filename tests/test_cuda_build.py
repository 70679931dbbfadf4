"""The CUDA build: when attnkern._C was compiled with CUDA, every op has a CUDA kernel.

Runs without a GPU (CI builds and links the CUDA kernels on a GPU-less host); the numerical
checks of the "cuda" backend live in the shared property suite, which runs them on CUDA
tensors when a GPU is present. The GPU tests here cover only what the shared suite can't
reach through the public API: direct op calls with malformed lengths/offsets (clamped on the
device, SPEC section 3) and the CUDA-only dtype rule.
"""

import pytest
import torch

from attnkern._backends import extension

OPS = (
    "attention_pool_fwd",
    "attention_pool_bwd",
    "jagged_attention_pool_fwd",
    "jagged_attention_pool_bwd",
)


def _built_with_cuda() -> bool:
    mod, _ = extension()
    return mod is not None and bool(mod.built_with_cuda())


needs_cuda_build = pytest.mark.skipif(
    not _built_with_cuda(), reason="attnkern._C was built without the CUDA kernels"
)
needs_gpu = pytest.mark.skipif(
    not (_built_with_cuda() and torch.cuda.is_available()), reason="needs the CUDA kernels and a CUDA GPU"
)


@needs_cuda_build
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    dump = torch._C._dispatch_dump("attnkern::" + op)
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA:")]
    assert cuda_lines, "no CUDA kernel registered for attnkern::%s:\n%s" % (op, dump)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("attnkern::" + op, "CUDA")


def _ref_padded(q, k, v, valid, scale):
    # float64 oracle on explicit validity [B, L]: q [B, N, H, Dk], k [B, L, H, Dk].
    s = torch.einsum("bnhd,blhd->bnhl", q.double(), k.double()) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bnhl,blhd->bnhd", p, v.double())
    return out, lse


@needs_gpu
def test_out_of_range_lengths_are_clamped():
    torch.manual_seed(0)
    B, N, H, L, D = 4, 3, 2, 37, 40
    dev = "cuda"
    q = torch.randn(B, N, H, D, device=dev)
    k = torch.randn(B, L, H, D, device=dev)
    v = torch.randn(B, L, H, D, device=dev)
    lengths = torch.tensor([-5, 0, 1000, 17], device=dev)
    out, lse = torch.ops.attnkern.attention_pool_fwd(q, k, v, lengths, None, D**-0.5)
    clamped = lengths.clamp(0, L)
    valid = torch.arange(L, device=dev)[None, :] < clamped[:, None]
    ref_out, ref_lse = _ref_padded(q, k, v, valid, D**-0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)

    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    dq, dk, dv = torch.ops.attnkern.attention_pool_bwd(go, q, k, v, lengths, None, lse, delta, D**-0.5)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:2] == 0).all() and (dk[:2] == 0).all() and (dv[:2] == 0).all()
    assert (dk[3, 17:] == 0).all() and (dv[3, 17:] == 0).all()


@needs_gpu
def test_malformed_offsets_stay_in_bounds():
    torch.manual_seed(0)
    B, N, H, D, T = 4, 2, 1, 16, 20
    dev = "cuda"
    q = torch.randn(B, N, H, D, device=dev, dtype=torch.float16)
    k = torch.randn(T, H, D, device=dev, dtype=torch.float16)
    v = torch.randn(T, H, D, device=dev, dtype=torch.float16)
    offsets = torch.tensor([-3, 8, 5, 500, 10**9], device=dev)
    out, lse = torch.ops.attnkern.jagged_attention_pool_fwd(q, k, v, offsets, -1, 0.25)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # Row 1 is [8, 8) after clamping (end clamped up to its start): empty.
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@needs_gpu
def test_float64_is_a_type_error():
    q = torch.randn(1, 1, 1, 4, device="cuda", dtype=torch.float64)
    k = torch.randn(1, 3, 1, 4, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.attnkern.attention_pool_fwd(q, k, k, None, None, 0.5)
