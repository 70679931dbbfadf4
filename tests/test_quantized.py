"""Quantized keys and values (docs/quantized.md): quantize_rows against FBGEMM's row-wise op,
FBGEMM's fused row layout, and the CPU kernel against the reference over dequantized rows:
every layout, N (the per-query and the tiled path, several query chunks), shared K/V heads,
the score bias, empty rows, rows whose scale is 0, extreme values, NaN/inf rules, every
instruction set; bad input and the forward-only rule."""

import functools
import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.reference import FP8_MAX, QUANT_DTYPES, dequantize_rows
from attnkern.testing import FLOOR, make_problem
from attnkern.tools import _fbgemm

needs_cpu = pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
QDTYPES = list(QUANT_DTYPES)
LAYOUTS = ("lengths", "mask", "jagged", "full")


def quantized(args, kw, qdtype, bias_free=False):
    """(q, key data, value data, the four per-row parameters as attention_pool kwargs)."""
    q, k, v = args[:3]
    kd, ks, kb = attnkern.quantize_rows(k, qdtype)
    vd, vs, vb = attnkern.quantize_rows(v, qdtype)
    params = dict(key_scale=ks, key_bias=None if bias_free else kb, value_scale=vs,
                  value_bias=None if bias_free else vb)
    return q, kd, vd, params


def run(backend, q, kd, vd, params, kw, **extra):
    with torch.no_grad():
        return attnkern.attention_pool(q, kd, vd, **kw, **params, **extra, backend=backend, return_lse=True)


def assert_matches(got, want, dtype, lse_extra=0.0):
    (o, lse), (ro, rlse) = got, want
    assert o.dtype == ro.dtype == dtype
    tol = FLOOR[dtype] * max(1.0, ro.float().abs().max().item())
    torch.testing.assert_close(o.float(), ro.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse, rlse, atol=FLOOR[torch.float32] * max(1.0, rlse.nan_to_num(0, 0, 0).abs().max().item())
                               + lse_extra, rtol=0, equal_nan=True)


def integer_query_bound(q, kd, key_scale):
    """What holding a bf16/fp16 query as 15-bit integers (docs/quantized.md) may move a score
    by: |q|max / 16256 per element (the power-of-two step), times the row's sum of |codes|
    times its scale, times the softmax scale; lse moves by at most the largest such change."""
    codes = kd.float().abs().sum(-1) * key_scale.abs()
    return q.float().abs().max().item() / 16256 * codes.max().item() * q.shape[-1] ** -0.5


# ---- quantize_rows --------------------------------------------------------------------------


