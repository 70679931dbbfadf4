"""Sequence self-attention on the "triton" backend as torch.library custom ops.

    attnkern::triton_sequence_attention_fwd / _bwd

The schema is the op-level layout of docs/sequence_attention.md (attnkern/ops/sequence.py's
SEQUENCE_SCHEMAS, which the C++ ops register without a prefix), and so are the fake impls and
the autograd (register_sequence_fakes_and_autograd). Each op checks its own inputs' shapes,
dtypes and devices, so that a direct torch.ops.attnkern.triton_* call can never make a kernel
read out of bounds (the kernels clamp the rows, the targets, the buckets and the positions
themselves).
"""

from __future__ import annotations

from typing import Optional

import torch

from attnkern.triton_kernels import sequence_attention as _k
from attnkern.triton_kernels.attention_pool import interpret_mode

from .schemas import NAMESPACE, TRITON_PREFIX, qualified
from .sequence import (SEQUENCE_FWD_ARGS, SEQUENCE_OPS, SEQUENCE_SCHEMAS,
                       register_sequence_fakes_and_autograd)

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)

FWD_OP, BWD_OP = (TRITON_PREFIX + n for n in SEQUENCE_OPS)


# ----------------------------------------------------------------------------------------------
# Input checks (shapes, dtypes, devices: what keeps the kernels in bounds)
# ----------------------------------------------------------------------------------------------


def _fail(msg: str, exc=ValueError):
    raise exc("attnkern: triton sequence_attention: %s" % msg)


def _tensor(a: dict, name: str, dims: int, dtypes=None, optional: bool = False) -> Optional[Tensor]:
    t = a[name]
    if t is None:
        if not optional:
            _fail("%s is required" % name, TypeError)
        return None
    if not isinstance(t, Tensor):
        _fail("%s must be a Tensor, got %s" % (name, type(t).__name__), TypeError)
    if t.layout != torch.strided or t.is_nested:
        _fail("%s must be a dense (strided) tensor, got layout %s" % (name, t.layout), TypeError)
    if t.dim() != dims:
        _fail("%s must have %d dims, got shape %s" % (name, dims, tuple(t.shape)))
    if dtypes is not None and t.dtype not in dtypes:
        _fail("%s must be %s, got %s" % (name, " or ".join(str(d) for d in dtypes), t.dtype),
              TypeError)
    if t.device != a["query"].device:
        _fail("%s must be on %s (query's device), got %s" % (name, a["query"].device, t.device))
    return t


def _shape(name: str, t: Tensor, want) -> None:
    if tuple(t.shape) != tuple(want):
        _fail("%s must have shape %s, got %s" % (name, tuple(want), tuple(t.shape)))


