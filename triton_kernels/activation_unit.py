"""Triton kernels of DIN's activation-unit pooling, forward and backward.

The math is attnkern/reference.py's activation_unit_pool_ref (the specification): per query q of row b and
valid position l, an MLP over [q, k_l, q - k_l, q * k_l] gives a score s_l, and the row pools
sum_l w_l v_l with w = s (raw) or w = softmax(s). Canonical layouts (the Python API normalises
to them):

    query [B, N, E]
    padded: key [B, L, E], value [B, L, Dv], lengths [B] XOR mask [B, L] bool, or neither
    jagged: key [T, E], value [T, Dv], offsets [B + 1] (max_length >= 0 caps each row)

The concatenation is never formed. With W1 = [Wa | Wb | Wc | Wd] the first layer is

    W1 x_l + b1 = c_q + M_q k_l,   c_q = (Wa + Wc) q + b1,   M_q = (Wb - Wc) + Wd diag(q)

so a tile of keys [BLOCK_L, E] times M_q^T is one tl.dot giving the tile's first hidden layer
[BLOCK_L, H1]; the second hidden layer (if any) is a second tl.dot against W2^T, and the score
a row sum against w_out. Hidden activations stay in registers.

Kernels:
    _activation_unit_fwd_kernel   one program per (row, query): streams the row's K/V tiles
                                  (online softmax in base 2 when softmax, else a plain sum)
    _activation_unit_bwd_kernel   one program per group of rows (rows pid, pid + G, ...): per
                                  K/V tile it loops over the row's queries, recomputes the MLP
                                  (nothing [B, L, units] is saved), writes dK/dV of the tile
                                  once, adds dq of each query into a float32 buffer that only
                                  this program touches, and accumulates every weight gradient
                                  in registers; each program writes one partial of the weight
                                  gradients, summed by the launcher in a fixed order
                                  (deterministic: no cross-program atomics).

Row bounds are clamped in-kernel exactly as for attention pooling (`_row_bounds`), so no index
value can make a launch read out of bounds; positions outside every row are never loaded.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_pool import (DENSE, JAGGED, LENGTHS, MASKED, _layout_args,  # noqa: F401
                             _row_bounds, fp32_dot_precision, interpret_mode, sm_count)

# Activation codes (constexpr ACT of both kernels).
ACT_CODES = {"relu": 0, "sigmoid": 1, "prelu": 2, "dice": 3}
_RELU = tl.constexpr(0)
_SIGMOID = tl.constexpr(1)
_PRELU = tl.constexpr(2)
_DICE = tl.constexpr(3)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Fixed interpreter tile: small, so that block-boundary lengths are cheap to test.
INTERPRET_BLOCK_L = 16
# Backward programs per SM on the GPU (each program owns whole rows and writes one partial of
# the weight gradients); the interpreter uses a few programs so that the partial sum is tested.
BWD_PROGRAMS_PER_SM = 4
INTERPRET_BWD_PROGRAMS = 2
# The backward keeps three [H1, E] weight-gradient accumulators live per program: more warps
# spread them over more registers.
BWD_NUM_WARPS = 8


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _units(z, offs_h, H):
    """z [BLOCK_L, BLOCK_H] with its padded units (columns >= H) set to 0: their weights are
    zero, and zero times an infinite key or activation is NaN, which the next layer's and the
    score's zero weights would carry into a score that is finite in the reference."""
    return tl.where((offs_h < H)[None, :], z, 0.0)


@triton.jit
def _act_fwd(x, p0, p1, p2, ACT: tl.constexpr):
    """The hidden activation on x [BLOCK_L, BLOCK_H]; p0..p2 [BLOCK_H] its parameter rows
    (prelu: p0 = slope; dice: alpha, scale, shift)."""
    if ACT == _RELU:
        # Not tl.maximum: it may return 0 for a NaN x, and a NaN at a valid position must
        # reach the score.
        y = tl.where(x < 0.0, 0.0, x)
    elif ACT == _SIGMOID:
        y = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == _PRELU:
        y = tl.where(x > 0.0, x, p0[None, :] * x)
    else:
        sg = 1.0 / (1.0 + tl.exp(-(p1[None, :] * x + p2[None, :])))
        y = x * (p0[None, :] + (1.0 - p0[None, :]) * sg)
    return y


