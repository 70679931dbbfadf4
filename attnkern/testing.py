"""Correctness checking of attention pooling, shared by the test suite, `attnkern check` and the
oracle of `attnkern bench`:

- the one input generator (`random_problem`, and `make_problem` around it);
- the one tolerance table and rule (`FLOOR`, `LOW_PRECISION_FACTOR`, `compare`): a result's
  max error against a float64 oracle may be LOW_PRECISION_FACTOR times the error of the
  reference run in the same precision, plus FLOOR[dtype] times the oracle's magnitude (>= 1);
- the one checking body (`check_function`, `check_backend`): forward (out, lse) and the three
  gradients (four with a score bias) against the oracle, no NaN/Inf, exact zeros for empty rows
  and at positions that take part in no row;
- the same for activation-unit pooling (DIN): `random_activation_problem`,
  `activation_loop_oracle` and `check_activation_backend` (out and every gradient, weights,
  biases and activation parameters included).

The reference backend is checked against `loop_oracle`, an independent row-by-row float64
computation, never against itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .ops.schemas import ACTIVATION_FWD_ARGS, ACTIVATION_GRAD_ARGS
from .reference import ACTIVATION_PARAM_ROWS

Tensor = torch.Tensor
LAYOUTS = ("lengths", "mask", "jagged", "full")

# The tolerance table (absolute, relative to the oracle's magnitude) and the low-precision
# factor of the rule above.
FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LOW_PRECISION_FACTOR = 2.0
OUTPUTS = ("out", "lse", "grad_query", "grad_key", "grad_value", "grad_bias")
BIAS_KINDS = ("shared", "per_query")


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


def random_bias(q: Tensor, k: Tensor, jagged: bool, kind: str, Hb: int, *,
                generator: torch.Generator, dtype: Optional[torch.dtype] = None,
                std: float = 2.0) -> Tensor:
    """A random score bias for query q [B, N, H, Dk] and key k (padded [B, L, ...] or jagged
    [T, ...]): kind "shared" is padded [B, Hb, L] / jagged [T, Hb], "per_query" [B, N, Hb, L] /
    [T, N, Hb]. dtype: the query's unless given."""
    if kind not in BIAS_KINDS:
        raise ValueError("bias kind must be one of %s, got %r" % (", ".join(BIAS_KINDS), kind))
    B, N = q.shape[0], q.shape[1]
    mid = (N, Hb) if kind == "per_query" else (Hb,)
    shape = (k.shape[0],) + mid if jagged else (B,) + mid + (k.shape[1],)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * std).to(dtype or q.dtype)


def make_problem(B=3, N=1, H=1, L=37, Dk=16, Dv=16, dtype=torch.float32, layout="lengths",
                 lengths=None, device="cpu", seed=0, query_3d=False, magnitude=1.0,
                 extra_rows=2, lengths_dtype=torch.int32, Hkv=None, bias=None, bias_heads=None,
                 bias_dtype=None):
    """Random inputs for one call: ([q, k, v], layout kwargs) for attnkern.attention_pool.

    lengths: None (empty, one, full, half and nearly full rows: `edge_lengths`), "uniform"
    (randint(0, L + 1) per row) or the lengths themselves. Jagged inputs get `extra_rows` trailing
    rows that belong to no row; lengths are `lengths_dtype` (int32, the common case). Hkv:
    K/V heads (default H; fewer are shared by groups of query heads). bias: None, or a kind of
    `random_bias` ("shared", "per_query") with bias_heads heads (default H) and bias_dtype
    (default the query's): the inputs are then [q, k, v, bias]."""
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
    if bias is not None:
        q4 = q.unsqueeze(1) if query_3d else q
        b = random_bias(q4, k, layout == "jagged", bias, H if bias_heads is None else bias_heads,
                        generator=g, dtype=bias_dtype or dtype)
        args.append(b.to(device))
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


