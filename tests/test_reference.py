"""The reference against independent oracles: a per-row float64 loop and PyTorch's SDPA."""

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern.reference import attention_pool_ref
from attnkern.testing import loop_oracle, make_problem


@pytest.mark.parametrize("layout", ["lengths", "mask", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_loop_oracle(layout, dtype):
    args, kw = make_problem(B=5, N=2, H=2, L=9, Dk=5, Dv=3, layout=layout, dtype=dtype)
    q, k, v = args
    out, lse = attention_pool_ref(q, k, v, kw.get("lengths"), mask=kw.get("mask"), scale=0.7)
    want_out, want_lse = loop_oracle(q, k, v, kw, 0.7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.double()[fin], want_lse[fin], atol=1e-5, rtol=1e-6)


def test_reference_jagged_matches_loop_oracle():
    args, kw = make_problem(B=4, N=3, H=1, L=7, Dk=4, Dv=6, layout="jagged", dtype=torch.float64)
    q, k, v = args
    out, lse = attention_pool_ref(q, k, v, offsets=kw["offsets"])
    want_out, want_lse = loop_oracle(q, k, v, kw, 0.5)
    torch.testing.assert_close(out, want_out)


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged", "full"])
def test_loop_oracle_gradients_match_autograd_of_the_reference(layout):
    # The oracle the reference backend is checked against has its own backward: it must agree
    # with autograd through the reference in float64.
    args, kw = make_problem(B=5, N=2, H=2, L=9, Dk=5, Dv=3, layout=layout, dtype=torch.float64)
    go = torch.randn(5, 2, 2, 3, dtype=torch.float64)
    leaves = [a.clone().requires_grad_() for a in args]
    out, _ = attention_pool_ref(*leaves, kw.get("lengths"), mask=kw.get("mask"),
                                offsets=kw.get("offsets"), scale=0.7)
    want = torch.autograd.grad(out, leaves, go)
    got = loop_oracle(*args, kw, 0.7, go)
    torch.testing.assert_close(got[0], out.detach())
    for g, w in zip(got[2:], want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("N", [1, 4])
def test_reference_matches_sdpa_with_bool_mask(N):
    B, H, L, D = 6, 2, 17, 8
    args, kw = make_problem(B=B, N=N, H=H, L=L, Dk=D, Dv=D, layout="mask",
                            lengths=[17, 3, 9, 1, 17, 12])
    q, k, v = args
    mask = kw["mask"]
    mask[:, 0] = True  # SDPA gives NaN on fully masked rows; compare on non-empty rows
    out = attnkern.attention_pool(q, k, v, mask=mask, backend="reference")
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
    ).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def test_reference_gradients_match_sdpa():
    B, N, H, L, D = 4, 3, 2, 10, 6
    args, kw = make_problem(B=B, N=N, H=H, L=L, Dk=D, Dv=D, layout="lengths",
                            lengths=[10, 4, 1, 7], dtype=torch.float64)
    lengths = kw["lengths"]
    mask = torch.arange(L)[None, :] < lengths[:, None].long()
    a = [t.clone().requires_grad_() for t in args]
    b = [t.clone().requires_grad_() for t in args]
    go = torch.randn(B, N, H, D, dtype=torch.float64)
    out = attnkern.attention_pool(*a, lengths, backend="reference")
    (out * go).sum().backward()
    sd = F.scaled_dot_product_attention(*[t.transpose(1, 2) for t in b],
                                        attn_mask=mask[:, None, None, :]).transpose(1, 2)
    (sd * go).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


def test_empty_rows_give_zero_and_minus_inf_without_nan_gradients():
    args, kw = make_problem(B=3, N=2, H=1, L=4, Dk=3, Dv=3, layout="mask", lengths=[0, 0, 0])
    leaves = [a.requires_grad_() for a in args]
    out, lse = attnkern.attention_pool(*leaves, **kw, return_lse=True, backend="reference")
    assert (out == 0).all() and torch.isneginf(lse).all()
    (out.sum() + lse.clamp_min(-1).sum()).backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all() and (x.grad == 0).all()


def test_huge_logits_reference_is_finite_and_exact():
    q = torch.tensor([[[100.0, 0.0]]])  # [B=1, H=1, Dk=2]
    k = torch.tensor([[[[100.0, 0.0]], [[-100.0, 0.0]], [[99.0, 0.0]]]])  # logits ~ +-1e4 with scale 1
    v = torch.tensor([[[[1.0]], [[2.0]], [[3.0]]]])
    q.requires_grad_()
    out, lse = attnkern.attention_pool(q, k, v, scale=1.0, return_lse=True, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, torch.tensor([[[1.0]]]))  # e^-100 is below float32 eps
    torch.testing.assert_close(lse, torch.tensor([[1.0e4]]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_low_precision_accumulates_in_float32():
    torch.manual_seed(0)
    B, L, D = 2, 4096, 64
    q = torch.randn(B, 1, D, dtype=torch.float16)
    k = torch.randn(B, L, 1, D, dtype=torch.float16)
    v = torch.randn(B, L, 1, D, dtype=torch.float16)
    out = attention_pool_ref(q.unsqueeze(1), k, v)[0]
    ref = attention_pool_ref(q.unsqueeze(1).double(), k.double(), v.double())[0]
    assert out.dtype == torch.float16
    # float16 accumulation over 4096 terms would be far off; float32 accumulation is not.
    assert (out.double() - ref).abs().max() < 2e-3
