"""Triton kernel of attention pooling over quantized keys and values (forward only; the op
attnkern::triton_attention_pool_quant_fwd, schema of the C++ op attention_pool_quant_fwd).

key/value hold int8, uint8, float8_e4m3fn or float8_e5m2 elements, each row (one position of
one head) with a float32 scale and an optional float32 bias: element = data * scale + bias
(FBGEMM's row-wise rule; docs/quantized.md). Canonical layouts as the attention-pool kernels'
(query [B, N, H, Dk]; key/value padded [B, L, H, D] with lengths or mask, or jagged [T, H, D]
with offsets), per-row parameters [B, L, H] / [T, H]; the public function folds shared K/V heads
into the query axis and the score bias as for attention_pool.

The rows are never dequantized in memory. Since scale and bias are per row, they factor out of
the head-dim sums:

    q . k_l = scale_l * (q . data_l) + bias_l * sum(q)
    sum_l p_l v_l = (p * vscale) @ vdata + sum_l p_l * vbias_l

Every stored dtype converts exactly to float16 and bfloat16 (at most 8 significant bits, and
in range), so q . data runs on the query's own 16-bit tl.dot with float32 accumulation and no
rounding beyond the float32 path's. The value product rounds p * vscale to the operand dtype,
as the unquantized kernels round p: bfloat16 for bfloat16 queries (whose output rounds to
bfloat16 anyway); float32 otherwise, since float16 could overflow on p * vscale.

Split-L (flash-decoding) for few programs, merged by the attention-pool combine kernel: a long
quantized history with one candidate (the serving case this path is for) still fills the GPU.
Launch: the attention-pool forward's tile rules (attention_pool.default_config / _fits, calibrated
on sm_90 compiles, SM90_CONFIGS.md) for float32 operands, which is what the value product and
the dequantized score tile hold per program; 16-bit keys only shrink the K/V tiles.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_pool import (QUERY_BIAS, SMALL_N, _BiasView, _bias_tile, _fixed_config, _kv_strides,
                             _layout_args, _load_rows, _mm, _online_softmax, _query_block_program,
                             _softmax_finish, _tile_valid, attention_pool_combine,
                             choose_num_splits, fp32_dot_precision, head_block, native_dot,
                             query_block, sm_count)


@triton.jit
def _row_params(SCALE, BIAS_Q, base, pos, valid, stride_l, HAS_BIAS: tl.constexpr):
    """(scale, bias) of the rows at `pos` (0 where a position takes no part)."""
    sc = tl.load(SCALE + base + pos * stride_l, mask=valid, other=0.0)
    if HAS_BIAS:
        bi = tl.load(BIAS_Q + base + pos * stride_l, mask=valid, other=0.0)
    else:
        bi = sc * 0.0
    return sc, bi


@triton.jit
def _attention_pool_quant_fwd_kernel(
    Q, K, V, KS, KB, VS, VB, IDX, MASK, BIAS, OUT, LSE,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_pb, stride_pl, stride_ph,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_os, stride_ob, stride_on, stride_oh, stride_od,
    stride_ls, stride_lb, stride_ln, stride_lh,
    N, L, MAX_LEN, NUM_SPLITS, DK, DV, GROUP,
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr, HAS_KB: tl.constexpr, HAS_VB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
    PV_16BIT: tl.constexpr,
):
    b, h, lo, hi, offs_n, n_ok = _query_block_program(IDX, stride_idx, N, L, MAX_LEN, NUM_SPLITS,
                                                      LAYOUT, BLOCK_N, BLOCK_L, True)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)

    # Phase 1: the query block in its own dtype (the operand of q . data), and sum(q) for the
    # key bias term.
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, n_ok, offs_dk, stride_qn, stride_qd, DK)
    q_sum = tl.sum(q.to(tl.float32), axis=1)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    p_base = b * stride_pb + h * stride_ph

    # Phase 2: stream the quantized tiles with the online softmax of the attention-pool forward
    # (natural-unit logits, exp2 of the small differences only).
    for t in range(0, tl.cdiv(hi - lo, BLOCK_L)):
        pos = lo + t * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = _tile_valid(MASK, b, pos, pos < hi, stride_mb, stride_ml, LAYOUT)
        k = _load_rows(k_base, pos, valid, offs_dk, stride_kl, stride_kd, DK)
        # NATIVE_DOT=False (bfloat16 under the interpreter): float32, as _mm then computes.
        if NATIVE_DOT:
            k = k.to(Q.dtype.element_ty)
        else:
            k = k.to(tl.float32)
        ks, kb = _row_params(KS, KB, p_base, pos, valid, stride_pl, HAS_KB)
        s = _mm(q, tl.trans(k), USE_DOT, DOT_PRECISION, NATIVE_DOT) * ks[None, :]
        if HAS_KB:
            s += q_sum[:, None] * kb[None, :]
        s = s * scale
        if BIAS_MODE != 0:
            s += _bias_tile(BIAS, b, offs_n, n_ok, h, pos, valid, GROUP,
                            stride_bb, stride_bn, stride_bj, stride_bh, stride_bl, BIAS_MODE)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_i, l_i, alpha, p = _online_softmax(m_i, l_i, s)
        vs, vb = _row_params(VS, VB, p_base, pos, valid, stride_pl, HAS_VB)
        v = _load_rows(v_base, pos, valid, offs_dv, stride_vl, stride_vd, DV)
        if PV_16BIT:
            v = v.to(tl.bfloat16)
        else:
            v = v.to(tl.float32)
        pv = _mm(p * vs[None, :], v, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        if HAS_VB:
            pv += tl.sum(p * vb[None, :], axis=1)[:, None]
        acc = acc * alpha[:, None] + pv

    # Phase 3: normalise (empty row or split: out 0, lse -inf), as the attention-pool forward.
    inv_l, lse = _softmax_finish(m_i, l_i)
    split = tl.program_id(2).to(tl.int64)
    tl.store(OUT + split * stride_os + b * stride_ob + h * stride_oh + offs_n[:, None] * stride_on
             + offs_dv[None, :] * stride_od, acc * inv_l[:, None],
             mask=n_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + split * stride_ls + b * stride_lb + h * stride_lh + offs_n * stride_ln, lse, mask=n_ok)


def _param_strides(t: torch.Tensor, jagged: bool):
    """(stride_b, stride_l, stride_h) of a per-row parameter [B, L, H] or [T, H]."""
    return (0, t.stride(0), t.stride(1)) if jagged else tuple(t.stride())


def attention_pool_quant_fwd(query, key, value, key_scale, key_bias, value_scale, value_bias,
                             lengths=None, mask=None, offsets=None, max_length=-1,
                             scale: Optional[float] = None, bias=None, *,
                             num_splits: Optional[int] = None):
    """Launcher on canonical tensors (checked by the op; index values clamped in-kernel).
    Returns (out [B, N, H, Dv] float32, lse [B, N, H] float32). Parameters of a jagged key are
    read with the key's row strides, so they must share its rows; the op checks their shapes."""
    B, N, H, Dk = query.shape
    Dv = value.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    out = torch.empty((B, N, H, Dv), dtype=torch.float32, device=query.device)
    lse = torch.empty((B, N, H), dtype=torch.float32, device=query.device)
    if B == 0:
        return out, lse
    layout, idx, stride_idx, mk, (stride_mb, stride_ml), max_len, L, jagged = _layout_args(
        key, lengths, mask, offsets, max_length)
    for name, p in (("value_scale", value_scale), ("key_bias", key_bias), ("value_bias", value_bias)):
        if p is not None and _param_strides(p, jagged) != _param_strides(key_scale, jagged):
            # One set of strides serves the four parameters: make them alike.
            key_scale, key_bias, value_scale, value_bias = (
                None if t is None else t.contiguous() for t in (key_scale, key_bias, value_scale, value_bias))
            break
    bi = _BiasView(bias, query, jagged)
    block_dk, block_dv = head_block(Dk), head_block(Dv)
    # float32 operands for the launch rules: the value product and the score tile are float32.
    block_n = query_block(N, block_dk, block_dv, 4, "fwd")
    qblocks = triton.cdiv(N, block_n)
    if num_splits is None:
        row_len = L if not jagged else (max_len if max_len >= 0 else triton.cdiv(L, B))
        num_splits = choose_num_splits(B * qblocks * H, row_len, sm_count(query.device))
    num_splits = max(1, int(num_splits))
    if num_splits == 1:
        o_buf, l_buf = out, lse
        so, sl = (0,) + tuple(out.stride()), (0,) + tuple(lse.stride())
    else:
        o_buf = torch.empty((num_splits, B, N, H, Dv), dtype=torch.float32, device=query.device)
        l_buf = torch.empty((num_splits, B, N, H), dtype=torch.float32, device=query.device)
        so, sl = o_buf.stride(), l_buf.stride()
    config = _fixed_config(None, block_n, block_dk, block_dv, 4, "fwd", bi.mode == QUERY_BIAS.value)
    config.pop("maxnreg")
    _attention_pool_quant_fwd_kernel[(B * qblocks, H, num_splits)](
        query, key, value, key_scale, key_bias if key_bias is not None else key_scale, value_scale,
        value_bias if value_bias is not None else value_scale, idx, mk, bi.pointer(key), o_buf, l_buf,
        float(scale),
        *query.stride(), *_kv_strides(key, jagged), *_kv_strides(value, jagged),
        *_param_strides(key_scale, jagged),
        stride_idx, stride_mb, stride_ml, *bi.strides, *so, *sl,
        N, L, max_len, num_splits, Dk, Dv, bi.group,
        LAYOUT=layout, BIAS_MODE=bi.mode, HAS_KB=key_bias is not None, HAS_VB=value_bias is not None,
        BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv, USE_DOT=block_n > SMALL_N,
        DOT_PRECISION=fp32_dot_precision(), NATIVE_DOT=native_dot(query.dtype),
        PV_16BIT=query.dtype == torch.bfloat16 and native_dot(query.dtype), **config)
    if num_splits > 1:
        attention_pool_combine(o_buf, l_buf, out, lse)
    return out, lse