def unused_positions(key: Tensor, kwargs: dict, device=None) -> Tensor:
    """Bool mask over key's leading dims ([B, L] padded, [T] jagged): positions that take part
    in no row, where grad_key / grad_value must be exactly zero. On `device` (default the CPU,
    whatever key's device)."""
    lead = key.shape[:1] if "offsets" in kwargs else key.shape[:2]
    used = torch.zeros(math.prod(lead), dtype=torch.bool)
    for pos in row_positions(key, kwargs):
        used[pos] = True
    return (~used.reshape(lead)).to(device or "cpu")


# ----------------------------------------------------------------------------------------------
# Oracles and runs


def _bias_positions(bias: Tensor, jagged: bool, N: int) -> Tensor:
    """A public bias as [positions of key's flattened leading dims, N, Hb] (a view where it can
    be): padded [B, Hb, L] / [B, N, Hb, L] -> [B * L, N, Hb]; jagged [T, Hb] / [T, N, Hb] ->
    [T, N, Hb]."""
    b4 = bias.unsqueeze(1) if bias.dim() == (2 if jagged else 3) else bias
    if not jagged:
        b4 = b4.permute(0, 3, 1, 2).flatten(0, 1)  # [B * L, Nb, Hb]
    return b4.expand(b4.shape[0], N, b4.shape[2])


def loop_oracle(q: Tensor, k: Tensor, v: Tensor, kwargs: dict, scale: float,
                grad_out: Optional[Tensor] = None, bias: Optional[Tensor] = None):
    """Row by row and head by head in float64 on the CPU, over the valid positions only, with
    the softmax and its backward written out: an oracle that shares no code with the reference.
    q [B, N, H, Dk] (or [B, H, Dk]), k/v with Hkv heads (query head h uses K/V head
    h // (H // Hkv)), bias as attention_pool takes it (or None); returns
    (out, lse[, grad_query, grad_key, grad_value[, grad_bias]])."""
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
    jagged = "offsets" in kwargs
    bf = None if bias is None else _bias_positions(bias.detach().cpu().double(), jagged, N)
    db = None if bias is None else torch.zeros(bf.shape[0], N, H, dtype=torch.float64)
    for b, pos in enumerate(row_positions(k, kwargs)):
        if pos.numel() == 0:
            continue
        for h in range(H):
            hk = h // (H // Hkv)
            kb, vb = kf[pos, hk], vf[pos, hk]  # [P, D]
            s = scale * (q[b, :, h] @ kb.T)  # [N, P]
            if bf is not None:
                s = s + bf[pos, :, h if bf.shape[2] == H else 0].T
            # A row whose every logit is -inf is empty: no shift, every weight 0.
            m = s.max(dim=-1, keepdim=True).values
            m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            w = torch.exp(s - m)
            z = w.sum(dim=-1, keepdim=True)
            nonempty = z != 0
            p = w / torch.where(nonempty, z, torch.ones_like(z))
            out[b, :, h] = p @ vb
            lse[b, :, h] = torch.where(nonempty, m + torch.log(z), -math.inf).squeeze(-1)
            if go is not None:
                g = go[b, :, h]  # [N, Dv]
                dp = g @ vb.T
                ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
                dq[b, :, h] = scale * (ds @ kb)
                dk[pos, hk] += scale * (ds.T @ q[b, :, h])
                dv[pos, hk] += p.T @ g
                if db is not None:
                    db[pos, :, h] += ds.T
    if squeeze:
        out, lse, dq = out.squeeze(1), lse.squeeze(1), dq.squeeze(1)
    if go is None:
        return out, lse
    grads = (dq, dk.reshape(k.shape), dv.reshape(v.shape))
    if db is not None:
        grads += (_fold_bias_grad(db, bias, jagged),)
    return (out, lse) + grads


def _fold_bias_grad(db: Tensor, bias: Tensor, jagged: bool) -> Tensor:
    """The loop oracle's gradient per (position, query, head) [P, N, H] summed into the shape of
    the public bias (over the queries when shared, the heads when Hb = 1)."""
    shared = bias.dim() == (2 if jagged else 3)
    g = db.sum(1, keepdim=True) if shared else db  # [P, Nb, H]
    if bias.shape[-1 if jagged else -2] == 1:
        g = g.sum(2, keepdim=True)
    if not jagged:
        B, L = bias.shape[0], bias.shape[-1]
        g = g.unflatten(0, (B, L)).permute(0, 2, 3, 1)  # [B, Nb, Hb, L]
    return g.squeeze(1) if shared else g


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
    """f(q, k, v[, bias]) -> (out, lse): attnkern.attention_pool on `backend` with the layout
    kwargs."""
    import attnkern

    def fn(q, k, v, bias=None):
        return attnkern.attention_pool(q, k, v, **kwargs, bias=bias, return_lse=True, backend=backend)
    return fn


