"""The "triton" backend as torch.library custom ops.

    attnkern::triton_attention_pool_fwd / _bwd
    attnkern::triton_jagged_attention_pool_fwd / _bwd
    attnkern::triton_activation_unit_pool_fwd / _bwd   (DIN's activation unit)

Same schemas as the C++ ops of csrc/attention_pool_ops.cpp. Each op checks its own inputs (shapes, dtypes,
devices; for CPU tensors under TRITON_INTERPRET=1 also the lengths/offsets values) with the
messages of the C++ checks, so a direct torch.ops.attnkern.triton_* call can never make a
kernel read out of bounds; on CUDA the kernels clamp every row to its legal range instead of
reading index values on the host. Fake impls make them traceable by
torch.compile(fullgraph=True); fake impls and autograd are those of the C++ ops
(attnkern/ops/autograd.py), the schemas those of attnkern/ops/schemas.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnkern.triton_kernels import activation_unit as _au
from attnkern.triton_kernels import attention_pool as _k

from .._validation import Problem, check_values, validate
from . import checks
from .autograd import register_activation_fakes_and_autograd, register_fakes_and_autograd
from .schemas import ACTIVATION_SCHEMAS, SCHEMAS, TRITON_PREFIX, qualified

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Input checks (the public API's, plus what the Triton backend cannot run)
# ----------------------------------------------------------------------------------------------


def _check_device(query: Tensor) -> None:
    dev = query.device.type
    if dev == "cuda":
        return
    if dev == "cpu" and _k.interpret_mode():
        return
    raise ValueError(
        "attnkern: the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 "
        "set before importing triton), got query on %s" % query.device
    )


def _check_triton_dtype(query: Tensor) -> None:
    if isinstance(query, Tensor) and query.dtype not in _TRITON_DTYPES:
        raise TypeError(
            "attnkern: the triton backend supports query float16, bfloat16 or float32, got %s"
            % query.dtype
        )


def _validated(query, key, value, lengths, mask, offsets, max_length):
    """The public API's checks (attnkern._validation), on the canonical 4-D query, with the
    "attnkern:" prefix of the C++ ops' messages. Value checks of lengths/offsets run for CPU
    tensors (and for CUDA ones only with set_validation(True)); CUDA kernels clamp instead."""
    _check_triton_dtype(query)
    if isinstance(query, Tensor) and query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %d dims" % query.dim())
    try:
        p = validate(query, key, value, lengths, mask, offsets, max_length, None, False)
    except (ValueError, TypeError) as e:
        raise type(e)("attnkern: %s" % e) from None
    _check_device(query)
    return p.B, p.N, p.H, p.Dk, p.Dv, p.L


def _check_padded(query, key, value, lengths, mask) -> Tuple[int, int, int, int, int, int]:
    return _validated(query, key, value, lengths, mask, None, None)


def _check_jagged(query, key, value, offsets, max_length) -> Tuple[int, int, int, int, int, int]:
    if max_length < -1:
        raise ValueError("attnkern: max_length must be >= 0 (or -1 for unknown), got %d" % max_length)
    return _validated(query, key, value, None, None, offsets, None if max_length < 0 else max_length)


def _check_bwd_extras(dims, query, grad_out, lse, delta) -> None:
    B, N, H, _, Dv, _ = dims
    if grad_out.dtype != query.dtype:
        raise TypeError("attnkern: grad_out must have the dtype of query (%s), got %s"
                        % (query.dtype, grad_out.dtype))
    if tuple(grad_out.shape) != (B, N, H, Dv):
        raise ValueError("attnkern: grad_out must be [B, N, H, Dv] = [%d, %d, %d, %d], got %s"
                         % (B, N, H, Dv, list(grad_out.shape)))
    for name, t in (("lse", lse), ("delta", delta)):
        if t.dtype != torch.float32:
            raise TypeError("attnkern: %s must be float32, got %s" % (name, t.dtype))
        if tuple(t.shape) != (B, N, H):
            raise ValueError("attnkern: %s must be [B, N, H] = [%d, %d, %d], got %s"
                             % (name, B, N, H, list(t.shape)))
    if not (grad_out.device == lse.device == delta.device == query.device):
        raise ValueError("attnkern: grad_out, lse and delta must be on the device of query (%s)"
                         % query.device)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def _custom_op(name: str, schemas=SCHEMAS):
    """Declares attnkern::triton_<name> with the schema of the C++ op <name>."""
    return torch.library.custom_op(qualified(TRITON_PREFIX + name), mutates_args=(),
                                   schema=schemas[name])


@_custom_op("attention_pool_fwd")
def triton_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, lengths: Optional[Tensor],
                              mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    _check_padded(query, key, value, lengths, mask)
    checks.scale(scale)
    # out as the kernel's unrounded float32 result, as the C++ ops (the public function casts
    # it to the query dtype; the autograd forms delta from it)
    return _k.attention_pool_fwd(query, key, value, lengths=lengths, mask=mask, scale=scale,
                                 out_dtype=torch.float32)


@_custom_op("attention_pool_bwd")
def triton_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                              lengths: Optional[Tensor], mask: Optional[Tensor], lse: Tensor,
                              delta: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_padded(query, key, value, lengths, mask)
    _check_bwd_extras(dims, query, grad_out, lse, delta)
    checks.scale(scale)
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, lengths=lengths,
                                 mask=mask, scale=scale)


@_custom_op("jagged_attention_pool_fwd")
def triton_jagged_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, offsets: Tensor,
                                     max_length: int, scale: float) -> Tuple[Tensor, Tensor]:
    _check_jagged(query, key, value, offsets, max_length)
    checks.scale(scale)
    return _k.attention_pool_fwd(query, key, value, offsets=offsets, max_length=max_length,
                                 scale=scale, out_dtype=torch.float32)


@_custom_op("jagged_attention_pool_bwd")
def triton_jagged_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                     offsets: Tensor, max_length: int, lse: Tensor, delta: Tensor,
                                     scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_jagged(query, key, value, offsets, max_length)
    _check_bwd_extras(dims, query, grad_out, lse, delta)
    checks.scale(scale)
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, offsets=offsets,
                                 max_length=max_length, scale=scale)


register_fakes_and_autograd(TRITON_PREFIX)


# ----------------------------------------------------------------------------------------------
# Activation-unit pooling (DIN): input checks with the messages of the C++ checks
# (csrc/activation_unit_checks.cpp); lengths/offsets values checked for CPU tensors (for CUDA
# ones only with set_validation(True)), and clamped in-kernel always.
# ----------------------------------------------------------------------------------------------

_AU_MAX_DIM = 256
_ACT_ROWS = {"relu": 0, "sigmoid": 0, "prelu": 1, "dice": 3}


def _au_fail(cls, msg, *args):
    raise cls("attnkern: " + (msg % args if args else msg))


def _au_same(t: Tensor, name: str, query: Tensor) -> None:
    if not isinstance(t, Tensor):
        _au_fail(TypeError, "%s must be a tensor, got %s", name, type(t).__name__)
    if t.dtype != query.dtype:
        _au_fail(TypeError, "%s must have the dtype of query (%s), got %s", name, query.dtype,
                 t.dtype)
    if t.device != query.device:
        _au_fail(ValueError, "%s must be on the device of query (%s), got %s", name, query.device,
                 t.device)
    if t.layout != torch.strided:
        _au_fail(ValueError, "%s must be a dense (strided) tensor", name)


def _au_shape(t: Tensor, name: str, want) -> None:
    if tuple(t.shape) != tuple(want):
        _au_fail(ValueError, "%s must have shape %s, got %s", name, list(want), list(t.shape))


def _au_index(t: Tensor, name: str, n: int, query: Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        _au_fail(TypeError, "%s must be int32 or int64, got %s", name, t.dtype)
    if t.dim() != 1 or t.shape[0] != n:
        _au_fail(ValueError, "%s must have shape [%d], got %s", name, n, list(t.shape))
    if t.device != query.device:
        _au_fail(ValueError, "%s must be on the device of query (%s), got %s", name, query.device,
                 t.device)


def _check_activation_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                          w_out, b_out, act1, act2, activation) -> dict:
    """Shape/dtype/device checks of every forward input (never reads tensor data); returns the
    dims. ValueError (shapes, names) / TypeError (dtypes), naming the argument."""
    if not isinstance(query, Tensor):
        _au_fail(TypeError, "query must be a tensor, got %s", type(query).__name__)
    if query.dtype not in _TRITON_DTYPES:
        _au_fail(TypeError, "the triton backend supports query float16, bfloat16 or float32, "
                 "got %s", query.dtype)
    if query.dim() != 3:
        _au_fail(ValueError, "query must be [B, N, E], got %s", list(query.shape))
    if query.shape[1] < 1:
        _au_fail(ValueError, "query must have N >= 1 queries, got %s", list(query.shape))
    _au_same(query, "query", query)
    _au_same(key, "key", query)
    if value is None:  # the keys are also the values
        value = key
    _au_same(value, "value", query)
    B, N, E = query.shape
    if offsets is not None:
        if lengths is not None or mask is not None:
            _au_fail(ValueError, "lengths and mask are for the padded layout; with offsets leave "
                     "them None")
        if key.dim() != 2 or key.shape[1] != E:
            _au_fail(ValueError, "jagged key must be [T, E] = [T, %d], got %s", E, list(key.shape))
        L = key.shape[0]
        if value.dim() != 2 or value.shape[0] != L:
            _au_fail(ValueError, "jagged value must be [T, Dv] = [%d, Dv], got %s", L,
                     list(value.shape))
        _au_index(offsets, "offsets", B + 1, query)
        if max_length < -1:
            _au_fail(ValueError, "max_length must be >= 0 (or -1 for unknown), got %d", max_length)
    else:
        if key.dim() != 3 or key.shape[0] != B or key.shape[2] != E:
            _au_fail(ValueError, "padded key must be [B, L, E] = [%d, L, %d], got %s", B, E,
                     list(key.shape))
        L = key.shape[1]
        if value.dim() != 3 or value.shape[0] != B or value.shape[1] != L:
            _au_fail(ValueError, "padded value must be [B, L, Dv] = [%d, %d, Dv], got %s", B, L,
                     list(value.shape))
        if lengths is not None and mask is not None:
            _au_fail(ValueError, "give lengths or mask, not both")
        if lengths is not None:
            _au_index(lengths, "lengths", B, query)
        if mask is not None:
            if mask.dtype != torch.bool:
                _au_fail(TypeError, "mask must be bool (True = attend), got %s", mask.dtype)
            if tuple(mask.shape) != (B, L):
                _au_fail(ValueError, "mask must have shape [B, L] = [%d, %d], got %s", B, L,
                         list(mask.shape))
            if mask.device != query.device:
                _au_fail(ValueError, "mask must be on the device of query (%s), got %s",
                         query.device, mask.device)
    Dv = value.shape[-1]
    for name, d in (("embedding dim E", E), ("value dim Dv", Dv)):
        if not 1 <= d <= _AU_MAX_DIM:
            _au_fail(ValueError, "%s must be in [1, %d], got %d", name, _AU_MAX_DIM, d)
    if activation not in _ACT_ROWS:
        _au_fail(ValueError, "activation must be relu, sigmoid, prelu or dice, got '%s'",
                 activation)
    _au_same(w1, "w1", query)
    if w1.dim() != 2 or w1.shape[1] != 4 * E:
        _au_fail(ValueError, "w1 must be [H1, 4E] = [H1, %d], got %s", 4 * E, list(w1.shape))
    H1 = w1.shape[0]
    if not 1 <= H1 <= _AU_MAX_DIM:
        _au_fail(ValueError, "hidden units must be in [1, %d], got H1=%d", _AU_MAX_DIM, H1)
    _au_same(b1, "b1", query)
    _au_shape(b1, "b1", (H1,))
    if (w2 is None) != (b2 is None):
        _au_fail(ValueError, "give w2 and b2 together, or neither")
    H2 = 0
    if w2 is not None:
        _au_same(w2, "w2", query)
        if w2.dim() != 2 or w2.shape[1] != H1:
            _au_fail(ValueError, "w2 must be [H2, H1] = [H2, %d], got %s", H1, list(w2.shape))
        H2 = w2.shape[0]
        if not 1 <= H2 <= _AU_MAX_DIM:
            _au_fail(ValueError, "hidden units must be in [1, %d], got H2=%d", _AU_MAX_DIM, H2)
        _au_same(b2, "b2", query)
        _au_shape(b2, "b2", (H2,))
    hl = H2 if H2 else H1
    _au_same(w_out, "w_out", query)
    _au_shape(w_out, "w_out", (1, hl))
    _au_same(b_out, "b_out", query)
    _au_shape(b_out, "b_out", (1,))
    rows = _ACT_ROWS[activation]
    for i, (name, t, h) in enumerate((("act1", act1, H1), ("act2", act2, H2))):
        want = rows > 0 and h > 0
        if (t is not None) != want:
            _au_fail(ValueError, "%s %s for activation '%s'%s", name,
                     "is required" if want else "must be None", activation,
                     " with one hidden layer" if (i == 1 and H2 == 0) else "")
        if want:
            _au_same(t, name, query)
            _au_shape(t, name, (rows, h))
    dev = query.device.type
    if not (dev == "cuda" or (dev == "cpu" and _k.interpret_mode())):
        _au_fail(ValueError, "the triton backend needs CUDA tensors (or CPU tensors with "
                 "TRITON_INTERPRET=1 set before importing triton), got query on %s", query.device)
    layout = "jagged" if offsets is not None else "padded"
    try:
        check_values(Problem(query=query, squeeze_n=False, layout=layout, B=B, N=N, H=1, Hkv=1,
                             Dk=E, Dv=Dv, L=L, scale=1.0), lengths, offsets,
                     None if (offsets is None or max_length < 0) else max_length)
    except ValueError as e:
        raise ValueError("attnkern: %s" % e) from None
    return dict(B=B, N=N, E=E, Dv=Dv, L=L, H1=H1, H2=H2)


def _check_activation_bwd_extras(d: dict, query: Tensor, grad_out: Tensor, lse: Tensor,
                                 delta: Tensor) -> None:
    if grad_out.dtype != query.dtype:
        _au_fail(TypeError, "grad_out must have the dtype of query (%s), got %s", query.dtype,
                 grad_out.dtype)
    _au_shape(grad_out, "grad_out", (d["B"], d["N"], d["Dv"]))
    for name, t in (("lse", lse), ("delta", delta)):
        if t.dtype != torch.float32:
            _au_fail(TypeError, "%s must be torch.float32 for %s inputs, got %s", name, query.dtype,
                     t.dtype)
        _au_shape(t, name, (d["B"], d["N"]))
    for name, t in (("grad_out", grad_out), ("lse", lse), ("delta", delta)):
        if t.device != query.device:
            _au_fail(ValueError, "%s must be on the device of query (%s), got %s", name,
                     query.device, t.device)


@_custom_op("activation_unit_pool_fwd", ACTIVATION_SCHEMAS)
def triton_activation_unit_pool_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                    w2, b2, w_out, b_out, act1, act2, activation, softmax):
    _check_activation_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                          w_out, b_out, act1, act2, activation)
    return _au.activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                   w2, b2, w_out, b_out, act1, act2, activation, softmax)


@_custom_op("activation_unit_pool_bwd", ACTIVATION_SCHEMAS)
def triton_activation_unit_pool_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                    max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                    activation, softmax, lse, delta):
    d = _check_activation_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2,
                              b2, w_out, b_out, act1, act2, activation)
    _check_activation_bwd_extras(d, query, grad_out, lse, delta)
    return _au.activation_unit_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                   max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                   activation, softmax, lse, delta)


register_activation_fakes_and_autograd(TRITON_PREFIX)
