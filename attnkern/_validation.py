"""Argument checks of the public API, one function per op (`validate`: attention_pool,
`validate_activation_unit`: activation_unit_pool), used by every backend. Every malformed call
raises before any kernel runs: ValueError for shapes, layouts, values, scale and backend names;
TypeError for dtypes and non-tensors. Messages name the argument and give what was expected and
what was given. The contract is docs/contract.md; the registered ops check what a direct
torch.ops call needs (csrc/*_checks.cpp, mirrored for the fake impls in attnkern/ops/checks.py)."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .limits import MAX_HEAD_DIM, MAX_UNITS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)

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
    Hkv: int  # K/V heads; divides H (query head h uses K/V head h // (H // Hkv))
    Dk: int
    Dv: int
    L: int  # padded L, or jagged T
    scale: float
    # padded [B, Nb, H or 1, L] or jagged [T, Nb, H or 1], Nb in {1, N} (the public bias with its
    # query axis; a view), or None
    bias: Optional[torch.Tensor] = None


def _check_dim(what, d, most):
    if not 1 <= d <= most:
        raise ValueError("%s must be in [1, %d], got %d" % (what, most, d))


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
    # Sparse, mkldnn and nested tensors have no strides to hand a kernel (a nested tensor cannot
    # even report its sizes): refuse them by name, before anything reads their shape.
    if x.is_nested or x.layout != torch.strided:
        got = "a nested tensor" if x.is_nested else "layout %s" % x.layout
        raise TypeError("%s must be a dense (strided) tensor, got %s" % (name, got))


def _same(t, name, query):
    """t is a dense tensor of the query's dtype and device."""
    _check_tensor(t, name)
    if t.dtype != query.dtype:
        raise TypeError("%s must have the dtype of query (%s), got %s" % (name, query.dtype, t.dtype))
    if t.device != query.device:
        raise ValueError("%s must be on the device of query (%s), got %s" % (name, query.device, t.device))


def _check_value_slot(query, key, value):
    """The zoos' positional orders ``pool(q, keys, keys_length)`` (DeepCTR-Torch) and
    ``pool(target, hist, mask)`` (FuxiCTR) put lengths or a mask where attnkern takes the values:
    name the keyword that was meant rather than the dtype or shape it breaks."""
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(x, name)
    if value is key or key.dim() < 3:
        return
    if value.dim() > 2:  # every well-formed call: no message is formatted (torch.compile traces this)
        return
    B, L = key.shape[0], key.shape[1]

    def wrong(fix):
        what = "value is a %s %s tensor" % (str(value.dtype).replace("torch.", ""), list(value.shape))
        return TypeError("%s: did you mean %s %s" % (
            what, fix, "attnkern's order is (query, key, value, lengths); the mask is keyword-only"))

    if value.dtype in _INDEX_DTYPES and value.dim() == 1 and value.shape[0] == B:
        raise wrong("lengths=?")
    if value.dtype in _INDEX_DTYPES and tuple(value.shape) == (B, 1):
        raise wrong("lengths=t.view(-1)? (DeepCTR-Torch's keys_length is [B, 1]);")
    if value.dim() == 2 and tuple(value.shape) == (B, L):
        raise wrong("mask=m?" if value.dtype == torch.bool
                    else "mask=m.bool()? (a 0/1 mask with 1 = valid, FuxiCTR's)")


def _check_qkv(query, key, value):
    """Tensors, a float query, key and value of its dtype and device (both ops)."""
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(x, name)
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError("query must be float16, bfloat16, float32 or float64, got %s" % query.dtype)
    _same(key, "key", query)
    _same(value, "value", query)


