"""`TargetAttentionCTR`: the thin recommender that shows what the layer is for.

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

from .nn import ActivationUnitPooling, AttentionPooling

__all__ = ["TargetAttentionCTR", "POOLINGS"]

POOLINGS = ("attention", "sum", "din")


class TargetAttentionCTR(nn.Module):
    """Click-through-rate model with target attention over the behaviour history.

    Args:
        num_items: size of the item-id table; ids lie in [0, num_items), 0 is padding.
        embed_dim: item embedding size E (divisible by ``num_heads``).
        num_heads: heads of the attention pooling.
        mlp_dims: hidden sizes of the MLP head.
        pooling: "attention" (`AttentionPooling`, the target as query), "sum" (sum of the
            valid history embeddings, the DIN paper's base model) or "din"
            (`ActivationUnitPooling` with ``din_units`` hidden units and PReLU, raw weights).
        dropout: dropout after each hidden layer of the head.
        backend: attention backend, see `attnkern.attention_pool`.
        din_units: hidden layer widths of the activation unit (``pooling="din"``).
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
            self.pool = ActivationUnitPooling(embed_dim, din_units, "prelu", backend=backend)
        else:
            self.pool = None
        layers = []
        width = 3 * embed_dim
        for d in mlp_dims:
            layers += [nn.Linear(width, d), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = d
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)

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
        h = self.embedding(history)  # [B, L, E]
        t = self.embedding(target)  # [B, E] or [B, N, E]
        times = history_times is not None or target_time is not None
        if self.pooling == "attention":
            kw = dict(key_times=history_times, query_time=target_time) if times else {}
            pooled = self.pool(t, h, lengths=lengths, **kw)
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
