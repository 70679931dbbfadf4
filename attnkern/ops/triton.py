"""The "triton" backend as torch.library custom ops.

    attnkern::triton_attention_pool_fwd / _bwd
    attnkern::triton_jagged_attention_pool_fwd / _bwd
    attnkern::triton_activation_unit_pool_fwd / _bwd   (DIN's activation unit)
    attnkern::triton_attention_topk_fwd                 (top-k by score, forward only)
    attnkern::triton_attention_pool_quant_fwd           (quantized K/V, forward only)
    attnkern::triton_attention_weights_fwd / triton_jagged_attention_weights_fwd
    attnkern::triton_activation_unit_scores_fwd        (its weights; attnkern/ops/activation_scores.py)

Same schemas as the C++ ops (csrc/attention_pool_ops.cpp, csrc/activation_unit_ops.cpp). Each op
checks its own inputs (shapes, dtypes, devices; for CPU tensors under TRITON_INTERPRET=1 also the
lengths/offsets values: the attention pool's with the public API's checks, the activation unit's
with those of the C++ ops, attnkern/ops/checks.py), so a direct torch.ops.attnkern.triton_* call
can never make a kernel read out of bounds; on CUDA the kernels clamp every row to its legal range instead of
reading index values on the host. Fake impls make them traceable by
torch.compile(fullgraph=True); fake impls and autograd are those of the C++ ops
(attnkern/ops/autograd.py), the schemas those of attnkern/ops/schemas.py.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnkern.triton_kernels import activation_unit as _au
from attnkern.triton_kernels import attention_pool as _k
from attnkern.triton_kernels import attention_pool_quant as _quant
from attnkern.triton_kernels import attention_topk as _topk
from attnkern.triton_kernels import attention_weights as _weights

from .._validation import Problem, check_values, validate
from ..limits import MAX_HEAD_DIM
from ..reference import QUANT_DTYPES
from . import checks
from .activation_scores import SCORES_OP, SCORES_SCHEMAS, register_scores
from .autograd import register_activation_fakes_and_autograd, register_fakes_and_autograd
from . import quant as _quant_op
from .topk import TOPK_OP, TOPK_SCHEMA
from .weights import register_weights_fakes_and_autograd
from .topk import _fake_forward as _topk_fake
from .schemas import (ACTIVATION_FWD_ARGS, ACTIVATION_SCHEMAS, NAMESPACE, SCHEMAS, TRITON_PREFIX, WEIGHTS_SCHEMAS,
                      argument_names, qualified)

Tensor = torch.Tensor
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Input checks of the attention-pool ops: the public API's (attnkern/_validation.py, which also
# takes shared K/V heads), plus what the Triton backend cannot run
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


def _with_grad_bias(grads, query: Tensor, bias: Optional[Tensor]):
    """The launcher's gradients with grad_bias last: its own with a bias, else an empty tensor
    of the query's dtype, as the C++ ops return."""
    return tuple(grads) if bias is not None else tuple(grads) + (query.new_empty((0,)),)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def _custom_op(name: str, schemas=SCHEMAS):
    """Declares attnkern::triton_<name> with the schema of the C++ op <name>."""
    return torch.library.custom_op(qualified(TRITON_PREFIX + name), mutates_args=(),
                                   schema=schemas[name])


@_custom_op("attention_pool_fwd")
def triton_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, lengths: Optional[Tensor],
                              mask: Optional[Tensor], scale: float,
                              bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    dims = _check_padded(query, key, value, lengths, mask)
    checks.bias(dims, query, bias, False)
    checks.scale(scale)
    # out as the kernel's unrounded float32 result, as the C++ ops (the public function casts
    # it to the query dtype; the autograd forms delta from it)
    return _k.attention_pool_fwd(query, key, value, lengths=lengths, mask=mask, scale=scale,
                                 out_dtype=torch.float32, bias=bias)