def check_fwd(a: dict) -> dict:
    """The forward arguments' checks, by name; returns the dims (T, H, Hkv, Dk, Dv, B)."""
    q = _tensor(a, "query", 3, _TRITON_DTYPES)
    k = _tensor(a, "key", 3, (q.dtype,))
    v = _tensor(a, "value", 3, (q.dtype,))
    T, H, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    if k.shape[0] != T or v.shape[0] != T or v.shape[1] != Hkv or k.shape[2] != Dk:
        _fail("key/value must be [T, Hkv, Dk] / [T, Hkv, Dv] with query's T=%d and Dk=%d, got "
              "%s and %s" % (T, Dk, tuple(k.shape), tuple(v.shape)))
    if Hkv == 0 or H % Hkv != 0:
        _fail("key's heads (%d) must divide query's (%d)" % (Hkv, H))
    starts = _tensor(a, "starts", 1, _INDEX_DTYPES)
    B = starts.shape[0]
    _shape("lengths", _tensor(a, "lengths", 1, _INDEX_DTYPES), (B,))
    nt = _tensor(a, "num_targets", 1, _INDEX_DTYPES, optional=True)
    if nt is not None:
        _shape("num_targets", nt, (B,))
    for name in ("max_length", "contextual_len", "max_attn_len"):
        low = -1 if name == "max_length" else 0
        if a[name] < low:
            _fail("%s must be >= %d, got %d" % (name, low, a[name]))
    s = _tensor(a, "attn_scale", 1, (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                optional=True)
    if s is not None:
        _shape("attn_scale", s, (T,))
    tt = _tensor(a, "time_table", 2, (q.dtype,), optional=True)
    tables = [("time_table", tt)]
    if tt is not None:
        if tt.shape[0] > _k.MAX_TIME_BUCKETS:
            _fail("time_table has %d buckets; the triton backend takes at most %d"
                  % (tt.shape[0], _k.MAX_TIME_BUCKETS))
        for name in ("query_times", "key_times"):
            _shape(name, _tensor(a, name, 1, _INDEX_DTYPES), (T,))
        _shape("time_bounds", _tensor(a, "time_bounds", 1, (torch.int64,)), (max(tt.shape[0] - 1, 0),))
    pt = _tensor(a, "position_table", 2, (q.dtype,), optional=True)
    tables.append(("position_table", pt))
    for name, t in tables:
        if t is not None and (t.shape[0] < 1 or t.shape[1] not in (1, H)):
            _fail("%s must be [rows >= 1, 1 or H=%d], got %s" % (name, H, tuple(t.shape)))
    bias = _tensor(a, "bias", 4, (q.dtype,), optional=True)
    if bias is not None:
        L = bias.shape[-1]
        if bias.shape[0] != B or bias.shape[1] not in (1, H) or bias.shape[2] != L:
            _fail("bias must be [B=%d, 1 or H=%d, L, L], got %s" % (B, H, tuple(bias.shape)))
        if a["max_length"] >= 0 and L != a["max_length"]:
            _fail("bias's L (%d) must equal max_length (%d)" % (L, a["max_length"]))
    dev = q.device.type
    if not (dev == "cuda" or (dev == "cpu" and interpret_mode())):
        _fail("the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
              "before importing triton), got query on %s" % q.device)
    return dict(T=T, H=H, Hkv=Hkv, Dk=Dk, Dv=Dv, B=B)


def _check_bwd(a: dict) -> dict:
    d = check_fwd(a)
    go = _tensor(a, "grad_out", 3, _TRITON_DTYPES)
    _shape("grad_out", go, (d["T"], d["H"], d["Dv"]))
    _shape("lse", _tensor(a, "lse", 2, (torch.float32,)), (d["T"], d["H"]))
    if not a["silu"]:  # unused with SiLU
        _shape("delta", _tensor(a, "delta", 2, (torch.float32,)), (d["T"], d["H"]))
    return d


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def _canonical(a: dict) -> tuple:
    """The launcher's arguments: index tensors as contiguous int64 (tiny), the rest as given."""
    def idx(t):
        return None if t is None else t.to(torch.int64).contiguous()

    return (a["query"], a["key"], a["value"], idx(a["starts"]), idx(a["lengths"]),
            a["max_length"], idx(a["num_targets"]), a["contextual_len"], a["max_attn_len"],
            a["causal"], a["silu"], a["scale"],
            None if a["attn_scale"] is None else a["attn_scale"].to(torch.float32).contiguous(),
            a["attn_scale_value"], idx(a["query_times"]), idx(a["key_times"]), a["time_table"],
            idx(a["time_bounds"]), a["position_table"], a["bias"])


@torch.library.custom_op(qualified(FWD_OP), mutates_args=(), schema=SEQUENCE_SCHEMAS[SEQUENCE_OPS[0]])
def triton_sequence_attention_fwd(*args):
    a = dict(zip(SEQUENCE_FWD_ARGS, args))
    check_fwd(a)
    return _k.sequence_attention_fwd(*_canonical(a))


@torch.library.custom_op(qualified(BWD_OP), mutates_args=(), schema=SEQUENCE_SCHEMAS[SEQUENCE_OPS[1]])
def triton_sequence_attention_bwd(grad_out, lse, delta, *args):
    a = dict(zip(SEQUENCE_FWD_ARGS, args), grad_out=grad_out, lse=lse, delta=delta)
    _check_bwd(a)
    lse = lse.contiguous()
    delta = delta.contiguous() if not a["silu"] else lse
    grads = _k.sequence_attention_bwd(grad_out.to(a["query"].dtype), *_canonical(a), lse, delta)
    return tuple(a["query"].new_empty((0,)) if g is None else g for g in grads)


# The fake impls and autograd of every backend's sequence ops (attnkern/ops/sequence.py).
register_sequence_fakes_and_autograd(TRITON_PREFIX)


# Nested tensors dispatch to keys of their own: there a clear TypeError instead of the
# dispatcher's "could not run ... with arguments from the NestedTensorCPU backend".
_NESTED = torch.library.Library(NAMESPACE, "IMPL")


def _reject_nested(*args):
    raise TypeError("attnkern: %s takes dense (strided) tensors only" % FWD_OP)


for _op in (FWD_OP, BWD_OP):
    for _key in ("NestedTensorCPU", "NestedTensorCUDA"):
        _NESTED.impl(_op, _reject_nested, _key)
