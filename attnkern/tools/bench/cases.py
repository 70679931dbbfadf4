"""`attnkern bench` cases: shapes, length patterns, dtypes and modes; their inputs, the bytes
and FLOPs each must move, and the float64 oracle every provider is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from attnkern.testing import Comparison, compare, forward_backward, random_problem

OP = "attention_pool"
BASELINES = ("reference", "sdpa", "compile")
# fbgemm / fbgemm_bmm: FBGEMM's jagged attention and the jagged bmm + softmax + bmm a user would
# compose (fbgemm_gpu.sll; jagged shapes with one head).
PROVIDERS = ("reference", "sdpa", "compile", "flex", "cpu", "triton", "cuda", "fbgemm", "fbgemm_bmm")
MODES = ("fwd", "fwd+bwd")
LENGTHS = ("uniform", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class Shape:
    """One problem size: B rows, N queries per row, H heads, L max history, head dims."""

    name: str
    B: int
    N: int
    H: int
    L: int
    Dk: int
    Dv: int
    layout: str = "padded"  # "padded" | "jagged"
    bias: bool = False  # a score bias [B, H, L] shared by the N queries (padded only)

    def as_dict(self) -> dict:
        return {"name": self.name, "B": self.B, "N": self.N, "H": self.H, "L": self.L,
                "Dk": self.Dk, "Dv": self.Dv, "layout": self.layout, "bias": self.bias}


SHAPES: Dict[str, Shape] = {s.name: s for s in (
    # A few rows of a few positions: the CI smoke case, cheap even under torch.compile.
    Shape("tiny", 8, 1, 2, 16, 8, 8),
    Shape("tiny_jagged", 8, 1, 2, 16, 8, 8, "jagged"),
    Shape("b1024_l50_d64", 1024, 1, 1, 50, 64, 64),
    Shape("b1024_l200_d64", 1024, 1, 1, 200, 64, 64),
    Shape("b256_h4_l1000_d32", 256, 1, 4, 1000, 32, 32),
    Shape("b4096_l100_d128", 4096, 1, 1, 100, 128, 128),
    # N = 64 candidate items scored against one shared history: the compute-heavy case.
    Shape("b256_n64_l200_d64", 256, 64, 1, 200, 64, 64),
    # The b1024_l200_d64 lengths packed into [T, H, D] with offsets.
    Shape("jagged_b1024_l200_d64", 1024, 1, 1, 200, 64, 64, "jagged"),
    # The score bias (attention_pool(bias=), a [B, H, L] bias shared by the N queries), each
    # beside the same shape without one: the op shapes and the serving shape (one request's
    # 1024 candidates against its history).
    Shape("tiny_bias", 8, 1, 2, 16, 8, 8, bias=True),
    Shape("b1024_h2_l200_d64", 1024, 1, 2, 200, 64, 64),
    Shape("b1024_h2_l200_d64_bias", 1024, 1, 2, 200, 64, 64, bias=True),
    Shape("b1024_n64_h2_l200_d64", 1024, 64, 2, 200, 64, 64),
    Shape("b1024_n64_h2_l200_d64_bias", 1024, 64, 2, 200, 64, 64, bias=True),
    Shape("serve_n1024_h4_l2048_d32", 1, 1024, 4, 2048, 32, 32),
    Shape("serve_n1024_h4_l2048_d32_bias", 1, 1024, 4, 2048, 32, 32, bias=True),
)}

QUICK_SHAPES = ("b1024_l200_d64", "b256_n64_l200_d64", "jagged_b1024_l200_d64")
# `attnkern bench --shapes` with these pairs: the bias's cost against the same op without one.
BIAS_SHAPES = ("b1024_h2_l200_d64", "b1024_h2_l200_d64_bias", "b1024_n64_h2_l200_d64",
               "b1024_n64_h2_l200_d64_bias", "serve_n1024_h4_l2048_d32", "serve_n1024_h4_l2048_d32_bias")
FULL_SHAPES = tuple(name for name in SHAPES if not name.startswith("tiny") and name not in BIAS_SHAPES)


@dataclass(frozen=True)
class Case:
    shape: Shape
    lengths: str  # "uniform": randint(0, L + 1) per row (fixed seed); "full": every row = L
    dtype: str
    mode: str  # "fwd" | "fwd+bwd"

    @property
    def id(self) -> str:
        return "%s-%s-%s-%s" % (self.shape.name, self.lengths, self.dtype, self.mode)


def make_cases(shapes: Sequence[str], lengths: Sequence[str], dtypes: Sequence[str],
               modes: Sequence[str]) -> List[Case]:
    return [Case(SHAPES[s], ln, dt, m) for s in shapes for ln in lengths for dt in dtypes
            for m in modes]


def quick_cases(dtypes: Sequence[str] = ("float32",)) -> List[Case]:
    """The default set of `attnkern bench`: about a minute on a 2-core CPU."""
    return make_cases(QUICK_SHAPES, ("uniform",), dtypes, MODES)


def full_cases(dtypes: Sequence[str] = ("float32", "bfloat16")) -> List[Case]:
    return make_cases(FULL_SHAPES, LENGTHS, dtypes, MODES)


def tiny_cases() -> List[Case]:
    return make_cases(("tiny", "tiny_jagged"), ("uniform",), ("float32",), MODES)


# ----------------------------------------------------------------------------------------------
# Inputs, bytes and FLOPs


@dataclass
class Inputs:
    """Canonical attnkern inputs of one case: query [B, N, H, Dk], padded key [B, L, H, Dk] /
    value [B, L, H, Dv] or jagged key [T, H, Dk] / value [T, H, Dv] with offsets [B + 1]."""

    case: Case
    device: torch.device
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    lengths: torch.Tensor  # [B] int64, also for the jagged layout (offsets' differences)
    offsets: Optional[torch.Tensor]
    grad_out: torch.Tensor  # [B, N, H, Dv]
    total_len: int  # sum of lengths: the number of valid K/V positions
    bias: Optional[torch.Tensor] = None  # [B, H, L] in the case's dtype, for shapes with a bias

    @property
    def nonempty(self) -> torch.Tensor:
        return self.lengths > 0


def make_inputs(case: Case, device="cpu", seed: int = 0) -> Inputs:
    s = case.shape
    dtype = DTYPES[case.dtype]
    g = torch.Generator().manual_seed(seed)
    if case.lengths == "full":
        lengths = torch.full((s.B,), s.L, dtype=torch.int64)
    else:
        lengths = torch.randint(0, s.L + 1, (s.B,), generator=g, dtype=torch.int64)
    total = int(lengths.sum())
    layout = "jagged" if s.layout == "jagged" else "lengths"
    q, k, v, kw = random_problem(s.B, s.N, s.H, s.L, s.Dk, s.Dv, layout, lengths, generator=g)
    query, key, value = (t.to(dtype=dtype, device=device) for t in (q, k, v))
    grad_out = torch.randn(s.B, s.N, s.H, s.Dv, generator=g).to(dtype=dtype, device=device)
    offsets = kw["offsets"].to(device) if layout == "jagged" else None
    # Drawn last: the shape without a bias gets the same q, k, v and grad_out.
    bias = (torch.randn(s.B, s.H, s.L, generator=g).to(dtype=dtype, device=device)
            if s.bias else None)
    return Inputs(case, torch.device(device), query, key, value, lengths.to(device), offsets,
                  grad_out, total, bias)


def bytes_moved(case: Case, total_len: int) -> int:
    """Bytes the op must move at least. Forward: read Q and the valid K and V, write O.
    Backward: read Q, the valid K and V, O and dO; write dQ and the whole of dK and dV (their
    padded positions get explicit zeros, so those bytes must move too). A bias: read at the
    valid positions, its gradient written whole."""
    s = case.shape
    item = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    q = s.B * s.N * s.H * s.Dk * item
    o = s.B * s.N * s.H * s.Dv * item
    kv_valid = total_len * s.H * (s.Dk + s.Dv) * item
    bias_valid = total_len * s.H * item if s.bias else 0
    fwd = kv_valid + q + o + bias_valid
    if case.mode == "fwd":
        return fwd
    key_rows = total_len if s.layout == "jagged" else s.B * s.L
    bwd = 2 * q + kv_valid + 2 * o + key_rows * s.H * (s.Dk + s.Dv) * item
    if s.bias:
        bwd += bias_valid + key_rows * s.H * item
    return fwd + bwd


def flops(case: Case, total_len: int) -> int:
    """Useful FLOPs over the valid positions: fwd q.k and p.v; bwd recomputes q.k, then dv,
    dO.v, dq and dk."""
    s = case.shape
    per = 2 * (s.Dk + s.Dv) if case.mode == "fwd" else 2 * (s.Dk + s.Dv) + 2 * (3 * s.Dk + 2 * s.Dv)
    return per * s.N * s.H * total_len


# ----------------------------------------------------------------------------------------------
# Correctness check against a float64 oracle, by the rule of attnkern.testing


@dataclass
class Oracle:
    inp: Inputs
    exact: tuple  # float64 outputs (out[, dq, dk, dv])
    lowp: tuple  # the same from the reference run in the case's dtype

    def _compared(self, i: int, t: torch.Tensor) -> torch.Tensor:
        # out and dq: non-empty rows (SDPA gives NaN on empty ones); dk/dv: non-empty rows when
        # padded, every token when jagged (each token belongs to a non-empty row).
        if self.inp.offsets is not None and i >= 2:
            return t
        return t[self.inp.nonempty.to(t.device)]

    def comparisons(self, outputs) -> List[Comparison]:
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        dtype = DTYPES[self.inp.case.dtype]
        return [compare(name, self._compared(i, got), self._compared(i, lp), self._compared(i, want),
                        dtype)
                for i, (name, got, lp, want) in enumerate(zip(("out", "dq", "dk", "dv"), outputs,
                                                             self.lowp, self.exact))]

    def compare(self, outputs) -> Tuple[bool, float]:
        """(within the rule, largest error relative to max(1, |oracle|); inf for NaN)."""
        cs = self.comparisons(outputs)
        err = max([c.relative for c in cs], default=0.0)
        return all(c.ok for c in cs), err


def make_oracle(inp: Inputs) -> Oracle:
    from attnkern.reference import attention_pool_ref

    kw = ({"offsets": inp.offsets, "max_length": inp.case.shape.L} if inp.offsets is not None
          else {"lengths": inp.lengths})

    def run(*tensors, bias=None):
        go = tensors[3] if inp.case.mode == "fwd+bwd" else None
        res = forward_backward(lambda q, k, v: attention_pool_ref(q, k, v, **kw, bias=bias), tensors[:3], go)
        return res[:1] + res[2:]  # lse is not compared: not every provider has one

    tensors = (inp.query, inp.key, inp.value, inp.grad_out)
    exact = run(*(t.double() for t in tensors), bias=None if inp.bias is None else inp.bias.double())
    return Oracle(inp, exact, run(*tensors, bias=inp.bias))
