"""The CPU launcher's tiled kernels (many queries per history: N >= 16, see csrc/cpu/attention_pool_tile_impl.h).

Query tiles with a remainder (N = 17), key blocks with a partial last panel, empty rows, the
split path with one row (B = 1), every layout and dtype, forward and every gradient against the
float64 reference with the suite's tolerance rule; every SIMD path the CPU allows; non-finite
values at valid positions propagate, at padded positions are never read; results do not depend
on the thread count.
"""

from __future__ import annotations

import os

import pytest
import torch

import attnkern
from attnkern.reference import attention_pool_ref
from test_cpu import (LAYOUTS, assert_thread_count_independent, call_op, check_against_reference,
                      check_against_reference_in_subprocess, cpu_isa_runs, forward_backward, make_inputs)
from test_hardening import NONFINITE, _equal_logits, _fp16_near_top, _random_logits, assert_rule

pytestmark = pytest.mark.skipif(
    not attnkern.backends()["cpu"].available,
    reason="the attnkern C++ extension (CPU kernels) is not built",
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "B,N,H,Dk,Dv,L",
    [
        (3, 16, 2, 32, 32, 45),  # one whole query tile set, L not a multiple of a panel
        (2, 17, 1, 19, 33, 130),  # a remainder query tile, odd head dims, two key blocks
        (3, 64, 1, 64, 64, 70),
        (2, 20, 2, 7, 130, 40),  # Dv of several register blocks plus a partial one
        (1, 17, 1, 32, 48, 1100),  # one row, long: split into slices, merged
        (1, 130, 2, 16, 24, 600),  # many queries, few rows: the forward splits the queries
    ],
)
def test_tiles_match_reference(layout, dtype, B, N, H, Dk, Dv, L):
    check_against_reference(layout, dtype, B, N, H, Dk, Dv, L)


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_empty_rows_and_slice_boundaries(layout, dtype):
    # Empty rows among rows of lengths around the 64-key block and 512-position slice ends.
    lengths = [0, 63, 64, 65, 0, 513, 1]
    check_against_reference(layout, dtype, len(lengths), 16, 1, 16, 24, 600, lengths=lengths)


def test_tiles_noncontiguous_inputs():
    for layout in LAYOUTS:
        check_against_reference(layout, torch.float32, 2, 18, 2, 24, 40, 29, noncontig=True)


@pytest.mark.parametrize("N,L", [(17, 5), (17, 1100), (130, 600)])  # plain, key slices, query chunks
def test_tiles_thread_count_independent(N, L):
    (q, k, v), kw = make_inputs("lengths", torch.float32, 2, N, 2, 20, 24, L)
    grad_out = torch.randn(2, N, 2, 24, dtype=torch.float64)
    assert_thread_count_independent(q, k, v, kw, grad_out)