def pool_by_weights(w: Tensor, v: Tensor, kwargs: dict) -> Tensor:
    """out [B, N, H, Dv] = sum over each row's positions of the weights w (padded [B, N, H, L],
    jagged [T, N, H]) times v (K/V head h // (H // Hkv)): attention_pool's out, by the weights."""
    from .reference import token_rows

    H, Hkv = w.shape[2], v.shape[-2]
    v = v.to(w.dtype).repeat_interleave(H // Hkv, dim=-2)
    if "offsets" not in kwargs:
        return torch.einsum("bnhl,blhd->bnhd", w, v)
    B = kwargs["offsets"].shape[0] - 1
    row, _, _ = token_rows(kwargs["offsets"], v.shape[0])
    per_row = w.unsqueeze(-1) * v.unsqueeze(1)  # [T, N, H, Dv]: 0 past offsets[-1] (w is)
    return per_row.new_zeros((B,) + tuple(per_row.shape[1:])).index_add(0, row, per_row)


def weights_function(backend: str, kwargs: dict) -> Callable:
    """f(q, k, v[, bias]) -> (out, lse) through attnkern.attention_weights on `backend`: out is
    `pool_by_weights` of its weights (in the query's dtype), so that the checking body tests
    the weights and their gradients by the pooling they define; lse is the reference pool's
    (no gradient: the weights have none)."""
    import attnkern

    def fn(q, k, v, bias=None):
        layout = {n: t for n, t in kwargs.items() if n != "return_lse"}
        w = attnkern.attention_weights(q, k, **layout, bias=bias, backend=backend)
        if q.dim() == 3:
            w = w.unsqueeze(1)
        out = pool_by_weights(w, v, kwargs).to(q.dtype)
        with torch.no_grad():
            _, lse = attnkern.attention_pool(q, k, v, **layout, bias=bias, return_lse=True,
                                             backend="reference")
        return (out.squeeze(1) if q.dim() == 3 else out), lse
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
    """The one checking body: fn(q, k, v[, bias]) -> (out, lse) on `inputs` (layout `kwargs`)
    against a float64 oracle, forward (out, lse) and the three (with bias four) gradients of
    out . grad_out, within the tolerance rule; no NaN/Inf; exact zeros for empty rows (out,
    grad_query) and at positions that take part in no row (grad_key, grad_value, grad_bias).

    reference: f(q, k, v) -> (out, lse) run in float64 as the oracle and in the inputs' dtype for
    the rule's low-precision error. None checks fn as the reference itself: against
    `loop_oracle` (with `scale`), allowing the floor only.
    max_logit: the largest |scale * q.k|. A kernel that recomputes the logits in float32 (and
    stores lse in float32) differs from the reference by ~|logit| * eps there, so the floor
    grows with it."""
    dtype = inputs[0].dtype
    got = forward_backward(fn, inputs, grad_out)
    if reference is None:
        oracle = loop_oracle(*inputs[:3], kwargs, scale, grad_out,
                             bias=inputs[3] if len(inputs) > 3 else None)
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
    names = OUTPUTS[:2 + len(inputs)] if grads else OUTPUTS[:2]
    for i, name in enumerate(names):
        if name == "lse":
            _lse_check(report, lse, lowp[1], oracle[1], dtype)
            continue
        if i >= 2:
            want = inputs[i - 2].dtype
            report.expect(got[i].shape == oracle[i].shape and got[i].dtype == want,
                          "%s must be %s %s" % (name, want, list(oracle[i].shape)))
        c = compare(name, got[i], lowp[i], oracle[i], dtype, extra_floor=extra)
        report.comparisons[name] = c
        report.expect(c.ok, c.message(context))
    empty = torch.isneginf(oracle[1])
    if empty.any():
        report.expect(bool((out.cpu().double()[empty] == 0).all()), "empty rows must give out = 0")
    if grads:
        unused = unused_positions(inputs[1], kwargs)
        for name, g in zip(OUTPUTS[3:5], got[3:5]):
            report.expect(bool((g.cpu()[unused] == 0).all()),
                          "%s must be exactly 0 where unused" % name)
        if len(inputs) > 3:
            gb = got[5].cpu()
            if "offsets" not in kwargs:
                gb = gb.movedim(-1, 1)  # [B, L, ...] as unused
            report.expect(bool((gb[unused] == 0).all()), "grad_bias must be exactly 0 where unused")
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


# ----------------------------------------------------------------------------------------------
# Activation-unit pooling (DIN): generator, float64 loop oracle and checking body
# ----------------------------------------------------------------------------------------------

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
                              device="cpu", shared_value: bool = False) -> "OrderedDict":
    """The registered forward op's arguments (ACTIVATION_FWD_ARGS order) for one random problem.

    layout: "lengths" | "mask" | "jagged" | "full" (as attnkern._inputs.random_problem); lengths
    default to empty, one, full, half and nearly full rows. Jagged problems carry `extra_rows`
    key/value rows that belong to no row. shared_value: value None (the keys are pooled; Dv = E)."""
    g = torch.Generator().manual_seed(seed)
    lengths = edge_lengths(B, L) if lengths is None else torch.as_tensor(lengths, dtype=torch.int64)
    q, k, v, kw = random_problem(B, N, 1, L, E, Dv, layout, lengths, generator=g,
                                 extra_rows=extra_rows)
    if layout == "jagged":
        q, k, v = q[:, :, 0], k[:, 0], v[:, 0]
    else:
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    a = OrderedDict()
    a["query"], a["key"], a["value"] = q, k, (None if shared_value else v)
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


