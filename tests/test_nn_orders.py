"""AttentionPooling's two exact evaluation orders (absorb=True: the history is never projected;
absorb=False: K and V projected first) against each other and against a float64 reference
written out with plain softmax; the cost model behind absorb="auto"; attention_dim, scale and
projections=False; key_padding_mask; torch.compile, autocast, state_dict and DDP."""

import io
import math
import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.nn import AttentionPooling, absorb_cost
from attnkern.testing import free_port

LAYOUTS = ("lengths", "mask", "key_padding_mask", "jagged", "full")


def _manual(m, query, keys, values, valid):
    """The layer written out in float64 with plain softmax: query [B, N, E], keys [B, L, kdim],
    values [B, L, vdim], valid [B, L] bool. Empty rows pool to zero."""
    H, D = m.num_heads, m.head_dim
    if m.projections:
        q = m.q_proj(query).unflatten(-1, (H, D))
        k = m.k_proj(keys).unflatten(-1, (H, D))
        v = m.v_proj(values).unflatten(-1, (H, D))
    else:
        q, k, v = (x.unflatten(-1, (H, D)) for x in (query, keys, values))
    s = torch.einsum("bnhd,blhd->bnhl", q, k) * m.scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bnhl,blhd->bnhd", p, v).flatten(-2)
    return m.out_proj(o) if m.projections else o


