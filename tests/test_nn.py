"""attnkern.nn.AttentionPooling: shapes, math, gradients, jagged vs padded, save/load,
autocast and torch.compile. Backend "auto" (the fused CPU kernels when built, else the
reference)."""

import io

import pytest
import torch

import attnkern
from attnkern.nn import AttentionPooling


def _manual(m, query, keys, values, valid):
    """The layer written out with plain softmax: query [B, N, E], keys [B, L, kdim],
    values [B, L, vdim], valid [B, L] bool."""
    H, D = m.num_heads, m.head_dim
    q = m.q_proj(query).unflatten(-1, (H, D))  # B N H D
    k = m.k_proj(keys).unflatten(-1, (H, D))  # B L H D
    v = m.v_proj(values).unflatten(-1, (H, D))
    s = torch.einsum("bnhd,blhd->bnhl", q, k) / D ** 0.5
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bnhl,blhd->bnhd", p, v)
    return m.out_proj(o.flatten(-2))


def _data(B=5, N=None, L=7, E=16, kdim=None, vdim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((B, E) if N is None else (B, N, E), generator=g)
    k = torch.randn(B, L, kdim or E, generator=g)
    v = torch.randn(B, L, vdim or kdim or E, generator=g)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    if B > 1:
        lengths[0], lengths[1] = 0, L
    return q, k, v, lengths


@pytest.mark.parametrize("N", [None, 1, 3])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("dims", [(None, None), (12, None), (12, 20)])
@pytest.mark.parametrize("valid_by", ["lengths", "mask", "none"])
def test_shapes_and_math(N, heads, dims, valid_by):
    kdim, vdim = dims
    torch.manual_seed(0)
    m = AttentionPooling(16, heads, kdim=kdim, vdim=vdim)
    q, k, v, lengths = _data(N=N, kdim=kdim, vdim=vdim)
    valid = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    if valid_by == "mask":
        valid = torch.rand(valid.shape, generator=torch.Generator().manual_seed(1)) < 0.6
        valid[0] = False
        out = m(q, k, v if vdim else None, mask=valid)
    elif valid_by == "lengths":
        out = m(q, k, v if vdim else None, lengths)
    else:
        valid = torch.ones_like(valid)
        out = m(q, k, v if vdim else None)
    assert out.shape == q.shape and out.dtype == torch.float32
    values = v if vdim else k
    expect = _manual(m, q if N else q[:, None], k, values, valid)
    torch.testing.assert_close(out, expect if N else expect[:, 0], atol=1e-5, rtol=1e-5)


def test_values_default_to_keys_and_empty_rows():
    torch.manual_seed(0)
    m = AttentionPooling(8, 2)
    q, k, _, lengths = _data(E=8)
    torch.testing.assert_close(m(q, k, None, lengths), m(q, k, k, lengths))
    # an empty history pools to zero: the output is the output projection's bias
    torch.testing.assert_close(m(q, k, lengths=torch.zeros_like(lengths)), m.out_proj.bias.expand(q.shape))


def test_empty_batch_and_empty_history():
    m = AttentionPooling(8, 2)
    assert m(torch.randn(0, 8), torch.randn(0, 4, 8), lengths=torch.zeros(0, dtype=torch.long)).shape == (0, 8)
    assert m(torch.randn(3, 2, 8), torch.randn(3, 0, 8)).shape == (3, 2, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        AttentionPooling(10, 3)
    m = AttentionPooling(8, 2, kdim=6, vdim=5)
    with pytest.raises(ValueError, match="vdim"):
        m(torch.randn(2, 8), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(2, 7), torch.randn(2, 3, 6), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="keys"):
        m(torch.randn(2, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="jagged"):
        m(torch.randn(2, 8), torch.randn(2, 3, 6), torch.randn(2, 3, 5), offsets=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError):
        AttentionPooling(8, 2, backend="nope")(torch.randn(2, 8), torch.randn(2, 3, 8))


def test_gradients():
    torch.manual_seed(0)
    m = AttentionPooling(16, 4, kdim=12)
    q, k, _, lengths = _data(N=2, kdim=12)
    q.requires_grad_(True)
    k.requires_grad_(True)
    m(q, k, lengths=lengths).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # b_k adds the same constant to every logit of a head, which the softmax cancels: its
        # exact gradient is zero (rounding noise in the projected order, exactly 0 absorbed).
        if name != "k_proj.bias":
            assert p.grad.abs().sum() > 0, name
    pad = torch.arange(k.shape[1])[None, :] >= lengths[:, None]
    assert (k.grad[pad] == 0).all()
    assert (q.grad[lengths == 0] == 0).all()
    assert k.grad[~pad].abs().sum() > 0


def test_jagged_matches_padded():
    torch.manual_seed(0)
    m = AttentionPooling(16, 2, kdim=10, vdim=6)
    q, k, v, lengths = _data(N=3, kdim=10, vdim=6)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    valid = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    kj, vj = k[valid], v[valid]  # [T, kdim], row-major = the rows in order
    out_p = m(q, k, v, lengths)
    grads_p = torch.autograd.grad(out_p.square().sum(), list(m.parameters()))
    for max_length in (None, int(lengths.max())):
        out_j = m(q, kj, vj, offsets=offsets, max_length=max_length)
        torch.testing.assert_close(out_j, out_p, atol=1e-5, rtol=1e-5)
        grads_j = torch.autograd.grad(out_j.square().sum(), list(m.parameters()))
        for gp, gj in zip(grads_p, grads_j):
            torch.testing.assert_close(gj, gp, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = AttentionPooling(16, 2, kdim=12)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    m2 = AttentionPooling(16, 2, kdim=12)
    q, k, _, lengths = _data(kdim=12)
    assert not torch.allclose(m(q, k, lengths=lengths), m2(q, k, lengths=lengths))
    m2.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(m2(q, k, lengths=lengths), m(q, k, lengths=lengths), atol=0, rtol=0)
    assert set(m.state_dict()) == {
        "%s_proj.%s" % (p, w) for p in "qkv" for w in ("weight", "bias")
    } | {"out_proj.weight", "out_proj.bias"}


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    m = AttentionPooling(32, 4)
    q, k, _, lengths = _data(N=2, E=32)
    ref = m(q, k, lengths=lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(q, k, lengths=lengths)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_compile_fullgraph():
    torch.manual_seed(0)
    m = AttentionPooling(16, 2)
    q, k, _, lengths = _data(N=2)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(q, k, lengths=lengths)
    torch.testing.assert_close(out, m(q, k, lengths=lengths), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), list(m.parameters()))
    expect = torch.autograd.grad(m(q, k, lengths=lengths).sum(), list(m.parameters()))
    for g, e in zip(grads, expect):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_calls_the_public_function(monkeypatch):
    calls = []
    real = attnkern.nn.attention_pool

    def spy(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attnkern.nn, "attention_pool", spy)
    m = AttentionPooling(8, 2, backend="reference")
    m(torch.randn(2, 8), torch.randn(2, 3, 8))
    assert calls == ["reference"]
