"""Argument checks of attnkern.sequence_attention (the conventions of attnkern._validation:
ValueError for shapes, layouts and values, TypeError for dtypes and non-tensors; every message
names the argument and gives what was expected and what was given)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._validation import (_check_dim, _check_heads, _check_index, _check_jagged_index,
                          _check_lengths, _check_offsets, _check_qkv, _check_tensor,
                          _reads_values, _same, resolve_scale)
from .limits import MAX_HEAD_DIM
from .reference import SEQUENCE_NORMALIZATIONS, TIME_BUCKETS

_TIME_DTYPES = (torch.int32, torch.int64)


@dataclass
class SeqProblem:
    """The normalised call (see docs/sequence_attention.md for the canonical op layout)."""

    layout: str  # "padded" | "jagged"
    B: int
    L: int  # padded L; jagged: max_length (None until known: the rows' maximum)
    T: int  # tokens: jagged T, padded B * L
    H: int
    Hkv: int
    Dk: int
    Dv: int
    Hb: int  # heads of the tables / dense bias (1 or H); 0 without any
    scale: float
    silu: bool


def _int_arg(x, name: str, low: int = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError("%s must be a Python int, got %s" % (name, type(x).__name__))
    if x < low:
        raise ValueError("%s must be >= %d, got %d" % (name, low, x))
    if x >= 2 ** 31:
        raise ValueError("%s must be < 2**31, got %d" % (name, x))
    return int(x)


def _choice(x, name: str, choices) -> str:
    if not isinstance(x, str):
        raise TypeError("%s must be a str, got %s" % (name, type(x).__name__))
    if x not in choices:
        raise ValueError("%s must be one of %s, got %r" % (name, ", ".join(map(repr, choices)), x))
    return x


def _per_token(x, name: str, shape, dtypes, device, what: str) -> None:
    _check_tensor(x, name)
    if x.dtype not in dtypes:
        raise TypeError("%s must be %s, got %s" % (name, what, x.dtype))
    if tuple(x.shape) != tuple(shape):
        raise ValueError("%s must have shape %s (one per query token), got %s"
                         % (name, list(shape), list(x.shape)))
    if x.device != device:
        raise ValueError("%s must be on the device of query (%s), got %s" % (name, device, x.device))


def _table(t, name: str, H: int, query, rows: str) -> int:
    _same(t, name, query)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] not in (1, H):
        raise ValueError("%s must be [%s, Hb] with %s >= 1 and Hb in {1, H = %d}, got %s"
                         % (name, rows, rows, H, list(t.shape)))
    return t.shape[1]


def validate_sequence(query, key, value, offsets, lengths, max_length, causal, num_targets,
                      contextual_len, max_attn_len, normalization, scale, key_times, query_times,
                      time_table, position_table, attn_scale, bias, time_bucket,
                      return_lse) -> SeqProblem:
    """Checks a call's shapes, dtypes and options (not the values of its index tensors:
    `check_sequence_values`)."""
    _check_qkv(query, key, value)
    for flag, name in ((causal, "causal"), (return_lse, "return_lse")):
        if not isinstance(flag, bool):
            raise TypeError("%s must be a bool, got %s" % (name, type(flag).__name__))
    normalization = _choice(normalization, "normalization", SEQUENCE_NORMALIZATIONS)
    _choice(time_bucket, "time_bucket", TIME_BUCKETS)
    contextual_len = _int_arg(contextual_len, "contextual_len")
    max_attn_len = _int_arg(max_attn_len, "max_attn_len")
    silu = normalization == "silu"
    if return_lse and silu:
        raise ValueError("return_lse is for normalization='softmax' (silu has no normalizer), "
                         "got normalization='silu' with return_lse=True")
    dev = query.device
    jagged = offsets is not None
    if jagged:
        if lengths is not None:
            raise ValueError("give offsets (jagged) or lengths (padded), not both")
        for x, name, shape in ((query, "query", "[T, H, Dk]"), (key, "key", "[T, Hkv, Dk]"),
                               (value, "value", "[T, Hkv, Dv]")):
            if x.dim() != 3:
                raise ValueError("with offsets, %s must be jagged %s, got %s"
                                 % (name, shape, list(x.shape)))
        B = offsets.shape[0] - 1 if isinstance(offsets, torch.Tensor) and offsets.dim() == 1 else -1
        if B < 0:
            _check_tensor(offsets, "offsets")
            raise ValueError("offsets must have shape [B + 1], got %s" % list(offsets.shape))
        _check_jagged_index(offsets, max_length, B, dev)
        T = query.shape[0]
        L = max_length
        lead = (T,)
    else:
        if max_length is not None:
            raise ValueError("max_length is for the jagged layout (with offsets); padded inputs "
                             "have L = query.shape[1]; got max_length=%r" % (max_length,))
        for x, name, shape in ((query, "query", "[B, L, H, Dk]"), (key, "key", "[B, L, Hkv, Dk]"),
                               (value, "value", "[B, L, Hkv, Dv]")):
            if x.dim() != 4:
                hint = " (a 3-D tensor is jagged: pass offsets)" if x.dim() == 3 else ""
                raise ValueError("%s must be padded %s%s, got %s"
                                 % (name, shape, hint, list(x.shape)))
        B, L = query.shape[0], query.shape[1]
        if lengths is not None:
            _check_index(lengths, "lengths", B, dev)
        T = B * L
        lead = (B, L)
    nlead = len(lead)
    H, Dk = query.shape[-2], query.shape[-1]
    Hkv, Dv = key.shape[-2], value.shape[-1]
    if H < 1:
        raise ValueError("query must have H >= 1 heads, got %s" % list(query.shape))
    _check_heads(H, Hkv, query, key)
    _check_dim("query head dim Dk", Dk, MAX_HEAD_DIM)
    _check_dim("value head dim Dv", Dv, MAX_HEAD_DIM)
    if tuple(query.shape[:nlead]) != lead:
        raise ValueError("query must have leading dims %s, got %s" % (list(lead), list(query.shape)))
    if tuple(key.shape) != lead + (Hkv, Dk):
        raise ValueError("key must be %s to match query %s, got %s"
                         % (list(lead + (Hkv, Dk)), list(query.shape), list(key.shape)))
    if tuple(value.shape[:-1]) != lead + (Hkv,):
        raise ValueError("value must be %s to match key, got %s"
                         % (list(lead + (Hkv,)) + ["Dv"], list(value.shape)))
    if num_targets is not None:
        _check_index(num_targets, "num_targets", B, dev)

    scale = resolve_scale(scale, Dk)

    if attn_scale is not None:
        if not silu:
            raise ValueError("attn_scale is for normalization='silu', got normalization=%r"
                             % normalization)
        if isinstance(attn_scale, torch.Tensor):
            _per_token(attn_scale, "attn_scale", lead, (torch.float16, torch.bfloat16,
                       torch.float32, torch.float64), dev, "a float tensor")
        elif isinstance(attn_scale, bool) or not isinstance(attn_scale, numbers.Real):
            raise TypeError("attn_scale must be a float or a tensor %s, got %s"
                            % (list(lead), type(attn_scale).__name__))
        elif not math.isfinite(float(attn_scale)):
            raise ValueError("attn_scale must be finite, got %r" % attn_scale)

    hbs = []
    if time_table is not None:
        hbs.append(("time_table", _table(time_table, "time_table", H, query, "NB")))
        for x, name in ((query_times, "query_times"), (key_times, "key_times")):
            if x is None:
                raise ValueError("time_table needs query_times and key_times, got %s=None" % name)
            _per_token(x, name, lead, _TIME_DTYPES, dev, "int32 or int64 timestamps")
    else:
        for x, name in ((query_times, "query_times"), (key_times, "key_times")):
            if x is not None:
                raise ValueError("%s is read only with a time_table, got time_table=None" % name)
    if position_table is not None:
        hbs.append(("position_table", _table(position_table, "position_table", H, query, "P")))
    if bias is not None:
        _same(bias, "bias", query)
        if jagged and L is None:
            raise ValueError("a dense bias with jagged inputs needs max_length (bias is "
                             "[B, Hb, max_length, max_length]), got max_length=None")
        if bias.dim() != 4 or bias.shape[0] != B or bias.shape[1] not in (1, H) \
                or tuple(bias.shape[2:]) != (L, L):
            raise ValueError("bias must be [B, Hb, L, L] = [%d, 1 or %d, %d, %d], got %s"
                             % (B, H, L, L, list(bias.shape)))
        hbs.append(("bias", bias.shape[1]))
    if len({hb for _, hb in hbs}) > 1:
        raise ValueError("time_table, position_table and bias must have the same number of "
                         "heads Hb, got %s" % ", ".join("%s %d" % x for x in hbs))
    Hb = hbs[0][1] if hbs else 0
    return SeqProblem("jagged" if jagged else "padded", B, L, T, H, Hkv, Dk, Dv, Hb, scale, silu)


def check_sequence_values(prob: SeqProblem, offsets, lengths, num_targets, max_length) -> None:
    """The checks that read index values (CPU always, CUDA with set_validation(True), never
    while torch.compile traces)."""
    if prob.layout == "jagged":
        if _reads_values(offsets):
            _check_offsets(offsets, prob.T, max_length)
    elif lengths is not None and _reads_values(lengths):
        _check_lengths(lengths, prob.L)
    if num_targets is not None and _reads_values(num_targets):
        nt = num_targets.to(torch.long)
        if prob.layout == "jagged":
            n = (offsets[1:] - offsets[:-1]).to(torch.long)
        elif lengths is not None:
            n = lengths.to(torch.long)
        else:
            n = torch.full_like(nt, prob.L)
        bad = torch.nonzero((nt < 0) | (nt > n))
        if bad.numel() > 0:
            b = int(bad[0, 0])
            raise ValueError("num_targets[%d] must be in [0, length of row %d = %d], got %d"
                             % (b, b, int(n[b]), int(nt[b])))
