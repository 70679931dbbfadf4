"""Pure-PyTorch reference of attention pooling: the specification in code.

Every fused backend is tested against these functions; they are also the
"reference" backend. They are differentiable through ordinary autograd and
never produce NaN for finite inputs (empty rows, fully masked rows and huge
logits included).

Math (per row b, query n, head h, over the valid positions l of row b):

    s[l]  = scale * <q[b, n, h], k[b, l, h]>
    lse   = log sum_l exp(s[l])                 (-inf when row b is empty)
    out   = sum_l exp(s[l] - lse) * v[b, l, h]  (0 when row b is empty)

Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for
float64 inputs; `out` has the query's dtype, `lse` is always float32.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention_pool_ref(
    query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scale: float
) -> Tuple[Tensor, Tensor]:
    """The core: query [B, N, H, Dk], key [B, L, H, Dk], value [B, L, H, Dv],
    valid [B, L] bool (True = the position takes part). Returns out [B, N, H, Dv]
    in query's dtype and lse [B, N, H] float32."""
    cdt = _compute_dtype(query.dtype)
    q = query.to(cdt)
    k = key.to(cdt)
    v = value.to(cdt)
    # scores [B, N, H, L]
    # Positions that take part in no row are never read: their values could be anything
    # (NaN/inf included), and 0 * inf would otherwise leak into the sum.
    v = torch.where(valid[:, :, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    s = torch.einsum("bnhd,blhd->bnhl", q, k) * scale
    keep = valid[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    # The max is a numerical shift only: the result does not depend on it, so no gradient
    # flows through it. An empty row has max -inf; shift by 0 there instead.
    m = s.amax(dim=-1, keepdim=True).detach() if s.shape[-1] > 0 else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # masked positions: exp(-inf) = 0
    denom = p.sum(dim=-1, keepdim=True)
    # Empty: no valid position with a finite logit. A NaN sum (a NaN/inf logit or value at a
    # valid position) is not empty: it propagates to out and lse.
    nonempty = denom != 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))
    out = torch.einsum("bnhl,blhd->bnhd", p / safe_denom, v)
    lse = torch.where(
        nonempty, m + torch.log(safe_denom), torch.full_like(denom, float("-inf"))
    ).squeeze(-1)
    return out.to(query.dtype), lse.to(torch.float32)


def lengths_to_mask(lengths: Tensor, L: int) -> Tensor:
    """[B] lengths -> [B, L] bool mask of the valid prefix (clamped to [0, L])."""
    pos = torch.arange(L, device=lengths.device)
    return pos[None, :] < lengths.to(torch.long)[:, None]


def jagged_to_padded(
    key: Tensor, value: Tensor, offsets: Tensor, max_length: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gathers jagged key [T, H, Dk] / value [T, H, Dv] with offsets [B+1] into padded
    [B, Lmax, H, D] tensors and a [B, Lmax] validity mask. Differentiable: gradients scatter
    back to the jagged rows, and rows past offsets[-1] get exactly zero."""
    offsets = offsets.to(torch.long)
    starts = offsets[:-1]
    lens = (offsets[1:] - starts).clamp_min(0)
    if max_length is None:
        max_length = int(lens.max().item()) if lens.numel() > 0 else 0
    T = key.shape[0]
    pos = torch.arange(max_length, device=key.device)
    valid = pos[None, :] < lens[:, None]
    idx = starts[:, None] + pos[None, :]
    if T == 0:
        B = starts.shape[0]
        kp = key.new_zeros((B, max_length) + tuple(key.shape[1:]))
        vp = value.new_zeros((B, max_length) + tuple(value.shape[1:]))
        return kp, vp, valid & False
    idx = torch.where(valid, idx, torch.zeros_like(idx)).clamp(0, T - 1)
    kp = key[idx]
    vp = value[idx]
    return kp, vp, valid


def attention_pool_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference attention pooling on canonical shapes.

    query [B, N, H, Dk]; padded key [B, L, H, Dk] / value [B, L, H, Dv] with optional
    lengths [B] or mask [B, L] (True = attend), or jagged key [T, H, Dk] / value [T, H, Dv]
    with offsets [B+1]. Returns (out [B, N, H, Dv], lse [B, N, H] float32); an empty row gives
    out = 0 and lse = -inf.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if offsets is not None:
        key, value, valid = jagged_to_padded(key, value, offsets, max_length)
    else:
        B, L = key.shape[0], key.shape[1]
        if mask is not None:
            valid = mask.to(torch.bool)
        elif lengths is not None:
            valid = lengths_to_mask(lengths, L)
        else:
            valid = torch.ones(B, L, dtype=torch.bool, device=key.device)
    return masked_attention_pool_ref(query, key, value, valid, float(scale))
