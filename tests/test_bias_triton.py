"""The score bias in the Triton kernels, through their launchers: forward and every gradient
(the bias's summed over what it was broadcast to) against a float64 formula, for each way the
bias gradient is reduced (written per query, summed per program, summed across heads, the
dbias kernel), padded and jagged, -inf entries and empty rows, values at positions that take
part in no row (never read), the split-L forward, and a determinism check.

The op-level layout (docs/contract.md): padded [B, Nb, Hb, L] or jagged [T, Nb, Hb], query n
reads row n % Nb, head h reads head h (Hb = H) or 0 (Hb = 1). On CPU the kernels run through
Triton's interpreter: tiny shapes.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.testing import compare, make_problem, row_positions, unused_positions  # noqa: E402
from conftest import check_backend  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

from attnkern.triton_kernels import attention_pool as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bias_for(k, kwargs, Nb, Hb, dtype, seed=3, neg_inf=True):
    """A random bias of the op's layout; NaN wherever no row reads it (so a read shows), and
    with neg_inf, -inf at one valid position of row 0 and at every position of row 1's head 0
    (its queries then have an empty row there when Hb = H, a dropped position otherwise)."""
    g = torch.Generator().manual_seed(seed)
    jagged = "offsets" in kwargs
    lead = (k.shape[0],) if jagged else (k.shape[0], k.shape[1])
    bias = torch.randn(*lead, Nb, Hb, generator=g, dtype=torch.float64)  # [B, L, Nb, Hb] / [T, Nb, Hb]
    bias[unused_positions(k, kwargs)] = float("nan")
    rows = row_positions(k, kwargs)
    flat = bias.flatten(0, len(lead) - 1)
    if neg_inf:
        if rows[0].numel():
            flat[rows[0][rows[0].numel() // 2]] = float("-inf")
        if len(rows) > 1 and rows[1].numel():
            flat[rows[1], :, 0] = float("-inf")
    bias = flat.reshape(bias.shape)
    if not jagged:
        bias = bias.permute(0, 2, 3, 1)  # [B, Nb, Hb, L], non-contiguous on purpose
    return bias.to(DEVICE, dtype)


def _formula(q, k, v, bias, kwargs, scale):
    """out, lse by the definition, row by row, over the valid positions only (in the inputs'
    dtype; autograd gives the gradients)."""
    B, Nq, H, _ = q.shape
    jagged = "offsets" in kwargs
    Nb, Hb = bias.shape[1], bias.shape[2]
    kf = k if jagged else k.flatten(0, 1)
    vf = v if jagged else v.flatten(0, 1)
    bf = bias if jagged else bias.permute(0, 3, 1, 2).flatten(0, 1)  # [B*L or T, Nb, Hb]
    outs, lses = [], []
    for b, pos in enumerate(row_positions(k, kwargs)):
        pos = pos.to(q.device)
        s = torch.einsum("nhd,lhd->nhl", q[b], kf[pos]) * scale
        s = s + bf[pos].permute(1, 2, 0)[torch.arange(Nq, device=q.device) % Nb].expand(Nq, H, -1)
        m = s.amax(-1, keepdim=True) if pos.numel() else s.new_full((Nq, H, 1), float("-inf"))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(s - m)
        lsum = e.sum(-1, keepdim=True)
        empty = lsum == 0
        p = e / torch.where(empty, torch.ones_like(lsum), lsum)
        outs.append(torch.einsum("nhl,lhd->nhd", p, vf[pos]))
        lse = m + torch.log(torch.where(empty, torch.ones_like(lsum), lsum))
        lses.append(torch.where(empty, torch.full_like(lse, float("-inf")), lse)[..., 0])
    return torch.stack(outs), torch.stack(lses)


def _formula_grads(q, k, v, bias, kwargs, scale, grad_out, grad_lse, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias)]
    out, lse = _formula(*leaves, kwargs, scale)
    fin = torch.isfinite(lse)
    loss = (out * grad_out.to(dtype)).sum() + (lse[fin] * grad_lse.to(dtype)[fin]).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return (out.detach(), lse.detach()) + tuple(
        torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves))


def _run(q, k, v, bias, kwargs, **launch):
    """The launchers: forward, then backward with delta formed as the autograd forms it."""
    scale = q.shape[-1] ** -0.5
    idx = dict(lengths=kwargs.get("lengths"), mask=kwargs.get("mask"),
               offsets=kwargs.get("offsets"), max_length=kwargs.get("max_length", -1) or -1)
    out, lse = K.attention_pool_fwd(q, k, v, scale=scale, bias=bias, out_dtype=torch.float32,
                                    **idx, **launch)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE)
    grad_lse = torch.randn(lse.shape, generator=g).to(DEVICE)
    delta = (grad_out.to(q.dtype).float() * out).sum(-1) - torch.where(torch.isfinite(lse), grad_lse, 0.0)
    grads = K.attention_pool_bwd(grad_out.to(q.dtype), q, k, v, lse, delta, scale=scale, bias=bias,
                                 block_l=launch.get("block_l"), **idx)
    return (out, lse) + tuple(grads), grad_out, grad_lse


def _check(B, N, H, L, D, Nb, Hb, layout, dtype=torch.float32, neg_inf=True, bias_dtype=None, **launch):
    (q, k, v), kwargs = make_problem(B, N, H, L, D, D, dtype=dtype, layout=layout, device=DEVICE,
                                     extra_rows=3)
    kwargs.pop("max_length", None)
    bias = _bias_for(k, kwargs, Nb, Hb, bias_dtype or dtype, neg_inf=neg_inf)
    got, grad_out, grad_lse = _run(q, k, v, bias, kwargs, **launch)
    scale = D ** -0.5
    ref = _formula_grads(q, k, v, bias, kwargs, scale, grad_out, grad_lse, torch.float64)
    lowp = _formula_grads(q, k, v, bias, kwargs, scale, grad_out, grad_lse, dtype)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    for name, g, lp, r in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, lowp, ref):
        if name == "lse":
            fin = torch.isfinite(r)
            g, lp, r = g[fin], lp[fin], r[fin]
        c = compare(name, g.double().cpu(), lp.double().cpu(), r.cpu(), dtype)
        assert c.ok, c.message()
    dbias = got[5]
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
    # Exactly 0 (and never NaN: the NaN there was never read) where no row reads the bias.
    unused = unused_positions(k, kwargs).to(DEVICE)
    db_lead = dbias if "offsets" in kwargs else dbias.permute(0, 3, 1, 2)
    assert (db_lead[unused] == 0).all()
    assert torch.isfinite(got[0]).all()
    return got


# (Nq, H, Nb, Hb) at the op level, one per way the bias gradient is reduced:
CASES = [
    (5, 2, 1, 2),   # shared by the queries, per head: column sums of each dk/dv program
    (5, 2, 1, 1),   # one row for every query and head: per-head partials, summed after
    (5, 2, 5, 2),   # per query and head: each ds written once
    (3, 1, 3, 1),   # per query, one head
    (6, 2, 2, 2),   # a row per query head of a folded group (Nb = G): the dbias kernel
    (4, 2, 4, 1),   # per query, one row for both heads: the dbias kernel
]


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("Nq,H,Nb,Hb", CASES)
def test_bias_matches_formula(layout, Nq, H, Nb, Hb):
    _check(B=4, N=Nq, H=H, L=19, D=8, Nb=Nb, Hb=Hb, layout=layout)


@pytest.mark.parametrize("Nb,Hb", [(1, 1), (17, 2)])
def test_bias_tl_dot_path_with_mask(Nb, Hb):
    # 17 queries: tl.dot query blocks; a [B, L] mask layout.
    _check(B=3, N=17, H=2, L=20, D=16, Nb=Nb, Hb=Hb, layout="mask")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bias_low_precision(dtype):
    # bias float32 with 16-bit inputs (the other allowed bias dtype is the query's)
    _check(B=3, N=2, H=2, L=20, D=16, Nb=1, Hb=2, layout="lengths", dtype=dtype,
           bias_dtype=torch.float32)


def test_bias_split_l_forward():
    (q, k, v), kwargs = make_problem(2, 2, 2, 70, 8, 8, layout="lengths", lengths=[70, 33],
                                     device=DEVICE)
    bias = _bias_for(k, kwargs, 1, 2, torch.float32)
    one = K.attention_pool_fwd(q, k, v, lengths=kwargs["lengths"], bias=bias, num_splits=1)
    split = K.attention_pool_fwd(q, k, v, lengths=kwargs["lengths"], bias=bias, num_splits=3)
    torch.testing.assert_close(split[0], one[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(split[1], one[1], atol=1e-5, rtol=1e-5)


def test_bias_all_neg_inf_row_is_empty():
    (q, k, v), kwargs = make_problem(2, 3, 1, 9, 4, 4, layout="lengths", lengths=[9, 5],
                                     device=DEVICE)
    bias = torch.zeros(2, 1, 1, 9, device=DEVICE)
    bias[1] = float("-inf")
    got, _, _ = _run(q, k, v, bias, kwargs)
    out, lse, dq, dk, dv, dbias = got
    assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all() and (dbias[1] == 0).all()
    assert torch.isfinite(lse[0]).all()


def test_bias_nan_at_a_valid_position_propagates():
    (q, k, v), kwargs = make_problem(2, 1, 1, 9, 4, 4, layout="lengths", lengths=[9, 5],
                                     device=DEVICE)
    bias = torch.zeros(2, 1, 1, 9, device=DEVICE)
    bias[0, 0, 0, 2] = float("nan")
    out, lse = K.attention_pool_fwd(q, k, v, lengths=kwargs["lengths"], bias=bias)
    assert torch.isnan(lse[0]).all() and torch.isnan(out[0]).all()
    assert torch.isfinite(lse[1]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("Nb,Hb", [(1, 1), (2, 2)])
def test_bias_gradient_is_deterministic(Nb, Hb):
    # The cross-program sums (per-head partials, the dbias kernel) run in a fixed order.
    (q, k, v), kwargs = make_problem(2, 4, 2, 21, 8, 8, layout="jagged", device=DEVICE)
    kwargs.pop("max_length", None)
    bias = _bias_for(k, kwargs, Nb, Hb, torch.float32)
    a = _run(q, k, v, bias, kwargs)[0]
    b = _run(q, k, v, bias, kwargs)[0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# Through attnkern.attention_pool (the ops, their autograd, the public function's fold of
# shared K/V heads) against the float64 reference with the suite's checking body.
@pytest.mark.parametrize("layout,kind,Hb,Hkv,N", [
    ("lengths", "shared", 1, 2, 3),    # one row for every head: per-head partials
    ("jagged", "per_query", 2, 1, 2),  # the heads folded into a group: a row per query
    ("mask", "shared", 2, 1, 2),       # folded, shared by the candidates: the dbias kernel
])
def test_public_bias_on_triton(layout, kind, Hb, Hkv, N):
    args, kwargs = make_problem(B=3, N=N, H=2, Hkv=Hkv, L=13, Dk=8, Dv=8, layout=layout,
                                device=DEVICE, bias=kind, bias_heads=Hb)
    check_backend("triton", args, kwargs)