@_custom_op("attention_pool_bwd")
def triton_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                              lengths: Optional[Tensor], mask: Optional[Tensor], lse: Tensor,
                              delta: Tensor, scale: float,
                              bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dims = _check_padded(query, key, value, lengths, mask)
    checks.bias(dims, query, bias, False)
    checks.bwd_extras(dims, query, grad_out, lse, delta)
    checks.scale(scale)
    return _with_grad_bias(_k.attention_pool_bwd(grad_out, query, key, value, lse, delta,
                                                 lengths=lengths, mask=mask, scale=scale,
                                                 bias=bias), query, bias)


@_custom_op("jagged_attention_pool_fwd")
def triton_jagged_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, offsets: Tensor,
                                     max_length: int, scale: float,
                                     bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    dims = _check_jagged(query, key, value, offsets, max_length)
    checks.bias(dims, query, bias, True)
    checks.scale(scale)
    return _k.attention_pool_fwd(query, key, value, offsets=offsets, max_length=max_length,
                                 scale=scale, out_dtype=torch.float32, bias=bias)


@_custom_op("jagged_attention_pool_bwd")
def triton_jagged_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                     offsets: Tensor, max_length: int, lse: Tensor, delta: Tensor,
                                     scale: float, bias: Optional[Tensor] = None
                                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dims = _check_jagged(query, key, value, offsets, max_length)
    checks.bias(dims, query, bias, True)
    checks.bwd_extras(dims, query, grad_out, lse, delta)
    checks.scale(scale)
    return _with_grad_bias(_k.attention_pool_bwd(grad_out, query, key, value, lse, delta,
                                                 offsets=offsets, max_length=max_length,
                                                 scale=scale, bias=bias), query, bias)


register_fakes_and_autograd(TRITON_PREFIX)


# ----------------------------------------------------------------------------------------------
# Activation-unit pooling (DIN): the registered ops' checks (attnkern/ops/checks.py, those of the
# C++ ops), the Triton dtype and device rules, and the lengths/offsets values for CPU tensors
# (for CUDA ones only with set_validation(True); the kernels clamp every row always).
# ----------------------------------------------------------------------------------------------


def _check_activation(a: dict) -> dict:
    """The checks of a forward call (or of the forward part of a backward call), arguments by
    name; returns the dims of checks.activation_unit_fwd."""
    _check_triton_dtype(a["query"])
    d = checks.activation_unit_fwd(a)
    _check_device(a["query"])
    layout = "padded" if a["offsets"] is None else "jagged"
    max_length = None if (a["offsets"] is None or a["max_length"] < 0) else a["max_length"]
    try:
        check_values(Problem(query=a["query"], squeeze_n=False, layout=layout, B=d["B"], N=d["N"], H=1,
                             Hkv=1, Dk=d["E"], Dv=d["Dv"], L=d["L"], scale=1.0),
                     a["lengths"], a["offsets"], max_length)
    except ValueError as e:
        raise ValueError("attnkern: %s" % e) from None
    return d


@_custom_op("activation_unit_pool_fwd", ACTIVATION_SCHEMAS)
def triton_activation_unit_pool_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                    w2, b2, w_out, b_out, act1, act2, activation, softmax):
    _check_activation(dict(zip(ACTIVATION_FWD_ARGS, (query, key, value, lengths, mask, offsets, max_length, w1,
                                                     b1, w2, b2, w_out, b_out, act1, act2, activation,
                                                     softmax))))
    return _au.activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1,
                                   w2, b2, w_out, b_out, act1, act2, activation, softmax)


