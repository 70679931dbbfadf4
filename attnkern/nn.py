"""The layers: `AttentionPooling`, the drop-in layer around `attnkern.attention_pool`, and
`ActivationUnitPooling`, DIN's activation unit around `attnkern.activation_unit_pool`.

Projections in, the fused pooling in the middle, a projection out. With A = attention_dim
split into H heads of Dh = A / H::

    q = W_q query                        [B, (N,) H, Dh]
    k = W_k keys, v = W_v values         [B, L, H, Dh]  (or jagged [T, H, Dh])
    o = attention_pool(q, k, v, ...)     [B, (N,) H, Dh]
    out = W_o concat_heads(o)            [B, (N,) E]

The same result can be had without projecting the history at all ("absorbed" order). The
logit of head h at position l is

    <W_q^h q + b_q^h, W_k^h k_l + b_k^h> = <(W_k^h)^T (W_q^h q + b_q^h), k_l> + c_h

where c_h does not depend on l, so the softmax cancels it; and the pooled head is

    sum_l p_l (W_v^h v_l + b_v^h) = W_v^h (sum_l p_l v_l) + b_v^h    (0 on an empty row).

So the pooling runs with H query vectors of width kdim over the raw keys and values (one K/V
head shared by the H query heads) and W_v is applied to H pooled vectors instead of L rows.
Which order is cheaper depends on the shape; `absorb_cost` is the model "auto" uses.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ._jagged import unpack_history
from .functional import (DICE_STATISTICS, activation_unit_pool, activation_unit_weights, attention_pool,
                         attention_weights, dice_batch_statistics, position_query_inputs)
from .ops.time_bias import fused_time_bias
from .reference import ACTIVATIONS, MAX_UNITS, TIME_BUCKET_WIDTH, dice_params
from .reference import log_time_bucket as time_bucket

__all__ = ["AttentionPooling", "ActivationUnitPooling", "absorb_cost", "time_bucket", "recency"]

# How many multiply-adds of the projections (GEMMs) one multiply-add of the fused pooling is
# worth. Calibrated on this project's 2-core CPU (B=1024, E=64, L=200, H in {2, 4}, fwd and
# fwd+bwd): the absorbed order was faster at N x H = 64 and slower at N x H = 128, which
# brackets the weight in (0.7, 1.2). The projected order's projections are memory-bound
# passes over the padded history (and their backward two more), not compute-bound GEMMs.
POOL_COST_WEIGHT = 1.0


def _size_hint(x, fallback):
    """A size as a number: x itself, or for a symbolic size its example value (the hint,
    read without adding a guard), or `fallback` where it has none."""
    if not isinstance(x, (torch.SymInt, torch.SymFloat)):
        return x
    node = getattr(x, "node", None)
    hint = getattr(node, "hint", None) if node is not None and node.has_hint() else None
    return fallback if hint is None or isinstance(hint, (torch.SymInt, torch.SymFloat)) else hint


def absorb_cost(N: int, H: int, L: float, E: int, kdim: int, vdim: int,
                attention_dim: Optional[int] = None) -> Tuple[float, float]:
    """The cost model behind ``absorb="auto"``: (projected, absorbed) multiply-adds of one
    forward, per history row, for N queries of H heads over a history of (mean padded) length
    L, with keys of width kdim, values of width vdim and an attention width A (default E).

    Terms both orders share (the query and output projections) are left out::

        projected = A (kdim + vdim)                       K and V projections of the row
                  + w N 2A                                pooling of N x H heads of A / H
        absorbed  = w N H (kdim + vdim)                   pooling of N x H queries of width kdim
                  + N A (kdim + vdim) / L                 W_k folded into, W_v applied to, N x H
                                                          vectors per row, spread over L rows

    with w = POOL_COST_WEIGHT. "auto" absorbs when absorbed <= projected: roughly when N x H
    is below A. The backward of either order costs about twice its forward, so the same
    comparison holds for training."""
    A = E if attention_dim is None else attention_dim
    w = POOL_COST_WEIGHT
    kv = kdim + vdim
    projected = A * kv + w * N * 2 * A
    absorbed = w * N * H * kv + N * A * kv / max(L, 1.0)
    return float(projected), float(absorbed)


def recency(num_positions: int, lengths=None, mask=None, offsets=None, *, total=None,
            device=None) -> torch.Tensor:
    """How many valid items of its row follow each position (0 = the row's last valid item):
    [B, L] int64 for a padded history (valid prefix ``lengths``, any ``mask`` such as
    left-padded "pre" histories, or none: every position), [T] for a jagged one (``offsets``,
    ``total`` = T). Values at invalid positions are meaningless but >= 0."""
    if offsets is not None:
        pos = torch.arange(total, device=offsets.device, dtype=offsets.dtype)
        row = torch.searchsorted(offsets, pos, right=True).clamp(1, offsets.shape[0] - 1)
        return (offsets[row] - 1 - pos).long().clamp(min=0)
    if mask is not None:
        m = mask.to(torch.int64)
        return m.sum(1, keepdim=True) - m.cumsum(1)
    pos = torch.arange(num_positions, device=device)
    if lengths is None:
        return (num_positions - 1 - pos).unsqueeze(0)
    return (lengths.to(torch.int64).unsqueeze(1) - 1 - pos).clamp(min=0)


def _lookup(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """weight [H, K] at int indices idx (any shape) -> [H, *idx.shape]. index_select's
    backward is an index_add: ~40x faster on CPU than F.embedding's (B=1024, L=200), which
    sorts the indices."""
    return weight.index_select(1, idx.reshape(-1)).view((weight.shape[0],) + tuple(idx.shape))


def _bias_as(pool: dict, query_dtype: torch.dtype) -> dict:
    """`pool` with its bias (if any) in a dtype the op takes for that query: float32, or
    float64 for a float64 query (the tables' precision is kept, never rounded to bf16)."""
    bias = pool.get("bias")
    if bias is None:
        return pool
    want = torch.float64 if query_dtype == torch.float64 else torch.float32
    return dict(pool, bias=bias.to(want))


def _positive_int(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 1:
        raise ValueError("%s must be a positive int, got %r" % (name, x))
    return int(x)


class AttentionPooling(nn.Module):
    """Multi-head target attention pooling over a padded or jagged history.

    Each query (a candidate item, a learned query, ...) attends over its row's valid keys and
    gets one pooled vector back. The layer owns the query, key, value and output projections
    (a drop-in for FuxiCTR's ``MultiHeadTargetAttention`` and for ``nn.MultiheadAttention``
    with one query per row); the pooling itself is the fused `attnkern.attention_pool`.

    Args:
        embed_dim: E, the size of the query and of the output.
        num_heads: H; ``attention_dim`` must be divisible by it.
        kdim: size of the keys' last dim (default E).
        vdim: size of the values' last dim (default ``kdim``).
        attention_dim: A, the width the projections map into, split into H heads of A / H
            (default E; FuxiCTR's ``attention_dim``).
        scale: the logit scale, default ``1 / sqrt(A / H)``; 1.0 for unscaled dot products
            (FuxiCTR's ``use_scale=False``).
        projections: False uses query and keys as they are (no parameters; needs
            kdim = vdim = E; FuxiCTR's ``use_qkvo=False``): the output is the concatenated
            pooled heads, [B, (N,) E].
        absorb: the evaluation order, both exact. True never projects the history: W_k is
            folded into the query of each head and W_v is applied after the pooling, so the
            pooling reads the raw keys and values once for all heads. False projects keys and
            values first (the textbook order). "auto" (default) picks the cheaper one for
            each call's shape by `absorb_cost`: absorbed when N x H is small next to A, e.g.
            one candidate per row; projected for many candidates. When N or L is symbolic
            (torch.export with dynamic shapes) "auto" decides for the traced example's N and L
            (without a guard, so the sizes stay dynamic), and the exported graph holds that one
            order for every size: export with an example of the shape you serve (``attnkern
            export --example-shape``), or fix the order with True / False.
        bias: whether the four projections have a bias.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton", passed to `attention_pool`.
        time_buckets: NB, to learn how much an item counts by how long before the query it
            happened: a per-head table ``time_bias_weight`` [H, NB] indexed by the log bucket
            of ``|query_time - key_time|`` (`time_bucket`: generative-recommenders' buckets,
            each a factor of 1.35 wider than the last; gaps past the table share its last
            entry). The forward then needs ``key_times`` and ``query_time``. None (default):
            no time term.
        recency_buckets: NR, to learn how much an item counts by its place from the end of
            the history: a per-head table ``recency_bias_weight`` [H, NR] indexed by
            `recency` (0 for the row's last valid item, 1 for the one before, ...; NR - 1 and
            beyond share the last entry), on right- or left-padded ("pre") histories alike.
            None (default): no recency term.

    The two tables add ``time_bias_weight[h, bucket] + recency_bias_weight[h, recency]`` to
    head h's logit of each history item (after the scale), through ``attention_pool(bias=)``:
    one [B, H, L] (jagged [T, H]) bias built by lookups of int buckets and shared by the N
    queries of a row, in either evaluation order. Both tables start at zero (the plain layer).

    Forward:
        query: [B, E] (one query per row) or [B, N, E] (N candidates sharing a row's history).
        keys: padded [B, L, kdim], or jagged [T, kdim] together with ``offsets`` [B+1], or a
            torchrec ``JaggedTensor`` of [T, kdim] values (its offsets are used; no copy).
        values: like ``keys`` with last dim ``vdim``; defaults to ``keys``.
        lengths: padded only, [B] int32/int64: row b's valid prefix is ``keys[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part (the SDPA convention;
            FuxiCTR's 0/1 float mask ``m`` is ``mask=m.bool()``).
        key_padding_mask: padded only, [B, L] bool, True = padding (nn.MultiheadAttention's
            convention), the same as ``mask=~key_padding_mask``. At most one of ``lengths``,
            ``mask`` and ``key_padding_mask``; with none, every position takes part.
            Left-padded ("pre") histories need a mask: lengths mean a valid prefix.
        offsets: jagged only, [B+1] int32/int64: row b is ``keys[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional Python int >= every row's length (saves a device
            sync; needed with the reference backend under ``torch.compile``).
        key_times: with ``time_buckets`` only: each history item's time (any unit; integer or
            floating), padded [B, L] (values at padding are ignored) or jagged [T].
        query_time: with ``time_buckets`` only: [B], the time of each row's query (the
            request time, shared by the row's N candidates).

        need_weights: also return the attention weights (`attnkern.attention_weights`):
            ``(out, weights)`` with weights [B, H, L] or [B, N, H, L] (jagged [T, H] or
            [T, N, H]), float32 (float64 for float64), exactly 0 at padding and on empty rows.
            Per head, never averaged (take ``weights.mean(-2)`` for the heads' mean, or
            ``.mean(-1)`` jagged).

    Returns:
        [B, E] or [B, N, E], in the dtype of the projections' output (the autocast dtype under
        ``torch.autocast``). A row with an empty history pools to zero, so its output is the
        output projection's bias (zero without projections). (FuxiCTR's layer, which masks
        with -1e9, gives such a row the mean of all its padded values instead.)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        *,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        attention_dim: Optional[int] = None,
        scale: Optional[float] = None,
        projections: bool = True,
        absorb="auto",
        bias: bool = True,
        backend: str = "auto",
        time_buckets: Optional[int] = None,
        recency_buckets: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        kdim = embed_dim if kdim is None else _positive_int(kdim, "kdim")
        vdim = kdim if vdim is None else _positive_int(vdim, "vdim")
        if not isinstance(projections, bool):
            raise TypeError("projections must be a bool, got %s" % type(projections).__name__)
        if attention_dim is None:
            attention_dim = embed_dim
        else:
            attention_dim = _positive_int(attention_dim, "attention_dim")
            if not projections and attention_dim != embed_dim:
                raise ValueError(
                    "attention_dim (%d) must be embed_dim (%d) with projections=False: without "
                    "projections the heads split the embedding itself" % (attention_dim, embed_dim))
        if attention_dim % num_heads != 0:
            raise ValueError(
                "attention_dim (%d%s) must be divisible by num_heads (%d)"
                % (attention_dim, ", = embed_dim" if attention_dim == embed_dim else "", num_heads))
        if not projections and (kdim != embed_dim or vdim != embed_dim):
            raise ValueError(
                "projections=False uses query and keys as they are, so kdim and vdim must be "
                "embed_dim (%d); got kdim=%d, vdim=%d" % (embed_dim, kdim, vdim))
        if absorb not in ("auto", True, False):
            raise ValueError('absorb must be "auto", True or False, got %r' % (absorb,))
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError("scale must be a float or None, got %s" % type(scale).__name__)
            if not math.isfinite(float(scale)):
                raise ValueError("scale must be finite, got %r" % (scale,))
            scale = float(scale)
        if not isinstance(backend, str):
            raise TypeError("backend must be a str, got %s" % type(backend).__name__)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.attention_dim = attention_dim
        self.head_dim = attention_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        self.projections = projections
        self.absorb = absorb
        self.backend = backend
        self.time_buckets = None if time_buckets is None else _positive_int(time_buckets, "time_buckets")
        self.recency_buckets = (None if recency_buckets is None
                                else _positive_int(recency_buckets, "recency_buckets"))
        factory = {"device": device, "dtype": dtype}
        if self.time_buckets is not None:
            self.time_bias_weight = nn.Parameter(torch.zeros(num_heads, self.time_buckets, **factory))
        if self.recency_buckets is not None:
            self.recency_bias_weight = nn.Parameter(
                torch.zeros(num_heads, self.recency_buckets, **factory))
        if projections:
            self.q_proj = nn.Linear(embed_dim, attention_dim, bias=bias, **factory)
            self.k_proj = nn.Linear(kdim, attention_dim, bias=bias, **factory)
            self.v_proj = nn.Linear(vdim, attention_dim, bias=bias, **factory)
            self.out_proj = nn.Linear(attention_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for name in ("time_bias_weight", "recency_bias_weight"):
                if hasattr(self, name):
                    getattr(self, name).zero_()
        if not self.projections:
            return
        # nn.MultiheadAttention's initialisation: Xavier-uniform input projections, zero
        # biases. The default Linear init is ~1.7x smaller per projection, which starts the
        # softmax close to uniform (plain mean pooling) and slows learning which items matter.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return ("embed_dim=%d, num_heads=%d, kdim=%d, vdim=%d, attention_dim=%d, scale=%g, "
                "projections=%s, absorb=%r, backend=%r%s" % (
                    self.embed_dim, self.num_heads, self.kdim, self.vdim, self.attention_dim,
                    self.scale, self.projections, self.absorb, self.backend,
                    "".join(", %s=%d" % (n, v) for n, v in (("time_buckets", self.time_buckets),
                                                            ("recency_buckets", self.recency_buckets))
                            if v is not None)))

    def uses_absorbed_order(self, num_queries: int, mean_length: float) -> bool:
        """Whether a call with ``num_queries`` (N) queries per row over histories of
        ``mean_length`` (padded L, or T / B jagged) runs in the absorbed order."""
        if not self.projections:
            return False
        if self.absorb != "auto":
            return self.absorb
        if isinstance(num_queries, (torch.SymInt, torch.SymFloat)) or isinstance(
                mean_length, (torch.SymInt, torch.SymFloat)):
            # Symbolic sizes (torch.export with dynamic shapes): deciding on them would pin them
            # with a guard. Both orders are exact, so decide from the sizes of the traced example
            # (the symbols' hints, read without a guard: export with an example of the shape you
            # serve), or, where a size has no hint, as for one query over a long history.
            num_queries = _size_hint(num_queries, 1)
            mean_length = _size_hint(mean_length, float("inf"))
        projected, absorbed = absorb_cost(num_queries, self.num_heads, mean_length,
                                          self.embed_dim, self.kdim, self.vdim,
                                          self.attention_dim)
        return absorbed <= projected

    def _check(self, query, keys, values, offsets):
        for x, name in ((query, "query"), (keys, "keys"), (values, "values")):
            if not isinstance(x, torch.Tensor):
                raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise ValueError(
                "query must be [B, E] or [B, N, E] with E = embed_dim = %d, got %s"
                % (self.embed_dim, list(query.shape))
            )
        want = 2 if offsets is not None else 3
        layout = "jagged [T, %s] (with offsets)" if offsets is not None else "padded [B, L, %s]"
        for x, name, d in ((keys, "keys", self.kdim), (values, "values", self.vdim)):
            if x.dim() != want or x.shape[-1] != d:
                raise ValueError(
                    "%s must be %s, got %s" % (name, layout % ("%s=%d" % (
                        "kdim" if name == "keys" else "vdim", d)), list(x.shape))
                )
        if offsets is None:
            if keys.shape[0] != query.shape[0]:
                raise ValueError(
                    "keys must have the batch size of query (%d), got %s"
                    % (query.shape[0], list(keys.shape))
                )
            if values.shape[:2] != keys.shape[:2]:
                raise ValueError(
                    "values must be [B, L, vdim] with the B, L of keys %s, got %s"
                    % (list(keys.shape[:2]), list(values.shape))
                )
        elif values.shape[0] != keys.shape[0]:
            raise ValueError(
                "values must be jagged [T, vdim] with the T of keys (%d), got %s"
                % (keys.shape[0], list(values.shape))
            )

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
        *,
        mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None, max_length: Optional[int] = None,
        key_times: Optional[torch.Tensor] = None, query_time: Optional[torch.Tensor] = None,
        key_scale: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None,
        value_scale: Optional[torch.Tensor] = None, value_bias: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        if not isinstance(need_weights, bool):
            raise TypeError("need_weights must be a bool, got %s" % type(need_weights).__name__)
        keys, values, offsets = unpack_history(keys, values, offsets, ("keys", "values"), lengths=lengths,
                                               mask=mask, key_padding_mask=key_padding_mask)
        if values is None:
            if self.vdim != self.kdim:
                raise ValueError(
                    "values default to keys only when vdim == kdim (got kdim=%d, vdim=%d): "
                    "pass values" % (self.kdim, self.vdim)
                )
            values = keys
            if value_scale is None and value_bias is None:
                value_scale, value_bias = key_scale, key_bias
        self._check(query, keys, values, offsets)
        pool = dict(lengths=lengths, mask=mask, key_padding_mask=key_padding_mask,
                    offsets=offsets, max_length=max_length, scale=self.scale,
                    backend=self.backend)
        quant = dict(key_scale=key_scale, key_bias=key_bias, value_scale=value_scale, value_bias=value_bias)
        if any(t is not None for t in quant.values()):
            if need_weights:
                raise ValueError("need_weights=True is not available with a quantized history "
                                 "(key_scale/value_scale given): call attnkern.attention_weights "
                                 "on the dequantized keys (attnkern.dequantize_rows)")
            return self._quantized(query, keys, values, pool, quant, key_times, query_time)
        bias = self._time_bias(keys, lengths, mask, key_padding_mask, offsets, key_times,
                               query_time)
        if bias is not None:
            pool["bias"] = bias
        H, D = self.num_heads, self.head_dim
        if not self.projections:
            q, k = query.unflatten(-1, (H, D)), keys.unflatten(-1, (H, D))
            out = self._pool(q, k, values.unflatten(-1, (H, D)), pool)[0].flatten(-2)
            return (out, self._weights(q, k, pool)) if need_weights else out
        N = 1 if query.dim() == 2 else query.shape[1]
        if offsets is None:
            mean_length = keys.shape[1]
        else:
            mean_length = keys.shape[0] / max(offsets.shape[0] - 1, 1)
        q = self.q_proj(query).unflatten(-1, (H, D))  # [B, (N,) H, D]
        if self.uses_absorbed_order(N, mean_length):
            o = self._absorbed(q, keys, values, pool)
            if need_weights:  # the folded query over the raw keys: the same logits
                weights = self._weights(self._fold_key_proj(q, keys), keys.unsqueeze(-2), pool)
        else:
            k = self.k_proj(keys).unflatten(-1, (H, D))  # [B, L, H, D] or [T, H, D]
            v = self.v_proj(values).unflatten(-1, (H, D))
            o = self._pool(q, k, v, pool)[0]
            if need_weights:
                weights = self._weights(q, k, pool)
        out = self.out_proj(o.flatten(-2))
        return (out, weights) if need_weights else out

    def _quantized(self, query, keys, values, pool, quant, key_times, query_time):
        """The forward over a quantized history (docs/quantized.md): keys/values int8/uint8/
        float8 rows with per-row scale (and bias) [B, L] / [T], read by the pooling as they are
        stored. With projections the absorbed order is the only one that never projects (and
        so never dequantizes) the history."""
        if self.projections and self.absorb is False:
            raise ValueError("a quantized history needs the absorbed order (absorb=True or 'auto'): "
                             "the projected order would dequantize and project every history row")
        bias = self._time_bias(keys, pool["lengths"], pool["mask"], pool["key_padding_mask"],
                               pool["offsets"], key_times, query_time)
        if bias is not None:
            pool["bias"] = bias
        H, D = self.num_heads, self.head_dim
        if not self.projections:
            # Every head of a row shares its row's parameters.
            per_head = {n: None if t is None else t.unsqueeze(-1).expand(*t.shape, H) for n, t in quant.items()}
            q = query.unflatten(-1, (H, D))
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = attention_pool(q, keys.unflatten(-1, (H, D)), values.unflatten(-1, (H, D)),
                                     **_bias_as(pool, q.dtype), **per_head)
            return out.flatten(-2)
        q = self.q_proj(query).unflatten(-1, (H, D))
        one_head = {n: None if t is None else t.unsqueeze(-1) for n, t in quant.items()}
        return self.out_proj(self._absorbed(q, keys, values, pool, one_head).flatten(-2))

    def _time_bias(self, keys, lengths, mask, key_padding_mask, offsets, key_times, query_time):
        """The score bias of the time and recency tables (in their dtype): padded [B, H, L],
        jagged [T, H], or None without tables."""
        if self.time_buckets is None:
            for x, name in ((key_times, "key_times"), (query_time, "query_time")):
                if x is not None:
                    raise ValueError("%s is given but the layer has no time table: build it with "
                                     "time_buckets=NB to use times" % name)
        elif key_times is None or query_time is None:
            raise ValueError("the layer has a time table (time_buckets=%d): pass key_times= "
                             "(the history's times) and query_time= (each row's query time)"
                             % self.time_buckets)
        if self.time_buckets is None and self.recency_buckets is None:
            return None
        jagged = offsets is not None
        if self.time_buckets is not None:
            self._check_times(keys, offsets, key_times, query_time)
            if not jagged and mask is None and key_padding_mask is None:
                bias = fused_time_bias(key_times, query_time, lengths, self.time_bias_weight,
                                       getattr(self, "recency_bias_weight", None), keys.shape[1])
                if bias is not None:
                    return bias
        parts = []
        if self.time_buckets is not None:
            with torch.no_grad():
                if jagged:
                    pos = torch.arange(keys.shape[0], device=offsets.device, dtype=offsets.dtype)
                    row = torch.searchsorted(offsets, pos, right=True) - 1
                    at = query_time[row.clamp(0, offsets.shape[0] - 2)]
                else:
                    at = query_time.unsqueeze(1)
                if at.is_floating_point() or key_times.is_floating_point():
                    # Times such as 1.7e9 s keep about 100 s of precision in float32: the
                    # difference is taken in float64.
                    at, key_times = at.double(), key_times.double()
                idx = time_bucket(at - key_times, self.time_buckets)
            parts.append(_lookup(self.time_bias_weight, idx))
        if self.recency_buckets is not None:
            if key_padding_mask is not None:
                mask = ~key_padding_mask
            with torch.no_grad():
                r = recency(keys.shape[0] if jagged else keys.shape[1], lengths, mask, offsets,
                            total=keys.shape[0], device=keys.device)
                r = r.clamp(max=self.recency_buckets - 1)
            parts.append(_lookup(self.recency_bias_weight, r))
        bias = parts[0] if len(parts) == 1 else parts[0] + parts[1]  # [H, B or 1, L] / [H, T]
        if jagged:
            return bias.t()  # [T, H]
        return bias.transpose(0, 1).expand(keys.shape[0], -1, -1)  # [B, H, L]

    def _check_times(self, keys, offsets, key_times, query_time):
        for x, name in ((key_times, "key_times"), (query_time, "query_time")):
            if not isinstance(x, torch.Tensor):
                raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
            if x.dtype == torch.bool or x.is_complex():
                raise TypeError("%s must hold integer or floating times, got %s" % (name, x.dtype))
        B = keys.shape[0] if offsets is None else offsets.shape[0] - 1
        want = list(keys.shape[:1]) if offsets is not None else list(keys.shape[:2])
        if list(key_times.shape) != want:
            raise ValueError("key_times must be %s, one time per history item, got %s" % (
                "jagged [T] = %s" % want if offsets is not None else "padded [B, L] = %s" % want,
                list(key_times.shape)))
        if query_time.dim() != 1 or query_time.shape[0] != B:
            raise ValueError("query_time must be [B] = [%d], one time per row (shared by its "
                             "candidates), got %s" % (B, list(query_time.shape)))

    @staticmethod
    def _pool(q, k, v, pool):
        # Under autocast the projections already ran in the low-precision dtype; the pooling
        # takes one dtype for q, k, v and accumulates in float32 itself, so it runs with
        # autocast off (like a custom_fwd op) and is not re-cast op by op.
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            return attention_pool(q, k, v, return_lse=True, **_bias_as(pool, q.dtype))

    @staticmethod
    def _weights(q, k, pool):
        """attention_weights of the pooling `_pool` runs, [B, (N,) H, L] or [T, (N,) H]."""
        k = k.to(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            return attention_weights(q, k, **_bias_as(pool, q.dtype))

    def _fold_key_proj(self, q, keys, cast=True):
        """W_k^h folded into each head's query: [B, (N,) H, kdim], in the history's dtype with
        ``cast`` (under autocast a cast of the small query, never of the history). The bias b_k
        only adds a constant to every logit of a head, which the softmax cancels."""
        w_k = self.k_proj.weight.view(self.num_heads, self.head_dim, self.kdim)
        q_k = torch.einsum("...hd,hdk->...hk", q, w_k.to(q.dtype))
        return q_k.to(keys.dtype) if cast else q_k

    def _absorbed(self, q, keys, values, pool, quant=None):
        """The pooled heads [B, (N,) H, D] without projecting the history (module docstring).
        quant: the per-row parameters of a quantized history ([B, L, 1] / [T, 1]), or None."""
        H, D = self.num_heads, self.head_dim
        w_v = self.v_proj.weight.view(H, D, self.vdim)
        # b_k's gradient is exactly zero (see _fold_key_proj); it still takes part below, so that
        # every parameter has a gradient (DDP). A quantized history is read as stored; the
        # folded query then stays in its own dtype.
        q_k = self._fold_key_proj(q, keys, cast=quant is None)
        k = keys.unsqueeze(-2)  # [B, L, 1, kdim] or [T, 1, kdim]: one K/V head for all H
        # Values that are the keys pass as the same tensor: autograd then adds the two history
        # gradients in place, where two views would get a freshly allocated [B, L, kdim] sum
        # (measured at B=1024, L=200, kdim=64 on CPU: 590 -> 250 ms for the pooling's fwd+bwd).
        v = k if values is keys else values.to(keys.dtype).unsqueeze(-2)
        with torch.autocast(device_type=keys.device.type, enabled=False):
            o, lse = attention_pool(q_k, k, v, return_lse=True, **_bias_as(pool, q_k.dtype),
                                    **(quant or {}))  # [B, (N,) H, vdim]
        o = torch.einsum("...hv,hdv->...hd", o.to(q.dtype), w_v.to(q.dtype))
        b_v, b_k = self.v_proj.bias, self.k_proj.bias
        if b_v is not None:
            # An empty row pools to zero in the projected order, bias included.
            nonempty = (lse > float("-inf")).unsqueeze(-1)
            o = o + torch.where(nonempty, b_v.view(H, D).to(o.dtype), o.new_zeros(()))
        if b_k is not None:
            o = o + (b_k.sum() * 0).to(o.dtype)
        return o


def _dice_momentum(m, name: str = "dice_momentum") -> float:
    if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 <= m <= 1:
        raise ValueError("%s must be a float in [0, 1] (a cumulative average, momentum=None, is not "
                         "supported), got %r" % (name, m))
    return float(m)


def _activation_kind(module) -> Optional[str]:
    """The activation a zoo's module computes: "dice" (an ``alpha`` and a BatchNorm ``bn``, as
    FuxiCTR's and DeepCTR-Torch's Dice have), "prelu", "relu", "sigmoid", or None."""
    if hasattr(module, "alpha") and isinstance(getattr(module, "bn", None), nn.modules.batchnorm._BatchNorm):
        return "dice"
    for cls, kind in ((nn.PReLU, "prelu"), (nn.ReLU, "relu"), (nn.Sigmoid, "sigmoid")):
        if isinstance(module, cls):
            return kind
    return None


class ActivationUnitPooling(nn.Module):
    """DIN attention pooling: an MLP over ``[q, k, q - k, q * k]`` scores each valid history
    item, the values are pooled with those scores (raw, or a masked softmax).

    A drop-in for FuxiCTR's ``DIN_Attention`` and DeepCTR-Torch's
    ``AttentionSequencePoolingLayer`` (``load_mlp_`` copies their weights; docs/recipes.md has
    the recipe and what each does on an empty history, where this layer gives 0).

    Args:
        embed_dim: E, the size of the query and of the keys.
        hidden_units: one or two hidden layer widths (each in [1, 256]).
        activation: "relu" | "sigmoid" | "prelu" | "dice", for every hidden layer.
        normalize: None (DIN's raw scores as weights) or "softmax".
        bias: whether the linear layers have biases.
        prelu_init: initial PReLU slope (one per unit).
        dice_eps: Dice's BatchNorm epsilon.
        dice_affine: whether Dice's BatchNorm has an affine weight and bias (DeepCTR's does,
            FuxiCTR's does not).
        dice_momentum: Dice's BatchNorm momentum for the running statistics (FuxiCTR's 0.01,
            DeepCTR's nn.BatchNorm1d default 0.1).
        dice_statistics: which positions Dice's batch statistics count in training: "all"
            (every padded [B, L] position, padding included, as the zoos' layers, which run
            their MLP on all of them) or "valid" (the valid positions only).
        backend: passed to `attnkern.activation_unit_pool`.

    Dice, like ``nn.BatchNorm1d``: in ``train()`` mode each hidden layer normalises its
    pre-activation with the batch's statistics (mean and biased variance per unit over the
    counted positions of every row and query: `attnkern.functional.dice_batch_statistics`, a
    pass before the fused scoring pass, differentiated through) and updates the running
    buffers ``dice_running_mean_i`` / ``dice_running_var_i`` (unbiased variance, momentum
    ``dice_momentum``); in ``eval()`` mode it uses the running ones. A training batch with
    fewer than two counted positions uses the running statistics and leaves them unchanged
    (nn.BatchNorm1d refuses such a batch).

    Forward:
        query: [B, E] or [B, N, E]; keys: padded [B, L, E] or jagged [T, E] (with offsets, or a
        torchrec ``JaggedTensor``);
        values: default the keys themselves (pooled with one gradient); lengths / mask (True = attend) / offsets / max_length as in
        `attnkern.activation_unit_pool`. Returns [B, Dv] or [B, N, Dv]; with
        ``need_weights=True`` ``(out, weights)``, the weights of `attnkern.activation_unit_weights`
        (raw scores, or softmax with ``normalize="softmax"``): [B, L] or [B, N, L], jagged [T]
        or [T, N], float32 (float64 for float64), 0 at padding and on empty rows.
    """

    def __init__(self, embed_dim: int, hidden_units: Sequence[int] = (64,), activation: str = "relu",
                 normalize: Optional[str] = None, *, bias: bool = True, prelu_init: float = 0.25,
                 dice_eps: float = 1e-8, dice_affine: bool = False, dice_momentum: float = 0.1,
                 dice_statistics: str = "all", backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_units, int):
            hidden_units = (hidden_units,)
        try:
            hidden_units = tuple(hidden_units)
        except TypeError:
            raise ValueError("hidden_units must be one or two ints in [1, %d] (an int or a sequence), "
                             "got %r" % (MAX_UNITS, hidden_units)) from None
        if len(hidden_units) not in (1, 2) or not all(isinstance(h, int) and 1 <= h <= MAX_UNITS
                                                      for h in hidden_units):
            raise ValueError("hidden_units must be one or two ints in [1, %d], got %r" % (MAX_UNITS, hidden_units))
        if not isinstance(embed_dim, int) or not 1 <= embed_dim <= MAX_UNITS:
            raise ValueError("embed_dim must be an int in [1, %d], got %r" % (MAX_UNITS, embed_dim))
        # Case-insensitive, as the zoos' configurations write them ("Dice", "PReLU").
        activation = activation.lower() if isinstance(activation, str) else activation
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
        if normalize not in (None, "softmax"):
            raise ValueError("normalize must be None or 'softmax', got %r" % (normalize,))
        if dice_statistics not in DICE_STATISTICS:
            raise ValueError("dice_statistics must be one of %s, got %r"
                             % (", ".join(map(repr, DICE_STATISTICS)), dice_statistics))
        _dice_momentum(dice_momentum)
        fk = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.hidden_units = hidden_units
        self.activation = activation
        self.normalize = normalize
        self.backend = backend
        self.dice_eps = float(dice_eps)
        self.dice_momentum = float(dice_momentum)
        self.dice_statistics = dice_statistics
        widths = (4 * embed_dim,) + hidden_units
        self.hidden = nn.ModuleList(nn.Linear(widths[i], widths[i + 1], bias=bias, **fk)
                                    for i in range(len(hidden_units)))
        self.out = nn.Linear(hidden_units[-1], 1, bias=bias, **fk)
        self.prelu_weight = nn.ParameterList()
        self.dice_alpha = nn.ParameterList()
        self.dice_weight = nn.ParameterList()
        self.dice_bias = nn.ParameterList()
        for i, h in enumerate(hidden_units):
            if activation == "prelu":
                self.prelu_weight.append(nn.Parameter(torch.full((h,), float(prelu_init), **fk)))
            elif activation == "dice":
                self.dice_alpha.append(nn.Parameter(torch.zeros(h, **fk)))
                self.register_buffer("dice_running_mean_%d" % i, torch.zeros(h, **fk))
                self.register_buffer("dice_running_var_%d" % i, torch.ones(h, **fk))
                if dice_affine:
                    self.dice_weight.append(nn.Parameter(torch.ones(h, **fk)))
                    self.dice_bias.append(nn.Parameter(torch.zeros(h, **fk)))

    def _activation_params(self, weights=None, *history):
        """The activation parameters; Dice's from the batch (query, keys, lengths, mask,
        offsets, max_length in `history`) in training, with the running statistics updated."""
        if self.activation == "prelu":
            return list(self.prelu_weight)
        if self.activation != "dice":
            return None
        affine = len(self.dice_weight) > 0
        stats = None
        if self.training and history:
            query, keys, lengths, mask, offsets, max_length = history
            stats = dice_batch_statistics(
                query, keys, weights, lengths, mask=mask, offsets=offsets, max_length=max_length,
                dice_alpha=list(self.dice_alpha), dice_weight=list(self.dice_weight) if affine else None,
                dice_bias=list(self.dice_bias) if affine else None, eps=self.dice_eps,
                positions=self.dice_statistics, backend=self.backend)
            count = stats[0][2]
            # A host read only where the count is data-dependent ("valid", jagged).
            n = count if isinstance(count, int) else int(count.item())
            if n < 2:
                stats = None
            else:
                self._update_running(stats, n)
        out = []
        for i in range(len(self.hidden_units)):
            w = self.dice_weight[i] if affine else None
            b = self.dice_bias[i] if affine else None
            if stats is None:
                mean, var = getattr(self, "dice_running_mean_%d" % i), getattr(self, "dice_running_var_%d" % i)
            else:
                mean, var = stats[i][0], stats[i][1]
            out.append(dice_params(self.dice_alpha[i], mean, var, self.dice_eps, w, b))
        return out

    @torch.no_grad()
    def _update_running(self, stats, n: int) -> None:
        """nn.BatchNorm1d's update: the unbiased batch variance, exponential average."""
        m = self.dice_momentum
        for i, (mean, var, _) in enumerate(stats):
            rm, rv = getattr(self, "dice_running_mean_%d" % i), getattr(self, "dice_running_var_%d" % i)
            rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
            rv.mul_(1 - m).add_((var * (n / (n - 1))).to(rv.dtype), alpha=m)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
                offsets: Optional[torch.Tensor] = None, max_length: Optional[int] = None,
                need_weights: bool = False):
        if not isinstance(need_weights, bool):
            raise TypeError("need_weights must be a bool, got %s" % type(need_weights).__name__)
        # The layer knows E: name the input whose width is wrong (the function, which infers E
        # from the query, can only say that the keys disagree with it).
        for name, t in (("query", query), ("keys", keys)):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] != self.embed_dim:
                raise ValueError("%s must have last dimension embed_dim = %d, got shape %s"
                                 % (name, self.embed_dim, list(t.shape)))
        weights = [(l.weight, l.bias) for l in self.hidden] + [(self.out.weight, self.out.bias)]
        options = dict(mask=mask, offsets=offsets, max_length=max_length, activation=self.activation,
                       activation_params=self._activation_params(
                           weights, query, keys, lengths, mask, offsets, max_length),
                       normalize=self.normalize, backend=self.backend)
        out = activation_unit_pool(query, keys, values, weights, lengths, **options)
        if not need_weights:
            return out
        return out, activation_unit_weights(query, keys, weights, lengths, **options)

    def forward_positions(self, position_query: torch.Tensor, keys: torch.Tensor,
                          values: Optional[torch.Tensor] = None, lengths: Optional[torch.Tensor] = None, *,
                          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The activation unit with one query per history position (padded [B, L, E], the
        shape of ``keys``): DMR's and DMIN's position-aware target attention (FuxiCTR's
        ``use_pos_emb=True``), exactly, through `attnkern.functional.position_query_inputs`
        (3E <= 256). values default to the keys. Returns [B, Dv]. Dice's batch statistics in
        training count the same samples as `forward`."""
        if position_query.shape[-1:] != (self.embed_dim,) or keys.shape[-1:] != (self.embed_dim,):
            raise ValueError("position_query and keys must have last dimension embed_dim = %d, got %s and %s"
                             % (self.embed_dim, list(position_query.shape), list(keys.shape)))
        weights = [(l.weight, l.bias) for l in self.hidden] + [(self.out.weight, self.out.bias)]
        query, wide_keys, weights = position_query_inputs(position_query, keys, weights)
        values = keys if values is None else values
        return activation_unit_pool(query, wide_keys, values, weights, lengths, mask=mask,
                                    activation=self.activation,
                                    activation_params=self._activation_params(
                                        weights, query, wide_keys, lengths, mask, None, None),
                                    normalize=self.normalize, backend=self.backend)

    @torch.no_grad()
    def load_mlp_(self, linears: Sequence[nn.Linear], activations: Sequence[nn.Module] = ()) -> "ActivationUnitPooling":
        """Copies another implementation's activation unit in: `linears` are its nn.Linear layers
        in order (hidden layers, then the one-unit output layer), `activations` its PReLU (a
        shared slope is broadcast) or Dice modules (anything with ``alpha`` and a BatchNorm
        ``bn``), one per hidden layer. Returns self."""
        linears = list(linears)
        mine = list(self.hidden) + [self.out]
        if len(linears) != len(mine):
            raise ValueError("linears: expected %d nn.Linear layers (%d hidden + output), got %d"
                             % (len(mine), len(self.hidden), len(linears)))
        for i, (src, dst) in enumerate(zip(linears, mine)):
            if tuple(src.weight.shape) != tuple(dst.weight.shape):
                raise ValueError("linears[%d]: weight shape %s, expected %s"
                                 % (i, list(src.weight.shape), list(dst.weight.shape)))
            if (src.bias is None) != (dst.bias is None):
                raise ValueError("linears[%d]: bias presence differs (bias=%s here)" % (i, dst.bias is not None))
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)
        activations = list(activations)
        for i, act in enumerate(activations):
            kind = _activation_kind(act)
            if kind is None:
                raise ValueError("activations[%d]: %s is none of the activations this layer computes "
                                 "(Dice, PReLU, ReLU, Sigmoid)" % (i, type(act).__name__))
            if kind != self.activation:
                raise ValueError("activations[%d] is %s but this layer was built with activation=%r: "
                                 "build it with activation=%r to load it"
                                 % (i, type(act).__name__, self.activation, kind))
        if self.activation in ("prelu", "dice") and len(activations) != len(self.hidden_units):
            raise ValueError("activations: expected one %s module per hidden layer (%d), got %d"
                             % (self.activation, len(self.hidden_units), len(activations)))
        for i, act in enumerate(activations if self.activation in ("prelu", "dice") else ()):
            if self.activation == "prelu":
                self.prelu_weight[i].copy_(act.weight.reshape(-1).expand(self.hidden_units[i]))
                continue
            bn = act.bn
            self.dice_alpha[i].copy_(act.alpha.reshape(-1))
            getattr(self, "dice_running_mean_%d" % i).copy_(bn.running_mean)
            getattr(self, "dice_running_var_%d" % i).copy_(bn.running_var)
            self.dice_eps = float(bn.eps)
            self.dice_momentum = _dice_momentum(bn.momentum, "activations[%d]: its BatchNorm's momentum" % i)
            if bn.affine != bool(len(self.dice_weight)):
                raise ValueError("activations[%d]: its BatchNorm has affine=%s; build this layer with "
                                 "dice_affine=%s" % (i, bn.affine, bn.affine))
            if bn.affine:
                self.dice_weight[i].copy_(bn.weight)
                self.dice_bias[i].copy_(bn.bias)
        return self


# --------------------------------------------------------------------------------------------
# Sequence self-attention layers: `SequenceSelfAttention` (a transformer's attention sub-layer)
# and `HSTULayer` (generative-recommenders' HSTU layer), both around
# `attnkern.sequence_attention`. Recipes from generative-recommenders and FuxiCTR:
# docs/sequence_layers.md.

import attnkern as _attnkern  # noqa: E402  (the op is looked up at call time: see _seq_attention)
import torch.nn.functional as _F  # noqa: E402

__all__ += ["SequenceSelfAttention", "HSTULayer"]

NORMALIZATIONS = ("softmax", "silu")
TIME_BUCKETS = ("log", "sqrt")


def _seq_attention(*args, **kwargs):
    # attnkern/__init__.py imports this module before the op's, so the op is found on the
    # package when a layer first runs, not when this module loads.
    return _attnkern.sequence_attention(*args, **kwargs)


def _non_negative_int(x, name):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
        raise ValueError("%s must be an int >= 0, got %r" % (name, x))
    return int(x)


def _choice(x, name, choices):
    if x not in choices:
        raise ValueError("%s must be one of %s, got %r" % (name, ", ".join(map(repr, choices)), x))
    return x


def _check_flags(causal, backend):
    if not isinstance(causal, bool):
        raise TypeError("causal must be a bool, got %s" % type(causal).__name__)
    if not isinstance(backend, str):
        raise TypeError("backend must be a str, got %s" % type(backend).__name__)


def _optional_scale(scale, name="scale"):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError("%s must be a float or None, got %s" % (name, type(scale).__name__))
    if not math.isfinite(float(scale)):
        raise ValueError("%s must be finite, got %r" % (name, scale))
    return float(scale)


class _RelativeBias(nn.Module):
    """The learned tables of the relative bias the op adds to every score:
    ``time_table[bucket(query_time_i - key_time_j), h]`` ([NB, Hb]) and
    ``position_table[min(i - j, P - 1), h]`` ([P, Hb]); either may be absent (size 0)."""

    def __init__(self, num_time_buckets, num_positions, bias_heads, num_heads, time_bucket,
                 factory) -> None:
        super().__init__()
        num_time_buckets = _non_negative_int(num_time_buckets, "num_time_buckets")
        num_positions = _non_negative_int(num_positions, "num_positions")
        bias_heads = _positive_int(bias_heads, "bias_heads")
        if bias_heads not in (1, num_heads):
            raise ValueError("bias_heads must be 1 (one table shared by the heads) or num_heads "
                             "(%d), got %d" % (num_heads, bias_heads))
        self.time_bucket = _choice(time_bucket, "time_bucket", TIME_BUCKETS)
        self.time_table = (nn.Parameter(torch.empty(num_time_buckets, bias_heads, **factory))
                           if num_time_buckets else None)
        self.position_table = (nn.Parameter(torch.empty(num_positions, bias_heads, **factory))
                               if num_positions else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # generative-recommenders' initialisation of its bias tables.
        for t in (self.time_table, self.position_table):
            if t is not None:
                nn.init.normal_(t, mean=0.0, std=0.02)

    def arguments(self, timestamps, query_times) -> dict:
        if self.time_table is None:
            if timestamps is not None or query_times is not None:
                raise ValueError("timestamps were given but the layer has no time bias: build it "
                                 "with num_time_buckets > 0")
            return {"position_table": self.position_table}
        if timestamps is None:
            raise ValueError("the layer has a time bias (num_time_buckets=%d): pass timestamps= "
                             "(int64, one per token)" % self.time_table.shape[0])
        return {"position_table": self.position_table, "time_table": self.time_table,
                "key_times": timestamps,
                "query_times": timestamps if query_times is None else query_times,
                "time_bucket": self.time_bucket}


def _check_tokens(x, name, width, offsets, lengths):
    """x is jagged [T, width] (with offsets) or padded [B, L, width] (lengths or every position)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
    if offsets is not None and lengths is not None:
        raise ValueError("pass offsets (jagged %s) or lengths (padded %s), not both" % (name, name))
    want, layout = (2, "jagged [T, %d] (with offsets)") if offsets is not None else (
        3, "padded [B, L, %d]")
    if x.dim() != want or x.shape[-1] != width:
        raise ValueError("%s must be %s, got %s" % (name, layout % width, list(x.shape)))


class SequenceSelfAttention(nn.Module):
    """Multi-head self-attention over each row of a jagged (or padded) sequence: the attention
    sub-layer of a transformer block (BST, TransAct, SASRec), with the mask rules and the
    relative time/position bias of `attnkern.sequence_attention` computed in the kernel::

        q, k, v = W_q x, W_k x, W_v x          [T, H, Dh] / [T, Hkv, Dh]
        o = sequence_attention(q, k, v, ...)   softmax (or HSTU's SiLU) over each row
        out = W_o concat_heads(o)              [T, E]

    Args:
        embed_dim: E, the width of the tokens and of the output.
        num_heads: H; ``attention_dim`` must be divisible by it.
        num_kv_heads: Hkv key/value heads shared by groups of H / Hkv query heads (default H).
        attention_dim: A = H x Dh, the width of the query projection (default E).
        bias: whether the projections have a bias.
        scale: the logit scale (default ``1 / sqrt(Dh)``).
        causal, contextual_len, max_attn_len: the op's mask rules (position i attends j <= i;
            the first ``contextual_len`` positions are seen by all; a local window). Targets
            are given per call (``num_targets=``).
        normalization: "softmax" or "silu" (``silu(s_ij) * attn_scale``, HSTU's).
        num_time_buckets, num_positions: sizes of the learned relative-bias tables (0 = none):
            ``time_table[bucket(t_i - t_j), h]`` and ``position_table[min(i - j, P - 1), h]``.
        bias_heads: 1 (one bias shared by the heads) or H.
        time_bucket: "log" (HSTU's ``floor(ln(max(|dt|, 1)) / 0.301)``) or "sqrt".
        backend: passed to `attnkern.sequence_attention`.

    Forward:
        x: jagged [T, E] with ``offsets`` [B+1], or padded [B, L, E] with ``lengths`` [B] (or
            every position valid).
        max_length: jagged only, a Python int >= every row's length (no device sync).
        num_targets: [B] int, the last positions of each row that are candidates.
        timestamps: [T] (or [B, L]) int64, needed with a time table; ``query_times`` (default
            ``timestamps``) the query side's times, e.g. the next action's time (HSTU).
        attn_scale: "silu" only, float or [T] per query (default 1 / max row length).
        bias: a dense extra bias [B, Hb, L, L], as the op takes it.

    Returns:
        [T, E] or [B, L, E] (zero attention output at padded positions, so the output
        projection's bias there).

    `from_multihead_attention` builds one from an ``nn.MultiheadAttention`` (the attention
    of FuxiCTR's BST and TransAct blocks; docs/sequence_layers.md).
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, *, num_kv_heads: Optional[int] = None,
                 attention_dim: Optional[int] = None, bias: bool = True,
                 scale: Optional[float] = None, causal: bool = True,
                 contextual_len: int = 0, max_attn_len: int = 0, normalization: str = "softmax",
                 num_time_buckets: int = 0, num_positions: int = 0, bias_heads: int = 1,
                 time_bucket: str = "log", backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % num_kv_heads != 0:
            raise ValueError("num_heads (%d) must be a multiple of num_kv_heads (%d)"
                             % (num_heads, num_kv_heads))
        attention_dim = embed_dim if attention_dim is None else _positive_int(attention_dim, "attention_dim")
        if attention_dim % num_heads != 0:
            raise ValueError("attention_dim (%d%s) must be divisible by num_heads (%d)" % (
                attention_dim, ", = embed_dim" if attention_dim == embed_dim else "", num_heads))
        _check_flags(causal, backend)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.attention_dim = attention_dim
        self.head_dim = attention_dim // num_heads
        scale = _optional_scale(scale)
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        self.causal = causal
        self.contextual_len = _non_negative_int(contextual_len, "contextual_len")
        self.max_attn_len = _non_negative_int(max_attn_len, "max_attn_len")
        self.normalization = _choice(normalization, "normalization", NORMALIZATIONS)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, attention_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(attention_dim, embed_dim, bias=bias, **factory)
        self.relative_bias = _RelativeBias(num_time_buckets, num_positions, bias_heads, num_heads,
                                           time_bucket, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation (see AttentionPooling.reset_parameters).
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.relative_bias.reset_parameters()

    def extra_repr(self) -> str:
        return ("embed_dim=%d, num_heads=%d, num_kv_heads=%d, attention_dim=%d, scale=%g, "
                "causal=%s, normalization=%r, contextual_len=%d, max_attn_len=%d, backend=%r" % (
                    self.embed_dim, self.num_heads, self.num_kv_heads, self.attention_dim,
                    self.scale, self.causal, self.normalization, self.contextual_len,
                    self.max_attn_len, self.backend))

    def forward(self, x: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None, *, max_length: Optional[int] = None,
                num_targets: Optional[torch.Tensor] = None,
                timestamps: Optional[torch.Tensor] = None,
                query_times: Optional[torch.Tensor] = None, attn_scale=None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_tokens(x, "x", self.embed_dim, offsets, lengths)
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if attn_scale is not None and self.normalization != "silu":
            raise ValueError('attn_scale applies to normalization="silu" only; this layer has %r'
                             % self.normalization)
        extra = {"attn_scale": attn_scale} if self.normalization == "silu" else {}
        # Under autocast the projections ran in the low-precision dtype already; the op
        # accumulates in float32 itself, so it runs with autocast off (like AttentionPooling).
        with torch.autocast(device_type=x.device.type, enabled=False):
            o = _seq_attention(
                q, k.to(q.dtype), v.to(q.dtype), offsets, lengths, max_length=max_length,
                causal=self.causal, num_targets=num_targets, contextual_len=self.contextual_len,
                max_attn_len=self.max_attn_len, normalization=self.normalization,
                scale=self.scale, bias=bias, backend=self.backend,
                **self.relative_bias.arguments(timestamps, query_times), **extra)
        return self.out_proj(o.flatten(-2))

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, **options) -> "SequenceSelfAttention":
        """A layer with the weights of ``mha`` (an ``nn.MultiheadAttention`` over one input
        width, without ``add_bias_kv`` / ``add_zero_attn``); ``options`` are this class's
        keyword arguments (``causal=False`` for an encoder without a causal mask, ...).
        Attention dropout is not carried over: the layer has none."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError("mha must be an nn.MultiheadAttention, got %s" % type(mha).__name__)
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha has separate kdim/vdim projections; only one input width "
                             "(kdim = vdim = embed_dim) is supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha uses add_bias_kv or add_zero_attn, which have no counterpart here")
        w = mha.in_proj_weight
        has_bias = mha.in_proj_bias is not None
        for key in ("num_heads", "attention_dim", "num_kv_heads", "bias"):
            if key in options:
                raise ValueError("%s is read from mha; do not pass it" % key)
        layer = cls(mha.embed_dim, mha.num_heads, bias=has_bias, device=w.device, dtype=w.dtype,
                    **options)
        with torch.no_grad():
            E = mha.embed_dim
            for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
                proj.weight.copy_(w[i * E:(i + 1) * E])
                if has_bias:
                    proj.bias.copy_(mha.in_proj_bias[i * E:(i + 1) * E])
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer


