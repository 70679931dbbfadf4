"""The "triton" backend as torch.library custom ops.

    attnkern::triton_attention_pool_fwd / _bwd
    attnkern::triton_jagged_attention_pool_fwd / _bwd

Same schemas as the C++ ops of csrc/ops.cpp. Each op checks its own inputs (shapes, dtypes,
devices; for CPU tensors under TRITON_INTERPRET=1 also the lengths/offsets values) with the
messages of the C++ checks, so a direct torch.ops.attnkern.triton_* call can never make a
kernel read out of bounds; on CUDA the kernels clamp every row to its legal range instead of
reading index values on the host. Fake impls make them traceable by
torch.compile(fullgraph=True); autograd comes from attnkern._ops.register_pool_autograd.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnkern.triton_kernels import attention_pool as _k

from ._ops import fake_bwd, fake_fwd, register_pool_autograd

Tensor = torch.Tensor
MAX_HEAD_DIM = 256
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Input checks (the Python twin of csrc/checks.cpp, plus what the Triton backend cannot run)
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


def _check_qkv_common(query: Tensor, key: Tensor, value: Tensor) -> None:
    if query.dtype not in _TRITON_DTYPES:
        raise TypeError(
            "attnkern: the triton backend supports query float16, bfloat16 or float32, got %s"
            % query.dtype
        )
    if key.dtype != query.dtype:
        raise TypeError("attnkern: key must have the dtype of query (%s), got %s"
                        % (query.dtype, key.dtype))
    if value.dtype != query.dtype:
        raise TypeError("attnkern: value must have the dtype of query (%s), got %s"
                        % (query.dtype, value.dtype))
    if key.device != query.device or value.device != query.device:
        raise ValueError("attnkern: query, key and value must be on one device, got %s, %s, %s"
                         % (query.device, key.device, value.device))
    if query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %d dims" % query.dim())
    _check_device(query)


def _check_dims(N: int, H: int, Dk: int, Dv: int) -> None:
    if H < 1:
        raise ValueError("attnkern: query must have H >= 1 heads, got H=%d" % H)
    if N < 1:
        raise ValueError("attnkern: query must have N >= 1 queries, got N=%d" % N)
    if not 1 <= Dk <= MAX_HEAD_DIM:
        raise ValueError("attnkern: query/key head dim Dk must be in [1, %d], got %d"
                         % (MAX_HEAD_DIM, Dk))
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError("attnkern: value head dim Dv must be in [1, %d], got %d"
                         % (MAX_HEAD_DIM, Dv))


def _check_index(t: Tensor, name: str, expected_len: int, query: Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError("attnkern: %s must be int32 or int64, got %s" % (name, t.dtype))
    if t.dim() != 1 or t.shape[0] != expected_len:
        raise ValueError("attnkern: %s must have shape [%d], got %s"
                         % (name, expected_len, list(t.shape)))
    if t.device != query.device:
        raise ValueError("attnkern: %s must be on the device of query (%s), got %s"
                         % (name, query.device, t.device))


def _check_padded(query, key, value, lengths, mask) -> Tuple[int, int, int, int, int, int]:
    _check_qkv_common(query, key, value)
    if key.dim() != 4:
        raise ValueError("attnkern: padded key must be [B, L, H, Dk], got %s" % list(key.shape))
    if value.dim() != 4:
        raise ValueError("attnkern: padded value must be [B, L, H, Dv], got %s" % list(value.shape))
    B, N, H, Dk = query.shape
    L, Dv = key.shape[1], value.shape[3]
    if key.shape[0] != B or key.shape[2] != H or key.shape[3] != Dk:
        raise ValueError("attnkern: key must be [B, L, H, Dk] = [%d, L, %d, %d] to match query %s, "
                         "got %s" % (B, H, Dk, list(query.shape), list(key.shape)))
    if value.shape[0] != B or value.shape[1] != L or value.shape[2] != H:
        raise ValueError("attnkern: value must be [B, L, H, Dv] = [%d, %d, %d, Dv] to match key %s, "
                         "got %s" % (B, L, H, list(key.shape), list(value.shape)))
    _check_dims(N, H, Dk, Dv)
    if lengths is not None and mask is not None:
        raise ValueError("attnkern: give lengths or mask, not both")
    if lengths is not None:
        _check_index(lengths, "lengths", B, query)
        if lengths.device.type == "cpu" and lengths.numel() > 0:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 0:
                raise ValueError("attnkern: lengths must be >= 0, got a length of %d" % lo)
            if hi > L:
                raise ValueError("attnkern: lengths must be <= L = %d, got a length of %d" % (L, hi))
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError("attnkern: mask must be bool (True = attend), got %s" % mask.dtype)
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] != L:
            raise ValueError("attnkern: mask must have shape [B, L] = [%d, %d], got %s"
                             % (B, L, list(mask.shape)))
        if mask.device != query.device:
            raise ValueError("attnkern: mask must be on the device of query (%s), got %s"
                             % (query.device, mask.device))
    return B, N, H, Dk, Dv, L


def _check_jagged(query, key, value, offsets, max_length) -> Tuple[int, int, int, int, int, int]:
    _check_qkv_common(query, key, value)
    if key.dim() != 3:
        raise ValueError("attnkern: jagged key must be [T, H, Dk], got %s" % list(key.shape))
    if value.dim() != 3:
        raise ValueError("attnkern: jagged value must be [T, H, Dv], got %s" % list(value.shape))
    B, N, H, Dk = query.shape
    T, Dv = key.shape[0], value.shape[2]
    if key.shape[1] != H or key.shape[2] != Dk:
        raise ValueError("attnkern: key must be [T, H, Dk] = [T, %d, %d] to match query %s, got %s"
                         % (H, Dk, list(query.shape), list(key.shape)))
    if value.shape[0] != T or value.shape[1] != H:
        raise ValueError("attnkern: value must be [T, H, Dv] = [%d, %d, Dv] to match key %s, got %s"
                         % (T, H, list(key.shape), list(value.shape)))
    _check_dims(N, H, Dk, Dv)
    _check_index(offsets, "offsets", B + 1, query)
    if max_length < -1:
        raise ValueError("attnkern: max_length must be >= 0 (or -1 for unknown), got %d" % max_length)
    if offsets.device.type == "cpu":
        o = offsets.to(torch.int64)
        if int(o[0]) != 0:
            raise ValueError("attnkern: offsets[0] must be 0, got %d" % int(o[0]))
        if B > 0:
            lens = o[1:] - o[:-1]
            if bool((lens < 0).any()):
                i = int(torch.nonzero(lens < 0)[0, 0]) + 1
                raise ValueError("attnkern: offsets must be non-decreasing, got offsets[%d]=%d > "
                                 "offsets[%d]=%d" % (i - 1, int(o[i - 1]), i, int(o[i])))
            if max_length >= 0 and bool((lens > max_length).any()):
                i = int(torch.nonzero(lens > max_length)[0, 0])
                raise ValueError("attnkern: row %d has length %d > max_length=%d"
                                 % (i, int(lens[i]), max_length))
        if int(o[-1]) > T:
            raise ValueError("attnkern: offsets[-1] must be <= T = %d (key rows), got %d"
                             % (T, int(o[-1])))
    return B, N, H, Dk, Dv, T


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

_PADDED_FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, float scale) "
    "-> (Tensor out, Tensor lse)"
)
_PADDED_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
    "Tensor lse, Tensor delta, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)
_JAGGED_FWD_SCHEMA = (
    "(Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, float scale) "
    "-> (Tensor out, Tensor lse)"
)
_JAGGED_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor offsets, int max_length, "
    "Tensor lse, Tensor delta, float scale) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)


@torch.library.custom_op("attnkern::triton_attention_pool_fwd", mutates_args=(),
                         schema=_PADDED_FWD_SCHEMA)
def triton_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, lengths: Optional[Tensor],
                              mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    _check_padded(query, key, value, lengths, mask)
    return _k.attention_pool_fwd(query, key, value, lengths=lengths, mask=mask, scale=scale)


@torch.library.custom_op("attnkern::triton_attention_pool_bwd", mutates_args=(),
                         schema=_PADDED_BWD_SCHEMA)
def triton_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                              lengths: Optional[Tensor], mask: Optional[Tensor], lse: Tensor,
                              delta: Tensor, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_padded(query, key, value, lengths, mask)
    _check_bwd_extras(dims, query, grad_out, lse, delta)
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, lengths=lengths,
                                 mask=mask, scale=scale)


@torch.library.custom_op("attnkern::triton_jagged_attention_pool_fwd", mutates_args=(),
                         schema=_JAGGED_FWD_SCHEMA)
def triton_jagged_attention_pool_fwd(query: Tensor, key: Tensor, value: Tensor, offsets: Tensor,
                                     max_length: int, scale: float) -> Tuple[Tensor, Tensor]:
    _check_jagged(query, key, value, offsets, max_length)
    return _k.attention_pool_fwd(query, key, value, offsets=offsets, max_length=max_length,
                                 scale=scale)


@torch.library.custom_op("attnkern::triton_jagged_attention_pool_bwd", mutates_args=(),
                         schema=_JAGGED_BWD_SCHEMA)
def triton_jagged_attention_pool_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                     offsets: Tensor, max_length: int, lse: Tensor, delta: Tensor,
                                     scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_jagged(query, key, value, offsets, max_length)
    _check_bwd_extras(dims, query, grad_out, lse, delta)
    return _k.attention_pool_bwd(grad_out, query, key, value, lse, delta, offsets=offsets,
                                 max_length=max_length, scale=scale)


@triton_attention_pool_fwd.register_fake
def _(query, key, value, lengths, mask, scale):
    return fake_fwd(query, value)


@triton_jagged_attention_pool_fwd.register_fake
def _(query, key, value, offsets, max_length, scale):
    return fake_fwd(query, value)


@triton_attention_pool_bwd.register_fake
def _(grad_out, query, key, value, lengths, mask, lse, delta, scale):
    return fake_bwd(query, key, value)


@triton_jagged_attention_pool_bwd.register_fake
def _(grad_out, query, key, value, offsets, max_length, lse, delta, scale):
    return fake_bwd(query, key, value)


register_pool_autograd("attnkern::triton_attention_pool_fwd",
                       torch.ops.attnkern.triton_attention_pool_bwd, "padded")
register_pool_autograd("attnkern::triton_jagged_attention_pool_fwd",
                       torch.ops.attnkern.triton_jagged_attention_pool_bwd, "jagged")
