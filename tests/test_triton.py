"""Triton-specific tests: the split-L forward and its combine kernel, the launch heuristic,
tile/autotune choices, in-kernel clamping of index values, exact zero gradients, and the
custom ops' own input checks.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported); with a GPU the same tests run on CUDA tensors. The generic property suite over every
backend lives in test_backends.py. Shapes are tiny: the interpreter is slow.
"""

import math
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.reference import attention_pool_ref  # noqa: E402
from attnkern.testing import FLOOR, compare, forward_backward, make_problem  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

from attnkern.triton_kernels import attention_pool as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ["lengths", "mask", "jagged", "full"]


def _problem(B, N, H, L, Dk, Dv, layout, dtype=torch.float32, lengths=None, seed=0):
    """Canonical inputs of attnkern.testing: (q, k, v, index kwargs for the launcher) on DEVICE,
    three trailing jagged rows that belong to no row, max_length left to the launcher."""
    (q, k, v), idx = make_problem(B, N, H, L, Dk, Dv, dtype=dtype, layout=layout, lengths=lengths,
                                  device=DEVICE, seed=seed, extra_rows=3)
    idx.pop("max_length", None)
    return q, k, v, idx


def _launch_fwd(q, k, v, idx, **kw):
    return K.attention_pool_fwd(q, k, v, lengths=idx.get("lengths"), mask=idx.get("mask"),
                                offsets=idx.get("offsets"), max_length=idx.get("max_length", -1),
                                scale=q.shape[-1] ** -0.5, **kw)


def _ref(q, k, v, idx):
    return attention_pool_ref(q, k, v, idx.get("lengths"), mask=idx.get("mask"),
                              offsets=idx.get("offsets"), scale=q.shape[-1] ** -0.5)


def _valid_positions(k, idx):
    """Bool tensor over key's leading dims: True where the position belongs to some row."""
    if "offsets" in idx:
        o = idx["offsets"].long().cpu()
        valid = torch.zeros(k.shape[0], dtype=torch.bool)
        for b in range(o.numel() - 1):
            valid[o[b]:o[b + 1]] = True
        return valid.to(k.device)
    B, L = k.shape[:2]
    if "mask" in idx:
        return idx["mask"]
    if "lengths" in idx:
        return torch.arange(L, device=k.device)[None, :] < idx["lengths"].long()[:, None]
    return torch.ones(B, L, dtype=torch.bool, device=k.device)


def _assert_close(got, lp, ref, dtype, name):
    """The tolerance rule of attnkern.testing: error vs the float64 oracle <= 2x the reference's
    own error in the same precision + the floor."""
    c = compare(name, got, lp, ref, dtype)
    assert c.ok, c.message()


def _check_fwd(q, k, v, idx, **kw):
    out, lse = _launch_fwd(q, k, v, idx, **kw)
    out64, lse64 = _ref(q.double(), k.double(), v.double(), idx)
    out_lp, _ = _ref(q, k, v, idx)
    assert out.dtype == q.dtype and out.is_contiguous() and lse.dtype == torch.float32
    _assert_close(out, out_lp, out64, q.dtype, "out")
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all()
    if (~empty).any():
        assert (lse[~empty].double() - lse64[~empty]).abs().max().item() < 1e-4
    return out, lse


