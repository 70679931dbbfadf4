"""attnkern's ops in standard ONNX: masked softmax attention written with onnxscript.

`torch.onnx.export` has no translation for the ``attnkern::`` namespace, so an exported graph
would hold ops that no ONNX runtime knows. These functions spell each forward op in plain
ONNX (MatMul, Where, ReduceMax, Exp, ...), so that any runtime (onnxruntime, TensorRT, ...)
can serve the model; what runs there is the runtime's own kernels, not attnkern's fused
kernel: the [B, H, N, L] scores are materialised.

One translation body (`_pool`), two exporters:

- `translation_table`: the ``custom_translation_table`` of ``torch.onnx.export(...,
  dynamo=True)`` (torch.export, then onnxscript; the default);
- `register_torchscript_symbolics`: symbolics for the legacy TorchScript exporter
  (``dynamo=False``), which needs no onnxscript.

Semantics are the op's (docs/contract.md §1): float32 accumulation (float64 for float64 inputs), a row
with no valid position gives out = 0 and lse = -inf, shared K/V heads (H a multiple of Hkv)
are grouped by a reshape, never copied per query head. The value checks of the C++ ops
(lengths in [0, L], monotone offsets) are not in the graph: a length > L acts as L.

Imported only by the export tool: onnx/onnxscript are optional (the ``export`` extra).
"""

from __future__ import annotations

import math

from .schemas import INFER_OPS, LAYOUT_OPS, TRITON_PREFIX, qualified

OPSET = 18  # ReduceMax/ReduceSum take axes as an input from opset 18 on

# onnx.TensorProto enum values, spelled out so that importing this module needs neither onnx
# nor onnxscript (the TorchScript path needs neither).
_FLOAT, _INT64, _BOOL, _DOUBLE = 1, 7, 9, 11
_INT64_MAX = 2 ** 63 - 1


def _acc_type(dtype_name: str) -> int:
    return _DOUBLE if dtype_name in ("DOUBLE", "Double", "float64") else _FLOAT


# --------------------------------------------------------------------------- the translation


def _pool(op, query, key, value, valid, scale, acc, bias=None):
    """out [B, N, H, Dv] (query's dtype) and lse [B, N, H] float32 from query [B, N, H, Dk],
    key/value [Bk, L, Hkv, D] (Bk = B, or 1 for jagged keys shared by every row), valid
    [B, L] bool (None: every position) and bias (None, or laid out as the scores
    [B or 1, Hb, Nb, L] with Hb in {1, Hkv}: attention_pool gives the ops a bias only with one
    query head per K/V head, so G = 1 then)."""
    q = op.Cast(query, to=acc)
    k = op.Cast(key, to=acc)
    v = op.Cast(value, to=acc)
    qs, ks, vs = op.Shape(q), op.Shape(k), op.Shape(v)
    B, N = op.Slice(qs, [0], [1]), op.Slice(qs, [1], [2])
    H, Dk = op.Slice(qs, [2], [3]), op.Slice(qs, [3], [4])
    Hkv, Dv = op.Slice(ks, [2], [3]), op.Slice(vs, [3], [4])
    G = op.Div(H, Hkv)
    # Query head h reads K/V head h // G (SDPA's enable_gqa): the G query heads of a K/V head
    # join its N queries, [B, N, Hkv, G, Dk] -> [B, Hkv, G*N, Dk], and one MatMul per K/V head
    # scores them all, without copying K/V per query head.
    q = op.Reshape(q, op.Concat(B, N, Hkv, G, Dk, axis=0))
    q = op.Transpose(q, perm=[0, 2, 3, 1, 4])
    q = op.Reshape(q, op.Concat(B, Hkv, op.Constant(value_ints=[-1]), Dk, axis=0))
    kt = op.Transpose(k, perm=[0, 2, 3, 1])  # [Bk, Hkv, Dk, L]
    vt = op.Transpose(v, perm=[0, 2, 1, 3])  # [Bk, Hkv, L, Dv]
    s = op.Mul(op.MatMul(q, kt), _scalar(op, scale, acc))
    if bias is not None:  # before the mask: a masked position's bias is never read
        # Query n of the scores reads bias row n % Nb (a bias shared by the N queries of a
        # row, folded with G query heads, has Nb = G): tiled to the scores' N.
        one = op.Constant(value_ints=[1])
        reps = op.Div(op.Slice(op.Shape(s), [2], [3]), op.Slice(op.Shape(bias), [2], [3]))
        s = op.Add(s, op.Tile(op.Cast(bias, to=acc), op.Concat(one, one, reps, one, axis=0)))
    zero = op.CastLike(op.Constant(value_float=0.0), s)
    if valid is not None:
        minus_inf = op.CastLike(op.Constant(value_float=-math.inf), s)
        s = op.Where(op.Unsqueeze(valid, [1, 2]), s, minus_inf)  # [B, Hkv, G*N, L]
    m = op.ReduceMax(s, [-1], keepdims=1)
    # An empty row's max is -inf: shifting it by 0 instead keeps exp(-inf - 0) = 0, not NaN.
    m = op.Where(op.IsInf(m, detect_positive=0), zero, m)
    e = op.Exp(op.Sub(s, m))
    den = op.ReduceSum(e, [-1], keepdims=1)
    lse = op.Add(op.Log(den), m)  # log(0) = -inf for an empty row
    # An empty row has e = 0 everywhere: dividing by 1 pools it to 0.
    p = op.Div(e, op.Where(op.Equal(den, zero), op.CastLike(op.Constant(value_float=1.0), s), den))
    o = op.MatMul(p, vt)  # [B, Hkv, G*N, Dv]
    o = op.Reshape(o, op.Concat(B, Hkv, G, N, Dv, axis=0))
    o = op.Reshape(op.Transpose(o, perm=[0, 3, 1, 2, 4]), op.Concat(B, N, H, Dv, axis=0))
    lse = op.Reshape(lse, op.Concat(B, Hkv, G, N, axis=0))
    lse = op.Reshape(op.Transpose(lse, perm=[0, 3, 1, 2]), op.Concat(B, N, H, axis=0))
    return op.CastLike(o, query), op.Cast(lse, to=_FLOAT)