def _oracle_act(x, activation, act):
    if activation == "relu":
        return x * (x > 0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + torch.exp(-x))
    if activation == "prelu":
        return torch.where(x > 0, x, act[0] * x)
    if activation == "dice":
        p = 1.0 / (1.0 + torch.exp(-(act[1] * x + act[2])))
        return p * x + act[0] * (1.0 - p) * x
    raise AssertionError(activation)


def activation_valid_positions(a):
    """Per row b: the list of (key row index) positions that take part."""
    B = a["query"].shape[0]
    if a["offsets"] is not None:
        o = a["offsets"].long().tolist()
        return [list(range(o[b], o[b + 1])) for b in range(B)]
    L = a["key"].shape[1]
    if a["mask"] is not None:
        return [[l for l in range(L) if bool(a["mask"][b, l])] for b in range(B)]
    if a["lengths"] is not None:
        return [list(range(int(a["lengths"][b]))) for b in range(B)]
    return [list(range(L)) for _ in range(B)]


def activation_loop_oracle(a):
    """Float64 loop oracle of activation-unit pooling: row by row, query by query, position by
    position, over the explicit concatenation [q, k, q - k, q * k] (no split of the first
    layer), math.exp-style softmax; differentiable through ordinary autograd.
    a: the forward op's arguments (ACTIVATION_FWD_ARGS). Returns
    (out [B, N, Dv], lse [B, N]) in float64."""
    f = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
         for n, t in a.items()}
    q, k = f["query"], f["key"]
    v = k if f["value"] is None else f["value"]
    jagged = f["offsets"] is not None
    B, N, _ = q.shape
    outs, lses = [], []
    for b, pos in enumerate(activation_valid_positions(a)):
        for n in range(N):
            qi = q[b, n]
            scores, rows = [], []
            for l in pos:
                kl = k[l] if jagged else k[b, l]
                vl = v[l] if jagged else v[b, l]
                x = torch.cat([qi, kl, qi - kl, qi * kl])
                h = _oracle_act(f["w1"] @ x + f["b1"], f["activation"], f["act1"])
                if f["w2"] is not None:
                    h = _oracle_act(f["w2"] @ h + f["b2"], f["activation"], f["act2"])
                scores.append((f["w_out"] @ h + f["b_out"])[0])
                rows.append(vl)
            o = torch.zeros(v.shape[-1], dtype=torch.float64)
            if not scores:
                lse = torch.tensor(-math.inf if f["softmax"] else 0.0, dtype=torch.float64)
            elif f["softmax"]:
                m = max(float(s.detach()) for s in scores)
                e = [torch.exp(s - m) for s in scores]
                z = sum(e)
                for ei, vl in zip(e, rows):
                    o = o + ei / z * vl
                lse = m + torch.log(z)
            else:
                for s, vl in zip(scores, rows):
                    o = o + s * vl
                lse = torch.tensor(0.0, dtype=torch.float64)
            outs.append(o)
            lses.append(lse)
    Dv = v.shape[-1]
    out = torch.stack(outs).reshape(B, N, Dv) if outs else torch.zeros(B, N, Dv, dtype=torch.float64)
    lse = torch.stack(lses).reshape(B, N) if lses else torch.zeros(B, N, dtype=torch.float64)
    return out, lse


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