@_custom_op("activation_unit_pool_bwd", ACTIVATION_SCHEMAS)
def triton_activation_unit_pool_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                    max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                    activation, softmax, lse, delta):
    d = _check_activation(dict(zip(ACTIVATION_FWD_ARGS, (query, key, value, lengths, mask, offsets, max_length,
                                                         w1, b1, w2, b2, w_out, b_out, act1, act2, activation,
                                                         softmax))))
    checks.activation_unit_bwd_extras(d, query, grad_out, lse, delta)
    return _au.activation_unit_bwd(grad_out, query, key, value, lengths, mask, offsets,
                                   max_length, w1, b1, w2, b2, w_out, b_out, act1, act2,
                                   activation, softmax, lse, delta)


register_activation_fakes_and_autograd(TRITON_PREFIX)


# ----------------------------------------------------------------------------------------------
# Attention weights (two passes: row lse, then w = exp(s - lse)): the attention-pool ops' checks
# with the key as the values; fake impls and the device-agnostic autograd of attnkern/ops/weights.py.
# ----------------------------------------------------------------------------------------------


@_custom_op("attention_weights_fwd", WEIGHTS_SCHEMAS)
def triton_attention_weights_fwd(query: Tensor, key: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor],
                                 scale: float, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    dims = _check_padded(query, key, key, lengths, mask)
    checks.bias(dims, query, bias, False)
    checks.scale(scale)
    return _weights.attention_weights_fwd(query, key, lengths=lengths, mask=mask, scale=scale, bias=bias)


@_custom_op("jagged_attention_weights_fwd", WEIGHTS_SCHEMAS)
def triton_jagged_attention_weights_fwd(query: Tensor, key: Tensor, offsets: Tensor, max_length: int,
                                        scale: float, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    dims = _check_jagged(query, key, key, offsets, max_length)
    checks.bias(dims, query, bias, True)
    checks.scale(scale)
    return _weights.attention_weights_fwd(query, key, offsets=offsets, max_length=max_length, scale=scale,
                                          bias=bias)


register_weights_fakes_and_autograd(TRITON_PREFIX)


# ----------------------------------------------------------------------------------------------
# Top-k by score: the checks of the C++ op (csrc/cpu/attention_topk_launch.cpp), the Triton
# dtype and device rules, the lengths/offsets values for CPU tensors. Forward only, as the C++
# op: attnkern.attention_topk recomputes the selected scores when a gradient is needed.
# ----------------------------------------------------------------------------------------------


def _check_topk(query, key, lengths, mask, offsets, k, scale, bias):
    _check_triton_dtype(query)
    checks.float_query(query)
    checks.dense(key, "key")
    checks.same_dtype(key, "key", query)
    checks.on_query_device(key, "key", query)
    if query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %s" % list(query.shape))
    B, N, H, Dk = query.shape
    if N < 1 or H < 1:
        raise ValueError("attnkern: query must have N, H >= 1, got %s" % list(query.shape))
    checks.dim_in_range("query head dim Dk", Dk, MAX_HEAD_DIM)
    jagged = offsets is not None
    if key.dim() != (3 if jagged else 4):
        raise ValueError("attnkern: key must be %s, got %s" % (
            "jagged [T, Hkv, Dk] (offsets given)" if jagged else "padded [B, L, Hkv, Dk]", list(key.shape)))
    L, Hkv = (key.shape[0], key.shape[1]) if jagged else (key.shape[1], key.shape[2])
    if (not jagged and key.shape[0] != B) or key.shape[-1] != Dk or Hkv < 1 or H % Hkv:
        raise ValueError("attnkern: key must have B = %d rows (padded), Dk = %d and a head count dividing "
                         "H = %d, got %s" % (B, Dk, H, list(key.shape)))
    if k < 0:
        raise ValueError("attnkern: k must be >= 0, got %d" % k)
    checks.scale(scale)
    if (lengths is not None) + (mask is not None) + jagged > 1:
        raise ValueError("attnkern: give at most one of lengths, mask (padded) and offsets (jagged)")
    if lengths is not None:
        checks.index_tensor(lengths, "lengths", B, query)
    if jagged:
        checks.index_tensor(offsets, "offsets", B + 1, query)
    if mask is not None:
        checks.mask_tensor(mask, B, L, query)
    if bias is not None:
        checks.bias((B, N, H, Dk, 0, L), query, bias, jagged)
        if bias.shape[1] not in (1, N):
            raise ValueError("attnkern: bias must have Nb 1 or N = %d, got %s" % (N, list(bias.shape)))
    _check_device(query)
    try:
        check_values(Problem(query=query, squeeze_n=False, layout="jagged" if jagged else "padded", B=B, N=N,
                             H=H, Hkv=Hkv, Dk=Dk, Dv=Dk, L=L, scale=scale), lengths, offsets, None)
    except ValueError as e:
        raise ValueError("attnkern: %s" % e) from None


@torch.library.custom_op(qualified(TRITON_PREFIX + TOPK_OP), mutates_args=(), schema=TOPK_SCHEMA)
def triton_attention_topk_fwd(query, key, lengths, mask, offsets, k, scale, bias=None):
    _check_topk(query, key, lengths, mask, offsets, k, scale, bias)
    return _topk.attention_topk_fwd(query, key, k, lengths, mask, offsets, scale, bias)


torch.library.register_fake(qualified(TRITON_PREFIX + TOPK_OP), _topk_fake)


# ----------------------------------------------------------------------------------------------
# Quantized K/V attention pool: the checks of the C++ op (csrc/cpu/attention_pool_quant_launch.cpp),
# its schema (csrc/attention_pool_quant_ops.cpp; tests/test_triton_wave3.py holds them equal), its
# fake impl and the autograd that refuses a gradient (attnkern/ops/quant.py).
# ----------------------------------------------------------------------------------------------

QUANT_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor key_scale, Tensor? key_bias, Tensor value_scale, "
    "Tensor? value_bias, Tensor? lengths, Tensor? mask, Tensor? offsets, int max_length, float scale, "
    "Tensor? bias=None) -> (Tensor out, Tensor lse)")