def _query_with_n(query, rank: int, shapes: str):
    """(query with its N axis of `rank` dims, whether the call gave it without N)."""
    if query.dim() == rank - 1:
        q, squeeze_n = query.unsqueeze(1), True
    elif query.dim() == rank:
        q, squeeze_n = query, False
    else:
        raise ValueError("query must be %s, got %d dims %s" % (shapes, query.dim(), list(query.shape)))
    if q.shape[1] < 1:
        raise ValueError("query must have N >= 1 queries, got %s" % list(query.shape))
    return q, squeeze_n


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


def _check_heads(H: int, Hkv: int, query, key) -> None:
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            "key must have a number of heads Hkv that divides the query's H = %d (query head h "
            "uses K/V head h // (H // Hkv)), got Hkv = %d: query %s, key %s"
            % (H, Hkv, list(query.shape), list(key.shape))
        )


def _check_jagged_index(offsets, max_length, B: int, device) -> None:
    """offsets [B + 1] and the optional max_length (a Python int >= 0 that fits an int64) of the
    jagged layout; the padded one (offsets None) takes no max_length."""
    if offsets is None:
        if max_length is not None:
            raise ValueError("max_length is for the jagged layout (with offsets); got offsets=None")
        return
    _check_index(offsets, "offsets", B + 1, device)
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError("max_length must be a Python int, got %s" % type(max_length).__name__)
    if max_length < 0:
        raise ValueError("max_length must be >= 0, got %d" % max_length)
    if max_length >= 2 ** 63:
        raise ValueError("max_length must be < 2**63 (an int64), got %d" % max_length)


def _check_mask(mask, name: str, B: int, L: int, device, padding_mask_too: bool = True) -> None:
    _check_tensor(mask, name)
    if mask.dtype != torch.bool:
        if not padding_mask_too:
            raise TypeError("%s must be a bool tensor (True = attend), got %s: a 0/1 mask with 1 = valid "
                            "(FuxiCTR's) is mask=m.bool(); one with 1 = padding is mask=~m.bool()"
                            % (name, mask.dtype))
        if name == "mask":
            hint = ("a 0/1 mask with 1 = valid (FuxiCTR's) is mask=m.bool(); one with 1 = "
                    "padding is key_padding_mask=m.bool()")
        else:
            hint = ("a 0/1 mask with 1 = padding is key_padding_mask=m.bool(); one with 1 = "
                    "valid (FuxiCTR's) is mask=m.bool()")
        polarity = "True = attend" if name == "mask" else "True = padding"
        raise TypeError("%s must be a bool tensor (%s), got %s: %s"
                        % (name, polarity, mask.dtype, hint))
    if tuple(mask.shape) != (B, L):
        raise ValueError("%s must have shape [B, L] = [%d, %d], got %s"
                         % (name, B, L, list(mask.shape)))
    if mask.device != device:
        raise ValueError(
            "%s must be on the device of query (%s), got %s" % (name, device, mask.device)
        )


def _check_bias(bias, query, jagged: bool, B: int, N: int, H: int, L: int):
    """The score bias: padded [B, Hb, L] or [B, N, Hb, L], jagged [T, Hb] or [T, N, Hb]
    (Hb 1 or H), float32 or the query's dtype. Returns it with its query axis (a view)."""
    _check_tensor(bias, "bias")
    if bias.dtype != torch.float32 and bias.dtype != query.dtype:
        raise TypeError("bias must be torch.float32 or the dtype of query (%s), got %s"
                        % (query.dtype, bias.dtype))
    if bias.device != query.device:
        raise ValueError("bias must be on the device of query (%s), got %s" % (query.device, bias.device))
    rank = 2 if jagged else 3  # without the query axis
    b4 = bias.unsqueeze(1) if bias.dim() == rank else bias
    if not (b4.dim() == rank + 1 and b4.shape[0] == (L if jagged else B) and b4.shape[1] in (1, N)
            and b4.shape[2] in (1, H) and (jagged or b4.shape[3] == L)):
        if jagged:
            spelled = "[T, Hb] = [%d, Hb] or [T, N, Hb] = [%d, %d, Hb]" % (L, L, N)
        else:
            spelled = "[B, Hb, L] = [%d, Hb, %d] or [B, N, Hb, L] = [%d, %d, Hb, %d]" % (B, L, B, N, L)
        raise ValueError("bias must be %s with Hb 1 or H = %d, got %s" % (spelled, H, list(bias.shape)))
    return b4


