"""The registered ops' input checks, in Python: what the C++ launchers check (csrc/input_checks.h,
csrc/attention_pool_checks.cpp, csrc/activation_unit_checks.cpp), with the same messages.

A call whose tensors include a meta tensor (or that runs under FakeTensorMode) reaches the fake
impl instead of the kernel, so the fake impls of both ops run these checks: they refuse what
the kernels would refuse (ranks, matching sizes, dtypes, layouts and devices; ValueError for
shapes and devices, TypeError for dtypes and layouts). The Python (Triton) activation-unit ops
run them too. Only metadata is read, never values. The public API's own checks, with its own
messages, are attnkern/_validation.py; the contract of both is docs/contract.md.
"""

from __future__ import annotations

import torch

from ..limits import MAX_HEAD_DIM, MAX_UNITS
from ..reference import ACTIVATION_PARAM_ROWS

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(cls, msg, *args):
    raise cls("attnkern: " + (msg % args if args else msg))


def _layout(layout):
    """A layout as the C++ checks print it."""
    return {torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr", torch._mkldnn: "Mkldnn"}.get(layout, str(layout))


def _sizes(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def dense(t, name):
    if not isinstance(t, torch.Tensor):
        _fail(TypeError, "%s must be a Tensor, got %s", name, type(t).__name__)
    if t.is_nested:
        _fail(TypeError, "%s must be a dense (strided) tensor, got a nested tensor", name)
    if t.layout != torch.strided:
        _fail(TypeError, "%s must be a dense (strided) tensor, got layout %s", name, _layout(t.layout))


def float_query(query):
    dense(query, "query")
    if query.dtype not in _FLOAT:
        _fail(TypeError, "query must be float16, bfloat16, float32 or float64, got %s", query.dtype)


def same_dtype(t, name, query):
    if t.dtype != query.dtype:
        _fail(TypeError, "%s must have the dtype of query (%s), got %s", name, query.dtype, t.dtype)


def on_query_device(t, name, query):
    if t.device != query.device:
        _fail(ValueError, "%s must be on the device of query (%s), got %s", name, query.device, t.device)


def index_tensor(t, name, n, query):
    dense(t, name)
    if t.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, "%s must be int32 or int64, got %s", name, t.dtype)
    if t.dim() != 1 or t.shape[0] != n:
        _fail(ValueError, "%s must have shape [%d], got %s", name, n, _sizes(t))
    on_query_device(t, name, query)


def mask_tensor(mask, B, L, query):
    dense(mask, "mask")
    if mask.dtype != torch.bool:
        _fail(TypeError, "mask must be bool (True = attend), got %s", mask.dtype)
    if mask.dim() != 2 or tuple(mask.shape) != (B, L):
        _fail(ValueError, "mask must have shape [B, L] = [%d, %d], got %s", B, L, _sizes(mask))
    on_query_device(mask, "mask", query)


def max_length(value):
    if value < -1:
        _fail(ValueError, "max_length must be >= 0 (or -1 for unknown), got %d", value)


def shape(t, name, want, dims=None):
    """t's sizes are `want`; `dims` spells them ("[B, N, H]") where it helps."""
    if tuple(t.shape) != tuple(want):
        _fail(ValueError, "%s must have shape %s[%s], got %s", name, dims + " = " if dims else "",
              ", ".join(map(str, want)), _sizes(t))


def dim_in_range(what, d, most):
    if not 1 <= d <= most:
        _fail(ValueError, "%s must be in [1, %d], got %d", what, most, d)


def scale(value):
    """The launchers' scale check."""
    if not (value == value and abs(value) != float("inf")):
        _fail(ValueError, "scale must be finite, got %s", value)


# ---- attention pool (csrc/attention_pool_checks.cpp) --------------------------------------------


def _qkv(query, key, value, rank, key_shape, value_shape):
    """check_qkv: returns (B, N, H, Dk, Dv, L)."""
    float_query(query)
    for t, n in ((key, "key"), (value, "value")):
        dense(t, n)
    for t, n in ((key, "key"), (value, "value")):
        same_dtype(t, n, query)
    if key.device != query.device or value.device != query.device:
        _fail(ValueError, "query, key and value must be on one device, got %s, %s, %s",
              query.device, key.device, value.device)
    if query.dim() != 4:
        _fail(ValueError, "query must be [B, N, H, Dk], got %d dims", query.dim())
    for t, spelled in ((key, key_shape), (value, value_shape)):
        if t.dim() != rank:
            _fail(ValueError, "%s, got %s", spelled, _sizes(t))
    B, N, H, Dk = query.shape
    return B, N, H, Dk, value.shape[-1], key.shape[rank - 3]


def _dims(B, N, H, Dk, Dv):
    if H < 1:
        _fail(ValueError, "query must have H >= 1 heads, got H=%d", H)
    if N < 1:
        _fail(ValueError, "query must have N >= 1 queries, got N=%d", N)
    dim_in_range("query/key head dim Dk", Dk, MAX_HEAD_DIM)
    dim_in_range("value head dim Dv", Dv, MAX_HEAD_DIM)


def padded_fwd(query, key, value, lengths, mask):
    """check_padded_fwd; returns (B, N, H, Dk, Dv, L)."""
    B, N, H, Dk, Dv, L = _qkv(query, key, value, 4, "padded key must be [B, L, H, Dk]",
                              "padded value must be [B, L, H, Dv]")
    if key.shape[0] != B or key.shape[2] != H or key.shape[3] != Dk:
        _fail(ValueError, "key must be [B, L, H, Dk] = [%d, L, %d, %d] to match query %s, got %s",
              B, H, Dk, _sizes(query), _sizes(key))
    if value.shape[0] != B or value.shape[1] != L or value.shape[2] != H:
        _fail(ValueError, "value must be [B, L, H, Dv] = [%d, %d, %d, Dv] to match key %s, got %s",
              B, L, H, _sizes(key), _sizes(value))
    _dims(B, N, H, Dk, Dv)
    if lengths is not None and mask is not None:
        _fail(ValueError, "give lengths or mask, not both")
    if lengths is not None:
        index_tensor(lengths, "lengths", B, query)
    if mask is not None:
        mask_tensor(mask, B, L, query)
    return B, N, H, Dk, Dv, L


def jagged_fwd(query, key, value, offsets, max_length_):
    """check_jagged_fwd; returns (B, N, H, Dk, Dv, T)."""
    B, N, H, Dk, Dv, T = _qkv(query, key, value, 3, "jagged key must be [T, H, Dk]",
                              "jagged value must be [T, H, Dv]")
    if key.shape[1] != H or key.shape[2] != Dk:
        _fail(ValueError, "key must be [T, H, Dk] = [T, %d, %d] to match query %s, got %s",
              H, Dk, _sizes(query), _sizes(key))
    if value.shape[0] != T or value.shape[1] != H:
        _fail(ValueError, "value must be [T, H, Dv] = [%d, %d, Dv] to match key %s, got %s",
              T, H, _sizes(key), _sizes(value))
    _dims(B, N, H, Dk, Dv)
    index_tensor(offsets, "offsets", B + 1, query)
    max_length(max_length_)
    return B, N, H, Dk, Dv, T


def bias(dims, query, bias_, jagged):
    """check_bias: the optional bias, padded [B, Nb, Hb, L] or jagged [T, Nb, Hb] with Nb
    dividing N and Hb 1 or H, float32 or the query's dtype."""
    if bias_ is None:
        return
    B, N, H, L = dims[0], dims[1], dims[2], dims[5]
    dense(bias_, "bias")
    if bias_.dtype != torch.float32 and bias_.dtype != query.dtype:
        _fail(TypeError, "bias must be torch.float32 or the dtype of query (%s), got %s", query.dtype, bias_.dtype)
    rank = 3 if jagged else 4
    ok = bias_.dim() == rank and bias_.shape[0] == (L if jagged else B) and (jagged or bias_.shape[3] == L)
    nb, hb = (bias_.shape[1], bias_.shape[2]) if bias_.dim() == rank else (0, 0)
    if not (ok and nb >= 1 and N % nb == 0 and hb in (1, H)):
        spelled = "[T, Nb, Hb] = [%d, Nb, Hb]" % L if jagged else "[B, Nb, Hb, L] = [%d, Nb, Hb, %d]" % (B, L)
        _fail(ValueError, "bias must be %s with Nb dividing N = %d and Hb 1 or H = %d, got %s", spelled, N, H,
              _sizes(bias_))
    on_query_device(bias_, "bias", query)


def bwd_extras(dims, query, grad_out, lse, delta):
    """check_bwd_extras."""
    B, N, H, _, Dv = dims[:5]
    for t, n in ((grad_out, "grad_out"), (lse, "lse"), (delta, "delta")):
        dense(t, n)
    same_dtype(grad_out, "grad_out", query)
    shape(grad_out, "grad_out", (B, N, H, Dv), "[B, N, H, Dv]")
    if lse.dtype != torch.float32:
        _fail(TypeError, "lse must be torch.float32, got %s", lse.dtype)
    if not (delta.dtype == torch.float32 or (delta.dtype == torch.float64 and query.dtype == torch.float64)):
        _fail(TypeError, "delta must be torch.float32 (or torch.float64 for torch.float64 inputs), got %s with %s "
              "inputs", delta.dtype, query.dtype)
    for t, n in ((lse, "lse"), (delta, "delta")):
        shape(t, n, (B, N, H), "[B, N, H]")
    if grad_out.device != query.device or lse.device != query.device or delta.device != query.device:
        _fail(ValueError, "grad_out, lse and delta must be on the device of query (%s)", query.device)


def fwd(layout, a):
    """The checks of a forward call (or of the forward part of a backward call), arguments by
    name; returns (B, N, H, Dk, Dv, L)."""
    if layout == "padded":
        dims = padded_fwd(a["query"], a["key"], a["value"], a["lengths"], a["mask"])
    else:
        dims = jagged_fwd(a["query"], a["key"], a["value"], a["offsets"], a["max_length"])
    bias(dims, a["query"], a.get("bias"), layout == "jagged")
    scale(a["scale"])
    return dims


# ---- activation unit (csrc/activation_unit_checks.cpp) ------------------------------------------


def _float_like(t, name, query):
    dense(t, name)
    same_dtype(t, name, query)
    on_query_device(t, name, query)


def activation_unit_fwd(a) -> dict:
    """check_activation_unit_fwd, arguments by name (value None: the keys are the values);
    returns the dims B, N, E, Dv, L (padded L or jagged T), H1, H2 (0: one hidden layer)."""
    query, key, offsets, activation = a["query"], a["key"], a["offsets"], a["activation"]
    value = key if a["value"] is None else a["value"]
    float_query(query)
    if query.dim() != 3:
        _fail(ValueError, "query must be [B, N, E], got %s", _sizes(query))
    _float_like(key, "key", query)
    _float_like(value, "value", query)
    B, N, E = query.shape
    if offsets is not None:
        if a["lengths"] is not None or a["mask"] is not None:
            _fail(ValueError, "lengths and mask are for the padded layout; with offsets leave them None")
        if key.dim() != 2 or key.shape[1] != E:
            _fail(ValueError, "jagged key must be [T, E] = [T, %d], got %s", E, _sizes(key))
        L = key.shape[0]
        if value.dim() != 2 or value.shape[0] != L:
            _fail(ValueError, "jagged value must be [T, Dv] = [%d, Dv], got %s", L, _sizes(value))
        index_tensor(offsets, "offsets", B + 1, query)
        max_length(a["max_length"])
    else:
        if key.dim() != 3 or key.shape[0] != B or key.shape[2] != E:
            _fail(ValueError, "padded key must be [B, L, E] = [%d, L, %d], got %s", B, E, _sizes(key))
        L = key.shape[1]
        if value.dim() != 3 or value.shape[0] != B or value.shape[1] != L:
            _fail(ValueError, "padded value must be [B, L, Dv] = [%d, %d, Dv], got %s", B, L, _sizes(value))
        if a["lengths"] is not None and a["mask"] is not None:
            _fail(ValueError, "give lengths or mask, not both")
        if a["lengths"] is not None:
            index_tensor(a["lengths"], "lengths", B, query)
        if a["mask"] is not None:
            mask_tensor(a["mask"], B, L, query)
    Dv = value.shape[-1]
    if N < 1:
        _fail(ValueError, "query must have N >= 1 queries, got %s", _sizes(query))
    dim_in_range("embedding dim E", E, MAX_UNITS)
    dim_in_range("value dim Dv", Dv, MAX_UNITS)
    if activation not in ACTIVATION_PARAM_ROWS:
        _fail(ValueError, "activation must be relu, sigmoid, prelu or dice, got '%s'", activation)

    w1, w2 = a["w1"], a["w2"]
    _float_like(w1, "w1", query)
    if w1.dim() != 2 or w1.shape[1] != 4 * E:
        _fail(ValueError, "w1 must be [H1, 4E] = [H1, %d], got %s", 4 * E, _sizes(w1))
    H1 = w1.shape[0]
    dim_in_range("hidden units H1", H1, MAX_UNITS)
    _float_like(a["b1"], "b1", query)
    shape(a["b1"], "b1", (H1,))
    if (w2 is None) != (a["b2"] is None):
        _fail(ValueError, "give w2 and b2 together, or neither")
    H2 = 0
    if w2 is not None:
        _float_like(w2, "w2", query)
        if w2.dim() != 2 or w2.shape[1] != H1:
            _fail(ValueError, "w2 must be [H2, H1] = [H2, %d], got %s", H1, _sizes(w2))
        H2 = w2.shape[0]
        dim_in_range("hidden units H2", H2, MAX_UNITS)
        _float_like(a["b2"], "b2", query)
        shape(a["b2"], "b2", (H2,))
    for name, want in (("w_out", (1, H2 or H1)), ("b_out", (1,))):
        _float_like(a[name], name, query)
        shape(a[name], name, want)
    rows = ACTIVATION_PARAM_ROWS[activation]
    for i, (name, h) in enumerate((("act1", H1), ("act2", H2))):
        want = rows > 0 and h > 0
        if (a[name] is not None) != want:
            _fail(ValueError, "%s %s for activation '%s'%s", name, "is required" if want else "must be None",
                  activation, " with one hidden layer" if (i == 1 and H2 == 0) else "")
        if want:
            _float_like(a[name], name, query)
            shape(a[name], name, (rows, h))
    return dict(B=B, N=N, E=E, Dv=Dv, L=L, H1=H1, H2=H2)


def activation_unit_bwd_extras(d, query, grad_out, lse, delta):
    """check_activation_unit_bwd_extras."""
    _float_like(grad_out, "grad_out", query)
    shape(grad_out, "grad_out", (d["B"], d["N"], d["Dv"]))
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    for name, t in (("lse", lse), ("delta", delta)):
        dense(t, name)
        if t.dtype != acc:
            _fail(TypeError, "%s must be %s for %s inputs, got %s", name, acc, query.dtype, t.dtype)
        shape(t, name, (d["B"], d["N"]))
        on_query_device(t, name, query)