def _check_fwd_bwd(q, k, v, idx, **kw):
    """The launchers (fwd with `kw`, then bwd) against autograd through the float64 oracle."""
    dtype = q.dtype
    out, lse = _check_fwd(q, k, v, idx, **kw)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    grad_lse = torch.randn(lse.shape, generator=g).to(DEVICE)

    def ref_grads(cdt):
        return forward_backward(lambda *t: _ref(*t, idx), [t.to(cdt) for t in (q, k, v)],
                                grad_out, grad_lse)[2:]

    g64, g_lp = ref_grads(torch.float64), ref_grads(dtype)
    delta = (grad_out.to(dtype).float() * out.float()).sum(-1)
    delta = delta - torch.where(torch.isfinite(lse), grad_lse, 0.0)
    grads = K.attention_pool_bwd(grad_out.to(dtype), q, k, v, lse, delta,
                                 lengths=idx.get("lengths"), mask=idx.get("mask"),
                                 offsets=idx.get("offsets"), max_length=idx.get("max_length", -1),
                                 scale=q.shape[-1] ** -0.5)
    for name, got, lp, ref, like in zip(("dq", "dk", "dv"), grads, g_lp, g64, (q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype and got.is_contiguous()
        _assert_close(got, lp, ref, dtype, name)
    # Exact zeros where no row reads the position, and for the queries of empty rows.
    unused = ~_valid_positions(k, idx)
    assert (grads[1][unused] == 0).all() and (grads[2][unused] == 0).all()
    assert (grads[0][torch.isneginf(lse)] == 0).all()
    return out, lse, grads


# ---------------------------------------------------------------------------------------------
# Forward and backward through the launchers: both inner-product paths, every layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N", [1, 3, 17])  # BLOCK_N 1 and 4 (broadcast), 32 (tl.dot)
def test_launchers_match_reference(layout, N):
    q, k, v, idx = _problem(B=4, N=N, H=2, L=19, Dk=7, Dv=5, layout=layout)
    _check_fwd_bwd(q, k, v, idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [2, 5])
def test_low_precision_paths(dtype, N):
    q, k, v, idx = _problem(B=3, N=N, H=1, L=20, Dk=130, Dv=1, layout="mask", dtype=dtype)
    _check_fwd_bwd(q, k, v, idx)


@pytest.mark.parametrize("block_l", [16, 32])
def test_explicit_block_l(block_l):
    q, k, v, idx = _problem(B=3, N=2, H=1, L=33, Dk=8, Dv=8, layout="jagged")
    _check_fwd_bwd(q, k, v, idx, block_l=block_l)


# ---------------------------------------------------------------------------------------------
# Split-L forward and the combine kernel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_split_l_matches_reference(layout, num_splits):
    # L = 45 is three 16-tiles at most: 7 splits leave empty splits in every row.
    q, k, v, idx = _problem(B=4, N=2, H=2, L=45, Dk=7, Dv=9, layout=layout)
    out, lse = _check_fwd(q, k, v, idx, num_splits=num_splits)
    out1, lse1 = _launch_fwd(q, k, v, idx, num_splits=1)
    torch.testing.assert_close(out, out1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_l_low_precision_with_backward(dtype):
    q, k, v, idx = _problem(B=2, N=5, H=1, L=70, Dk=16, Dv=16, layout="lengths", dtype=dtype,
                            lengths=[70, 0])
    _check_fwd_bwd(q, k, v, idx, num_splits=4)


def test_split_l_chosen_by_heuristic():
    # One long row, one head: far fewer programs than the (pretend) SMs, so the launcher splits.
    L = 4 * K.MIN_SPLIT_LEN + 9
    assert K.choose_num_splits(1, L, K.sm_count(torch.device(DEVICE))) > 1
    q, k, v, idx = _problem(B=1, N=1, H=1, L=L, Dk=4, Dv=4, layout="lengths", lengths=[L - 3])
    _check_fwd(q, k, v, idx)


@pytest.mark.parametrize("S,Dv", [(1, 3), (3, 16), (5, 130)])
def test_combine_kernel(S, Dv):
    B, N, H = 3, 2, 2
    g = torch.Generator().manual_seed(1)
    part_o = torch.randn(S, B, N, H, Dv, generator=g)
    part_lse = torch.randn(S, B, N, H, generator=g) * 5
    part_lse[0, 0] = float("-inf")  # an empty split (its o is 0)
    part_o[0, 0] = 0
    part_lse[:, 1, 0] = float("-inf")  # every split empty: an empty row
    part_o[:, 1, 0] = 0
    part_o, part_lse = part_o.to(DEVICE), part_lse.to(DEVICE)
    out = torch.empty(B, N, H, Dv, dtype=torch.float16, device=DEVICE)
    lse = torch.empty(B, N, H, dtype=torch.float32, device=DEVICE)
    K.attention_pool_combine(part_o, part_lse, out, lse)

    lse_ref = torch.logsumexp(part_lse.double(), dim=0)
    w = torch.exp(part_lse.double() - lse_ref).nan_to_num(0.0)
    out_ref = (w[..., None] * part_o.double()).sum(0)
    assert torch.isneginf(lse[1, 0]).all() and (out[1, 0] == 0).all()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[fin].double(), lse_ref[fin], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), out_ref, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------
# Launch heuristic, tile choices, autotune keying
# ---------------------------------------------------------------------------------------------


def test_sm_count_on_cpu_is_the_pretend_count():
    assert K.sm_count(torch.device("cpu")) == K.INTERPRET_SM_COUNT


@pytest.mark.parametrize("programs,row_len,sms", [
    (1, 10_000, 132), (4, 100_000, 132), (7, 5_000, 108), (1, 10 ** 7, 132), (3, 600, 8)])
def test_heuristic_splits_few_long_rows(programs, row_len, sms):
    s = K.choose_num_splits(programs, row_len, sms)
    assert 1 < s <= K.MAX_SPLITS
    # enough to fill the GPU (up to the cap), each split a meaningful stretch of the row
    assert programs * s >= min(sms, programs * K.MAX_SPLITS) or s == row_len // K.MIN_SPLIT_LEN
    assert row_len / s >= K.MIN_SPLIT_LEN


@pytest.mark.parametrize("programs,row_len,sms", [
    (132, 10_000, 132), (5_000, 10 ** 6, 132), (1, 2 * K.MIN_SPLIT_LEN - 1, 132), (1, 50, 108),
    (0, 1000, 132)])
def test_heuristic_keeps_one_split(programs, row_len, sms):
    assert K.choose_num_splits(programs, row_len, sms) == 1


@pytest.mark.parametrize("n,block_n", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 16), (16, 16),
                                       (17, 32), (32, 32), (33, 64), (1000, 64)])
