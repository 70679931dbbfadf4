"""The CUDA build: when attnkern._C was compiled with CUDA, every op has a CUDA kernel.

Runs without a GPU (CI builds and links the CUDA kernels on a GPU-less host); the numerical
checks of the "cuda" backend live in the shared property suite, which runs them on CUDA
tensors when a GPU is present (on CPU tensors in the CUDA emulation build, scripts/cuda_emu.sh).
The kernel tests here cover only what the shared suite can't reach through the public API:
direct op calls with malformed lengths/offsets (clamped on the device, see RowSpec in
csrc/cuda/attention_pool_kernels.h; docs/contract.md section 3) and the CUDA-only dtype rule.
"""

import pytest
import torch

from attnkern.ops.availability import extension
from conftest import CUDA_DEVICE, cuda_op

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


@pytest.fixture
def gpu():
    """The device of the cuda backend's kernels: skips unless they run here (a GPU, or the CUDA
    emulation build)."""
    if CUDA_DEVICE is None:
        pytest.skip("no CUDA GPU (and not the CUDA emulation build)")
    return CUDA_DEVICE


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


def test_out_of_range_lengths_are_clamped(gpu):
    torch.manual_seed(0)
    B, N, H, L, D = 4, 3, 2, 37, 40
    dev = gpu
    q = torch.randn(B, N, H, D, device=dev)
    k = torch.randn(B, L, H, D, device=dev)
    v = torch.randn(B, L, H, D, device=dev)
    lengths = torch.tensor([-5, 0, 1000, 17], device=dev)
    out, lse = cuda_op("attention_pool_fwd")(q, k, v, lengths, None, D**-0.5)
    clamped = lengths.clamp(0, L)
    valid = torch.arange(L, device=dev)[None, :] < clamped[:, None]
    ref_out, ref_lse = _ref_padded(q, k, v, valid, D**-0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)

    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    dq, dk, dv, _ = cuda_op("attention_pool_bwd")(
        go, q, k, v, lengths, None, lse, delta, D**-0.5
    )
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:2] == 0).all() and (dk[:2] == 0).all() and (dv[:2] == 0).all()
    assert (dk[3, 17:] == 0).all() and (dv[3, 17:] == 0).all()


def test_malformed_offsets_stay_in_bounds(gpu):
    torch.manual_seed(0)
    B, N, H, D, T = 4, 2, 1, 16, 20
    dev = gpu
    q = torch.randn(B, N, H, D, device=dev, dtype=torch.float16)
    k = torch.randn(T, H, D, device=dev, dtype=torch.float16)
    v = torch.randn(T, H, D, device=dev, dtype=torch.float16)
    offsets = torch.tensor([-3, 8, 5, 500, 10**9], device=dev)
    out, lse = cuda_op("jagged_attention_pool_fwd")(q, k, v, offsets, -1, 0.25)
    assert torch.isfinite(out).all()
    # Row 1 is [8, 8) after clamping (end clamped up to its start): empty.
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


def test_float64_is_a_type_error(gpu):
    q = torch.randn(1, 1, 1, 4, device=gpu, dtype=torch.float64)
    k = torch.randn(1, 3, 1, 4, device=gpu, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        cuda_op("attention_pool_fwd")(q, k, k, None, None, 0.5)


@pytest.mark.parametrize("layout", ["lengths", "mask"])
def test_split_l_long_rows_match_reference(gpu, layout):
    # One row, one head: the launcher splits L and merges partials (fwd) / partial dq (bwd).
    torch.manual_seed(0)
    B, N, H, L, D = 1, 2, 1, 1500, 64
    q = torch.randn(B, N, H, D, device=gpu)
    k = torch.randn(B, L, H, D, device=gpu)
    v = torch.randn(B, L, H, D, device=gpu)
    if layout == "lengths":
        lengths, mask = torch.tensor([1234], device=gpu), None
        valid = torch.arange(L, device=gpu)[None, :] < 1234
    else:
        lengths, mask = None, torch.rand(B, L, device=gpu) > 0.3
        valid = mask
    scale = D**-0.5
    out, lse = cuda_op("attention_pool_fwd")(q, k, v, lengths, mask, scale)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = _ref_padded(q64, k64, v64, valid, scale)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-4)

    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    grads = cuda_op("attention_pool_bwd")(go, q, k, v, lengths, mask, lse, delta, scale)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), go.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert (grads[1][~valid] == 0).all() and (grads[2][~valid] == 0).all()
