"""`AttentionPooling`: the drop-in layer around `attnkern.attention_pool`.

Projections in, the fused pooling in the middle, a projection out::

    q = W_q query            [B, (N,) H, E/H]
    k = W_k keys, v = W_v values          [B, L, H, E/H]  (or jagged [T, H, E/H])
    o = attention_pool(q, k, v, ...)      [B, (N,) H, E/H]
    out = W_o concat_heads(o)             [B, (N,) E]
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .functional import activation_unit_pool, attention_pool
from .reference import ACTIVATIONS, MAX_UNITS, dice_params

__all__ = ["AttentionPooling", "ActivationUnitPooling"]


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


class ActivationUnitPooling(nn.Module):
    """DIN attention pooling: an MLP over ``[q, k, q - k, q * k]`` scores each valid history
    item, the values are pooled with those scores (raw, or a masked softmax).

    A drop-in for FuxiCTR's ``DIN_Attention`` and DeepCTR-Torch's
    ``AttentionSequencePoolingLayer`` (``load_mlp_`` copies their weights; see README for the
    recipe and for what each does on an empty history, where this layer gives 0).

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
        backend: passed to `attnkern.activation_unit_pool`.

    Dice uses its running statistics (the buffers ``dice_running_mean_i`` /
    ``dice_running_var_i``) in training and evaluation alike: the fused op takes them as given
    constants (its inference form). The zoos' Dice, in training, normalises with the batch's
    statistics over every padded [B * L] position instead, and updates the running ones; this
    layer does not update them. Train with another activation, or keep the statistics of a
    model trained elsewhere.

    Forward:
        query: [B, E] or [B, N, E]; keys: padded [B, L, E] or jagged [T, E] (with offsets);
        values: default the keys themselves (pooled with one gradient); lengths / mask (True = attend) / offsets / max_length as in
        `attnkern.activation_unit_pool`. Returns [B, Dv] or [B, N, Dv].
    """

    def __init__(self, embed_dim: int, hidden_units: Sequence[int] = (64,), activation: str = "relu",
                 normalize: Optional[str] = None, *, bias: bool = True, prelu_init: float = 0.25,
                 dice_eps: float = 1e-8, dice_affine: bool = False, backend: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(hidden_units, int):
            hidden_units = (hidden_units,)
        hidden_units = tuple(hidden_units)
        if len(hidden_units) not in (1, 2) or not all(isinstance(h, int) and 1 <= h <= MAX_UNITS
                                                      for h in hidden_units):
            raise ValueError("hidden_units must be one or two ints in [1, %d], got %r" % (MAX_UNITS, hidden_units))
        if not isinstance(embed_dim, int) or not 1 <= embed_dim <= MAX_UNITS:
            raise ValueError("embed_dim must be an int in [1, %d], got %r" % (MAX_UNITS, embed_dim))
        if activation not in ACTIVATIONS:
            raise ValueError("activation must be one of %s, got %r" % (", ".join(ACTIVATIONS), activation))
        if normalize not in (None, "softmax"):
            raise ValueError("normalize must be None or 'softmax', got %r" % (normalize,))
        fk = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.hidden_units = hidden_units
        self.activation = activation
        self.normalize = normalize
        self.backend = backend
        self.dice_eps = float(dice_eps)
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

    def _activation_params(self):
        if self.activation == "prelu":
            return list(self.prelu_weight)
        if self.activation != "dice":
            return None
        out = []
        for i in range(len(self.hidden_units)):
            w = self.dice_weight[i] if len(self.dice_weight) else None
            b = self.dice_bias[i] if len(self.dice_bias) else None
            out.append(dice_params(self.dice_alpha[i], getattr(self, "dice_running_mean_%d" % i),
                                   getattr(self, "dice_running_var_%d" % i), self.dice_eps, w, b))
        return out

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor] = None,
                lengths: Optional[torch.Tensor] = None, *, mask: Optional[torch.Tensor] = None,
                offsets: Optional[torch.Tensor] = None, max_length: Optional[int] = None) -> torch.Tensor:
        weights = [(l.weight, l.bias) for l in self.hidden] + [(self.out.weight, self.out.bias)]
        return activation_unit_pool(query, keys, values, weights, lengths, mask=mask, offsets=offsets,
                                    max_length=max_length, activation=self.activation,
                                    activation_params=self._activation_params(), normalize=self.normalize,
                                    backend=self.backend)

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
            if bn.affine != bool(len(self.dice_weight)):
                raise ValueError("activations[%d]: its BatchNorm has affine=%s; build this layer with "
                                 "dice_affine=%s" % (i, bn.affine, bn.affine))
            if bn.affine:
                self.dice_weight[i].copy_(bn.weight)
                self.dice_bias[i].copy_(bn.bias)
        return self