def test_query_block(n, block_n):
    assert K.query_block(n) == block_n
    # tl.dot needs M, N, K >= 16 on the GPU: only blocks of >= 16 queries take the dot path.
    assert (block_n > K.SMALL_N) == (block_n >= 16)


@pytest.mark.parametrize("d,block", [(1, 16), (7, 16), (16, 16), (17, 32), (64, 64), (130, 256),
                                     (256, 256)])
def test_head_block(d, block):
    assert K.head_block(d) == block


def test_autotune_keys():
    for tuned in (K._fwd_tuned, K._dq_tuned, K._dkdv_tuned):
        assert list(tuned.keys) == ["DK", "DV", "N_KEY"]
    # N is bucketed to a power of two so a varying candidate count does not retune every call.
    assert [K.n_key(n) for n in (1, 2, 3, 5, 16, 17, 100)] == [1, 2, 4, 8, 16, 32, 128]


@pytest.mark.parametrize("block_n,bdk,bdv", [(1, 16, 16), (1, 256, 256), (4, 256, 16),
                                              (16, 64, 64), (64, 256, 256), (64, 16, 256)])
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_autotune_prune(block_n, bdk, bdv, kind, dtype_bytes):
    configs = K.FWD_CONFIGS if kind == "fwd" else K.BWD_CONFIGS
    prune = {"fwd": K.prune_configs, "dq": K._prune_dq, "dkdv": K._prune_dkdv}[kind]
    # Triton passes the constexprs given at launch as keyword arguments, tensors by name.
    q = torch.empty(0, dtype=torch.float16 if dtype_bytes == 2 else torch.float32)
    kept = prune(configs, {"Q": q}, BLOCK_N=block_n, BLOCK_DK=bdk, BLOCK_DV=bdv)
    shipped = {(c.kwargs["BLOCK_L"], c.num_warps, c.num_stages) for c in configs}
    assert kept and all((c.kwargs["BLOCK_L"], c.num_warps, c.num_stages) in shipped for c in kept)
    # 16-bit launches lift ptxas's own register cap; float32 ones leave it to ptxas
    assert all(c.maxnreg == (255 if dtype_bytes == 2 else None) for c in kept)
    fits = [K._fits(block_n, c.kwargs["BLOCK_L"], bdk, bdv, c.num_warps, c.num_stages,
                    dtype_bytes, kind) for c in kept]
    assert all(fits) or len(kept) == 1
    # every tile counted: the budgets hold for all kept configs
    for c in kept:
        live, shared = K.tile_costs(block_n, c.kwargs["BLOCK_L"], bdk, bdv, c.num_stages,
                                    dtype_bytes, kind)
        assert shared <= K.SHARED_BUDGET or len(kept) == 1
        assert live <= K.REG_BUDGET * 32 * c.num_warps or len(kept) == 1
    if block_n == 1 and bdk == 16:
        assert len(kept) == len(configs)


def test_tile_costs_count_query_side_tiles_and_stages():
    # The shared memory of a tl.dot program grows with the stages and with the query-side
    # tiles, not only with the K/V tile.
    base = K.tile_costs(64, 64, 128, 128, 2, 4, "dq")[1]
    assert K.tile_costs(64, 64, 128, 128, 3, 4, "dq")[1] > base
    assert K.tile_costs(64, 64, 128, 128, 2, 4, "dq")[1] > K.tile_costs(16, 64, 128, 128, 2, 4, "dq")[1]
    assert K.tile_costs(64, 32, 128, 128, 3, 4, "dkdv")[1] > K.tile_costs(16, 32, 128, 128, 3, 4, "dkdv")[1]
    # the fp32 backward with more than 32 queries at head dims above 128 (270-337 KB before)
    for kind in ("dq", "dkdv"):
        bn = K.query_block(64, 256, 256, 4, kind)
        bl, w, st = K.default_config(bn, 256, 256, 4, kind)
        assert K._fits(bn, bl, 256, 256, w, st, 4, kind)
        assert K.tile_costs(bn, bl, 256, 256, st, 4, kind)[1] <= K.SHARED_BUDGET


