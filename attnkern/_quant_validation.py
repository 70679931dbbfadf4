"""Argument checks of attention_pool's quantized key/value (docs/quantized.md): the stored
dtypes, the per-row parameters, the forward-only rule. The rest of the call (shapes, layout,
masks, bias) is checked by attnkern._validation.validate on float stand-ins of the key/value
shapes, so that both paths share one contract."""

from __future__ import annotations

import torch

from ._validation import _check_tensor
from .reference import QUANT_DTYPES

_PARAMS = ("key_scale", "key_bias", "value_scale", "value_bias")


def is_quantized_call(key, value, params: dict) -> bool:
    """Whether attention_pool was called with quantized K/V (a stored dtype, or any per-row
    parameter given)."""
    stored = any(isinstance(t, torch.Tensor) and t.dtype in QUANT_DTYPES for t in (key, value))
    return stored or any(params[n] is not None for n in _PARAMS)


def _names(dtypes) -> str:
    return ", ".join(str(d) for d in dtypes)


def validate_quantized(query, key, value, params: dict, bias) -> None:
    """key/value of one stored dtype with a float32 scale (and optional bias) per row, shaped
    key.shape[:-1] ([B, L, Hkv] padded, [T, Hkv] jagged), on the query's device; and no gradient
    asked for."""
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError("query must be float16, bfloat16, float32 or float64, got %s" % query.dtype)
    if key.dtype not in QUANT_DTYPES:
        raise TypeError("with key_scale/value_scale, key must be quantized (%s), got %s"
                        % (_names(QUANT_DTYPES), key.dtype))
    if value.dtype != key.dtype:
        raise TypeError("value must have the stored dtype of key (%s), got %s" % (key.dtype, value.dtype))
    for which, data in (("key", key), ("value", value)):
        if params[which + "_scale"] is None:
            raise ValueError("quantized %s (%s) needs %s_scale, a float32 tensor of shape %s"
                             % (which, data.dtype, which, list(data.shape[:-1])))
        for kind in ("scale", "bias"):
            name = "%s_%s" % (which, kind)
            t = params[name]
            if t is None:
                continue
            _check_tensor(t, name)
            if t.dtype != torch.float32:
                raise TypeError("%s must be torch.float32, got %s" % (name, t.dtype))
            if tuple(t.shape) != tuple(data.shape[:-1]):
                raise ValueError("%s must have the shape of %s without its last dim, %s, got %s"
                                 % (name, which, list(data.shape[:-1]), list(t.shape)))
            if t.device != query.device:
                raise ValueError("%s must be on the device of query (%s), got %s" % (name, query.device, t.device))
    if torch.is_grad_enabled():
        wants = [n for n, t in [("query", query), ("bias", bias)] + [(n, params[n]) for n in _PARAMS]
                 if isinstance(t, torch.Tensor) and t.requires_grad]
        if wants:
            raise ValueError(
                "attention_pool with quantized key/value is forward-only, but %s requires grad; "
                "call it under torch.no_grad() / torch.inference_mode() or detach it" % " and ".join(wants))


def float_stand_in(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of data's shape, of `dtype`, that owns one element (an expanded scalar): what the
    float checks read of key/value, without dequantizing them."""
    return torch.zeros((), dtype=dtype, device=data.device).expand(data.shape)
