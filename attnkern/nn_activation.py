"""`ActivationUnitPooling`: DIN's local activation unit as a layer around the fused
`attnkern.activation_unit_pool`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .activation_unit import activation_unit_pool
from .reference_activation import ACTIVATIONS, MAX_UNITS, dice_params

__all__ = ["ActivationUnitPooling"]


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
        values: default keys; lengths / mask (True = attend) / offsets / max_length as in
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
        values = keys if values is None else values
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