def test_native_dot_gating():
    # 16-bit operands go to tl.dot as they are, except bfloat16 under the interpreter (its
    # tl.dot multiplies bfloat16's raw uint16 storage).
    assert K.native_dot(torch.float16)
    assert K.native_dot(torch.bfloat16) == (not K.interpret_mode())


def test_fp32_dot_precision_knob(monkeypatch):
    assert K.fp32_dot_precision() == "ieee"
    monkeypatch.setenv("ATTNKERN_TRITON_FP32_DOT", "tf32x3")
    assert K.fp32_dot_precision() == "tf32x3"
    q, k, v, idx = _problem(B=2, N=17, H=1, L=20, Dk=16, Dv=16, layout="lengths")
    _check_fwd(q, k, v, idx)
    monkeypatch.setenv("ATTNKERN_TRITON_FP32_DOT", "fast")
    with pytest.raises(ValueError, match="ATTNKERN_TRITON_FP32_DOT"):
        K.fp32_dot_precision()


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_default_config_fits(kind, dtype_bytes):
    for n in (1, 4, 16, 64):
        for d in (16, 64, 256):
            bn = K.query_block(n, d, d, dtype_bytes, kind)
            bl, w, st = K.default_config(bn, d, d, dtype_bytes, kind)
            assert bl in (16, 32, 64) and w in (4, 8) and st == 2
            assert K._fits(bn, bl, d, d, w, st, dtype_bytes, kind), (n, d, bn, bl, w)


# ---------------------------------------------------------------------------------------------
# Robustness: clamping without host checks, empty shapes, strides, exact zeros
# ---------------------------------------------------------------------------------------------


def test_lengths_are_clamped_in_kernel():
    # Launcher called directly (no value checks): negative and too-long lengths are clamped.
    q, k, v, _ = _problem(B=3, N=2, H=1, L=10, Dk=4, Dv=4, layout="full")
    bad = torch.tensor([-5, 4, 1000], device=DEVICE)
    out, lse = K.attention_pool_fwd(q, k, v, lengths=bad)
    ref, ref_lse = attention_pool_ref(q, k, v, bad.clamp(0, 10), scale=0.5)
    torch.testing.assert_close(out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


def test_offsets_are_clamped_in_kernel():
    # offsets beyond T, decreasing, negative, and a row longer than max_length.
    H, Dk, Dv, T = 1, 4, 3, 12
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 1, H, Dk, generator=g).to(DEVICE)
    k = torch.randn(T, H, Dk, generator=g).to(DEVICE)
    v = torch.randn(T, H, Dv, generator=g).to(DEVICE)
    offsets = torch.tensor([-3, 5, 2, 11, 40, 50], device=DEVICE)
    max_length = 4
    out, lse = K.attention_pool_fwd(q, k, v, offsets=offsets, max_length=max_length)
    o = offsets.long().cpu()
    for b in range(5):
        start = min(max(int(o[b]), 0), T)
        end = min(max(int(o[b + 1]), start), T, start + max_length)
        r, r_lse = attention_pool_ref(q[b:b + 1], k[start:end][None], v[start:end][None],
                                      scale=Dk ** -0.5)
        torch.testing.assert_close(out[b:b + 1], r)
        assert torch.isneginf(lse[b]).all() == (end == start)
    lse_like = torch.where(torch.isneginf(lse), lse, lse)
    grads = K.attention_pool_bwd(torch.ones_like(out), q, k, v, lse_like, torch.zeros_like(lse),
                                 offsets=offsets, max_length=max_length)
    assert all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_and_zero_length(layout):
    for B, L in ((0, 5), (2, 0)):
        q, k, v, idx = _problem(B=B, N=2, H=1, L=L, Dk=3, Dv=2, layout=layout,
                                lengths=[0] * B)
        out, lse = _launch_fwd(q, k, v, idx)
        assert out.shape == (B, 2, 1, 2) and (out == 0).all() and torch.isneginf(lse).all()
        grads = K.attention_pool_bwd(torch.ones_like(out), q, k, v, lse, torch.zeros_like(lse),
                                     **{n: t for n, t in idx.items()})
        for g_, like in zip(grads, (q, k, v)):
            assert g_.shape == like.shape and (g_ == 0).all()


