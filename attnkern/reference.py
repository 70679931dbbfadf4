"""Pure-PyTorch reference of attention pooling: the specification in code.

Every fused backend is tested against these functions; they are also the
"reference" backend. They are differentiable through ordinary autograd and
never produce NaN for finite inputs (empty rows, fully masked rows and huge
logits included).

Math (per row b, query n, head h, over the valid positions l of row b):

    s[l]  = scale * <q[b, n, h], k[b, l, h]> + bias[b, n, h, l]      (bias optional)
    lse   = log sum_l exp(s[l])                 (-inf when row b is empty)
    out   = sum_l exp(s[l] - lse) * v[b, l, h]  (0 when row b is empty)

Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for
float64 inputs; `out` has the query's dtype, `lse` is always float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .limits import MAX_UNITS  # noqa: F401  (attnkern.nn reads the limit from here)

Tensor = torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_scores_ref(query: Tensor, key: Tensor, valid: Tensor, scale: float,
                      bias: Optional[Tensor] = None) -> Tensor:
    """The logits of `masked_attention_pool_ref` (same arguments), -inf where a position does
    not take part, grouped by the K/V head they use: [B, N, Hkv, G, L] in the accumulation
    dtype (G = H // Hkv)."""
    cdt = _compute_dtype(query.dtype)
    B, N, H, _ = query.shape
    Hkv = key.shape[2]
    # query heads grouped by the K/V head they use: [B, N, Hkv, G, Dk]
    q = query.to(cdt).unflatten(2, (Hkv, H // Hkv))
    k = key.to(cdt)
    s = torch.einsum("bnkgd,blkd->bnkgl", q, k) * scale
    keep = valid[:, None, None, None, :]
    if bias is not None:
        # [B, Nb, Hb, L] -> [B, Nb, Hkv, G, L] (Hb = H) or [B, Nb, 1, 1, L] (Hb = 1). Positions
        # outside the row are zeroed first: never read, so their gradient is exactly 0 and a
        # NaN there changes nothing.
        b = torch.where(valid[:, None, None, :], bias.to(cdt), torch.zeros((), dtype=cdt, device=s.device))
        b = b.unflatten(2, (Hkv, H // Hkv)) if b.shape[2] == H and H > 1 else b.unsqueeze(2)
        s = s + b
    return s.masked_fill(~keep, float("-inf"))


def _masked_softmax_parts(s: Tensor):
    """(p, m, denom, nonempty, safe_denom) of masked logits s [..., L]: p = exp(s - m), the
    softmax is p / safe_denom, and a row is empty where denom == 0."""
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
    return p, m, denom, nonempty, safe_denom


def masked_attention_pool_ref(
    query: Tensor, key: Tensor, value: Tensor, valid: Tensor, scale: float,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The core: query [B, N, H, Dk], key [B, L, Hkv, Dk], value [B, L, Hkv, Dv] with Hkv
    dividing H (query head h uses K/V head h // (H // Hkv)), valid [B, L] bool (True = the
    position takes part), bias None or [B, Nb, Hb, L] with Nb in {1, N} and Hb in {1, H}
    (added to the logits). Returns out [B, N, H, Dv] in query's dtype and lse [B, N, H]
    float32."""
    v = value.to(_compute_dtype(query.dtype))
    # Positions that take part in no row are never read: their values could be anything
    # (NaN/inf included), and 0 * inf would otherwise leak into the sum.
    v = torch.where(valid[:, :, None, None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    p, m, denom, nonempty, safe_denom = _masked_softmax_parts(
        masked_scores_ref(query, key, valid, scale, bias))
    out = torch.einsum("bnkgl,blkd->bnkgd", p / safe_denom, v).flatten(2, 3)
    lse = torch.where(
        nonempty, m + torch.log(safe_denom), torch.full_like(denom, float("-inf"))
    ).squeeze(-1).flatten(2, 3)
    return out.to(query.dtype), lse.to(torch.float32)


def lengths_to_mask(lengths: Tensor, L: int) -> Tensor:
    """[B] lengths -> [B, L] bool mask of the valid prefix (clamped to [0, L])."""
    pos = torch.arange(L, device=lengths.device)
    return pos[None, :] < lengths.to(torch.long)[:, None]


def padded_valid(key: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor]) -> Tensor:
    """The [B, L] bool mask (True = attend) of a padded key [B, L, ...] given lengths or mask
    (mask wins; neither: every position is valid)."""
    B, L = key.shape[0], key.shape[1]
    if mask is not None:
        return mask.to(torch.bool)
    if lengths is not None:
        return lengths_to_mask(lengths, L)
    return torch.ones(B, L, dtype=torch.bool, device=key.device)


def canonical_bias(bias: Tensor, jagged: bool) -> Tensor:
    """A bias as the public API takes it (padded [B, Hb, L] or [B, N, Hb, L], jagged [T, Hb] or
    [T, N, Hb]) with its query axis: padded [B, Nb, Hb, L], jagged [T, Nb, Hb] (Nb = 1 when
    shared by the N queries). A view."""
    if bias.dim() == (2 if jagged else 3):
        return bias.unsqueeze(1)
    return bias


def jagged_bias_to_padded(bias: Tensor, offsets: Tensor, max_length: int) -> Tensor:
    """Jagged bias [T, Nb, Hb] -> padded [B, Nb, Hb, max_length] with the gather of
    jagged_to_padded (0 past each row's end; gradients scatter back to the jagged rows)."""
    offsets = offsets.to(torch.long)
    starts = offsets[:-1]
    lens = (offsets[1:] - starts).clamp_min(0)
    pos = torch.arange(max_length, device=bias.device)
    valid = pos[None, :] < lens[:, None]
    B, T = starts.shape[0], bias.shape[0]
    if T == 0:
        return bias.new_zeros((B, bias.shape[1], bias.shape[2], max_length))
    idx = torch.where(valid, starts[:, None] + pos[None, :], torch.zeros_like(pos)[None, :]).clamp(0, T - 1)
    return bias[idx].permute(0, 2, 3, 1)  # [B, L, Nb, Hb] -> [B, Nb, Hb, L]


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
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference attention pooling on canonical shapes.

    query [B, N, H, Dk]; padded key [B, L, H, Dk] / value [B, L, H, Dv] with optional
    lengths [B] or mask [B, L] (True = attend), or jagged key [T, H, Dk] / value [T, H, Dv]
    with offsets [B+1]. bias (optional, added to the logits): padded [B, Hb, L] (shared by the
    N queries) or [B, N, Hb, L], jagged [T, Hb] or [T, N, Hb], Hb 1 or H. Returns
    (out [B, N, H, Dv], lse [B, N, H] float32); a row with no valid position, or whose every
    logit is -inf, gives out = 0 and lse = -inf.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if bias is not None:
        bias = canonical_bias(bias, offsets is not None)
    if offsets is not None:
        key, value, valid = jagged_to_padded(key, value, offsets, max_length)
        if bias is not None:
            bias = jagged_bias_to_padded(bias, offsets, valid.shape[1])
    else:
        valid = padded_valid(key, lengths, mask)
    return masked_attention_pool_ref(query, key, value, valid, float(scale), bias)


def token_rows(offsets: Tensor, T: int) -> Tuple[Tensor, Tensor, Tensor]:
    """For the T rows of a jagged tensor: (row b of each, its position in row b, whether it
    lies in a row at all: rows past offsets[-1] do not), each [T]. Empty rows in between are
    skipped (a row starts where the next non-empty one does)."""
    offsets = offsets.to(torch.long)
    t = torch.arange(T, device=offsets.device)
    B = offsets.shape[0] - 1
    row = (torch.searchsorted(offsets, t, right=True) - 1).clamp(0, max(B - 1, 0))
    start = offsets[row] if B > 0 else torch.zeros_like(t)
    inside = (t < offsets[-1]) if B > 0 else torch.zeros_like(t, dtype=torch.bool)
    return row, t - start, inside


def attention_weights_ref(
    query: Tensor,
    key: Tensor,
    lengths: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """The softmax weights of `attention_pool_ref` (same arguments, no value): padded
    [B, N, H, L], jagged [T, N, H], float32 (float64 for float64 inputs). Exactly 0 at
    positions that take part in no row and on empty rows; a non-empty row sums to 1."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if bias is not None:
        bias = canonical_bias(bias, offsets is not None)
    T = key.shape[0]
    if offsets is not None:
        key, _, valid = jagged_to_padded(key, key[..., :1], offsets, max_length)
        if bias is not None:
            bias = jagged_bias_to_padded(bias, offsets, valid.shape[1])
    else:
        valid = padded_valid(key, lengths, mask)
    p, _, _, _, safe_denom = _masked_softmax_parts(
        masked_scores_ref(query, key, valid, float(scale), bias))
    w = (p / safe_denom).flatten(2, 3)  # [B, N, H, L]
    if offsets is None:
        return w
    return padded_to_token_rows(w, offsets, T)


def padded_to_token_rows(w: Tensor, offsets: Tensor, T: int) -> Tensor:
    """Padded per-position values w [B, ..., L] -> jagged [T, ...]: key row t takes its row's
    entry at its position, 0 for rows past offsets[-1]. Differentiable (a gather)."""
    row, pos, inside = token_rows(offsets, T)
    if w.shape[0] == 0 or w.shape[-1] == 0:
        return w.new_zeros((T,) + tuple(w.shape[1:-1]))
    picked = w.movedim(-1, 1)[row, pos.clamp(0, w.shape[-1] - 1)]  # [T, ...]
    inside = inside.view((T,) + (1,) * (picked.dim() - 1))
    return torch.where(inside, picked, torch.zeros((), dtype=w.dtype, device=w.device))


# Quantized keys and values (docs/quantized.md): stored row-wise as int8/uint8 codes or float8
# values with a float32 scale (and bias) per (position, head) row; element = data * scale + bias.
QUANT_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def dequantize_rows(data: Tensor, scale: Tensor, bias: Optional[Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``data * scale[..., None] + bias[..., None]`` in float32 (float64 when asked), then
    ``dtype``: the value each stored element stands for."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = data.to(acc) * scale.to(acc).unsqueeze(-1)
    if bias is not None:
        x = x + bias.to(acc).unsqueeze(-1)
    return x.to(dtype)


def attention_pool_quant_ref(
    query: Tensor, key: Tensor, value: Tensor, key_scale: Tensor, key_bias: Optional[Tensor],
    value_scale: Tensor, value_bias: Optional[Tensor], lengths: Optional[Tensor] = None, *,
    mask: Optional[Tensor] = None, offsets: Optional[Tensor] = None,
    max_length: Optional[int] = None, scale: Optional[float] = None, bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """`attention_pool_ref` over the dequantized key and value (float32; float64 for a float64
    query), the query taken in that precision too: the oracle of the fused kernels, which
    dequantize in registers and accumulate in float32. out is float32 (float64)."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = dequantize_rows(key, key_scale, key_bias, acc)
    v = dequantize_rows(value, value_scale, value_bias, acc)
    if bias is not None:
        bias = bias.to(acc)
    return attention_pool_ref(query.to(acc), k, v, lengths, mask=mask, offsets=offsets,
                              max_length=max_length, scale=scale, bias=bias)

# ----------------------------------------------------------------------------------------------
# DIN's activation-unit pooling
#
# Pure-PyTorch reference of DIN's activation-unit pooling: the specification in code.
#
# The registered ops ``attnkern::activation_unit_pool_fwd`` / ``_bwd`` (csrc/activation_unit_ops.cpp)
# take exactly the arguments of `activation_unit_pool_ref` below, in that order, and every fused
# backend must match it.
#
# Canonical shapes (the public function normalises to these):
#
#     query  [B, N, E]                      N candidate queries share one history
#     key    padded [B, L, E]  | jagged [T, E]     (jagged: with offsets [B+1])
#     value  padded [B, L, Dv] | jagged [T, Dv]
#     lengths [B] int32/int64 (row b valid on its prefix [0, lengths[b]))  XOR
#     mask   [B, L] bool (True = the position takes part)                  (padded only)
#     offsets [B+1] int32/int64, row b = rows offsets[b]:offsets[b+1]      (jagged only)
#
# The MLP ("local activation unit"), in nn.Linear's convention ``y = x W^T + b``, scores
# position l of row b for query n over ``x_l = [q, k_l, q - k_l, q * k_l]`` (4E features):
#
#     h1 = act(x_l W1^T + b1)             W1 [H1, 4E], b1 [H1]
#     h2 = act(h1 W2^T + b2)              optional second hidden layer: W2 [H2, H1], b2 [H2]
#     s_l = h_last W_out^T + b_out        W_out [1, H_last], b_out [1]
#
# The first layer is never formed as a concatenation. With W1 = [Wa | Wb | Wc | Wd] (four
# [H1, E] column blocks) it splits exactly into a per-query and a per-position part:
#
#     W1 x_l + b1 = c_q + M_q k_l,   c_q = (Wa + Wc) q + b1,   M_q = (Wb - Wc) + Wd diag(q)
#
# so per query one [H1, E] matrix M_q is applied to each key.
#
# Activations (the same for every hidden layer), with parameters act [P, H] per hidden layer:
#
#     "relu"     max(x, 0)                         (no parameters; gradient 0 at x = 0)
#     "sigmoid"  1 / (1 + exp(-x))                 (no parameters)
#     "prelu"    x if x > 0 else a * x             act [1, H]: a = slope (nn.PReLU; a shared
#                                                  slope is expanded to H by the caller)
#     "dice"     x * (alpha + (1 - alpha) * sigmoid(scale * x + shift))
#                act [3, H] rows (alpha, scale, shift). Dice's inference form: BatchNorm with
#                given statistics folded in, scale = gamma / sqrt(running_var + eps),
#                shift = beta - running_mean * scale (gamma = 1, beta = 0 without affine);
#                see `dice_params`. Every row is differentiable.
#
# Pooling over the valid positions l of row b:
#
#     softmax=False (DIN):  w_l = s_l;           out = sum_l w_l v_l;   lse = 0
#     softmax=True:         w_l = softmax_l(s);  out = sum_l w_l v_l;   lse = log sum_l exp(s_l)
#
# A row with no valid position gives out = 0 (lse = -inf with softmax) and zero gradients, never
# NaN. Positions that take part in no row (padding, masked out, jagged rows past offsets[-1]) are
# never read: their key/value gradients are exactly zero and a NaN there changes nothing. A NaN
# or inf at a valid position propagates (a NaN softmax sum is not an empty row: lse is NaN).
#
# Accumulation is float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs;
# `out` has the query's dtype; `lse` is float64 for float64 inputs, else float32. All tensors
# (query, key, value, weights, biases, act) share one dtype and device.
# ----------------------------------------------------------------------------------------------
ACTIVATIONS = ("relu", "sigmoid", "prelu", "dice")
# Number of rows of an activation's parameter tensor act [P, H] (0: takes none).
ACTIVATION_PARAM_ROWS = {"relu": 0, "sigmoid": 0, "prelu": 1, "dice": 3}


def activate(x: Tensor, activation: str, act: Optional[Tensor]) -> Tensor:
    """One hidden layer's activation on x [..., H]; act [P, H] as in the module docstring."""
    if activation == "relu":
        return torch.relu(x)
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "prelu":
        return torch.where(x > 0, x, act[0] * x)
    if activation == "dice":
        alpha, scale, shift = act[0], act[1], act[2]
        return x * (alpha + (1 - alpha) * torch.sigmoid(scale * x + shift))
    raise ValueError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))


def dice_params(alpha: Tensor, running_mean: Tensor, running_var: Tensor, eps: float,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """Dice's parameters [3, H] (alpha, scale, shift) from its alpha and its BatchNorm's
    statistics (and affine weight/bias when it has them). Differentiable in alpha, weight, bias."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.stack([alpha.reshape(-1), scale.reshape(-1).to(alpha.dtype),
                        shift.reshape(-1).to(alpha.dtype)])


def activation_unit_scores_ref(query: Tensor, key: Tensor, w1: Tensor, b1: Tensor,
                               w2: Optional[Tensor], b2: Optional[Tensor], w_out: Tensor,
                               b_out: Tensor, act1: Optional[Tensor], act2: Optional[Tensor],
                               activation: str) -> Tensor:
    """Scores s [B, N, L] of query [B, N, E] against padded key [B, L, E], in the compute dtype
    (no masking). Uses the exact split of the first layer (module docstring)."""
    cdt = _compute_dtype(query.dtype)
    q, k = query.to(cdt), key.to(cdt)
    E = q.shape[-1]
    wa, wb, wc, wd = w1.to(cdt).split(E, dim=1)
    c = q @ (wa + wc).T + b1.to(cdt)                      # [B, N, H1]
    m = (wb - wc) + wd * q[..., None, :]                  # [B, N, H1, E]
    h = torch.einsum("bnue,ble->bnlu", m, k) + c[:, :, None, :]
    h = activate(h, activation, None if act1 is None else act1.to(cdt))
    if w2 is not None:
        h = h @ w2.to(cdt).T + b2.to(cdt)
        h = activate(h, activation, None if act2 is None else act2.to(cdt))
    return (h @ w_out.to(cdt).T).squeeze(-1) + b_out.to(cdt)


def masked_activation_unit_weights_ref(
    query: Tensor, key: Tensor, valid: Tensor, w1: Tensor, b1: Tensor,
    w2: Optional[Tensor], b2: Optional[Tensor], w_out: Tensor, b_out: Tensor,
    act1: Optional[Tensor], act2: Optional[Tensor], activation: str, softmax: bool,
) -> Tuple[Tensor, Tensor]:
    """(the pooling weights w [B, N, L], lse [B, N]) of `masked_activation_unit_pool_ref`, in
    the compute dtype: raw scores (softmax False) or the masked softmax, 0 at positions outside
    the row and on empty rows."""
    cdt = _compute_dtype(query.dtype)
    # Positions outside the row are zeroed first, so that nothing there (NaN included) reaches
    # the result or any gradient.
    keep = valid.to(torch.bool)
    k = torch.where(keep[..., None], key.to(cdt), torch.zeros((), dtype=cdt, device=key.device))
    s = activation_unit_scores_ref(query, k, w1, b1, w2, b2, w_out, b_out, act1, act2, activation)
    keep3 = keep[:, None, :].expand_as(s)
    if softmax:
        s = s.masked_fill(~keep3, float("-inf"))
        # The max is a numerical shift only (no gradient through it); an empty row shifts by 0.
        if s.shape[-1] > 0:
            mx = s.amax(dim=-1, keepdim=True).detach()
        else:
            mx = s.new_zeros(s.shape[:-1] + (1,))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        p = torch.exp(s - mx)
        denom = p.sum(dim=-1, keepdim=True)
        # Empty: no valid position with a finite score. A NaN sum (a NaN/inf at a valid
        # position) is not empty: it propagates to out and lse.
        nonempty = denom != 0
        safe = torch.where(nonempty, denom, torch.ones_like(denom))
        w = p / safe
        lse = torch.where(nonempty, mx + torch.log(safe),
                          torch.full_like(denom, float("-inf"))).squeeze(-1)
    else:
        w = torch.where(keep3, s, torch.zeros_like(s))
        lse = torch.zeros(s.shape[:-1], dtype=cdt, device=s.device)
    return w, lse


def masked_activation_unit_pool_ref(
    query: Tensor, key: Tensor, value: Tensor, valid: Tensor, w1: Tensor, b1: Tensor,
    w2: Optional[Tensor], b2: Optional[Tensor], w_out: Tensor, b_out: Tensor,
    act1: Optional[Tensor], act2: Optional[Tensor], activation: str, softmax: bool,
) -> Tuple[Tensor, Tensor]:
    """The core on padded key [B, L, E] / value [B, L, Dv] with valid [B, L] bool."""
    cdt = _compute_dtype(query.dtype)
    keep = valid.to(torch.bool)
    v = torch.where(keep[..., None], value.to(cdt), torch.zeros((), dtype=cdt, device=key.device))
    w, lse = masked_activation_unit_weights_ref(query, key, valid, w1, b1, w2, b2, w_out, b_out,
                                                act1, act2, activation, softmax)
    out = torch.einsum("bnl,bld->bnd", w, v)
    return out.to(query.dtype), lse


def activation_unit_pool_ref(
    query: Tensor, key: Tensor, value: Optional[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor],
    offsets: Optional[Tensor], max_length: int, w1: Tensor, b1: Tensor, w2: Optional[Tensor],
    b2: Optional[Tensor], w_out: Tensor, b_out: Tensor, act1: Optional[Tensor],
    act2: Optional[Tensor], activation: str, softmax: bool,
) -> Tuple[Tensor, Tensor]:
    """Reference activation-unit pooling with the registered forward op's arguments, in its order.

    query [B, N, E]; padded key [B, L, E] / value [B, L, Dv] with optional lengths [B] or
    mask [B, L] (True = attend), or jagged key [T, E] / value [T, Dv] with offsets [B+1]
    (max_length >= every row's length, or -1 = unknown; ignored for the padded layout).
    value None: the keys are the values. Returns (out [B, N, Dv] in query's dtype, lse [B, N]);
    see the section comment above.
    """
    if value is None:
        value = key
    if offsets is not None:
        ml = None if max_length is None or max_length < 0 else int(max_length)
        key, value, valid = jagged_to_padded(key, value, offsets, ml)
    else:
        valid = padded_valid(key, lengths, mask)
    return masked_activation_unit_pool_ref(query, key, value, valid, w1, b1, w2, b2, w_out, b_out,
                                           act1, act2, activation, bool(softmax))


def activation_unit_weights_ref(
    query: Tensor, key: Tensor, value: Optional[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor],
    offsets: Optional[Tensor], max_length: int, w1: Tensor, b1: Tensor, w2: Optional[Tensor],
    b2: Optional[Tensor], w_out: Tensor, b_out: Tensor, act1: Optional[Tensor],
    act2: Optional[Tensor], activation: str, softmax: bool,
) -> Tensor:
    """The weights `activation_unit_pool_ref` pools with (same arguments; value is not read):
    padded [B, N, L], jagged [T, N], in the compute dtype. Raw scores (softmax False) or the
    masked softmax; exactly 0 at positions outside every row and on empty rows."""
    T = key.shape[0]
    if offsets is not None:
        ml = None if max_length is None or max_length < 0 else int(max_length)
        key, _, valid = jagged_to_padded(key, key[..., :1], offsets, ml)
    else:
        valid = padded_valid(key, lengths, mask)
    w, _ = masked_activation_unit_weights_ref(query, key, valid, w1, b1, w2, b2, w_out, b_out,
                                              act1, act2, activation, bool(softmax))
    return w if offsets is None else padded_to_token_rows(w, offsets, T)


# ----------------------------------------------------------------------------------------------
# Sequence self-attention (attnkern.sequence_attention)
#
# Every position of a row attends positions of the same row. By position within row b of length
# n (i = query, j = key, both < n; positions >= n are never read), with nt = num_targets[b]
# (0 without num_targets), c = contextual_len, m = max_attn_len and h = n - nt the history:
#
#     id(p) = p                                   c == 0
#           = max(p - c + 1, 0)                   c > 0   (the c contextual positions share id 0)
#     id(p) = min(id(p), idmax)    idmax = h (c == 0) or h - c + 1 (c > 0): the targets share
#                                  one id, the one after the last history position
#     d     = id(i) - id(j)
#     valid = i == j
#           | (d > 0 if causal else d != 0) & (m == 0 | |d| <= m)
#           | c > 0 & id(i) == 0 & id(j) < idmax  (contextual rows attend the whole history)
#
# which is generative-recommenders' `_get_valid_attn_mask` (hstu_mha) restricted to the row's
# valid positions (docs/sequence_attention.md says where that restriction matters).
#
# Scores, with hb = h if Hb == H else 0 (Hb the tables' and bias's head count):
#
#     s_ij = scale * <q_i, k_j> + position_table[min(|i - j|, P - 1), hb]
#          + time_table[bucket(query_times_i - key_times_j), hb] + bias[b, hb, i, j]
#     bucket(dt) = floor(ln(max(|dt|, 1)) / 0.301)   ("log", evaluated in float32 as HSTU does)
#                | floor(sqrt(max(|dt|, 1)))         ("sqrt", in float32), clamped to [0, NB - 1]
#
#     softmax: out_i = sum_valid j softmax_j(s_ij) v_j,   lse_i = log sum_valid j exp(s_ij)
#     silu:    out_i = attn_scale_i * sum_valid j silu(s_ij) v_j
#
# A query with no valid key gives out 0 (lse -inf); padded positions of the padded layout give
# out 0. Accumulation is float32 (float64 for float64 inputs); lse is in that dtype.
# ----------------------------------------------------------------------------------------------
SEQUENCE_NORMALIZATIONS = ("softmax", "silu")
TIME_BUCKETS = ("log", "sqrt")


# Width of one time bucket in log space: bucket = floor(ln(max(|dt|, 1)) / TIME_BUCKET_WIDTH),
# generative-recommenders' bucketisation (each bucket spans a factor of e^0.301 = 1.35 in
# |dt|): in seconds bucket 27 starts at an hour, 37 at a day, 57 at a year. Buckets past the
# table share its last entry.
TIME_BUCKET_WIDTH = 0.301


def log_time_bucket(delta: Tensor, num_buckets: int) -> Tensor:
    """The time bucket of each |delta| (any shape, integer or floating): int64 in
    [0, num_buckets), ``min(floor(ln(max(|delta|, 1)) / TIME_BUCKET_WIDTH), num_buckets - 1)``.
    Gaps of at most 1 share bucket 0; NaN lands in bucket 0 (an index is never out of range)."""
    d = delta.abs().to(torch.float32 if not delta.is_floating_point() else delta.dtype)
    b = torch.log(d.clamp(min=1.0)) / TIME_BUCKET_WIDTH
    # Clamped before the cast (inf stays in range) and after it (NaN casts to an arbitrary int).
    return b.clamp(max=num_buckets - 1).long().clamp(0, num_buckets - 1)


def time_bucket_ref(dt: Tensor, num_buckets: int, time_bucket: str = "log") -> Tensor:
    """bucket(dt) of int64 time differences, as in the section comment above (int64)."""
    if time_bucket == "log":  # the time-aware layer's bucketing too (attnkern.nn.time_bucket)
        return log_time_bucket(dt, num_buckets)
    x = dt.abs().clamp_min(1).to(torch.float32)
    if time_bucket == "sqrt":
        f = torch.sqrt(x)
    else:
        raise ValueError("time_bucket must be one of %s, got %r" % (", ".join(TIME_BUCKETS), time_bucket))
    return f.floor().to(torch.int64).clamp(0, num_buckets - 1)


def sequence_mask_ref(lengths: Tensor, L: int, causal: bool = True,
                      num_targets: Optional[Tensor] = None, contextual_len: int = 0,
                      max_attn_len: int = 0) -> Tensor:
    """The [B, L, L] bool mask valid[b, i, j] (query i attends key j) of the section comment."""
    n = lengths.to(torch.long).view(-1, 1, 1)
    nt = torch.zeros_like(n) if num_targets is None else num_targets.to(torch.long).view(-1, 1, 1)
    pos = torch.arange(L, device=lengths.device)
    i, j = pos.view(1, L, 1), pos.view(1, 1, L)
    c = int(contextual_len)
    off = c - 1 if c > 0 else 0
    idmax = n - nt - off

    def ident(p):
        return torch.minimum((p - off).clamp_min(0), idmax)

    idi, idj = ident(i), ident(j)
    d = idi - idj
    valid = (d > 0) if causal else (d != 0)
    if max_attn_len > 0:
        valid = valid & (d.abs() <= max_attn_len)
    valid = valid | (i == j)
    if c > 0:
        valid = valid | ((idi == 0) & (idj < idmax))
    return valid & (i < n) & (j < n)


def _pad_tokens(x: Tensor, starts: Tensor, L: int) -> Tensor:
    """Rows x[starts[b] + p] for p < L as [B, L, ...] (positions past the end read row 0; the
    caller masks them)."""
    idx = starts.view(-1, 1) + torch.arange(L, device=starts.device).view(1, L)
    idx = idx.clamp(0, max(x.shape[0] - 1, 0))
    if x.shape[0] == 0:
        return x.new_zeros((starts.shape[0], L) + tuple(x.shape[1:]))
    return x[idx]


def sequence_attention_ref(
    query: Tensor, key: Tensor, value: Tensor, offsets: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None, *, max_length: Optional[int] = None, causal: bool = True,
    num_targets: Optional[Tensor] = None, contextual_len: int = 0, max_attn_len: int = 0,
    normalization: str = "softmax", scale: Optional[float] = None,
    key_times: Optional[Tensor] = None, query_times: Optional[Tensor] = None,
    time_table: Optional[Tensor] = None, position_table: Optional[Tensor] = None,
    attn_scale=None, bias: Optional[Tensor] = None, time_bucket: str = "log",
) -> Tuple[Tensor, Tensor]:
    """Reference sequence self-attention (section comment above). Jagged query [T, H, Dk],
    key [T, Hkv, Dk], value [T, Hkv, Dv] with offsets [B+1] (times [T], attn_scale [T]), or
    padded [B, L, H(kv), D] with lengths [B] (or none: every position valid; times and
    attn_scale [B, L]). Returns (out shaped like query with Dv, lse [T, H] or [B, L, H]).
    Forms the [B, H, L, L] scores: it is the specification, not a kernel."""
    cdt = _compute_dtype(query.dtype)
    jagged = offsets is not None
    if jagged:
        offsets = offsets.to(torch.long)
        starts = offsets[:-1]
        lens = (offsets[1:] - starts).clamp_min(0)
        if max_length is None:
            max_length = int(lens.max().item()) if lens.numel() > 0 else 0
        L = int(max_length)

        def pad(x):
            return None if x is None else _pad_tokens(x, starts, L)
    else:
        B, L = query.shape[0], query.shape[1]
        lens = (torch.full((B,), L, dtype=torch.long, device=query.device) if lengths is None
                else lengths.to(torch.long))

        def pad(x):
            return x
    B = lens.shape[0]
    H, Hkv = query.shape[-2], key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    valid = sequence_mask_ref(lens, L, causal, num_targets, contextual_len, max_attn_len)
    rowvalid = torch.arange(L, device=query.device).view(1, L) < lens.view(-1, 1)  # [B, L]
    q = pad(query).to(cdt)
    k, v = pad(key).to(cdt), pad(value).to(cdt)
    # Never read outside the rows: zero there, so that NaN/inf padding cannot leak into 0 * x.
    zero = torch.zeros((), dtype=cdt, device=query.device)
    q = torch.where(rowvalid[:, :, None, None], q, zero)
    k = torch.where(rowvalid[:, :, None, None], k, zero)
    v = torch.where(rowvalid[:, :, None, None], v, zero)
    G = H // Hkv
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * float(scale)  # [B, H, L, L]
    pos = torch.arange(L, device=query.device)
    if position_table is not None:
        P = position_table.shape[0]
        rel = (pos.view(L, 1) - pos.view(1, L)).abs().clamp_max(P - 1)
        s = s + position_table.to(cdt)[rel].permute(2, 0, 1).unsqueeze(0)  # [1, Hb, L, L]
    if time_table is not None:
        qt, kt = pad(query_times).to(torch.long), pad(key_times).to(torch.long)
        bkt = time_bucket_ref(qt[:, :, None] - kt[:, None, :], time_table.shape[0], time_bucket)
        s = s + time_table.to(cdt)[bkt].permute(0, 3, 1, 2)  # [B, Hb, L, L]
    if bias is not None:
        s = s + bias.to(cdt)
    keep = valid[:, None]  # [B, 1, L, L]
    if normalization == "softmax":
        s = s.masked_fill(~keep, float("-inf"))
        m = s.amax(dim=-1, keepdim=True).detach() if L > 0 else s.new_zeros(s.shape[:-1] + (1,))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        denom = p.sum(dim=-1, keepdim=True)
        nonempty = denom != 0
        safe = torch.where(nonempty, denom, torch.ones_like(denom))
        w = p / safe
        lse = torch.where(nonempty, m + torch.log(safe), torch.full_like(denom, float("-inf")))
        lse = lse.squeeze(-1).transpose(1, 2)  # [B, L, H]
    elif normalization == "silu":
        if attn_scale is None:
            a = torch.full((B, L), 1.0 / max(L, 1), dtype=cdt, device=query.device)
        elif isinstance(attn_scale, Tensor):
            a = pad(attn_scale).to(cdt)
        else:
            a = torch.full((B, L), float(attn_scale), dtype=cdt, device=query.device)
        w = torch.where(keep, torch.nn.functional.silu(s), zero) * a[:, None, :, None]
        lse = torch.zeros(B, L, H, dtype=cdt, device=query.device)
    else:
        raise ValueError("normalization must be one of %s, got %r"
                         % (", ".join(SEQUENCE_NORMALIZATIONS), normalization))
    out = torch.einsum("bhij,bjhd->bihd", w, v)
    out = torch.where(rowvalid[:, :, None, None], out, zero)
    lse = torch.where(rowvalid[:, :, None], lse, torch.full_like(lse, float("-inf")))
    if jagged:
        T = query.shape[0]
        # Token t of row b at position t - starts[b]: gather back (tokens outside every row: 0).
        tok = torch.arange(T, device=query.device)
        row = (torch.searchsorted(offsets, tok, right=True) - 1).clamp(0, max(B - 1, 0))
        p = tok - offsets[row]
        inside = (tok < offsets[-1]) & (p < L) if B > 0 else torch.zeros_like(tok, dtype=torch.bool)
        p = p.clamp(0, max(L - 1, 0))
        if B == 0 or L == 0:
            out = query.new_zeros((T, H, value.shape[-1]), dtype=cdt)
            lse = torch.full((T, H), float("-inf"), dtype=cdt, device=query.device)
        else:
            out = torch.where(inside[:, None, None], out[row, p], zero)
            lse = torch.where(inside[:, None], lse[row, p], torch.full_like(lse[row, p], float("-inf")))
    return out.to(query.dtype), lse


# ----------------------------------------------------------------------------------------------
# Top-k by score (SIM / TWIN's search stage)
# ----------------------------------------------------------------------------------------------


def attention_topk_ref(
    query: Tensor,
    key: Tensor,
    k: int,
    lengths: Optional[Tensor] = None,
    *,
    mask: Optional[Tensor] = None,
    offsets: Optional[Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Reference top-k on canonical shapes: the k best valid positions of each query and head
    by ``s[l] = scale * <q, k_l> + bias[l]``, from the full score row (the fused kernels never
    form it).

    query [B, N, H, Dk]; key, lengths/mask/offsets and bias as in `attention_pool_ref`. Returns
    (scores [B, N, H, k] float32 (float64 for float64 inputs), indices [B, N, H, k] int64), best
    first; indices are positions in the row (padded: into L; jagged: 0 at the row's first
    element). Ties keep the lower position first; a NaN score ranks above every number. Slots
    past the row's valid positions (fewer than k, or positions whose score is -inf) hold index
    -1 and score -inf. Differentiable w.r.t. query, key and bias through the selected scores.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    jagged = offsets is not None
    bias = None if bias is None else canonical_bias(bias, jagged)
    if jagged:  # the rows padded (key only: a one-wide stand-in for the value)
        key, _, valid = jagged_to_padded(key, key[..., :1], offsets, max_length)
        bias = None if bias is None else jagged_bias_to_padded(bias, offsets, valid.shape[1])
    else:
        valid = padded_valid(key, lengths, mask)
    s = masked_scores_ref(query, key, valid, scale, bias).flatten(2, 3)  # [B, N, H, L]
    B, N, H, _ = query.shape
    L = s.shape[-1]
    if k > L:
        s = torch.cat([s, s.new_full((B, N, H, k - L), float("-inf"))], dim=-1)
    # A stable descending sort: equal scores keep their positions' order, NaN comes first.
    scores, order = torch.sort(s, dim=-1, descending=True, stable=True)
    scores, order = scores[..., :k], order[..., :k]
    dropped = scores == float("-inf")
    return scores, torch.where(dropped, torch.full_like(order, -1), order)
