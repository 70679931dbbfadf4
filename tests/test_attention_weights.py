"""attnkern.attention_weights and attnkern.activation_unit_weights (docs/attention_weights.md): every layout,
N > 1, shared K/V heads, the score bias (-inf entries, empty rows), dtypes, against the float64
reference through the suite's checking body (the weights checked by the pooling they define,
attnkern.testing.weights_function; the reference itself against the loop oracle), plus the
weights' own properties (exactly 0 at invalid positions and on empty rows, each other row sums
to 1), non-finite logits as the reference, never-read padding, float64 gradcheck, the fused ops
(attnkern::attention_weights_fwd / jagged_attention_weights_fwd / attention_weights_bwd: opcheck,
their lse, each CPU instruction set, the composite fallback), torch.compile and the layers' need_weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import testing
from attnkern.nn import ActivationUnitPooling, AttentionPooling
from attnkern.ops import weights as weights_ops
from attnkern.ops.schemas import WEIGHTS_OPS
from conftest import backend_device_pairs, make_problem
from test_backends import assert_compiles_fullgraph

CPU = attnkern.backends()["cpu"].available
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(not CPU, reason="no CPU kernels"))]


def _check(backend, args, kwargs, seed=1):
    """The shared checking body on the weights (attnkern.testing.weights_function)."""
    grad_out = testing.random_grad_out(args[0], args[2], seed=seed)
    reference = None if backend == "reference" else testing.weights_function("reference", kwargs)
    scale = args[0].shape[-1] ** -0.5
    return testing.check_function(testing.weights_function(backend, kwargs), args, kwargs, grad_out,
                                  reference=reference, scale=scale, label=backend).assert_passed()


def _weights(backend, args, kwargs):
    q, k = args[0], args[1]
    bias = args[3] if len(args) > 3 else None
    return attnkern.attention_weights(q, k, **kwargs, bias=bias, backend=backend)


def _valid(key, kwargs, N, H):
    """The weights' shape as a bool: True where a position takes part in its row."""
    unused = testing.unused_positions(key, kwargs, device=key.device)  # [B, L] or [T]
    if "offsets" in kwargs:
        return (~unused)[:, None, None].expand(-1, N, H)
    return (~unused)[:, None, None, :].expand(-1, N, H, -1)