def resolve_scale(scale, Dk: int) -> float:
    """The logit scale: a finite float, default 1/sqrt(Dk)."""
    if scale is None:
        return 1.0 / math.sqrt(Dk)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError("scale must be a float, got %s" % type(scale).__name__)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError("scale must be finite, got %r" % scale)
    return scale


def validate(query, key, value, lengths, mask, offsets, max_length, scale, return_lse,
             values: bool = True, key_padding_mask=None, bias=None) -> Problem:
    """Checks a call and returns it normalised. values=False leaves the reads of lengths/offsets
    values to `check_values`, for callers whose kernel checks them itself. key_padding_mask
    (True = padding) is checked like mask; the caller passes ~key_padding_mask on as mask.
    bias (optional) is returned with its query axis in the Problem."""
    if offsets is None:
        _check_value_slot(query, key, value)
    _check_qkv(query, key, value)
    if not isinstance(return_lse, bool):
        raise TypeError("return_lse must be a bool, got %s" % type(return_lse).__name__)

    q4, squeeze_n = _query_with_n(query, 4, "[B, H, Dk] or [B, N, H, Dk]")
    B, N, H, Dk = q4.shape
    if H < 1:
        raise ValueError("query must have H >= 1 heads, got %s" % list(query.shape))
    _check_dim("query head dim Dk", Dk, MAX_HEAD_DIM)

    jagged = offsets is not None
    _check_jagged_index(offsets, max_length, B, query.device)
    if jagged:
        if lengths is not None:
            raise ValueError("lengths is for the padded layout; with offsets (jagged) leave it None")
        if mask is not None:
            raise ValueError("mask is for the padded layout; with offsets (jagged) leave it None")
        if key_padding_mask is not None:
            raise ValueError(
                "key_padding_mask is for the padded layout; with offsets (jagged) leave it None")
        if key.dim() != 3:
            raise ValueError("with offsets, key must be jagged [T, Hkv, Dk], got %s" % list(key.shape))
        if value.dim() != 3:
            raise ValueError(
                "with offsets, value must be jagged [T, Hkv, Dv], got %s" % list(value.shape)
            )
        T, Hkv = key.shape[0], key.shape[1]
        _check_heads(H, Hkv, query, key)
        if key.shape[2] != Dk:
            raise ValueError(
                "key must be [T, Hkv, Dk] = [T, %d, %d] to match query %s, got %s"
                % (Hkv, Dk, list(query.shape), list(key.shape))
            )
        if value.shape[0] != T or value.shape[1] != Hkv:
            raise ValueError(
                "value must be [T, Hkv, Dv] = [%d, %d, Dv] to match key, got %s"
                % (T, Hkv, list(value.shape))
            )
        L = T
    else:
        if key.dim() != 4:
            hint = " (a 3-D key is jagged: pass offsets)" if key.dim() == 3 else ""
            raise ValueError("key must be padded [B, L, Hkv, Dk]%s, got %s" % (hint, list(key.shape)))
        if value.dim() != 4:
            raise ValueError("value must be padded [B, L, Hkv, Dv], got %s" % list(value.shape))
        L, Hkv = key.shape[1], key.shape[2]
        _check_heads(H, Hkv, query, key)
        if tuple(key.shape) != (B, L, Hkv, Dk):
            raise ValueError(
                "key must be [B, L, Hkv, Dk] = [%d, L, %d, %d] to match query %s, got %s"
                % (B, Hkv, Dk, list(query.shape), list(key.shape))
            )
        if tuple(value.shape[:3]) != (B, L, Hkv):
            raise ValueError(
                "value must be [B, L, Hkv, Dv] = [%d, %d, %d, Dv] to match key, got %s"
                % (B, L, Hkv, list(value.shape))
            )
        given = [n for n, x in (("lengths", lengths), ("mask", mask),
                                ("key_padding_mask", key_padding_mask)) if x is not None]
        if len(given) > 1:
            raise ValueError("give at most one of lengths, mask and key_padding_mask, got %s"
                             % " and ".join(given))
        if lengths is not None:
            _check_index(lengths, "lengths", B, query.device)
        if mask is not None:
            _check_mask(mask, "mask", B, L, query.device)
        if key_padding_mask is not None:
            _check_mask(key_padding_mask, "key_padding_mask", B, L, query.device)
    Dv = value.shape[-1]
    _check_dim("value head dim Dv", Dv, MAX_HEAD_DIM)

    scale = resolve_scale(scale, Dk)

    b4 = None if bias is None else _check_bias(bias, query, jagged, B, N, H, L)
    prob = Problem(q4, squeeze_n, "jagged" if jagged else "padded", B, N, H, Hkv, Dk, Dv, L,
                   scale, b4)
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


