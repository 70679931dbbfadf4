"""Triton kernels of sequence self-attention (each position of a row attends positions of the
same row), forward and backward, FlashAttention-2 style.

Canonical layout (the op layer normalises padded inputs to it by a reshape):

    query [T, H, Dk], key [T, Hkv, Dk], value [T, Hkv, Dv] (H a multiple of Hkv), offsets [B + 1];
    row b is tokens [offsets[b], offsets[b] + n_b) with n_b = offsets[b + 1] - offsets[b], or
    min(that, lengths[b]) when lengths are given (a padded [B, L] batch as [B * L] tokens).

Mask (i = query, j = key: positions within the row) as generative-recommenders' hstu_mha
reference builds it: ids id(p) = p, or max(p - contextual_len + 1, 0) with a contextual
prefix, clamped to max_id = n - num_targets (- contextual_len + 1); dist = id(i) - id(j)
(|dist| unless causal); allowed when i == j or dist > 0, and dist <= max_attn_len when
max_attn_len > 0; with a contextual prefix also whenever id(i) == 0 and id(j) < max_id.
Positions outside the row are never read.

Scores s_ij = scale * <q_i, k_j> + position_table[clamp(i - j, 0, P - 1), h]
+ time_table[bucket(query_times_i - key_times_j), h] + bias[b, h, i, j]; the bucket is
floor(ln(max(|dt|, 1)) / 0.301) ("log") or floor(sqrt(max(|dt|, 1))) ("sqrt"), clamped to
[0, NB - 1]. Softmax: out_i = sum_j softmax(s_i)_j v_j (lse written; a query with nothing to
attend gives 0 and lse = -inf). SiLU: out_i = sum_j silu(s_ij) * attn_scale_i * v_j.

Kernels:
    _seq_fwd_kernel    one program per (query block, row, head): loops over the key blocks the
                       block can attend (causal/window blocks skipped, not masked)
    _seq_bwd_dq_kernel one program per (query block, row, head): dq, the dense bias gradient
                       (each element written once), and per-program partial sums of the
                       gradients of the time table (one vector per program) and of the position
                       table (one diagonal band per key tile), reduced afterwards in a fixed order
    _seq_bwd_dkdv_kernel one program per (key block, row, K/V head): dk, dv, looping over the
                       query heads sharing that K/V head and the query blocks that attend it
No float atomics: every output element is written by one program; the backward is deterministic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_pool import _finite_or_zero, _mm, fp32_dot_precision, head_block, interpret_mode, native_dot

_LOG2E = tl.constexpr(1.4426950408889634)
# Largest time table whose gradient one program keeps as a register vector.
MAX_TIME_BUCKETS = 4096


# ----------------------------------------------------------------------------------------------
# Kernel helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row(STARTS, LENS, NT, b, T, MAX_LEN, HAS_TARGETS: tl.constexpr):
    """(first token, length, number of targets) of row b, clamped so that nothing outside
    [0, T) is read and no row is longer than MAX_LEN."""
    start = tl.minimum(tl.maximum(tl.load(STARTS + b).to(tl.int64), 0), T)
    n = tl.minimum(tl.maximum(tl.load(LENS + b).to(tl.int64), 0), T - start)
    n = tl.minimum(n, MAX_LEN)
    nt = n * 0
    if HAS_TARGETS:
        nt = tl.minimum(tl.maximum(tl.load(NT + b).to(tl.int64), 0), n)
    return start, n.to(tl.int32), nt.to(tl.int32)


@triton.jit
def _allowed(offs_m, offs_n, n, nt, CTX, WIN, CAUSAL: tl.constexpr):
    """[M, N] bool: which (query, key) pairs attend (the module docstring's mask)."""
    if CTX > 0:
        max_id = n - nt - CTX + 1
        id_m = tl.maximum(offs_m - CTX + 1, 0)
        id_n = tl.maximum(offs_n - CTX + 1, 0)
    else:
        max_id = n - nt
        id_m = offs_m
        id_n = offs_n
    id_m = tl.minimum(id_m, max_id)
    id_n = tl.minimum(id_n, max_id)
    dist = id_m[:, None] - id_n[None, :]
    if not CAUSAL:
        dist = tl.abs(dist)
    ok = (offs_m[:, None] == offs_n[None, :]) | (dist > 0)
    if WIN > 0:
        ok = ok & (dist <= WIN)
    if CTX > 0:
        ok = ok | ((id_m[:, None] == 0) & (id_n[None, :] < max_id))
    return ok & (offs_m < n)[:, None] & (offs_n < n)[None, :]


@triton.jit
def _key_blocks(q0, n, nt, CTX, WIN, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key blocks a query block [q0, q0 + BLOCK_M) may attend: the prefix blocks [0, pre)
    (the contextual positions, attended from any distance) and [lo, hi). A superset: the
    mask decides per element."""
    lo = q0 * 0
    hi = n
    if CAUSAL:
        hist_end = n - nt
        hi = tl.minimum(q0 + BLOCK_M, n)
        if q0 < CTX:  # contextual queries attend the whole history
            hi = tl.maximum(hi, hist_end)
        elif WIN > 0:  # targets attend as if at hist_end
            lo = tl.maximum(tl.minimum(q0, hist_end) - WIN, 0)
    lo_b = lo // BLOCK_N
    pre = tl.minimum(tl.cdiv(CTX, BLOCK_N), lo_b)
    return pre, lo_b, tl.cdiv(hi, BLOCK_N)


@triton.jit
def _query_blocks(k0, n, nt, CTX, WIN, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Query blocks that may attend the key block [k0, k0 + BLOCK_N): [0, pre) (contextual
    queries attend every history position) and [lo, hi). A superset, as _key_blocks."""
    lo = k0 * 0
    hi = n
    if CAUSAL:
        hist_end = n - nt
        lo = k0
        if (WIN > 0) & (k0 >= CTX):
            k_last = tl.minimum(k0 + BLOCK_N, n) - 1
            if k_last + WIN < hist_end:
                hi = k_last + WIN + 1
    lo_b = lo // BLOCK_M
    pre = tl.minimum(tl.cdiv(CTX, BLOCK_M), lo_b)
    return pre, lo_b, tl.cdiv(hi, BLOCK_M)


@triton.jit
def _time_bucket(QT, KT, BOUNDS, start, offs_m, offs_n, n, NB, LOG_NB: tl.constexpr):
    """bucket(query_times_i - key_times_j) = the number of BOUNDS [NB - 1] (non-decreasing
    |dt| thresholds of the bucket function) that are <= |dt|: a binary search, so the bucket
    is exactly the reference's, boundaries included, with no logarithm in the kernel."""
    tq = tl.load(QT + start + offs_m, mask=offs_m < n, other=0).to(tl.int64)
    tk = tl.load(KT + start + offs_n, mask=offs_n < n, other=0).to(tl.int64)
    dt = tl.abs(tq[:, None] - tk[None, :])
    bkt = tl.zeros(dt.shape, tl.int32)
    for i in tl.static_range(LOG_NB):
        cand = bkt + (1 << (LOG_NB - 1 - i))
        inside = cand <= NB - 1
        bound = tl.load(BOUNDS + (cand - 1), mask=inside, other=0)
        bkt = tl.where(inside & (bound <= dt), cand, bkt)
    return bkt


@triton.jit
def _logits(q, k, b, h, start, offs_m, offs_n, n, nt, CTX, WIN, scale,
            QT, KT, TT, BOUNDS, PT, BIAS, NB, P,
            stride_ttb, stride_tth, stride_ptp, stride_pth,
            stride_bb, stride_bh, stride_bi, stride_bj,
            CAUSAL: tl.constexpr, HAS_TIME: tl.constexpr, LOG_NB: tl.constexpr,
            HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr,
            DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """(s [M, N] float32 with every bias added, which pairs attend). Biases are read only
    where a pair attends."""
    s = _mm(q, tl.trans(k), True, DOT_PRECISION, NATIVE_DOT) * scale
    ok = _allowed(offs_m, offs_n, n, nt, CTX, WIN, CAUSAL)
    if HAS_POS:
        rel = tl.minimum(tl.abs(offs_m[:, None] - offs_n[None, :]), P - 1)
        s += tl.load(PT + rel * stride_ptp + h * stride_pth, mask=ok, other=0.0).to(tl.float32)
    if HAS_TIME:
        bkt = _time_bucket(QT, KT, BOUNDS, start, offs_m, offs_n, n, NB, LOG_NB)
        s += tl.load(TT + bkt * stride_ttb + h * stride_tth, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(BIAS + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bi
                     + offs_n[None, :] * stride_bj, mask=ok, other=0.0).to(tl.float32)
    return s, ok


@triton.jit
def _silu_parts(s):
    """(silu(s), silu'(s))."""
    sig = tl.sigmoid(s)
    return s * sig, sig * (1.0 + s * (1.0 - sig))


@triton.jit
def _load_tokens(base, start, offs, n, offs_d, stride_t, stride_d, D):
    return tl.load(base + (start + offs[:, None]) * stride_t + offs_d[None, :] * stride_d,
                   mask=(offs < n)[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _query_scale(AS, as_value, start, offs_m, n, AS_PER_TOKEN: tl.constexpr):
    """attn_scale of each query (SiLU): per token, or one value."""
    if AS_PER_TOKEN:
        a = tl.load(AS + start + offs_m, mask=offs_m < n, other=0.0).to(tl.float32)
    else:
        a = tl.zeros([offs_m.shape[0]], tl.float32) + as_value
    return a


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _seq_fwd_kernel(
    Q, K, V, STARTS, LENS, NT, QT, KT, TT, BOUNDS, PT, AS, BIAS, OUT, LSE,
    scale, as_value,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ttb, stride_tth, stride_ptp, stride_pth,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
    T, H_PER_KV, MAX_LEN, CTX, WIN, NB, P, DK, DV,
    CAUSAL: tl.constexpr, SILU: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_TIME: tl.constexpr, LOG_NB: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, AS_PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    mb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start, n, nt = _row(STARTS, LENS, NT, b, T, MAX_LEN, HAS_TARGETS)
    q0 = mb * BLOCK_M
    if q0 >= n:
        return
    kvh = h // H_PER_KV
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tokens(Q + h * stride_qh, start, offs_m, n, offs_dk, stride_qt, stride_qd, DK)
    if SILU:
        a_i = _query_scale(AS, as_value, start, offs_m, n, AS_PER_TOKEN)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    pre, lo_b, hi_b = _key_blocks(q0, n, nt, CTX, WIN, CAUSAL, BLOCK_M, BLOCK_N)
    for t in range(0, pre + hi_b - lo_b):
        kb = tl.where(t < pre, t, t - pre + lo_b)
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tokens(K + kvh * stride_kh, start, offs_n, n, offs_dk, stride_kt, stride_kd, DK)
        v = _load_tokens(V + kvh * stride_vh, start, offs_n, n, offs_dv, stride_vt, stride_vd, DV)
        s, ok = _logits(q, k, b, h, start, offs_m, offs_n, n, nt, CTX, WIN, scale,
                        QT, KT, TT, BOUNDS, PT, BIAS, NB, P, stride_ttb, stride_tth, stride_ptp,
                        stride_pth, stride_bb, stride_bh, stride_bi, stride_bj,
                        CAUSAL, HAS_TIME, LOG_NB, HAS_POS, HAS_BIAS, DOT_PRECISION, NATIVE_DOT)
        if SILU:
            act, _ = _silu_parts(s)
            p = tl.where(ok, act * a_i[:, None], 0.0)
            acc += _mm(p, v, True, DOT_PRECISION, NATIVE_DOT)
        else:
            # Online softmax in natural units; only s - max goes to base 2 (as the target
            # attention kernels).
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_shift = _finite_or_zero(m_new)
            alpha = tl.exp2((m_i - m_shift) * _LOG2E)
            p = tl.exp2((s - m_shift[:, None]) * _LOG2E)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p, v, True, DOT_PRECISION, NATIVE_DOT)
            m_i = m_new

    m_ok = offs_m < n
    if SILU:
        lse = tl.zeros([BLOCK_M], tl.float32)
    else:
        empty = l_i == 0.0
        acc = acc * tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))[:, None]
        lse = tl.where(empty, float("-inf"), _finite_or_zero(m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (start + offs_m) * stride_lt + h * stride_lh, lse, mask=m_ok)
    tl.store(OUT + (start + offs_m[:, None]) * stride_ot + h * stride_oh + offs_dv[None, :] * stride_od,
             acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _seq_bwd_dq_kernel(
    Q, K, V, STARTS, LENS, NT, QT, KT, TT, BOUNDS, PT, AS, BIAS, DO, LSE, DELTA, DQ, DBIAS, TG, PG,
    scale, as_value,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ttb, stride_tth, stride_ptp, stride_pth,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_gt, stride_gh, stride_gd, stride_lt, stride_lh,
    stride_dqt, stride_dqh, stride_dqd,
    stride_dbb, stride_dbh, stride_dbi, stride_dbj,
    stride_tgb, stride_tgm, stride_tgh,
    stride_pgb, stride_pgm, stride_pgh, stride_pgd,
    T, H_PER_KV, MAX_LEN, CTX, WIN, NB, P, DK, DV, DMAX,
    CAUSAL: tl.constexpr, SILU: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_TIME: tl.constexpr, LOG_NB: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, AS_PER_TOKEN: tl.constexpr,
    BIAS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, POS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_NB: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """dq = scale * sum_j ds_ij k_j, with ds = dL/ds_ij (the gradient of every bias too).

    Table gradients as partial sums, no atomics: TG [B, M blocks, H, NB] holds this program's
    sum of ds per time bucket; PG [B, M blocks, H, 2 * DMAX + 2, 2 * BLOCK_N] the sum of ds
    along each diagonal i - j of each key tile within DMAX tiles of the diagonal (index
    mb - kb + DMAX; slot d <-> i - j = (q0 - k0) - BLOCK_N + d), and at index 2 * DMAX + 1,
    slot 0, the sum over the tiles whose every pair lies on the table's last row (beyond
    DMAX tiles every pair does). The launcher folds them onto the position table."""
    mb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start, n, nt = _row(STARTS, LENS, NT, b, T, MAX_LEN, HAS_TARGETS)
    q0 = mb * BLOCK_M
    if q0 >= n:
        return
    kvh = h // H_PER_KV
    offs_m = q0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < n
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tokens(Q + h * stride_qh, start, offs_m, n, offs_dk, stride_qt, stride_qd, DK)
    do = _load_tokens(DO + h * stride_gh, start, offs_m, n, offs_dv, stride_gt, stride_gd, DV)
    if SILU:
        a_i = _query_scale(AS, as_value, start, offs_m, n, AS_PER_TOKEN)
    else:
        lse = tl.load(LSE + (start + offs_m) * stride_lt + h * stride_lh, mask=m_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + (start + offs_m) * stride_lt + h * stride_lh, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    offs_nb = tl.arange(0, BLOCK_NB)
    tg = tl.zeros([BLOCK_NB], tl.float32)
    offs_band = tl.arange(0, 2 * BLOCK_N)
    far = tl.zeros([2 * BLOCK_N], tl.float32)

    pre, lo_b, hi_b = _key_blocks(q0, n, nt, CTX, WIN, CAUSAL, BLOCK_M, BLOCK_N)
    for t in range(0, pre + hi_b - lo_b):
        kb = tl.where(t < pre, t, t - pre + lo_b)
        k0 = kb * BLOCK_N
        offs_n = k0 + tl.arange(0, BLOCK_N)
        k = _load_tokens(K + kvh * stride_kh, start, offs_n, n, offs_dk, stride_kt, stride_kd, DK)
        v = _load_tokens(V + kvh * stride_vh, start, offs_n, n, offs_dv, stride_vt, stride_vd, DV)
        s, ok = _logits(q, k, b, h, start, offs_m, offs_n, n, nt, CTX, WIN, scale,
                        QT, KT, TT, BOUNDS, PT, BIAS, NB, P, stride_ttb, stride_tth, stride_ptp,
                        stride_pth, stride_bb, stride_bh, stride_bi, stride_bj,
                        CAUSAL, HAS_TIME, LOG_NB, HAS_POS, HAS_BIAS, DOT_PRECISION, NATIVE_DOT)
        dp = _mm(do, tl.trans(v), True, DOT_PRECISION, NATIVE_DOT)
        if SILU:
            _, dact = _silu_parts(s)
            ds = tl.where(ok, dp * a_i[:, None] * dact, 0.0)
        else:
            p = tl.where(ok, tl.exp2((s - lse[:, None]) * _LOG2E), 0.0)
            ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, True, DOT_PRECISION, NATIVE_DOT)
        if BIAS_GRAD:
            tl.store(DBIAS + b * stride_dbb + h * stride_dbh + offs_m[:, None] * stride_dbi
                     + offs_n[None, :] * stride_dbj, ds,
                     mask=m_ok[:, None] & (offs_n < n)[None, :])
        if TIME_GRAD:
            bkt = _time_bucket(QT, KT, BOUNDS, start, offs_m, offs_n, n, NB, LOG_NB)
            lo_bkt = tl.min(tl.where(ok, bkt, NB), axis=None)
            hi_bkt = tl.max(tl.where(ok, bkt, -1), axis=None)
            for nb in range(lo_bkt, hi_bkt + 1):
                part = tl.sum(tl.where(ok & (bkt == nb), ds, 0.0), axis=None)
                tg = tl.where(offs_nb == nb, tg + part, tg)
        if POS_GRAD:
            rel = offs_m[:, None] - offs_n[None, :]
            lo_rel = tl.min(tl.where(ok, rel, 2147483647), axis=None)
            hi_rel = tl.max(tl.where(ok, rel, -2147483647), axis=None)
            if lo_rel <= hi_rel:
                dlt = mb - kb
                if (dlt > DMAX) | (dlt < -DMAX) | (lo_rel >= P - 1) | (hi_rel <= 1 - P):
                    # Every pair of the tile is on table row P - 1 (or row 0 when P = 1):
                    # one sum, into this program's far total.
                    far = tl.where(offs_band == 0, far + tl.sum(tl.where(ok, ds, 0.0), axis=None), far)
                else:
                    # The tile skewed so that its diagonals become columns: slot d of query
                    # row il holds key column jl = il + BLOCK_N - d (i - j = (q0 - k0) -
                    # BLOCK_N + d).
                    col = tl.arange(0, BLOCK_M)[:, None] + BLOCK_N - offs_band[None, :]
                    inside = (col >= 0) & (col < BLOCK_N)
                    skew = tl.gather(tl.where(ok, ds, 0.0),
                                     tl.minimum(tl.maximum(col, 0), BLOCK_N - 1), axis=1)
                    band = tl.sum(tl.where(inside, skew, 0.0), axis=0)
                    tl.store(PG + b * stride_pgb + mb * stride_pgm + h * stride_pgh
                             + (dlt + DMAX) * stride_pgd + offs_band, band)

    if POS_GRAD:
        tl.store(PG + b * stride_pgb + mb * stride_pgm + h * stride_pgh
                 + (2 * DMAX + 1) * stride_pgd + offs_band, far)
    dq = dq * scale
    tl.store(DQ + (start + offs_m[:, None]) * stride_dqt + h * stride_dqh + offs_dk[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_dk[None, :] < DK))
    if TIME_GRAD:
        tl.store(TG + b * stride_tgb + mb * stride_tgm + h * stride_tgh + offs_nb, tg)


@triton.jit
def _seq_bwd_dkdv_kernel(
    Q, K, V, STARTS, LENS, NT, QT, KT, TT, BOUNDS, PT, AS, BIAS, DO, LSE, DELTA, DK_OUT, DV_OUT,
    scale, as_value,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ttb, stride_tth, stride_ptp, stride_pth,
    stride_bb, stride_bh, stride_bi, stride_bj,
    stride_gt, stride_gh, stride_gd, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dkd, stride_dvt, stride_dvh, stride_dvd,
    T, H_PER_KV, MAX_LEN, CTX, WIN, NB, P, DK, DV,
    CAUSAL: tl.constexpr, SILU: tl.constexpr,
    HAS_TARGETS: tl.constexpr, HAS_TIME: tl.constexpr, LOG_NB: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_BIAS: tl.constexpr, AS_PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """dk, dv of one key block of one row and K/V head: sums over the query heads sharing
    that K/V head and the query blocks that attend the block, in a fixed order."""
    nb_ = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kvh = tl.program_id(2).to(tl.int64)
    start, n, nt = _row(STARTS, LENS, NT, b, T, MAX_LEN, HAS_TARGETS)
    k0 = nb_ * BLOCK_N
    if k0 >= n:
        return
    offs_n = k0 + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tokens(K + kvh * stride_kh, start, offs_n, n, offs_dk, stride_kt, stride_kd, DK)
    v = _load_tokens(V + kvh * stride_vh, start, offs_n, n, offs_dv, stride_vt, stride_vd, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    pre, lo_b, hi_b = _query_blocks(k0, n, nt, CTX, WIN, CAUSAL, BLOCK_M, BLOCK_N)
    for hh in range(0, H_PER_KV):
        h = kvh * H_PER_KV + hh
        for t in range(0, pre + hi_b - lo_b):
            mb = tl.where(t < pre, t, t - pre + lo_b)
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < n
            q = _load_tokens(Q + h * stride_qh, start, offs_m, n, offs_dk, stride_qt, stride_qd, DK)
            do = _load_tokens(DO + h * stride_gh, start, offs_m, n, offs_dv, stride_gt, stride_gd, DV)
            s, ok = _logits(q, k, b, h, start, offs_m, offs_n, n, nt, CTX, WIN, scale,
                            QT, KT, TT, BOUNDS, PT, BIAS, NB, P, stride_ttb, stride_tth, stride_ptp,
                            stride_pth, stride_bb, stride_bh, stride_bi, stride_bj,
                            CAUSAL, HAS_TIME, LOG_NB, HAS_POS, HAS_BIAS, DOT_PRECISION,
                            NATIVE_DOT)
            dp = _mm(do, tl.trans(v), True, DOT_PRECISION, NATIVE_DOT)
            if SILU:
                a_i = _query_scale(AS, as_value, start, offs_m, n, AS_PER_TOKEN)
                act, dact = _silu_parts(s)
                p = tl.where(ok, act * a_i[:, None], 0.0)
                ds = tl.where(ok, dp * a_i[:, None] * dact, 0.0)
            else:
                lse = tl.load(LSE + (start + offs_m) * stride_lt + h * stride_lh, mask=m_ok, other=0.0)
                lse = tl.where(lse == float("-inf"), 0.0, lse)
                delta = tl.load(DELTA + (start + offs_m) * stride_lt + h * stride_lh, mask=m_ok,
                                other=0.0)
                p = tl.where(ok, tl.exp2((s - lse[:, None]) * _LOG2E), 0.0)
                ds = p * (dp - delta[:, None])
            dv += _mm(tl.trans(p), do, True, DOT_PRECISION, NATIVE_DOT)
            dk += _mm(tl.trans(ds), q, True, DOT_PRECISION, NATIVE_DOT)

    n_ok = offs_n < n
    dk = dk * scale
    tl.store(DK_OUT + (start + offs_n[:, None]) * stride_dkt + kvh * stride_dkh + offs_dk[None, :] * stride_dkd,
             dk.to(DK_OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_dk[None, :] < DK))
    tl.store(DV_OUT + (start + offs_n[:, None]) * stride_dvt + kvh * stride_dvh + offs_dv[None, :] * stride_dvd,
             dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Interpreter tiles: a row of a few dozen positions still crosses tiles, while the interpreter's
# per-operation cost stays low (tests/test_sequence_attention_triton.py pins 16 to reach the
# skipped blocks of short rows).
INTERPRET_BLOCK = 32


def launch_config(dtype: torch.dtype, block_dk: int, block_dv: int):
    """(BLOCK_M = BLOCK_N, num_warps by kernel (fwd | dq | dkdv), num_stages). One square
    tile: the position-gradient fold (fold_position_grad) relies on BLOCK_M == BLOCK_N. Chosen
    on sm_90 compiles with every feature on (python -m attnkern.triton_kernels.sequence_aot;
    not yet timed on a GPU): 16-bit inputs take 32 x 32 tiles up to 64-wide heads (64 x 64
    tiles spill even without any bias) and 8 warps for dq (whose table gradients spill 4),
    16 x 16 tiles above; float32's FMA dot 16 x 16 tiles."""
    if interpret_mode():
        return INTERPRET_BLOCK, dict(fwd=4, dq=4, dkdv=4), 1
    if dtype == torch.float32 or max(block_dk, block_dv) > 64:
        return 16, dict(fwd=4, dq=4, dkdv=4), 2
    return 32, dict(fwd=4, dq=8, dkdv=4), 2


# .maxnreg per kernel: ptxas left to itself caps the forward and dq kernels at 128 registers
# and spills (float32); the dk/dv kernel spills more with the cap lifted.
MAXNREG = {"fwd": 255, "dq": 255, "dkdv": None}


def row_grid_length(lens: torch.Tensor, max_length: int) -> int:
    """Longest row, for the grid: max_length when known (>= 0; no device sync), else read."""
    if max_length >= 0:
        return int(max_length)
    if lens.numel() == 0:
        return 0
    return int(lens.max().clamp_min(0).item())


class _Call:
    """The kernels' shared arguments (pointers, strides, sizes, constexpr flags) of one call on
    the canonical arguments (docstring of sequence_attention_fwd)."""

    def __init__(self, query, key, value, starts, lens, max_length, num_targets, contextual_len,
                 max_attn_len, causal, silu, scale, attn_scale, attn_scale_value, query_times,
                 key_times, time_table, time_bounds, position_table, bias):
        T, H, Dk = query.shape
        Hkv, Dv = key.shape[1], value.shape[-1]
        self.T, self.H, self.Hkv, self.Dk, self.Dv = T, H, Hkv, Dk, Dv
        self.B = starts.shape[0]
        self.L = row_grid_length(lens, int(max_length))
        if silu and attn_scale is None and attn_scale_value is None:
            attn_scale_value = 1.0 / max(self.L, 1)
        self.as_value = float(attn_scale_value) if attn_scale_value is not None else 0.0
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(Dk)
        dummy = starts
        has_time = time_table is not None

        def opt(t):
            return t if t is not None else dummy

        self.tensors = (query, key, value, starts, lens, opt(num_targets),
                        query_times if has_time else dummy, key_times if has_time else dummy,
                        opt(time_table), time_bounds if has_time else dummy, opt(position_table),
                        opt(attn_scale), opt(bias))

        def table_strides(t):  # [rows, Hb]: head stride 0 when one column serves every head
            if t is None:
                return (0, 0)
            return (t.stride(0), t.stride(1) if t.shape[1] > 1 else 0)

        bias_strides = (0, 0, 0, 0) if bias is None else (
            bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0, bias.stride(2), bias.stride(3))
        self.strides = (*query.stride(), *key.stride(), *value.stride(),
                        *table_strides(time_table), *table_strides(position_table), *bias_strides)
        self.NB = time_table.shape[0] if has_time else 1
        self.P = position_table.shape[0] if position_table is not None else 1
        # Rows are never longer than the bias's L (it is indexed by position).
        max_len = min(self.L, bias.shape[-1]) if bias is not None else self.L
        self.sizes = (T, H // Hkv, max_len, int(contextual_len), int(max_attn_len), self.NB,
                      self.P, Dk, Dv)
        block_dk, block_dv = head_block(Dk), head_block(Dv)
        self.block, warps, stages = launch_config(query.dtype, block_dk, block_dv)
        self.flags = dict(CAUSAL=bool(causal), SILU=bool(silu),
                          HAS_TARGETS=num_targets is not None, HAS_TIME=has_time,
                          LOG_NB=max(1, (self.NB - 1).bit_length()),
                          HAS_POS=position_table is not None, HAS_BIAS=bias is not None,
                          AS_PER_TOKEN=attn_scale is not None)
        self.meta = dict(BLOCK_M=self.block, BLOCK_N=self.block, BLOCK_DK=block_dk,
                         BLOCK_DV=block_dv, DOT_PRECISION=fp32_dot_precision(),
                         NATIVE_DOT=native_dot(query.dtype), num_stages=stages)
        self.warps = warps
        self.num_blocks = triton.cdiv(max(max_len, 1), self.block)
        self.empty = self.B == 0 or max_len <= 0 or T == 0

    def launch(self, kernel: str) -> dict:
        """The constexprs and launch options of `kernel` (fwd | dq | dkdv)."""
        return dict(self.flags, **self.meta, num_warps=self.warps[kernel], maxnreg=MAXNREG[kernel])


def sequence_attention_fwd(query, key, value, starts, lens, max_length, num_targets=None,
                           contextual_len=0, max_attn_len=0, causal=True, silu=False, scale=None,
                           attn_scale=None, attn_scale_value=None, query_times=None,
                           key_times=None, time_table=None, time_bounds=None,
                           position_table=None, bias=None):
    """Forward launcher on the canonical arguments (any strides; assumed checked):

    query [T, H, Dk], key [T, Hkv, Dk], value [T, Hkv, Dv]; row b is tokens
    [starts[b], starts[b] + lens[b]) (int64 [B]); max_length >= every length, or -1 (read);
    num_targets [B] or None; attn_scale [T] float32 or None, attn_scale_value a float or None
    (SiLU; neither: 1 / max_length); query_times/key_times [T] int64; time_table [NB, Hb] with
    time_bounds [NB - 1] int64 (bucket(dt) = #bounds <= |dt|); position_table [P, Hb];
    bias [B, Hb, L, L].

    Returns (out [T, H, Dv] float32, lse [T, H] float32): lse is -inf for a query with nothing
    to attend (softmax), 0 with SiLU, and out 0 / lse -inf at tokens of no row."""
    c = _Call(query, key, value, starts, lens, max_length, num_targets, contextual_len,
              max_attn_len, causal, silu, scale, attn_scale, attn_scale_value, query_times,
              key_times, time_table, time_bounds, position_table, bias)
    out = torch.zeros((c.T, c.H, c.Dv), dtype=torch.float32, device=query.device)
    lse = torch.full((c.T, c.H), float("-inf"), dtype=torch.float32, device=query.device)
    if not c.empty:
        _seq_fwd_kernel[(c.num_blocks, c.B, c.H)](
            *c.tensors, out, lse, c.scale, c.as_value, *c.strides, *out.stride(), *lse.stride(),
            *c.sizes, **c.launch("fwd"))
    return out, lse


def band_tiles(P: int, block: int, num_blocks: int) -> int:
    """DMAX: the tile diagonals mb - kb beyond +-DMAX have every pair on the position table's
    last row (|i - j| >= DMAX * block + 1 > P - 1), so they need no band of their own."""
    return min(num_blocks - 1, P // block + 1)


def fold_position_grad(pg: torch.Tensor, P: int, block: int) -> torch.Tensor:
    """The position table's gradient per head [P, H] from the dq kernel's partial sums
    pg [B, M, H, 2 * DMAX + 2, 2 * block], added in a fixed order.

    Band index mb - kb + DMAX, slot d holds i - j = (mb - kb - 1) * block + d: its first half
    lies in the chunk [(mb - kb - 1) * block, (mb - kb) * block) of i - j, its second half in
    the next chunk. Index 2 * DMAX + 1, slot 0: pairs on the last row."""
    band = pg.sum(dim=(0, 1))  # [H, 2 * DMAX + 2, 2 * block]
    far = band[:, -1, 0]
    band = band[:, :-1]
    H, dmax = band.shape[0], (band.shape[1] - 1) // 2
    chunks = torch.zeros((H, band.shape[1] + 1, block), dtype=torch.float32, device=pg.device)
    chunks[:, :-1] += band[:, :, :block]
    chunks[:, 1:] += band[:, :, block:]
    flat = chunks.reshape(H, -1)
    # chunk e starts at i - j = (e - DMAX - 1) * block
    rel = torch.arange(flat.shape[1], device=pg.device) - (dmax + 1) * block
    row = rel.abs().clamp_max(P - 1)
    grad = torch.zeros((H, P), dtype=torch.float32, device=pg.device)
    # Each sign's rows below P - 1 are distinct (no accumulation within one assignment); the
    # rows clamped to P - 1 are summed apart.
    tail = row == P - 1
    grad[:, P - 1] = flat[:, tail].sum(dim=1) + far
    for side in (rel >= 0, rel < 0):
        keep = side & ~tail
        grad[:, row[keep]] += flat[:, keep]
    return grad.t()


def _per_table(grad_per_head: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[rows, H] -> the table's [rows, Hb] (summed over heads when Hb = 1), in its dtype."""
    if table.shape[1] == 1 and grad_per_head.shape[1] != 1:
        grad_per_head = grad_per_head.sum(dim=1, keepdim=True)
    return grad_per_head.to(table.dtype)


def sequence_attention_bwd(grad_out, query, key, value, starts, lens, max_length, num_targets,
                           contextual_len, max_attn_len, causal, silu, scale, attn_scale,
                           attn_scale_value, query_times, key_times, time_table, time_bounds,
                           position_table, bias, lse, delta, grad_time_table=True,
                           grad_position_table=True, grad_bias=True):
    """Backward launcher on the forward's canonical arguments, plus lse [T, H] (the forward's)
    and delta [T, H] float32 = rowsum(grad_out * out) - grad_lse (softmax; unused with SiLU),
    both with the same strides. Returns (grad_query, grad_key, grad_value, grad_time_table,
    grad_position_table, grad_bias), the last three None when absent or not asked for; zero at
    tokens of no row. Deterministic: no atomics, every partial sum reduced in a fixed order."""
    c = _Call(query, key, value, starts, lens, max_length, num_targets, contextual_len,
              max_attn_len, causal, silu, scale, attn_scale, attn_scale_value, query_times,
              key_times, time_table, time_bounds, position_table, bias)
    dev = query.device
    dq = torch.zeros(query.shape, dtype=query.dtype, device=dev)
    dk = torch.zeros(key.shape, dtype=key.dtype, device=dev)
    dv = torch.zeros(value.shape, dtype=value.dtype, device=dev)
    B, H, M = c.B, c.H, c.num_blocks
    grad_time_table = grad_time_table and time_table is not None
    grad_position_table = grad_position_table and position_table is not None
    grad_bias = grad_bias and bias is not None
    zero4 = (0, 0, 0, 0)
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dbias, tg, pg = dummy, dummy, dummy
    db_strides, tg_strides, pg_strides = zero4, zero4[:3], zero4
    block_nb, dmax = 1, 0
    if grad_bias:
        # Per head (one writer per element); summed over heads below when Hb = 1.
        dbias = torch.zeros((bias.shape[0], H) + tuple(bias.shape[2:]), dtype=torch.float32, device=dev)
        db_strides = dbias.stride()
    if grad_time_table:
        block_nb = triton.next_power_of_2(c.NB)
        tg = torch.zeros((B, M, H, block_nb), dtype=torch.float32, device=dev)
        tg_strides = tg.stride()[:3]
    if grad_position_table:
        dmax = band_tiles(c.P, c.block, M)
        pg = torch.zeros((B, M, H, 2 * dmax + 2, 2 * c.block), dtype=torch.float32, device=dev)
        pg_strides = pg.stride()[:4]
    if not c.empty:
        common = (c.scale, c.as_value, *c.strides, *grad_out.stride(), *lse.stride())
        _seq_bwd_dq_kernel[(M, B, H)](
            *c.tensors, grad_out, lse, delta, dq, dbias, tg, pg, *common, *dq.stride(),
            *db_strides, *tg_strides, *pg_strides, *c.sizes, dmax, BIAS_GRAD=grad_bias,
            TIME_GRAD=grad_time_table, POS_GRAD=grad_position_table, BLOCK_NB=block_nb,
            **c.launch("dq"))
        _seq_bwd_dkdv_kernel[(M, B, c.Hkv)](
            *c.tensors, grad_out, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
            *c.sizes, **c.launch("dkdv"))

    d_time = d_pos = d_bias = None
    if grad_time_table:
        d_time = _per_table(tg.sum(dim=(0, 1))[:, :c.NB].t(), time_table)
    if grad_position_table:
        d_pos = _per_table(fold_position_grad(pg, c.P, c.block), position_table)
    if grad_bias:
        d_bias = (dbias if bias.shape[1] == H else dbias.sum(dim=1, keepdim=True)).to(bias.dtype)
    return dq, dk, dv, d_time, d_pos, d_bias