def _scalar(op, value: float, acc: int):
    """A scalar constant of the accumulation type (a float64 scale must not round to fp32)."""
    if isinstance(op, _GraphOps):
        return op.scalar(value, acc)
    import numpy as np
    from onnx import numpy_helper

    arr = np.array(value, dtype=np.float64 if acc == _DOUBLE else np.float32)
    return op.Constant(value=numpy_helper.from_array(arr))


def _arange(op, n):
    """[0, 1, ..., n - 1] (int64) for a size n given as a 1-element shape slice."""
    return op.Range(op.Constant(value_int=0), op.Squeeze(n, [0]), op.Constant(value_int=1))


def _padded(op, query, key, value, lengths, mask, scale, acc, bias=None):
    if bias is not None:
        bias = op.Transpose(bias, perm=[0, 2, 1, 3])  # [B, Nb, Hb, L] -> [B, Hb, Nb, L]
    if mask is not None:
        valid = op.Cast(mask, to=_BOOL)
    elif lengths is not None:
        pos = _arange(op, op.Slice(op.Shape(key), [1], [2]))  # [L]
        valid = op.Less(op.Unsqueeze(pos, [0]), op.Unsqueeze(op.Cast(lengths, to=_INT64), [1]))
    else:
        valid = None
    return _pool(op, query, key, value, valid, scale, acc, bias)


def _jagged(op, query, key, value, offsets, scale, acc, bias=None):
    # Row b is key[offsets[b]:offsets[b + 1]]: every row scores all T keys and masks the ones
    # outside its span ([B, T] scores per query: fine for serving-sized T, not a fused kernel).
    pos = op.Unsqueeze(_arange(op, op.Slice(op.Shape(key), [0], [1])), [0])  # [1, T]
    off = op.Cast(offsets, to=_INT64)
    start = op.Unsqueeze(op.Slice(off, [0], [-1]), [1])  # [B, 1]
    end = op.Unsqueeze(op.Slice(off, [1], [_INT64_MAX]), [1])
    valid = op.And(op.GreaterOrEqual(pos, start), op.Less(pos, end))  # [B, T]
    if bias is not None:  # [T, Nb, Hb] -> [1, Hb, Nb, T]: every row scores all T keys
        bias = op.Unsqueeze(op.Transpose(bias, perm=[2, 1, 0]), [0])
    return _pool(op, query, op.Unsqueeze(key, [0]), op.Unsqueeze(value, [0]), valid, scale, acc,
                 bias)


# --------------------------------------------------------------------------- dynamo exporter


def _dtype_name(x) -> str:
    dtype = getattr(x, "dtype", None)
    return getattr(dtype, "name", str(dtype))


def attention_pool_fwd(query, key, value, lengths=None, mask=None, scale=1.0, bias=None):
    """ONNX translation of ``attnkern::attention_pool_fwd`` (padded layout)."""
    from onnxscript import opset18 as op

    return _padded(op, query, key, value, lengths, mask, scale, _acc_type(_dtype_name(query)), bias)


def jagged_attention_pool_fwd(query, key, value, offsets, max_length=-1, scale=1.0, bias=None):
    """ONNX translation of ``attnkern::jagged_attention_pool_fwd`` (max_length only sizes
    GPU launches: unused here)."""
    from onnxscript import opset18 as op

    return _jagged(op, query, key, value, offsets, scale, _acc_type(_dtype_name(query)), bias)


