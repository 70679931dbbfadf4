"""`TargetAttentionCTR`: the thin recommender that shows what the layer is for; `HSTURanker`:
the same task as an HSTU-style sequential ranker (history and candidates in one sequence).

DIN-style: item-id embeddings, the target item as the query of `AttentionPooling` over
the user's history, and an MLP head over [target, pooled, target * pooled] giving a click
logit. ``pooling="sum"`` swaps the attention for the sum pooling of the DIN paper's base
model, everything else equal: the baseline the layer is measured against. ``pooling="din"``
uses DIN's local activation unit instead (`ActivationUnitPooling`: an MLP over
[q, k, q - k, q * k] scores each history item, raw weights). With ``time_buckets`` /
``recency_buckets`` the attention also learns how much an item counts by how long before
the target it happened and by its place from the end of the history.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .nn import ActivationUnitPooling, AttentionPooling, HSTULayer
from .quantize import quantize_rows
from .reference import dequantize_rows

__all__ = ["TargetAttentionCTR", "HSTURanker", "POOLINGS"]

POOLINGS = ("attention", "sum", "din")


def _head(width: int, mlp_dims: Sequence[int], dropout: float) -> nn.Sequential:
    """The click head: ReLU MLP (dropout after each hidden layer) down to one logit."""
    layers = []
    for d in mlp_dims:
        layers += [nn.Linear(width, d), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = d
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class TargetAttentionCTR(nn.Module):
    """Click-through-rate model with target attention over the behaviour history.

    Args:
        num_items: size of the item-id table; ids lie in [0, num_items), 0 is padding.
        embed_dim: item embedding size E (divisible by ``num_heads``).
        num_heads: heads of the attention pooling.
        mlp_dims: hidden sizes of the MLP head.
        pooling: "attention" (`AttentionPooling`, the target as query), "sum" (sum of the
            valid history embeddings, the DIN paper's base model) or "din"
            (`ActivationUnitPooling` with ``din_units`` hidden units and ``activation``, raw
            weights).
        dropout: dropout after each hidden layer of the head.
        backend: attention backend, see `attnkern.attention_pool`.
        din_units: hidden layer widths of the activation unit (``pooling="din"``).
        activation: the activation unit's activation (``pooling="din"``): "prelu" (default),
            "dice" (DIN's, with batch statistics in training: FuxiCTR's Dice, eps 1e-9,
            momentum 0.01), "relu" or "sigmoid"; case-insensitive.
        time_buckets, recency_buckets: ``pooling="attention"`` only: the attention layer's
            per-head time and recency tables (`AttentionPooling`): how long before the target
            and how far from the end of the history an item is shift its attention logit.

    Forward:
        history: [B, L] int64 item ids; row b's history is ``history[b, :lengths[b]]``
            (positions past the length are ignored whatever they hold).
        target: [B] or [B, N] int64 candidate item ids (N candidates share a history).
        lengths: [B] int32/int64 valid history lengths (0 = empty history).
        history_times: [B, L] the history items' times (e.g. int64 seconds), with
            ``time_buckets`` only (then required).
        target_time: [B] each row's query time (the request's, shared by its N candidates),
            with ``time_buckets`` only (then required).

    Returns:
        logits [B] or [B, N] (float32, or the autocast dtype).
    """

    def __init__(
        self,
        num_items: int,
        embed_dim: int = 32,
        num_heads: int = 2,
        mlp_dims: Sequence[int] = (64, 32),
        pooling: str = "attention",
        dropout: float = 0.0,
        backend: str = "auto",
        din_units: Sequence[int] = (64,),
        activation: str = "prelu",
        time_buckets: Optional[int] = None,
        recency_buckets: Optional[int] = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError("pooling must be one of %s, got %r" % (", ".join(POOLINGS), pooling))
        if pooling != "attention" and (time_buckets is not None or recency_buckets is not None):
            raise ValueError("time_buckets and recency_buckets need pooling='attention' (the "
                             "tables bias the attention logits), got pooling=%r" % pooling)
        if not isinstance(num_items, int) or num_items < 2:
            raise ValueError("num_items must be an int >= 2 (id 0 is padding), got %r" % (num_items,))
        self.num_items = num_items
        self.pooling = pooling
        self.embedding = nn.Embedding(num_items, embed_dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=embed_dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        if pooling == "attention":
            self.pool = AttentionPooling(embed_dim, num_heads, backend=backend,
                                         time_buckets=time_buckets, recency_buckets=recency_buckets)
        elif pooling == "din":
            dice = dict(dice_eps=1e-9, dice_momentum=0.01) if str(activation).lower() == "dice" else {}
            self.pool = ActivationUnitPooling(embed_dim, din_units, activation, backend=backend, **dice)
        else:
            self.pool = None
        self.head = _head(3 * embed_dim, mlp_dims, dropout)

    def quantize_(self, dtype: torch.dtype = torch.int8) -> "TargetAttentionCTR":
        """Serve from a row-quantized item table (docs/quantized.md): the embedding table is
        stored as ``attnkern.quantize_rows(weight, dtype)`` (int8/uint8 with a float32 scale and
        bias per item, FBGEMM's row-wise rule, or float8 with a scale), the history's rows are
        gathered quantized and read by the attention as they are stored, the targets' rows
        dequantized. ``pooling="attention"`` only. The model becomes a serving model: its
        parameters stop requiring grad (the quantized pooling is forward-only). Returns self."""
        if self.pooling != "attention":
            raise ValueError("quantize_ serves the attention pooling from the quantized table; "
                             "this model has pooling=%r" % self.pooling)
        data, scale, bias = quantize_rows(self.embedding.weight.detach(), dtype)
        self.register_buffer("item_codes", data)
        self.register_buffer("item_scale", scale)
        self.register_buffer("item_bias", bias)
        self.requires_grad_(False)
        return self

    @property
    def quantized(self) -> bool:
        """Whether the model serves from a quantized table (`quantize_`)."""
        return getattr(self, "item_codes", None) is not None

    def _embed(self, history: torch.Tensor, target: torch.Tensor):
        """(history rows [B, L, E], target rows, per-row parameters of the history as
        AttentionPooling keyword arguments: empty unless quantized)."""
        if not self.quantized:
            return self.embedding(history), self.embedding(target), {}
        scale, bias = self.item_scale, self.item_bias
        t = dequantize_rows(self.item_codes[target], scale[target], None if bias is None else bias[target])
        params = dict(key_scale=scale[history], key_bias=None if bias is None else bias[history])
        return self.item_codes[history], t, params

    @property
    def uses_times(self) -> bool:
        """Whether the forward needs history_times and target_time."""
        return isinstance(self.pool, AttentionPooling) and self.pool.time_buckets is not None

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                history_times: Optional[torch.Tensor] = None,
                target_time: Optional[torch.Tensor] = None) -> torch.Tensor:
        if history.dim() != 2:
            raise ValueError("history must be [B, L] item ids, got %s" % list(history.shape))
        if target.dim() not in (1, 2) or target.shape[0] != history.shape[0]:
            raise ValueError(
                "target must be [B] or [B, N] with B = %d, got %s" % (history.shape[0], list(target.shape))
            )
        # [B, L, E] and [B, E] / [B, N, E]
        h, t, quant = self._embed(history, target)
        times = history_times is not None or target_time is not None
        if self.pooling == "attention":
            kw = dict(key_times=history_times, query_time=target_time) if times else {}
            pooled = self.pool(t, h, lengths=lengths, **kw, **quant)
        elif times:
            raise ValueError("history_times and target_time are for an attention model with "
                             "time_buckets; this model (pooling=%r) takes no times" % self.pooling)
        elif self.pool is not None:
            pooled = self.pool(t, h, lengths=lengths)
        else:
            valid = torch.arange(history.shape[1], device=history.device) < lengths.to(torch.long)[:, None]
            pooled = (h * valid.unsqueeze(-1).to(h.dtype)).sum(dim=1)  # [B, E]
            if t.dim() == 3:
                pooled = pooled.unsqueeze(1).expand_as(t)
        pooled = pooled.to(t.dtype)
        x = torch.cat([t, pooled, t * pooled], dim=-1)
        return self.head(x).squeeze(-1)


class HSTURanker(nn.Module):
    """HSTU-style ranking (generative-recommenders' M-FALCON layout): each row's history and
    its N candidates form one sequence ``[h_1 .. h_len, c_1 .. c_N]``; a stack of `HSTULayer`
    runs causal SiLU attention over it with the candidates as targets (each sees the history
    and itself, never another candidate) and the relative time and position bias; the output
    at each candidate's position goes through an MLP head with the candidate's embedding,
    ``[c, o, c * o]``, as in `TargetAttentionCTR`.

    Args:
        num_items: size of the item-id table; ids lie in [0, num_items), 0 is padding.
        embed_dim: item embedding size E (divisible by ``num_heads``).
        num_heads: heads of each layer (per-head widths E / H).
        num_layers: HSTU layers.
        mlp_dims: hidden sizes of the MLP head.
        dropout: the layers' dropout (on their gated output) and the head's.
        max_positions: P, the position table's size (distances past P - 1 share its last row;
            0 = no position bias).
        num_time_buckets: log-bucketed time-gap table size (0 = no time bias; then no
            timestamps are taken).
        backend: attention backend, see `attnkern.sequence_attention`.

    Forward:
        history: [B, L] int64 item ids, row b's in ``history[b, :lengths[b]]``, oldest first.
        target: [B] or [B, N] int64 candidate ids.
        lengths: [B] valid history lengths (0 = empty).
        history_times, target_times: [B, L] and [B] / [B, N] int64 timestamps (needed with a
            time bias; a candidate's time is the moment it is ranked).

    Returns:
        logits [B] or [B, N].
    """

    def __init__(self, num_items: int, embed_dim: int = 32, num_heads: int = 2,
                 num_layers: int = 2, mlp_dims: Sequence[int] = (64, 32), dropout: float = 0.0,
                 max_positions: int = 64, num_time_buckets: int = 64,
                 backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(num_items, int) or num_items < 2:
            raise ValueError("num_items must be an int >= 2 (id 0 is padding), got %r" % (num_items,))
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError("num_layers must be an int >= 1, got %r" % (num_layers,))
        self.num_items = num_items
        self.embedding = nn.Embedding(num_items, embed_dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=embed_dim ** -0.5)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.layers = nn.ModuleList(
            HSTULayer(embed_dim, num_heads, dropout=dropout, num_positions=max_positions,
                      num_time_buckets=num_time_buckets, backend=backend)
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = _head(3 * embed_dim, mlp_dims, dropout)
        self.uses_time = num_time_buckets > 0

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor,
                history_times: Optional[torch.Tensor] = None,
                target_times: Optional[torch.Tensor] = None) -> torch.Tensor:
        if history.dim() != 2:
            raise ValueError("history must be [B, L] item ids, got %s" % list(history.shape))
        B, L = history.shape
        if target.dim() not in (1, 2) or target.shape[0] != B:
            raise ValueError("target must be [B] or [B, N] with B = %d, got %s" % (B, list(target.shape)))
        if self.uses_time and (history_times is None or target_times is None):
            raise ValueError("this model has a time bias (num_time_buckets > 0): pass history_times "
                             "[B, L] and target_times [B] / [B, N]")
        if not self.uses_time and (history_times is not None or target_times is not None):
            raise ValueError("this model has no time bias (num_time_buckets=0): it takes no timestamps")
        squeeze = target.dim() == 1
        tgt = target.unsqueeze(1) if squeeze else target
        N = tgt.shape[1]
        lengths = lengths.to(torch.long)
        # The padded [B, L + N] sequence with row b's candidates right after its history,
        # then its valid tokens, jagged.
        slots = lengths[:, None] + torch.arange(N, device=history.device)  # [B, N]
        seq = torch.cat([history, history.new_zeros(B, N)], 1).scatter(1, slots, tgt)
        valid = torch.arange(L + N, device=history.device)[None, :] < (lengths + N)[:, None]
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths + N, 0)])
        x = self.embedding(seq[valid])  # [T, E]
        extra = {}
        if self.uses_time:
            tt = target_times.unsqueeze(1) if target_times.dim() == 1 else target_times
            times = torch.cat([history_times, history_times.new_zeros(B, N)], 1).scatter(1, slots, tt)
            extra["timestamps"] = times[valid]
        num_targets = torch.full((B,), N, dtype=torch.long, device=history.device)
        # SiLU attention divides by a fixed length (HSTU's max_seq_len): the padded history
        # length, not L + N, so that a candidate's score does not depend on how many others
        # are ranked with it.
        for layer in self.layers:
            x = layer(x, offsets, max_length=L + N, num_targets=num_targets,
                      attn_scale=1.0 / max(L, 1), **extra)
        # Each candidate's output: its position in the jagged rows.
        o = self.norm(x[offsets[:-1, None] + slots])  # [B, N, E]
        t = self.embedding(tgt)
        o = o.to(t.dtype)
        logits = self.head(torch.cat([t, o, t * o], dim=-1)).squeeze(-1)
        return logits.squeeze(1) if squeeze else logits
