"""attnkern::time_bias_fwd / _bwd, the time-aware layer's bias in one CPU pass: equal to the
layer's PyTorch formula (log buckets of the gap, recency, two lookups) at every valid position
and 0 at the padded ones, for gaps of every size and sign; the tables' gradient (float64
gradcheck, the same sums on any thread count); opcheck; torch.compile; the layer's output
unchanged by the op; bad input."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern.nn import AttentionPooling, recency, time_bucket
from attnkern.ops import time_bias as tb

pytestmark = pytest.mark.skipif(not tb.TIME_BIAS_OP, reason="attnkern._C is not built")

B, L, H = 6, 37, 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    query_time = 1_700_000_000 + torch.randint(0, 10 ** 6, (B,), generator=g)
    age = (10 ** (8 * torch.rand(B, L, generator=g, dtype=torch.float64))).long()
    key_times = query_time[:, None] - age
    # Future items (negative gaps), a gap of 0 and +-1, gaps up to int64's ends (the last
    # buckets are reached only past 2^62), and a gap that wraps around.
    q0 = int(query_time[0])
    key_times[0, :12] = torch.tensor([q0 + 5, q0 - 2 ** 62, q0 + 2 ** 62, -2 ** 63 + 5, 2 ** 63 - 1, q0, q0 - 1,
                                      q0 + 1, q0 - 3, q0 - 2 ** 40, q0 - (2 ** 62 + 2 ** 61), q0 + 2 ** 50])
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[1], lengths[2] = L, 0, 1  # a full row, an empty row, one item
    return key_times, query_time, lengths


def _formula(key_times, query_time, lengths, time_table, recency_table):
    """The layer's formula as it stands in PyTorch: [B, H, L]."""
    bias = 0
    if time_table is not None:
        bias = time_table[:, time_bucket(query_time[:, None] - key_times, time_table.shape[1])]
    if recency_table is not None:
        r = recency(key_times.shape[1], lengths).clamp(max=recency_table.shape[1] - 1)
        bias = bias + recency_table[:, r]
    return bias.transpose(0, 1)