@triton.jit
def _act_bwd(x, dy, p0, p1, p2, ACT: tl.constexpr):
    """(dx, dp0, dp1, dp2) of the activation at x given dy, all [BLOCK_L, BLOCK_H]; the
    parameter gradients are per element (the caller sums them over positions). relu's
    gradient at x = 0 is 0, as torch.relu's."""
    zero = tl.zeros_like(x)
    if ACT == _RELU:
        dx = tl.where(x > 0.0, dy, 0.0)
        dp0, dp1, dp2 = zero, zero, zero
    elif ACT == _SIGMOID:
        sg = 1.0 / (1.0 + tl.exp(-x))
        dx = dy * sg * (1.0 - sg)
        dp0, dp1, dp2 = zero, zero, zero
    elif ACT == _PRELU:
        dx = tl.where(x > 0.0, dy, p0[None, :] * dy)
        dp0 = tl.where(x > 0.0, 0.0, dy * x)
        dp1, dp2 = zero, zero
    else:
        alpha = p0[None, :]
        sg = 1.0 / (1.0 + tl.exp(-(p1[None, :] * x + p2[None, :])))
        # y = x (alpha + (1 - alpha) sg(z)), z = scale x + shift
        dz = dy * x * (1.0 - alpha) * sg * (1.0 - sg)
        dx = dy * (alpha + (1.0 - alpha) * sg) + dz * p1[None, :]
        dp0 = dy * x * (1.0 - sg)
        dp1 = dz * x
        dp2 = dz
    return dx, dp0, dp1, dp2


@triton.jit
def _mmf(a, b, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] in float32 (every operand here is a float32 recomputation)."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)


@triton.jit
def _load_vec(ptr, offs, n, stride):
    return tl.load(ptr + offs * stride, mask=offs < n, other=0.0).to(tl.float32)


@triton.jit
def _load_mat(ptr, offs_r, offs_c, nr, nc, stride_r, stride_c):
    return tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                   mask=(offs_r[:, None] < nr) & (offs_c[None, :] < nc), other=0.0).to(tl.float32)


@triton.jit
def _load_act(ACTP, offs_h, H, stride_ap, stride_ah, ACT: tl.constexpr):
    """Parameter rows (p0, p1, p2) [BLOCK_H] of one hidden layer's activation (zeros unused)."""
    if ACT == _PRELU:
        p0 = _load_vec(ACTP, offs_h, H, stride_ah)
        p1 = tl.zeros_like(p0)
        p2 = tl.zeros_like(p0)
    elif ACT == _DICE:
        p0 = _load_vec(ACTP, offs_h, H, stride_ah)
        p1 = _load_vec(ACTP + stride_ap, offs_h, H, stride_ah)
        p2 = _load_vec(ACTP + 2 * stride_ap, offs_h, H, stride_ah)
    else:
        p0 = tl.zeros_like(offs_h).to(tl.float32)
        p1 = p0
        p2 = p0
    return p0, p1, p2


@triton.jit
def _tile_offsets(BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr):
    """The offsets a program indexes its tiles with: key positions (int32, added to the row's
    start), then int64 ones into the key, value and hidden-unit dims."""
    return (tl.arange(0, BLOCK_L), tl.arange(0, BLOCK_E).to(tl.int64),
            tl.arange(0, BLOCK_DV).to(tl.int64), tl.arange(0, BLOCK_H1).to(tl.int64),
            tl.arange(0, BLOCK_H2).to(tl.int64))


@triton.jit
def _load_mlp_rest(ACT1, W2, B2, ACT2, WOUT, BOUT, offs_h1, offs_h2, H1, H2,
                   stride_a1p, stride_a1h, stride_w2o, stride_w2i, stride_a2p, stride_a2h,
                   stride_wo, ACT: tl.constexpr, TWO_LAYERS: tl.constexpr):
    """The query-independent MLP parameters after the first layer's weights, as fp32: the first
    activation's rows, the second layer's weights, bias and activation rows (with one layer,
    zeros that are never read), the output weights and bias."""
    a10, a11, a12 = _load_act(ACT1, offs_h1, H1, stride_a1p, stride_a1h, ACT)
    if TWO_LAYERS:
        w2 = _load_mat(W2, offs_h2, offs_h1, H2, H1, stride_w2o, stride_w2i)
        b2 = _load_vec(B2, offs_h2, H2, 1)
        a20, a21, a22 = _load_act(ACT2, offs_h2, H2, stride_a2p, stride_a2h, ACT)
        wout = _load_vec(WOUT, offs_h2, H2, stride_wo)
    else:
        w2 = tl.zeros([1], tl.float32)
        b2 = w2
        a20 = w2
        a21 = w2
        a22 = w2
        wout = _load_vec(WOUT, offs_h1, H1, stride_wo)
    bout = tl.load(BOUT).to(tl.float32)
    return a10, a11, a12, w2, b2, a20, a21, a22, wout, bout