def test_strided_and_expanded_inputs_with_splits():
    B, N, H, L, Dk, Dv = 2, 3, 2, 40, 6, 5
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, H, N, Dk, generator=g).transpose(1, 2).to(DEVICE)
    k = torch.randn(B, 1, H, Dk, generator=g).expand(B, L, H, Dk).to(DEVICE)
    v = torch.randn(B, L, H, 2 * Dv, generator=g)[..., ::2].to(DEVICE)
    mask = (torch.rand(B, 2 * L, generator=g) < 0.5)[:, ::2]
    idx = {"mask": mask.to(DEVICE)}
    assert not q.is_contiguous() and k.stride(1) == 0 and not idx["mask"].is_contiguous()
    _check_fwd_bwd(q, k, v, idx, num_splits=3)


def test_grad_zero_beyond_jagged_end_and_in_mask_holes():
    q, k, v, idx = _problem(B=3, N=2, H=1, L=9, Dk=5, Dv=3, layout="jagged", lengths=[4, 0, 9])
    _, _, (dq, dk, dv) = _check_fwd_bwd(q, k, v, idx)
    assert (dk[-3:] == 0).all() and (dv[-3:] == 0).all()
    assert (dk[:4] != 0).any() and (dv[:4] != 0).any()
    assert (dq[1] == 0).all()


def test_backward_is_deterministic():
    q, k, v, idx = _problem(B=2, N=17, H=1, L=40, Dk=16, Dv=16, layout="mask")
    out, lse = _launch_fwd(q, k, v, idx)
    go = torch.randn_like(out)
    delta = (go * out).sum(-1)
    a = K.attention_pool_bwd(go, q, k, v, lse, delta, mask=idx["mask"])
    b = K.attention_pool_bwd(go, q, k, v, lse, delta, mask=idx["mask"])
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------
# The registered ops: their own input checks
# ---------------------------------------------------------------------------------------------


def _ops():
    return torch.ops.attnkern


