"""The "triton" backend as torch.library custom ops.

    attnkern::triton_attention_pool_fwd / _bwd
    attnkern::triton_jagged_attention_pool_fwd / _bwd
    attnkern::triton_activation_unit_pool_fwd / _bwd   (DIN's activation unit)
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

from .._validation import Problem, check_values, validate
from . import checks
from .activation_scores import SCORES_OP, SCORES_SCHEMAS, register_scores
from .autograd import register_activation_fakes_and_autograd, register_fakes_and_autograd
from .schemas import (ACTIVATION_FWD_ARGS, ACTIVATION_SCHEMAS, NAMESPACE, SCHEMAS, TRITON_PREFIX, argument_names,
                      qualified)

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