def _tables(nb, nr, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (None if nb is None else torch.randn(H, nb, generator=g, dtype=dtype),
            None if nr is None else torch.randn(H, nr, generator=g, dtype=dtype))


def _op(key_times, query_time, lengths, time_table, recency_table):
    nb = time_table.shape[1] if time_table is not None else 1
    return torch.ops.attnkern.time_bias_fwd(key_times, query_time, lengths, tb.time_bias_bounds(nb, "cpu"),
                                            time_table, recency_table)


@pytest.mark.parametrize("nb,nr", [(64, 64), (200, 5), (1, 1), (3, 100), (146, None), (None, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_the_formula(nb, nr, dtype):
    kt, qt, lengths = _inputs()
    time_table, recency_table = _tables(nb, nr, dtype)
    got = _op(kt, qt, lengths, time_table, recency_table)
    want = _formula(kt, qt, lengths, time_table, recency_table)
    valid = (torch.arange(L)[None, :] < lengths[:, None])[:, None, :].expand(B, H, L)
    assert got.dtype == dtype and got.shape == (B, H, L)
    assert torch.equal(got[valid], want[valid])
    assert bool((got[~valid] == 0).all())


def test_bounds_reproduce_every_bucket_edge():
    # Every gap at and next to a bound, both signs, against the formula.
    nb = 150
    bounds = tb.time_bias_bounds(nb, "cpu")
    assert bounds.numel() == int(time_bucket(torch.tensor([2 ** 63 - 1]), nb))  # the reachable ones
    gaps = torch.cat([bounds - 1, bounds, bounds + 1, torch.tensor([0, 1, 2, 2 ** 63 - 1])]).clamp(max=2 ** 63 - 1)
    gaps = torch.cat([gaps, -gaps])
    kt = -gaps[None, :]
    qt = torch.zeros(1, dtype=torch.int64)
    table = torch.arange(nb, dtype=torch.float64)[None]
    got = torch.ops.attnkern.time_bias_fwd(kt, qt, torch.tensor([kt.shape[1]]), bounds, table, None)
    assert torch.equal(got[0, 0].long(), time_bucket(qt[:, None] - kt, nb)[0])


def test_gradcheck_tables():
    kt, qt, lengths = _inputs()
    time_table, recency_table = (t.requires_grad_() for t in _tables(9, 5))
    assert torch.autograd.gradcheck(lambda a, b: _op(kt, qt, lengths, a, b), (time_table, recency_table),
                                    fast_mode=True)


def test_backward_sums_in_a_fixed_order():
    g = torch.Generator().manual_seed(3)
    n = 300  # several of the op's row chunks
    kt = torch.randint(0, 10 ** 9, (n, L), generator=g)
    qt = torch.full((n,), 10 ** 9)
    lengths = torch.randint(0, L + 1, (n,), generator=g)
    time_table, recency_table = _tables(64, 8, torch.float32)
    grad = torch.randn(n, H, L, generator=g)
    threads = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(torch.ops.attnkern.time_bias_bwd(grad, kt, qt, lengths, tb.time_bias_bounds(64, "cpu"),
                                                        time_table, recency_table))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))
    # and the sums are those of the formula's lookups
    tt, rt = (t.double().requires_grad_() for t in (time_table, recency_table))
    valid = (torch.arange(L)[None, :] < lengths[:, None])[:, None, :]
    (_formula(kt, qt, lengths, tt, rt) * grad.double() * valid).sum().backward()
    torch.testing.assert_close(out[0][0].double(), tt.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[0][1].double(), rt.grad, rtol=1e-6, atol=1e-5)


def test_opcheck():
    kt, qt, lengths = _inputs()
    time_table, recency_table = (t.requires_grad_() for t in _tables(9, 5))
    bounds = tb.time_bias_bounds(9, "cpu")
    torch.library.opcheck(torch.ops.attnkern.time_bias_fwd.default, (kt, qt, lengths, bounds, time_table, recency_table))
    torch.library.opcheck(torch.ops.attnkern.time_bias_fwd.default, (kt, qt, lengths, bounds, time_table, None))
    grad = torch.randn(B, H, L, dtype=torch.float64)
    torch.library.opcheck(torch.ops.attnkern.time_bias_bwd.default,
                          (grad, kt, qt, lengths, bounds, time_table.detach(), recency_table.detach()))


def _layer_pair(absorb="auto"):
    torch.manual_seed(0)
    layer = AttentionPooling(16, H, time_buckets=64, recency_buckets=8, absorb=absorb)
    with torch.no_grad():
        layer.time_bias_weight.normal_()
        layer.recency_bias_weight.normal_()
    return layer


@pytest.mark.parametrize("absorb", [True, False])
def test_layer_output_unchanged(absorb):
    # The fused op (int64 times, a padded history with lengths) against the layer's PyTorch
    # formula (the same times as float64: the formula's path): the same output, the same table
    # gradients up to the summation order.
    kt, qt, lengths = _inputs()
    kt[0] = qt[0] - (qt[3] - kt[3])  # gaps that float64 holds exactly
    layer = _layer_pair(absorb)
    query, keys = torch.randn(B, 16), torch.randn(B, L, 16)
    outs, grads = [], []
    for times in ((kt, qt), (kt.double(), qt.double())):
        layer.zero_grad()
        out = layer(query, keys, lengths=lengths, key_times=times[0], query_time=times[1])
        out.sum().backward()
        outs.append(out)
        grads.append((layer.time_bias_weight.grad.clone(), layer.recency_bias_weight.grad.clone()))
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert tb.fused_time_bias(kt, qt, lengths, layer.time_bias_weight, layer.recency_bias_weight, L) is not None
    assert tb.fused_time_bias(kt.double(), qt, lengths, layer.time_bias_weight, None, L) is None


def test_layer_compiles_fullgraph():
    kt, qt, lengths = _inputs()
    layer = _layer_pair(True)
    query, keys = torch.randn(B, 16), torch.randn(B, L, 16)
    want = layer(query, keys, lengths=lengths, key_times=kt, query_time=qt)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(query, keys, lengths=lengths, key_times=kt, query_time=qt), want)


def test_bad_input():
    kt, qt, lengths = _inputs()
    time_table, recency_table = _tables(9, 5)
    bounds = tb.time_bias_bounds(9, "cpu")
    op = torch.ops.attnkern.time_bias_fwd
    with pytest.raises(ValueError, match="lengths must be in"):
        op(kt, qt, lengths + L, bounds, time_table, recency_table)
    with pytest.raises(TypeError, match="key_times must be int64"):
        op(kt.double(), qt, lengths, bounds, time_table, recency_table)
    with pytest.raises(ValueError, match="at most NB - 1"):
        op(kt, qt, lengths, tb.time_bias_bounds(64, "cpu"), time_table, recency_table)
    with pytest.raises(ValueError, match="a time_table, a recency_table or both"):
        op(kt, qt, lengths, bounds, None, None)
    with pytest.raises(ValueError, match="the H = 2 rows"):
        op(kt, qt, lengths, bounds, time_table, recency_table[:1])
    with pytest.raises(TypeError, match="dtype of time_table"):
        op(kt, qt, lengths, bounds, time_table, recency_table.float())
    with pytest.raises(ValueError, match="query_time must have shape"):
        op(kt, qt[:-1], lengths, bounds, time_table, recency_table)


def test_bounds_first_found_in_inference_mode_serve_a_training_call():
    # The bucket bounds are cached per (bucket rule, NB): found first under inference mode (a
    # serving call), they must still be savable by a later call that takes gradients.
    from attnkern.ops import time_bias

    time_bias._bounds_cpu.cache_clear()
    with torch.inference_mode():
        b = time_bias.reached_bounds("log", 29, "cpu")
    assert not b.is_inference()
    lens = torch.tensor([3, 5])
    offs = torch.tensor([0, 3, 8])
    q, k, v = (torch.randn(8, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ts = torch.arange(8, dtype=torch.int64) * 1000
    table = torch.randn(29, 1, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not attnkern.backends()["cpu"].available:
            continue
        out = attnkern.sequence_attention(q, k, v, offs, key_times=ts, query_times=ts, time_table=table,
                                          backend=backend)
        out.sum().backward()
        assert table.grad is not None and torch.isfinite(table.grad).all()
        table.grad = None