def test_op_rejects_float64():
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64, device=DEVICE)
    k = torch.randn(1, 3, 1, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        _ops().triton_attention_pool_fwd(q, k, k, None, None, 0.5)


@pytest.mark.parametrize("case", ["bad_key_shape", "bad_dim", "lengths_and_mask", "bad_lengths",
                                  "mask_dtype", "offsets_len", "offsets_value", "max_length",
                                  "bwd_lse_shape", "bwd_grad_dtype"])
def test_op_input_checks(case):
    q = torch.randn(2, 1, 1, 4, device=DEVICE)
    k = torch.randn(2, 3, 1, 4, device=DEVICE)
    v = torch.randn(2, 3, 1, 2, device=DEVICE)
    kj = torch.randn(5, 1, 4, device=DEVICE)
    vj = torch.randn(5, 1, 2, device=DEVICE)
    offs = torch.tensor([0, 2, 5], device=DEVICE)
    lens = torch.tensor([1, 3], device=DEVICE)
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    ops = _ops()
    lse = torch.zeros(2, 1, 1, device=DEVICE)
    go = torch.zeros(2, 1, 1, 2, device=DEVICE)
    calls = {
        "bad_key_shape": (ValueError, lambda: ops.triton_attention_pool_fwd(q, k[:, :, :, :3], v, None, None, 1.0)),
        "bad_dim": (ValueError, lambda: ops.triton_attention_pool_fwd(
            torch.randn(2, 1, 1, 300, device=DEVICE), torch.randn(2, 3, 1, 300, device=DEVICE),
            v, None, None, 1.0)),
        "lengths_and_mask": (ValueError, lambda: ops.triton_attention_pool_fwd(q, k, v, lens, mask, 1.0)),
        "bad_lengths": (ValueError if DEVICE == "cpu" else None,
                        lambda: ops.triton_attention_pool_fwd(q, k, v, lens + 5, None, 1.0)),
        "mask_dtype": (TypeError, lambda: ops.triton_attention_pool_fwd(q, k, v, None, mask.int(), 1.0)),
        "offsets_len": (ValueError, lambda: ops.triton_jagged_attention_pool_fwd(q, kj, vj, offs[:2], -1, 1.0)),
        "offsets_value": (ValueError if DEVICE == "cpu" else None,
                          lambda: ops.triton_jagged_attention_pool_fwd(q, kj, vj, offs + 1, -1, 1.0)),
        "max_length": (ValueError, lambda: ops.triton_jagged_attention_pool_fwd(q, kj, vj, offs, -2, 1.0)),
        "bwd_lse_shape": (ValueError, lambda: ops.triton_attention_pool_bwd(
            go, q, k, v, lens, None, lse[:1], lse, 1.0)),
        "bwd_grad_dtype": (TypeError, lambda: ops.triton_jagged_attention_pool_bwd(
            go.half(), q, kj, vj, offs, -1, lse, lse, 1.0)),
    }
    exc, call = calls[case]
    if exc is None:  # CUDA: value checks are off by default; the kernels clamp instead
        call()
    else:
        with pytest.raises(exc, match="attnkern"):
            call()


@pytest.mark.parametrize("tv,nv,broken", [
    ("3.6.0", "2.4.0", True), ("3.6.1", "2.5.1", True), ("3.6.0", "2.3.5", False),
    ("3.5.1", "2.4.0", False), ("3.8.0", "2.4.6", False), ("3.6.0", "2.4.0rc1", True),
    ("3.6.0+git1a2b", "3.0.0", True)])
def test_known_broken_interpreter_pair(tv, nv, broken):
    # Triton 3.6's interpreter with numpy >= 2.4 (triton-lang/triton#9171): the backend is then
    # unavailable under TRITON_INTERPRET=1 and the interpreter tests skip with this reason.
    reason = K.interpreter_problem(tv, nv)
    assert bool(reason) == broken
    if broken:
        assert "triton-lang/triton#9171" in reason and nv in reason


# ---------------------------------------------------------------------------------------------
# Numerics: large logits, the backward's recomputed softmax statistics, non-finite values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("N", [1, 17])
def test_backward_restat_path_matches_reference(monkeypatch, layout, N):
    # RESTAT_ABOVE = 0 makes every query block recompute its softmax max and sum in the dq
    # kernel (the large-logit path) and hand them to the dk/dv kernel.
    monkeypatch.setattr(K, "RESTAT_ABOVE", 0.0)
    q, k, v, idx = _problem(B=4, N=N, H=2, L=19, Dk=7, Dv=5, layout=layout)
    _check_fwd_bwd(q, k, v, idx)


def _tied_large_logits(N, magnitude, dtype=torch.float32):
    """Rows whose first four keys are one key repeated (tied logits of about `magnitude`) and
    whose other keys score far below: the float32 reference's softmax is exact there, so any
    error from a rounded lse shows."""
    g = torch.Generator().manual_seed(3)
    B, H, L, D = 3, 1, 12, 8
    q = torch.randn(B, N, H, D, generator=g)
    q = q / q.norm(dim=-1, keepdim=True) * math.sqrt(magnitude * math.sqrt(D))
    k = torch.randn(B, L, H, D, generator=g) * 0.01
    k[:, :4] = q[:, :1].expand(B, 4, H, D)  # tied keys aligned with the first query
    v = torch.randn(B, L, H, 5, generator=g)
    lengths = torch.tensor([12, 7, 4], dtype=torch.int32)
    return [t.to(DEVICE, dtype) for t in (q, k, v)], {"lengths": lengths.to(DEVICE)}


@pytest.mark.parametrize("N", [1, 17])
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_large_logits_gradients_as_accurate_as_reference(N, magnitude):
    # docs/contract.md §4: at |scale * q.k| up to 1e4 in float32 the gradients are within 2x of the float32
    # reference's error (plus the float32 floor), with no allowance growing with the logits.
    (q, k, v), idx = _tied_large_logits(N, magnitude)
    scale = q.shape[-1] ** -0.5
    out, lse = K.attention_pool_fwd(q, k, v, lengths=idx["lengths"], scale=scale)
    g = torch.Generator().manual_seed(5)
    go = torch.randn(out.shape, generator=g).to(DEVICE)

    def ref_grads(cdt):
        leaves = [t.detach().to(cdt).requires_grad_() for t in (q, k, v)]
        o, l_ = attention_pool_ref(*leaves, idx["lengths"], scale=scale)
        return (o, l_) + tuple(torch.autograd.grad(o, leaves, go.to(o.dtype)))

    r64, r32 = ref_grads(torch.float64), ref_grads(torch.float32)
    delta = (go * out).sum(-1)
    got = (out, lse) + K.attention_pool_bwd(go, q, k, v, lse, delta, lengths=idx["lengths"],
                                            scale=scale)
    for name, a, lp, ref in zip(("out", "lse", "dq", "dk", "dv"), got, r32, r64):
        assert torch.isfinite(a).all(), name
        err = (a.double() - ref).abs().max().item()
        err_lp = (lp.double() - ref).abs().max().item()
        if name == "lse":  # float32 can hold lse to about one ulp of its size
            allowed = 2 * err_lp + 2 * magnitude * torch.finfo(torch.float32).eps
        else:
            allowed = 2 * err_lp + FLOOR[torch.float32] * max(1.0, ref.abs().max().item())
        assert err <= allowed, "%s: error %.3g > allowed %.3g (reference %.3g)" % (
            name, err, allowed, err_lp)


def _with_nan(t, index):
    t = t.clone()
    t[index] = float("nan")
    return t


@pytest.mark.parametrize("N", [1, 17])
def test_nan_in_a_query_propagates_to_that_query_only(N):
    q, k, v, idx = _problem(B=3, N=N, H=1, L=9, Dk=6, Dv=4, layout="lengths", lengths=[9, 0, 5])
    qn = _with_nan(q, (0, 0, 0, 2))
    out, lse = _launch_fwd(qn, k, v, idx)
    ref, _ = _ref(qn.double(), k.double(), v.double(), idx)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0])  # not made to look empty
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()  # the empty row stays empty
    clean, clean_lse = _launch_fwd(q, k, v, idx)
    torch.testing.assert_close(out[2], clean[2])
    if N > 1:
        torch.testing.assert_close(out[0, 1:], clean[0, 1:])
    go = torch.ones_like(out)
    delta = (go * out).sum(-1)
    dq, dk, dv = K.attention_pool_bwd(go, qn, k, v, lse, delta, lengths=idx["lengths"],
                                      scale=q.shape[-1] ** -0.5)
    assert torch.isnan(dq[0, 0]).all() and torch.isnan(dk[0, :9]).any()
    assert torch.isfinite(dq[2]).all() and torch.isfinite(dk[2]).all() and torch.isfinite(dv[2]).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("N", [1, 17])