@triton.jit
def _first_layer(W1, B1, q, offs_h, offs_e, H1, E, stride_w1h, stride_w1e):
    """(M_q [BLOCK_H1, BLOCK_E], c_q [BLOCK_H1], Wa + Wc, Wd) of query q [BLOCK_E]. Padded
    units/features are zero, so they add nothing downstream."""
    wa = _load_mat(W1, offs_h, offs_e, H1, E, stride_w1h, stride_w1e)
    wb = _load_mat(W1 + E * stride_w1e, offs_h, offs_e, H1, E, stride_w1h, stride_w1e)
    wc = _load_mat(W1 + 2 * E * stride_w1e, offs_h, offs_e, H1, E, stride_w1h, stride_w1e)
    wd = _load_mat(W1 + 3 * E * stride_w1e, offs_h, offs_e, H1, E, stride_w1h, stride_w1e)
    wac = wa + wc
    m = (wb - wc) + wd * q[None, :]
    c = tl.sum(wac * q[None, :], axis=1) + _load_vec(B1, offs_h, H1, 1)
    return m, c, wac, wd


@triton.jit
def _load_kv(K, V, MASK, b, pos, valid, offs_e, offs_dv, E, DV,
             stride_kb, stride_kl, stride_ke, stride_vb, stride_vl, stride_vd,
             stride_mb, stride_ml, LAYOUT: tl.constexpr):
    """K [BLOCK_L, BLOCK_E] / V [BLOCK_L, BLOCK_DV] tiles (float32) of row b at `pos`, and the
    positions that take part (`valid` narrowed by the mask); the others are never loaded."""
    if LAYOUT == MASKED:
        keep = tl.load(MASK + b * stride_mb + pos * stride_ml, mask=valid, other=0)
        valid = valid & (keep != 0)
    k = tl.load(K + b * stride_kb + pos[:, None] * stride_kl + offs_e[None, :] * stride_ke,
                mask=valid[:, None] & (offs_e[None, :] < E), other=0.0).to(tl.float32)
    v = tl.load(V + b * stride_vb + pos[:, None] * stride_vl + offs_dv[None, :] * stride_vd,
                mask=valid[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
    return valid, k, v


@triton.jit
def _activation_unit_fwd_kernel(
    Q, K, V, IDX, MASK, W1, B1, W2, B2, WOUT, BOUT, ACT1, ACT2, OUT, LSE, S,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kl, stride_ke,
    stride_vb, stride_vl, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_w1h, stride_w1e, stride_w2o, stride_w2i, stride_wo,
    stride_a1p, stride_a1h, stride_a2p, stride_a2h,
    stride_ob, stride_on, stride_od, stride_lb, stride_ln, stride_sb, stride_sn, stride_sl,
    N, L, MAX_LEN, E, DV, H1, H2,
    LAYOUT: tl.constexpr, ACT: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SCORES: tl.constexpr = False,
):
    """SCORES: the weights go to S (padded [B, N, L], jagged [T, N] with stride_sb = 0) at the
    positions that take part instead of weighting V (OUT is not written; V is not used)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    start, end = _row_bounds(IDX, b, stride_idx, L, MAX_LEN, LAYOUT)

    offs_l, offs_e, offs_dv, offs_h1, offs_h2 = _tile_offsets(BLOCK_L, BLOCK_E, BLOCK_DV,
                                                               BLOCK_H1, BLOCK_H2)

    # Phase 1: this query's first layer (M_q, c_q) and the rest of the MLP, loaded once.
    q = _load_vec(Q + b * stride_qb + n * stride_qn, offs_e, E, stride_qe)
    m, c, _wac, _wd = _first_layer(W1, B1, q, offs_h1, offs_e, H1, E, stride_w1h, stride_w1e)
    a10, a11, a12, w2, b2, a20, a21, a22, wout, bout = _load_mlp_rest(
        ACT1, W2, B2, ACT2, WOUT, BOUT, offs_h1, offs_h2, H1, H2, stride_a1p, stride_a1h,
        stride_w2o, stride_w2i, stride_a2p, stride_a2h, stride_wo, ACT, TWO_LAYERS)

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)

    # Phase 2: stream the row's K/V tiles; scores of a tile = the MLP on [BLOCK_L, units]
    # register tiles. softmax: online softmax in base 2 (an all-masked prefix keeps m = -inf and
    # shifts by 0); raw: w = s on valid positions.
    for t in range(0, tl.cdiv(end - start, BLOCK_L)):
        pos = start + t * BLOCK_L + offs_l
        valid = pos < end
        valid, k, v = _load_kv(K, V, MASK, b, pos, valid, offs_e, offs_dv, E, DV,
                               stride_kb, stride_kl, stride_ke, stride_vb, stride_vl, stride_vd,
                               stride_mb, stride_ml, LAYOUT)
        h = _act_fwd(_units(_mmf(k, tl.trans(m), DOT_PRECISION) + c[None, :], offs_h1, H1),
                     a10, a11, a12, ACT)
        if TWO_LAYERS:
            h = _act_fwd(_units(_mmf(h, tl.trans(w2), DOT_PRECISION) + b2[None, :], offs_h2, H2),
                         a20, a21, a22, ACT)
        s = tl.sum(h * wout[None, :], axis=1) + bout
        if SCORES:
            tl.store(S + b * stride_sb + n * stride_sn + pos * stride_sl, s, mask=valid)
        if SOFTMAX:
            s2 = tl.where(valid, s * _LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, axis=0))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(s2 - m_shift)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            if not SCORES:
                acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
        elif not SCORES:
            w = tl.where(valid, s, 0.0)
            acc += tl.sum(w[:, None] * v, axis=0)

    # Phase 3: normalise (softmax) and store; an empty row gives out = 0 (lse = -inf). A NaN
    # sum (a non-finite value at a valid position) is not empty: it propagates.
    if SOFTMAX:
        nonempty = l_i != 0.0
        inv = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
        o = acc * inv
        lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * _LN2,
                       float("-inf"))
    else:
        o = acc
        lse = tl.zeros([1], tl.float32)
    if not SCORES:
        tl.store(OUT + b * stride_ob + n * stride_on + offs_dv * stride_od,
                 o.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + b * stride_lb + n * stride_ln + tl.arange(0, 1), lse)

    # Phase 4 (scores with softmax): the row's written scores become their weights
    # exp2(s log2(e) - m) / l, in place; each element is reread by the thread that wrote it
    # (same tile shape and layout), the barrier orders the two sweeps across the program.
    if SCORES and SOFTMAX:
        tl.debug_barrier()
        m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        for t in range(0, tl.cdiv(end - start, BLOCK_L)):
            pos = start + t * BLOCK_L + offs_l
            valid = pos < end
            if LAYOUT == MASKED:
                keep = tl.load(MASK + b * stride_mb + pos * stride_ml, mask=valid, other=0)
                valid = valid & (keep != 0)
            ptr = S + b * stride_sb + n * stride_sn + pos * stride_sl
            x = tl.load(ptr, mask=valid, other=0.0)
            w = tl.where(nonempty, tl.exp2(x * _LOG2E - m_shift) * inv, 0.0)
            tl.store(ptr, w, mask=valid)


@triton.jit
def _activation_unit_bwd_kernel(
    Q, K, V, IDX, MASK, W1, B1, W2, B2, WOUT, BOUT, ACT1, ACT2, DO, LSE, DELTA,
    DQ, DK, DV_OUT,
    P_DM, P_DMQ, P_DCQ, P_DC, P_DW2, P_DB2, P_DWO, P_DBO, P_DA1, P_DA2,
    stride_qb, stride_qn, stride_qe,
    stride_kb, stride_kl, stride_ke,
    stride_vb, stride_vl, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_w1h, stride_w1e, stride_w2o, stride_w2i, stride_wo,
    stride_a1p, stride_a1h, stride_a2p, stride_a2h,
    stride_gb, stride_gn, stride_gd, stride_lb, stride_ln, stride_db, stride_dn,
    stride_dqb, stride_dqn, stride_dkb, stride_dkl, stride_dvb, stride_dvl,
    B, N, L, MAX_LEN, E, DV, H1, H2, NUM_PROGRAMS,
    LAYOUT: tl.constexpr, ACT: tl.constexpr, TWO_LAYERS: tl.constexpr, SOFTMAX: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SHARED_VALUE: tl.constexpr,
):
    """Gradients of rows pid, pid + NUM_PROGRAMS, ... Outputs: dK / dV tiles (each written by
    exactly one program, once, at valid positions only: the launcher zero-fills), dq added into
    the zero-filled float32 DQ [B, N, E] (only this program touches its rows), and this
    program's partial weight gradients P_* [NUM_PROGRAMS, ...] (contiguous, float32):
        P_DM  [H1, E]  sum dz1^T k               (= dWb; dWc = P_DCQ - P_DM)
        P_DMQ [H1, E]  sum (dz1^T k) * q         (= dWd)
        P_DCQ [H1, E]  sum (sum_l dz1) q^T       (= dWa)
        P_DC  [H1]     sum dz1                   (= db1)
        P_DW2 [H2, H1], P_DB2 [H2], P_DWO [H_last], P_DBO [1], P_DA1 [3, H1], P_DA2 [3, H2]."""
    pid = tl.program_id(0)
    offs_l, offs_e, offs_dv, offs_h1, offs_h2 = _tile_offsets(BLOCK_L, BLOCK_E, BLOCK_DV,
                                                               BLOCK_H1, BLOCK_H2)

    # Phase 1: the query-independent MLP parameters, loaded once per program.
    a10, a11, a12, w2, b2, a20, a21, a22, wout, bout = _load_mlp_rest(
        ACT1, W2, B2, ACT2, WOUT, BOUT, offs_h1, offs_h2, H1, H2, stride_a1p, stride_a1h,
        stride_w2o, stride_w2i, stride_a2p, stride_a2h, stride_wo, ACT, TWO_LAYERS)

    g_dm = tl.zeros([BLOCK_H1, BLOCK_E], tl.float32)
    g_dmq = tl.zeros([BLOCK_H1, BLOCK_E], tl.float32)
    g_dcq = tl.zeros([BLOCK_H1, BLOCK_E], tl.float32)
    g_dc = tl.zeros([BLOCK_H1], tl.float32)
    g_a10 = tl.zeros([BLOCK_H1], tl.float32)
    g_a11 = tl.zeros([BLOCK_H1], tl.float32)
    g_a12 = tl.zeros([BLOCK_H1], tl.float32)
    g_w2 = tl.zeros([BLOCK_H2, BLOCK_H1], tl.float32)
    g_b2 = tl.zeros([BLOCK_H2], tl.float32)
    g_a20 = tl.zeros([BLOCK_H2], tl.float32)
    g_a21 = tl.zeros([BLOCK_H2], tl.float32)
    g_a22 = tl.zeros([BLOCK_H2], tl.float32)
    if TWO_LAYERS:
        g_wo = tl.zeros([BLOCK_H2], tl.float32)
    else:
        g_wo = tl.zeros([BLOCK_H1], tl.float32)
    g_bo = tl.zeros([1], tl.float32)

    for b32 in range(pid, B, NUM_PROGRAMS):
        b = (pid * 0 + b32).to(tl.int64)  # a tensor also when the interpreter gives an int
        start, end = _row_bounds(IDX, b, stride_idx, L, MAX_LEN, LAYOUT)
        # Phase 2: each K/V tile of the row is loaded once; all the row's queries use it.
        for t in range(0, tl.cdiv(end - start, BLOCK_L)):
            pos = start + t * BLOCK_L + offs_l
            valid = pos < end
            valid, k, v = _load_kv(K, V, MASK, b, pos, valid, offs_e, offs_dv, E, DV,
                                   stride_kb, stride_kl, stride_ke, stride_vb, stride_vl,
                                   stride_vd, stride_mb, stride_ml, LAYOUT)
            dk = tl.zeros([BLOCK_L, BLOCK_E], tl.float32)
            dv = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
            for n in range(0, N):
                # Phase 2a: recompute this query's MLP on the tile (M_q is H1 x E work, next to
                # the tile's BLOCK_L x H1 x E dot).
                q = _load_vec(Q + b * stride_qb + n * stride_qn, offs_e, E, stride_qe)
                do = _load_vec(DO + b * stride_gb + n * stride_gn, offs_dv, DV, stride_gd)
                m, c, wac, wd = _first_layer(W1, B1, q, offs_h1, offs_e, H1, E,
                                             stride_w1h, stride_w1e)
                z1 = _units(_mmf(k, tl.trans(m), DOT_PRECISION) + c[None, :], offs_h1, H1)
                h1 = _act_fwd(z1, a10, a11, a12, ACT)
                if TWO_LAYERS:
                    z2 = _units(_mmf(h1, tl.trans(w2), DOT_PRECISION) + b2[None, :], offs_h2, H2)
                    hl = _act_fwd(z2, a20, a21, a22, ACT)
                else:
                    hl = h1
                s = tl.sum(hl * wout[None, :], axis=1) + bout

                # Phase 2b: pooling weights and their gradient ds at each position. An empty
                # row has lse = -inf: shifting by 0 keeps p = exp(-inf) = 0, not NaN.
                dw = tl.sum(v * do[None, :], axis=1)
                if SOFTMAX:
                    lse = tl.load(LSE + b * stride_lb + n * stride_ln).to(tl.float32)
                    delta = tl.load(DELTA + b * stride_db + n * stride_dn).to(tl.float32)
                    lse2 = tl.where(lse == float("-inf"), 0.0, lse * _LOG2E)
                    w = tl.exp2(tl.where(valid, s * _LOG2E, float("-inf")) - lse2)
                    ds = w * (dw - delta)
                else:
                    w = tl.where(valid, s, 0.0)
                    ds = tl.where(valid, dw, 0.0)
                dv += w[:, None] * do[None, :]

                # Phase 2c: back through the MLP; every weight gradient stays in registers.
                g_bo += tl.sum(ds, axis=0)
                g_wo += tl.sum(ds[:, None] * hl, axis=0)
                dh = ds[:, None] * wout[None, :]
                if TWO_LAYERS:
                    dz2, d0, d1, d2 = _act_bwd(z2, dh, a20, a21, a22, ACT)
                    g_a20 += tl.sum(d0, axis=0)
                    g_a21 += tl.sum(d1, axis=0)
                    g_a22 += tl.sum(d2, axis=0)
                    g_w2 += _mmf(tl.trans(dz2), h1, DOT_PRECISION)
                    g_b2 += tl.sum(dz2, axis=0)
                    dh = _mmf(dz2, w2, DOT_PRECISION)
                dz1, d0, d1, d2 = _act_bwd(z1, dh, a10, a11, a12, ACT)
                g_a10 += tl.sum(d0, axis=0)
                g_a11 += tl.sum(d1, axis=0)
                g_a12 += tl.sum(d2, axis=0)

                # Phase 2d: through the first-layer split: dM = dz1^T k, dc = sum_l dz1;
                # dk = dz1 M; dq = (Wa + Wc)^T dc + sum_h dM * Wd.
                dm = _mmf(tl.trans(dz1), k, DOT_PRECISION)
                dc = tl.sum(dz1, axis=0)
                dk += _mmf(dz1, m, DOT_PRECISION)
                g_dm += dm
                g_dmq += dm * q[None, :]
                g_dcq += dc[:, None] * q[None, :]
                g_dc += dc
                dq = tl.sum(wac * dc[:, None], axis=0) + tl.sum(dm * wd, axis=0)
                tl.atomic_add(DQ + b * stride_dqb + n * stride_dqn + offs_e, dq,
                              mask=offs_e < E)

            # Phase 2e: this tile's dK/dV, complete after the query loop; valid positions only.
            # Shared keys/values (value None, Dv = E): one gradient holding both contributions.
            if SHARED_VALUE:
                dk += dv
            tl.store(DK + b * stride_dkb + pos[:, None] * stride_dkl + offs_e[None, :],
                     dk.to(DK.dtype.element_ty), mask=valid[:, None] & (offs_e[None, :] < E))
            if not SHARED_VALUE:
                tl.store(DV_OUT + b * stride_dvb + pos[:, None] * stride_dvl + offs_dv[None, :],
                         dv.to(DV_OUT.dtype.element_ty),
                         mask=valid[:, None] & (offs_dv[None, :] < DV))

    # Phase 3: this program's partial weight gradients (contiguous buffers).
    hh = offs_h1[:, None] < H1
    ee = offs_e[None, :] < E
    o1 = pid * H1 * E + offs_h1[:, None] * E + offs_e[None, :]
    tl.store(P_DM + o1, g_dm, mask=hh & ee)
    tl.store(P_DMQ + o1, g_dmq, mask=hh & ee)
    tl.store(P_DCQ + o1, g_dcq, mask=hh & ee)
    h1_ok = offs_h1 < H1
    tl.store(P_DC + pid * H1 + offs_h1, g_dc, mask=h1_ok)
    a1 = P_DA1 + pid * 3 * H1 + offs_h1
    tl.store(a1, g_a10, mask=h1_ok)
    tl.store(a1 + H1, g_a11, mask=h1_ok)
    tl.store(a1 + 2 * H1, g_a12, mask=h1_ok)
    if TWO_LAYERS:
        h2_ok = offs_h2 < H2
        tl.store(P_DW2 + pid * H2 * H1 + offs_h2[:, None] * H1 + offs_h1[None, :], g_w2,
                 mask=h2_ok[:, None] & h1_ok[None, :])
        tl.store(P_DB2 + pid * H2 + offs_h2, g_b2, mask=h2_ok)
        a2 = P_DA2 + pid * 3 * H2 + offs_h2
        tl.store(a2, g_a20, mask=h2_ok)
        tl.store(a2 + H2, g_a21, mask=h2_ok)
        tl.store(a2 + 2 * H2, g_a22, mask=h2_ok)
        tl.store(P_DWO + pid * H2 + offs_h2, g_wo, mask=h2_ok)
    else:
        tl.store(P_DWO + pid * H1 + offs_h1, g_wo, mask=h1_ok)
    tl.store(P_DBO + pid + tl.arange(0, 1), g_bo)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _block(d: int) -> int:
    """Power-of-two block holding a dimension, at least 16 (tl.dot's minimum M/N/K)."""
    return max(16, triton.next_power_of_2(int(d)))


def _block_l(block_e: int, block_h: int) -> int:
    """Keys per tile: 16 under the interpreter; on the GPU bounded so that the [BLOCK_L, units]
    activations and the key tile stay in registers."""
    if interpret_mode():
        return INTERPRET_BLOCK_L
    widest = max(block_e, block_h)
    return 64 if widest <= 64 else (32 if widest <= 128 else 16)


def _kv_strides(t, jagged):
    """(stride_b, stride_l, stride_d) of a padded [B, L, D] or jagged [T, D] tensor."""
    if jagged:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _act_strides(act):
    return (act.stride(0), act.stride(1)) if act is not None else (0, 0)


def _common(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out, b_out,
            act1, act2, activation):
    if activation not in ACT_CODES:
        raise ValueError("activation must be one of %s, got %r" % (", ".join(ACT_CODES), activation))
    layout, idx, stride_idx, mk, mstr, max_len, L, jagged = _layout_args(
        key, lengths, mask, offsets, max_length)
    B, N, E = query.shape
    Dv = value.shape[-1]
    H1 = w1.shape[0]
    two = w2 is not None
    H2 = w2.shape[0] if two else 1
    dummy = w1
    ptrs = (query, key, value, idx, mk, w1, b1, w2 if two else dummy, b2 if two else dummy,
            w_out, b_out, act1 if act1 is not None else dummy, act2 if act2 is not None else dummy)
    strides = (*query.stride(), *_kv_strides(key, jagged), *_kv_strides(value, jagged),
               stride_idx, *mstr, w1.stride(0), w1.stride(1),
               *((w2.stride(0), w2.stride(1)) if two else (0, 0)), w_out.stride(1),
               *_act_strides(act1), *_act_strides(act2))
    block_e, block_h1 = _block(E), _block(H1)
    block_h2 = _block(H2) if two else 16
    meta = dict(LAYOUT=layout, ACT=ACT_CODES[activation], TWO_LAYERS=two,
                BLOCK_L=_block_l(block_e, max(block_h1, block_h2 if two else 0)),
                BLOCK_E=block_e, BLOCK_DV=_block(Dv), BLOCK_H1=block_h1, BLOCK_H2=block_h2,
                DOT_PRECISION=fp32_dot_precision())
    dims = dict(B=B, N=N, E=E, Dv=Dv, H1=H1, H2=H2, L=L, max_len=max_len, jagged=jagged, two=two)
    return ptrs, strides, meta, dims


def activation_unit_fwd(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                        w_out, b_out, act1, act2, activation: str, softmax: bool):
    """Forward launcher on canonical tensors (any strides; shapes/dtypes checked by the caller,
    index values clamped in-kernel); value None = the keys are the values. Returns
    (out [B, N, Dv] float32, unrounded: the autograd forms delta from it; lse [B, N] float32: the scores' log-sum-exp with softmax,
    -inf on empty rows; 0 without)."""
    if value is None:
        value = key
    ptrs, strides, meta, d = _common(query, key, value, lengths, mask, offsets, max_length, w1,
                                     b1, w2, b2, w_out, b_out, act1, act2, activation)
    B, N = d["B"], d["N"]
    out = torch.empty((B, N, d["Dv"]), dtype=torch.float32, device=query.device)  # unrounded
    lse = torch.empty((B, N), dtype=torch.float32, device=query.device)
    if B == 0 or N == 0:
        return out, lse
    if d["Dv"] == 0 or d["E"] == 0:
        raise ValueError("attnkern: E and Dv must be >= 1")
    _activation_unit_fwd_kernel[(B * N,)](
        *ptrs, out, lse, lse, *strides, *out.stride(), *lse.stride(), 0, 0, 0,
        N, d["L"], d["max_len"], d["E"], d["Dv"], d["H1"], d["H2"],
        SOFTMAX=bool(softmax), **meta)
    return out, lse


def activation_unit_scores_fwd(query, key, lengths, mask, offsets, max_length, w1, b1, w2, b2,
                               w_out, b_out, act1, act2, activation: str, softmax: bool):
    """The forward kernel in its scores mode (attnkern::triton_activation_unit_scores_fwd):
    (scores float32, padded [B, N, L] / jagged [T, N]: raw scores, or with softmax the weights;
    0 at positions outside every row and on empty rows; lse [B, N] float32 as the forward's)."""
    # One key column stands in for the values, which this mode never reads.
    ptrs, strides, meta, d = _common(query, key, key[..., :1], lengths, mask, offsets, max_length, w1,
                                     b1, w2, b2, w_out, b_out, act1, act2, activation)
    B, N = d["B"], d["N"]
    shape = (key.shape[0], N) if d["jagged"] else (B, N, key.shape[1])
    scores = torch.zeros(shape, dtype=torch.float32, device=query.device)
    lse = torch.empty((B, N), dtype=torch.float32, device=query.device)
    if B == 0 or N == 0 or scores.numel() == 0:
        lse.fill_(float("-inf") if softmax else 0.0)
        return scores, lse
    s_strides = (0, scores.stride(1), scores.stride(0)) if d["jagged"] else scores.stride()
    _activation_unit_fwd_kernel[(B * N,)](
        *ptrs, lse, lse, scores, *strides, 0, 0, 0, *lse.stride(), *s_strides,
        N, d["L"], d["max_len"], d["E"], 1, d["H1"], d["H2"],
        SOFTMAX=bool(softmax), SCORES=True, **meta)
    return scores, lse


def bwd_num_programs(B: int, device: torch.device) -> int:
    """Backward programs: enough to fill the GPU a few times over, never more than rows."""
    if device.type != "cuda":
        return max(1, min(B, INTERPRET_BWD_PROGRAMS))
    return max(1, min(B, BWD_PROGRAMS_PER_SM * sm_count(device)))


def activation_unit_bwd(grad_out, query, key, value, lengths, mask, offsets, max_length, w1, b1,
                        w2, b2, w_out, b_out, act1, act2, activation: str, softmax: bool, lse,
                        delta, *, num_programs: Optional[int] = None):
    """Backward launcher: the 11 gradients of the registered backward op (query, key, value, w1,
    b1, w2, b2, w_out, b_out, act1, act2), each shaped like its input and in its dtype; those of
    absent optional inputs are empty [0] tensors. dK/dV are exactly zero at every position of no
    row. delta [B, N] = sum_d grad_out * out (read only with softmax). value None: the keys are
    the values; grad_key then holds both contributions and grad_value is empty [0]."""
    shared = value is None
    if shared:
        value = key
    ptrs, strides, meta, d = _common(query, key, value, lengths, mask, offsets, max_length, w1,
                                     b1, w2, b2, w_out, b_out, act1, act2, activation)
    B, N, E, H1, H2, two = d["B"], d["N"], d["E"], d["H1"], d["H2"], d["two"]
    dev, dt = query.device, query.dtype
    dq32 = torch.zeros((B, N, E), dtype=torch.float32, device=dev)
    dk = torch.zeros(key.shape, dtype=key.dtype, device=dev)
    # With shared keys/values grad_value is never written: a dummy of one element stands in.
    dv = torch.zeros((1,) * value.dim() if shared else value.shape, dtype=value.dtype, device=dev)
    G = num_programs if num_programs is not None else bwd_num_programs(B, dev)
    G = max(1, int(G))
    f32 = dict(dtype=torch.float32, device=dev)
    hl = H2 if two else H1
    p_dm = torch.zeros((G, H1, E), **f32)
    p_dmq = torch.zeros((G, H1, E), **f32)
    p_dcq = torch.zeros((G, H1, E), **f32)
    p_dc = torch.zeros((G, H1), **f32)
    p_dw2 = torch.zeros((G, H2, H1) if two else (1,), **f32)
    p_db2 = torch.zeros((G, H2) if two else (1,), **f32)
    p_dwo = torch.zeros((G, hl), **f32)
    p_dbo = torch.zeros((G,), **f32)
    p_da1 = torch.zeros((G, 3, H1), **f32)
    p_da2 = torch.zeros((G, 3, H2) if two else (1,), **f32)
    if B > 0 and N > 0:
        dkj, dvj = d["jagged"], d["jagged"]
        dk_str = (0, dk.stride(0)) if dkj else (dk.stride(0), dk.stride(1))
        dv_str = (0, dv.stride(0)) if dvj else (dv.stride(0), dv.stride(1))
        _activation_unit_bwd_kernel[(G,)](
            *ptrs, grad_out, lse, delta, dq32, dk, dv,
            p_dm, p_dmq, p_dcq, p_dc, p_dw2, p_db2, p_dwo, p_dbo, p_da1, p_da2,
            *strides, *grad_out.stride(), *lse.stride(), *delta.stride(),
            dq32.stride(0), dq32.stride(1), *dk_str, *dv_str,
            B, N, d["L"], d["max_len"], E, d["Dv"], H1, H2, G,
            SOFTMAX=bool(softmax), SHARED_VALUE=shared, num_warps=BWD_NUM_WARPS, **meta)
    # The partials summed over programs in a fixed order (deterministic), then the first
    # layer's four column blocks from the split: dWa = DCQ, dWb = DM, dWc = DCQ - DM, dWd = DMQ.
    dm, dmq, dcq = p_dm.sum(0), p_dmq.sum(0), p_dcq.sum(0)
    gw1 = torch.cat([dcq, dm, dcq - dm, dmq], dim=1).to(w1.dtype)
    gb1 = p_dc.sum(0).to(b1.dtype)
    empty = query.new_empty((0,))
    if two:
        gw2, gb2 = p_dw2.sum(0).to(w2.dtype), p_db2.sum(0).to(b2.dtype)
    else:
        gw2, gb2 = empty, empty.clone()
    gwo = p_dwo.sum(0).reshape(w_out.shape).to(w_out.dtype)
    gbo = p_dbo.sum(0).reshape(b_out.shape).to(b_out.dtype)
    ga1 = p_da1.sum(0)[: act1.shape[0]].to(act1.dtype) if act1 is not None else empty.clone()
    ga2 = (p_da2.sum(0)[: act2.shape[0]].to(act2.dtype)
           if (act2 is not None and two) else empty.clone())
    if shared:
        dv = empty.clone()
    return dq32.to(dt), dk, dv, gw1, gb1, gw2, gb2, gwo, gbo, ga1, ga2