# ---- activation-unit pooling (DIN) --------------------------------------------------------------

_NORMALIZE = (None, "softmax")


@dataclass
class AuProblem:
    """A validated call in the registered op's canonical form."""

    args: dict  # the forward op's arguments by name (attnkern.ops.schemas.ACTIVATION_FWD_ARGS)
    squeeze_n: bool
    layout: str
    B: int
    L: int


def _shape(t, name, want):
    if tuple(t.shape) != tuple(want):
        raise ValueError("%s must have shape %s, got %s" % (name, list(want), list(t.shape)))


def validate_activation_unit(query, key, value, weights, lengths, mask, offsets, max_length,
                             activation, activation_params, normalize) -> AuProblem:
    """Checks a public call and returns it in the registered op's canonical form."""
    from .reference import ACTIVATION_PARAM_ROWS, ACTIVATIONS

    # value None or the key tensor itself: the keys are the values (one gradient, no second
    # [B, L, E] one summed into it).
    shared = value is None or value is key
    value = key if value is None else value
    if offsets is None:
        _check_value_slot(query, key, value)
    _check_qkv(query, key, value)
    q3, squeeze_n = _query_with_n(query, 3, "[B, E] or [B, N, E]")
    B, N, E = q3.shape
    _check_dim("query embedding dim E", E, MAX_UNITS)

    jagged = offsets is not None
    _check_jagged_index(offsets, max_length, B, query.device)
    if jagged:
        if lengths is not None or mask is not None:
            raise ValueError("lengths and mask are for the padded layout; with offsets (jagged) leave them None")
        if key.dim() != 2 or key.shape[1] != E:
            raise ValueError("with offsets, key must be jagged [T, E] = [T, %d], got %s" % (E, list(key.shape)))
        T = key.shape[0]
        if value.dim() != 2 or value.shape[0] != T:
            raise ValueError("with offsets, value must be jagged [T, Dv] = [%d, Dv], got %s" % (T, list(value.shape)))
        L = T
    else:
        if key.dim() != 3 or key.shape[0] != B or key.shape[2] != E:
            hint = " (a 2-D key is jagged: pass offsets)" if key.dim() == 2 else ""
            raise ValueError("key must be padded [B, L, E] = [%d, L, %d]%s, got %s" % (B, E, hint, list(key.shape)))
        L = key.shape[1]
        if value.dim() != 3 or tuple(value.shape[:2]) != (B, L):
            raise ValueError("value must be padded [B, L, Dv] = [%d, %d, Dv], got %s" % (B, L, list(value.shape)))
        if lengths is not None and mask is not None:
            raise ValueError("give lengths or mask, not both")
        if lengths is not None:
            _check_index(lengths, "lengths", B, query.device)
        if mask is not None:
            _check_mask(mask, "mask", B, L, query.device, padding_mask_too=False)
    Dv = value.shape[-1]
    _check_dim("value dim Dv", Dv, MAX_UNITS)

    # Case-insensitive, as the zoos' configurations write them ("Dice", "PReLU").
    activation = activation.lower() if isinstance(activation, str) else activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
    if normalize not in _NORMALIZE:
        raise ValueError("normalize must be None or 'softmax', got %r" % (normalize,))

    # weights: [(W1 [H1, 4E], b1), (W2 [H2, H1], b2)?, (W_out [1, H], b_out)]
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a sequence of (weight, bias) pairs, got %s" % type(weights).__name__)
    if len(weights) not in (2, 3):
        raise ValueError("weights must hold 2 or 3 (weight, bias) pairs (one or two hidden layers, "
                         "then the output layer), got %d" % len(weights))
    layers = []
    fan_in = 4 * E
    for i, pair in enumerate(weights):
        name = "weights[%d]" % i
        if isinstance(pair, torch.Tensor) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError("%s must be a (weight, bias) pair, got %s" % (name, type(pair).__name__))
        w, b = pair
        last = i == len(weights) - 1
        _same(w, name + " weight", query)
        if w.dim() != 2 or w.shape[1] != fan_in or (last and w.shape[0] != 1):
            want = "[1, %d]" % fan_in if last else "[units, %d]" % fan_in
            raise ValueError("%s weight must be %s, got %s" % (name, want, list(w.shape)))
        units = w.shape[0]
        if not last and not 1 <= units <= MAX_UNITS:
            raise ValueError("%s: hidden units must be in [1, %d], got %d" % (name, MAX_UNITS, units))
        if b is None:
            b = torch.zeros(units, dtype=query.dtype, device=query.device)
        else:
            _same(b, name + " bias", query)
            _shape(b, name + " bias", (units,))
        layers.append((w, b))
        fan_in = units

    hidden = [w.shape[0] for w, _ in layers[:-1]]
    rows = ACTIVATION_PARAM_ROWS[activation]
    acts = [None, None]
    if rows == 0:
        if activation_params is not None:
            raise ValueError("activation_params must be None for activation %r" % activation)
    else:
        if isinstance(activation_params, torch.Tensor) or not isinstance(activation_params, Sequence) \
                or len(activation_params) != len(hidden):
            raise ValueError("activation %r needs activation_params: one tensor per hidden layer (%d)"
                             % (activation, len(hidden)))
        for i, (p, h) in enumerate(zip(activation_params, hidden)):
            name = "activation_params[%d]" % i
            _same(p, name, query)
            if activation == "prelu":
                if p.numel() not in (1, h) or p.dim() > 1 and tuple(p.shape) != (1, h):
                    raise ValueError("%s: prelu slopes must have 1 or %d elements ([%d] or [1]), got %s"
                                     % (name, h, h, list(p.shape)))
                p = p.reshape(1, -1).expand(1, h)
            else:
                _shape(p, name, (3, h))
            acts[i] = p

    (w1, b1), *rest = layers
    w_out, b_out = rest[-1]
    w2, b2 = rest[0] if len(rest) == 2 else (None, None)
    args = dict(query=q3, key=key, value=None if shared else value, lengths=lengths, mask=mask, offsets=offsets,
                max_length=-1 if max_length is None else int(max_length), w1=w1, b1=b1, w2=w2, b2=b2,
                w_out=w_out, b_out=b_out, act1=acts[0], act2=acts[1], activation=activation,
                softmax=normalize == "softmax")
    return AuProblem(args, squeeze_n, "jagged" if jagged else "padded", B, L)


def check_topk_k(k) -> int:
    """attention_topk's k: a Python int >= 0."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError("k must be a Python int, got %s" % type(k).__name__)
    if k < 0:
        raise ValueError("k must be >= 0, got %d" % k)
    return int(k)