def _check_quant(query, key, value, params, lengths, mask, offsets, max_length, scale, bias):
    checks.dense(query, "query")
    if query.dtype not in _TRITON_DTYPES:
        raise TypeError("attnkern: with quantized key/value, query must be float16, bfloat16 or float32, got %s"
                        % query.dtype)
    if query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %s" % list(query.shape))
    for t, n in ((key, "key"), (value, "value")):
        checks.dense(t, n)
    if key.dtype not in QUANT_DTYPES:
        raise TypeError("attnkern: quantized key must be torch.int8, torch.uint8, torch.float8_e4m3fn or "
                        "torch.float8_e5m2, got %s" % key.dtype)
    if value.dtype != key.dtype:
        raise TypeError("attnkern: value must have the dtype of key (%s), got %s" % (key.dtype, value.dtype))
    for t, n in ((key, "key"), (value, "value")):
        checks.on_query_device(t, n, query)
    jagged = offsets is not None
    rank = 3 if jagged else 4
    if key.dim() != rank or value.dim() != rank:
        raise ValueError("attnkern: %s, got %s and %s" % (
            "jagged key/value must be [T, H, Dk] / [T, H, Dv]" if jagged
            else "padded key/value must be [B, L, H, Dk] / [B, L, H, Dv]", list(key.shape), list(value.shape)))
    B, N, H, Dk = query.shape
    L, Dv = key.shape[rank - 3], value.shape[-1]
    if N < 1 or H < 1:
        raise ValueError("attnkern: query must have N >= 1 and H >= 1, got %s" % list(query.shape))
    checks.dim_in_range("query/key head dim Dk", Dk, MAX_HEAD_DIM)
    checks.dim_in_range("value head dim Dv", Dv, MAX_HEAD_DIM)
    lead = (L, H) if jagged else (B, L, H)
    checks.shape(key, "key", lead + (Dk,))
    checks.shape(value, "value", lead + (Dv,))
    for name, t in params.items():
        if t is None:
            continue
        checks.dense(t, name)
        if t.dtype != torch.float32:
            raise TypeError("attnkern: %s must be torch.float32, got %s" % (name, t.dtype))
        checks.shape(t, name, lead)
        checks.on_query_device(t, name, query)
    if lengths is not None and mask is not None:
        raise ValueError("attnkern: give lengths or mask, not both")
    if jagged and (lengths is not None or mask is not None):
        raise ValueError("attnkern: lengths and mask are for the padded layout, got offsets too")
    if lengths is not None:
        checks.index_tensor(lengths, "lengths", B, query)
    if mask is not None:
        checks.mask_tensor(mask, B, L, query)
    if jagged:
        checks.index_tensor(offsets, "offsets", B + 1, query)
        checks.max_length(max_length)
    checks.bias((B, N, H, Dk, Dv, L), query, bias, jagged)
    checks.scale(scale)
    _check_device(query)
    try:
        check_values(Problem(query=query, squeeze_n=False, layout="jagged" if jagged else "padded", B=B, N=N,
                             H=H, Hkv=H, Dk=Dk, Dv=Dv, L=L, scale=scale), lengths, offsets,
                     None if max_length < 0 else max_length)
    except ValueError as e:
        raise ValueError("attnkern: %s" % e) from None


