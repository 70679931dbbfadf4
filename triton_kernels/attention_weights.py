"""Triton kernel of attention_pool's softmax weights (attnkern.attention_weights; the ops
attnkern::triton_attention_weights_fwd / triton_jagged_attention_weights_fwd, schemas
WEIGHTS_SCHEMAS of attnkern/ops/schemas.py).

One program per (row, query block, head), two passes over the row's K tiles:
    pass 1  the row statistics: online max and sum of exp, lse = max + log(sum), exactly as the
            attention-pool forward forms them (natural-unit logits, exp2 of the differences);
    pass 2  w = exp(s - lse) at the positions that take part, 0 elsewhere, written once.
Nothing of [.., L] is kept between the passes (the logits are recomputed), and the backward
(attnkern/ops/weights.py, device-agnostic torch ops) needs only w. An empty row (no position
takes part, or every logit -inf) gets lse = -inf and weights 0; a NaN/inf logit at a valid
position propagates to its row, as in the reference.

Layouts and launch: those of the attention-pool forward (canonical query [B, N, H, Dk], key
[B, L, H, Dk] or jagged [T, H, Dk], lengths/mask/offsets; the public function folds shared K/V
heads and the bias). The padded weights [B, N, H, L] are written in full by pass 2 (0 past the
row's length), the jagged ones [T, N, H] start as zeros (rows outside every row stay 0). Tiles:
attention_pool.default_config for a forward without the V tile (Dv counted as 16), which the
sm_90 compiles of SM90_CONFIGS.md bound.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_pool import (JAGGED, QUERY_BIAS, SMALL_N, _BiasView, _fixed_config, _kv_strides,
                             _layout_args, _load_rows, _logits, _LOG2E, _online_softmax,
                             _query_block_program, _softmax_finish, _tile_valid,
                             fp32_dot_precision, head_block, native_dot, query_block)


@triton.jit
def _tile_logits(q, k_base, MASK, BIAS, scale, b, h, offs_n, n_ok, start, t, end, DK, GROUP,
                 stride_kl, stride_kd, stride_mb, stride_ml,
                 stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                 LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_DK: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 NATIVE_DOT: tl.constexpr):
    """(the positions of tile t of the row, which of them take part, their logits; -inf
    elsewhere): both passes score the same tiles the same way, so that w = exp(s - lse) meets
    the lse of pass 1 exactly."""
    pos = start + t * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    valid = _tile_valid(MASK, b, pos, pos < end, stride_mb, stride_ml, LAYOUT)
    k = _load_rows(k_base, pos, valid, offs_dk, stride_kl, stride_kd, DK)
    s = _logits(q, k, scale, BIAS, b, offs_n, n_ok, h, pos, valid, GROUP,
                stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                BIAS_MODE, USE_DOT, DOT_PRECISION, NATIVE_DOT)
    return pos, valid, s


@triton.jit
def _attention_weights_fwd_kernel(
    Q, K, IDX, MASK, BIAS, W, LSE,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_wb, stride_wn, stride_wh, stride_wl,
    stride_lb, stride_ln, stride_lh,
    N, L, MAX_LEN, DK, GROUP,
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    b, h, start, end, offs_n, n_ok = _query_block_program(IDX, stride_idx, N, L, MAX_LEN, 1,
                                                          LAYOUT, BLOCK_N, BLOCK_L, False)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, n_ok, offs_dk, stride_qn, stride_qd, DK)
    k_base = K + b * stride_kb + h * stride_kh

    # Pass 1: the row statistics (running max m_i, sum l_i), as the attention-pool forward.
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    for t in range(0, tl.cdiv(end - start, BLOCK_L)):
        pos, valid, s = _tile_logits(q, k_base, MASK, BIAS, scale, b, h, offs_n, n_ok, start, t, end, DK,
                                     GROUP, stride_kl, stride_kd, stride_mb, stride_ml,
                                     stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                                     LAYOUT, BIAS_MODE, BLOCK_L, BLOCK_DK, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        m_i, l_i, alpha, p = _online_softmax(m_i, l_i, s)
    inv_l, lse = _softmax_finish(m_i, l_i)
    empty = l_i == 0.0
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_n * stride_ln, lse, mask=n_ok)

    # Pass 2: w = exp(s - lse) where a position takes part (lse of an empty row is never used);
    # the padded layout also writes the zeros past the row, up to L.
    lse_shift = tl.where(empty, 0.0, lse)
    if LAYOUT == JAGGED:
        stop = end
    else:
        stop = (end * 0 + L).to(tl.int64)
    for t in range(0, tl.cdiv(stop - start, BLOCK_L)):
        pos, valid, s = _tile_logits(q, k_base, MASK, BIAS, scale, b, h, offs_n, n_ok, start, t, end, DK,
                                     GROUP, stride_kl, stride_kd, stride_mb, stride_ml,
                                     stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                                     LAYOUT, BIAS_MODE, BLOCK_L, BLOCK_DK, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        w = tl.exp2((s - lse_shift[:, None]) * _LOG2E)
        w = tl.where(valid[None, :] & (~empty)[:, None], w, 0.0)
        tl.store(W + b * stride_wb + h * stride_wh + offs_n[:, None] * stride_wn
                 + pos[None, :].to(tl.int64) * stride_wl, w,
                 mask=n_ok[:, None] & (pos < stop)[None, :])


def attention_weights_fwd(query: torch.Tensor, key: torch.Tensor,
                          lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                          offsets: Optional[torch.Tensor] = None, max_length: int = -1,
                          scale: Optional[float] = None, bias: Optional[torch.Tensor] = None):
    """Launcher on canonical tensors (checked by the ops; index values clamped in-kernel).
    Returns (weights float32: padded [B, N, H, L], jagged [T, N, H]; lse [B, N, H] float32)."""
    B, N, H, Dk = query.shape
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    jagged = offsets is not None
    lse = torch.empty((B, N, H), dtype=torch.float32, device=query.device)
    if jagged:
        w = torch.zeros((key.shape[0], N, H), dtype=torch.float32, device=query.device)
        sw = (0, w.stride(1), w.stride(2), w.stride(0))
    else:
        w = torch.empty((B, N, H, key.shape[1]), dtype=torch.float32, device=query.device)
        sw = (w.stride(0), w.stride(1), w.stride(2), w.stride(3))
    if B == 0 or w.numel() == 0:
        lse.fill_(float("-inf"))
        return w, lse
    layout, idx, stride_idx, mk, (stride_mb, stride_ml), max_len, L, _ = _layout_args(
        key, lengths, mask, offsets, max_length)
    bi = _BiasView(bias, query, jagged)
    block_dk = head_block(Dk)
    block_n = query_block(N, block_dk, 16, query.element_size(), "fwd")
    config = _fixed_config(None, block_n, block_dk, 16, query.element_size(), "fwd",
                           bi.mode == QUERY_BIAS.value)
    _attention_weights_fwd_kernel[(B * triton.cdiv(N, block_n), H)](
        query, key, idx, mk, bi.pointer(key), w, lse, float(scale),
        *query.stride(), *_kv_strides(key, jagged), stride_idx, stride_mb, stride_ml, *bi.strides,
        *sw, *lse.stride(),
        N, L, max_len, Dk, bi.group,
        LAYOUT=layout, BIAS_MODE=bi.mode, BLOCK_N=block_n, BLOCK_DK=block_dk,
        USE_DOT=block_n > SMALL_N, DOT_PRECISION=fp32_dot_precision(),
        NATIVE_DOT=native_dot(query.dtype), **config)
    return w, lse
