"""Triton kernel of the top-k by score (attnkern.attention_topk, the op
attnkern::triton_attention_topk_fwd).

One program per (row, query block, query head) streams the row's K tiles once, as the
attention-pool forward does, and keeps a running top-k per query: the [B, N, H, L] score tensor
is never formed. Rules (those of the CPU kernels and attnkern.reference.attention_topk_ref):
ties keep the lower position first, a NaN score ranks above every number, positions outside
the row, masked ones and those whose score is -inf (a -inf bias) are never selected, and the
slots past the row's selected positions hold index -1 and score -inf.

Ranking: each (score, position) pair becomes one int64 sort key, the float32 score's bits made
order-preserving as a signed int32 in the high half (NaN canonicalised to the positive quiet
NaN, above +inf) and 2^32 - 1 - position in the low half (equal scores: the lower position is
the larger key). Keys are distinct within a row, so the order is total and deterministic. Per
tile: sort the tile's keys ascending, keep its best KP (the last KP of the sorted tile are the
elementwise max over its KP-wide chunks), and merge them with the kept KP, sorted descending:
the elementwise max of a descending and an ascending sequence holds the KP largest of both
(a bitonic sequence), which one more sort orders. A tile none of whose keys beats the block's
smallest kept key is skipped (the common case once the kept set has filled on long rows).

Launch (no autotuning): BLOCK_N queries of one head share each K tile (16 with tl.dot from
five queries on, else the next power of two); BLOCK_L = max(KP, 64) on CUDA; q.k over head-dim
chunks of BLOCK_DC (K chunks of at most FP32_DOT_KV_TILE elements, the float32 tl.dot rule of
attention_pool's sm_90 calibration); 4 warps for 16-bit inputs with tiles of at most 64 x 16,
else 8 (float32 tl.dot needs them, as in SM90_CONFIGS.md); 2 stages, 1 from KP = 128 on (two
stages of a 256-wide tile passed the 227 KB of shared memory); .maxnreg 255. Compiled for sm_90
(Triton 3.8 and its ptxas, no GPU): 16-bit inputs spill nothing up to k = 256 (Dk up to 256);
float32 ones spill at most 36 bytes from k = 64 on (Dk 128-256, at 255 registers); shared memory
at most 80 KB. k <= MAX_K (KP = 256) keeps it so.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_pool import (FP32_DOT_KV_TILE, INTERPRET_BLOCK_L, NO_BIAS, QUERY_BIAS, ROW_BIAS,
                             SMALL_N, _bias_tile, _layout_args, _load_rows, _mm, _query_block_program,
                             _tile_valid, fp32_dot_precision, head_block, interpret_mode, native_dot)

# The largest k: KP = next power of two of k rows of int64 keys per query stay in registers.
MAX_K = 256
# Row positions must fit the low 32 bits of a sort key.
MAX_ROW_POSITIONS = 2 ** 32 - 1
GPU_BLOCK_L = 64
# ptxas left to itself capped some of these launches at 128 registers and spilled (sm_90
# compiles, see the module docstring); 255 is what 8 warps may have.
MAXNREG = 255
_LOW = tl.constexpr(4294967295)  # 2^32 - 1


@triton.jit
def _sort_keys(s, pos_in_row):
    """int64 keys ordering (score, -position): NaN first, then by score, ties by position."""
    s = tl.where(s != s, float("nan"), s)
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (_LOW - pos_in_row.to(tl.int64))


@triton.jit
def _decode_keys(keys):
    """(score float32, position int64) of sort keys; -1 where the score is -inf (no position)."""
    high = (keys >> 32).to(tl.int32)
    bits = tl.where(high >= 0, high, high ^ 0x7FFFFFFF)
    s = bits.to(tl.float32, bitcast=True)
    pos = _LOW - (keys & _LOW)
    none = s == float("-inf")
    return s, tl.where(none, -1, pos)


@triton.jit
def _attention_topk_fwd_kernel(
    Q, K, IDX, MASK, BIAS, SCORES, INDICES,
    scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_idx, stride_mb, stride_ml,
    stride_bb, stride_bn, stride_bh, stride_bl,
    stride_sb, stride_sn, stride_sh, stride_sk,
    N, L, DK, KV_GROUP, TOPK,
    LAYOUT: tl.constexpr, BIAS_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DC: tl.constexpr,
    KP: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NATIVE_DOT: tl.constexpr,
):
    b, h, start, end, offs_n, n_ok = _query_block_program(IDX, stride_idx, N, L, -1, 1, LAYOUT,
                                                          BLOCK_N, BLOCK_L, False)
    offs_dc = tl.arange(0, BLOCK_DC).to(tl.int64)
    offs_l = tl.arange(0, BLOCK_L)
    offs_k = tl.arange(0, KP)

    # Phase 1: the query block's rows; its queries share each K tile (their head-dim chunks are
    # read per tile, from cache).
    q_base = Q + b * stride_qb + h * stride_qh
    # Query head h reads K/V head h // KV_GROUP (shared K/V heads).
    k_base = K + b * stride_kb + (h // KV_GROUP) * stride_kh
    # Keys of a -inf score: no position (below every selectable key).
    kept = _sort_keys(tl.full([BLOCK_N, KP], float("-inf"), tl.float32),
                      tl.zeros([BLOCK_N, KP], tl.int64))

    # Phase 2: score each tile (-inf outside the row), fold its best KP into the kept KP.
    for t in range(0, tl.cdiv(end - start, BLOCK_L)):
        pos = start + t * BLOCK_L + offs_l
        valid = _tile_valid(MASK, b, pos, pos < end, stride_mb, stride_ml, LAYOUT)
        # q.k over head-dim chunks of BLOCK_DC: a KP-wide tile keeps its K operand small.
        s = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
        for d0 in tl.static_range(0, BLOCK_DK, BLOCK_DC):
            offs_d = d0 + offs_dc
            qc = _load_rows(q_base, offs_n, n_ok, offs_d, stride_qn, stride_qd, DK)
            kc = _load_rows(k_base, pos, valid, offs_d, stride_kl, stride_kd, DK)
            s += _mm(qc, tl.trans(kc), USE_DOT, DOT_PRECISION, NATIVE_DOT)
        s = s * scale
        if BIAS_MODE != 0:
            s += _bias_tile(BIAS, b, offs_n, n_ok, h, pos, valid, 1,
                            stride_bb, stride_bn, 0, stride_bh, stride_bl, BIAS_MODE)
        s = tl.where(valid[None, :], s, float("-inf"))
        keys = _sort_keys(s, pos - start)
        if tl.max(tl.max(keys, axis=1), axis=0) > tl.min(tl.min(kept, axis=1), axis=0):
            tile = tl.sort(keys, dim=1, descending=False)
            best = tl.max(tl.reshape(tile, [BLOCK_N, BLOCK_L // KP, KP]), axis=1)
            kept = tl.sort(tl.maximum(kept, best), dim=1, descending=True)

    # Phase 3: the first k kept, best first; -1 / -inf past the row's selectable positions.
    scores, idx = _decode_keys(kept)
    out = (b * stride_sb + h * stride_sh + offs_n[:, None] * stride_sn
           + offs_k[None, :].to(tl.int64) * stride_sk)
    ok = n_ok[:, None] & (offs_k[None, :] < TOPK)
    tl.store(SCORES + out, scores, mask=ok)
    tl.store(INDICES + out, idx, mask=ok)


def topk_blocks(n: int, k: int, dk: int, dtype_bytes: int, interpret: bool):
    """(BLOCK_N, BLOCK_L, KP, BLOCK_DC, launch options) of a launch: see the module docstring."""
    kp = max(2, triton.next_power_of_2(max(int(k), 1)))
    block_n = triton.next_power_of_2(max(int(n), 1)) if n <= SMALL_N else 16
    block_l = max(kp, INTERPRET_BLOCK_L if interpret else GPU_BLOCK_L)
    block_dc = min(head_block(dk), max(16, FP32_DOT_KV_TILE // block_l))
    small = block_n * block_l <= 1024 and block_l <= 64 and dtype_bytes == 2
    options = {"num_warps": 4 if small else 8, "num_stages": 2 if block_l <= 64 else 1,
               "maxnreg": MAXNREG}
    return block_n, block_l, kp, block_dc, options


def attention_topk_fwd(query: torch.Tensor, key: torch.Tensor, k: int,
                       lengths: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       offsets: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                       bias: Optional[torch.Tensor] = None, *, block_dc: Optional[int] = None):
    """Launcher on canonical tensors (checked by the op): query [B, N, H, Dk], key padded
    [B, L, Hkv, Dk] or jagged [T, Hkv, Dk] with offsets, bias padded [B, Nb, Hb, L] or jagged
    [T, Nb, Hb] (Nb 1 or N, Hb 1 or H). Returns (scores float32, indices int64), each
    [B, N, H, k]. Row bounds are clamped in-kernel (no read outside key whatever the index
    values). block_dc: the head-dim chunk of q.k (None: topk_blocks' choice)."""
    if k > MAX_K:
        raise ValueError("attnkern: the triton top-k keeps at most k = %d positions per query, got "
                         "k = %d (use backend='cpu' or 'reference' for more)" % (MAX_K, k))
    B, N, H, Dk = query.shape
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    scores = torch.full((B, N, H, k), float("-inf"), dtype=torch.float32, device=query.device)
    indices = torch.full((B, N, H, k), -1, dtype=torch.int64, device=query.device)
    jagged = offsets is not None
    L = key.shape[0] if jagged else key.shape[1]
    if k == 0 or B == 0 or L == 0:
        return scores, indices
    if L > MAX_ROW_POSITIONS:
        raise ValueError("attnkern: the triton top-k takes rows of at most 2^32 - 1 positions, got %d" % L)
    layout, idx, stride_idx, mk, (stride_mb, stride_ml), _, L, _ = _layout_args(
        key, lengths, mask, offsets, -1)
    Hkv = key.shape[-2]
    sk = (0,) + tuple(key.stride()) if jagged else tuple(key.stride())
    if bias is None:
        bias_mode, bstr, bptr = NO_BIAS.value, (0, 0, 0, 0), key
    else:
        bias_mode = (ROW_BIAS if bias.shape[1] == 1 else QUERY_BIAS).value
        bstr = ((0 if jagged else bias.stride(0)),
                bias.stride(1) if bias.shape[1] > 1 else 0,
                bias.stride(2) if bias.shape[2] > 1 else 0,
                bias.stride(0) if jagged else bias.stride(3))
        bptr = bias
    block_n, block_l, kp, dc, options = topk_blocks(N, k, Dk, query.element_size(), interpret_mode())
    block_dc = dc if block_dc is None else int(block_dc)
    grid = (B * triton.cdiv(N, block_n), H)
    _attention_topk_fwd_kernel[grid](
        query, key, idx, mk, bptr, scores, indices, float(scale),
        *query.stride(), *sk, stride_idx, stride_mb, stride_ml, *bstr, *scores.stride(),
        N, L, Dk, H // Hkv, k,
        LAYOUT=layout, BIAS_MODE=bias_mode, BLOCK_N=block_n, BLOCK_L=block_l,
        BLOCK_DK=head_block(Dk), BLOCK_DC=block_dc, KP=kp, USE_DOT=block_n > SMALL_N,
        DOT_PRECISION=fp32_dot_precision(), NATIVE_DOT=native_dot(query.dtype), **options)
    return scores, indices