@pytest.mark.skipif(_fbgemm.fbgemm_status() is not None, reason=str(_fbgemm.fbgemm_status()))
def test_quantize_rows_is_fbgemm_rowwise():
    """uint8 gives FBGEMM's fused bytes exactly; int8 the same codes shifted by 128; the fused
    layout splits back into them."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 33, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)
    x[3] = 2.5  # a constant row: scale 0, codes 0
    x[4, :5] = 1e4
    fused = torch.ops.fbgemm.FloatToFused8BitRowwiseQuantized(x)
    data, scale, bias = attnkern.split_fused_rows(fused)
    d8, s8, b8 = attnkern.quantize_rows(x, torch.uint8)
    assert torch.equal(d8, data) and torch.equal(s8, scale) and torch.equal(b8, bias)
    di, si, bi = attnkern.quantize_rows(x, torch.int8)
    assert torch.equal((di.int() + 128).to(torch.uint8), data) and torch.equal(si, scale)
    torch.testing.assert_close(bi, bias + 128 * scale, rtol=0, atol=0)
    back = torch.ops.fbgemm.Fused8BitRowwiseQuantizedToFloat(fused)
    # The same values up to one float32 rounding of the row's largest magnitude.
    row_max = x.abs().amax(-1, keepdim=True)
    assert torch.all((dequantize_rows(data, scale, bias) - back).abs() <= 2.0 ** -23 * row_max)


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_quantize_rows_round_trip(qdtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 21, generator=g, dtype=torch.float64) * 3
    x[0, 0] = 0.0  # all-zero row
    x[0, 1] = -7.25  # constant row
    data, scale, bias = attnkern.quantize_rows(x, qdtype)
    assert data.dtype == qdtype and data.shape == x.shape and scale.shape == x.shape[:-1]
    back = dequantize_rows(data, scale, bias, torch.float64)
    if qdtype in (torch.int8, torch.uint8):
        err = (back - x).abs().amax(-1)
        assert torch.all(err <= scale.double() * 0.5 + 1e-5 * x.abs().amax(-1))
        assert torch.equal(back[0, 1], x[0, 1]) and scale[0, 1] == 0  # element = bias exactly
    else:
        assert bias is None
        rel = 2.0 ** -3 if qdtype == torch.float8_e4m3fn else 2.0 ** -2
        amax = x.abs().amax(-1, keepdim=True)
        assert torch.all((back - x).abs() <= rel * x.abs() + amax * 2.0 ** -9 * rel + 1e-12)
        assert data.float().abs().max() <= FP8_MAX[qdtype]
    assert torch.all(back[0, 0] == 0)


def test_quantize_rows_non_finite_rows_dequantize_to_nan():
    x = torch.randn(3, 8)
    x[1, 2] = float("inf")
    x[2, 0] = float("nan")
    for qdtype in QDTYPES:
        data, scale, bias = attnkern.quantize_rows(x, qdtype)
        back = dequantize_rows(data, scale, bias)
        assert torch.isfinite(back[0]).all() and back[1:].isnan().all()


@pytest.mark.parametrize("E", [8, 7])
def test_split_fused_rows(E):
    """Views for 4-byte aligned parameters (E % 4 == 0), copies otherwise."""
    x = torch.randn(5, 2, E)
    data, scale, bias = attnkern.quantize_rows(x, torch.uint8)
    fused = torch.cat([data, torch.stack([scale, bias], -1).view(torch.uint8)], -1)
    d, s, b = attnkern.split_fused_rows(fused)
    assert torch.equal(d, data) and torch.equal(s, scale) and torch.equal(b, bias)
    assert d.data_ptr() == fused.data_ptr()
    assert (s.data_ptr() == fused.data_ptr() + E) == (E % 4 == 0)


# ---- the CPU kernel against the reference ----------------------------------------------------


@needs_cpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("qdtype", QDTYPES)
def test_cpu_matches_reference(layout, qdtype):
    """N = 1 and 3 (per-query path), 6 (tiled), 33 (two query chunks, the second a single query:
    the one-query kernel at a chunk offset); shared K/V heads; odd
    head dims; L = 70 crosses two blocks; empty, one-long and full rows (edge_lengths)."""
    for N, H, Hkv, Dk, Dv, dtype in ((1, 1, 1, 16, 16, torch.float32), (3, 4, 2, 7, 19, torch.bfloat16),
                                     (6, 2, 1, 33, 5, torch.float16), (33, 2, 2, 8, 8, torch.float32)):
        args, kw = make_problem(B=5, N=N, H=H, Hkv=Hkv, L=70, Dk=Dk, Dv=Dv, layout=layout, seed=N)
        q, kd, vd, params = quantized(args, kw, qdtype, bias_free=N == 3)
        q = q.to(dtype)
        assert_matches(run("cpu", q, kd, vd, params, kw), run("reference", q, kd, vd, params, kw), dtype)


@needs_cpu
@pytest.mark.parametrize("qdtype", [torch.int8, torch.uint8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_query_integer_kernel(qdtype, dtype):
    """A bf16/fp16 query, N = 1, int8/uint8 rows: on the avx512_bf16 and amx paths the kernel
    that keeps the bytes 8-bit (VNNI integer dot products; elsewhere the float kernel, the same
    checks). Head dims 16/32/64 (4, 2 or 1 rows per vector), Dv 16 (summed by the float code)
    to 64, H 1-16, shared K/V heads and jagged rows (the row-by-row reads) and contiguous ones,
    L = 70 (three blocks, the last ending inside a group of rows), empty rows; a value scale
    of 0, 1e30 and a NaN (its block summed by the float code, the row NaN), a key scale of
    1e-30; lse within the bound the integer query allows."""
    for H, Hkv, Dk, Dv, layout in ((4, 4, 32, 32, "lengths"), (1, 1, 64, 64, "jagged"), (2, 2, 16, 64, "full"),
                                   (16, 16, 16, 32, "lengths"), (4, 2, 32, 64, "jagged"), (8, 8, 64, 32, "lengths"),
                                   (2, 2, 16, 16, "lengths")):
        args, kw = make_problem(B=5, N=1, H=H, Hkv=Hkv, L=70, Dk=Dk, Dv=Dv, layout=layout, seed=H + Dk)
        q, kd, vd, params = quantized(args, kw, qdtype)
        q = (q * 3).to(dtype)
        if layout == "lengths":
            params["value_scale"][1, :7] = 0
            params["value_scale"][2, 40:] = 1e30
            params["key_scale"][3, 5:9] = 1e-30
        bound = integer_query_bound(q, kd, params["key_scale"])
        assert_matches(run("cpu", q, kd, vd, params, kw), run("reference", q, kd, vd, params, kw), dtype, bound)
    params["value_scale"][4, 33] = float("nan")
    out, _ = run("cpu", q, kd, vd, params, kw)
    ref, _ = run("reference", q, kd, vd, params, kw)
    assert out[4].isnan().all() and ref[4].isnan().all() and not out[:4].isnan().any()


@needs_cpu
@pytest.mark.parametrize("kind", ["shared", "per_query"])
def test_cpu_score_bias(kind):
    for N, H, Hkv, layout in ((1, 2, 2, "jagged"), (5, 4, 2, "mask")):
        args, kw = make_problem(B=4, N=N, H=H, Hkv=Hkv, L=40, Dk=8, Dv=8, layout=layout, bias=kind,
                                bias_heads=1 if N == 1 else H, seed=3)
        q, kd, vd, params = quantized(args, kw, torch.int8)
        bias = args[3]
        bias.view(-1)[::7] = float("-inf")  # dropped positions
        assert_matches(run("cpu", q, kd, vd, params, kw, bias=bias),
                       run("reference", q, kd, vd, params, kw, bias=bias), torch.float32)


# The bodies below take the backend under test as run_backend(q, kd, vd, params, kw) -> (out, lse)
# on CPU tensors (tests/test_quantized_cuda.py passes the cuda backend's).


@needs_cpu
def test_empty_and_zero_scale_rows_and_extremes():
    check_empty_and_zero_scale_rows_and_extremes(functools.partial(run, "cpu"))


def check_empty_and_zero_scale_rows_and_extremes(run_backend):
    """Empty rows give 0 / -inf; rows whose scale is 0 stand for their bias; huge scales and
    biases (1e30) and tiny ones (1e-30) stay as accurate as the reference's float32."""
    args, kw = make_problem(B=4, N=2, H=2, L=35, Dk=9, Dv=6, layout="lengths", lengths=[0, 35, 1, 20])
    q, kd, vd, params = quantized(args, kw, torch.uint8)
    params["key_scale"][1, :10] = 0
    params["value_scale"][1, 5:] = 0
    params["value_scale"][2] = 1e30
    params["value_bias"][2] = -1e30
    params["key_scale"][3] = 1e-30
    out, lse = run_backend(q, kd, vd, params, kw)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert_matches((out, lse), run("reference", q, kd, vd, params, kw), torch.float32)


