"""Correctness checking of attention pooling, shared by the test suite, `attnkern check` and the
oracle of `attnkern bench`:

- the one input generator (`random_problem`, and `make_problem` around it);
- the one tolerance table and rule (`FLOOR`, `LOW_PRECISION_FACTOR`, `compare`): a result's
  max error against a float64 oracle may be LOW_PRECISION_FACTOR times the error of the
  reference run in the same precision, plus FLOOR[dtype] times the oracle's magnitude (>= 1);
- the one checking body (`check_function`, `check_backend`): forward (out, lse) and the three
  gradients against the oracle, no NaN/Inf, exact zeros for empty rows and at positions that
  take part in no row.

The reference backend is checked against `loop_oracle`, an independent row-by-row float64
computation, never against itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
LAYOUTS = ("lengths", "mask", "jagged", "full")

# The tolerance table (absolute, relative to the oracle's magnitude) and the low-precision
# factor of the rule above.
FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOW_PRECISION_FACTOR = 2.0
OUTPUTS = ("out", "lse", "grad_query", "grad_key", "grad_value")


# ----------------------------------------------------------------------------------------------
# Inputs


def edge_lengths(B: int, L: int) -> torch.Tensor:
    """Row lengths [B] (int64) cycling through empty, one, full, about half and nearly full."""
    base = [0, 1, L, L // 2 + 1, max(L - 3, 0)]
    return torch.tensor([min(base[i % len(base)], L) for i in range(B)], dtype=torch.int64)


def random_problem(B: int, N: int, H: int, L: int, Dk: int, Dv: int, layout: str,
                   lengths: torch.Tensor, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32, extra_rows: int = 0,
                   magnitude: float = 1.0,
                   Hkv: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Dict]:
    """Random q [B, N, H, Dk] and k/v (padded [B, L, Hkv, D], jagged [T, Hkv, D]; Hkv = H
    unless given) on the CPU, and the layout's keyword arguments for `attention_pool`.

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
    Hkv = H if Hkv is None else Hkv
    kw: Dict[str, Optional[Tensor]] = {}
    if layout == "jagged":
        T = int(lengths.sum()) + extra_rows
        k, v = randn(T, Hkv, Dk) * magnitude, randn(T, Hkv, Dv)
        offsets = torch.zeros(B + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        kw = {"offsets": offsets, "max_length": L}
    else:
        k, v = randn(B, L, Hkv, Dk) * magnitude, randn(B, L, Hkv, Dv)
        if layout == "lengths":
            kw = {"lengths": lengths}
        elif layout == "mask":
            m = torch.rand((B, L), generator=generator) < 0.6
            kw = {"mask": m & (torch.arange(L)[None, :] < lengths[:, None])}
    return q, k, v, kw


def make_problem(B=3, N=1, H=1, L=37, Dk=16, Dv=16, dtype=torch.float32, layout="lengths",
                 lengths=None, device="cpu", seed=0, query_3d=False, magnitude=1.0,
                 extra_rows=2, lengths_dtype=torch.int32, Hkv=None):
    """Random inputs for one call: ([q, k, v], layout kwargs) for attnkern.attention_pool.

    lengths: None (empty, one, full, half and nearly full rows: `edge_lengths`), "uniform"
    (randint(0, L + 1) per row) or the lengths themselves. Jagged inputs get `extra_rows` trailing
    rows that belong to no row; lengths are `lengths_dtype` (int32, the common case). Hkv:
    K/V heads (default H; fewer are shared by groups of query heads)."""
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths_t = edge_lengths(B, L)
    elif isinstance(lengths, str) and lengths == "uniform":
        lengths_t = torch.randint(0, L + 1, (B,), generator=g)
    else:
        lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    q, k, v, kwargs = random_problem(B, N, H, L, Dk, Dv, layout, lengths_t, generator=g,
                                     extra_rows=extra_rows, magnitude=magnitude, Hkv=Hkv)
    if query_3d:
        assert N == 1
        q = q[:, 0]
    if "lengths" in kwargs:
        kwargs["lengths"] = kwargs["lengths"].to(lengths_dtype)
    kwargs = {name: t.to(device) if isinstance(t, Tensor) else t for name, t in kwargs.items()}
    args = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return args, kwargs


def random_grad_out(query: Tensor, value: Tensor, seed: int = 1) -> Tensor:
    """A random float32 upstream gradient shaped like the output of (query, value)."""
    shape = list(query.shape[:-1]) + [value.shape[-1]]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(query.device)


def row_positions(key: Tensor, kwargs: dict) -> List[Tensor]:
    """Per row b, the indices into key's leading dims flattened ([B * L] padded, [T] jagged) of
    the positions row b attends to."""
    if "offsets" in kwargs:
        o = kwargs["offsets"].long().cpu()
        return [torch.arange(int(o[b]), int(o[b + 1])) for b in range(o.numel() - 1)]
    B, L = key.shape[0], key.shape[1]
    if kwargs.get("mask") is not None:
        valid = kwargs["mask"].cpu()
    elif kwargs.get("key_padding_mask") is not None:
        valid = ~kwargs["key_padding_mask"].cpu()
    elif kwargs.get("lengths") is not None:
        valid = torch.arange(L)[None, :] < kwargs["lengths"].long().cpu()[:, None]
    else:
        valid = torch.ones(B, L, dtype=torch.bool)
    return [b * L + torch.nonzero(valid[b]).flatten() for b in range(B)]


def unused_positions(key: Tensor, kwargs: dict) -> Tensor:
    """Bool mask over key's leading dims ([B, L] padded, [T] jagged): positions that take part
    in no row, where grad_key / grad_value must be exactly zero."""
    lead = key.shape[:1] if "offsets" in kwargs else key.shape[:2]
    used = torch.zeros(math.prod(lead), dtype=torch.bool)
    for pos in row_positions(key, kwargs):
        used[pos] = True
    return ~used.reshape(lead)


# ----------------------------------------------------------------------------------------------
# Oracles and runs


def loop_oracle(q: Tensor, k: Tensor, v: Tensor, kwargs: dict, scale: float,
                grad_out: Optional[Tensor] = None):
    """Row by row and head by head in float64 on the CPU, over the valid positions only, with
    the softmax and its backward written out: an oracle that shares no code with the reference.
    q [B, N, H, Dk] (or [B, H, Dk]), k/v with Hkv heads (query head h uses K/V head
    h // (H // Hkv)); returns (out, lse[, grad_query, grad_key, grad_value])."""
    squeeze = q.dim() == 3
    q = (q.unsqueeze(1) if squeeze else q).detach().cpu().double()
    k, v = k.detach().cpu().double(), v.detach().cpu().double()
    B, N, H, _ = q.shape
    Hkv = k.shape[-2]
    kf, vf = k.reshape(-1, Hkv, k.shape[-1]), v.reshape(-1, Hkv, v.shape[-1])
    out = torch.zeros(B, N, H, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, N, H), -math.inf, dtype=torch.float64)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kf), torch.zeros_like(vf)
    go = None if grad_out is None else grad_out.detach().cpu().double().reshape(B, N, H, -1)
    for b, pos in enumerate(row_positions(k, kwargs)):
        if pos.numel() == 0:
            continue
        for h in range(H):
            hk = h // (H // Hkv)
            kb, vb = kf[pos, hk], vf[pos, hk]  # [P, D]
            s = scale * (q[b, :, h] @ kb.T)  # [N, P]
            m = s.max(dim=-1, keepdim=True).values
            w = torch.exp(s - m)
            z = w.sum(dim=-1, keepdim=True)
            p = w / z
            out[b, :, h] = p @ vb
            lse[b, :, h] = (m + torch.log(z)).squeeze(-1)
            if go is not None:
                g = go[b, :, h]  # [N, Dv]
                dp = g @ vb.T
                ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
                dq[b, :, h] = scale * (ds @ kb)
                dk[pos, hk] += scale * (ds.T @ q[b, :, h])
                dv[pos, hk] += p.T @ g
    if squeeze:
        out, lse, dq = out.squeeze(1), lse.squeeze(1), dq.squeeze(1)
    if go is None:
        return out, lse
    return out, lse, dq, dk.reshape(k.shape), dv.reshape(v.shape)


