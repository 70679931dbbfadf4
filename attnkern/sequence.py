"""attnkern.sequence_attention: self-attention over a jagged or padded sequence, with causal,
target-aware (HSTU's M-FALCON), contextual and local-window masks, softmax or HSTU's SiLU
normalization and a relative time/position bias that the fused kernels compute from the small
tables themselves. The public function: validation, layout normalisation, backend dispatch.
The op-level layout it hands the fused ops is docs/sequence_attention.md."""

from __future__ import annotations

from typing import Optional

import torch

from ._sequence_validation import check_sequence_values, validate_sequence
from .functional import _resolve_for_transforms
from .ops.time_bias import reached_bounds
from .reference import sequence_attention_ref

_TIME_BUCKET_CODES = {"log": 0, "sqrt": 1}


def time_bucket_bounds(time_bucket: str, num_buckets: int, device) -> torch.Tensor:
    """The fused ops' time_bounds [NB - 1] int64: bucket(dt) = the number of bounds <= |dt|.
    The bounds of the buckets some int64 gap reaches (attnkern.ops.time_bias.reached_bounds:
    the reference's own formula, boundaries included, so the kernels need no logarithm), then
    2^63 - 1 for the others (reached by no gap below the int64 maximum itself)."""
    bounds = reached_bounds(time_bucket, num_buckets, device)
    missing = max(int(num_buckets) - 1 - bounds.numel(), 0)
    return torch.cat([bounds, bounds.new_full((missing,), 2 ** 63 - 1)]) if missing else bounds


def canonical_sequence_args(prob, query, key, value, offsets, lengths, max_length, causal,
                            num_targets, contextual_len, max_attn_len, key_times, query_times,
                            time_table, position_table, attn_scale, bias, time_bucket):
    """The fused ops' arguments, in their schema's order (docs/sequence_attention.md)."""
    T, H, Hkv = prob.T, prob.H, prob.Hkv
    dev = query.device
    if prob.layout == "jagged":
        o = offsets.to(torch.long)
        starts, lens = o[:-1], o[1:] - o[:-1]
        ml = -1 if max_length is None else int(max_length)
    else:
        B, L = prob.B, prob.L
        starts = torch.arange(B, dtype=torch.long, device=dev) * L
        lens = (torch.full((B,), L, dtype=torch.long, device=dev) if lengths is None
                else lengths.to(torch.long))
        ml = L
    q = query.reshape(T, H, prob.Dk)
    k = key.reshape(T, Hkv, prob.Dk)
    v = value.reshape(T, Hkv, prob.Dv)
    nt = None if num_targets is None else num_targets.to(torch.long)
    a_t = attn_scale.reshape(T) if isinstance(attn_scale, torch.Tensor) else None
    a_v = float(attn_scale) if attn_scale is not None and a_t is None else None
    if time_table is not None:
        qt, kt = query_times.reshape(T).to(torch.long), key_times.reshape(T).to(torch.long)
        bounds = time_bucket_bounds(time_bucket, time_table.shape[0], dev)
    else:
        qt = kt = bounds = None
    return (q, k, v, starts, lens, ml, nt, int(contextual_len), int(max_attn_len), bool(causal),
            prob.silu, prob.scale, a_t, a_v, qt, kt, time_table, bounds, position_table, bias)


