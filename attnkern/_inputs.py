"""Random attention-pooling problems: the one generator behind the tests, `attnkern check` and
`attnkern bench`."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

LAYOUTS = ("lengths", "mask", "jagged", "full")


def edge_lengths(B: int, L: int) -> torch.Tensor:
    """Row lengths [B] (int64) cycling through empty, one, full, about half and nearly full."""
    base = [0, 1, L, L // 2 + 1, max(L - 3, 0)]
    return torch.tensor([min(base[i % len(base)], L) for i in range(B)], dtype=torch.int64)


def random_problem(B: int, N: int, H: int, L: int, Dk: int, Dv: int, layout: str,
                   lengths: torch.Tensor, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32, extra_rows: int = 0,
                   magnitude: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Dict]:
    """Random q [B, N, H, Dk] and k/v (padded [B, L, H, D], jagged [T, H, D]) on the CPU, and the
    layout's keyword arguments for `attention_pool`.

    layout: "lengths" (row b valid for its first lengths[b] positions), "mask" (random holes
    within those positions), "jagged" (rows packed back to back, offsets from lengths, then
    `extra_rows` rows that belong to no row) or "full" (no keyword: every position valid).
    q and k are scaled by `magnitude` (large logits)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if layout not in LAYOUTS:
        raise ValueError("layout must be one of %s, got %r" % (", ".join(LAYOUTS), layout))

    def randn(*shape):
        return torch.randn(shape, generator=generator, dtype=dtype)

    q = randn(B, N, H, Dk) * magnitude
    kw: Dict[str, Optional[torch.Tensor]] = {}
    if layout == "jagged":
        T = int(lengths.sum()) + extra_rows
        k, v = randn(T, H, Dk) * magnitude, randn(T, H, Dv)
        offsets = torch.zeros(B + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        kw = {"offsets": offsets, "max_length": L}
    else:
        k, v = randn(B, L, H, Dk) * magnitude, randn(B, L, H, Dv)
        if layout == "lengths":
            kw = {"lengths": lengths}
        elif layout == "mask":
            m = torch.rand((B, L), generator=generator) < 0.6
            kw = {"mask": m & (torch.arange(L)[None, :] < lengths[:, None])}
    return q, k, v, kw
