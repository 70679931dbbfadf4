"""Row-wise quantization of embedding rows for the quantized-K/V attention pool (docs/quantized.md).

    data, scale, bias = attnkern.quantize_rows(x, dtype=torch.int8)
    out = attnkern.attention_pool(q, data_k, data_v, lengths, key_scale=..., key_bias=..., ...)

The 8-bit integer rule is FBGEMM's row-wise one (FloatToFused8BitRowwiseQuantized): per last-dim
row, ``scale = (max - min) / 255``, ``bias = min``, ``code = round((x - min) * 255 / (max - min
+ 1e-8))`` in float32, rounded half to even; element = ``code * scale + bias``. A constant row
(max == min) gets scale 0 and codes 0 (element = bias exactly).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .reference import FP8_MAX, QUANT_DTYPES

# FBGEMM's kEpsilon: the range is divided with it added, so that a constant row has codes 0.
_FBGEMM_EPS = 1e-8


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.int8
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize each last-dim row of ``x`` (any float dtype, computed in float32).

    Returns ``(data, scale, bias)`` with data of ``x``'s shape and ``scale``/``bias`` float32 of
    ``x.shape[:-1]``:

    - ``torch.uint8``: FBGEMM's bytes exactly (``code``), ``bias = min``.
    - ``torch.int8``: the same codes shifted to ``code - 128`` (int8), ``bias = min + 128 *
      scale``: the same grid, the bias moved by the shift (one float32 rounding of the bias).
    - ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``: ``scale = max |x| / dtype max`` (448 /
      57344), ``data = x / scale`` rounded to the dtype, ``bias`` None. An all-zero row gets
      scale 0 and data 0.

    A row holding a NaN or an infinity gets scale and bias NaN (and data 0): it dequantizes to
    NaN everywhere, so that attention over it gives NaN as the reference would for the row.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("quantize_rows: x must be a floating tensor, got %s"
                        % (x.dtype if isinstance(x, torch.Tensor) else type(x).__name__))
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError("quantize_rows: x must have a last dim >= 1, got shape %s" % list(x.shape))
    if dtype not in QUANT_DTYPES:
        raise TypeError("quantize_rows: dtype must be one of %s, got %s"
                        % (", ".join(str(d) for d in QUANT_DTYPES), dtype))
    xf = x.detach().float()
    finite = torch.isfinite(xf).all(-1)
    xf = torch.where(finite.unsqueeze(-1), xf, torch.zeros_like(xf))
    nan = torch.full_like(finite, float("nan"), dtype=torch.float32)
    if dtype in (torch.int8, torch.uint8):
        lo, hi = xf.amin(-1), xf.amax(-1)
        rng = hi - lo
        scale = rng / 255.0
        inv = 255.0 / (rng + _FBGEMM_EPS)
        code = torch.round((xf - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 255)
        bias = lo
        if dtype == torch.int8:
            data = (code - 128).to(torch.int8)
            bias = lo + 128.0 * scale
        else:
            data = code.to(torch.uint8)
        return data, torch.where(finite, scale, nan), torch.where(finite, bias, nan)
    fmax = FP8_MAX[dtype]
    scale = xf.abs().amax(-1) / fmax
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    data = (xf * inv.unsqueeze(-1)).clamp(-fmax, fmax).to(dtype)
    return data, torch.where(finite, scale, nan), None


def split_fused_rows(fused: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBGEMM's fused 8-bit row-wise layout ``[..., E + 8]`` uint8 (E code bytes, then the
    row's float32 scale and bias) -> ``(data [..., E] uint8, scale [...], bias [...])``.

    ``data`` is a view (the attention ops read rows with any stride); scale and bias are views
    too when each row's parameters are 4-byte aligned (E a multiple of 4), else copies."""
    if not isinstance(fused, torch.Tensor) or fused.dtype != torch.uint8:
        raise TypeError("split_fused_rows: fused must be a torch.uint8 tensor [..., E + 8], got %s"
                        % (fused.dtype if isinstance(fused, torch.Tensor) else type(fused).__name__))
    if fused.dim() < 1 or fused.shape[-1] < 9:
        raise ValueError("split_fused_rows: fused must be [..., E + 8] with E >= 1, got shape %s"
                         % list(fused.shape))
    E = fused.shape[-1] - 8
    params = fused[..., E:]
    try:
        params = params.view(torch.float32)
    except RuntimeError:  # rows not 4-byte aligned: copy the 8 bytes of each
        params = params.contiguous().view(torch.float32)
    return fused[..., :E], params[..., 0], params[..., 1]
