"""Random activation-unit pooling problems: the one generator behind its tests, `attnkern check`
and `attnkern bench`."""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ._inputs import edge_lengths, random_problem
from .reference_activation import ACTIVATION_PARAM_ROWS

# The registered forward op's arguments, in order (csrc/activation_unit_ops.cpp).
FWD_ARGS = ("query", "key", "value", "lengths", "mask", "offsets", "max_length", "w1", "b1",
            "w2", "b2", "w_out", "b_out", "act1", "act2", "activation", "softmax")
# The ones that are differentiable tensors (the backward's gradients, in this order).
GRAD_ARGS = ("query", "key", "value", "w1", "b1", "w2", "b2", "w_out", "b_out", "act1", "act2")


def random_mlp(E: int, units: Sequence[int], activation: str, *, generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> "OrderedDict[str, Optional[torch.Tensor]]":
    """Random MLP weights (w1, b1, w2, b2, w_out, b_out, act1, act2) for embedding size E and
    one or two hidden layers of `units`, scaled so that the scores are O(1)."""

    def randn(*shape, std=1.0):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(dtype)

    def act_params(h):
        rows = ACTIVATION_PARAM_ROWS[activation]
        if rows == 0:
            return None
        u = torch.rand((rows, h), generator=generator, dtype=torch.float64)
        if activation == "prelu":
            p = 0.5 * u  # slopes in [0, 0.5)
        else:  # alpha in [0, 0.5), scale in [0.5, 1.5), shift in [-0.5, 0.5)
            p = torch.stack([0.5 * u[0], 0.5 + u[1], u[2] - 0.5])
        return p.to(dtype)

    h1 = units[0]
    w = OrderedDict()
    w["w1"] = randn(h1, 4 * E, std=(4 * E) ** -0.5 * 1.5)
    w["b1"] = randn(h1, std=0.3)
    if len(units) == 2:
        w["w2"] = randn(units[1], h1, std=h1 ** -0.5 * 1.5)
        w["b2"] = randn(units[1], std=0.3)
    else:
        w["w2"], w["b2"] = None, None
    w["w_out"] = randn(1, units[-1], std=units[-1] ** -0.5)
    w["b_out"] = randn(1, std=0.3)
    w["act1"] = act_params(h1)
    w["act2"] = act_params(units[1]) if len(units) == 2 else None
    return w


def random_activation_problem(B: int = 3, N: int = 1, L: int = 13, E: int = 8, Dv: int = 8,
                              units: Sequence[int] = (16,), activation: str = "relu",
                              softmax: bool = False, layout: str = "lengths",
                              lengths: Optional[torch.Tensor] = None, *, seed: int = 0,
                              dtype: torch.dtype = torch.float32, extra_rows: int = 2,
                              device="cpu") -> "OrderedDict":
    """The registered forward op's arguments (FWD_ARGS order) for one random problem.

    layout: "lengths" | "mask" | "jagged" | "full" (as attnkern._inputs.random_problem); lengths
    default to empty, one, full, half and nearly full rows. Jagged problems carry `extra_rows`
    key/value rows that belong to no row."""
    g = torch.Generator().manual_seed(seed)
    lengths = edge_lengths(B, L) if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
    q, k, v, kw = random_problem(B, N, 1, L, E, Dv, layout, lengths, generator=g,
                                 extra_rows=extra_rows)
    if layout == "jagged":
        q, k, v = q[:, :, 0], k[:, 0], v[:, 0]
    else:
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    a = OrderedDict()
    a["query"], a["key"], a["value"] = q, k, v
    a["lengths"] = kw["lengths"].to(torch.int32) if "lengths" in kw else None
    a["mask"] = kw.get("mask")
    a["offsets"] = kw.get("offsets")
    a["max_length"] = kw.get("max_length", -1)
    a.update(random_mlp(E, units, activation, generator=g))
    a["activation"] = activation
    a["softmax"] = bool(softmax)
    for name, t in a.items():
        if isinstance(t, torch.Tensor):
            t = t.to(device)
            a[name] = t.to(dtype) if t.is_floating_point() else t
    return a