def _problem(layout, N, E, kdim, vdim, B=6, L=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((B, E) if N is None else (B, N, E), generator=g, dtype=dtype)
    k = torch.randn(B, L, kdim, generator=g, dtype=dtype)
    v = torch.randn(B, L, vdim, generator=g, dtype=dtype)
    lengths = torch.tensor([0, L, 1, 5, L - 2, 3][:B])
    valid = torch.arange(L)[None, :] < lengths[:, None]
    kwargs = {"lengths": lengths}
    if layout in ("mask", "key_padding_mask"):
        # holes, and left-padded ("pre") rows: the valid positions at the end
        valid = torch.rand(B, L, generator=g) < 0.6
        valid[0] = False
        valid[2] = torch.arange(L) >= L - 4
        kwargs = {"mask": valid} if layout == "mask" else {"key_padding_mask": ~valid}
    elif layout == "full":
        valid = torch.ones(B, L, dtype=torch.bool)
        kwargs = {}
    elif layout == "jagged":
        offsets = torch.zeros(B + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        kwargs = {"offsets": offsets, "max_length": L}
    return q, k, v, valid, kwargs


def _randomise(m, seed=3):
    """Non-zero biases, so that each bias's rule (b_k cancels, b_v only on non-empty rows) is
    exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _run(m, q, k, v, valid, kwargs, absorb, vdim_given):
    m.absorb = absorb
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    qq, kk, vv = leaves
    if "offsets" in kwargs:
        kk_in, vv_in = kk[valid], vv[valid]
    else:
        kk_in, vv_in = kk, vv
    out = m(qq, kk_in, vv_in if vdim_given else None, **kwargs)
    g = torch.Generator().manual_seed(5)
    go = torch.randn(out.shape, generator=g, dtype=out.dtype)
    params = [p for p in m.parameters()]
    grads = torch.autograd.grad(out, leaves + params, go, allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(leaves + params, grads)]
    return out, grads


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [None, 1, 3])
@pytest.mark.parametrize("heads,dims", [
    (1, (8, None, None, None)),
    (2, (8, None, None, None)),
    (4, (8, 6, 10, None)),       # kdim, vdim other than E
    (2, (8, 5, None, 12)),       # attention_dim other than E
])
@pytest.mark.parametrize("bias", [True, False])
def test_orders_match_each_other_and_the_reference(backend, layout, N, heads, dims, bias):
    E, kdim, vdim, adim = dims
    torch.manual_seed(0)
    m = AttentionPooling(E, heads, kdim=kdim, vdim=vdim, attention_dim=adim, bias=bias,
                         backend=backend, dtype=torch.float64)
    _randomise(m)
    kd = kdim or E
    vd = vdim or kd
    q, k, v, valid, kwargs = _problem(layout, N, E, kd, vd)
    given = vdim is not None
    out_a, g_a = _run(m, q, k, v, valid, kwargs, True, given)
    out_p, g_p = _run(m, q, k, v, valid, kwargs, False, given)
    m.absorb = "auto"
    ref = _manual(m, q if N is not None else q[:, None], k, v if given else k, valid)
    ref = ref if N is not None else ref[:, 0]
    torch.testing.assert_close(out_a, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_p, ref, atol=1e-12, rtol=1e-10)
    names = ["query", "keys", "values"] + [n for n, _ in m.named_parameters()]
    for name, a, p in zip(names, g_a, g_p):
        torch.testing.assert_close(a, p, atol=1e-11, rtol=1e-9, msg="grad of %s differs" % name)
    # an empty row (row 0 in every layout but "full") gives the out-projection's bias
    if layout != "full":
        expect = m.out_proj.bias if bias else torch.zeros(E, dtype=torch.float64)
        torch.testing.assert_close(out_a[0], expect.expand_as(out_a[0]))


def test_key_bias_gradient_is_exactly_zero_in_the_absorbed_order():
    m = AttentionPooling(8, 2, absorb=True, dtype=torch.float64)
    _randomise(m)
    q, k, v, valid, kwargs = _problem("lengths", None, 8, 8, 8)
    m(q, k, **kwargs).sum().backward()
    assert m.k_proj.bias.grad is not None and torch.all(m.k_proj.bias.grad == 0)


def test_absorbed_order_never_projects_the_history(monkeypatch):
    """absorb=True hands attention_pool the raw keys as one shared K/V head."""
    import attnkern.nn as nn_mod

    seen = []
    real = nn_mod.attention_pool

    def spy(q, k, v, *args, **kwargs):
        seen.append((tuple(q.shape), tuple(k.shape), k))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(nn_mod, "attention_pool", spy)
    m = AttentionPooling(16, 4, kdim=12, absorb=True)
    q, k, v, valid, kwargs = _problem("lengths", None, 16, 12, 12, dtype=torch.float32)
    m(q, k, **kwargs)
    (qs, ks, kt), = seen
    assert qs == (6, 4, 12) and ks == (6, 9, 1, 12)
    assert kt.data_ptr() == k.data_ptr()  # a view of the caller's keys, not a copy


@pytest.mark.parametrize("N,H,L,expect", [(1, 2, 200, True), (1, 4, 100, True), (1, 4, 1000, True),
                                          (64, 2, 200, False), (64, 4, 1000, False)])
def test_auto_follows_the_cost_model(N, H, L, expect):
    m = AttentionPooling(64, H)
    projected, absorbed = absorb_cost(N, H, L, 64, 64, 64)
    assert (absorbed <= projected) == expect
    assert m.uses_absorbed_order(N, L) == expect
    assert AttentionPooling(64, H, absorb=True).uses_absorbed_order(N, L)
    assert not AttentionPooling(64, H, absorb=False).uses_absorbed_order(N, L)


def test_scale_and_projections_false():
    q, k, v, valid, kwargs = _problem("lengths", 2, 8, 8, 8)
    for scale in (None, 1.0, 0.1):
        m = AttentionPooling(8, 2, scale=scale, dtype=torch.float64)
        assert m.scale == (0.5 if scale is None else scale)
        ref = _manual(m, q, k, k, valid)
        for absorb in (True, False):
            m.absorb = absorb
            torch.testing.assert_close(m(q, k, **kwargs), ref)
    m = AttentionPooling(8, 2, projections=False)
    assert list(m.parameters()) == []
    q32, k32 = q.float(), k.float()
    torch.testing.assert_close(m(q32, k32, **kwargs), _manual(m, q32, k32, k32, valid),
                               atol=1e-5, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="absorb"):
        AttentionPooling(8, 2, absorb="yes")
    with pytest.raises(ValueError, match="attention_dim .*divisible by num_heads"):
        AttentionPooling(8, 2, attention_dim=7)
    with pytest.raises(ValueError, match="projections=False .*kdim"):
        AttentionPooling(8, 2, kdim=4, projections=False)
    with pytest.raises(ValueError, match="attention_dim"):
        AttentionPooling(8, 2, attention_dim=4, projections=False)
    with pytest.raises(TypeError, match="scale"):
        AttentionPooling(8, 2, scale="1")
    with pytest.raises(ValueError, match="scale"):
        AttentionPooling(8, 2, scale=float("inf"))
    m = AttentionPooling(8, 2)
    q, k, v, valid, kwargs = _problem("mask", None, 8, 8, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"mask=m\.bool\(\)"):
        m(q, k, mask=valid.float())
    with pytest.raises(TypeError, match=r"key_padding_mask=m\.bool\(\)"):
        m(q, k, key_padding_mask=(~valid).float())
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(q, k, mask=valid, key_padding_mask=~valid)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(q, k, lengths=torch.full((6,), 3), key_padding_mask=~valid)


@pytest.mark.parametrize("absorb", [True, False])
def test_compile_fullgraph(absorb):
    torch.manual_seed(0)
    m = AttentionPooling(16, 2, absorb=absorb)
    q, k, v, valid, kwargs = _problem("lengths", 3, 16, 16, 16, dtype=torch.float32)
    eager = m(q, k, **kwargs)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, **kwargs), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("absorb", [True, False])
def test_autocast_bf16(absorb):
    torch.manual_seed(0)
    m = AttentionPooling(16, 2, absorb=absorb)
    q, k, v, valid, kwargs = _problem("mask", None, 16, 16, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(q, k, **kwargs)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), m(q, k, **kwargs), atol=5e-2, rtol=5e-2)


def test_state_dict_round_trip():
    m = AttentionPooling(16, 4, kdim=12, vdim=10, attention_dim=8, scale=1.0, bias=False)
    _randomise(m)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = AttentionPooling(16, 4, kdim=12, vdim=10, attention_dim=8, scale=1.0, bias=False)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    q, k, v, valid, kwargs = _problem("lengths", None, 16, 12, 10, dtype=torch.float32)
    torch.testing.assert_close(m2(q, k, v, **kwargs), m(q, k, v, **kwargs))


def test_submodules_are_attributes_of_the_package():
    code = ("import attnkern; attnkern.nn.AttentionPooling; attnkern.models.TargetAttentionCTR")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def _ddp_batch():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(8, 16, generator=g)
    k = torch.randn(8, 6, 16, generator=g)
    lengths = torch.tensor([0, 6, 1, 3, 5, 2, 6, 4])
    return q, k, lengths


def _ddp_steps(model, q, k, lengths, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(q, k, lengths=lengths).square().mean().backward()
        opt.step()


def _ddp_worker(rank, world, port, out_dir, absorb):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    layer = AttentionPooling(16, 2, absorb=absorb)
    _randomise(layer)
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    q, k, lengths = _ddp_batch()
    shard = slice(rank * 4, rank * 4 + 4)
    # two steps: a parameter left out of the graph would fail DDP's reduction on the second
    _ddp_steps(ddp, q[shard], k[shard], lengths[shard])
    torch.save(layer.state_dict(), os.path.join(out_dir, "rank%d.pt" % rank))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("absorb", [True, False])
def test_ddp_two_processes_match_one(tmp_path, absorb):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), absorb), nprocs=2, join=True)
    torch.manual_seed(0)
    layer = AttentionPooling(16, 2, absorb=absorb)
    _randomise(layer)
    _ddp_steps(layer, *_ddp_batch())
    for rank in range(2):
        got = torch.load(tmp_path / ("rank%d.pt" % rank), weights_only=True)
        for name, v in layer.state_dict().items():
            torch.testing.assert_close(got[name], v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("absorb", [True, False])
def test_loads_nn_multihead_attention_weights(absorb):
    """docs/recipes.md's mapping from nn.MultiheadAttention(batch_first=True): in_proj splits into
    q/k/v, out_proj stays; its key_padding_mask passes as it is (non-empty rows: MHA gives
    NaN on a fully padded row)."""
    torch.manual_seed(0)
    E, H = 16, 4
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    pool = AttentionPooling(E, H, absorb=absorb)
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    pool.load_state_dict({"q_proj.weight": wq, "q_proj.bias": bq, "k_proj.weight": wk,
                          "k_proj.bias": bk, "v_proj.weight": wv, "v_proj.bias": bv,
                          "out_proj.weight": mha.out_proj.weight,
                          "out_proj.bias": mha.out_proj.bias})
    q, k, v, valid, _ = _problem("mask", 3, E, E, E, dtype=torch.float32)
    keep = valid.any(1)
    pad = ~valid[keep]
    expect, _ = mha(q[keep], k[keep], v[keep], key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(pool(q[keep], k[keep], v[keep], key_padding_mask=pad), expect,
                               atol=1e-5, rtol=1e-5)