@torch.library.custom_op(qualified(TRITON_PREFIX + _quant_op.QUANT_FWD), mutates_args=(), schema=QUANT_SCHEMA)
def triton_attention_pool_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias, lengths,
                                    mask, offsets, max_length, scale, bias=None):
    params = dict(key_scale=key_scale, key_bias=key_bias, value_scale=value_scale, value_bias=value_bias)
    _check_quant(query, key, value, params, lengths, mask, offsets, max_length, scale, bias)
    return _quant.attention_pool_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias,
                                           lengths, mask, offsets, max_length, scale, bias)


torch.library.register_fake(qualified(TRITON_PREFIX + _quant_op.QUANT_FWD), _quant_op._fake)
torch.library.register_autograd(qualified(TRITON_PREFIX + _quant_op.QUANT_FWD), _quant_op._backward,
                                setup_context=_quant_op._setup_context)
@_custom_op(SCORES_OP, SCORES_SCHEMAS)
def triton_activation_unit_scores_fwd(query, key, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                                      w_out, b_out, act1, act2, activation, softmax):
    _check_activation(dict(zip(ACTIVATION_FWD_ARGS, (query, key, None, lengths, mask, offsets, max_length, w1,
                                                     b1, w2, b2, w_out, b_out, act1, act2, activation,
                                                     softmax))))
    return _au.activation_unit_scores_fwd(query, key, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                                          w_out, b_out, act1, act2, activation, softmax)


register_scores(TRITON_PREFIX)


# Nested tensors dispatch to keys of their own, where the ops above are not registered: there
# the checks turn them into a TypeError naming the argument (as the C++ ops do), instead of the
# dispatcher's "could not run ... with arguments from the NestedTensorCPU backend".
_NESTED = torch.library.Library(NAMESPACE, "IMPL")


def _reject_nested(name: str):
    names = argument_names(name)

    def reject(*args):
        for n, t in zip(names, args):
            if isinstance(t, Tensor):
                checks.dense(t, n)
        raise TypeError("attnkern: %s takes dense (strided) tensors only" % (TRITON_PREFIX + name))

    return reject


for _name in (*SCHEMAS, *ACTIVATION_SCHEMAS, *SCORES_SCHEMAS):
    for _key in ("NestedTensorCPU", "NestedTensorCUDA"):
        _NESTED.impl(TRITON_PREFIX + _name, _reject_nested(_name), _key)


# Sequence self-attention's Triton ops (attnkern::triton_sequence_attention_fwd/_bwd), registered
# with the others.
from . import triton_sequence  # noqa: E402,F401
