"""Shared fixtures and the one checking body used by every backend's property tests."""

import os

import pytest
import torch

# CI has no GPU: run the Triton kernels on CPU tensors through Triton's interpreter. This must
# happen before triton (and so attnkern) is imported. With a GPU, Triton runs for real.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import attnkern  # noqa: E402
from attnkern import check  # noqa: E402
from attnkern._inputs import edge_lengths, random_problem  # noqa: E402
from attnkern.reference import attention_pool_ref  # noqa: E402

# The one table of fallback tolerances (absolute, relative to the oracle's magnitude) and the
# low-precision factor: the floor added to "2x the reference's own error in the same
# precision". `attnkern check` applies the same rule, so the table lives in the package.
FALLBACK_TOL = check.FLOOR
LOW_PRECISION_FACTOR = check.LOW_PRECISION_FACTOR


def backend_device_pairs():
    """(backend, device) pairs the property suite runs, each with a skip mark when unavailable."""
    info = attnkern.backends()
    gpu = torch.cuda.is_available()
    pairs = []
    for backend, device in (
        ("reference", "cpu"),
        ("cpu", "cpu"),
        ("triton", "cuda" if gpu else "cpu"),
        ("cuda", "cuda"),
        ("reference", "cuda"),
    ):
        marks = []
        if device == "cuda" and not gpu:
            marks.append(pytest.mark.skipif(True, reason="no CUDA GPU"))
        elif not info[backend].available:
            marks.append(pytest.mark.skipif(True, reason=info[backend].reason))
        pairs.append(pytest.param(backend, device, id="%s-%s" % (backend, device), marks=marks))
    return pairs


def make_problem(B=3, N=1, H=1, L=37, Dk=16, Dv=16, dtype=torch.float32, layout="lengths",
                 lengths=None, device="cpu", seed=0, query_3d=False, magnitude=1.0):
    """Random inputs for one call. layout: lengths | mask | jagged | full; lengths default to
    empty, one, full, half and nearly full rows.

    Returns (args, kwargs) for attnkern.attention_pool, tensors are leaves (float64 master
    copies are made by the checker)."""
    g = torch.Generator().manual_seed(seed)
    lengths_t = edge_lengths(B, L) if lengths is None else torch.tensor(lengths, dtype=torch.long)
    # Two trailing jagged rows that belong to no row.
    q, k, v, kwargs = random_problem(B, N, H, L, Dk, Dv, layout, lengths_t, generator=g,
                                     extra_rows=2, magnitude=magnitude)
    if query_3d:
        assert N == 1
        q = q[:, 0]
    if "lengths" in kwargs:
        kwargs["lengths"] = kwargs["lengths"].to(torch.int32)  # int32 lengths: the common case
    kwargs = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return args, kwargs


def _err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _scale_of(t):
    if t.numel() == 0:
        return 1.0
    return max(1.0, t.double().abs().max().item())


def unused_positions(key, kwargs):
    """Bool mask over key's leading dims ([B, L] padded, [T] jagged): positions that take part
    in no row, where grad_key / grad_value must be exactly zero."""
    if "offsets" in kwargs:
        off = kwargs["offsets"].long().cpu()
        covered = torch.zeros(key.shape[0], dtype=torch.bool)
        for b in range(off.numel() - 1):
            covered[off[b]:off[b + 1]] = True
        return ~covered
    B, L = key.shape[0], key.shape[1]
    if kwargs.get("mask") is not None:
        return ~kwargs["mask"].cpu()
    if kwargs.get("lengths") is not None:
        return torch.arange(L)[None, :] >= kwargs["lengths"].long().cpu()[:, None]
    return torch.zeros(B, L, dtype=torch.bool)


def _call(backend, args, kwargs, grad_out):
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out, lse = attnkern.attention_pool(*leaves, **kwargs, return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return out, lse, grads


def check_backend(backend, args, kwargs, *, grads=True, seed=1, max_logit=0.0):
    """The shared property check: `backend` on `args` against the float64 reference, forward
    (out, lse) and all three gradients, within the low-precision tolerance rule. Also checks:
    no NaN/Inf, exact zeros for empty rows and at positions that take part in no row.

    max_logit: the largest |scale * q.k| of the problem. Any kernel that recomputes the logits in
    float32 (and stores lse in float32) differs from the reference by ~|logit| * eps there, so
    the floor grows with it."""
    dtype = args[0].dtype
    g = torch.Generator().manual_seed(seed)
    out_shape = list(args[0].shape[:-1]) + [args[2].shape[-1]]
    grad_out = torch.randn(out_shape, generator=g).to(args[0].device)

    args64 = [a.detach().double() for a in args]
    out64, lse64, g64 = _call("reference", args64, kwargs, grad_out.double())
    out, lse, gr = _call(backend, args, kwargs, grad_out)
    if dtype == torch.float64:
        out_lp, lse_lp, g_lp = out64, lse64, g64
    else:
        out_lp, lse_lp, g_lp = _call("reference", args, kwargs, grad_out)

    assert out.dtype == dtype and out.shape == out64.shape
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    tol = FALLBACK_TOL[dtype] + 8 * max_logit * torch.finfo(torch.float32).eps

    def close(name, got, lp, ref):
        assert torch.isfinite(got).all(), "%s has NaN/Inf" % name
        allowed = LOW_PRECISION_FACTOR * _err(lp, ref) + tol * _scale_of(ref)
        err = _err(got, ref)
        assert err <= allowed, "%s: max error %.3g > allowed %.3g (%s, %s)" % (
            name, err, allowed, backend, dtype)

    close("out", out, out_lp, out64)
    # lse: -inf exactly where the oracle is -inf (empty rows), close elsewhere.
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on empty rows"
    assert not torch.isnan(lse).any()
    lse_tol = FALLBACK_TOL[torch.float32 if dtype == torch.float64 else dtype] * 4
    if (~empty).any():
        d = (lse[~empty].double() - lse64[~empty]).abs().max().item()
        d_lp = (lse_lp[~empty].double() - lse64[~empty]).abs().max().item()
        assert d <= LOW_PRECISION_FACTOR * d_lp + lse_tol * _scale_of(lse64[~empty]), "lse error %.3g" % d
    if empty.any():
        assert (out.double()[empty] == 0).all(), "empty rows must give out = 0"
    if grads:
        unused = unused_positions(args[1], kwargs)
        for name, got, lp, ref in zip(("grad_query", "grad_key", "grad_value"), gr, g_lp, g64):
            assert got.shape == ref.shape and got.dtype == dtype
            close(name, got, lp, ref)
            if name != "grad_query":  # exact zeros at positions that take part in no row
                assert (got.cpu()[unused] == 0).all(), "%s must be exactly 0 where unused" % name
        qg = gr[0]
        if empty.any():
            assert (qg.double()[empty] == 0).all(), "grad_query must be 0 on empty rows"
    return out, lse, gr
