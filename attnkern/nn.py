"""`AttentionPooling`: the drop-in layer around `attnkern.attention_pool`.

Projections in, the fused pooling in the middle, a projection out::

    q = W_q query            [B, (N,) H, E/H]
    k = W_k keys, v = W_v values          [B, L, H, E/H]  (or jagged [T, H, E/H])
    o = attention_pool(q, k, v, ...)      [B, (N,) H, E/H]
    out = W_o concat_heads(o)             [B, (N,) E]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import attention_pool

__all__ = ["AttentionPooling"]


class AttentionPooling(nn.Module):
    """Multi-head target attention pooling over a padded or jagged history.

    Each query (a candidate item, a learned query, ...) attends over its row's valid keys and
    gets one pooled vector back. The layer owns the query, key, value and output projections;
    the pooling itself is the fused `attnkern.attention_pool` on the chosen backend.

    Args:
        embed_dim: E, the size of the query and of the output; split into ``num_heads`` heads
            of E / num_heads each (E must be divisible by num_heads).
        num_heads: H.
        kdim: size of the keys' last dim (default E).
        vdim: size of the values' last dim (default ``kdim``).
        bias: whether the four projections have a bias.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton", passed to `attention_pool`.

    Forward:
        query: [B, E] (one query per row) or [B, N, E] (N candidates sharing a row's history).
        keys: padded [B, L, kdim], or jagged [T, kdim] together with ``offsets`` [B+1].
        values: like ``keys`` with last dim ``vdim``; defaults to ``keys``.
        lengths: padded only, [B] int32/int64: row b's valid prefix is ``keys[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part (the SDPA convention).
            With neither ``lengths`` nor ``mask`` every position takes part.
        offsets: jagged only, [B+1] int32/int64: row b is ``keys[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional Python int >= every row's length (saves a device
            sync; needed with the reference backend under ``torch.compile``).

    Returns:
        [B, E] or [B, N, E], in the dtype of the projections' output (the autocast dtype under
        ``torch.autocast``). A row with an empty history pools to zero, so its output is the
        output projection's bias.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int = 1,
        *,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        bias: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError("embed_dim must be a positive int, got %r" % (embed_dim,))
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError("num_heads must be a positive int, got %r" % (num_heads,))
        if embed_dim % num_heads != 0:
            raise ValueError(
                "embed_dim (%d) must be divisible by num_heads (%d)" % (embed_dim, num_heads)
            )
        kdim = embed_dim if kdim is None else kdim
        vdim = kdim if vdim is None else vdim
        for name, d in (("kdim", kdim), ("vdim", vdim)):
            if not isinstance(d, int) or d < 1:
                raise ValueError("%s must be a positive int, got %r" % (name, d))
        if not isinstance(backend, str):
            raise TypeError("backend must be a str, got %s" % type(backend).__name__)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation: Xavier-uniform input projections, zero
        # biases. The default Linear init is ~1.7x smaller per projection, which starts the
        # softmax close to uniform (plain mean pooling) and slows learning which items matter.
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def extra_repr(self) -> str:
        return "embed_dim=%d, num_heads=%d, kdim=%d, vdim=%d, backend=%r" % (
            self.embed_dim, self.num_heads, self.kdim, self.vdim, self.backend)

    def _check(self, query, keys, values, offsets):
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
        mask: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        max_length: Optional[int] = None,
    ) -> torch.Tensor:
        if values is None:
            if self.vdim != self.kdim:
                raise ValueError(
                    "values default to keys only when vdim == kdim (got kdim=%d, vdim=%d): "
                    "pass values" % (self.kdim, self.vdim)
                )
            values = keys
        self._check(query, keys, values, offsets)
        H, D = self.num_heads, self.head_dim
        q = self.q_proj(query)
        k = self.k_proj(keys)
        v = self.v_proj(values)
        q = q.unflatten(-1, (H, D))  # [B, (N,) H, D]
        k = k.unflatten(-1, (H, D))  # [B, L, H, D] or [T, H, D]
        v = v.unflatten(-1, (H, D))
        # Under autocast the projections already ran in the low-precision dtype; the pooling
        # takes one dtype for q, k, v and accumulates in float32 itself, so it runs with
        # autocast off (like a custom_fwd op) and is not re-cast op by op.
        k = k.to(q.dtype)
        v = v.to(q.dtype)
        with torch.autocast(device_type=q.device.type, enabled=False):
            o = attention_pool(
                q, k, v, lengths, mask=mask, offsets=offsets, max_length=max_length,
                backend=self.backend,
            )
        return self.out_proj(o.flatten(-2))