def _row_sums(w, kwargs):
    """Per row b, query n, head h: the sum of its weights, [B, N, H]."""
    if "offsets" not in kwargs:
        return w.sum(-1)
    ones = torch.ones(w.shape[0], 1, 1, dtype=w.dtype, device=w.device)
    return testing.pool_by_weights(w, ones, kwargs)[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", testing.LAYOUTS)
@pytest.mark.parametrize("N,H,Hkv,bias,Hb", [(3, 4, 2, "shared", 1), (2, 2, 1, "per_query", 2)])
def test_weights_against_the_reference(backend, layout, N, H, Hkv, bias, Hb):
    args, kwargs = make_problem(B=5, N=N, H=H, Hkv=Hkv, L=19, Dk=7, Dv=5, layout=layout,
                                bias=bias, bias_heads=Hb)
    _check(backend, args, kwargs)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
def test_every_backend(backend, device):
    """Each available backend, on its device, against the reference's weights (float32, shared
    K/V heads, a per-query bias, both layouts)."""
    for layout in ("lengths", "jagged"):
        args, kwargs = make_problem(B=4, N=2, H=2, Hkv=1, L=9, Dk=8, Dv=2, layout=layout, device=device,
                                    bias="per_query", bias_heads=2)
        w = _weights(backend, args, kwargs)
        want = _weights("reference", [t.cpu() for t in args], {n: t.cpu() if isinstance(t, torch.Tensor)
                                                              else t for n, t in kwargs.items()})
        torch.testing.assert_close(w.cpu(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,layout", [(torch.float16, "lengths"), (torch.bfloat16, "jagged"),
                                          (torch.float64, "jagged")])
def test_weights_dtypes(backend, dtype, layout):
    args, kwargs = make_problem(B=4, N=2, H=2, Hkv=1, L=13, Dk=8, Dv=3, dtype=dtype, layout=layout,
                                bias="per_query", bias_heads=2)
    _check(backend, args, kwargs)
    w = _weights(backend, args, kwargs)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", testing.LAYOUTS)
def test_exact_zeros_and_sums(backend, layout):
    check_exact_zeros_and_sums(backend, layout)


def check_exact_zeros_and_sums(backend, layout, device="cpu"):
    """0 at every position outside its row (padding, masked, trailing jagged rows, -inf bias),
    0 on empty rows (no position, or every logit -inf), every other row sums to 1; on tensors
    of `device` (the fused backends' tests run it on theirs)."""
    B, N, H, L = 6, 2, 2, 11
    args, kwargs = make_problem(B=B, N=N, H=H, Hkv=1, L=L, Dk=4, Dv=2, layout=layout, bias="per_query",
                                bias_heads=H, magnitude=30.0, device=device)
    bias = args[3]
    jagged = layout == "jagged"
    # Row 1: its first position dropped for every query and head; row 2: every position dropped.
    if jagged:
        o = kwargs["offsets"].long()
        bias[o[1]] = float("-inf")
        bias[o[2]:o[3]] = float("-inf")
    else:
        bias[1, :, :, 0] = float("-inf")
        bias[2] = float("-inf")
    w = _weights(backend, args, kwargs)
    valid = _valid(args[1], kwargs, N, H)
    assert torch.isfinite(w).all()
    assert (w[~valid] == 0).all()
    if jagged:
        assert (w[o[1]] == 0).all() and (w[o[2]:o[3]] == 0).all()
    else:
        assert (w[1, :, :, 0] == 0).all() and (w[2] == 0).all()
    sums = _row_sums(w, kwargs)
    _, lse = attnkern.attention_pool(*args[:3], **kwargs, bias=bias, return_lse=True, backend="reference")
    empty = torch.isneginf(lse)
    assert empty[2].all() and (empty.any() or layout == "full")
    assert (sums[empty] == 0).all()
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_conventions_agree(backend):
    check_padding_conventions_agree(backend)


def check_padding_conventions_agree(backend, device="cpu"):
    """mask, key_padding_mask and lengths describing the same rows give the same weights, and a
    query without its N axis gives the weights without it; on tensors of `device`."""
    args, kwargs = make_problem(B=4, N=1, H=3, L=9, Dk=5, Dv=2, layout="lengths", query_3d=True,
                                device=device)
    q, k = args[0], args[1]
    by_lengths = attnkern.attention_weights(q, k, kwargs["lengths"], backend=backend)
    mask = torch.arange(9, device=device)[None, :] < kwargs["lengths"].long()[:, None]
    assert by_lengths.shape == (4, 3, 9)
    torch.testing.assert_close(attnkern.attention_weights(q, k, mask=mask, backend=backend), by_lengths)
    torch.testing.assert_close(attnkern.attention_weights(q, k, key_padding_mask=~mask, backend=backend),
                               by_lengths)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_gradcheck(backend, layout):
    args, kwargs = make_problem(B=3, N=2, H=2, Hkv=1, L=5, Dk=3, Dv=2, dtype=torch.float64, layout=layout,
                                bias="per_query", bias_heads=2)
    q, k, _, bias = (t.detach().requires_grad_() for t in args)
    assert torch.autograd.gradcheck(
        lambda q, k, b: attnkern.attention_weights(q, k, **kwargs, bias=b, backend=backend), (q, k, bias))


@pytest.mark.parametrize("backend,layout", [("reference", "lengths"),
                                            pytest.param("cpu", "jagged", marks=BACKENDS[1].marks),
                                            pytest.param("cpu", "mask", marks=BACKENDS[1].marks)])
def test_compiles_fullgraph(backend, layout):
    args, kwargs = make_problem(B=3, N=2, H=2, L=6, Dk=4, Dv=2, layout=layout)
    if layout == "jagged":
        kwargs["max_length"] = 6
    assert_compiles_fullgraph(
        lambda q, k: attnkern.attention_weights(q, k, **kwargs, backend=backend), args[:2])


# ---- the fused weights ops ----------------------------------------------------------------------

needs_cpu = pytest.mark.skipif(not CPU, reason="no CPU kernels")


def _op_args(layout, dtype=torch.float32, bias="per_query", N=2, H=2, L=11, Dk=5, seed=0):
    """Arguments of the weights op of `layout`'s kind (one query head per K/V head, bias in the
    canonical [B, Nb, Hb, L] / [T, Nb, Hb]) and the public call's (args, kwargs)."""
    args, kw = make_problem(B=4, N=N, H=H, L=L, Dk=Dk, Dv=1, dtype=dtype, layout=layout, bias=bias,
                            bias_heads=1, seed=seed)
    q, k, b = args[0], args[1], args[3].unsqueeze(1) if bias == "shared" else args[3]
    scale = Dk ** -0.5
    if "offsets" in kw:
        return (q, k, kw["offsets"], -1, scale, b), args, kw
    return (q, k, kw.get("lengths"), kw.get("mask"), scale, b), args, kw


@needs_cpu
@pytest.mark.parametrize("layout,bias", [("lengths", "per_query"), ("mask", "shared"), ("jagged", "per_query")])
def test_weights_op_opcheck(layout, bias):
    op_args, _, kw = _op_args(layout, bias=bias)
    op = getattr(torch.ops.attnkern, WEIGHTS_OPS["jagged" if "offsets" in kw else "padded"]).default
    torch.library.opcheck(op, op_args)


@needs_cpu
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_weights_bwd_op(layout, monkeypatch):
    """attnkern::attention_weights_bwd (dq, dk and dS from dW, w and dlse): opcheck, and the
    torch-op backward it replaces (that of a backend without it), an empty row and the dlse term
    included."""
    op_args, _, kw = _op_args(layout, dtype=torch.float64, N=3)
    q, k = op_args[0], op_args[1]
    jagged = "offsets" in kw
    if jagged:
        kw["offsets"][2] = kw["offsets"][1]  # row 1 empty
    else:
        (kw["lengths"] if "lengths" in kw else kw["mask"])[1] = 0
    w, _ = getattr(torch.ops.attnkern, WEIGHTS_OPS["jagged" if jagged else "padded"])(*op_args)
    gen = torch.Generator().manual_seed(3)
    dw = torch.randn(w.shape, dtype=torch.float64, generator=gen)
    dlse = torch.randn(q.shape[:3], dtype=torch.float64, generator=gen)
    idx = (None, None, kw["offsets"]) if jagged else (kw.get("lengths"), kw.get("mask"), None)
    op = getattr(torch.ops.attnkern, weights_ops.WEIGHTS_BWD_OP)
    for need_ds in (False, True):
        torch.library.opcheck(op.default, (dw, w, dlse, q, k, *idx, 0.5, need_ds))
    dq, dk, ds = op(dw, w, dlse, q, k, *idx, 0.5, True)
    assert op(dw, w, None, q, k, *idx, 0.5)[2].numel() == 0
    index = (kw["offsets"],) if jagged else (kw.get("lengths"), kw.get("mask"))
    layout_name = "jagged" if jagged else "padded"
    bias = torch.zeros(w.shape[:1] + (1, 1) + w.shape[3:], dtype=torch.float64)  # dbias: dS summed over N, H
    got = weights_ops.weights_backward(layout_name, dw, dlse, w, q, k, index, 0.5, bias)
    # The torch-op path, the op switched off.
    monkeypatch.setattr(weights_ops, "WEIGHTS_KERNELS", False)
    want = weights_ops.weights_backward(layout_name, dw, dlse, w, q, k, index, 0.5, bias)
    for g, wnt in zip(got, want):
        torch.testing.assert_close(g, wnt)
    torch.testing.assert_close(dq, want[0])
    torch.testing.assert_close(ds.sum((1, 2), keepdim=True), want[2])
    assert dq.shape == q.shape and dk.shape == k.shape and (dq[1] == 0).all()
    assert jagged or (ds[1] == 0).all()


@needs_cpu
@pytest.mark.parametrize("layout,dtype", [("lengths", torch.float32), ("jagged", torch.float64),
                                          ("mask", torch.bfloat16)])
def test_weights_op_lse(layout, dtype):
    """The op's second result is the pool's lse (-inf on empty rows), in the weights' dtype."""
    op_args, args, kw = _op_args(layout, dtype=dtype, bias="shared")
    op = getattr(torch.ops.attnkern, WEIGHTS_OPS["jagged" if "offsets" in kw else "padded"])
    w, lse = op(*op_args)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert w.dtype == acc and lse.dtype == acc
    _, want = attnkern.attention_pool(*args[:3], **kw, bias=args[3], return_lse=True, backend="reference")
    torch.testing.assert_close(lse.float(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, _weights("reference", args, kw).to(acc), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_non_finite_logits_as_the_reference(backend, layout):
    """A NaN logit at a valid position makes its row NaN, +inf gives NaN there and 0 elsewhere, a
    NaN bias entry at a padded position is never read: the reference's results, NaN for NaN."""
    args, kw = make_problem(B=5, N=2, H=2, L=9, Dk=4, Dv=1, layout=layout, bias="per_query", bias_heads=2)
    bias = args[3]
    jagged = layout == "jagged"
    if jagged:
        o = kw["offsets"].long()
        bias[o[1], 0, 0], bias[o[2] + 1, 1, 1] = float("nan"), float("inf")
        args[1][o[3]] = float("nan")  # a key of row 3: its every query and head
    else:
        lengths = kw["lengths"].long()
        bias[1, 0, 0, 0], bias[2, 1, 1, 1] = float("nan"), float("inf")
        bias[0, :, :, lengths[0]:] = float("nan")  # padding, never read
        args[1][3, 0] = float("nan")
    got, want = _weights(backend, args, kw), _weights("reference", args, kw)
    assert got.isnan().any()
    torch.testing.assert_close(got, want, equal_nan=True, atol=1e-6, rtol=1e-5)


@needs_cpu
@pytest.mark.parametrize("layout", ["mask", "jagged"])
def test_padding_is_never_read(layout):
    """The fused op: NaN keys and bias at positions outside every row change neither the weights
    nor any gradient (those of the padding exactly 0). (The reference's einsum backward does
    multiply masked keys by their zero dS.)"""
    backend = "cpu"
    args, kw = make_problem(B=4, N=2, H=2, Hkv=1, L=8, Dk=4, Dv=1, layout=layout, bias="per_query",
                            bias_heads=2)
    unused = testing.unused_positions(args[1], kw)
    # bias: padded [B, N, Hb, L], jagged [T, N, Hb]
    bias_unused = unused if layout == "jagged" else unused[:, None, None, :].expand_as(args[3])
    grads = []
    for poison in (False, True):
        q, k, b = (t.detach().clone() for t in (args[0], args[1], args[3]))
        if poison:
            k[unused] = float("nan")
            b[bias_unused] = float("nan")
        q, k, b = (t.requires_grad_() for t in (q, k, b))
        w = attnkern.attention_weights(q, k, **kw, bias=b, backend=backend)
        g = torch.autograd.grad(w, (q, k, b), torch.linspace(-1, 1, w.numel()).view_as(w))
        grads.append((w,) + g)
    for clean, poisoned in zip(*grads):
        torch.testing.assert_close(poisoned, clean)
    assert (grads[1][2][unused] == 0).all() and (grads[1][3][bias_unused] == 0).all()


@needs_cpu
def test_many_query_blocks():
    """Enough candidates per row that the launcher splits them into several work items."""
    args, kw = make_problem(B=2, N=150, H=2, Hkv=1, L=64, Dk=64, Dv=1, layout="lengths")
    torch.testing.assert_close(_weights("cpu", args, kw), _weights("reference", args, kw), atol=1e-6, rtol=1e-5)


@needs_cpu
def test_composite_fallback(monkeypatch):
    """A fused backend without a weights op for the device runs the PyTorch composite: the same
    weights and gradients as the op."""
    args, kw = make_problem(B=3, N=2, H=2, Hkv=1, L=7, Dk=4, Dv=1, layout="jagged", bias="per_query",
                            bias_heads=2, dtype=torch.float64)
    runs = []
    for missing in (False, True):
        monkeypatch.setitem(weights_ops._has, ("cpu", "cpu"), missing)
        q, k, b = (t.detach().clone().requires_grad_() for t in (args[0], args[1], args[3]))
        w = attnkern.attention_weights(q, k, **kw, bias=b, backend="cpu")
        runs.append((w,) + torch.autograd.grad(w, (q, k, b), torch.linspace(-1, 1, w.numel()).view_as(w).double()))
    for fused, composite in zip(*runs):
        torch.testing.assert_close(fused, composite)


# The kernels of the instruction sets below the widest (which every other test runs where the CPU
# has AVX-512; avx512_bf16 and amx run the avx512 kernels, the weights having no tiled kernel),
# forward and backward (N = 2 after the head fold: the C++ backward): ATTNKERN_CPU_ISA is read
# once per process.
_ISA_CHECK = """
import torch, attnkern
from attnkern.testing import make_problem
for layout, dt, N, L, Dk in (("mask", torch.float32, 3, 37, 19), ("jagged", torch.bfloat16, 2, 33, 64),
                             ("lengths", torch.float16, 2, 17, 7), ("jagged", torch.float64, 2, 9, 3)):
    args, kw = make_problem(B=4, N=N, H=2, Hkv=1, L=L, Dk=Dk, Dv=1, dtype=dt, layout=layout,
                            bias="per_query", bias_heads=2)
    runs = []
    for backend in ("cpu", "reference"):
        q, k, b = (t.detach().clone().requires_grad_() for t in (args[0], args[1], args[3]))
        w = attnkern.attention_weights(q, k, **kw, bias=b, backend=backend)
        dw = torch.linspace(-2, 3, w.numel(), dtype=w.dtype).view_as(w)
        runs.append((w,) + torch.autograd.grad(w, (q, k, b), dw))
    for got, want in zip(*runs):  # gradients in the inputs' dtype: torch's tolerance for it
        tol = {} if got.dtype in (torch.bfloat16, torch.float16) else dict(atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got, want, **tol)
print("ok", attnkern._C.cpu_isa())
"""


@needs_cpu
@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_narrower_instruction_sets(isa):
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_bad_input_names_the_argument():
    q, k = torch.randn(2, 1, 4), torch.randn(2, 5, 1, 4)
    with pytest.raises(ValueError, match="key must be"):
        attnkern.attention_weights(q, torch.randn(2, 5, 1, 3))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        attnkern.attention_weights(q, k, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="bias must be"):
        attnkern.attention_weights(q, k, bias=torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="lengths must be <= L"):
        attnkern.attention_weights(q, k, torch.tensor([1, 6]))


# ---- the layers' need_weights -------------------------------------------------------------------


def _softmax_of(logits, valid):
    w = logits.masked_fill(~valid, float("-inf")).softmax(-1)
    return torch.where(valid.any(-1, keepdim=True), w, torch.zeros_like(w))


@pytest.mark.parametrize("absorb,projections", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("N", [0, 3])
def test_attention_pooling_need_weights(absorb, projections, N):
    torch.manual_seed(0)
    E, H, L, B = 8, 2, 6, 3
    layer = AttentionPooling(E, H, absorb=absorb, projections=projections, recency_buckets=4,
                             dtype=torch.float64)
    with torch.no_grad():
        layer.recency_bias_weight.normal_()
    query = torch.randn((B, N, E) if N else (B, E), dtype=torch.float64)
    keys = torch.randn(B, L, E, dtype=torch.float64)
    lengths = torch.tensor([0, 4, 6])
    out, w = layer(query, keys, lengths=lengths, need_weights=True)
    torch.testing.assert_close(out, layer(query, keys, lengths=lengths))
    q4 = query if N else query.unsqueeze(1)
    q = (layer.q_proj(q4) if projections else q4).unflatten(-1, (H, E // H))
    k = (layer.k_proj(keys) if projections else keys).unflatten(-1, (H, E // H))
    bias = layer.recency_bias_weight[:, (lengths[:, None] - 1 - torch.arange(L)).clamp(0, 3)]  # [H, B, L]
    logits = torch.einsum("bnhd,blhd->bnhl", q, k) * layer.scale + bias.transpose(0, 1)[:, None]
    want = _softmax_of(logits, (torch.arange(L)[None, :] < lengths[:, None])[:, None, None])
    torch.testing.assert_close(w, want if N else want[:, 0])


@pytest.mark.parametrize("normalize", [None, "softmax"])
@pytest.mark.parametrize("jagged", [False, True])
def test_activation_unit_weights(normalize, jagged):
    """The weights pool to activation_unit_pool's output; 0 outside rows; softmax rows sum to 1."""
    torch.manual_seed(0)
    E, B, L = 4, 3, 5
    pool = ActivationUnitPooling(E, (6, 3), activation="prelu", normalize=normalize, dtype=torch.float64)
    query = torch.randn(B, 2, E, dtype=torch.float64)
    keys = torch.randn(B, L, E, dtype=torch.float64)
    lengths = torch.tensor([0, 2, 5])
    if jagged:
        offsets = torch.tensor([0, 0, 2, 7])
        keys_j = torch.cat([keys[1, :2], keys[2], torch.randn(1, E, dtype=torch.float64)])
        out, w = pool(query, keys_j, offsets=offsets, need_weights=True)
        assert w.shape == (8, 2) and (w[7] == 0).all()
        pooled = torch.zeros(B, 2, E, dtype=torch.float64).index_add(
            0, torch.tensor([1, 1, 2, 2, 2, 2, 2]), w[:7, :, None] * keys_j[:7, None])
        sums = torch.stack([w[:0].sum(0), w[:2].sum(0), w[2:7].sum(0)])
    else:
        out, w = pool(query, keys, lengths=lengths, need_weights=True)
        assert w.shape == (B, 2, L) and (w[0] == 0).all() and (w[1, :, 2:] == 0).all()
        pooled = torch.einsum("bnl,ble->bne", w, keys)
        sums = w.sum(-1)
    torch.testing.assert_close(pooled, out)
    if normalize == "softmax":
        torch.testing.assert_close(sums[1:], torch.ones_like(sums[1:]))
    assert (sums[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_activation_unit_weights_gradcheck(backend, layout):
    a = testing.random_activation_problem(B=3, N=2, L=4, E=3, Dv=2, units=(4,), activation="dice",
                                          softmax=True, layout=layout, dtype=torch.float64)
    (query, key, _, weights), kw = testing.to_public(a)
    (w1, b1), rest = weights[0], weights[1:]

    def f(q, k, w1):
        return attnkern.activation_unit_weights(q, k, [(w1, b1)] + rest, **kw, backend=backend)
    assert torch.autograd.gradcheck(f, tuple(t.detach().requires_grad_() for t in (query, key, w1)))