def run_activation_unit(backend: str, a: dict, grad_out: torch.Tensor, dtype=None) -> Dict[str, torch.Tensor]:
    """out and the gradient of every differentiable input, with inputs cast to `dtype`."""
    import attnkern

    leaves = dict(a)
    for n in ACTIVATION_GRAD_ARGS:
        if a[n] is not None:
            t = a[n].detach()
            leaves[n] = (t.to(dtype) if dtype is not None else t.clone()).requires_grad_(True)
    args, kw = to_public(leaves)
    out = attnkern.activation_unit_pool(*args, **kw, backend=backend)
    names = [n for n in ACTIVATION_GRAD_ARGS if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype), allow_unused=True)
    res = {"out": out.detach()}
    for n, g in zip(names, grads):
        res[n] = torch.zeros_like(leaves[n]) if g is None else g.detach()
    return res


def _err(a, b):
    return 0.0 if a.numel() == 0 else (a.double().cpu() - b.double().cpu()).abs().max().item()


def check_activation_backend(backend: str, a: dict, seed: int = 1) -> Tuple[bool, Dict[str, float], str]:
    """Runs `backend` on problem `a` (ACTIVATION_FWD_ARGS dict, dtype of a["query"]) against the float64
    reference. Returns (passed, max errors by name, why it failed). Also checks that outputs are
    finite, empty rows give 0 and positions in no row get exactly zero key/value gradients."""
    dtype = a["query"].dtype
    B, N = a["query"].shape[:2]
    g = torch.Generator().manual_seed(seed)
    Dv = (a["key"] if a["value"] is None else a["value"]).shape[-1]
    go = torch.randn(B, N, Dv, generator=g, dtype=torch.float64).to(a["query"].device)
    oracle = run_activation_unit("reference", a, go, torch.float64)
    lowp = oracle if dtype == torch.float64 else run_activation_unit("reference", a, go)
    got = run_activation_unit(backend, a, go)
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
    valid = activation_valid_mask(a)
    empty = ~valid.any(dim=-1) if valid.dim() == 2 else None
    if empty is not None and empty.any():
        if (got["out"][empty.to(got["out"].device)] != 0).any():
            why.append("out must be exactly 0 on empty rows")
        if (got["query"][empty.to(got["out"].device)] != 0).any():
            why.append("grad query must be exactly 0 on empty rows")
    unused = activation_unused_rows(a)
    for name in ("key", "value"):
        if name in got and (got[name].cpu()[unused] != 0).any():
            why.append("grad %s must be exactly 0 at positions in no row" % name)
    return not why, errors, "; ".join(why)


def activation_valid_mask(a: dict) -> torch.Tensor:
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


def activation_unused_rows(a: dict) -> torch.Tensor:
    """Bool over key's leading dims ([B, L] padded, [T] jagged): positions in no row."""
    if a["offsets"] is not None:
        o = a["offsets"].long().cpu()
        covered = torch.zeros(a["key"].shape[0], dtype=torch.bool)
        for b in range(o.numel() - 1):
            covered[o[b]:o[b + 1]] = True
        return ~covered
    return ~activation_valid_mask(a)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test's torch.distributed rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
