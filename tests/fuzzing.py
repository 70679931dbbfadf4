"""The fuzzer behind tests/test_fuzz.py (hypothesis, bounded) and scripts/fuzz.py (timed runs).

One case is drawn through a `draw` object (hypothesis' `data.draw` or a seeded random.Random):
a target (attention_pool's public function on a backend, one of its registered raw ops,
activation_unit_pool on a backend: "au:<backend>", or sequence_attention on a backend:
"seq:<backend>", its mask options, tables, dense bias and layouts), shapes, dtype, layout, strides, scale and
value magnitudes, sometimes rows of one valid key under many queries, sometimes a non-finite
value (for the activation unit at a valid position, in a weight or in the query), and sometimes
one malformed argument. Gradients are checked in every dtype, float16/bfloat16 with softmax
included. Every outcome must be one of

    ok           the result matches the float64 reference within the suite's tolerance rule
                 (forward and gradients; with a non-finite input: the same rows are non-finite
                 as in the reference, and the finite rows match);
    clean_error  a ValueError/TypeError whose message names the malformed argument.

Anything else is a failure: a mismatch, another exception type, an error that names no
argument, an error raised for a well-formed call.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

import attnkern

from attnkern.testing import FLOOR, LOW_PRECISION_FACTOR  # the suite's one tolerance rule

ARG_NAMES = ("query", "key", "value", "lengths", "mask", "key_padding_mask", "offsets",
             "max_length", "scale", "backend", "return_lse", "grad_out", "lse", "delta")

OUTCOMES = ("ok", "clean_error", "mismatch", "bad_error")
# The backends with a score-bias path: the fuzzer draws a bias for their public calls.
BIAS_BACKENDS = ("reference", "cpu")


class RandomDraw:
    """The draw interface over random.Random (for timed runs)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence):
        return seq[self.rng.randrange(len(seq))]

    def bool(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


class HypothesisDraw:
    """The same interface over hypothesis' `data` (for the bounded test: shrinking works)."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def choice(self, seq: Sequence):
        return self.data.draw(self.st.sampled_from(list(seq)))

    def bool(self, p: float = 0.5) -> bool:
        return self.data.draw(self.st.integers(0, 999)) < int(p * 1000)


def available_targets() -> List[str]:
    """Targets on this machine: public API per backend, raw C++ ops, raw Triton ops."""
    info = attnkern.backends()
    t = ["api:reference"]
    if info["cpu"].available:
        t += ["api:cpu", "raw:cpu"]
    if info["triton"].available and not torch.cuda.is_available():
        t += ["api:triton", "raw:triton"]  # the interpreter: tiny shapes only
    if info["cpu"].available:
        t += ["au:cpu", "seq:cpu", "q:cpu"]
    if info["triton"].available and not torch.cuda.is_available():
        t += ["au:triton"]
    return t


@dataclass
class Case:
    target: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: Dict
    bad: Optional[str] = None  # the malformed argument's name, if any
    nonfinite: bool = False
    max_logit: float = 0.0
    notes: List[str] = field(default_factory=list)


def _gen(draw, seed_hint: int) -> torch.Generator:
    return torch.Generator().manual_seed(draw.int(0, 2 ** 31 - 1) ^ seed_hint)


def _strided(t: torch.Tensor, draw) -> torch.Tensor:
    """The same values behind other strides: a transposed copy viewed back, or a slice of a
    wider buffer. (Expanded inputs are drawn separately, in draw_case.)"""
    kind = draw.choice(("contig", "contig", "wide", "transposed"))
    if kind == "wide" and t.dim() >= 2:
        buf = torch.zeros(t.shape[:-1] + (t.shape[-1] + 3,), dtype=t.dtype)
        buf[..., 1:1 + t.shape[-1]] = t
        return buf[..., 1:1 + t.shape[-1]]
    if kind == "transposed" and t.dim() >= 3:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    return t


def draw_case(draw, target: str) -> Case:
    tiny = target.endswith("triton")
    raw = target.startswith("raw:")
    backend = target.split(":")[1]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if backend in ("cpu", "reference"):
        dtypes.append(torch.float64)
    dtype = draw.choice(dtypes)
    B = draw.int(0, 2 if tiny else 4)
    N = draw.int(1, 2 if tiny else 5)
    if not tiny and draw.bool(0.2):
        N = draw.int(16, 40)  # the CPU's tiled kernels (16 or more queries per row and head)
    H = Hkv = draw.int(1, 2 if tiny else 3)
    L = draw.int(0, 6 if tiny else 40)
    dims = (1, 2, 4, 7, 8, 16) if tiny else (1, 3, 7, 8, 13, 16, 32, 40, 64)
    Dk, Dv = draw.choice(dims), draw.choice(dims)
    if not tiny and draw.bool(0.1):
        # Rows of at most one valid key under many queries: the softmax is constant, so the key
        # gradient is 0 up to rounding, summed over every query (wide values: long dots dO . v).
        N, L, Dv = draw.int(16, 300), 1, draw.choice((64, 130, 255))
    layout = draw.choice(("full", "lengths", "mask", "jagged"))
    magnitude = draw.choice((0.01, 1.0, 1.0, 4.0, 30.0))
    g = _gen(draw, 17)

    def randn(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * magnitude).to(dtype)

    lengths = torch.randint(0, L + 1, (B,), generator=g)
    if B and draw.bool(0.3):
        lengths[draw.int(0, B - 1)] = L
    q = randn(B, N, H, Dk)
    kw: Dict = {}
    if layout == "jagged":
        T = int(lengths.sum()) + draw.int(0, 2)
        k, v = randn(T, Hkv, Dk), randn(T, Hkv, Dv) / max(magnitude, 1.0)
        offsets = torch.zeros(B + 1, dtype=draw.choice((torch.int32, torch.int64)))
        offsets[1:] = torch.cumsum(lengths, 0)
        kw["offsets"] = offsets
        if raw or draw.bool(0.5):
            mx = int(lengths.max()) if B else 0
            kw["max_length"] = mx + draw.int(0, 2) if (raw or draw.bool()) else None
            if raw and draw.bool(0.3):
                kw["max_length"] = -1
    else:
        k, v = randn(B, L, Hkv, Dk), randn(B, L, Hkv, Dv) / max(magnitude, 1.0)
        if layout == "lengths":
            kw["lengths"] = lengths.to(draw.choice((torch.int32, torch.int64)))
        elif layout == "mask":
            kw["mask"] = torch.rand((B, L), generator=g) < draw.choice((0.1, 0.5, 0.9))
    if not raw and draw.bool(0.15) and B and L:  # a stride-0 (expanded) history
        k = k[:1].expand_as(k) if layout != "jagged" else k
    q, k, v = _strided(q, draw), _strided(k, draw), _strided(v, draw)
    scale = draw.choice((None, None, 0.5, 0.01, 3.0, -1.0)) if not raw else draw.choice((0.5, 0.125, -2.0))
    if scale is not None:
        kw["scale"] = scale
    bias_size = 0.0
    if not raw and backend in BIAS_BACKENDS and draw.bool(0.3):
        # A score bias: shared by the queries or one per query, of every head or one, float32
        # or the query's dtype; some entries -inf (dropped positions, maybe whole rows).
        Hb = draw.choice((1, H))
        mid = (N, Hb) if draw.bool() else (Hb,)
        shape = (k.shape[0],) + mid if layout == "jagged" else (B,) + mid + (L,)
        bias_size = draw.choice((0.1, 1.0, 10.0))
        bias = torch.randn(shape, generator=g, dtype=torch.float64) * bias_size
        if draw.bool(0.3):
            bias = torch.where(torch.rand(shape, generator=g) < 0.3, -math.inf, bias)
        kw["bias"] = _strided(bias.to(draw.choice((torch.float32, dtype))), draw)
    if not raw and N == 1 and draw.bool(0.3):
        q = q[:, 0]  # the [B, H, Dk] query form
    case = Case(target, q, k, v, kw)
    sc = abs(scale) if scale is not None else 1 / math.sqrt(Dk)
    case.max_logit = sc * Dk * magnitude ** 2 * 4 + 4 * bias_size
    if draw.bool(0.1) and q.numel():
        case.nonfinite = True
        t = draw.choice(("q", "k", "v"))
        x = {"q": case.q, "k": case.k, "v": case.v}[t].clone()
        if x.numel():
            x[tuple(draw.int(0, n - 1) for n in x.shape)] = draw.choice((float("nan"), float("inf"), -float("inf")))
            setattr(case, t, x)
    if draw.bool(0.3):
        mutate(case, draw, layout, raw)
    return case


def mutate(case: Case, draw, layout: str, raw: bool) -> None:
    """Makes exactly one argument malformed and records its name in case.bad."""
    kw = case.kwargs
    options = ["key_dtype", "value_len", "key_dim", "scale_nan", "query_rank", "sparse_query", "meta_key"]
    if not raw:
        options += ["backend", "query_list", "huge_max_length"]
    if "lengths" in kw:
        options += ["lengths_float", "lengths_big", "lengths_negative", "lengths_shape"]
    if "mask" in kw:
        options += ["mask_int", "mask_shape"]
    if "offsets" in kw:
        options += ["offsets_start", "offsets_decreasing", "offsets_past_end", "max_length_small"]
    what = draw.choice(options)
    q, k, v = case.q, case.k, case.v
    if what == "key_dtype":
        case.k = k.to(torch.float16 if k.dtype != torch.float16 else torch.float32)
        case.bad = "key"
    elif what == "value_len":
        dim = 0 if layout == "jagged" else 1
        pad = list(v.shape)
        pad[dim] = 1
        case.v = torch.cat([v, v.new_zeros(pad)], dim)
        case.bad = "value"
    elif what == "key_dim":
        case.k = torch.cat([k, k[..., :1]], -1)
        case.bad = "key"
    elif what == "scale_nan":
        kw["scale"] = draw.choice((float("nan"), float("inf")))
        case.bad = "scale"
    elif what == "query_rank":
        case.q = q.reshape(-1)
        case.bad = "query"
    elif what == "sparse_query":
        case.q = q.to_sparse()
        case.bad = "query"
    elif what == "meta_key":
        case.k = k.to("meta")
        case.bad = "key"
    elif what == "backend":
        case.target = "api:bogus"
        case.bad = "backend"
    elif what == "query_list":
        case.q = q.tolist()
        case.bad = "query"
    elif what == "huge_max_length":
        kw["max_length"] = 2 ** 63 + draw.int(0, 5)
        kw.pop("lengths", None), kw.pop("mask", None), kw.pop("key_padding_mask", None)
        case.bad = "max_length" if "offsets" in kw else None
        if case.bad is None:
            kw.pop("max_length")
    elif what == "lengths_float":
        kw["lengths"] = kw["lengths"].float()
        case.bad = "lengths"
    elif what == "lengths_big":
        if kw["lengths"].numel():
            kw["lengths"] = kw["lengths"].clone()
            kw["lengths"][0] = (k.shape[1] if k.dim() == 4 else 0) + 1
            case.bad = "lengths"
    elif what == "lengths_negative":
        if kw["lengths"].numel():
            kw["lengths"] = kw["lengths"].clone()
            kw["lengths"][-1] = -1
            case.bad = "lengths"
    elif what == "lengths_shape":
        kw["lengths"] = torch.cat([kw["lengths"], kw["lengths"].new_zeros(1)])  # also when B = 0
        case.bad = "lengths"
    elif what == "mask_int":
        kw["mask"] = kw["mask"].to(torch.int32)
        case.bad = "mask"
    elif what == "mask_shape":
        kw["mask"] = torch.cat([kw["mask"], kw["mask"].new_zeros(kw["mask"].shape[0], 1)], 1)  # also L = 0
        case.bad = "mask"
    elif what == "offsets_start":
        o = kw["offsets"].clone()
        o[0] = 1
        kw["offsets"] = o
        case.bad = "offsets"
    elif what == "offsets_decreasing":
        o = kw["offsets"].clone()
        if o.numel() >= 2:
            o[1] = o[-1] + 1
            o[-1] = 0
            if o.numel() > 2 or o[1] > o[0]:
                kw["offsets"] = torch.cat([o[:1], o[1:2], o[:1] * 0 + max(int(o[1]) - 1, 0)]) if o.numel() == 2 else o
                case.bad = "offsets" if not torch.all(kw["offsets"][1:] >= kw["offsets"][:-1]) else None
        if case.bad is None and o.numel() >= 2:
            kw["offsets"] = o
            case.bad = "offsets" if not torch.all(o[1:] >= o[:-1]) or o[0] != 0 else None
    elif what == "offsets_past_end":
        o = kw["offsets"].clone()
        o[-1] = k.shape[0] + 1
        kw["offsets"] = o
        case.bad = "offsets"
    elif what == "max_length_small":
        o = kw["offsets"].long()
        longest = int((o[1:] - o[:-1]).max()) if o.numel() > 1 else 0
        if longest >= 1:
            kw["max_length"] = longest - 1
            case.bad = "max_length"


# ----------------------------------------------------------------------------- running a case


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def _magnitude(t: torch.Tensor) -> float:
    return max(1.0, t.double().abs().max().item()) if t.numel() else 1.0


def _api_call(backend, q, k, v, kw, go, grads: bool):
    """attention_pool with q, k, v (and a well-formed bias in kw) as leaves: out, lse and their
    gradients."""
    kw = dict(kw)
    bias = kw.pop("bias", None)
    leaves = [t.detach().clone().requires_grad_(grads) if isinstance(t, torch.Tensor) and t.layout == torch.strided
              and not t.is_nested and t.device.type != "meta" else t for t in (q, k, v, bias)]
    if leaves[3] is None:
        leaves = leaves[:3]
    out, lse = attnkern.attention_pool(*leaves[:3], **kw, bias=bias if len(leaves) < 4 else leaves[3],
                                       return_lse=True, backend=backend)
    if not grads:
        return out, lse, None
    gs = torch.autograd.grad(out, leaves, go.to(out.dtype).reshape(out.shape), allow_unused=True)
    return out, lse, [torch.zeros_like(x) if gi is None else gi for x, gi in zip(leaves, gs)]


def _raw_call(backend, q, k, v, kw, go, grads: bool):
    """The registered fwd op (and bwd op with delta formed as the autograd forms it)."""
    ops = torch.ops.attnkern
    prefix = "triton_" if backend == "triton" else ""
    scale = kw["scale"] if "scale" in kw else 1 / math.sqrt(q.shape[-1])
    if "offsets" in kw:
        ml = kw.get("max_length")
        ml = -1 if ml is None else ml
        out, lse = getattr(ops, prefix + "jagged_attention_pool_fwd")(q, k, v, kw["offsets"], ml, scale)
        extra = (kw["offsets"], ml)
        bwd = getattr(ops, prefix + "jagged_attention_pool_bwd")
    else:
        out, lse = getattr(ops, prefix + "attention_pool_fwd")(q, k, v, kw.get("lengths"), kw.get("mask"), scale)
        extra = (kw.get("lengths"), kw.get("mask"))
        bwd = getattr(ops, prefix + "attention_pool_bwd")
    if not grads:
        return out, lse, None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = go.to(q.dtype).reshape(out.shape)
    delta = (g.to(acc) * out.to(acc)).sum(-1)
    gs = bwd(g, q, k, v, *extra, lse, delta, scale)
    return out, lse, list(gs)


def _reference(q, k, v, kw, go, grads: bool):
    return _api_call("reference", q, k, v, kw, go, grads)


def run_case(case: Case) -> str:
    """Runs one case and returns its outcome; raises AssertionError with details on a failure
    (the caller counts or reports it)."""
    kind, backend = case.target.split(":")
    call = _raw_call if kind == "raw" else _api_call
    q, k, v, kw = case.q, case.k, case.v, case.kwargs
    grads = not case.nonfinite
    try:
        go_shape = (q.shape[:-1] + (v.shape[-1],)) if isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) else (1,)
        go = torch.randn(go_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        got = call(backend, q, k, v, kw, go, grads)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if case.bad is None:
            raise AssertionError("well-formed call raised %s: %s" % (type(e).__name__, msg[:500]))
        if case.bad not in msg:
            raise AssertionError("%s does not name %r: %s" % (type(e).__name__, case.bad, msg[:500]))
        return "clean_error"
    except Exception as e:  # noqa: BLE001 - every other exception is a finding
        raise AssertionError("%s (%s) for %s" % (type(e).__name__, str(e)[:500], case.bad or "a well-formed call"))
    if case.bad is not None:
        raise AssertionError("malformed %s was accepted" % case.bad)
    try:
        compare(case, got, go, grads)
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AssertionError("comparison failed with %s: %s" % (type(e).__name__, str(e)[:300]))
    return "ok"


def compare(case: Case, got, go, grads: bool) -> None:
    q, k, v, kw = case.q, case.k, case.v, dict(case.kwargs)
    if kw.get("max_length") == -1:  # the raw ops' "unknown"
        kw["max_length"] = None
    dtype = q.dtype
    kw64 = dict(kw, bias=kw["bias"].double()) if "bias" in kw else kw
    r64 = _reference(q.double(), k.double(), v.double(), kw64, go, grads)
    rlp = r64 if dtype == torch.float64 else _reference(q, k, v, kw, go, grads)
    out, lse = got[0], got[1]
    if case.target.startswith("raw:"):
        out = out.to(dtype)
    ref_out = r64[0].reshape(out.shape)
    tol = FLOOR[dtype] + 8 * case.max_logit * torch.finfo(torch.float32).eps
    if case.nonfinite:
        # The same rows are non-finite as in the reference; the finite rows match.
        fin, rfin = torch.isfinite(out).all(-1), torch.isfinite(ref_out).all(-1)
        assert torch.equal(fin, rfin), "non-finite rows differ: got %s, reference %s" % (fin.tolist(), rfin.tolist())
        if fin.any():
            allowed = LOW_PRECISION_FACTOR * _err(rlp[0].reshape(out.shape)[fin], ref_out[fin]) + \
                tol * _magnitude(ref_out[fin])
            assert _err(out[fin], ref_out[fin]) <= allowed, "finite rows differ"
        return
    pairs = [("out", out, rlp[0].reshape(out.shape), ref_out)]
    if grads:
        pairs += [(n, a, b, c) for n, a, b, c in zip(("grad_query", "grad_key", "grad_value", "grad_bias"), got[2],
                                                     rlp[2], r64[2])]
    for name, a, lp, ref in pairs:
        assert torch.isfinite(a).all(), "%s has NaN/Inf" % name
        allowed = LOW_PRECISION_FACTOR * _err(lp, ref) + tol * _magnitude(ref)
        err = _err(a, ref)
        assert err <= allowed, "%s: error %.3g > allowed %.3g" % (name, err, allowed)
    empty = torch.isneginf(r64[1].reshape(lse.shape))
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf on other rows than the reference's"
    if (~empty).any():
        d = _err(lse[~empty], r64[1].reshape(lse.shape)[~empty])
        d_lp = _err(rlp[1].reshape(lse.shape)[~empty], r64[1].reshape(lse.shape)[~empty])
        assert d <= LOW_PRECISION_FACTOR * d_lp + 4 * tol * _magnitude(r64[1].reshape(lse.shape)[~empty]), \
            "lse error %.3g" % d


def describe(case) -> str:
    if isinstance(case, AuCase):
        return describe_au(case)
    if isinstance(case, SeqCase):
        return describe_seq(case)
    def d(t):
        if isinstance(t, torch.Tensor):
            return "%s%s%s" % (str(t.dtype).replace("torch.", ""), list(t.shape),
                               "" if t.is_sparse or t.device.type == "meta" or t.is_contiguous() else "(strided)")
        return repr(t) if not isinstance(t, list) else "list"
    kw = ", ".join("%s=%s" % (n, d(x)) for n, x in case.kwargs.items())
    return "%s q=%s k=%s v=%s %s bad=%s nonfinite=%s" % (case.target, d(case.q), d(case.k), d(case.v), kw,
                                                        case.bad, case.nonfinite)


# ----------------------------------------------------------------------------- activation unit


@dataclass
class AuCase:
    target: str
    a: Dict  # the registered forward op's arguments (attnkern.testing.random_activation_problem)
    nonfinite: str = ""  # where a non-finite value was put, if anywhere
    notes: List[str] = field(default_factory=list)


def draw_au_case(draw, target: str) -> AuCase:
    from attnkern.testing import activation_valid_mask, random_activation_problem

    tiny = target.endswith("triton")
    backend = target.split(":")[1]
    dtypes = [torch.float32, torch.float16, torch.bfloat16] + ([torch.float64] if backend == "cpu" else [])
    dtype = draw.choice(dtypes)
    B = draw.int(0, 2 if tiny else 4)
    N = draw.int(1, 2 if tiny else 5)
    if not tiny and draw.bool(0.15):
        N = draw.int(16, 40)
    L = draw.int(0, 5 if tiny else 30)
    dims = (1, 3, 4, 8) if tiny else (1, 3, 4, 8, 13, 16, 33)
    E, Dv = draw.choice(dims), draw.choice(dims)
    widths = (1, 3, 8) if tiny else (1, 3, 8, 17, 64)
    units = (draw.choice(widths),) if draw.bool(0.6) else (draw.choice(widths), draw.choice(widths))
    a = random_activation_problem(
        B=B, N=N, L=L, E=E, Dv=Dv, units=units, activation=draw.choice(("relu", "sigmoid", "prelu", "dice")),
        softmax=draw.bool(0.5), layout=draw.choice(("full", "lengths", "mask", "jagged")),
        seed=draw.int(0, 2 ** 31 - 1), dtype=dtype, extra_rows=draw.int(0, 2), shared_value=draw.bool(0.2))
    case = AuCase(target, a)
    if draw.bool(0.15) and B:
        value = draw.choice((float("nan"), float("inf"), -float("inf")))
        where = draw.choice(("query", "key", "value", "w1", "b1", "w_out"))
        valid = activation_valid_mask(a).nonzero().tolist()
        if where in ("key", "value") and (not valid or a[where] is None):
            where = "query"
        t = a[where].clone()
        if where in ("key", "value"):  # a valid position: (b, l), or the jagged row's offset + l
            b, l = draw.choice(valid)
            pos = (int(a["offsets"][b]) + l,) if a["offsets"] is not None else (b, l)
            index = pos + (draw.int(0, t.shape[-1] - 1),)
        else:
            index = tuple(draw.int(0, n - 1) for n in t.shape)
        t[index] = value
        a[where] = t
        case.nonfinite = "%s%s=%s" % (where, list(index), value)
    return case


def run_au_case(case: AuCase) -> str:
    """Runs one activation-unit case: forward and every gradient against the float64 reference
    (the suite's checking body), or, with a non-finite input, the forward's row pattern."""
    from attnkern.testing import check_activation_backend

    backend = case.target.split(":")[1]
    a = case.a
    try:
        if not case.nonfinite:
            ok, errors, why = check_activation_backend(backend, a)
            assert ok, "mismatch: %s" % why
            return "ok"
        out = _au_forward(backend, a)
        ref = _au_forward("reference", a, torch.float64)
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - a well-formed call must not raise
        raise AssertionError("well-formed call raised %s: %s" % (type(e).__name__, str(e)[:500]))
    fin, rfin = torch.isfinite(out).all(-1), torch.isfinite(ref).all(-1)
    assert torch.equal(fin, rfin), "mismatch: non-finite rows differ: got %s, reference %s" % (
        fin.tolist(), rfin.tolist())
    both = fin & rfin
    if both.any():
        lp = _au_forward("reference", a)
        allowed = LOW_PRECISION_FACTOR * _err(lp[both], ref[both]) + FLOOR[out.dtype] * _magnitude(ref[both])
        assert _err(out[both], ref[both]) <= allowed, "mismatch: finite rows differ"
    return "ok"


def _au_forward(backend: str, a: Dict, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    from attnkern.testing import to_public

    if dtype is not None:
        a = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in a.items()}
    args, kw = to_public(a)
    with torch.no_grad():
        return attnkern.activation_unit_pool(*args, **kw, backend=backend)


def describe_au(case: AuCase) -> str:
    a = case.a
    shapes = " ".join("%s=%s%s" % (n, str(t.dtype).replace("torch.", ""), list(t.shape))
                      for n, t in a.items() if isinstance(t, torch.Tensor))
    return "%s %s activation=%s softmax=%s nonfinite=%s" % (case.target, shapes, a["activation"], a["softmax"],
                                                           case.nonfinite or None)


# ----------------------------------------------------------------------------- sequence attention

# A malformed argument of sequence_attention and the name its error must carry.
SEQ_BAD = ("num_targets", "max_attn_len", "contextual_len", "time_table", "position_table", "attn_scale")


@dataclass
class SeqCase:
    target: str
    t: Dict  # the differentiable tensors (attnkern.sequence_testing.random_sequence_problem)
    kw: Dict
    dtype: torch.dtype
    bad: Optional[str] = None


def draw_seq_case(draw, target: str) -> SeqCase:
    from attnkern.sequence_testing import random_sequence_problem

    B = draw.int(1, 3)
    # mostly short rows; sometimes one past the kernels' 64-position blocks. At least one token:
    # the empty batch's output has no autograd graph to check gradients through.
    lengths = [draw.int(0, 12) if not draw.bool(0.2) else draw.int(60, 140) for _ in range(B)]
    lengths[0] = max(lengths[0], 1)
    H = draw.choice((1, 2, 3, 4))
    Hkv = draw.choice([d for d in (1, 2, 3, 4) if H % d == 0])
    time, position, dense = draw.bool(0.4), draw.bool(0.4), draw.bool(0.15)
    norm = draw.choice(("softmax", "silu"))
    targets = [draw.int(0, n) for n in lengths] if draw.bool(0.5) and B else None
    dtype = draw.choice((torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16))
    t, kw = random_sequence_problem(
        lengths, H=H, Hkv=Hkv, Dk=draw.choice((1, 3, 8, 16, 33)), Dv=draw.choice((1, 4, 8, 17)),
        layout=draw.choice(("jagged", "padded")), dtype=torch.float64, causal=draw.bool(0.8),
        num_targets=targets, contextual_len=draw.choice((0, 0, 1, 3)),
        max_attn_len=draw.choice((0, 0, 1, 5, 70)), normalization=norm, time=time, position=position,
        dense_bias=dense, Hb=draw.choice((1, H)), NB=draw.int(1, 20), P=draw.int(1, 150),
        attn_scale=(draw.choice((0.5, None)) if norm == "silu" else None),
        time_bucket=draw.choice(("log", "sqrt")), seed=draw.int(0, 2 ** 31 - 1))
    if time and draw.bool(0.25):  # keys out of time order: the kernels' other bucket path
        kt = kw["key_times"]
        kw["key_times"] = kt.flatten()[torch.randperm(kt.numel(), generator=_gen(draw, 7))].view(kt.shape)
    case = SeqCase(target, t, kw, dtype)
    if draw.bool(0.1):
        case.bad = draw.choice(SEQ_BAD)
        if case.bad == "num_targets":
            kw["num_targets"] = torch.tensor(lengths, dtype=torch.int64) + 1 if B else torch.ones(1, dtype=torch.int64)
        elif case.bad in ("max_attn_len", "contextual_len"):
            kw[case.bad] = -draw.int(1, 5)
        elif case.bad in ("time_table", "position_table"):
            t[case.bad] = torch.zeros(3, H + 1, dtype=torch.float64)
            if case.bad == "time_table" and "query_times" not in kw:
                kw["query_times"] = kw["key_times"] = torch.zeros(
                    t["query"].shape[:-2], dtype=torch.int64)
        else:
            kw["normalization"], kw["attn_scale"] = "softmax", 0.5
    return case


def run_seq_case(case: SeqCase) -> str:
    """One sequence-attention case: forward and every gradient against the float64 oracle (the
    suite's checking body), or a ValueError/TypeError naming the malformed argument."""
    from attnkern.sequence_testing import check_sequence_backend

    backend = case.target.split(":")[1]
    if case.bad is not None:  # the public call itself (the oracle does not validate)
        t = {n: x.to(case.dtype) for n, x in case.t.items()}
        try:
            attnkern.sequence_attention(**t, **case.kw, backend=backend)
        except (ValueError, TypeError) as e:
            if case.bad not in str(e):
                raise AssertionError("the error does not name %s: %s" % (case.bad, str(e)[:500]))
            return "clean_error"
        except Exception as e:  # noqa: BLE001 - anything else is a failure
            raise AssertionError("malformed %s raised %s: %s" % (case.bad, type(e).__name__, str(e)[:500]))
        raise AssertionError("malformed %s accepted" % case.bad)
    try:
        ok, errors, why = check_sequence_backend(backend, case.t, case.kw, case.dtype)
    except Exception as e:  # noqa: BLE001 - a well-formed call must not raise
        raise AssertionError("well-formed call raised %s: %s" % (type(e).__name__, str(e)[:500]))
    assert ok, "mismatch: %s" % why
    return "ok"


def describe_seq(case: SeqCase) -> str:
    shapes = " ".join("%s=%s" % (n, list(x.shape)) for n, x in case.t.items())
    kw = ", ".join("%s=%s" % (n, x.tolist() if isinstance(x, torch.Tensor) and x.numel() <= 8 else
                              list(x.shape) if isinstance(x, torch.Tensor) else x)
                   for n, x in case.kw.items())
    return "%s dtype=%s %s %s bad=%s" % (case.target, str(case.dtype).split(".")[-1], shapes, kw, case.bad)


def _fuzz_seq(draw, target: str, record) -> str:
    return _run_drawn(draw_seq_case(draw, target), run_seq_case, describe_seq, record)


# ----------------------------------------------------------------------------- the command line

# Numeric arguments of each command: (option, type, lowest accepted, highest accepted or None),
# an open end written "(0" or "1)". A drawn bad value must be a usage error (exit status 2)
# naming the option.
INF = float("inf")
CLI_NUMERIC = {
    "export": [("--embed-dim", int, 1, None), ("--heads", int, 1, None), ("--num-items", int, 1, None)],
    "train": [("--epochs", int, 1, None), ("--batch-size", int, 1, None), ("--embed-dim", int, 1, None),
              ("--heads", int, 1, None), ("--mlp", int, 1, None), ("--max-length", int, 1, None),
              ("--synthetic-samples", int, 100, None), ("--dropout", float, 0.0, "1)"),
              ("--lr", float, "(0", None), ("--weight-decay", float, 0.0, None)],
    "bench": [("--budget", float, 0.0, None)],
}
CLI_REQUIRED = {"export": ["--format", "aoti", "--out", "{tmp}/model.pt2"], "train": [], "bench": []}


def draw_cli_bad_value(draw):
    """(argv, option) of one command with one bad numeric value."""
    command = draw.choice(sorted(CLI_NUMERIC))
    option, kind, low, high = draw.choice(CLI_NUMERIC[command])
    bad = ["nan", "inf", "-inf", "x", "", "1e", "0x10"]
    if kind is int:
        bad += [str(low - draw.int(1, 10 ** draw.int(0, 6))), "%d.5" % low]
    else:
        lo = float(str(low).lstrip("(")) if low is not None else None
        if isinstance(low, str):  # an open lower end: the end itself is bad
            bad.append(repr(lo))
        bad.append(repr(lo - draw.choice((1e-6, 0.5, 3.0, 1e30))))
        if high is not None:
            hi = float(str(high).rstrip(")"))
            bad += [repr(hi), repr(hi + draw.choice((1e-6, 2.0)))]
    value = draw.choice(bad)
    return [command] + CLI_REQUIRED[command] + [option + "=" + value], option


def fuzz_one(draw, targets: Sequence[str], record: Optional[Callable[[str, Case, str], None]] = None) -> str:
    target = draw.choice(list(targets))
    if target.startswith("au:"):
        return _fuzz_au(draw, target, record)
    if target.startswith("seq:"):
        return _fuzz_seq(draw, target, record)
    if target.startswith("q:"):
        return fuzz_quantized(draw, target.split(":")[1])
    case = draw_case(draw, target)
    try:
        outcome = run_case(case)
    except AssertionError as e:
        outcome = "bad_error" if "raised" in str(e) or "does not name" in str(e) or \
            str(e).split(" ")[0].endswith("Error") else "mismatch"
        if record:
            record(outcome, case, str(e))
        else:
            raise AssertionError("%s: %s\n  case: %s" % (outcome, e, describe(case)))
    return outcome


def _fuzz_au(draw, target: str, record) -> str:
    return _run_drawn(draw_au_case(draw, target), run_au_case, describe_au, record)


def _run_drawn(case, run, describe_case, record) -> str:
    """run(case)'s outcome; a failure recorded (timed runs) or raised with the case described."""
    try:
        return run(case)
    except AssertionError as e:
        outcome = "mismatch" if str(e).startswith("mismatch") else "bad_error"
        if record:
            record(outcome, case, str(e))
            return outcome
        raise AssertionError("%s: %s\n  case: %s" % (outcome, e, describe_case(case)))


# ---- quantized keys/values (docs/quantized.md) ----------------------------------------------------


def fuzz_quantized(draw, backend: str) -> str:
    """One attention_pool call with int8/uint8/float8 K/V and their per-row parameters: a shape,
    layout, shared heads, a score bias, rows whose scale is 0 or huge, strided rows, or one
    malformed parameter. "ok" when it matches the reference over the dequantized rows,
    "clean_error" for a ValueError/TypeError naming the malformed argument."""
    from attnkern.testing import make_problem

    qdtype = draw.choice((torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2))
    H = draw.choice((1, 2, 4))
    Hkv = draw.choice([h for h in (1, 2, 4) if H % h == 0])
    layout = draw.choice(("lengths", "mask", "jagged", "full"))
    args, kw = make_problem(B=draw.int(1, 4), N=draw.choice((1, 2, 5, 33)), H=H, Hkv=Hkv, L=draw.int(1, 70),
                            Dk=draw.int(1, 40), Dv=draw.int(1, 40), layout=layout, seed=draw.int(0, 99),
                            lengths="uniform", bias=draw.choice((None, "shared", "per_query")),
                            dtype=draw.choice((torch.float32, torch.bfloat16, torch.float16)),
                            bias_dtype=torch.float32)
    q, k, v = args[:3]
    if len(args) == 4:
        kw["bias"] = args[3]
    kd, ks, kb = attnkern.quantize_rows(k, qdtype)
    vd, vs, vb = attnkern.quantize_rows(v, qdtype)
    if draw.bool(0.3):
        ks.view(-1)[:: draw.int(1, 5)] = draw.choice((0.0, 1e-30, 1e20))
    if draw.bool(0.3):  # rows read through a stride
        kd = torch.cat([kd, kd], -1)[..., : kd.shape[-1]]
    params = dict(key_scale=ks, key_bias=kb, value_scale=vs, value_bias=vb)
    bad = None
    if draw.bool(0.2):
        bad = draw.choice(("key_scale", "value_scale", "key_bias"))
        t = params[bad] if params[bad] is not None else ks
        params[bad] = draw.choice((t.double(), t.flatten(), t.unsqueeze(-1)))
    with torch.no_grad():
        try:
            got = attnkern.attention_pool(q, kd, vd, **kw, **params, backend=backend)
        except (ValueError, TypeError) as e:
            assert bad is not None and bad in str(e), "raised %r for a well-formed call (bad: %s)" % (e, bad)
            return "clean_error"
        assert bad is None, "no error for a malformed %s" % bad
        want = attnkern.attention_pool(q, kd, vd, **kw, **params, backend="reference")
    tol = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[q.dtype]
    err = (got.float() - want.float()).abs().nan_to_num(0.0, 0.0, 0.0).max().item() if got.numel() else 0.0
    same_nan = torch.equal(got.isnan(), want.isnan())
    assert same_nan and err <= tol * max(1.0, want.float().nan_to_num(0.0, 0.0, 0.0).abs().max().item()), \
        "mismatch: max error %g (%s, %s, N=%d, H=%d/%d)" % (err, qdtype, layout, q.shape[1], H, Hkv)
    return "ok"
