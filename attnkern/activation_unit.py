"""The public activation-unit pooling function: validation, layout normalisation, dispatch."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ._validation import _check_index, _check_tensor, check_values
from .reference_activation import ACTIVATION_PARAM_ROWS, ACTIVATIONS, MAX_UNITS, activation_unit_pool_ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NORMALIZE = (None, "softmax")


@dataclass
class AuProblem:
    """A validated call in the registered op's canonical form."""

    args: dict  # the forward op's arguments by name (attnkern._activation_inputs.FWD_ARGS)
    squeeze_n: bool
    layout: str
    B: int
    L: int


def _same(t, name, query):
    _check_tensor(t, name)
    if t.dtype != query.dtype:
        raise TypeError("%s must have the dtype of query (%s), got %s" % (name, query.dtype, t.dtype))
    if t.device != query.device:
        raise ValueError("%s must be on the device of query (%s), got %s" % (name, query.device, t.device))
    if t.layout != torch.strided:
        raise ValueError("%s must be a dense (strided) tensor, got layout %s" % (name, t.layout))


def _shape(t, name, want):
    if tuple(t.shape) != tuple(want):
        raise ValueError("%s must have shape %s, got %s" % (name, list(want), list(t.shape)))


def validate_activation_unit(query, key, value, weights, lengths, mask, offsets, max_length,
                             activation, activation_params, normalize) -> AuProblem:
    """Checks a public call and returns it in the registered op's canonical form."""
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(x, name)
    if query.dtype not in _FLOAT_DTYPES:
        raise TypeError("query must be float16, bfloat16, float32 or float64, got %s" % query.dtype)
    if query.layout != torch.strided:
        raise ValueError("query must be a dense (strided) tensor, got layout %s" % query.layout)
    _same(key, "key", query)
    _same(value, "value", query)
    if query.dim() == 2:
        q3, squeeze_n = query.unsqueeze(1), True
    elif query.dim() == 3:
        q3, squeeze_n = query, False
    else:
        raise ValueError("query must be [B, E] or [B, N, E], got %s" % list(query.shape))
    B, N, E = q3.shape
    if N < 1:
        raise ValueError("query must have N >= 1 queries, got %s" % list(query.shape))
    if not 1 <= E <= MAX_UNITS:
        raise ValueError("query embedding dim E must be in [1, %d], got %d" % (MAX_UNITS, E))

    jagged = offsets is not None
    if jagged:
        if lengths is not None or mask is not None:
            raise ValueError("lengths and mask are for the padded layout; with offsets (jagged) leave them None")
        if key.dim() != 2 or key.shape[1] != E:
            raise ValueError("with offsets, key must be jagged [T, E] = [T, %d], got %s" % (E, list(key.shape)))
        T = key.shape[0]
        if value.dim() != 2 or value.shape[0] != T:
            raise ValueError("with offsets, value must be jagged [T, Dv] = [%d, Dv], got %s" % (T, list(value.shape)))
        _check_index(offsets, "offsets", B + 1, query.device)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
                raise TypeError("max_length must be a Python int, got %s" % type(max_length).__name__)
            if max_length < 0:
                raise ValueError("max_length must be >= 0, got %d" % max_length)
        L = T
    else:
        if max_length is not None:
            raise ValueError("max_length is for the jagged layout (with offsets); got offsets=None")
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
            _check_tensor(mask, "mask")
            if mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor (True = attend), got %s" % mask.dtype)
            if tuple(mask.shape) != (B, L):
                raise ValueError("mask must have shape [B, L] = [%d, %d], got %s" % (B, L, list(mask.shape)))
            if mask.device != query.device:
                raise ValueError("mask must be on the device of query (%s), got %s" % (query.device, mask.device))
    Dv = value.shape[-1]
    if not 1 <= Dv <= MAX_UNITS:
        raise ValueError("value dim Dv must be in [1, %d], got %d" % (MAX_UNITS, Dv))

    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
    if normalize not in NORMALIZE:
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
    args = dict(query=q3, key=key, value=value, lengths=lengths, mask=mask, offsets=offsets,
                max_length=-1 if max_length is None else int(max_length), w1=w1, b1=b1, w2=w2, b2=b2,
                w_out=w_out, b_out=b_out, act1=acts[0], act2=acts[1], activation=activation,
                softmax=normalize == "softmax")
    return AuProblem(args, squeeze_n, "jagged" if jagged else "padded", B, L)


def activation_unit_pool(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: Sequence,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    activation: str = "relu",
    activation_params: Optional[Sequence[torch.Tensor]] = None,
    normalize: Optional[str] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DIN's local activation unit, fused: score each valid history position with an MLP over
    ``[q, k, q - k, q * k]`` and pool the values with those weights.

    ``out[b, n] = sum over valid l of w[b, n, l] * value[b, l]`` with
    ``s = MLP([q, k_l, q - k_l, q * k_l])`` and ``w = s`` (``normalize=None``, DIN's raw
    weights) or ``w = softmax over the valid l of s`` (``normalize="softmax"``). The exact math,
    activations and the first-layer split the kernels use are in attnkern.reference_activation.

    Args:
        query: [B, E] or [B, N, E] (N candidate items sharing one history).
        key: padded [B, L, E], or jagged [T, E] together with ``offsets``.
        value: padded [B, L, Dv] or jagged [T, Dv] (DIN pools the keys themselves: pass key).
        weights: the MLP's layers as (weight, bias) pairs in nn.Linear's convention: first
            hidden layer ([H1, 4E], [H1]), optionally a second ([H2, H1], [H2]), then the output
            layer ([1, H], [1]). A bias may be None (no bias). 1 <= H1, H2 <= 256.
        lengths: padded only, [B] int32/int64: row b is valid on ``key[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part. With neither, all L.
        offsets: jagged only, [B+1] int32/int64: row b is ``key[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional int >= every row's length.
        activation: "relu" | "sigmoid" | "prelu" | "dice", for every hidden layer.
        activation_params: one tensor per hidden layer: prelu slopes ([H] or a shared [1]);
            Dice's [3, H] (alpha, scale, shift) from ``attnkern.reference_activation.dice_params``
            (Dice with given statistics: the inference form). None for relu/sigmoid.
        normalize: None (raw scores) or "softmax" (masked softmax over the row).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        [B, Dv] or [B, N, Dv] in query's dtype (accumulated in float32, float64 for float64).
        A row with no valid position gives 0 and zero gradients. Positions outside a row are
        never read and get exactly zero key/value gradients. Differentiable w.r.t. query, key,
        value, every weight and bias and the activation parameters.

    All floating tensors share query's dtype (float16, bfloat16, float32; float64 on
    "reference" and "cpu") and device. 1 <= E, Dv <= 256; any strides.
    """
    # Imported here: functional dispatch helpers live next to attention_pool.
    from .functional import _OPS_CHECK_VALUES, _resolve

    prob = validate_activation_unit(query, key, value, weights, lengths, mask, offsets, max_length,
                                    activation, activation_params, normalize)
    name = _resolve(backend, query)
    a = prob.args
    if name not in _OPS_CHECK_VALUES:
        from ._validation import Problem

        check_values(Problem(a["query"], False, prob.layout, prob.B, 1, 1, 1, 1, prob.L, 1.0),
                     lengths, offsets, max_length)
    if name == "reference":
        out, _ = activation_unit_pool_ref(*a.values())
    else:
        from ._activation_ops import fused_op

        out, _ = fused_op(name)(*a.values())
    return out.squeeze(1) if prob.squeeze_n else out
