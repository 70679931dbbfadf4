"""Argument checks of the public API. Every malformed call raises before any kernel runs:
ValueError for shapes, layouts, values, scale and backend names; TypeError for dtypes and
non-tensors. Messages name the argument and give what was expected and what was given."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256

_validation = os.environ.get("ATTNKERN_VALIDATE", "0") not in ("", "0")


def set_validation(enabled: bool) -> None:
    """Turn the value checks of lengths/offsets/max_length on for CUDA tensors too.

    They read device memory (a sync), so for CUDA tensors they are off by default and the
    kernels clamp every row to its legal range instead. Also set by ATTNKERN_VALIDATE=1.
    CPU tensors are always checked."""
    global _validation
    _validation = bool(enabled)


def validation_enabled() -> bool:
    return _validation


@dataclass
class Problem:
    """The normalised call: canonical 4-D query, layout and sizes."""

    query: torch.Tensor  # [B, N, H, Dk]
    squeeze_n: bool
    layout: str  # "padded" | "jagged"
    B: int
    N: int
    H: int
    Dk: int
    Dv: int
    L: int  # padded L, or jagged T
    scale: float


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
    # Sparse, mkldnn and nested tensors have no strides to hand a kernel (a nested tensor cannot
    # even report its sizes): refuse them by name, before anything reads their shape.
    if x.is_nested:
        raise TypeError("%s must be a dense (strided) tensor, got a nested tensor" % name)
    if x.layout != torch.strided:
        raise TypeError("%s must be a dense (strided) tensor, got layout %s" % (name, x.layout))


def _check_index(x, name, expected_len, device):
    _check_tensor(x, name)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError("%s must be int32 or int64, got %s" % (name, x.dtype))
    if x.dim() != 1 or x.shape[0] != expected_len:
        raise ValueError("%s must have shape [%d], got %s" % (name, expected_len, list(x.shape)))
    if x.device != device:
        raise ValueError("%s must be on the device of query (%s), got %s" % (name, device, x.device))


def _reads_values(t: torch.Tensor) -> bool:
    """Whether value checks may read this tensor now (CPU always; CUDA only with validation;
    never while torch.compile traces, where the ops check their own inputs)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _validation


def validate(query, key, value, lengths, mask, offsets, max_length, scale, return_lse,
             values: bool = True) -> Problem:
    """Checks a call and returns it normalised. values=False leaves the reads of lengths/offsets
    values to `check_values`, for callers whose kernel checks them itself."""
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(x, name)
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "query must be float16, bfloat16, float32 or float64, got %s" % query.dtype
        )
    for x, name in ((key, "key"), (value, "value")):
        if x.dtype != query.dtype:
            raise TypeError(
                "%s must have the dtype of query (%s), got %s" % (name, query.dtype, x.dtype)
            )
        if x.device != query.device:
            raise ValueError(
                "%s must be on the device of query (%s), got %s" % (name, query.device, x.device)
            )
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool, got %s" % type(return_lse).__name__)

    # query: [B, H, Dk] or [B, N, H, Dk]
    if query.dim() == 3:
        q4, squeeze_n = query.unsqueeze(1), True
    elif query.dim() == 4:
        q4, squeeze_n = query, False
    else:
        raise ValueError(
            "query must be [B, H, Dk] or [B, N, H, Dk], got %d dims %s"
            % (query.dim(), list(query.shape))
        )
    B, N, H, Dk = q4.shape
    if H < 1:
        raise ValueError("query must have H >= 1 heads, got %s" % list(query.shape))
    if N < 1:
        raise ValueError("query must have N >= 1 queries, got %s" % list(query.shape))
    if not 1 <= Dk <= MAX_HEAD_DIM:
        raise ValueError("query head dim Dk must be in [1, %d], got %d" % (MAX_HEAD_DIM, Dk))

    jagged = offsets is not None
    if jagged:
        if lengths is not None:
            raise ValueError("lengths is for the padded layout; with offsets (jagged) leave it None")
        if mask is not None:
            raise ValueError("mask is for the padded layout; with offsets (jagged) leave it None")
        if key.dim() != 3:
            raise ValueError("with offsets, key must be jagged [T, H, Dk], got %s" % list(key.shape))
        if value.dim() != 3:
            raise ValueError(
                "with offsets, value must be jagged [T, H, Dv], got %s" % list(value.shape)
            )
        T = key.shape[0]
        if tuple(key.shape[1:]) != (H, Dk):
            raise ValueError(
                "key must be [T, H, Dk] = [T, %d, %d] to match query %s, got %s"
                % (H, Dk, list(query.shape), list(key.shape))
            )
        if value.shape[0] != T or value.shape[1] != H:
            raise ValueError(
                "value must be [T, H, Dv] = [%d, %d, Dv] to match key, got %s"
                % (T, H, list(value.shape))
            )
        _check_index(offsets, "offsets", B + 1, query.device)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
                raise TypeError(
                    "max_length must be a Python int, got %s" % type(max_length).__name__
                )
            if max_length < 0:
                raise ValueError("max_length must be >= 0, got %d" % max_length)
            if max_length >= 2 ** 63:
                raise ValueError("max_length must be < 2**63 (an int64), got %d" % max_length)
        L = T
    else:
        if max_length is not None:
            raise ValueError("max_length is for the jagged layout (with offsets); got offsets=None")
        if key.dim() != 4:
            hint = " (a 3-D key is jagged: pass offsets)" if key.dim() == 3 else ""
            raise ValueError("key must be padded [B, L, H, Dk]%s, got %s" % (hint, list(key.shape)))
        if value.dim() != 4:
            raise ValueError("value must be padded [B, L, H, Dv], got %s" % list(value.shape))
        L = key.shape[1]
        if tuple(key.shape) != (B, L, H, Dk):
            raise ValueError(
                "key must be [B, L, H, Dk] = [%d, L, %d, %d] to match query %s, got %s"
                % (B, H, Dk, list(query.shape), list(key.shape))
            )
        if tuple(value.shape[:3]) != (B, L, H):
            raise ValueError(
                "value must be [B, L, H, Dv] = [%d, %d, %d, Dv] to match key, got %s"
                % (B, L, H, list(value.shape))
            )
        if lengths is not None and mask is not None:
            raise ValueError("give lengths or mask, not both")
        if lengths is not None:
            _check_index(lengths, "lengths", B, query.device)
        if mask is not None:
            _check_tensor(mask, "mask")
            if mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = attend), got %s" % mask.dtype)
            if tuple(mask.shape) != (B, L):
                raise ValueError("mask must have shape [B, L] = [%d, %d], got %s" % (B, L, list(mask.shape)))
            if mask.device != query.device:
                raise ValueError(
                    "mask must be on the device of query (%s), got %s" % (query.device, mask.device)
                )
    Dv = value.shape[-1]
    if not 1 <= Dv <= MAX_HEAD_DIM:
        raise ValueError("value head dim Dv must be in [1, %d], got %d" % (MAX_HEAD_DIM, Dv))

    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError("scale must be a float, got %s" % type(scale).__name__)
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError("scale must be finite, got %r" % scale)

    prob = Problem(q4, squeeze_n, "jagged" if jagged else "padded", B, N, H, Dk, Dv, L, scale)
    if values:
        check_values(prob, lengths, offsets, max_length)
    return prob


