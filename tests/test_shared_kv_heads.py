"""Shared K/V heads (SDPA's enable_gqa: key/value with Hkv heads, query head h using K/V head
h // (H // Hkv)) and key_padding_mask, on every available backend against the float64
reference, which is itself checked against the loop oracle (attnkern.testing)."""

import pytest
import torch

import attnkern
from conftest import backend_device_pairs, check_backend, make_problem

BACKENDS = backend_device_pairs()
# The layout x heads grid through Triton's interpreter takes minutes on 2 cores: slow there.
BACKENDS_GRID = backend_device_pairs(interpreter_slow=True)
LAYOUTS = ["lengths", "mask", "key_padding_mask", "jagged", "full"]
# (H, Hkv): pairs, one K/V head for all, an odd group, plain multi-head for contrast
HEADS = [(2, 1), (4, 2), (3, 1), (2, 2)]


def _problem(layout, H, Hkv, N=2, dtype=torch.float32, device="cpu", **kw):
    base = "mask" if layout == "key_padding_mask" else layout
    args, kwargs = make_problem(B=5, N=N, H=H, Hkv=Hkv, L=19, Dk=8, Dv=6, dtype=dtype,
                                layout=base, device=device, **kw)
    if layout == "key_padding_mask":
        kwargs = {"key_padding_mask": ~kwargs["mask"]}
    return args, kwargs


@pytest.mark.parametrize("backend,device", BACKENDS_GRID)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("N", [1, 3])
def test_shared_heads_against_the_reference(backend, device, layout, H, Hkv, N):
    args, kwargs = _problem(layout, H, Hkv, N=N, device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shared_heads_low_precision(backend, device, dtype):
    args, kwargs = _problem("lengths", 4, 1, dtype=dtype, device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_shared_heads_equal_repeated_heads(backend, device, layout):
    """Against per-head copies of K/V (what a backend must not do, used here as the oracle):
    the outputs agree and the shared head's gradient is the sum over its group."""
    H, Hkv = 4, 2
    args, kwargs = _problem(layout, H, Hkv, device=device)
    q, k, v = [a.detach().requires_grad_(True) for a in args]
    go = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(3))
    out = attnkern.attention_pool(q, k, v, **kwargs, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.to(device))
    k_rep, v_rep = (x.repeat_interleave(H // Hkv, dim=-2) for x in (k, v))
    out_rep = attnkern.attention_pool(q, k_rep, v_rep, **kwargs, backend=backend)
    dq_r, dk_r, dv_r = torch.autograd.grad(out_rep, (q, k, v), go.to(device))
    for got, want in ((out, out_rep), (dq, dq_r), (dk, dk_r), (dv, dv_r)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] in ("reference", "cpu")])
def test_shared_heads_gradcheck_float64(backend, device):
    args, kwargs = _problem("lengths", 4, 2, N=2, dtype=torch.float64, device=device)
    inputs = [a.detach().requires_grad_(True) for a in args]

    def fn(q, k, v):
        return attnkern.attention_pool(q, k, v, **kwargs, backend=backend)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_shared_heads_three_dim_query_and_lse(backend, device):
    args, kwargs = make_problem(B=4, N=1, H=4, Hkv=1, L=11, Dk=8, Dv=8, layout="lengths",
                                device=device, query_3d=True)
    check_backend(backend, args, kwargs)
    out, lse = attnkern.attention_pool(*args, **kwargs, return_lse=True, backend=backend)
    assert out.shape == (4, 4, 8) and lse.shape == (4, 4)


def test_key_padding_mask_is_the_inverted_mask():
    args, kwargs = _problem("mask", 2, 2)
    mask = kwargs["mask"]
    a = attnkern.attention_pool(*args, mask=mask)
    b = attnkern.attention_pool(*args, key_padding_mask=~mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the flipped polarity gives another answer: the two conventions are not interchangeable
    c = attnkern.attention_pool(*args, key_padding_mask=mask)
    assert not torch.allclose(a, c)


def test_left_padded_history_through_a_mask():
    """FuxiCTR pads histories at the front ("pre"): a mask selects the same items a prefix
    length selects in the right-padded copy."""
    g = torch.Generator().manual_seed(0)
    B, L, H, D = 4, 9, 2, 8
    lengths = torch.tensor([0, 3, 9, 5])
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(B, L, H, D, generator=g), torch.randn(B, L, H, D, generator=g)
    pre_k, pre_v = torch.zeros_like(k), torch.zeros_like(v)
    for b, n in enumerate(lengths.tolist()):
        pre_k[b, L - n:], pre_v[b, L - n:] = k[b, :n], v[b, :n]
    pre = torch.arange(L)[None, :] >= L - lengths[:, None]
    torch.testing.assert_close(attnkern.attention_pool(q, pre_k, pre_v, mask=pre),
                               attnkern.attention_pool(q, k, v, lengths))


@pytest.mark.parametrize("H,Hkv", [(3, 2), (2, 4), (4, 3)])
def test_bad_head_counts(H, Hkv):
    q = torch.randn(2, H, 4)
    k = torch.randn(2, 5, Hkv, 4)
    with pytest.raises(ValueError, match="Hkv that divides the query's H = %d" % H):
        attnkern.attention_pool(q, k, k)
    with pytest.raises(ValueError, match="Hkv that divides"):
        attnkern.attention_pool(q, k[0], k[0], offsets=torch.tensor([0, 2, 5]))


def test_compile_fullgraph_shared_heads():
    args, kwargs = _problem("lengths", 4, 1)

    def fn(q, k, v):
        return attnkern.attention_pool(q, k, v, **kwargs)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args))
