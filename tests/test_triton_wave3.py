"""The Triton kernels of attention_topk and quantized-K/V attention_pool against the oracles
(attnkern.topk_testing's float64 one, the reference over dequantized rows), the schemas of the
wave's Triton ops (top-k, quantized, weights) against the C++ ops', and the backend choice. On CPU the kernels run through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported): tiny shapes."""

import math

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.ops.schemas import TRITON_PREFIX, WEIGHTS_SCHEMAS, qualified  # noqa: E402
from attnkern.ops.quant import QUANT_FWD  # noqa: E402
from attnkern.ops.topk import TOPK_OP  # noqa: E402
from attnkern.reference import attention_pool_quant_ref  # noqa: E402
from attnkern.testing import make_problem  # noqa: E402
from attnkern.topk_testing import check_topk  # noqa: E402
from test_quantized import assert_matches  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _topk(q, key, k, **kw):
    return attnkern.attention_topk(q, key, k, backend="triton", **kw)


def _on_device(*values):
    def move(x):
        if isinstance(x, dict):
            return {n: move(v) for n, v in x.items()}
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    return [move(v) for v in values]


def _topk_problem(layout, dtype=torch.float32, B=4, N=2, H=2, Hkv=1, L=21, Dk=5, seed=0, bias=None,
                  bias_heads=None):
    args, kw = make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=1, dtype=dtype, layout=layout,
                            seed=seed, bias=bias, bias_heads=bias_heads)
    return _on_device(args[0], args[1], args[3] if bias else None, kw)


# ---- top-k by score ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,dtype", [("lengths", torch.float32), ("mask", torch.bfloat16),
                                          ("jagged", torch.float16), ("full", torch.float32)])
def test_topk_matches_the_oracle(layout, dtype):
    # Empty, one-position, partial and full rows (edge lengths); k = 6 passes the short ones;
    # two query heads share one K/V head.
    q, key, _, kw = _topk_problem(layout, dtype)
    assert check_topk(_topk, q, key, 6, kw) == []


@pytest.mark.parametrize("layout,kind,heads", [("lengths", "per_query", 2), ("jagged", "shared", 1)])
def test_topk_bias_and_many_queries(layout, kind, heads):
    # N = 6 takes the tl.dot query block; -inf bias positions are never selected.
    q, key, bias, kw = _topk_problem(layout, N=6, L=40, bias=kind, bias_heads=heads, seed=3)
    bias.view(-1)[::5] = -math.inf
    assert check_topk(_topk, q, key, 3, kw, bias=bias) == []


def test_topk_head_dim_in_chunks():
    # q.k summed over head-dim chunks (three of 16 for Dk = 40, the last one partly masked), as
    # the GPU launches of wide tiles do.
    from attnkern.triton_kernels.attention_topk import attention_topk_fwd

    q, key, _, kw = _topk_problem("lengths", N=5, L=20, Dk=40, seed=4)

    def chunked(q, key, k, lengths=None, scale=None):
        return attention_topk_fwd(q, key, k, lengths=lengths, scale=scale, block_dc=16)
    assert check_topk(chunked, q, key, 4, kw) == []


def test_topk_ties_nan_k_past_the_row_and_k_zero():
    g = torch.Generator().manual_seed(0)
    # Small integers: exact scores, so ties are exact; 40 positions cross two interpreter tiles.
    q = torch.randint(-1, 2, (3, 1, 2, 4), generator=g).float()
    key = torch.randint(-1, 2, (3, 40, 2, 4), generator=g).float()
    key[1, 7] = math.nan
    lengths = torch.tensor([40, 17, 0])
    q, key, lengths = _on_device(q, key, lengths)
    for k in (5, 45):
        got = _topk(q, key, k, lengths=lengths, scale=1.0)
        want = attnkern.attention_topk_ref(q, key, k, lengths, scale=1.0)
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0))
    assert got[1][1, 0, 0, 0] == 7 and torch.isnan(got[0][1, 0, 0, 0])
    scores, idx = _topk(q, key, 0, lengths=lengths)
    assert scores.shape == idx.shape == (3, 1, 2, 0)