def _dequantize(op, data, scale, bias):
    """data * scale + bias per row, float32: the explicit dequantize of quantized K/V (ONNX's
    DequantizeLinear takes one scale per tensor or per axis, not one per row)."""
    x = op.Mul(op.Cast(data, to=_FLOAT), op.Unsqueeze(scale, [-1]))
    return x if bias is None else op.Add(x, op.Unsqueeze(bias, [-1]))


def attention_pool_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias,
                             lengths=None, mask=None, offsets=None, max_length=-1, scale=1.0, bias=None):
    """ONNX translation of ``attnkern::attention_pool_quant_fwd`` (int8/uint8 K/V; opset 18 has
    no float8 Cast): the rows dequantized explicitly, then the float translation."""
    from onnxscript import opset18 as op

    k = _dequantize(op, key, key_scale, key_bias)
    v = _dequantize(op, value, value_scale, value_bias)
    if offsets is None:
        return _padded(op, query, k, v, lengths, mask, scale, _FLOAT, bias)
    return _jagged(op, query, k, v, offsets, scale, _FLOAT, bias)


def _registered_ops(translations):
    """(qualified name, op packet, translation) of each attnkern forward op registered in this
    process: the C++ ones when attnkern._C is built, the Triton ones once they are imported."""
    import torch

    found = []
    for prefix in ("", TRITON_PREFIX):
        for layout, fn in translations.items():
            # The inference op (C++ only) computes the same function: one translation.
            for name in (prefix + LAYOUT_OPS[layout][0],) + ((INFER_OPS[layout],) if not prefix else ()):
                if hasattr(torch.ops.attnkern, name):  # False when the op is not registered
                    found.append((qualified(name), getattr(torch.ops.attnkern, name), fn))
    return found


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``."""
    import torch

    translations = {"padded": attention_pool_fwd, "jagged": jagged_attention_pool_fwd}
    table = {packet.default: fn for _, packet, fn in _registered_ops(translations)}
    if hasattr(torch.ops.attnkern, "attention_pool_quant_fwd"):
        table[torch.ops.attnkern.attention_pool_quant_fwd.default] = attention_pool_quant_fwd
    return table


# --------------------------------------------------------------------------- TorchScript exporter


class _GraphOps:
    """The ``op.Name(*inputs, attr=...)`` calls of `_pool` on a TorchScript graph
    (``g.op("Name", *inputs, attr_i=...)``), so that both exporters share one translation."""

    def __init__(self, g):
        self._g = g

    def _input(self, x):
        import torch

        if isinstance(x, (list, tuple, int)):
            return self._g.op("Constant", value_t=torch.tensor(x, dtype=torch.int64))
        return x

    def Constant(self, value_float=None, value_int=None, value_ints=None):  # noqa: N802
        import torch

        if value_ints is not None:
            return self._g.op("Constant", value_t=torch.tensor(value_ints, dtype=torch.int64))
        if value_float is not None:
            return self._g.op("Constant", value_t=torch.tensor(value_float, dtype=torch.float32))
        return self._g.op("Constant", value_t=torch.tensor(value_int, dtype=torch.int64))

    def scalar(self, value, acc):
        import torch

        dtype = torch.float64 if acc == _DOUBLE else torch.float32
        return self._g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    def __getattr__(self, name):
        def build(*inputs, **attrs):
            kw = {k + ("_f" if isinstance(v, float) else "_i"): v for k, v in attrs.items()}
            return self._g.op(name, *[self._input(x) for x in inputs], **kw)

        return build


def _ts_scalar_type(x) -> str:
    try:
        return x.type().scalarType() or "Float"
    except RuntimeError:
        return "Float"


def _ts_optional(x):
    from torch.onnx import symbolic_helper

    return None if symbolic_helper._is_none(x) else x


def _ts_attention_pool_fwd(g, query, key, value, lengths, mask, scale, bias=None):
    from torch.onnx import symbolic_helper

    scale = symbolic_helper._maybe_get_const(scale, "f")
    return _padded(_GraphOps(g), query, key, value, _ts_optional(lengths), _ts_optional(mask),
                   scale, _acc_type(_ts_scalar_type(query)),
                   None if bias is None else _ts_optional(bias))


def _ts_jagged_attention_pool_fwd(g, query, key, value, offsets, max_length, scale, bias=None):
    from torch.onnx import symbolic_helper

    scale = symbolic_helper._maybe_get_const(scale, "f")
    return _jagged(_GraphOps(g), query, key, value, offsets, scale,
                   _acc_type(_ts_scalar_type(query)), None if bias is None else _ts_optional(bias))


def register_torchscript_symbolics() -> None:
    """Registers the translations with the legacy TorchScript exporter (``dynamo=False``)."""
    import torch

    translations = {"padded": _ts_attention_pool_fwd, "jagged": _ts_jagged_attention_pool_fwd}
    for name, _, fn in _registered_ops(translations):
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