def sequence_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    offsets: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    *,
    max_length: Optional[int] = None,
    causal: bool = True,
    num_targets: Optional[torch.Tensor] = None,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    normalization: str = "softmax",
    scale: Optional[float] = None,
    key_times: Optional[torch.Tensor] = None,
    query_times: Optional[torch.Tensor] = None,
    time_table: Optional[torch.Tensor] = None,
    position_table: Optional[torch.Tensor] = None,
    attn_scale=None,
    bias: Optional[torch.Tensor] = None,
    time_bucket: str = "log",
    return_lse: bool = False,
    backend: str = "auto",
):
    """Self-attention over the positions of each row of a jagged or padded sequence.

    ``s_ij = scale * <q_i, k_j> + position_table[min(|i - j|, P - 1), h]
    + time_table[bucket(query_times_i - key_times_j), h] + bias[b, h, i, j]`` over the keys j
    that query i may attend (the mask below), then ``out_i = sum_j softmax_j(s_ij) v_j``
    (``normalization="softmax"``) or ``out_i = attn_scale_i * sum_j silu(s_ij) v_j``
    (``"silu"``, HSTU). The full math is in attnkern.reference (sequence_attention_ref) and
    docs/sequence_attention.md.

    Args:
        query, key, value: jagged [T, H, Dk], [T, Hkv, Dk], [T, Hkv, Dv] with ``offsets``, or
            padded [B, L, H, Dk], [B, L, Hkv, Dk], [B, L, Hkv, Dv] (with optional ``lengths``).
            Hkv divides H: query head h uses K/V head h // (H // Hkv).
        offsets: jagged only, [B + 1] int32/int64: row b is tokens offsets[b]:offsets[b+1].
        lengths: padded only, [B] int32/int64: row b is its first lengths[b] positions (None:
            all L).
        max_length: jagged only, an int >= every row's length: the L of a dense ``bias``, and
            the default SiLU ``attn_scale`` 1 / max_length (None: the longest row).
        causal: query i attends keys j <= i (else every key of its row).
        num_targets: [B] int32/int64: the last num_targets[b] positions of row b are
            candidates: each attends every history position and itself only.
        contextual_len: the first contextual_len positions of every row are attended by all
            and attend the whole history of their row.
        max_attn_len: > 0: a local window: a query attends only keys at most max_attn_len
            positions back (the contextual positions count as one, the targets sit right after
            the history).
        normalization: "softmax" or "silu".
        scale: logit scale, default 1 / sqrt(Dk).
        key_times, query_times: int32/int64 timestamps, [T] (jagged) or [B, L] (padded); needed
            with ``time_table``.
        time_table: [NB, Hb] (Hb 1 or H): adds time_table[bucket(query_times_i - key_times_j), h].
        position_table: [P, Hb]: adds position_table[min(|i - j|, P - 1), h].
        attn_scale: "silu" only: a float, or a per-query tensor [T] / [B, L]; default
            1 / max sequence length (max_length, or the padded L, or the longest row).
        bias: a dense extra bias [B, Hb, L, L] (L = max_length for jagged input).
        time_bucket: "log" (floor(ln(max(|dt|, 1)) / 0.301)) or "sqrt"
            (floor(sqrt(max(|dt|, 1)))), clamped to [0, NB - 1].
        return_lse: also return the log-sum-exp of the logits ("softmax" only), [T, H] or
            [B, L, H], float32 (float64 for float64 inputs).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        out shaped like query with Dv (query's dtype), or (out, lse). A query with no key to
        attend, and every padded position, gives 0 (lse -inf). Differentiable w.r.t. query,
        key, value, time_table, position_table and bias.
    """
    prob = validate_sequence(query, key, value, offsets, lengths, max_length, causal, num_targets,
                             contextual_len, max_attn_len, normalization, scale, key_times,
                             query_times, time_table, position_table, attn_scale, bias,
                             time_bucket, return_lse)
    name = _resolve_for_transforms(backend, query)
    check_sequence_values(prob, offsets, lengths, num_targets, max_length)
    if name == "reference":
        out, lse = sequence_attention_ref(
            query, key, value, offsets, lengths, max_length=max_length, causal=causal,
            num_targets=num_targets, contextual_len=contextual_len, max_attn_len=max_attn_len,
            normalization=normalization, scale=prob.scale, key_times=key_times,
            query_times=query_times, time_table=time_table, position_table=position_table,
            attn_scale=attn_scale, bias=bias, time_bucket=time_bucket)
    else:
        from .ops.sequence import sequence_fused_op
        args = canonical_sequence_args(prob, query, key, value, offsets, lengths, max_length,
                                       causal, num_targets, contextual_len, max_attn_len,
                                       key_times, query_times, time_table, position_table,
                                       attn_scale, bias, time_bucket)
        out, lse = sequence_fused_op(name)(*args)
        lead = tuple(query.shape[:-2])
        out = out.reshape(lead + (prob.H, prob.Dv)).to(query.dtype)
        lse = lse.reshape(lead + (prob.H,))
    if prob.T == 0:
        out = _with_graph(out, query, key, value, time_table, position_table, bias)
    return (out, lse) if return_lse else out


def _with_graph(out: torch.Tensor, *inputs) -> torch.Tensor:
    """An empty output joined to the autograd graph of the inputs that require a gradient (the
    reference builds none for an empty batch): backward then gives them zero gradients."""
    live = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if out.requires_grad or not live or not torch.is_grad_enabled():
        return out
    return out + sum(t.sum() for t in live) * 0