def test_topk_limits_and_direct_op_checks():
    q, key, _, kw = _topk_problem("jagged")
    with pytest.raises(ValueError, match="at most k = 256"):
        _topk(q, key, 257, **kw)
    op = getattr(torch.ops.attnkern, TRITON_PREFIX + TOPK_OP)
    bad = kw["offsets"].clone()
    bad[1] = bad[2] + 1
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            op(q, key, None, None, bad, 3, 1.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        op(q, key, None, None, kw["offsets"], -1, 1.0)
    with pytest.raises(TypeError, match="triton backend supports query"):
        op(q.double(), key.double(), None, None, kw["offsets"], 3, 1.0)


def test_topk_auto_picks_triton_on_cuda_tensors():
    from attnkern.topk import _resolve_topk

    # Only the device type and dtype decide: a stand-in for a CUDA tensor, no GPU needed.
    cuda_like = type("T", (), {"device": torch.device("cuda"), "dtype": torch.float16})()
    assert _resolve_topk("auto", cuda_like, 8) == "triton"
    assert _resolve_topk("auto", cuda_like, 300) == "reference"
    cuda_like.dtype = torch.float64
    assert _resolve_topk("auto", cuda_like, 8) == "reference"


# ---- quantized K/V attention_pool ----------------------------------------------------------------


def _quant_problem(layout, qdtype, dtype=torch.float32, bias_free=False, B=4, N=2, H=2, Hkv=1, L=20, Dk=6,
                   Dv=5, seed=0, **extra):
    args, kw = make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=Dv, layout=layout, seed=seed, **extra)
    kd, ks, kb = attnkern.quantize_rows(args[1], qdtype)
    vd, vs, vb = attnkern.quantize_rows(args[2], qdtype)
    params = dict(key_scale=ks, key_bias=None if bias_free else kb, value_scale=vs,
                  value_bias=None if bias_free else vb)
    q, kd, vd, params, kw = _on_device(args[0].to(dtype), kd, vd, params, kw)
    return q, kd, vd, params, kw, (args[3] if len(args) > 3 else None)


def _pool(backend, q, kd, vd, params, kw, **extra):
    with torch.no_grad():
        return attnkern.attention_pool(q, kd, vd, **kw, **params, **extra, backend=backend, return_lse=True)


@pytest.mark.parametrize("layout,qdtype,dtype,N", [
    ("lengths", torch.int8, torch.float32, 1), ("mask", torch.uint8, torch.bfloat16, 3),
    ("jagged", torch.float8_e4m3fn, torch.float16, 6), ("full", torch.float8_e5m2, torch.float32, 6),
    ("jagged", torch.int8, torch.bfloat16, 1)])
def test_quant_matches_the_reference(layout, qdtype, dtype, N):
    # Edge lengths (empty, one-long, full rows); shared K/V heads; N = 6 takes tl.dot; L = 20
    # crosses two interpreter tiles; no per-row bias for N = 3 (fp8 style scale-only rows).
    q, kd, vd, params, kw, _ = _quant_problem(layout, qdtype, dtype, bias_free=N == 3, N=N, H=4, Hkv=2)
    assert_matches(_pool("triton", q, kd, vd, params, kw), _pool("reference", q, kd, vd, params, kw), dtype)


@pytest.mark.parametrize("layout,kind", [("mask", "per_query"), ("jagged", "shared")])
def test_quant_score_bias(layout, kind):
    q, kd, vd, params, kw, bias = _quant_problem(layout, torch.int8, N=5, H=4, Hkv=2, bias=kind, bias_heads=4,
                                                 seed=3)
    bias.view(-1)[::7] = -math.inf
    (bias,) = _on_device(bias)
    assert_matches(_pool("triton", q, kd, vd, params, kw, bias=bias),
                    _pool("reference", q, kd, vd, params, kw, bias=bias), torch.float32)


