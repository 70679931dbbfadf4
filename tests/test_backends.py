"""The property suite: every available backend against the float64 reference.

Runs "reference" and "cpu" on CPU tensors, "triton" on CPU tensors through Triton's
interpreter when there is no GPU (on CUDA tensors when there is one), and "cuda" (and triton)
on CUDA tensors when a GPU is present. Shapes are small so the interpreter stays fast.
"""

import itertools

import pytest
import torch

import attnkern
from conftest import backend_device_pairs, check_backend, make_problem

BACKENDS = backend_device_pairs()
# The big grid through Triton's interpreter takes minutes on 2 cores: not in the fast subset
# (the interpreter still runs every other test here, and tests/test_triton.py).
BACKENDS_GRID = backend_device_pairs(interpreter_slow=True)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["lengths", "mask", "jagged", "full"]
# (Dk, Dv, N, H, L): odd head dims, Dk != Dv, several queries and heads, L not a multiple of
# any block size.
DIMS = [(1, 1, 1, 1, 5), (7, 40, 3, 2, 37), (64, 64, 1, 1, 70), (130, 7, 2, 3, 33)]


def _skip_dtype(backend, dtype):
    if dtype == torch.float64 and backend in ("triton", "cuda"):
        pytest.skip("float64 is supported on the reference and cpu backends only")


CASES = [
    pytest.param(layout, dtype, *DIMS[(i + j) % len(DIMS)], id="%s-%s-d%d" % (
        layout, str(dtype).split(".")[-1], (i + j) % len(DIMS)))
    for (i, layout), (j, dtype) in itertools.product(enumerate(LAYOUTS), enumerate(DTYPES))
]