OUTPUTS = ("concat", "gate", "concat_normed")


class HSTULayer(nn.Module):
    """One HSTU layer (Zhai et al., "Actions Speak Louder than Words", ICML 2024), as
    generative-recommenders' ``STULayer`` computes it, with the relative time and position
    bias of its research ``SequentialTransductionUnitJagged``::

        u, v, q, k = split(W_uvqk LayerNorm(x) + b)         one fused projection
        u = silu(u)                                         (silu="uvqk": all four)
        a = sequence_attention(q, k, v, normalization="silu", relative bias, targets, ...)
        y = u * Norm(a)                                     output="gate"
          | [u, a, u * Norm(a)]                             output="concat" (STULayer)
          | [u, Norm(a), u * Norm(a)]                       output="concat_normed" (concat_ua)
        out = x + W_o dropout(y) (+ b_o)

    Args:
        embed_dim: E, the width of the tokens.
        num_heads: H.
        hidden_dim: the width of u and v per head (default E / H; generative-recommenders'
            ``hidden_dim`` / ``linear_hidden_dim``).
        attention_dim: the width of q and k per head (default E / H).
        silu: "u" (only u goes through SiLU: ``STULayer``) or "uvqk" (all four:
            ``linear_activation="silu"``).
        uvqk_bias: whether the fused projection has a bias.
        norm_affine: whether the input and output normalizations have a weight and a bias
            (``STULayer``'s do; the research layer's do not).
        output: "concat" (default), "gate" or "concat_normed", see above.
        output_bias: whether W_o has a bias.
        group_norm: Norm(a) per head (a GroupNorm of H groups) instead of over all H heads.
        eps: the normalizations' epsilon.
        dropout: on y, in training.
        scale: the logit scale (generative-recommenders' ``attn_alpha``; default
            ``1 / sqrt(attention_dim)``; 1.0 for the research layer).
        causal, contextual_len, max_attn_len: the op's mask rules.
        num_time_buckets, num_positions, bias_heads, time_bucket: the relative-bias tables,
            as in `SequenceSelfAttention` (0 = none).
        backend: passed to `attnkern.sequence_attention`.

    Forward: as `SequenceSelfAttention` (x jagged [T, E] with ``offsets`` or padded [B, L, E]
    with ``lengths``; ``num_targets``, ``timestamps`` / ``query_times``, ``attn_scale``
    (default 1 / max row length; generative-recommenders divides by its ``max_seq_len``)).
    Returns the same shape as x.

    `from_generative_recommenders` builds one from an ``STULayer`` or a
    ``SequentialTransductionUnitJagged`` (docs/sequence_layers.md).
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, hidden_dim: Optional[int] = None,
                 attention_dim: Optional[int] = None, *, silu: str = "u", uvqk_bias: bool = True,
                 norm_affine: bool = True, output: str = "concat", output_bias: bool = False,
                 group_norm: bool = False, eps: float = 1e-6, dropout: float = 0.0,
                 scale: Optional[float] = None, causal: bool = True, contextual_len: int = 0,
                 max_attn_len: int = 0, num_time_buckets: int = 0, num_positions: int = 0,
                 bias_heads: int = 1, time_bucket: str = "log", backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        embed_dim = _positive_int(embed_dim, "embed_dim")
        num_heads = _positive_int(num_heads, "num_heads")
        if hidden_dim is None or attention_dim is None:
            if embed_dim % num_heads != 0:
                raise ValueError("embed_dim (%d) must be divisible by num_heads (%d) for the default "
                                 "hidden_dim / attention_dim (E / H); or pass both" % (embed_dim, num_heads))
        hidden_dim = embed_dim // num_heads if hidden_dim is None else _positive_int(hidden_dim, "hidden_dim")
        attention_dim = (embed_dim // num_heads if attention_dim is None
                         else _positive_int(attention_dim, "attention_dim"))
        self.silu = _choice(silu, "silu", ("u", "uvqk"))
        self.output = _choice(output, "output", OUTPUTS)
        _check_flags(causal, backend)
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be a float in [0, 1), got %r" % (dropout,))
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
            raise ValueError("eps must be a float > 0, got %r" % (eps,))
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.attention_dim = attention_dim
        scale = _optional_scale(scale)
        self.scale = 1.0 / math.sqrt(attention_dim) if scale is None else scale
        self.group_norm = bool(group_norm)
        self.eps = float(eps)
        self.dropout = float(dropout)
        self.causal = causal
        self.contextual_len = _non_negative_int(contextual_len, "contextual_len")
        self.max_attn_len = _non_negative_int(max_attn_len, "max_attn_len")
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        H, hd, ad = num_heads, hidden_dim, attention_dim
        self.input_norm = nn.LayerNorm(embed_dim, eps=eps, elementwise_affine=norm_affine, **factory)
        self.uvqk = nn.Linear(embed_dim, (2 * hd + 2 * ad) * H, bias=uvqk_bias, **factory)
        if self.group_norm:
            self.output_norm = nn.GroupNorm(H, H, eps=eps, affine=norm_affine, **factory)
        else:
            self.output_norm = nn.LayerNorm(H * hd, eps=eps, elementwise_affine=norm_affine, **factory)
        self.out_proj = nn.Linear(H * hd * (1 if output == "gate" else 3), embed_dim,
                                  bias=output_bias, **factory)
        self.relative_bias = _RelativeBias(num_time_buckets, num_positions, bias_heads, num_heads,
                                           time_bucket, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # STULayer's initialisation: Xavier-uniform projections, zero biases, unit norms.
        for proj in (self.uvqk, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self.input_norm.reset_parameters()
        self.output_norm.reset_parameters()
        self.relative_bias.reset_parameters()

    def extra_repr(self) -> str:
        return ("embed_dim=%d, num_heads=%d, hidden_dim=%d, attention_dim=%d, silu=%r, output=%r, "
                "scale=%g, causal=%s, contextual_len=%d, max_attn_len=%d, dropout=%g, backend=%r" % (
                    self.embed_dim, self.num_heads, self.hidden_dim, self.attention_dim, self.silu,
                    self.output, self.scale, self.causal, self.contextual_len, self.max_attn_len,
                    self.dropout, self.backend))

    def _norm(self, a: torch.Tensor) -> torch.Tensor:
        if not self.group_norm:
            return self.output_norm(a)
        shape = a.shape
        return self.output_norm(a.reshape(-1, self.num_heads, self.hidden_dim)).reshape(shape)

    def forward(self, x: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None, *, max_length: Optional[int] = None,
                num_targets: Optional[torch.Tensor] = None,
                timestamps: Optional[torch.Tensor] = None,
                query_times: Optional[torch.Tensor] = None, attn_scale=None) -> torch.Tensor:
        _check_tokens(x, "x", self.embed_dim, offsets, lengths)
        H, hd, ad = self.num_heads, self.hidden_dim, self.attention_dim
        uvqk = self.uvqk(self.input_norm(x))
        if self.silu == "uvqk":
            uvqk = _F.silu(uvqk)
        u, v, q, k = uvqk.split([H * hd, H * hd, H * ad, H * ad], dim=-1)
        if self.silu == "u":
            u = _F.silu(u)
        with torch.autocast(device_type=x.device.type, enabled=False):
            a = _seq_attention(
                q.unflatten(-1, (H, ad)), k.unflatten(-1, (H, ad)), v.unflatten(-1, (H, hd)),
                offsets, lengths, max_length=max_length, causal=self.causal,
                num_targets=num_targets, contextual_len=self.contextual_len,
                max_attn_len=self.max_attn_len, normalization="silu", scale=self.scale,
                attn_scale=attn_scale, backend=self.backend,
                **self.relative_bias.arguments(timestamps, query_times)).flatten(-2)
        na = self._norm(a)
        if self.output == "gate":
            y = u * na
        elif self.output == "concat":
            y = torch.cat([u, a, u * na], dim=-1)
        else:
            y = torch.cat([u, na, u * na], dim=-1)
        y = _F.dropout(y, p=self.dropout, training=self.training)
        return x + self.out_proj(y)

    @classmethod
    def from_generative_recommenders(cls, layer: nn.Module, *, backend: str = "auto") -> "HSTULayer":
        """An HSTULayer with the configuration and weights of one of generative-recommenders'
        HSTU layers (read by attribute, nothing imported):

        - ``STULayer`` (generative_recommenders/modules/stu.py): fused UVQK with a bias,
          affine norms, ``[u, a, u * Norm(a)]``, no output bias; its mask options (causal,
          ``max_attn_len``, ``contextual_seq_len``) are carried over; pass its
          ``num_targets`` (when ``target_aware``) and ``attn_scale = 1 / max_seq_len`` per call.
        - ``SequentialTransductionUnitJagged`` (research/modeling/sequential/hstu.py) with
          ``normalization="rel_bias"``: no UVQK bias, unscaled logits, non-affine norms, an
          output bias; its ``RelativeBucketedTimeAndPositionBasedBias`` (if any) becomes the
          time and position tables; call with ``timestamps`` = each token's time and
          ``query_times`` = the next token's (the row's last keeps its own),
          ``attn_scale = 1 / N`` with N its bias module's ``max_seq_len`` (the padded length
          it runs at), and the causal mask.
        """
        if hasattr(layer, "_uvqk_weight"):
            return cls._from_stu(layer, backend)
        if hasattr(layer, "_uvqk") and hasattr(layer, "_o"):
            return cls._from_research(layer, backend)
        raise TypeError("layer must be generative-recommenders' STULayer or "
                        "SequentialTransductionUnitJagged, got %s" % type(layer).__name__)

    @classmethod
    def _from_stu(cls, stu, backend):
        H, E = stu._num_heads, stu._embedding_dim
        w = stu._uvqk_weight
        out = cls(E, H, stu._hidden_dim, stu._attention_dim, silu="u", uvqk_bias=True,
                  norm_affine=True, output="concat", output_bias=False,
                  group_norm=stu._use_group_norm, eps=1e-6, dropout=stu._output_dropout_ratio,
                  scale=stu._attn_alpha, causal=stu._causal,
                  contextual_len=stu._contextual_seq_len, max_attn_len=stu._max_attn_len,
                  backend=backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.uvqk.weight.copy_(w.t())
            out.uvqk.bias.copy_(stu._uvqk_beta)
            out.input_norm.weight.copy_(stu._input_norm_weight)
            out.input_norm.bias.copy_(stu._input_norm_bias)
            out.output_norm.weight.copy_(stu._output_norm_weight)
            out.output_norm.bias.copy_(stu._output_norm_bias)
            out.out_proj.weight.copy_(stu._output_weight.t())
        return out

    @classmethod
    def _from_research(cls, unit, backend):
        if unit._normalization not in ("rel_bias", "hstu_rel_bias"):
            raise ValueError("SequentialTransductionUnitJagged with normalization=%r: only "
                             "'rel_bias' (HSTU's SiLU attention) maps to HSTULayer"
                             % unit._normalization)
        if unit._linear_activation != "silu":
            raise ValueError("linear_activation=%r: only 'silu' maps to HSTULayer (silu='uvqk'), "
                             "which gates u by SiLU at least" % unit._linear_activation)
        rel = unit._rel_attn_bias
        times = positions = 0
        if rel is not None:
            if not hasattr(rel, "_ts_w") or not hasattr(rel, "_pos_w"):
                raise ValueError("relative_attention_bias_module %s: only "
                                 "RelativeBucketedTimeAndPositionBasedBias maps to the tables"
                                 % type(rel).__name__)
            times, positions = rel._ts_w.shape[0], rel._max_seq_len
        H = unit._num_heads
        w = unit._uvqk
        out = cls(unit._embedding_dim, H, unit._linear_dim, unit._attention_dim, silu="uvqk",
                  uvqk_bias=False, norm_affine=False,
                  output="concat_normed" if unit._concat_ua else "gate", output_bias=True,
                  eps=unit._eps, dropout=unit._dropout_ratio, scale=1.0, causal=True,
                  num_time_buckets=times, num_positions=positions, bias_heads=1,
                  time_bucket="log", backend=backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.uvqk.weight.copy_(w.t())
            out.out_proj.weight.copy_(unit._o.weight)
            out.out_proj.bias.copy_(unit._o.bias)
            if rel is not None:
                # Its position weight for query i, key j is _pos_w[N - 1 + j - i]: i - j = d
                # reads _pos_w[N - 1 - d], a table indexed by d reversed.
                n = rel._max_seq_len
                out.relative_bias.position_table.copy_(rel._pos_w[:n].flip(0).unsqueeze(1))
                out.relative_bias.time_table.copy_(rel._ts_w.unsqueeze(1))
        return out
