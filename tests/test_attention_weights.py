"""attnkern.attention_weights and attnkern.activation_unit_weights (docs/attention_weights.md): every layout,
N > 1, shared K/V heads, the score bias (-inf entries, empty rows), dtypes, against the float64
reference through the suite's checking body (the weights checked by the pooling they define,
attnkern.testing.weights_function; the reference itself against the loop oracle), plus the
weights' own properties (exactly 0 at invalid positions and on empty rows, each other row sums
to 1), float64 gradcheck, torch.compile and the layers' need_weights."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import testing
from attnkern.nn import ActivationUnitPooling, AttentionPooling
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
    unused = testing.unused_positions(key, kwargs)  # [B, L] or [T]
    if "offsets" in kwargs:
        return (~unused)[:, None, None].expand(-1, N, H)
    return (~unused)[:, None, None, :].expand(-1, N, H, -1)


def _row_sums(w, kwargs):
    """Per row b, query n, head h: the sum of its weights, [B, N, H]."""
    if "offsets" not in kwargs:
        return w.sum(-1)
    ones = torch.ones(w.shape[0], 1, 1, dtype=w.dtype)
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
    """0 at every position outside its row (padding, masked, trailing jagged rows, -inf bias),
    0 on empty rows (no position, or every logit -inf), every other row sums to 1."""
    B, N, H, L = 6, 2, 2, 11
    args, kwargs = make_problem(B=B, N=N, H=H, Hkv=1, L=L, Dk=4, Dv=2, layout=layout, bias="per_query",
                                bias_heads=H, magnitude=30.0)
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
    """mask, key_padding_mask and lengths describing the same rows give the same weights, and a
    query without its N axis gives the weights without it."""
    args, kwargs = make_problem(B=4, N=1, H=3, L=9, Dk=5, Dv=2, layout="lengths", query_3d=True)
    q, k = args[0], args[1]
    by_lengths = attnkern.attention_weights(q, k, kwargs["lengths"], backend=backend)
    mask = torch.arange(9)[None, :] < kwargs["lengths"].long()[:, None]
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
                                            pytest.param("cpu", "jagged", marks=BACKENDS[1].marks)])
def test_compiles_fullgraph(backend, layout):
    args, kwargs = make_problem(B=3, N=2, H=2, L=6, Dk=4, Dv=2, layout=layout)
    if layout == "jagged":
        kwargs["max_length"] = 6
    assert_compiles_fullgraph(
        lambda q, k: attnkern.attention_weights(q, k, **kwargs, backend=backend), args[:2])


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