@pytest.mark.parametrize("B,L", [(3, 40), (1, 1100)])
@pytest.mark.parametrize("where", ["key", "value", "query"])
def test_tiles_nonfinite_at_valid_positions_propagate(B, L, where):
    # A NaN (or inf) at a valid position makes every output of its (row, head) NaN, as in the
    # reference; the same values at padded positions are never read.
    N, H, D = 16, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (N, L, L))
    lengths = torch.full((B,), L - 3, dtype=torch.int64)
    lengths[0] = L // 2
    for bad in (float("nan"), float("inf")):
        qb, kb, vb = q.clone(), k.clone(), v.clone()
        if where == "key":
            kb[0, 1, 1, 3] = bad
            kb[0, L // 2 + 1, 0, 2] = bad  # padded in row 0: never read
        elif where == "value":
            vb[0, 1, 1, 3] = bad
            vb[0, L // 2 + 1, 0, 2] = bad
        else:
            qb[0, 5, 1, 0] = bad
        out, lse = torch.ops.attnkern.attention_pool_fwd(qb, kb, vb, lengths, None, 0.25)
        # The reference multiplies padded values by p = 0 (so a NaN there would reach it): it
        # gets the padded positions zeroed, which the kernels must never read.
        valid = (torch.arange(L)[None, :] < lengths[:, None])[:, :, None, None]
        kr, vr = (torch.where(valid, t.double(), 0.0) for t in (kb, vb))
        ref, _ = attention_pool_ref(qb.double(), kr, vr, lengths, scale=0.25)
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs from the reference"
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), "inf pattern differs from the reference"
        finite = torch.isfinite(ref)
        assert not finite.all() and finite[1:].all()
        assert (out[finite].double() - ref[finite]).abs().max().item() < 1e-5


def test_tiles_large_logits_gradients():
    # |scale * q.k| in the thousands: the backward recomputes the logits exactly as the forward
    # (same pre-scaled queries, same summation), so the gradients stay as accurate as the
    # float32 reference's.
    for mult in (30.0, 100.0):
        (q, k, v), kw = make_inputs("lengths", torch.float64, 2, 16, 1, 16, 16, 40, lengths=[40, 7])
        q = q * mult
        grad_out = torch.randn(2, 16, 1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ref = lambda q_, k_, v_: attention_pool_ref(q_, k_, v_, scale=0.25, **kw)  # noqa: E731
        got = lambda q_, k_, v_: call_op(q_, k_, v_, kw, 0.25)  # noqa: E731
        oracle = forward_backward(ref, [q, k, v], grad_out)
        f32 = [t.float() for t in (q, k, v)]
        same = forward_backward(ref, f32, grad_out)
        res = forward_backward(got, f32, grad_out)
        for i in (0, 2, 3, 4):  # out, dq, dk, dv
            o = oracle[i]
            err = (res[i].double() - o).abs().max().item()
            err_same = (same[i].double() - o).abs().max().item()
            assert err <= 2 * err_same + 2e-5 * max(1.0, o.abs().max().item()), (mult, i, err, err_same)


@pytest.mark.parametrize("logit", [1e3, 1e4, 1e5, 1e7])
@pytest.mark.parametrize("N,D", [(16, 8), (17, 40), (20, 13)])
def test_tiles_large_logits_hardening_cases(logit, N, D):
    # tests/test_hardening.py's equal large logits on the tiled path: the backward's shift is
    # recomputed with the tiled stats kernel (the tiled backward's own logits), so the
    # gradients stay exact up to logits of 1e7.
    q, k, v, kw = _equal_logits(N, 11, D, logit, torch.float32)
    assert_rule("cpu", q, k, v, kw)


@pytest.mark.parametrize("logit", [1e3, -1e4])
def test_tiles_large_random_logits(logit):
    assert_rule("cpu", *_random_logits(16, logit))


@pytest.mark.parametrize("N,L,length", [(16, 1500, 1300), (130, 700, 600)])  # key slices, query chunks
def test_tiles_split_rows_large_logits(N, L, length):
    q, k, v, kw = _equal_logits(N, L, 8, 1e4, torch.float32, B=1)
    kw["lengths"] = torch.tensor([length])
    assert_rule("cpu", q, k, v, kw)


@pytest.mark.parametrize("logit", [1e4, 1e5, -1e5])
def test_tiles_recomputed_shift_matches_backward_logits(logit):
    # Logits of large magnitude whose float32 dot products round differently in different
    # summation orders: the probabilities the backward forms sum to 1 only if the recomputed
    # shift (max, log-sum) comes from the tiled backward's own logits. With grad_out = 1,
    # sum over positions of grad_value = sum over queries of those sums = N per (row, head).
    g = torch.Generator().manual_seed(5)
    B, N, H, D, L = 2, 16, 2, 16, 300
    q = 1 + 1e-4 * torch.randn(B, N, H, D, generator=g)
    k = 1 + 1e-4 * torch.randn(B, L, H, D, generator=g)
    v = torch.randn(B, L, H, D, generator=g)
    lengths = torch.tensor([L, 77])
    kv = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attnkern.attention_pool(*kv, lengths=lengths, scale=logit / D, backend="cpu")
    gq, gk, gv = torch.autograd.grad(out, kv, torch.ones_like(out))
    sums = gv.double().sum(1)  # [B, H, D]
    assert torch.allclose(sums, torch.full_like(sums, float(N)), rtol=1e-4, atol=0), sums.flatten()[:4]
    for t in (gq, gk, gv):
        assert torch.isfinite(t).all()


def test_tiles_fp16_near_top_of_range():
    assert_rule("cpu", *_fp16_near_top(16))


@pytest.mark.parametrize("case", ["overflowing_dot", "all_minus_inf_logits", "nan_key_valid", "inf_value_valid"])
def test_tiles_nonfinite_as_in_reference(case):
    # tests/test_hardening.py's non-finite cases with 16 queries: same finite/NaN/inf pattern of
    # out and lse as the reference (a +inf logit is NaN, all -inf logits an empty row).
    q, k, v, kw = NONFINITE[case]
    q = q.expand(-1, 16, -1, -1).contiguous()
    out, lse = attnkern.attention_pool(q, k, v, **kw, return_lse=True, backend="cpu")
    ref, ref_lse = attnkern.attention_pool(q, k, v, **kw, return_lse=True, backend="reference")
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref)
    assert torch.allclose(out[fin], ref[fin], atol=1e-5, rtol=1e-5)


def test_tiles_and_general_kernels_agree():
    # ATTNKERN_CPU_TILES=0 (read at every call) switches back to the general kernels.
    (q, k, v), kw = make_inputs("mask", torch.float32, 3, 16, 2, 24, 24, 50)
    grad_out = torch.randn(3, 16, 2, 24, dtype=torch.float64)
    old = os.environ.get("ATTNKERN_CPU_TILES")
    try:
        os.environ["ATTNKERN_CPU_TILES"] = "0"
        general = forward_backward(lambda *t: call_op(*t, kw, 0.2), [q, k, v], grad_out)
        os.environ["ATTNKERN_CPU_TILES"] = "1"
        tiled = forward_backward(lambda *t: call_op(*t, kw, 0.2), [q, k, v], grad_out)
    finally:
        if old is None:
            os.environ.pop("ATTNKERN_CPU_TILES", None)
        else:
            os.environ["ATTNKERN_CPU_TILES"] = old
    for a, b in zip(general, tiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16", "amx"])
def test_tiles_every_simd_path(isa):
    if not cpu_isa_runs(isa):
        pytest.skip("this CPU has no %s (and this is not the emulation build)" % isa)
    check_against_reference_in_subprocess([(3, 17, 2, 19, 33, 45), (1, 16, 1, 32, 32, 1100)], ATTNKERN_CPU_ISA=isa)


def _infer_op(q, k, v, layout_kw, scale):
    if "offsets" in layout_kw:
        return torch.ops.attnkern.jagged_attention_pool_infer(q, k, v, layout_kw["offsets"], -1, scale)
    return torch.ops.attnkern.attention_pool_infer(q, k, v, layout_kw.get("lengths"), layout_kw.get("mask"), scale)


def _rounded_p_reference(q, k, v, layout_kw, scale):
    """attention_pool computed as SDPA's low-precision path does: logits and softmax in float32
    from the inputs, P rounded to the input dtype, P V summed in float64, out rounded to the
    input dtype ([B, N, H, Dv]; 0 for an empty row)."""
    from attnkern.testing import row_positions

    B, N, H, _ = q.shape
    kf, vf = k.flatten(0, -3), v.flatten(0, -3)  # [B * L or T, H, D]
    out = torch.zeros(B, N, H, v.shape[-1], dtype=torch.float64)
    for b, pos in enumerate(row_positions(k, layout_kw)):
        if pos.numel():
            s_ = torch.einsum("nhd,lhd->hnl", q[b].float(), kf[pos].float()) * scale
            p_ = torch.softmax(s_, dim=-1).to(q.dtype).double()
            out[b] = torch.einsum("hnl,lhd->nhd", p_, vf[pos].double())
    return out.to(q.dtype)


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,N,H,Dk,Dv,L",
    [
        (2, 17, 2, 19, 33, 130),  # a remainder query tile, odd head dims, a partial pair group
        (1, 130, 2, 16, 24, 600),  # query chunks; long rows
        (3, 3, 1, 16, 16, 40),  # few queries: the general kernels (P V in fp32 on every path)
    ],
)
def test_inference_op_within_twice_the_rounded_p_reference(layout, dtype, B, N, H, Dk, Dv, L):
    """The inference op (P rounded to the input dtype for P V where the ISA path does that,
    docs/serving.md) against the float64 reference: out within 2x the error of the same
    computation with P rounded to the input dtype (SDPA's low-precision path), no floor; lse
    the forward's (within the exp2 error where avx512_bf16 rounds P). (Against the reference run in that precision, which keeps P in
    float32, its error is 1-4x that one's: docs/serving.md.)"""
    from attnkern.testing import compare

    (q, k, v), layout_kw = make_inputs(layout, dtype, B, N, H, Dk, Dv, L, seed=3)
    scale = Dk ** -0.5
    out, lse = _infer_op(q, k, v, layout_kw, scale)
    want, _ = attention_pool_ref(q.double(), k.double(), v.double(), scale=scale, **layout_kw)
    c = compare("out", out.to(dtype), _rounded_p_reference(q, k, v, layout_kw, scale), want, dtype, floor=0.0)
    assert c.ok, c.message(" (ISA path %s)" % attnkern._C.cpu_isa())
    # The softmax statistics: the forward's, but for avx512_bf16's shorter exp2 on the rounded-P
    # path (relative error 7.5e-5 in l, docs/serving.md).
    torch.testing.assert_close(lse, call_op(q, k, v, layout_kw, scale)[1], atol=2e-4, rtol=1e-6)