def test_nan_key_at_a_valid_position_propagates(layout, N):
    q, k, v, idx = _problem(B=3, N=N, H=1, L=9, Dk=6, Dv=4, layout=layout, lengths=[9, 3, 5])
    valid = _valid_positions(k, idx)
    pos = tuple(int(i) for i in valid.nonzero()[0])  # row 0's first valid position
    kn = _with_nan(k, pos + (0, 1))
    out, lse = _launch_fwd(q, kn, v, idx)
    ref, _ = _ref(q.double(), kn.double(), v.double(), idx)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    clean, _ = _launch_fwd(q, k, v, idx)
    torch.testing.assert_close(out[1:], clean[1:])


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
@pytest.mark.parametrize("N", [1, 17])
def test_nan_at_positions_of_no_row_is_never_read(layout, N):
    q, k, v, idx = _problem(B=3, N=N, H=1, L=9, Dk=6, Dv=4, layout=layout, lengths=[4, 0, 5])
    unused = ~_valid_positions(k, idx)
    assert unused.any()
    kn, vn = k.clone(), v.clone()
    kn[unused] = float("nan")
    vn[unused] = float("inf")
    out, lse = _launch_fwd(q, kn, vn, idx)
    clean, clean_lse = _launch_fwd(q, k, v, idx)
    assert torch.equal(out, clean) and torch.equal(lse, clean_lse)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    delta = (go * out).sum(-1)
    kw = {n: t for n, t in idx.items()}
    a = K.attention_pool_bwd(go, q, kn, vn, lse, delta, scale=q.shape[-1] ** -0.5, **kw)
    b = K.attention_pool_bwd(go, q, k, v, lse, delta, scale=q.shape[-1] ** -0.5, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("N", [1, 17])
def test_overflowing_logits_do_not_make_a_row_look_empty(N):
    # q.k of values near 1e20 overflows to +-inf in float32 (a key aligned with the query
    # gives +inf). The reference gives NaN outputs there; the row is not empty (it has valid
    # positions), so lse is not -inf.
    q, k, v, idx = _problem(B=2, N=N, H=1, L=6, Dk=4, Dv=3, layout="lengths", lengths=[6, 0])
    k = k.clone()
    k[:, 2] = q[:, 0]
    q, k = q * 1e20, k * 1e20
    out, lse = _launch_fwd(q, k, v, idx)
    ref, _ = _ref(q, k, v, idx)
    assert torch.isnan(ref[0]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert not torch.isneginf(lse[0]).any()
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# The hardening regressions (tests/test_hardening.py) through the triton backend
# ---------------------------------------------------------------------------------------------

import test_hardening as H  # noqa: E402


def _on_device(q, k, v, kw):
    kw = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kw


def _assert_rule_triton(q, k, v, kw, seed=0):
    """H.assert_rule for the triton backend on DEVICE: out and the three gradients finite and
    within LOW_PRECISION_FACTOR x the same-precision reference's error + the floor."""
    q, k, v, kw = _on_device(q, k, v, kw)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=g, dtype=torch.float64).to(DEVICE)
    dtype = q.dtype
    r64 = H._grads("reference", q.double(), k.double(), v.double(), kw, go)
    rlp = H._grads("reference", q, k, v, kw, go)
    got = H._grads("triton", q, k, v, kw, go)
    for name, a, lp, ref in zip(("out", "grad_query", "grad_key", "grad_value"),
                                (got[0],) + tuple(got[2]), (rlp[0],) + tuple(rlp[2]),
                                (r64[0],) + tuple(r64[2])):
        assert torch.isfinite(a).all(), "%s has NaN/Inf" % name
        scale = max(1.0, ref.abs().max().item())
        allowed = H.LOW_PRECISION_FACTOR * H._err(lp, ref) + H.FALLBACK_TOL[dtype] * scale
        err = H._err(a, ref)
        assert err <= allowed, "%s: error %.3g > allowed %.3g (triton %s)" % (name, err, allowed, dtype)


@pytest.mark.parametrize("logit", [1e3, 1e4, 1e7])
@pytest.mark.parametrize("N,D", [(1, 8), (17, 13)])
def test_hardening_large_equal_logits(logit, N, D):
    _assert_rule_triton(*H._equal_logits(N, 11, D, logit, torch.float32))


@pytest.mark.parametrize("logit", [1e3, -1e4])
def test_hardening_large_random_logits(logit):
    _assert_rule_triton(*H._random_logits(2, logit))


def test_hardening_fp16_near_top_of_range():
    g = torch.Generator().manual_seed(0)
    q = torch.full((1, 1, 1, 8), 6e4, dtype=torch.float16)
    k = torch.full((1, 4, 1, 8), 6e4, dtype=torch.float16)
    v = torch.randn(1, 4, 1, 8, generator=g).to(torch.float16)
    _assert_rule_triton(q, k, v, {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["jagged", "lengths"])
@pytest.mark.parametrize("sharpness", [0.1, 6.0])
def test_hardening_low_precision_gradients_peaked_and_flat(dtype, layout, sharpness):
    # delta from the op's unrounded float32 out (item 4): within the rule on peaked softmaxes
    _assert_rule_triton(*H._peaked(dtype, layout, sharpness))


def test_triton_op_returns_its_float32_result():
    q, k, v, idx = _problem(B=2, N=1, H=1, L=9, Dk=8, Dv=8, layout="lengths", dtype=torch.bfloat16)
    out, lse = torch.ops.attnkern.triton_attention_pool_fwd(q, k, v, idx["lengths"], None, 0.3)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref, _ = _ref(q.float(), k.float(), v.float(), idx)
    pub = attnkern.attention_pool(q, k, v, idx["lengths"], scale=0.3, backend="triton")
    assert pub.dtype == torch.bfloat16 and torch.equal(pub, out.to(torch.bfloat16))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_raw_triton_ops_refuse_a_non_finite_scale(bad):
    # as the C++ ops and the fake impls do: a NaN/inf scale never reaches a kernel
    q, k, v, idx = _problem(B=2, N=1, H=1, L=9, Dk=8, Dv=8, layout="lengths")
    ops = torch.ops.attnkern
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.triton_attention_pool_fwd(q, k, v, idx["lengths"], None, bad)
    out, lse = ops.triton_attention_pool_fwd(q, k, v, idx["lengths"], None, 0.3)
    go = torch.ones(out.shape, dtype=q.dtype)
    delta = (go * out).sum(-1)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.triton_attention_pool_bwd(go, q, k, v, idx["lengths"], None, lse, delta, bad)
    T = k.shape[0] * k.shape[1]
    offsets = torch.tensor([0, 4, 9], dtype=torch.long)
    kj, vj = k.reshape(T, 1, 8), v.reshape(T, 1, 8)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.triton_jagged_attention_pool_fwd(q, kj, vj, offsets, -1, bad)
    out, lse = ops.triton_jagged_attention_pool_fwd(q, kj, vj, offsets, -1, 0.3)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.triton_jagged_attention_pool_bwd(go, q, kj, vj, offsets, -1, lse, (go * out).sum(-1), bad)


@pytest.mark.parametrize("name", sorted(H.NONFINITE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hardening_nonfinite_propagates_as_in_reference(name, dtype):
    q, k, v, kw = _on_device(*H.NONFINITE[name])
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ok_out, ok_lse, out, lse = H._finite_pattern("triton", q, k, v, kw)
    ref_out_ok, ref_lse_ok, ref, ref_lse = H._finite_pattern("reference", q, k, v, kw)
    assert torch.equal(ok_out, ref_out_ok), (name, out, ref)
    assert torch.equal(ok_lse, ref_lse_ok), (name, lse, ref_lse)
    fin = ok_out & ref_out_ok
    tol = H.FALLBACK_TOL[dtype] * 4 + 1e-6
    assert torch.allclose(out[fin].double(), ref[fin].double(), atol=tol * 10, rtol=tol * 10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