@needs_cpu
@pytest.mark.parametrize("qdtype", [torch.uint8, torch.float8_e4m3fn])
def test_non_finite_rules(qdtype):
    check_non_finite_rules(functools.partial(run, "cpu"), qdtype)


def check_non_finite_rules(run_backend, qdtype):
    """A NaN at a valid position (in the data or a row's scale/bias) makes its row NaN, as in
    the reference; at a position outside every row it changes nothing."""
    args, kw = make_problem(B=3, N=1, H=1, L=20, Dk=8, Dv=8, layout="lengths", lengths=[10, 10, 10])
    q, kd, vd, params = quantized(args, kw, qdtype)
    base, _ = run_backend(q, kd, vd, params, kw)
    if qdtype == torch.float8_e4m3fn:
        kd.view(torch.uint8)[0, 3, 0, 2] = 0x7F  # e4m3fn's NaN
        kd.view(torch.uint8)[2, 15, 0, 2] = 0x7F  # past the row's length
    params["value_scale"][1, 4] = float("nan")
    params["value_scale"][2, 12] = float("nan")
    params["key_scale"][2, 19] = float("inf")
    out, lse = run_backend(q, kd, vd, params, kw)
    ref, _ = run("reference", q, kd, vd, params, kw)
    assert out[1].isnan().all() and ref[1].isnan().all()
    assert out[0].isnan().all() == (qdtype == torch.float8_e4m3fn) == ref[0].isnan().all().item()
    assert torch.equal(out[2], base[2])


