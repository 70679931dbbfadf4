"""The one checking body of activation-unit pooling: a backend against the float64 reference,
forward and every gradient (query, key, value, weights, biases, activation parameters), under
the project's low-precision tolerance rule. Used by the tests and by `attnkern check`."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from ._activation_inputs import GRAD_ARGS

# The tolerance rule of attention_pool (attnkern/check.py): error against the float64 oracle
# <= LOW_PRECISION_FACTOR x the same-precision reference's error + FLOOR[dtype] x magnitude.
LOW_PRECISION_FACTOR = 2.0
FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def to_public(a: dict) -> Tuple[tuple, dict]:
    """The public activation_unit_pool call (args, kwargs) of the forward op's arguments `a`."""
    weights = [(a["w1"], a["b1"])]
    if a["w2"] is not None:
        weights.append((a["w2"], a["b2"]))
    weights.append((a["w_out"], a["b_out"]))
    params = None
    if a["act1"] is not None:
        params = [a["act1"]] + ([a["act2"]] if a["act2"] is not None else [])
        if a["activation"] == "prelu":
            params = [p[0] for p in params]
    kw = dict(activation=a["activation"], activation_params=params,
              normalize="softmax" if a["softmax"] else None)
    for n in ("lengths", "mask", "offsets"):
        if a[n] is not None:
            kw[n] = a[n]
    if a["offsets"] is not None and a["max_length"] >= 0:
        kw["max_length"] = a["max_length"]
    return (a["query"], a["key"], a["value"], weights), kw


def run(backend: str, a: dict, grad_out: torch.Tensor, dtype=None) -> Dict[str, torch.Tensor]:
    """out and the gradient of every differentiable input, with inputs cast to `dtype`."""
    import attnkern

    leaves = dict(a)
    for n in GRAD_ARGS:
        if a[n] is not None:
            t = a[n].detach()
            leaves[n] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_(True)
    args, kw = to_public(leaves)
    out = attnkern.activation_unit_pool(*args, **kw, backend=backend)
    names = [n for n in GRAD_ARGS if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
    res = {"out": out.detach()}
    for n, g in zip(names, grads):
        res[n] = torch.zeros_like(leaves[n]) if g is None else g.detach()
    return res


def _err(a, b):
    return 0.0 if a.numel() == 0 else (a.double().cpu() - b.double().cpu()).abs().max().item()


def check(backend: str, a: dict, seed: int = 1) -> Tuple[bool, Dict[str, float], str]:
    """Runs `backend` on problem `a` (FWD_ARGS dict, dtype of a["query"]) against the float64
    reference. Returns (passed, max errors by name, why it failed). Also checks that outputs are
    finite, empty rows give 0 and positions in no row get exactly zero key/value gradients."""
    dtype = a["query"].dtype
    B, N = a["query"].shape[:2]
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(B, N, a["value"].shape[-1], generator=g, dtype=torch.float64).to(a["query"].device)
    oracle = run("reference", a, go, torch.float64)
    lowp = oracle if dtype == torch.float64 else run("reference", a, go)
    got = run(backend, a, go)
    errors, why = {}, []
    for name, ref in oracle.items():
        x = got[name]
        if x.shape != ref.shape or x.dtype != dtype:
            why.append("%s: shape/dtype %s %s, want %s %s" % (name, list(x.shape), x.dtype, list(ref.shape), dtype))
            continue
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        # Plus one rounding of the result to the output dtype: two fp32 results that differ in
        # the last bits can round to neighbouring low-precision values.
        ulp = torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
        allowed = LOW_PRECISION_FACTOR * _err(lowp[name], ref) + FLOOR[dtype] * scale + ulp
        errors[name] = _err(x, ref)
        if not bool(torch.isfinite(x).all()):
            why.append("%s has NaN/Inf" % name)
        elif errors[name] > allowed:
            why.append("%s: error %.3g > allowed %.3g" % (name, errors[name], allowed))
    # Exact zeros: empty rows, and key/value rows that take part in no row.
    valid = valid_mask(a)
    empty = ~valid.any(dim=-1) if valid.dim() == 2 else None
    if empty is not None and empty.any():
        if (got["out"][empty.to(got["out"].device)] != 0).any():
            why.append("out must be exactly 0 on empty rows")
        if (got["query"][empty.to(got["out"].device)] != 0).any():
            why.append("grad query must be exactly 0 on empty rows")
    unused = unused_rows(a)
    for name in ("key", "value"):
        if (got[name].cpu()[unused] != 0).any():
            why.append("grad %s must be exactly 0 at positions in no row" % name)
    return not why, errors, "; ".join(why)


def valid_mask(a: dict) -> torch.Tensor:
    """[B, L] bool of the valid positions (jagged: [B, max row length])."""
    if a["offsets"] is not None:
        o = a["offsets"].long().cpu()
        lens = o[1:] - o[:-1]
        L = int(lens.max()) if lens.numel() else 0
        return torch.arange(L)[None, :] < lens[:, None]
    B, L = a["key"].shape[:2]
    if a["mask"] is not None:
        return a["mask"].cpu()
    if a["lengths"] is not None:
        return torch.arange(L)[None, :] < a["lengths"].long().cpu()[:, None]
    return torch.ones(B, L, dtype=torch.bool)


def unused_rows(a: dict) -> torch.Tensor:
    """Bool over key's leading dims ([B, L] padded, [T] jagged): positions in no row."""
    if a["offsets"] is not None:
        o = a["offsets"].long().cpu()
        covered = torch.zeros(a["key"].shape[0], dtype=torch.bool)
        for b in range(o.numel() - 1):
            covered[o[b]:o[b + 1]] = True
        return ~covered
    return ~valid_mask(a)