def test_quant_empty_zero_scale_extreme_and_non_finite_rows():
    q, kd, vd, params, kw, _ = _quant_problem("lengths", torch.uint8, N=1, H=1, L=20, Dk=8, Dv=8,
                                              lengths=[0, 20, 10, 10])
    params["key_scale"][1, :6] = 0  # rows that stand for their bias
    params["value_scale"][1, 12:] = 0
    params["value_scale"][2] = 1e30
    params["value_bias"][2] = -1e30
    params["key_scale"][3] = 1e-30
    out, lse = _pool("triton", q, kd, vd, params, kw)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)
    assert_matches((out, lse), _pool("reference", q, kd, vd, params, kw), torch.float32)
    # NaN at a valid position makes its row NaN; past the row's length it changes nothing.
    params["value_scale"][1, 4] = math.nan
    params["value_scale"][3, 15] = math.nan
    nan_out, _ = _pool("triton", q, kd, vd, params, kw)
    assert nan_out[1].isnan().all() and torch.equal(nan_out[3], out[3])


def test_quant_split_rows_and_strided_fused_layout():
    from attnkern.triton_kernels.attention_pool_quant import attention_pool_quant_fwd

    q, kd, vd, params, kw, _ = _quant_problem("jagged", torch.uint8, N=1, H=2, Hkv=2, L=40, Dk=8, Dv=8,
                                              lengths=[40, 3, 0, 17])
    want = attention_pool_quant_ref(q, kd, vd, *params.values(), offsets=kw["offsets"], scale=0.5)
    # Three splits of a 40-long row (some empty), merged by the combine kernel.
    got = attention_pool_quant_fwd(q, kd, vd, *params.values(), offsets=kw["offsets"], scale=0.5,
                                   num_splits=3)
    assert_matches(got, want, torch.float32)
    # FBGEMM's fused [.., E + 8] rows read through strided views, parameters of other strides.
    fused = torch.cat([kd, torch.stack([params["key_scale"], params["key_bias"]], -1).view(torch.uint8)], -1)
    kd2, ks2, kb2 = attnkern.split_fused_rows(fused)
    assert not kd2.is_contiguous()
    params2 = dict(params, key_scale=ks2, key_bias=kb2)
    assert_matches(_pool("triton", q, kd2, vd, params2, kw), _pool("reference", q, kd, vd, params, kw),
                    torch.float32)


def test_quant_op_is_forward_only_and_checks_its_inputs():
    q, kd, vd, params, kw, _ = _quant_problem("lengths", torch.int8, N=1, H=2, Hkv=2, L=6, Dk=4, Dv=4)
    op = getattr(torch.ops.attnkern, TRITON_PREFIX + QUANT_FWD)
    p = list(params.values())
    out, _ = op(q.requires_grad_(), kd, vd, *p, kw["lengths"], None, None, -1, 0.5)
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    q = q.detach()
    with pytest.raises(ValueError, match="key_scale must have shape"):
        op(q, kd, vd, p[0][:, :3], None, p[2], None, None, None, None, -1, 0.5)
    with pytest.raises(TypeError, match="value must have the dtype of key"):
        op(q, kd, vd.view(torch.uint8), *p, None, None, None, -1, 0.5)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="lengths must be <= L"):
            op(q, kd, vd, *p, torch.tensor([7, 1, 0, 2]), None, None, -1, 0.5)


@pytest.mark.parametrize("name", [TOPK_OP, QUANT_FWD, *sorted(WEIGHTS_SCHEMAS)])
def test_op_schemas_match_the_cpp_ops(name):
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    cpp = getattr(torch.ops.attnkern, name).default._schema
    tri = getattr(torch.ops.attnkern, TRITON_PREFIX + name).default._schema
    assert str(tri) == qualified(TRITON_PREFIX + name) + str(cpp)[len(qualified(name)):]