@needs_cpu
def test_strided_rows_and_fused_layout():
    check_strided_rows_and_fused_layout(functools.partial(run, "cpu"))


def check_strided_rows_and_fused_layout(run_backend):
    """K/V read through views with row strides (FBGEMM's fused rows split without a copy)."""
    args, kw = make_problem(B=3, N=2, H=2, L=12, Dk=12, Dv=12, layout="jagged")
    q, k, v = args
    fused = [torch.cat([d, torch.stack([s, b], -1).view(torch.uint8)], -1)
             for d, s, b in (attnkern.quantize_rows(t, torch.uint8) for t in (k, v))]
    (kd, ks, kb), (vd, vs, vb) = (attnkern.split_fused_rows(f) for f in fused)
    assert not kd.is_contiguous()
    params = dict(key_scale=ks, key_bias=kb, value_scale=vs, value_bias=vb)
    assert_matches(run_backend(q, kd, vd, params, kw), run("reference", q, kd, vd, params, kw), torch.float32)


@needs_cpu
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_isa_path(isa):
    """The narrower instruction sets' kernels (ATTNKERN_CPU_ISA, chosen once per process) in a
    subprocess; the rest of this file runs the widest one this CPU has (avx512, which avx512_bf16
    and amx run too). scripts/sanitize_cpu.sh runs the file on emulated avx512 as well."""
    code = (
        "import torch, attnkern\n"
        "from attnkern.testing import make_problem\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "import test_quantized as t\n"
        "for qd in t.QDTYPES:\n"
        "    for layout, N, H, Hkv, Dk in (('mask', 1, 2, 1, 20), ('jagged', 6, 2, 2, 7), ('lengths', 3, 1, 1, 17)):\n"
        "        args, kw = make_problem(B=3, N=N, H=H, Hkv=Hkv, L=45, Dk=Dk, Dv=Dk + 3, layout=layout)\n"
        "        q, kd, vd, p = t.quantized(args, kw, qd)\n"
        "        t.assert_matches(t.run('cpu', q, kd, vd, p, kw), t.run('reference', q, kd, vd, p, kw), torch.float32)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@needs_cpu
def test_opcheck():
    args, kw = make_problem(B=2, N=3, H=2, L=9, Dk=4, Dv=4, layout="lengths")
    q, kd, vd, p = quantized(args, kw, torch.int8)
    op = torch.ops.attnkern.attention_pool_quant_fwd
    torch.library.opcheck(op, (q, kd, vd, p["key_scale"], p["key_bias"], p["value_scale"], p["value_bias"],
                               kw["lengths"], None, None, -1, 0.5), test_utils=("test_schema", "test_faketensor"))


# ---- bad input -------------------------------------------------------------------------------


def _call(**over):
    args, kw = make_problem(B=2, N=1, H=2, L=6, Dk=4, Dv=4, layout="lengths")
    q, kd, vd, p = quantized(args, kw, torch.int8)
    call = dict(query=q, key=kd, value=vd, **kw, **p)
    call.update(over)
    return call


@pytest.mark.parametrize("over,exc,words", [
    (dict(key_scale=None), ValueError, "key_scale"),
    (dict(value_scale=torch.ones(2, 6, 2, dtype=torch.float64)), TypeError, "value_scale must be torch.float32"),
    (dict(key_bias=torch.ones(2, 6)), ValueError, "key_bias must have the shape"),
    (dict(value=torch.zeros(2, 6, 2, 4, dtype=torch.uint8)), TypeError, "value must have the stored dtype"),
    (dict(key=torch.zeros(2, 6, 2, 4)), TypeError, "key must be quantized"),
])
def test_bad_input(over, exc, words):
    with torch.no_grad(), pytest.raises(exc, match=words):
        attnkern.attention_pool(**_call(**over))


@needs_cpu
def test_float64_query_runs_the_reference_on_auto_and_is_refused_by_cpu():
    call = _call()
    call["query"] = call["query"].double()
    with torch.no_grad():
        out = attnkern.attention_pool(**call)
        assert out.dtype == torch.float64
        with pytest.raises(TypeError, match="float64"):
            attnkern.attention_pool(**call, backend="cpu")


def test_forward_only():
    call = _call()
    call["query"] = call["query"].requires_grad_()
    with pytest.raises(ValueError, match="forward-only, but query requires grad"):
        attnkern.attention_pool(**call)
    with torch.no_grad():
        assert not attnkern.attention_pool(**call).requires_grad


@needs_cpu
def test_raw_op_refuses_a_gradient_and_bad_params():
    call = _call()
    op = torch.ops.attnkern.attention_pool_quant_fwd
    q = call["query"].requires_grad_()
    out, _ = op(q, call["key"], call["value"], call["key_scale"], call["key_bias"], call["value_scale"],
                call["value_bias"], call["lengths"], None, None, -1, 0.5)
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()
    with pytest.raises(ValueError, match="key_scale must have shape"):
        op(q.detach(), call["key"], call["value"], call["key_scale"][:, :3], None, call["value_scale"], None,
           None, None, None, -1, 0.5)
    with pytest.raises(ValueError, match="lengths"):
        op(q.detach(), call["key"], call["value"], call["key_scale"], None, call["value_scale"], None,
           torch.tensor([7, 1]), None, None, -1, 0.5)


# ---- layer and model -------------------------------------------------------------------------


def _ctr(qdtype, **kw):
    import copy

    from attnkern.models import TargetAttentionCTR

    torch.manual_seed(0)
    m = TargetAttentionCTR(60, 16, 2, **kw).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("_bias_weight"):
                p.normal_()
    same = copy.deepcopy(m)
    m.quantize_(qdtype)
    with torch.no_grad():  # the float model of the very values the quantized table stands for
        same.embedding.weight.copy_(dequantize_rows(m.item_codes, m.item_scale, m.item_bias))
    return m, same


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_ctr_serves_from_the_quantized_table(qdtype):
    m, same = _ctr(qdtype, time_buckets=8, recency_buckets=4)
    assert m.quantized and not any(p.requires_grad for p in m.parameters())
    g = torch.Generator().manual_seed(2)
    hist, tgt = torch.randint(1, 60, (4, 9), generator=g), torch.randint(1, 60, (4, 3), generator=g)
    lens, tt = torch.tensor([0, 9, 3, 5]), torch.randint(0, 10 ** 6, (4,), generator=g)
    ht = torch.randint(0, 10 ** 6, (4, 9), generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(m(hist, tgt, lens, ht, tt), same(hist, tgt, lens, ht, tt), atol=2e-5, rtol=0)


def test_layer_without_projections_and_its_rules():
    from attnkern.nn import AttentionPooling

    layer = AttentionPooling(16, 2, projections=False)
    x, q, lens = torch.randn(3, 10, 16), torch.randn(3, 2, 16), torch.tensor([1, 10, 0])
    d, s, b = attnkern.quantize_rows(x, torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(layer(q, d, key_scale=s, key_bias=b, lengths=lens),
                                   layer(q, dequantize_rows(d, s, b), lengths=lens), atol=2e-6, rtol=0)
        with pytest.raises(ValueError, match="absorbed order"):
            AttentionPooling(16, 2, absorb=False)(q, d, key_scale=s, key_bias=b, lengths=lens)
    with pytest.raises(ValueError, match="attention pooling"):
        from attnkern.models import TargetAttentionCTR

        TargetAttentionCTR(10, 8, pooling="sum").quantize_()



@pytest.mark.slow
def test_onnx_quantized_ctr_fresh_process(tmp_path):
    """ONNX export of a model serving from an int8 table: the op becomes an explicit dequantize
    (Cast, Mul, Add) and the float translation; run by onnxruntime in a fresh process."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from attnkern.tools import export as ex

    m, _ = _ctr(torch.int8)
    path = ex.export_onnx(m, str(tmp_path / "q.onnx"))
    records = ex.check_export("onnx", path, m)
    assert records and all(r["ok"] and not r["attnkern_imported"] for r in records), records
