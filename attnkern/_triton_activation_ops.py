"""The "triton" backend of activation-unit pooling as torch.library custom ops.

    attnkern::triton_activation_unit_pool_fwd / _bwd

Same schemas as the C++ ops attnkern::activation_unit_pool_fwd / _bwd
(csrc/activation_unit_ops.cpp). Each op checks its own inputs (shapes, dtypes, devices) with the
messages of the C++ checks (csrc/activation_unit_checks.cpp), so a direct
torch.ops.attnkern.triton_* call can never make a kernel read out of bounds. lengths/offsets
values are checked for CPU tensors (for CUDA ones only with set_validation(True): reading them
syncs the device) and clamped in-kernel always. Fake impls and autograd (which calls only
registered ops) are the C++ ops' own, from attnkern._activation_ops, so
torch.compile(fullgraph=True) traces through.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnkern.triton_kernels import activation_unit as _k

from ._activation_ops import fake_bwd, fake_fwd, register_activation_autograd
from ._validation import Problem, check_values

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 256
_ACT_ROWS = {"relu": 0, "sigmoid": 0, "prelu": 1, "dice": 3}

FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, Tensor? offsets, "
    "int max_length, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor w_out, Tensor b_out, "
    "Tensor? act1, Tensor? act2, str activation, bool softmax) -> (Tensor out, Tensor lse)"
)
BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
    "Tensor? offsets, int max_length, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, "
    "Tensor w_out, Tensor b_out, Tensor? act1, Tensor? act2, str activation, bool softmax, "
    "Tensor lse, Tensor delta) "
    "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_w1, "
    "Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_w_out, Tensor grad_b_out, "
    "Tensor grad_act1, Tensor grad_act2)"
)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def _fail(cls, msg, *args):
    raise cls("attnkern: " + (msg % args if args else msg))


def _same(t: Tensor, name: str, query: Tensor) -> None:
    if not isinstance(t, Tensor):
        _fail(TypeError, "%s must be a tensor, got %s", name, type(t).__name__)
    if t.dtype != query.dtype:
        _fail(TypeError, "%s must have the dtype of query (%s), got %s", name, query.dtype, t.dtype)
    if t.device != query.device:
        _fail(ValueError, "%s must be on the device of query (%s), got %s", name, query.device,
              t.device)
    if t.layout != torch.strided:
        _fail(ValueError, "%s must be a dense (strided) tensor", name)


def _shape(t: Tensor, name: str, want) -> None:
    if tuple(t.shape) != tuple(want):
        _fail(ValueError, "%s must have shape %s, got %s", name, list(want), list(t.shape))


def _index(t: Tensor, name: str, n: int, query: Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        _fail(TypeError, "%s must be int32 or int64, got %s", name, t.dtype)
    if t.dim() != 1 or t.shape[0] != n:
        _fail(ValueError, "%s must have shape [%d], got %s", name, n, list(t.shape))
    if t.device != query.device:
        _fail(ValueError, "%s must be on the device of query (%s), got %s", name, query.device,
              t.device)


def check_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out,
              b_out, act1, act2, activation) -> dict:
    """Shape/dtype/device checks of every forward input (never reads tensor data); returns the
    dims. ValueError (shapes, names) / TypeError (dtypes), naming the argument."""
    if not isinstance(query, Tensor):
        _fail(TypeError, "query must be a tensor, got %s", type(query).__name__)
    if query.dtype not in _TRITON_DTYPES:
        _fail(TypeError, "the triton backend supports query float16, bfloat16 or float32, got %s",
              query.dtype)
    if query.dim() != 3:
        _fail(ValueError, "query must be [B, N, E], got %s", list(query.shape))
    if query.shape[1] < 1:
        _fail(ValueError, "query must have N >= 1 queries, got %s", list(query.shape))
    _same(query, "query", query)
    _same(key, "key", query)
    _same(value, "value", query)
    B, N, E = query.shape
    if offsets is not None:
        if lengths is not None or mask is not None:
            _fail(ValueError, "lengths and mask are for the padded layout; with offsets leave "
                  "them None")
        if key.dim() != 2 or key.shape[1] != E:
            _fail(ValueError, "jagged key must be [T, E] = [T, %d], got %s", E, list(key.shape))
        L = key.shape[0]
        if value.dim() != 2 or value.shape[0] != L:
            _fail(ValueError, "jagged value must be [T, Dv] = [%d, Dv], got %s", L,
                  list(value.shape))
        _index(offsets, "offsets", B + 1, query)
        if max_length < -1:
            _fail(ValueError, "max_length must be >= 0 (or -1 for unknown), got %d", max_length)
    else:
        if key.dim() != 3 or key.shape[0] != B or key.shape[2] != E:
            _fail(ValueError, "padded key must be [B, L, E] = [%d, L, %d], got %s", B, E,
                  list(key.shape))
        L = key.shape[1]
        if value.dim() != 3 or value.shape[0] != B or value.shape[1] != L:
            _fail(ValueError, "padded value must be [B, L, Dv] = [%d, %d, Dv], got %s", B, L,
                  list(value.shape))
        if lengths is not None and mask is not None:
            _fail(ValueError, "give lengths or mask, not both")
        if lengths is not None:
            _index(lengths, "lengths", B, query)
        if mask is not None:
            if mask.dtype != torch.bool:
                _fail(TypeError, "mask must be bool (True = attend), got %s", mask.dtype)
            if tuple(mask.shape) != (B, L):
                _fail(ValueError, "mask must have shape [B, L] = [%d, %d], got %s", B, L,
                      list(mask.shape))
            if mask.device != query.device:
                _fail(ValueError, "mask must be on the device of query (%s), got %s",
                      query.device, mask.device)
    Dv = value.shape[-1]
    for name, d in (("embedding dim E", E), ("value dim Dv", Dv)):
        if not 1 <= d <= MAX_DIM:
            _fail(ValueError, "%s must be in [1, %d], got %d", name, MAX_DIM, d)
    if activation not in _ACT_ROWS:
        _fail(ValueError, "activation must be relu, sigmoid, prelu or dice, got '%s'", activation)
    _same(w1, "w1", query)
    if w1.dim() != 2 or w1.shape[1] != 4 * E:
        _fail(ValueError, "w1 must be [H1, 4E] = [H1, %d], got %s", 4 * E, list(w1.shape))
    H1 = w1.shape[0]
    if not 1 <= H1 <= MAX_DIM:
        _fail(ValueError, "hidden units must be in [1, %d], got H1=%d", MAX_DIM, H1)
    _same(b1, "b1", query)
    _shape(b1, "b1", (H1,))
    if (w2 is None) != (b2 is None):
        _fail(ValueError, "give w2 and b2 together, or neither")
    H2 = 0
    if w2 is not None:
        _same(w2, "w2", query)
        if w2.dim() != 2 or w2.shape[1] != H1:
            _fail(ValueError, "w2 must be [H2, H1] = [H2, %d], got %s", H1, list(w2.shape))
        H2 = w2.shape[0]
        if not 1 <= H2 <= MAX_DIM:
            _fail(ValueError, "hidden units must be in [1, %d], got H2=%d", MAX_DIM, H2)
        _same(b2, "b2", query)
        _shape(b2, "b2", (H2,))
    hl = H2 if H2 else H1
    _same(w_out, "w_out", query)
    _shape(w_out, "w_out", (1, hl))
    _same(b_out, "b_out", query)
    _shape(b_out, "b_out", (1,))
    rows = _ACT_ROWS[activation]
    for i, (name, t, h) in enumerate((("act1", act1, H1), ("act2", act2, H2))):
        want = rows > 0 and h > 0
        if (t is not None) != want:
            _fail(ValueError, "%s %s for activation '%s'%s", name,
                  "is required" if want else "must be None", activation,
                  " with one hidden layer" if (i == 1 and H2 == 0) else "")
        if want:
            _same(t, name, query)
            _shape(t, name, (rows, h))
    dev = query.device.type
    if not (dev == "cuda" or (dev == "cpu" and _k.interpret_mode())):
        _fail(ValueError, "the triton backend needs CUDA tensors (or CPU tensors with "
              "TRITON_INTERPRET=1 set before importing triton), got query on %s", query.device)
    layout = "jagged" if offsets is not None else "padded"
    try:
        check_values(Problem(query, False, layout, B, N, 1, E, Dv, L, 1.0), lengths, offsets,
                     None if (offsets is None or max_length < 0) else max_length)
    except ValueError as e:
        raise ValueError("attnkern: %s" % e) from None
    return dict(B=B, N=N, E=E, Dv=Dv, L=L, H1=H1, H2=H2)


def check_bwd_extras(d: dict, query: Tensor, grad_out: Tensor, lse: Tensor, delta: Tensor) -> None:
    if grad_out.dtype != query.dtype:
        _fail(TypeError, "grad_out must have the dtype of query (%s), got %s", query.dtype,
              grad_out.dtype)
    _shape(grad_out, "grad_out", (d["B"], d["N"], d["Dv"]))
    for name, t in (("lse", lse), ("delta", delta)):
        if t.dtype != torch.float32:
            _fail(TypeError, "%s must be torch.float32 for %s inputs, got %s", name, query.dtype,
                  t.dtype)
        _shape(t, name, (d["B"], d["N"]))
    for name, t in (("grad_out", grad_out), ("lse", lse), ("delta", delta)):
        if t.device != query.device:
            _fail(ValueError, "%s must be on the device of query (%s), got %s", name,
                  query.device, t.device)


# ----------------------------------------------------------------------------------------------
# Ops, fake impls, autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("attnkern::triton_activation_unit_pool_fwd", mutates_args=(),
                         schema=FWD_SCHEMA)
def triton_activation_unit_pool_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                    w2, b2, w_out, b_out, act1, act2, activation, softmax):
    check_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out, b_out,
              act1, act2, activation)
    return _k.activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                  w2, b2, w_out, b_out, act1, act2, activation, softmax)


@torch.library.custom_op("attnkern::triton_activation_unit_pool_bwd", mutates_args=(),
                         schema=BWD_SCHEMA)
def triton_activation_unit_pool_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                    max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                    activation, softmax, lse, delta):
    d = check_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out,
                  b_out, act1, act2, activation)
    check_bwd_extras(d, query, grad_out, lse, delta)
    return _k.activation_unit_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                  max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                  activation, softmax, lse, delta)


@triton_activation_unit_pool_fwd.register_fake
def _(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out, b_out,
      act1, act2, activation, softmax):
    return fake_fwd(query, value)


@triton_activation_unit_pool_bwd.register_fake
def _(grad_out, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out,
      b_out, act1, act2, activation, softmax, lse, delta):
    return fake_bwd(query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2)


register_activation_autograd("attnkern::triton_activation_unit_pool_fwd",
                             torch.ops.attnkern.triton_activation_unit_pool_bwd)


def activation_unit_pool_triton(query: Tensor, key: Tensor, value: Tensor,
                                lengths: Optional[Tensor], mask: Optional[Tensor],
                                offsets: Optional[Tensor], max_length: int, w1: Tensor, b1: Tensor,
                                w2: Optional[Tensor], b2: Optional[Tensor], w_out: Tensor,
                                b_out: Tensor, act1: Optional[Tensor], act2: Optional[Tensor],
                                activation: str, softmax: bool) -> Tuple[Tensor, Tensor]:
    """The differentiable triton forward (out, lse) with the forward op's arguments."""
    return torch.ops.attnkern.triton_activation_unit_pool_fwd(
        query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out, b_out,
        act1, act2, activation, softmax)
