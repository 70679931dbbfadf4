"""The "triton" backend as torch.library custom ops.

    attnkern::triton_attention_pool_fwd / _bwd
    attnkern::triton_jagged_attention_pool_fwd / _bwd

Same schemas as the C++ ops of csrc/ops.cpp. Each op checks its own inputs (shapes, dtypes,
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

from attnkern.triton_kernels import attention_pool as _k

from .._validation import validate
from .autograd import register_fakes_and_autograd
from .schemas import SCHEMAS, TRITON_PREFIX, qualified

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


def _custom_op(name: str):
    """Declares attnkern::triton_<name> with the schema of the C++ op <name>."""
    return torch.library.custom_op(qualified(TRITON_PREFIX + name), mutates_args=(),
                                   schema=SCHEMAS[name])


@_custom_op("attention_pool_fwd")
def triton_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, lengths: Optional[Tensor],
                              mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    _check_padded(query, key, value, lengths, mask)
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
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, lengths=lengths,
                                 mask=mask, scale=scale)


@_custom_op("jagged_attention_pool_fwd")
def triton_jagged_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, offsets: Tensor,
                                     max_length: int, scale: float) -> Tuple[Tensor, Tensor]:
    _check_jagged(query, key, value, offsets, max_length)
    return _k.attention_pool_fwd(query, key, value, offsets=offsets, max_length=max_length,
                                 scale=scale, out_dtype=torch.float32)


@_custom_op("jagged_attention_pool_bwd")
def triton_jagged_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                     offsets: Tensor, max_length: int, lse: Tensor, delta: Tensor,
                                     scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_jagged(query, key, value, offsets, max_length)
    _check_bwd_extras(dims, query, grad_out, lse, delta)
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, offsets=offsets,
                                 max_length=max_length, scale=scale)


register_fakes_and_autograd(TRITON_PREFIX)
