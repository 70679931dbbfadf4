"""The C++ ops' input checks (csrc/attention_pool_checks.cpp), in Python, for their fake (meta) impls.

A call whose tensors include a meta tensor (or that runs under FakeTensorMode) reaches the fake
impl instead of the kernel, so the fake impl must refuse what the kernel would refuse: ranks,
matching sizes, dtypes, layouts and devices, with the same messages (ValueError for shapes and
devices, TypeError for dtypes and layouts). Only metadata is read, never values.
"""

from __future__ import annotations

import torch

MAX_HEAD_DIM = 256
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dense(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError("attnkern: %s must be a Tensor, got %s" % (name, type(t).__name__))
    if t.is_nested:
        raise TypeError("attnkern: %s must be a dense (strided) tensor, got a nested tensor" % name)
    if t.layout != torch.strided:
        raise TypeError("attnkern: %s must be a dense (strided) tensor, got layout %s" % (name, _layout(t.layout)))


_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
              torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long", torch.bool: "Bool",
              torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short"}


def _dt(dtype):
    """A dtype as the C++ checks print it."""
    return _C10_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _layout(layout):
    return {torch.sparse_coo: "Sparse", torch.sparse_csr: "SparseCsr", torch._mkldnn: "Mkldnn"}.get(layout, str(layout))


def _sizes(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _qkv(query, key, value):
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        _dense(t, n)
    if query.dtype not in _FLOAT:
        raise TypeError("attnkern: query must be float16, bfloat16, float32 or float64, got %s" % _dt(query.dtype))
    for t, n in ((key, "key"), (value, "value")):
        if t.dtype != query.dtype:
            raise TypeError("attnkern: %s must have the dtype of query (%s), got %s" % (n, _dt(query.dtype), _dt(t.dtype)))
    if key.device != query.device or value.device != query.device:
        raise ValueError("attnkern: query, key and value must be on one device, got %s, %s, %s"
                         % (query.device, key.device, value.device))
    if query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %d dims" % query.dim())


def _dims(B, N, H, Dk, Dv):
    if H < 1:
        raise ValueError("attnkern: query must have H >= 1 heads, got H=%d" % H)
    if N < 1:
        raise ValueError("attnkern: query must have N >= 1 queries, got N=%d" % N)
    if not 1 <= Dk <= MAX_HEAD_DIM:
        raise ValueError("attnkern: query/key head dim Dk must be in [1, %d], got %d" % (MAX_HEAD_DIM, Dk))
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError("attnkern: value head dim Dv must be in [1, %d], got %d" % (MAX_HEAD_DIM, Dv))


def _qkv_ranks(query, key, value, dim, layout, sizes):
    """_qkv, then the rank of key and value in `layout` ("[B, L, H, %s]" names the last dim
    Dk / Dv); returns query's (B, N, H, Dk)."""
    _qkv(query, key, value)
    for t, name, d in ((key, "key", "Dk"), (value, "value", "Dv")):
        if t.dim() != dim:
            raise ValueError("attnkern: %s %s must be %s, got %s" % (layout, name, sizes % d, _sizes(t)))
    return query.shape


def _index(t, name, n, query):
    _dense(t, name)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError("attnkern: %s must be int32 or int64, got %s" % (name, _dt(t.dtype)))
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError("attnkern: %s must have shape [%d], got %s" % (name, n, _sizes(t)))
    if t.device != query.device:
        raise ValueError("attnkern: %s must be on the device of query (%s), got %s" % (name, query.device, t.device))


def padded_fwd(query, key, value, lengths, mask):
    """check_padded_fwd; returns (B, N, H, Dk, Dv, L)."""
    B, N, H, Dk = _qkv_ranks(query, key, value, 4, "padded", "[B, L, H, %s]")
    L, Dv = key.shape[1], value.shape[3]
    if key.shape[0] != B or key.shape[2] != H or key.shape[3] != Dk:
        raise ValueError("attnkern: key must be [B, L, H, Dk] = [%d, L, %d, %d] to match query %s, got %s"
                         % (B, H, Dk, _sizes(query), _sizes(key)))
    if value.shape[0] != B or value.shape[1] != L or value.shape[2] != H:
        raise ValueError("attnkern: value must be [B, L, H, Dv] = [%d, %d, %d, Dv] to match key %s, got %s"
                         % (B, L, H, _sizes(key), _sizes(value)))
    _dims(B, N, H, Dk, Dv)
    if lengths is not None and mask is not None:
        raise ValueError("attnkern: give lengths or mask, not both")
    if lengths is not None:
        _index(lengths, "lengths", B, query)
    if mask is not None:
        _dense(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError("attnkern: mask must be bool (True = attend), got %s" % _dt(mask.dtype))
        if mask.dim() != 2 or tuple(mask.shape) != (B, L):
            raise ValueError("attnkern: mask must have shape [B, L] = [%d, %d], got %s" % (B, L, _sizes(mask)))
        if mask.device != query.device:
            raise ValueError("attnkern: mask must be on the device of query (%s), got %s" % (query.device, mask.device))
    return B, N, H, Dk, Dv, L


def jagged_fwd(query, key, value, offsets, max_length):
    """check_jagged_fwd; returns (B, N, H, Dk, Dv, T)."""
    B, N, H, Dk = _qkv_ranks(query, key, value, 3, "jagged", "[T, H, %s]")
    T, Dv = key.shape[0], value.shape[2]
    if key.shape[1] != H or key.shape[2] != Dk:
        raise ValueError("attnkern: key must be [T, H, Dk] = [T, %d, %d] to match query %s, got %s"
                         % (H, Dk, _sizes(query), _sizes(key)))
    if value.shape[0] != T or value.shape[1] != H:
        raise ValueError("attnkern: value must be [T, H, Dv] = [%d, %d, Dv] to match key %s, got %s"
                         % (T, H, _sizes(key), _sizes(value)))
    _dims(B, N, H, Dk, Dv)
    _index(offsets, "offsets", B + 1, query)
    if max_length < -1:
        raise ValueError("attnkern: max_length must be >= 0 (or -1 for unknown), got %d" % max_length)
    return B, N, H, Dk, Dv, T


def bwd_extras(dims, query, grad_out, lse, delta):
    """check_bwd_extras."""
    B, N, H, _, Dv = dims[:5]
    for t, n in ((grad_out, "grad_out"), (lse, "lse"), (delta, "delta")):
        _dense(t, n)
    if grad_out.dtype != query.dtype:
        raise TypeError("attnkern: grad_out must have the dtype of query (%s), got %s" % (_dt(query.dtype), _dt(grad_out.dtype)))
    if grad_out.dim() != 4 or tuple(grad_out.shape) != (B, N, H, Dv):
        raise ValueError("attnkern: grad_out must be [B, N, H, Dv] = [%d, %d, %d, %d], got %s"
                         % (B, N, H, Dv, _sizes(grad_out)))
    if lse.dtype != torch.float32:
        raise TypeError("attnkern: lse must be float32, got %s" % _dt(lse.dtype))
    if not (delta.dtype == torch.float32 or (delta.dtype == torch.float64 and query.dtype == torch.float64)):
        raise TypeError("attnkern: delta must be float32 (or float64 for float64 inputs), got %s with %s inputs"
                        % (_dt(delta.dtype), _dt(query.dtype)))
    for t, n in ((lse, "lse"), (delta, "delta")):
        if t.dim() != 3 or tuple(t.shape) != (B, N, H):
            raise ValueError("attnkern: %s must be [B, N, H] = [%d, %d, %d], got %s" % (n, B, N, H, _sizes(t)))
    if grad_out.device != query.device or lse.device != query.device or delta.device != query.device:
        raise ValueError("attnkern: grad_out, lse and delta must be on the device of query (%s)" % query.device)


def scale(value):
    """The launchers' scale check."""
    if not (value == value and abs(value) != float("inf")):
        raise ValueError("attnkern: scale must be finite, got %s" % value)


def fwd(layout, a):
    """The checks of a forward call (or of the forward part of a backward call), arguments by
    name; returns (B, N, H, Dk, Dv, L)."""
    if layout == "padded":
        dims = padded_fwd(a["query"], a["key"], a["value"], a["lengths"], a["mask"])
    else:
        dims = jagged_fwd(a["query"], a["key"], a["value"], a["offsets"], a["max_length"])
    scale(a["scale"])
    return dims