def check_values(prob: Problem, lengths, offsets, max_length) -> None:
    """The checks that read lengths/offsets values: always for CPU tensors; for CUDA tensors
    only with set_validation(True), since they sync the device; never while torch.compile
    traces (see `checked_index_values`)."""
    if lengths is not None and _reads_values(lengths):
        _check_lengths(lengths, prob.L)
    if prob.layout == "jagged" and _reads_values(offsets):
        _check_offsets(offsets, prob.L, max_length)


def _check_lengths(lengths: torch.Tensor, L: int) -> None:
    if lengths.numel() == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0:
        raise ValueError("lengths must be >= 0, got a length of %d" % lo)
    if hi > L:
        raise ValueError("lengths must be <= L = %d, got a length of %d" % (L, hi))


def _check_offsets(offsets: torch.Tensor, T: int, max_length: Optional[int]) -> None:
    o = offsets.to(torch.long)
    if int(o[0]) != 0:
        raise ValueError("offsets[0] must be 0, got %d" % int(o[0]))
    diffs = o[1:] - o[:-1]
    bad = torch.nonzero(diffs < 0)
    if bad.numel() > 0:
        i = int(bad[0, 0])
        raise ValueError(
            "offsets must be non-decreasing, got offsets[%d]=%d > offsets[%d]=%d"
            % (i, int(o[i]), i + 1, int(o[i + 1]))
        )
    if max_length is not None and diffs.numel() > 0:
        longest = int(diffs.max())
        if longest > max_length:
            i = int(torch.argmax(diffs))
            raise ValueError(
                "max_length=%d is less than the length %d that offsets give row %d"
                % (max_length, longest, i)
            )
    if int(o[-1]) > T:
        raise ValueError("offsets[-1] must be <= T = %d (key rows), got %d" % (T, int(o[-1])))


@torch.library.custom_op("attnkern::checked_index_values", mutates_args=())
def _checked_index_values(index: torch.Tensor, jagged: bool, size: int,
                          max_length: int) -> torch.Tensor:
    """A copy of lengths (jagged=False, size=L) or offsets (jagged=True, size=T, max_length -1
    for none) after the value checks: the form the checks take inside a compiled graph, where
    they run when the graph runs. The caller uses the copy, so the op is never dropped."""
    if jagged:
        _check_offsets(index, size, None if max_length < 0 else max_length)
    else:
        _check_lengths(index, size)
    return index.clone()


@_checked_index_values.register_fake
def _(index, jagged, size, max_length):
    return torch.empty_like(index)


def checked_index_values(prob: Problem, lengths, offsets, max_length):
    """(lengths, offsets) routed through the checking op where check_values would read them;
    for callers inside torch.compile, where check_values cannot read tensors."""
    if lengths is not None and (lengths.device.type == "cpu" or _validation):
        lengths = _checked_index_values(lengths, False, prob.L, -1)
    if offsets is not None and (offsets.device.type == "cpu" or _validation):
        ml = -1 if max_length is None else int(max_length)
        offsets = _checked_index_values(offsets, True, prob.L, ml)
    return lengths, offsets
