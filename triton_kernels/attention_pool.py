"""Triton kernels of masked attention pooling (target attention), forward and backward.

Each query of a row attends over that row's valid keys and gets one pooled vector
(docs/contract.md section 1). Canonical layouts (the Python API normalises to them):

    padded: query [B, N, H, Dk], key [B, L, H, Dk], value [B, L, H, Dv],
            lengths [B] (valid prefix) XOR mask [B, L] bool (True = attend), or neither
    jagged: query [B, N, H, Dk], key [T, H, Dk], value [T, H, Dv], offsets [B+1]

Kernels:
    _attention_pool_fwd_kernel        one program per (row, query block, head, split): online
                                      softmax over the row's K/V tiles; writes (out, lse), or
                                      with several splits a partial (o, lse) per split
    _attention_pool_combine_kernel    merges the split partials (flash-decoding style)
    _attention_pool_bwd_dq_kernel     dq, one program per (row, query block, head); also
                                      writes each query's softmax anchors (lse, or at large
                                      logits the recomputed max and log-sum) for dk/dv
    _attention_pool_bwd_dkdv_kernel   dk/dv, one program per (row, L tile, head) looping over
                                      every query of the row: deterministic, no atomics

Numerics: logits are scale * q.k in natural units, as in the reference (only the small
s - max goes to base 2), and the backward recomputes them exactly as the forward computes
them (the same dot, then the same scale); tl.dot takes 16-bit operands (p and ds cast to the
input dtype, float32 accumulation); NaN/inf at a valid position propagate to out and lse (a
row is empty, out = 0 and lse = -inf, only when nothing valid contributed); positions outside
a row are never read. Launch configs: tile_costs/_fits (every tile and stage counted,
calibrated on sm_90 compiles: see SM90_CONFIGS.md and aot.py).

Row bounds are clamped in-kernel (lengths to [0, L]; offsets to [0, T], end >= start, and
end <= start + max_length when max_length >= 0), so no launch can read out of bounds whatever
the index values are. Launchers `attention_pool_fwd` / `attention_pool_bwd` take canonical
tensors with any strides.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Layout codes (constexpr LAYOUT of every kernel); tl.constexpr so the kernels can read them.
DENSE = tl.constexpr(0)  # padded, every position valid
LENGTHS = tl.constexpr(1)  # padded + lengths [B]
MASKED = tl.constexpr(2)  # padded + mask [B, L]
JAGGED = tl.constexpr(3)  # jagged + offsets [B + 1]
_LOG2E = tl.constexpr(1.4426950408889634)

# Queries per program at or below which the kernels use broadcast-multiply-and-sum instead of
# tl.dot: tl.dot needs M, N, K >= 16 on the GPU, and padding one query to 16 rows wastes the
# arithmetic of the (memory-bound) single-candidate case.
SMALL_N = 4

# The backward recomputes each query's softmax max and sum (instead of trusting the float32
# lse) when |lse| reaches this (as the CPU backward does): below it, lse's rounding (half an
# ulp, <= 2^-20) costs p less than 1e-6 relative error.
RESTAT_ABOVE = 16.0

# The split-L heuristic pretends this many SMs when there is no GPU (the interpreter).
INTERPRET_SM_COUNT = 8
# A split streams at least this many positions, so that its partial write stays cheap.
MIN_SPLIT_LEN = 256
MAX_SPLITS = 64


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version(text: str):
    """(major, minor) of a version string such as "3.6.0" or "2.4.0rc1"."""
    parts = [int(re.match(r"\d*", piece).group() or 0) for piece in text.split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))


def interpreter_problem(triton_version: Optional[str] = None,
                        numpy_version: Optional[str] = None) -> str:
    """Why Triton's interpreter cannot run these kernels with the installed packages, or "".

    Triton 3.6's interpreter fails with numpy >= 2.4: program ids come back as shape-(1,)
    arrays that numpy 2.4 no longer converts to Python integers (triton-lang/triton#9171).
    Compiled kernels on a GPU are not affected."""
    if triton_version is None:
        triton_version = triton.__version__
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if _version(triton_version) == (3, 6) and _version(numpy_version) >= (2, 4):
        return ("Triton %s's interpreter fails with numpy %s (numpy >= 2.4 does not convert "
                "its shape-(1,) program ids to integers, triton-lang/triton#9171): install "
                "numpy<2.4 or another Triton to run the Triton kernels on CPU tensors; compiled "
                "kernels on a GPU are not affected" % (triton_version, numpy_version))
    return ""


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_bounds(IDX, b, stride_idx, L, MAX_LEN, LAYOUT: tl.constexpr):
    """[start, end) of row b's key positions, clamped to [0, L] (L = T for jagged)."""
    if LAYOUT == LENGTHS:
        start = (b * 0).to(tl.int64)
        n = tl.load(IDX + b * stride_idx).to(tl.int64)
        end = tl.minimum(tl.maximum(n, 0), L)
    elif LAYOUT == JAGGED:
        lo = tl.load(IDX + b * stride_idx).to(tl.int64)
        hi = tl.load(IDX + (b + 1) * stride_idx).to(tl.int64)
        start = tl.minimum(tl.maximum(lo, 0), L)
        end = tl.minimum(tl.maximum(hi, start), L)
        if MAX_LEN >= 0:
            end = tl.minimum(end, start + MAX_LEN)
    else:
        start = (b * 0).to(tl.int64)
        end = (b * 0 + L).to(tl.int64)
    return start, end


@triton.jit
def _row_program(IDX, stride_idx, PER_ROW, L, MAX_LEN, LAYOUT: tl.constexpr):
    """A program of a (row x PER_ROW, head) grid: (row b, its index j among the row's PER_ROW
    programs (a query block, or an L tile), head h, the row's clamped key range [start, end))."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // PER_ROW
    j = pid % PER_ROW
    h = tl.program_id(1).to(tl.int64)
    start, end = _row_bounds(IDX, b, stride_idx, L, MAX_LEN, LAYOUT)
    return b, j, h, start, end


@triton.jit
def _query_block_program(IDX, stride_idx, N, L, MAX_LEN, NUM_SPLITS, LAYOUT: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, SPLIT: tl.constexpr):
    """The work item of a program of the (row x query block, head[, split]) grid, decoded once
    for every kernel launched on it: (row b, head h, the key range [lo, hi) it streams, the
    block's query indices offs_n (int64), which of them exist). The row's range is _row_bounds'
    clamped one; with SPLIT (program axis 2 over NUM_SPLITS splits, flash-decoding) a split's
    share of it is a whole number of BLOCK_L tiles, else the whole row."""
    b, qb, h, start, end = _row_program(IDX, stride_idx, tl.cdiv(N, BLOCK_N), L, MAX_LEN, LAYOUT)
    if SPLIT:
        split = tl.program_id(2).to(tl.int64)
        chunk = tl.cdiv(tl.cdiv(end - start, NUM_SPLITS), BLOCK_L) * BLOCK_L
        lo = start + split * chunk
        hi = tl.minimum(lo + chunk, end)
    else:
        lo = start
        hi = end
    offs_n = (qb * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return b, h, lo, hi, offs_n, offs_n < N


@triton.jit
def _tile_valid(MASK, b, pos, valid, stride_mb, stride_ml, LAYOUT: tl.constexpr):
    """Which positions `pos` of row b take part: `valid` (inside the row) narrowed by the mask
    in the MASKED layout (the mask is read only inside the row)."""
    if LAYOUT == MASKED:
        keep = tl.load(MASK + b * stride_mb + pos * stride_ml, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def _load_rows(base, pos, valid, offs_d, stride_l, stride_d, D):
    """Rows `pos` of a [rows, D] operand (key/value positions, or a block's queries); rows that
    take no part read as zeros, never loaded."""
    return tl.load(base + pos[:, None] * stride_l + offs_d[None, :] * stride_d,
                   mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_kv_tile(k_base, v_base, MASK, b, pos, valid, offs_dk, offs_dv,
                  stride_kl, stride_kd, stride_vl, stride_vd, stride_mb, stride_ml,
                  DK, DV, LAYOUT: tl.constexpr):
    """The K/V tile at positions `pos` of row b, and which of them take part (_tile_valid).
    Positions that take no part read as zeros and are never loaded."""
    valid = _tile_valid(MASK, b, pos, valid, stride_mb, stride_ml, LAYOUT)
    k = _load_rows(k_base, pos, valid, offs_dk, stride_kl, stride_kd, DK)
    v = _load_rows(v_base, pos, valid, offs_dv, stride_vl, stride_vd, DV)
    return valid, k, v


@triton.jit
def _mm(a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr):
    """a [M, K] @ b [K, N] accumulated in float32.

    tl.dot path: when either operand is 16-bit (q, k, v, dO of float16/bfloat16 inputs), the
    other one (p or ds, computed in float32) is cast to that dtype, so both enter the tensor
    cores as 16-bit operands and accumulate in float32, as FlashAttention's Triton kernels do:
    a float32 operand mixed with a 16-bit one would drop the dot to float32 FMA, which spills
    registers at the many-query tile sizes. Two float32 operands (float32 inputs) use
    DOT_PRECISION ("ieee" by default; "tf32x3"/"tf32" by ATTNKERN_TRITON_FP32_DOT).
    Broadcast-and-sum in float32 for blocks of a few queries, which tl.dot (M >= 16) would
    pad 16-fold. NATIVE_DOT=False sends 16-bit operands through float32 too (Triton's
    interpreter multiplies raw bfloat16 bits)."""
    if USE_DOT:
        if NATIVE_DOT and a.dtype != tl.float32:
            r = tl.dot(a, b.to(a.dtype))
        elif NATIVE_DOT and b.dtype != tl.float32:
            r = tl.dot(a.to(b.dtype), b)
        else:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        r = tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return r


@triton.jit
def _finite_or_zero(m):
    """The softmax shift: m where finite, else 0 (as the reference shifts). -inf (no valid
    position yet) keeps exp2 free of (-inf) - (-inf); +inf or NaN logits then give inf/NaN
    sums that propagate to out and lse instead of being shifted away."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def _online_softmax(m_i, l_i, s):
    """One tile of the online softmax over logits s [N, L] (natural units; only the small
    differences s - max go to base 2, exp(x) = exp2(x * log2(e)), so large logits lose nothing
    to the base change): (running max, running sum, alpha, p) with alpha the factor that
    rescales what was accumulated before (0 while nothing contributed, m_i = -inf) and
    p = exp(s - max)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_shift = _finite_or_zero(m_new)
    alpha = tl.exp2((m_i - m_shift) * _LOG2E)
    p = tl.exp2((s - m_shift[:, None]) * _LOG2E)
    return m_new, l_i * alpha + tl.sum(p, axis=1), alpha, p


@triton.jit
def _softmax_finish(m_i, l_i):
    """(1 / sum, lse) of a finished online softmax. l_i == 0 only when no valid position
    contributed (an empty row or split): 0 and lse = -inf exactly. NaN/inf in l_i (NaN or
    overflowing logits at a valid position) propagate, as in the reference."""
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    lse = tl.where(empty, float("-inf"), _finite_or_zero(m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    return inv_l, lse


# Bias modes (constexpr BIAS_MODE): how a program reads the score bias.
NO_BIAS = tl.constexpr(0)
ROW_BIAS = tl.constexpr(1)  # one row for every query of the program (shared by N, one head)
QUERY_BIAS = tl.constexpr(2)  # a row per query (per query, or one head per query of a group)


@triton.jit
def _bias_row(b, qn, h, GROUP, stride_bb, stride_bn, stride_bj, stride_bh):
    return b * stride_bb + (qn // GROUP) * stride_bn + (qn % GROUP) * stride_bj + h * stride_bh


@triton.jit
def _bias_tile(BIAS, b, qn, n_ok, h, pos, valid, GROUP,
               stride_bb, stride_bn, stride_bj, stride_bh, stride_bl, BIAS_MODE: tl.constexpr):
    """The score bias of queries `qn` of K/V head h at positions `pos` of row b, float32:
    [1, L] (ROW_BIAS: the same row for every query) or [N, L]. Query qn reads the row at
    (qn // GROUP) * stride_bn + (qn % GROUP) * stride_bj + h * stride_bh (see _BiasView: the
    query heads folded into candidates, a bias shared by candidates or heads). Read only at
    positions that take part (0 elsewhere)."""
    if BIAS_MODE == ROW_BIAS:
        x = tl.load(BIAS + b * stride_bb + h * stride_bh + pos * stride_bl,
                    mask=valid, other=0.0).to(tl.float32)[None, :]
    else:
        row = _bias_row(b, qn, h, GROUP, stride_bb, stride_bn, stride_bj, stride_bh)
        x = tl.load(BIAS + row[:, None] + pos[None, :] * stride_bl,
                    mask=n_ok[:, None] & valid[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _logits(q, k, scale, BIAS, b, qn, n_ok, h, pos, valid, GROUP,
            stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
            BIAS_MODE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
            NATIVE_DOT: tl.constexpr):
    """scale * q.k (+ bias): the logits as the reference computes them, -inf where a position
    takes no part. A -inf bias drops its position; NaN/inf elsewhere propagate."""
    s = _mm(q, tl.trans(k), USE_DOT, DOT_PRECISION, NATIVE_DOT) * scale
    if BIAS_MODE != NO_BIAS:
        s = s + _bias_tile(BIAS, b, qn, n_ok, h, pos, valid, GROUP,
                           stride_bb, stride_bn, stride_bj, stride_bh, stride_bl, BIAS_MODE)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _store_dbias(DBIAS, b, qn, n_ok, h, pos, valid, GROUP,
                 stride_gbb, stride_gbn, stride_gbj, stride_gbh, stride_gbl, ds):
    """ds [N, L] of queries `qn` of K/V head h to the bias gradient, each at its bias
    position (indexed as in _bias_tile), at the positions that take part only."""
    row = _bias_row(b, qn, h, GROUP, stride_gbb, stride_gbn, stride_gbj, stride_gbh)
    tl.store(DBIAS + row[:, None] + pos[None, :] * stride_gbl, ds.to(DBIAS.dtype.element_ty),
             mask=n_ok[:, None] & valid[None, :])


@triton.jit
def _attention_pool_fwd_kernel(
    Q, K, V, IDX, MASK, BIAS, OUT, LSE,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_os, stride_ob, stride_on, stride_oh, stride_od,
    stride_ls, stride_lb, stride_ln, stride_lh,
    N, L, MAX_LEN, NUM_SPLITS, DK, DV, GROUP,
    N_KEY,  # autotune key only: power-of-two bucket of N
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    b, h, lo, hi, offs_n, n_ok = _query_block_program(IDX, stride_idx, N, L, MAX_LEN, NUM_SPLITS,
                                                      LAYOUT, BLOCK_N, BLOCK_L, True)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)

    # Phase 1: the query block, loaded once; all its queries share each K/V tile below.
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, n_ok, offs_dk, stride_qn, stride_qd, DK)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # Phase 2: stream the valid K/V tiles with an online softmax (_online_softmax). Logits
    # s = scale * q.k in natural units, as the reference computes them. Running max m_i,
    # shifted by _finite_or_zero: a row that is all masked so far keeps m_i = -inf and shifts by 0.
    num_tiles = tl.cdiv(hi - lo, BLOCK_L)
    for t in range(0, num_tiles):
        pos = lo + t * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = pos < hi
        valid, k, v = _load_kv_tile(k_base, v_base, MASK, b, pos, valid, offs_dk, offs_dv,
                                    stride_kl, stride_kd, stride_vl, stride_vd, stride_mb,
                                    stride_ml, DK, DV, LAYOUT)
        s = _logits(q, k, scale, BIAS, b, offs_n, n_ok, h, pos, valid, GROUP,
                    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                    BIAS_MODE, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        m_i, l_i, alpha, p = _online_softmax(m_i, l_i, s)
        acc = acc * alpha[:, None] + _mm(p, v, USE_DOT, DOT_PRECISION, NATIVE_DOT)

    # Phase 3: normalise (_softmax_finish: an empty row or split gets o = 0, lse = -inf). lse
    # is within about one float32 ulp; the backward does not rely on it being better (see the
    # dq kernel).
    inv_l, lse = _softmax_finish(m_i, l_i)
    o = acc * inv_l[:, None]
    split = tl.program_id(2).to(tl.int64)
    o_ptrs = (OUT + split * stride_os + b * stride_ob + h * stride_oh
              + offs_n[:, None] * stride_on + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))
    lse_ptrs = LSE + split * stride_ls + b * stride_lb + h * stride_lh + offs_n * stride_ln
    tl.store(lse_ptrs, lse, mask=n_ok)


@triton.jit
def _attention_pool_combine_kernel(
    PART_O, PART_LSE, OUT, LSE,
    stride_ps, stride_pb, stride_pn, stride_ph, stride_pd,
    stride_qs, stride_qb, stride_qn, stride_qh,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_lb, stride_ln, stride_lh,
    N, NUM_SPLITS, DV,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """out = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s, per (row, query, head)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    s_ok = offs_s < NUM_SPLITS

    lse_s = tl.load(PART_LSE + offs_s.to(tl.int64) * stride_qs + b * stride_qb + n * stride_qn
                    + h * stride_qh, mask=s_ok, other=float("-inf"))
    # Every split empty: out = 0 and lse = -inf. A NaN/inf split lse propagates (as in one split).
    m_shift = _finite_or_zero(tl.max(lse_s, axis=0))
    w = tl.exp2((lse_s - m_shift) * _LOG2E)
    w_sum = tl.sum(w, axis=0)
    empty = w_sum == 0.0
    w = w / tl.where(empty, 1.0, w_sum)
    o_s = tl.load(PART_O + offs_s[:, None].to(tl.int64) * stride_ps + b * stride_pb
                  + n * stride_pn + h * stride_ph + offs_dv[None, :] * stride_pd,
                  mask=s_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    o = tl.sum(o_s * w[:, None], axis=0)
    lse = tl.where(empty, float("-inf"), m_shift + tl.log(tl.where(empty, 1.0, w_sum)))
    tl.store(OUT + b * stride_ob + n * stride_on + h * stride_oh + offs_dv * stride_od,
             o.to(OUT.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + b * stride_lb + n * stride_ln + h * stride_lh, lse)


@triton.jit
def _attention_pool_bwd_dq_kernel(
    Q, K, V, IDX, MASK, BIAS, DO, LSE, DELTA, DQ, ANCH,
    scale, restat_above,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_lb, stride_ln, stride_lh,
    stride_db, stride_dn, stride_dh,
    stride_dqb, stride_dqn, stride_dqh, stride_dqd,
    stride_as, stride_ab, stride_an, stride_ah,
    N, L, MAX_LEN, DK, DV, GROUP,
    N_KEY,
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """dq = scale * sum_l p_l (dO.v_l - delta) k_l with p = exp((s_l - a) - c) recomputed.

    The anchors (a, c) of each query are (lse, 0), or, when |lse| reaches `restat_above`
    anywhere in the query block, the row's max logit and the log of its softmax sum
    recomputed here in a first pass over K (the same logits as the forward's, computed the
    same way). A float32 lse is only good to about one ulp of its own size, so at large
    logits p = exp2(s - lse) would be off by up to ~ulp(lse) relatively (7e-4 at logits of
    1e4); (s - a) is exact near the max and c is small. The anchors are written to ANCH
    [2, B, N, H] for the dk/dv kernel, which runs after this one."""
    b, h, start, end, offs_n, n_ok = _query_block_program(IDX, stride_idx, N, L, MAX_LEN, 1,
                                                          LAYOUT, BLOCK_N, BLOCK_L, False)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)

    # Phase 1: per-query operands. An empty row has lse = -inf; shifting by 0 there keeps
    # p = exp2(-inf) = 0 instead of exp2(-inf + inf) = NaN. NaN/inf lse propagate.
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_n, n_ok, offs_dk, stride_qn, stride_qd, DK)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, offs_n, n_ok, offs_dv, stride_gn, stride_gd, DV)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_n * stride_ln, mask=n_ok, other=0.0)
    a = tl.where(lse == float("-inf"), 0.0, lse)
    c = tl.zeros([BLOCK_N], tl.float32)
    delta = tl.load(DELTA + b * stride_db + h * stride_dh + offs_n * stride_dn, mask=n_ok, other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    num_tiles = tl.cdiv(end - start, BLOCK_L)
    # Phase 2 (large logits only): the softmax statistics again, from K alone.
    if tl.max(tl.where(n_ok, tl.abs(a), 0.0), axis=0) >= restat_above:
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_N], tl.float32)
        for t in range(0, num_tiles):
            pos = start + t * BLOCK_L + offs_l
            valid = _tile_valid(MASK, b, pos, pos < end, stride_mb, stride_ml, LAYOUT)
            k = _load_rows(k_base, pos, valid, offs_dk, stride_kl, stride_kd, DK)
            s = _logits(q, k, scale, BIAS, b, offs_n, n_ok, h, pos, valid, GROUP,
                        stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                        BIAS_MODE, USE_DOT, DOT_PRECISION, NATIVE_DOT)
            m_i, l_i, alpha, p = _online_softmax(m_i, l_i, s)
        a = _finite_or_zero(m_i)
        c = tl.where(l_i == 0.0, 0.0, tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    anc = ANCH + b * stride_ab + h * stride_ah + offs_n * stride_an
    tl.store(anc, a, mask=n_ok)
    tl.store(anc + stride_as, c, mask=n_ok)

    # Phase 3: stream the row's K/V tiles, recomputing p and accumulating ds @ K.
    dq = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    for t in range(0, num_tiles):
        pos = start + t * BLOCK_L + offs_l
        valid = pos < end
        valid, k, v = _load_kv_tile(k_base, v_base, MASK, b, pos, valid, offs_dk, offs_dv,
                                    stride_kl, stride_kd, stride_vl, stride_vd, stride_mb,
                                    stride_ml, DK, DV, LAYOUT)
        s = _logits(q, k, scale, BIAS, b, offs_n, n_ok, h, pos, valid, GROUP,
                    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                    BIAS_MODE, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        p = tl.exp2(((s - a[:, None]) - c[:, None]) * _LOG2E)
        dp = _mm(do, tl.trans(v), USE_DOT, DOT_PRECISION, NATIVE_DOT)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, USE_DOT, DOT_PRECISION, NATIVE_DOT)

    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_n[:, None] * stride_dqn
             + offs_dk[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=n_ok[:, None] & (offs_dk[None, :] < DK))


@triton.jit
def _load_query_block(Q, DO, ANCH, DELTA, b, h, qn, n_ok, offs_dk, offs_dv,
                      stride_qb, stride_qn, stride_qh, stride_qd,
                      stride_gb, stride_gn, stride_gh, stride_gd,
                      stride_as, stride_ab, stride_an, stride_ah,
                      stride_db, stride_dn, stride_dh, DK, DV):
    """The backward's per-query operands of queries qn (int64) of row b, head h: q, dO, the
    dq kernel's anchors (a, c) and delta; queries past N read as zeros."""
    q = _load_rows(Q + b * stride_qb + h * stride_qh, qn, n_ok, offs_dk, stride_qn, stride_qd, DK)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, qn, n_ok, offs_dv, stride_gn, stride_gd, DV)
    anc = ANCH + b * stride_ab + h * stride_ah + qn * stride_an
    a = tl.load(anc, mask=n_ok, other=0.0)
    c = tl.load(anc + stride_as, mask=n_ok, other=0.0)
    delta = tl.load(DELTA + b * stride_db + h * stride_dh + qn * stride_dn, mask=n_ok, other=0.0)
    return q, do, a, c, delta


@triton.jit
def _attention_pool_bwd_dkdv_kernel(
    Q, K, V, IDX, MASK, BIAS, DO, ANCH, DELTA, DK_OUT, DV_OUT, DBIAS,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_as, stride_ab, stride_an, stride_ah,
    stride_db, stride_dn, stride_dh,
    stride_dkb, stride_dkl, stride_dkh, stride_dkd,
    stride_dvb, stride_dvl, stride_dvh, stride_dvd,
    stride_gbb, stride_gbn, stride_gbj, stride_gbh, stride_gbl,
    N, L, MAX_LEN, GRID_LEN, DK, DV, GROUP,
    N_KEY,
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr, DBIAS_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """dk/dv of one L tile of one row: loops over all N queries, so no two programs ever
    write the same position (deterministic, no atomics). Positions that take part in no row
    are never written: the launcher zero-fills the outputs. p = exp2((s - a) - c) with the
    anchors (a, c) the dq kernel wrote to ANCH (p = exp((s - a) - c)).

    The bias gradient is the logits' gradient ds, summed over what the bias was broadcast
    to. DBIAS_MODE ROW_BIAS: this program's column sums over all its queries, in query order,
    to DBIAS[b, h, pos] (the whole sum when nothing else shares that row); QUERY_BIAS: ds
    itself, at the bias position of each query (one writer per element). Else none here."""
    b, tile, h, start, end = _row_program(IDX, stride_idx, tl.cdiv(GRID_LEN, BLOCK_L), L, MAX_LEN,
                                          LAYOUT)
    lo = start + tile * BLOCK_L
    if lo >= end:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    pos = lo + tl.arange(0, BLOCK_L)
    valid = pos < end

    # Phase 1: this tile's K/V, loaded once for all queries.
    valid, k, v = _load_kv_tile(K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                                MASK, b, pos, valid, offs_dk, offs_dv, stride_kl, stride_kd,
                                stride_vl, stride_vd, stride_mb, stride_ml, DK, DV, LAYOUT)

    dk = tl.zeros([BLOCK_L, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    db = tl.zeros([BLOCK_L], tl.float32)
    if BIAS_MODE == ROW_BIAS:  # read once for every query of the row
        brow = _bias_tile(BIAS, b, offs_n.to(tl.int64), offs_n < N, h, pos, valid, GROUP,
                          stride_bb, stride_bn, stride_bj, stride_bh, stride_bl, BIAS_MODE)
    # Phase 2: loop over the row's queries in blocks, in a fixed order.
    for n0 in range(0, N, BLOCK_N):
        qn = n0 + offs_n
        n_ok = qn < N
        qn64 = qn.to(tl.int64)
        q, do, a, c, delta = _load_query_block(
            Q, DO, ANCH, DELTA, b, h, qn64, n_ok, offs_dk, offs_dv,
            stride_qb, stride_qn, stride_qh, stride_qd, stride_gb, stride_gn, stride_gh, stride_gd,
            stride_as, stride_ab, stride_an, stride_ah, stride_db, stride_dn, stride_dh, DK, DV)
        s = _mm(q, tl.trans(k), USE_DOT, DOT_PRECISION, NATIVE_DOT) * scale
        if BIAS_MODE == ROW_BIAS:
            s = s + brow
        elif BIAS_MODE == QUERY_BIAS:
            s = s + _bias_tile(BIAS, b, qn64, n_ok, h, pos, valid, GROUP,
                               stride_bb, stride_bn, stride_bj, stride_bh, stride_bl, BIAS_MODE)
        s = tl.where(n_ok[:, None] & valid[None, :], s, float("-inf"))
        p = tl.exp2(((s - a[:, None]) - c[:, None]) * _LOG2E)
        dv += _mm(tl.trans(p), do, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        dp = _mm(do, tl.trans(v), USE_DOT, DOT_PRECISION, NATIVE_DOT)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds), q, USE_DOT, DOT_PRECISION, NATIVE_DOT)
        if DBIAS_MODE == ROW_BIAS:
            db += tl.sum(tl.where(n_ok[:, None], ds, 0.0), axis=0)
        elif DBIAS_MODE == QUERY_BIAS:
            _store_dbias(DBIAS, b, qn64, n_ok, h, pos, valid, GROUP,
                         stride_gbb, stride_gbn, stride_gbj, stride_gbh, stride_gbl, ds)

    # Phase 3: write the valid positions of the tile.
    dk = dk * scale
    tl.store(DK_OUT + b * stride_dkb + h * stride_dkh + pos[:, None] * stride_dkl
             + offs_dk[None, :] * stride_dkd, dk.to(DK_OUT.dtype.element_ty),
             mask=valid[:, None] & (offs_dk[None, :] < DK))
    tl.store(DV_OUT + b * stride_dvb + h * stride_dvh + pos[:, None] * stride_dvl
             + offs_dv[None, :] * stride_dvd, dv.to(DV_OUT.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV))
    if DBIAS_MODE == ROW_BIAS:
        tl.store(DBIAS + b * stride_gbb + h * stride_gbh + pos * stride_gbl,
                 db.to(DBIAS.dtype.element_ty), mask=valid)


@triton.jit
def _attention_pool_bwd_dbias_kernel(
    Q, K, V, IDX, MASK, BIAS, DO, ANCH, DELTA, DBIAS,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
    stride_gb, stride_gn, stride_gh, stride_gd,
    stride_as, stride_ab, stride_an, stride_ah,
    stride_db, stride_dn, stride_dh,
    stride_gbb, stride_gbj, stride_gbh, stride_gbl,
    N, H, L, MAX_LEN, DK, DV, GROUP,
    LAYOUT: tl.constexpr, PER_J: tl.constexpr, PER_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    """The bias gradient where its sums run across programs of the dk/dv kernel (one per
    head) or over queries that one of them cannot tell apart. Query n * GROUP + j of head h
    reads the bias (and owns its gradient) at j * stride_bj + h * stride_bh; PER_J / PER_H
    say whether j / h select distinct elements (else they are summed over, as n always is).
    One program per (row, L tile) recomputes ds for every query and head of its tile, in a
    fixed order, and writes each element of DBIAS once: deterministic, no atomics, no
    [B, N, H, L] buffer.

    N: queries // GROUP; H: heads."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    start, end = _row_bounds(IDX, b, stride_idx, L, MAX_LEN, LAYOUT)
    lo = start + tile * BLOCK_L
    if lo >= end:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV).to(tl.int64)
    pos = lo + tl.arange(0, BLOCK_L)
    valid = _tile_valid(MASK, b, pos, pos < end, stride_mb, stride_ml, LAYOUT)
    # The loop over (j, h) runs the summed index innermost, so that each element's sum is
    # complete when it is written.
    if PER_H:
        n_outer = H
        n_inner = GROUP
    else:
        n_outer = GROUP
        n_inner = H

    acc = tl.zeros([BLOCK_L], tl.float32)
    for o in range(0, n_outer):
        for i in range(0, n_inner):
            if PER_H:
                h = o
                j = i
            else:
                h = i
                j = o
            k = _load_rows(K + b * stride_kb + h * stride_kh, pos, valid, offs_dk, stride_kl,
                           stride_kd, DK)
            v = _load_rows(V + b * stride_vb + h * stride_vh, pos, valid, offs_dv, stride_vl,
                           stride_vd, DV)
            for n0 in range(0, N, BLOCK_N):
                qn = (n0 + offs_n).to(tl.int64)
                n_ok = qn < N
                fq = qn * GROUP + j  # the query as the kernels index it
                q, do, a, c, delta = _load_query_block(
                    Q, DO, ANCH, DELTA, b, h, fq, n_ok, offs_dk, offs_dv,
                    stride_qb, stride_qn, stride_qh, stride_qd,
                    stride_gb, stride_gn, stride_gh, stride_gd,
                    stride_as, stride_ab, stride_an, stride_ah, stride_db, stride_dn, stride_dh,
                    DK, DV)
                s = _logits(q, k, scale, BIAS, b, fq, n_ok, h, pos, valid, GROUP,
                            stride_bb, stride_bn, stride_bj, stride_bh, stride_bl,
                            QUERY_BIAS, USE_DOT, DOT_PRECISION, NATIVE_DOT)
                s = tl.where(n_ok[:, None], s, float("-inf"))
                p = tl.exp2(((s - a[:, None]) - c[:, None]) * _LOG2E)
                dp = _mm(do, tl.trans(v), USE_DOT, DOT_PRECISION, NATIVE_DOT)
                acc += tl.sum(tl.where(n_ok[:, None], p * (dp - delta[:, None]), 0.0), axis=0)
            if PER_H and PER_J:
                _store_dbias_acc(DBIAS, b, j, h, pos, valid,
                                 stride_gbb, stride_gbj, stride_gbh, stride_gbl, acc)
                acc = tl.zeros([BLOCK_L], tl.float32)
        if PER_H != PER_J:
            _store_dbias_acc(DBIAS, b, o, o, pos, valid,
                             stride_gbb, stride_gbj, stride_gbh, stride_gbl, acc)
            acc = tl.zeros([BLOCK_L], tl.float32)
    if not PER_H and not PER_J:
        _store_dbias_acc(DBIAS, b, 0, 0, pos, valid,
                         stride_gbb, stride_gbj, stride_gbh, stride_gbl, acc)


@triton.jit
def _store_dbias_acc(DBIAS, b, j, h, pos, valid, stride_gbb, stride_gbj, stride_gbh,
                     stride_gbl, acc):
    """acc [L] to the gradient of in-group index j and head h (the strides of the summed
    indices are 0), at the positions that take part."""
    tl.store(DBIAS + b * stride_gbb + j * stride_gbj + h * stride_gbh + pos * stride_gbl,
             acc.to(DBIAS.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Tile choices and autotuning
# ----------------------------------------------------------------------------------------------


def head_block(d: int) -> int:
    """Power-of-two block holding a head dim, at least 16 (tl.dot's minimum K/N)."""
    return max(16, triton.next_power_of_2(int(d)))


def query_block(n: int, block_dk: int = 16, block_dv: int = 16, dtype_bytes: int = 2,
                kind: str = "fwd") -> int:
    """Queries per program: the exact power of two up to SMALL_N (broadcast path), else a
    tl.dot block of 16..64 rows, halved while not even the smallest tile fits (float32
    operands at large head dims: see _fits), down to SMALL_N (the broadcast path)."""
    if n <= SMALL_N:
        return triton.next_power_of_2(max(int(n), 1))
    bn = 16 if n <= 16 else (32 if n <= 32 else 64)
    while bn >= 16 and not any(_fits(bn, 16, block_dk, block_dv, w, 2, dtype_bytes, kind)
                               for w in (4, 8)):
        bn //= 2
    # No tl.dot tile fits (float32 "ieee" at large head dims): blocks of SMALL_N queries on
    # the broadcast path.
    return bn if bn >= 16 else SMALL_N


def n_key(n: int) -> int:
    """Autotune key of the query count: its power-of-two bucket (no retune for every N)."""
    return triton.next_power_of_2(max(int(n), 1))


# Fixed interpreter config: small tiles so that block-boundary lengths are cheap to test.
INTERPRET_BLOCK_L = 16

# Launch budgets of one program (H100/H200: 255 registers per thread, 227 KB of shared memory
# per block). The cost model below counts what the kernels keep live; the budgets leave room
# for addresses, masks and Triton's layout-conversion scratch. tests/test_triton_sm90.py
# compiles the shipped configs for sm_90 and checks the real numbers (no spills, shared
# memory <= 227 KB), so the model is held to account.
REG_BUDGET = 128  # 32-bit values per thread
FP32_DOT_REG_BUDGET = 52  # 32-bit values per thread with the "ieee" tl.dot (FMA) on float32
FP32_DOT_KV_TILE = 4096  # elements of one K or V tile, "ieee" tl.dot
DKDV_QUERY_TILE = 16384  # elements of the q (or dO) tile of a dk/dv query block, 16-bit
# ptxas left to itself sometimes caps a 16-bit kernel far below the 255 registers a thread may
# have and spills (12 bytes at 72 registers, 18 KB at 32): 16-bit launches pass .maxnreg 255,
# which lifts that. float32 tl.dot ("ieee" FMA) kernels spill more with it: none for them.
MAXNREG_16BIT = 255


def maxnreg(num_warps: int, dtype_bytes: int):
    """The .maxnreg of a launch: MAXNREG_16BIT for 16-bit inputs (within what 64K registers
    give num_warps warps), else None (ptxas's own choice)."""
    if int(dtype_bytes) != 2:
        return None
    return int(min(MAXNREG_16BIT, 65536 // (32 * int(num_warps))))
SHARED_BUDGET = 200 * 1024  # bytes


def tile_costs(block_n, block_l, block_dk, block_dv, num_stages, dtype_bytes, kind,
               bias=False):
    """(float32 values live per program, shared memory bytes) of one program of `kind`
    (fwd | dq | dkdv), counting every tile:

    fwd   acc [N, Dv], scores and p [N, L]; K/V tiles x stages, the q tile, a score tile
    dq    dq [N, Dk], scores, p, dp/ds [N, L]; K/V tiles x stages, q and dO tiles, a score tile
    dkdv  dk, dv [L, Dk + Dv], scores, p, dp/ds [N, L]; q/dO tiles x stages (the loop runs
          over queries), the K/V tile, two score tiles
    tl.dot on float32 operands ("ieee": FMA, no tensor cores) also holds its operand tiles
    in registers. The broadcast path (N <= SMALL_N) holds its [N, L, D] products and the
    K/V tiles in registers. bias: a bias row per query, one more [N, L] tile while it is
    added to the scores (more in dk/dv, which writes ds as the bias gradient). _fits holds these
    against budgets calibrated on sm_90 compiles."""
    b = int(dtype_bytes)
    n, l_, dkv = int(block_n), int(block_l), int(block_dk) + int(block_dv)
    stages = max(1, int(num_stages))
    # dk/dv also keeps ds for its store as the bias gradient: counted as four tiles in all,
    # calibrated on the sm_90 compile (three still let a 16-bit 64 x 32 tile spill).
    bias_tile = (4 if kind == "dkdv" else 1) * n * l_ if bias else 0
    if n <= SMALL_N:
        live = n * l_ * max(block_dk, block_dv) + l_ * dkv + 2 * n * l_ + bias_tile
        shared = stages * l_ * dkv * b
        return live, shared
    if kind == "fwd":
        live = n * block_dv + 2 * n * l_
        operands = n * block_dk + l_ * dkv
        shared = stages * l_ * dkv * b + n * block_dk * b + n * l_ * 4
    elif kind == "dq":
        live = n * block_dk + 3 * n * l_
        operands = n * dkv + l_ * dkv
        shared = stages * l_ * dkv * b + n * dkv * b + n * l_ * 4
    elif kind == "dkdv":
        live = l_ * dkv + 3 * n * l_
        operands = n * dkv + l_ * dkv
        shared = stages * n * dkv * b + l_ * dkv * b + 2 * n * l_ * 4
    else:
        raise ValueError("kind must be fwd, dq or dkdv, got %r" % (kind,))
    # Operand tiles: mma.sync fragments of 16-bit values (two per register), or the slices of
    # float32 operands that the FMA dot keeps per thread (about half of them).
    live += operands // 2 + bias_tile
    return live, shared


def _fits(block_n, block_l, block_dk, block_dv, num_warps=4, num_stages=2, dtype_bytes=4,
          kind="fwd", bias=False):
    """Whether one program's tiles fit the register and shared-memory budgets.

    Besides the counted tiles (tile_costs), rules calibrated on sm_90 compiles of these
    kernels (python -m attnkern.triton_kernels.aot; ptxas spills outside them):
    - dk/dv with 16-bit operands: the q/dO tiles of a query block (mma.sync fragments, held
      in registers) at most DKDV_QUERY_TILE elements;
    - tl.dot on float32 operands ("ieee": FMA, no tensor cores): 8 warps, 2 stages, K/V tiles
      of at most FP32_DOT_KV_TILE elements, FP32_DOT_REG_BUDGET per thread, and dk/dv query
      blocks of 16."""
    live, shared = tile_costs(block_n, block_l, block_dk, block_dv, num_stages, dtype_bytes, kind,
                              bias)
    budget = REG_BUDGET
    if block_n > SMALL_N:
        if dtype_bytes == 4:
            if (num_warps != 8 or num_stages > 2
                    or block_l * max(block_dk, block_dv) > FP32_DOT_KV_TILE
                    or (kind == "dkdv" and block_n > 16)):
                return False
            budget = FP32_DOT_REG_BUDGET
        elif kind == "dkdv" and block_n * (block_dk + block_dv) > DKDV_QUERY_TILE:
            return False
    return live <= budget * 32 * num_warps and shared <= SHARED_BUDGET


def _configs(block_ls, warps, stages):
    return [
        triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bl in block_ls for w in warps for s in stages
    ]


# A100/H100/H200-class candidates; pruned per call to those that fit the blocks and dtype.
FWD_CONFIGS = _configs((16, 32, 64, 128), (2, 4, 8), (2,)) + _configs((64, 128), (4, 8), (3,))
BWD_CONFIGS = _configs((16, 32, 64), (4, 8), (2,)) + _configs((32, 64), (4, 8), (3,))
AUTOTUNE_KEY = ["DK", "DV", "N_KEY"]  # Triton adds every tensor argument's dtype to the key


def _arg(named_args, kwargs, name):
    return named_args[name] if name in named_args else kwargs.get(name)


def prune_configs(configs, named_args, kind="fwd", dtype_bytes=None, **kwargs):
    """Drops configs whose tiles do not fit (_fits) the blocks and the inputs' dtype (from the
    query tensor, or dtype_bytes), with a bias row per query when BIAS_MODE says so; keeps at
    least the smallest one."""
    bn = _arg(named_args, kwargs, "BLOCK_N")
    bdk = _arg(named_args, kwargs, "BLOCK_DK")
    bdv = _arg(named_args, kwargs, "BLOCK_DV")
    bias = _arg(named_args, kwargs, "BIAS_MODE") == QUERY_BIAS.value
    if dtype_bytes is None:
        q = named_args.get("Q")
        dtype_bytes = q.element_size() if isinstance(q, torch.Tensor) else 4
    kept = [c for c in configs if _fits(bn, c.kwargs["BLOCK_L"], bdk, bdv, c.num_warps,
                                        c.num_stages, dtype_bytes, kind, bias)]
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_L"], c.num_stages, -c.num_warps))]
    return [_with_maxnreg(c, dtype_bytes) for c in kept]


def _with_maxnreg(c, dtype_bytes):
    """Config c with the .maxnreg of its dtype (see maxnreg)."""
    regs = maxnreg(c.num_warps, dtype_bytes)
    if c.maxnreg == regs:
        return c
    return triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                         num_ctas=c.num_ctas, maxnreg=regs, pre_hook=c.pre_hook)


def _prune_dq(configs, named_args, **kwargs):
    return prune_configs(configs, named_args, kind="dq", **kwargs)


def _prune_dkdv(configs, named_args, **kwargs):
    return prune_configs(configs, named_args, kind="dkdv", **kwargs)


_fwd_tuned = triton.autotune(FWD_CONFIGS, key=AUTOTUNE_KEY,
                             prune_configs_by={"early_config_prune": prune_configs})(
    _attention_pool_fwd_kernel)
_dq_tuned = triton.autotune(BWD_CONFIGS, key=AUTOTUNE_KEY,
                            prune_configs_by={"early_config_prune": _prune_dq})(
    _attention_pool_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(BWD_CONFIGS, key=AUTOTUNE_KEY,
                              prune_configs_by={"early_config_prune": _prune_dkdv})(
    _attention_pool_bwd_dkdv_kernel)


def default_config(block_n, block_dk, block_dv, dtype_bytes, kind="fwd", bias=False):
    """Untuned (BLOCK_L, num_warps, num_stages) for CUDA with autotune off: the largest
    BLOCK_L of 64/32/16 that fits with 4 warps (else 8), 2 stages; else (16, 8, 2)."""
    for bl in (64, 32, 16):
        for w in (4, 8):
            if _fits(block_n, bl, block_dk, block_dv, w, 2, dtype_bytes, kind, bias):
                return bl, w, 2
    return 16, 8, 2


def fp32_dot_precision() -> str:
    """input_precision of tl.dot on float32 operands (p, ds, float32 inputs): "ieee" (exact
    float32, no tensor cores) unless ATTNKERN_TRITON_FP32_DOT picks "tf32x3" or "tf32"."""
    prec = os.environ.get("ATTNKERN_TRITON_FP32_DOT", "ieee").lower()
    if prec not in ("ieee", "tf32x3", "tf32"):
        raise ValueError("ATTNKERN_TRITON_FP32_DOT must be ieee, tf32x3 or tf32, got %r" % prec)
    return prec


def native_dot(dtype: torch.dtype) -> bool:
    """Whether 16-bit operands may enter tl.dot as they are. Not bfloat16 under the
    interpreter, whose tl.dot multiplies bfloat16's raw uint16 storage."""
    return not (interpret_mode() and dtype == torch.bfloat16)


def _use_autotune(device: torch.device) -> bool:
    return (device.type == "cuda" and not interpret_mode()
            and os.environ.get("ATTNKERN_TRITON_AUTOTUNE", "1") not in ("", "0"))


# ----------------------------------------------------------------------------------------------
# Split-L heuristic
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of the device; a fixed pretend count when the kernels run on CPU (interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRET_SM_COUNT


def choose_num_splits(programs: int, row_len: int, num_sms: int) -> int:
    """Splits of each row's history for the forward (flash-decoding).

    programs = rows x query blocks x heads. When they already fill the GPU (>= one wave),
    or the history is short, one split. Otherwise enough splits to fill about two waves,
    each split streaming at least MIN_SPLIT_LEN positions.
    """
    if programs <= 0 or programs >= num_sms:
        return 1
    want = triton.cdiv(2 * num_sms, programs)
    most = row_len // MIN_SPLIT_LEN
    return int(max(1, min(want, most, MAX_SPLITS)))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _layout_args(key, lengths, mask, offsets, max_length):
    """(LAYOUT, IDX tensor, stride_idx, MASK tensor (uint8 view), mask strides, MAX_LEN, L,
    is_jagged) for the kernels. Unused pointers get a valid dummy (never read)."""
    if offsets is not None:
        return JAGGED.value, offsets, offsets.stride(0), key, (0, 0), int(max_length), key.shape[0], True
    L = key.shape[1]
    if mask is not None:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        return MASKED.value, m, 0, m, (m.stride(0), m.stride(1)), -1, L, False
    if lengths is not None:
        return LENGTHS.value, lengths, lengths.stride(0), key, (0, 0), -1, L, False
    return DENSE.value, key, 0, key, (0, 0), -1, L, False


class _BiasView:
    """A bias-shaped tensor (the bias or its gradient) as the kernels index it.

    Canonical layouts: padded [B, Nb, Hb, L], jagged [T, Nb, Hb]; Nb divides N and query n
    reads row n % Nb (1: shared by every query; N: one per query; after the public
    function's fold of shared K/V heads, G: one per query head of a group); Hb is 1 (shared
    by every head) or H. The kernels see query n as (n // GROUP, n % GROUP) with
    GROUP = Nb and strides (stride_b, stride_n, stride_j, stride_h, stride_l), stride_n = 0;
    a size-1 dim is broadcast (stride 0 whatever the tensor says)."""

    def __init__(self, t, query, jagged):
        self.tensor = t
        self.nq, self.heads = query.shape[1], query.shape[2]
        if t is None:
            self.group, self.nb, self.hb = 1, 1, 1
            self.strides = (0, 0, 0, 0, 0)
            return
        self.nb, self.hb = t.shape[1], t.shape[2]
        sb, sl = (0, t.stride(0)) if jagged else (t.stride(0), t.stride(3))
        self.group = self.nb
        self.strides = (sb, 0, t.stride(1) if self.nb > 1 else 0,
                        t.stride(2) if self.hb > 1 else 0, sl)

    @property
    def mode(self):
        """How the kernels read it: NO_BIAS, ROW_BIAS (one row for all queries of a head),
        QUERY_BIAS."""
        if self.tensor is None:
            return NO_BIAS.value
        return (ROW_BIAS if self.nb == 1 else QUERY_BIAS).value

    def pointer(self, dummy):
        return dummy if self.tensor is None else self.tensor


def _meta(layout, block_n, block_dk, block_dv, dtype):
    return dict(LAYOUT=layout, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                USE_DOT=block_n > SMALL_N, DOT_PRECISION=fp32_dot_precision(),
                NATIVE_DOT=native_dot(dtype))


def _fixed_config(block_l, block_n, block_dk, block_dv, dtype_bytes, kind, bias=False):
    """Launch options without autotuning: default_config's, BLOCK_L overridden by `block_l`
    when given; INTERPRET_BLOCK_L under the interpreter."""
    bl, warps, stages = default_config(block_n, block_dk, block_dv, dtype_bytes, kind, bias)
    if block_l is not None:
        bl = int(block_l)
    elif interpret_mode():
        bl = INTERPRET_BLOCK_L
    return {"BLOCK_L": bl, "num_warps": warps, "num_stages": stages,
            "maxnreg": maxnreg(warps, dtype_bytes)}


def _kv_strides(t, jagged):
    """(stride_b, stride_l, stride_h, stride_d) of a padded [B, L, H, D] or jagged [T, H, D]."""
    if jagged:
        return 0, t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _jagged_grid_len(offsets, T, max_length):
    """Longest row to size the dk/dv grid: max_length when given (no sync), else read."""
    if max_length >= 0:
        return min(int(max_length), T)
    if offsets.numel() <= 1:
        return 0
    o = offsets.to(torch.int64).clamp(0, T)
    return int((o[1:] - o[:-1]).clamp_min(0).max().item())


def attention_pool_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: int = -1,
    scale: Optional[float] = None,
    *,
    num_splits: Optional[int] = None,
    block_l: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    bias: Optional[torch.Tensor] = None,
):
    """Forward launcher on canonical tensors (any strides). Returns (out [B, N, H, Dv] in
    out_dtype (default: the query dtype), contiguous; lse [B, N, H] float32). An empty row
    gives out = 0, lse = -inf. out_dtype=torch.float32 keeps the kernel's unrounded float32
    result (the ops do, so that the backward's delta is formed from unrounded values).

    num_splits: None = the split-L heuristic, or a forced number of splits (>= 1).
    block_l: None = autotuned on CUDA / INTERPRET_BLOCK_L under the interpreter, else fixed.
    bias: the score bias added to scale * q.k (see _BiasView for its canonical layouts).
    Inputs are assumed checked for shapes/dtypes; index values are clamped in-kernel.
    """
    B, N, H, Dk = query.shape
    Dv = value.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    out = torch.empty((B, N, H, Dv), dtype=out_dtype or query.dtype, device=query.device)
    lse = torch.empty((B, N, H), dtype=torch.float32, device=query.device)
    if B == 0:
        return out, lse
    layout, idx, stride_idx, mk, (stride_mb, stride_ml), max_len, L, jagged = _layout_args(
        key, lengths, mask, offsets, max_length)
    bi = _BiasView(bias, query, jagged)

    block_dk, block_dv = head_block(Dk), head_block(Dv)
    block_n = query_block(N, block_dk, block_dv, query.element_size(), "fwd")
    qblocks = triton.cdiv(N, block_n)
    programs = B * qblocks * H
    if num_splits is None:
        row_len = L if not jagged else (max_len if max_len >= 0 else triton.cdiv(L, B))
        num_splits = choose_num_splits(programs, row_len, sm_count(query.device))
    num_splits = max(1, int(num_splits))

    if num_splits == 1:
        o_buf, l_buf = out, lse
        so = (0,) + tuple(out.stride())
        sl = (0,) + tuple(lse.stride())
    else:
        o_buf = torch.empty((num_splits, B, N, H, Dv), dtype=torch.float32, device=query.device)
        l_buf = torch.empty((num_splits, B, N, H), dtype=torch.float32, device=query.device)
        so, sl = o_buf.stride(), l_buf.stride()

    args = (
        query, key, value, idx, mk, bi.pointer(key), o_buf, l_buf,
        float(scale),
        *query.stride(), *_kv_strides(key, jagged), *_kv_strides(value, jagged),
        stride_idx, stride_mb, stride_ml, *bi.strides,
        *so, *sl,
        N, L, max_len, num_splits, Dk, Dv, bi.group, n_key(N),
    )
    meta = _meta(layout, block_n, block_dk, block_dv, query.dtype)
    meta["BIAS_MODE"] = bi.mode
    grid = (B * qblocks, H, num_splits)
    if block_l is None and _use_autotune(query.device):
        _fwd_tuned[grid](*args, **meta)
    else:
        _attention_pool_fwd_kernel[grid](*args, **meta, **_fixed_config(
            block_l, block_n, block_dk, block_dv, query.element_size(), "fwd",
            bi.mode == QUERY_BIAS.value))

    if num_splits > 1:
        attention_pool_combine(o_buf, l_buf, out, lse)
    return out, lse


def attention_pool_combine(part_o: torch.Tensor, part_lse: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merges split partials part_o [S, B, N, H, Dv] / part_lse [S, B, N, H] (each split's own
    normalised output and log-sum-exp, -inf for an empty split) into out / lse in place."""
    S, B, N, H, Dv = part_o.shape
    if B == 0 or N == 0 or H == 0:
        return
    grid = (B * N, H)
    _attention_pool_combine_kernel[grid](
        part_o, part_lse, out, lse,
        *part_o.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
        N, S, Dv,
        BLOCK_S=triton.next_power_of_2(S), BLOCK_DV=triton.next_power_of_2(Dv),
    )


def attention_pool_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: int = -1,
    scale: Optional[float] = None,
    *,
    block_l: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
):
    """Backward launcher: (grad_query, grad_key, grad_value), new contiguous tensors with the
    shapes/dtypes of query/key/value, exactly zero at every position of no row; with `bias`
    (as the forward's) also grad_bias, shaped like it in its dtype, the logits' gradient
    summed over what the bias was broadcast to, exactly zero at every position of no row.

    delta [B, N, H] float32 = sum_d(grad_out * out) - grad_lse; lse from the forward."""
    B, N, H, Dk = query.shape
    Dv = value.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.zeros(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.zeros(value.shape, dtype=value.dtype, device=value.device)
    db = None if bias is None else torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
    if B == 0:
        return (dq, dk, dv) if db is None else (dq, dk, dv, db)
    layout, idx, stride_idx, mk, (stride_mb, stride_ml), max_len, L, jagged = _layout_args(
        key, lengths, mask, offsets, max_length)
    bi = _BiasView(bias, query, jagged)

    block_dk, block_dv = head_block(Dk), head_block(Dv)
    esize = query.element_size()
    # The two kernels may take different query blocks (their tiles differ).
    bn_dq = query_block(N, block_dk, block_dv, esize, "dq")
    bn_dkdv = query_block(N, block_dk, block_dv, esize, "dkdv")
    qblocks = triton.cdiv(N, bn_dq)
    tuned = block_l is None and _use_autotune(query.device)
    meta_dq = _meta(layout, bn_dq, block_dk, block_dv, query.dtype)
    meta_dkdv = _meta(layout, bn_dkdv, block_dk, block_dv, query.dtype)
    meta_dq["BIAS_MODE"] = meta_dkdv["BIAS_MODE"] = bi.mode
    db_mode, db_target, db_strides, db_partial = _dbias_plan(bi, db, query, key, jagged)
    meta_dkdv["DBIAS_MODE"] = db_mode
    if not tuned:
        by_query = bi.mode == QUERY_BIAS.value
        meta_dq.update(_fixed_config(block_l, bn_dq, block_dk, block_dv, esize, "dq", by_query))
        meta_dkdv.update(_fixed_config(block_l, bn_dkdv, block_dk, block_dv, esize, "dkdv",
                                       by_query))

    # The softmax anchors of each query, written by the dq kernel for the dk/dv kernel.
    anch = torch.empty((2, B, N, H), dtype=torch.float32, device=query.device)
    operands = (
        *query.stride(), *_kv_strides(key, jagged), *_kv_strides(value, jagged),
        stride_idx, stride_mb, stride_ml, *bi.strides,
        *grad_out.stride(),
    )
    bias_ptr = bi.pointer(key)
    # dq: one program per (row, query block, head).
    dq_args = (query, key, value, idx, mk, bias_ptr, grad_out, lse, delta, dq, anch,
               float(scale), float(RESTAT_ABOVE), *operands,
               *lse.stride(), *delta.stride(), *dq.stride(), *anch.stride(),
               N, L, max_len, Dk, Dv, bi.group, n_key(N))
    dq_grid = (B * qblocks, H)
    (_dq_tuned if tuned else _attention_pool_bwd_dq_kernel)[dq_grid](*dq_args, **meta_dq)

    # dk/dv: one program per (row, L tile, head).
    row_len = _jagged_grid_len(offsets, L, max_len) if jagged else L
    if row_len > 0:
        def dkdv_grid(m):
            return (B * triton.cdiv(row_len, m["BLOCK_L"]), H)

        dkdv_args = (query, key, value, idx, mk, bias_ptr, grad_out, anch, delta, dk, dv,
                     db_target if db_target is not None else dk,
                     float(scale), *operands,
                     *anch.stride(), *delta.stride(),
                     *_kv_strides(dk, jagged), *_kv_strides(dv, jagged), *db_strides,
                     N, L, max_len, row_len, Dk, Dv, bi.group, n_key(N))
        (_dkdv_tuned if tuned else _attention_pool_bwd_dkdv_kernel)[dkdv_grid](
            *dkdv_args, **meta_dkdv)
        if db is not None and db_mode == NO_BIAS.value:
            _launch_dbias(bi, db, query, key, value, idx, mk, grad_out, anch, delta, operands,
                          layout, scale, L, max_len, row_len, jagged, block_l)
    if db is None:
        return dq, dk, dv
    if db_partial is not None:  # one partial sum per head: summed in a fixed order
        db.copy_(db_partial.sum(1 if not jagged else 0).reshape(db.shape))
    return dq, dk, dv, db


def _dbias_plan(bi, db, query, key, jagged):
    """How the dk/dv kernel helps with the bias gradient: (DBIAS_MODE, target tensor, its
    strides, the per-head partial to sum afterwards or None).

    QUERY_BIAS: every element of the gradient is one ds (a bias per query and head, or per
    query with one head): written directly. ROW_BIAS: a bias shared by all queries, which one
    dk/dv program (one head, all queries) sees whole: its column sums, directly, or per head
    into a [B, H, L] / [H, T] partial when one bias row serves every head. NO_BIAS: the
    dbias kernel does it (sums across programs of the dk/dv kernel)."""
    if db is None:
        return NO_BIAS.value, None, (0, 0, 0, 0, 0), None
    one_head = bi.hb > 1 or bi.heads == 1
    if bi.nb == bi.nq and one_head:
        return QUERY_BIAS.value, db, _BiasView(db, query, jagged).strides, None
    if bi.nb > 1:
        return NO_BIAS.value, None, (0, 0, 0, 0, 0), None
    if one_head:
        return ROW_BIAS.value, db, _BiasView(db, query, jagged).strides, None
    if jagged:
        part = torch.zeros((bi.heads, key.shape[0]), dtype=torch.float32, device=key.device)
        strides = (0, 0, 0, part.stride(0), part.stride(1))
    else:
        part = torch.zeros((key.shape[0], bi.heads, key.shape[1]), dtype=torch.float32,
                           device=key.device)
        strides = (part.stride(0), 0, 0, part.stride(1), part.stride(2))
    return ROW_BIAS.value, part, strides, part


def _launch_dbias(bi, db, query, key, value, idx, mk, grad_out, anch, delta, operands, layout,
                  scale, L, max_len, row_len, jagged, block_l):
    """The dbias kernel, for the bias gradients whose sums run across dk/dv programs."""
    B, Nq, H, Dk = query.shape
    Dv = value.shape[-1]
    view = _BiasView(db, query, jagged)
    block_dk, block_dv = head_block(Dk), head_block(Dv)
    esize = query.element_size()
    n_outer = Nq // view.group
    bn = query_block(n_outer, block_dk, block_dv, esize, "dq")
    meta = _meta(layout, bn, block_dk, block_dv, query.dtype)
    meta.update(_fixed_config(block_l, bn, block_dk, block_dv, esize, "dq", True))
    grid = (B, triton.cdiv(row_len, meta["BLOCK_L"]))
    _attention_pool_bwd_dbias_kernel[grid](
        query, key, value, idx, mk, bi.tensor, grad_out, anch, delta, db,
        float(scale), *operands, *anch.stride(), *delta.stride(),
        *(st for i, st in enumerate(view.strides) if i != 1),
        n_outer, H, L, max_len, Dk, Dv, view.group,
        PER_J=view.strides[2] != 0, PER_H=view.strides[3] != 0, **meta)