@pytest.mark.parametrize("backend,device", BACKENDS_GRID)
@pytest.mark.parametrize("layout,dtype,Dk,Dv,N,H,L", CASES)
def test_forward_and_gradients(backend, device, layout, dtype, Dk, Dv, N, H, L):
    _skip_dtype(backend, dtype)
    args, kwargs = make_problem(B=5, N=N, H=H, L=L, Dk=Dk, Dv=Dv, dtype=dtype, layout=layout,
                                device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("Dk,Dv", [(1, 7), (40, 40), (130, 64), (256, 256)])
def test_head_dims(backend, device, Dk, Dv):
    args, kwargs = make_problem(B=2, N=2, H=1, L=19, Dk=Dk, Dv=Dv, layout="lengths",
                                lengths=[19, 3], device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("L", [1, 15, 16, 17, 63, 64, 65, 129])
def test_block_boundary_lengths(backend, device, L):
    args, kwargs = make_problem(B=3, N=2, H=1, L=L, Dk=8, Dv=8, layout="lengths",
                                lengths=[L, L - 1, 1], device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_queries(backend, device):
    args, kwargs = make_problem(B=3, N=20, H=2, L=40, Dk=16, Dv=24, layout="mask", device=device)
    check_backend(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_three_dim_query(backend, device, layout):
    args, kwargs = make_problem(B=4, N=1, H=2, L=9, Dk=5, Dv=3, layout=layout, device=device,
                                query_3d=True)
    out, lse, _ = check_backend(backend, args, kwargs)
    assert out.shape == (4, 2, 3) and lse.shape == (4, 2)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_all_rows_empty(backend, device, layout):
    args, kwargs = make_problem(B=3, N=2, H=2, L=6, Dk=4, Dv=5, layout=layout,
                                lengths=[0, 0, 0], device=device)
    out, lse, grads = check_backend(backend, args, kwargs)
    assert (out == 0).all() and torch.isneginf(lse).all()
    for g in grads:
        assert (g == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged", "full"])
def test_empty_batch_and_zero_length(backend, device, layout):
    # B = 0
    args, kwargs = make_problem(B=0, N=1, H=1, L=4, Dk=4, Dv=4, layout=layout, lengths=[],
                                device=device)
    out = attnkern.attention_pool(*args, **kwargs, backend=backend)
    assert out.shape == (0, 1, 1, 4)
    # L = 0 (T = 0 for jagged): every row is empty
    args, kwargs = make_problem(B=2, N=1, H=1, L=0, Dk=4, Dv=3, layout=layout, lengths=[0, 0],
                                device=device)
    if layout == "jagged":
        args[1], args[2] = args[1][:0], args[2][:0]
        kwargs["offsets"] = torch.zeros(3, dtype=torch.long, device=device)
    out, lse, grads = check_backend(backend, args, kwargs)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(backend, device, dtype):
    # |scale * q.k| up to ~1e4: the online softmax must stay finite and exact.
    args, kwargs = make_problem(B=3, N=2, H=1, L=21, Dk=16, Dv=8, layout="lengths",
                                lengths=[21, 1, 7], device=device, dtype=dtype, magnitude=50.0)
    q, k = args[0].double(), args[1].double()
    max_logit = (torch.einsum("bnhd,blhd->bnhl", q, k).abs().max() / 4.0).item()
    assert max_logit > 5e3
    out, lse, grads = check_backend(backend, args, kwargs, max_logit=max_logit)
    assert lse[torch.isfinite(lse)].abs().max() > 1e3


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_float16_near_top_of_range(backend, device):
    args, kwargs = make_problem(B=3, N=1, H=1, L=12, Dk=32, Dv=8, layout="lengths",
                                lengths=[12, 5, 0], device=device, dtype=torch.float32,
                                magnitude=30.0)
    q, k, v = args
    v = (v.sign() * 6.0e4).clamp(-6.0e4, 6.0e4)  # values near float16's max (65504)
    args = [t.to(torch.float16) for t in (q, k, v)]
    out = attnkern.attention_pool(*args, **kwargs, backend=backend)
    assert torch.isfinite(out).all()
    ref = attnkern.attention_pool(*[a.double() for a in args], **kwargs, backend="reference")
    assert (out.double() - ref).abs().max() <= 2e-3 * 6.0e4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_and_expanded_inputs(backend, device):
    B, N, H, L, Dk, Dv = 3, 2, 2, 11, 6, 5
    g = torch.Generator().manual_seed(3)
    # query as a transposed view, key expanded along L (stride 0), value a strided slice.
    q = torch.randn(B, H, N, Dk, generator=g).transpose(1, 2)
    k = torch.randn(B, 1, H, Dk, generator=g).expand(B, L, H, Dk)
    v = torch.randn(B, L, H, 2 * Dv, generator=g)[..., ::2]
    assert not q.is_contiguous() and k.stride(1) == 0 and not v.is_contiguous()
    args = [t.to(device) for t in (q, k, v)]
    lengths = torch.tensor([11, 0, 4], device=device)
    check_backend(backend, args, {"lengths": lengths})
    # jagged key/value as non-contiguous views
    kj = torch.randn(20, H, 2 * Dk, generator=g)[..., :Dk].to(device)
    vj = torch.randn(H, 20, Dv, generator=g).transpose(0, 1).to(device)
    offsets = torch.tensor([0, 7, 7, 18], device=device)
    check_backend(backend, [args[0], kj, vj], {"offsets": offsets})


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_layouts_agree(backend, device):
    """Padded+lengths, padded+prefix-mask and jagged+offsets give the same answer."""
    args, kw = make_problem(B=4, N=2, H=2, L=13, Dk=8, Dv=8, layout="lengths",
                            lengths=[13, 0, 6, 1], device=device)
    q, k, v = args
    lengths = kw["lengths"]
    mask = torch.arange(13, device=device)[None, :] < lengths[:, None].long()
    valid = mask.reshape(-1)
    kj = k.reshape(-1, 2, 8)[valid]
    vj = v.reshape(-1, 2, 8)[valid]
    offsets = torch.zeros(5, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(lengths.long(), 0)
    a = attnkern.attention_pool(q, k, v, lengths, backend=backend)
    b = attnkern.attention_pool(q, k, v, mask=mask, backend=backend)
    c = attnkern.attention_pool(q, kj, vj, offsets=offsets, backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    args, kwargs = make_problem(B=4, N=3, H=2, L=50, Dk=16, Dv=16, layout="jagged", device=device)
    _, _, g1 = check_backend(backend, args, kwargs)
    _, _, g2 = check_backend(backend, args, kwargs)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradient_through_lse(backend, device):
    args, kwargs = make_problem(B=3, N=2, H=1, L=9, Dk=4, Dv=4, layout="mask", device=device)
    leaves = [a.detach().double().requires_grad_() for a in args]
    if backend in ("triton", "cuda"):
        leaves = [a.detach().float().requires_grad_() for a in args]
    out, lse = attnkern.attention_pool(*leaves, **kwargs, return_lse=True, backend=backend)
    loss = out.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()
    got = torch.autograd.grad(loss, leaves)
    ref_leaves = [a.detach().double().requires_grad_() for a in args]
    out_r, lse_r = attnkern.attention_pool(*ref_leaves, **kwargs, return_lse=True,
                                           backend="reference")
    loss_r = out_r.sum() + torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r)).sum()
    want = torch.autograd.grad(loss_r, ref_leaves)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


# ---- gradcheck, opcheck, torch.compile -------------------------------------------------------

def _fused_only(backend):
    if backend == "reference":
        pytest.skip("the reference backend has no registered op (plain autograd)")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_gradcheck_float64(backend, device, layout):
    if backend in ("triton", "cuda"):
        pytest.skip("float64 is supported on the reference and cpu backends only")
    args, kwargs = make_problem(B=3, N=2, H=2, L=5, Dk=3, Dv=2, layout=layout,
                                lengths=[5, 0, 2], dtype=torch.float64, device=device)
    leaves = [a.detach().requires_grad_() for a in args]

    # lse is float32 by contract, too coarse for finite differences: its gradient is checked
    # in test_gradient_through_lse instead.
    def f(q, k, v):
        return attnkern.attention_pool(q, k, v, **kwargs, backend=backend)

    assert torch.autograd.gradcheck(f, leaves)


def _op_names(backend):
    prefix = "triton_" if backend == "triton" else ""
    return prefix + "attention_pool", prefix + "jagged_attention_pool"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "full", "jagged"])
def test_opcheck(backend, device, layout):
    _fused_only(backend)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    args, kwargs = make_problem(B=3, N=2, H=1, L=6, Dk=4, Dv=3, layout=layout,
                                lengths=[6, 0, 3], dtype=dtype, device=device)
    q, k, v = [a.detach().requires_grad_() for a in args]
    padded, jagged = _op_names(backend)
    fwd = getattr(torch.ops.attnkern, (jagged if layout == "jagged" else padded) + "_fwd")
    bwd = getattr(torch.ops.attnkern, (jagged if layout == "jagged" else padded) + "_bwd")
    scale = 0.5
    if layout == "jagged":
        fargs = (q, k, v, kwargs["offsets"], 6, scale)
    else:
        fargs = (q, k, v, kwargs.get("lengths"), kwargs.get("mask"), scale)
    torch.library.opcheck(fwd, fargs)
    out, lse = fwd(*fargs)
    grad_out = torch.randn_like(out)
    delta = (grad_out.float() * out.detach().float()).sum(-1)
    bargs = (grad_out, q.detach(), k.detach(), v.detach()) + fargs[3:5] + (lse.detach(), delta, scale)
    torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_torch_compile_fullgraph(backend, device, layout):
    args, kwargs = make_problem(B=3, N=2, H=2, L=8, Dk=4, Dv=4, layout=layout, device=device)
    assert_compiles_fullgraph(lambda q, k, v: attnkern.attention_pool(q, k, v, **kwargs, backend=backend), args)


def assert_compiles_fullgraph(f, args):
    """f compiled with fullgraph=True (aot_eager) gives f's outputs and input gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [a.detach().requires_grad_() for a in args]
    out = compiled(*leaves)
    out.square().sum().backward()
    ref_leaves = [a.detach().requires_grad_() for a in args]
    ref = f(*ref_leaves)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
def test_first_call_inside_torch_compile():
    """A fresh process whose very first attention_pool call is being compiled: backend
    resolution must not be traced (it is taken as a constant)."""
    import subprocess
    import sys

    code = (
        "import torch, attnkern\n"
        "q = torch.randn(3, 2, 4); k = torch.randn(3, 5, 2, 4); L = torch.tensor([0, 2, 5])\n"
        "f = torch.compile(lambda q, k: attnkern.attention_pool(q, k, k, L), fullgraph=True,\n"
        "                  backend='aot_eager')\n"
        "ref = attnkern.attention_pool(q, k, k, L, backend='reference')\n"
        "assert torch.allclose(f(q, k), ref, atol=1e-5)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