def forward_backward(fn: Callable, inputs: Sequence[Tensor], grad_out: Optional[Tensor],
                     grad_lse: Optional[Tensor] = None) -> tuple:
    """(out, lse, grad_query, grad_key, grad_value) of fn(q, k, v) -> (out, lse) on fresh
    leaves; gradients of out . grad_out (+ lse . grad_lse), zeros where none flows. Without
    grad_out: (out, lse) under no_grad."""
    if grad_out is None:
        with torch.no_grad():
            return tuple(fn(*inputs))
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    outs, gos = [out], [grad_out.to(out.dtype)]
    if grad_lse is not None:
        outs.append(lse)
        gos.append(torch.where(torch.isfinite(lse), grad_lse.to(lse.dtype), 0.0))
    grads = torch.autograd.grad(outs, leaves, gos, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return (out.detach(), lse.detach(), *[g.detach() for g in grads])


def pool_function(backend: str, kwargs: dict) -> Callable:
    """f(q, k, v) -> (out, lse): attnkern.attention_pool on `backend` with the layout kwargs."""
    import attnkern

    def fn(q, k, v):
        return attnkern.attention_pool(q, k, v, **kwargs, return_lse=True, backend=backend)
    return fn


# ----------------------------------------------------------------------------------------------
# The rule


def max_error(got: Tensor, want: Tensor) -> float:
    """Largest absolute difference (NaN counts as infinite); 0 for empty tensors."""
    if got.numel() == 0:
        return 0.0
    diff = (got.detach().cpu().double() - want.detach().cpu().double()).abs()
    return diff.nan_to_num(nan=math.inf).max().item()


def magnitude(t: Tensor) -> float:
    """max(1, max |t|): what the floor of the rule is relative to."""
    return 1.0 if t.numel() == 0 else max(1.0, t.detach().double().abs().max().item())


@dataclass
class Comparison:
    name: str
    error: float  # max abs error against the oracle
    allowed: float
    scale: float  # the oracle's magnitude
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.error <= self.allowed

    @property
    def relative(self) -> float:
        return self.error / self.scale

    def message(self, context: str = "") -> str:
        if not self.finite:
            return "%s has NaN/Inf%s" % (self.name, context)
        return "%s: max error %.3g > allowed %.3g%s" % (self.name, self.error, self.allowed, context)


def compare(name: str, got: Tensor, lowp: Tensor, oracle: Tensor, dtype: torch.dtype, *,
            floor: Optional[float] = None, extra_floor: float = 0.0) -> Comparison:
    """The tolerance rule: `got` against the float64 `oracle`, given `lowp`, the reference run in
    the same precision (pass the oracle itself to allow the floor only). The floor is
    FLOOR[dtype] unless given, plus extra_floor."""
    scale = magnitude(oracle)
    floor = FLOOR[dtype] if floor is None else floor
    allowed = LOW_PRECISION_FACTOR * max_error(lowp, oracle) + (floor + extra_floor) * scale
    finite = bool(torch.isfinite(got).all())
    return Comparison(name, max_error(got, oracle), allowed, scale, finite)


# ----------------------------------------------------------------------------------------------
# The checking body


@dataclass
class Report:
    """What `check_function` found: the checked outputs, the comparisons and every failure."""

    outputs: tuple  # (out, lse, grad_query, grad_key, grad_value) of the checked function
    comparisons: Dict[str, Comparison] = field(default_factory=dict)
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def errors(self) -> Dict[str, float]:
        return {name: c.error for name, c in self.comparisons.items()}

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    def assert_passed(self) -> "Report":
        assert self.passed, "; ".join(self.failures)
        return self


def _lse_check(report: Report, lse, lse_lp, lse64, dtype) -> None:
    # -inf exactly where the oracle is -inf (empty rows), close elsewhere.
    empty = torch.isneginf(lse64)
    report.expect(torch.equal(torch.isneginf(lse.cpu()), empty), "lse must be -inf exactly on empty rows")
    report.expect(not bool(torch.isnan(lse).any()), "lse has NaN")
    if (~empty).any():
        fin = ~empty
        # lse is float32 whatever the inputs: the floor of float32 (or of the inputs' lower
        # precision), four times over.
        floor = FLOOR[torch.float32 if dtype == torch.float64 else dtype] * 4
        c = compare("lse", lse.cpu()[fin], lse_lp.cpu()[fin], lse64[fin], dtype, floor=floor)
        report.comparisons["lse"] = c
        report.expect(c.ok, c.message())


def check_function(fn: Callable, inputs: Sequence[Tensor], kwargs: dict, grad_out: Tensor, *,
                   reference: Optional[Callable] = None, scale: Optional[float] = None,
                   grads: bool = True, max_logit: float = 0.0, label: str = "") -> Report:
    """The one checking body: fn(q, k, v) -> (out, lse) on `inputs` (layout `kwargs`) against a
    float64 oracle, forward (out, lse) and the three gradients of out . grad_out, within the
    tolerance rule; no NaN/Inf; exact zeros for empty rows (out, grad_query) and at positions
    that take part in no row (grad_key, grad_value).

    reference: f(q, k, v) -> (out, lse) run in float64 as the oracle and in the inputs' dtype for
    the rule's low-precision error. None checks fn as the reference itself: against
    `loop_oracle` (with `scale`), allowing the floor only.
    max_logit: the largest |scale * q.k|. A kernel that recomputes the logits in float32 (and
    stores lse in float32) differs from the reference by ~|logit| * eps there, so the floor
    grows with it."""
    dtype = inputs[0].dtype
    got = forward_backward(fn, inputs, grad_out)
    if reference is None:
        oracle = loop_oracle(*inputs, kwargs, scale, grad_out)
        lowp = oracle
    else:
        oracle = forward_backward(reference, [t.detach().double() for t in inputs],
                                  grad_out.double())
        lowp = oracle if dtype == torch.float64 else forward_backward(reference, inputs, grad_out)
    oracle = tuple(t.cpu() for t in oracle)
    report = Report(got)
    context = " (%s, %s)" % (label, str(dtype).split(".")[-1]) if label else ""
    out, lse = got[0], got[1]
    report.expect(out.dtype == dtype and out.shape == oracle[0].shape,
                  "out must be %s %s, got %s %s" % (dtype, list(oracle[0].shape), out.dtype,
                                                    list(out.shape)))
    report.expect(lse.dtype == torch.float32 and lse.shape == oracle[1].shape,
                  "lse must be float32 %s, got %s %s" % (list(oracle[1].shape), lse.dtype,
                                                         list(lse.shape)))
    if report.failures:
        return report
    extra = 8 * max_logit * torch.finfo(torch.float32).eps
    names = OUTPUTS if grads else OUTPUTS[:2]
    for i, name in enumerate(names):
        if name == "lse":
            _lse_check(report, lse, lowp[1], oracle[1], dtype)
            continue
        if i >= 2:
            report.expect(got[i].shape == oracle[i].shape and got[i].dtype == dtype,
                          "%s must be %s %s" % (name, dtype, list(oracle[i].shape)))
        c = compare(name, got[i], lowp[i], oracle[i], dtype, extra_floor=extra)
        report.comparisons[name] = c
        report.expect(c.ok, c.message(context))
    empty = torch.isneginf(oracle[1])
    if empty.any():
        report.expect(bool((out.cpu().double()[empty] == 0).all()), "empty rows must give out = 0")
    if grads:
        unused = unused_positions(inputs[1], kwargs)
        for name, g in zip(OUTPUTS[3:], got[3:]):
            report.expect(bool((g.cpu()[unused] == 0).all()),
                          "%s must be exactly 0 where unused" % name)
        if empty.any():
            report.expect(bool((got[2].cpu().double()[empty] == 0).all()),
                          "grad_query must be 0 on empty rows")
    return report


def check_backend(backend: str, args: Sequence[Tensor], kwargs: dict,
                  grad_out: Optional[Tensor] = None, *, grads: bool = True,
                  max_logit: float = 0.0) -> Report:
    """`check_function` on attnkern.attention_pool(..., backend=backend): against the float64
    reference for the fused backends, against `loop_oracle` for the reference itself."""
    if grad_out is None:
        grad_out = random_grad_out(args[0], args[2])
    scale = kwargs.get("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(args[0].shape[-1])
    reference = None if backend == "reference" else pool_function("reference", kwargs)
    return check_function(pool_function(backend, kwargs), args, kwargs, grad_out,
                          reference=reference, scale=scale, grads=grads, max_logit=max_logit,
                          label=backend)
