"""Correctness checking of attnkern.attention_topk, shared by the tests and `attnkern check`:
`check_topk` runs a backend on one problem and checks its answer against a float64 row-by-row
oracle, never against another backend's answer.

A top-k is checked by what makes it right rather than by equality with one expected list (two
scores a rounding apart may come in either order): per query and head, the kept positions are
distinct valid positions of the row; they are as many as min(k, the row's positions with a score
above -inf); the slots after them hold index -1 and score -inf; the scores are non-increasing and
equal the oracle's at those positions; and no position left out beats a kept one by more than
the tolerance. Equal scores keep the lower position first (checked on exact ties)."""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from .testing import FLOOR, row_positions

Tensor = torch.Tensor


def _oracle_rows(q: Tensor, key: Tensor, kwargs: dict, scale: float, bias: Optional[Tensor]):
    """Per (b, n, h): (positions in the row, their float64 scores)."""
    jagged = "offsets" in kwargs
    B, N, H, Dk = q.shape
    Hkv = key.shape[-2]
    k64 = key.detach().double().cpu().reshape(-1, Hkv, Dk)
    q64 = q.detach().double().cpu()
    b64 = None
    if bias is not None:
        b64 = bias.detach().double().cpu()
        b64 = b64.unsqueeze(1) if b64.dim() == (2 if jagged else 3) else b64
    L = None if jagged else key.shape[1]
    rows = {}
    for b, flat in enumerate(row_positions(key, kwargs)):
        first = int(kwargs["offsets"][b]) if jagged else b * L
        pos = flat - first
        for n in range(N):
            for h in range(H):
                s = (k64[flat, h // (H // Hkv)] @ q64[b, n, h]) * scale
                if b64 is not None:
                    nb, hb = n % b64.shape[1], h % b64.shape[2]
                    s = s + (b64[flat, nb, hb] if jagged else b64[b, nb, hb, pos])
                rows[b, n, h] = (pos, s)
    return rows


def check_topk(fn, q: Tensor, key: Tensor, k: int, kwargs: dict, *, scale: Optional[float] = None,
               bias: Optional[Tensor] = None, errors: Optional[dict] = None) -> List[str]:
    """The failures (empty: passed) of ``fn(q, key, k, **kwargs, scale=, bias=)`` -> (scores,
    indices) on query q [B, N, H, Dk] against the oracle (module docstring). `errors`, when
    given, gets "scores": the largest error of a kept score."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    extra = {} if bias is None else {"bias": bias}
    scores, idx = fn(q, key, k, **kwargs, scale=scale, **extra)
    B, N, H, _ = q.shape
    want = (B, N, H, k)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    fails = []
    if tuple(scores.shape) != want or tuple(idx.shape) != want:
        return ["shapes %s / %s, expected %s" % (list(scores.shape), list(idx.shape), list(want))]
    if scores.dtype != acc or idx.dtype != torch.int64:
        return ["dtypes %s / %s, expected %s / torch.int64" % (scores.dtype, idx.dtype, acc)]
    scores, idx = scores.detach().cpu(), idx.cpu()
    # The oracle scores exactly the inputs the kernels read (rounded to their dtype), so the
    # only error left is the float32 accumulation's.
    tol = FLOOR[torch.float64] if q.dtype == torch.float64 else FLOOR[torch.float32]
    for (b, n, h), (pos, s) in _oracle_rows(q, key, kwargs, scale, bias).items():
        where = "row %d, query %d, head %d" % (b, n, h)
        live = s != -math.inf
        pos, s = pos[live], s[live]
        got_i, got_s = idx[b, n, h], scores[b, n, h]
        m = min(k, pos.numel())
        mag = max(1.0, float(s.abs().max())) if s.numel() else 1.0
        if not (got_i[m:] == -1).all() or not (got_s[m:] == -math.inf).all():
            fails.append("%s: slots %d.. must be index -1 / score -inf, got %s / %s"
                         % (where, m, got_i[m:].tolist(), got_s[m:].tolist()))
            continue
        kept = got_i[:m]
        lookup = {int(p): float(v) for p, v in zip(pos, s)}
        if len(set(kept.tolist())) != m or any(int(i) not in lookup for i in kept):
            fails.append("%s: indices %s are not %d distinct valid positions" % (where, kept.tolist(), m))
            continue
        oracle_kept = torch.tensor([lookup[int(i)] for i in kept], dtype=torch.float64)
        err = float((got_s[:m].double() - oracle_kept).abs().max()) if m else 0.0
        if errors is not None:
            errors["scores"] = max(errors.get("scores", 0.0), err)
        if err > tol * mag:
            fails.append("%s: scores off the oracle's by %.3g (tolerance %.3g)" % (where, err, tol * mag))
        if m > 1 and not (got_s[:m - 1] >= got_s[1:m]).all():
            fails.append("%s: scores not best first: %s" % (where, got_s[:m].tolist()))
        ties = (got_s[:m - 1] == got_s[1:m]) & (kept[:-1] > kept[1:]) if m > 1 else torch.zeros(0, dtype=torch.bool)
        if ties.any():
            fails.append("%s: equal scores must keep the lower position first: %s" % (where, kept.tolist()))
        left = torch.tensor([v for p, v in lookup.items() if p not in set(kept.tolist())], dtype=torch.float64)
        if m and left.numel() and float(left.max()) > float(oracle_kept.min()) + 2 * tol * mag:
            fails.append("%s: a position left out scores %.6g above a kept %.6g"
                         % (where, float(left.max()), float(oracle_kept.min())))
    return fails
