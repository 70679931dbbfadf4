"""`attnkern bench`: every attention-pooling backend against every PyTorch alternative, as a
fraction of this machine's memory limit.

    attnkern bench                      # quick default set (fp32, 3 shapes, fwd and fwd+bwd)
    attnkern bench --full               # every shape, uniform and full lengths, fp32 and bf16
    attnkern bench --device cuda --dtype bfloat16 --out runs/bench-gpu

Providers (each skipped with its reason when it cannot run here):

    reference  attnkern.attention_pool(..., backend="reference"): eager PyTorch
    sdpa       torch.nn.functional.scaled_dot_product_attention with a bool mask [B, 1, 1, L]
    compile    torch.compile of the reference (compile time reported apart, not in the median)
    flex       FlexAttention with a length mask (CUDA only, where it compiles)
    cpu, triton, cuda   attnkern's fused kernels, when attnkern.backends() says available

Bytes model (what a kernel must move at least): the forward reads Q and the valid K and V
rows and writes O; the backward reads Q, the valid K and V, O and dO, and writes dQ and the
whole of dK and dV (zeros at padded positions included). The machine's limit for a case is the time to move the
same bytes once: on CPU a torch.sum over a buffer of that size (a pure read), on CUDA a
device-to-device copy of half that size (read + write = the same bytes). Each provider then
reports median time, effective GB/s, fraction of the limit (limit time / provider time),
GFLOP/s, speedup against each baseline (reference, sdpa, compile) and, on CUDA, peak memory.

Before timing, every provider's output (and, for fwd+bwd, its gradients) is checked once
against a float64 oracle on the non-empty rows; a mismatch is marked in the table.

The case definitions, providers and measurement are importable so that the pytest-benchmark
suite in benchmarks/ runs the very same cases.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from attnkern._inputs import random_problem

OP = "attention_pool"
BASELINES = ("reference", "sdpa", "compile")
PROVIDERS = ("reference", "sdpa", "compile", "flex", "cpu", "triton", "cuda")
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

    def as_dict(self) -> dict:
        return {"name": self.name, "B": self.B, "N": self.N, "H": self.H, "L": self.L,
                "Dk": self.Dk, "Dv": self.Dv, "layout": self.layout}


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
)}

QUICK_SHAPES = ("b1024_l200_d64", "b256_n64_l200_d64", "jagged_b1024_l200_d64")
FULL_SHAPES = tuple(name for name in SHAPES if not name.startswith("tiny"))


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
    return Inputs(case, torch.device(device), query, key, value, lengths.to(device), offsets,
                  grad_out, total)


def bytes_moved(case: Case, total_len: int) -> int:
    """Bytes the op must move at least. Forward: read Q and the valid K and V, write O.
    Backward: read Q, the valid K and V, O and dO; write dQ and the whole of dK and dV (their
    padded positions get explicit zeros, so those bytes must move too)."""
    s = case.shape
    item = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    q = s.B * s.N * s.H * s.Dk * item
    o = s.B * s.N * s.H * s.Dv * item
    kv_valid = total_len * s.H * (s.Dk + s.Dv) * item
    fwd = kv_valid + q + o
    if case.mode == "fwd":
        return fwd
    key_rows = total_len if s.layout == "jagged" else s.B * s.L
    bwd = 2 * q + kv_valid + 2 * o + key_rows * s.H * (s.Dk + s.Dv) * item
    return fwd + bwd


def flops(case: Case, total_len: int) -> int:
    """Useful FLOPs over the valid positions: fwd q.k and p.v; bwd recomputes q.k, then dv,
    dO.v, dq and dk."""
    s = case.shape
    per = 2 * (s.Dk + s.Dv) if case.mode == "fwd" else 2 * (s.Dk + s.Dv) + 2 * (3 * s.Dk + 2 * s.Dv)
    return per * s.N * s.H * total_len


# ----------------------------------------------------------------------------------------------
# Providers


class Unavailable(Exception):
    """The provider cannot run here; the message says why."""


def provider_status(provider: str, device) -> Optional[str]:
    """None when `provider` can run on `device`, else the reason why not."""
    import attnkern

    dev = torch.device(device).type
    if provider in ("reference", "sdpa", "compile"):
        return None
    if provider == "flex":
        if dev != "cuda":
            return "FlexAttention is benchmarked on CUDA only"
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except ImportError as e:
            return "torch has no FlexAttention (%s)" % e
        return None
    if provider not in attnkern.backends():
        return "unknown provider %r" % provider
    info = attnkern.backends()[provider]
    if not info.available:
        return info.reason
    if provider == "cpu" and dev != "cpu":
        return "the cpu backend runs on CPU tensors"
    if provider in ("cuda", "triton") and dev != "cuda":
        # Triton under TRITON_INTERPRET=1 is a correctness tool, never timed.
        return "the %s backend is benchmarked on CUDA tensors only" % provider
    return None


def _pool_fn(inp: Inputs, backend: str) -> Callable:
    import attnkern

    L = inp.case.shape.L
    if inp.offsets is not None:
        offsets = inp.offsets

        def fn(q, k, v):
            return attnkern.attention_pool(q, k, v, offsets=offsets, max_length=L, backend=backend)
    else:
        lengths = inp.lengths

        def fn(q, k, v):
            return attnkern.attention_pool(q, k, v, lengths, backend=backend)
    return fn


def _padded_view(inp: Inputs):
    """(k, v) -> padded key/value [B, L, H, D] and a [B, L] validity mask. For the jagged layout
    the gather runs inside the timed call: it is what a padded-only library costs a jagged user."""
    from attnkern.reference import jagged_to_padded, lengths_to_mask

    L = inp.case.shape.L
    if inp.offsets is not None:
        offsets = inp.offsets

        def to_padded(k, v):
            return jagged_to_padded(k, v, offsets, L)
    else:
        mask = lengths_to_mask(inp.lengths, L)

        def to_padded(k, v):
            return k, v, mask
    return to_padded


def _sdpa_fn(inp: Inputs) -> Callable:
    import torch.nn.functional as F

    to_padded = _padded_view(inp)

    def fn(q, k, v):
        kp, vp, valid = to_padded(k, v)
        # [B, N, H, D] -> [B, H, N, D] as transpose views (no copy of our own); mask [B, 1, 1, L],
        # True = attend. A fully masked row (length 0) gives NaN in SDPA: harmless for timing,
        # and the correctness check compares non-empty rows only.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2),
            attn_mask=valid[:, None, None, :])
        return out.transpose(1, 2)
    return fn


def _compile_fn(inp: Inputs) -> Callable:
    from attnkern.reference import attention_pool_ref

    # A fresh compile per case, so that the reported compile time is this case's and the
    # recompile limit is never reached over a long run.
    torch._dynamo.reset()
    compiled = torch.compile(attention_pool_ref, dynamic=False)
    L = inp.case.shape.L
    if inp.offsets is not None:
        offsets = inp.offsets

        def fn(q, k, v):
            return compiled(q, k, v, offsets=offsets, max_length=L)[0]
    else:
        lengths = inp.lengths

        def fn(q, k, v):
            return compiled(q, k, v, lengths)[0]
    return fn


def _flex_fn(inp: Inputs) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = inp.case.shape
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    lengths = inp.lengths
    to_padded = _padded_view(inp)

    def length_mask(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    # Built once outside the timed call (a model would build it once per batch).
    block_mask = create_block_mask(length_mask, s.B, None, s.N, s.L, device=inp.device)

    def fn(q, k, v):
        kp, vp, _ = to_padded(k, v)
        out = flex(q.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)
    return fn


def forward_fn(provider: str, inp: Inputs) -> Callable:
    """f(q, k, v) -> out [B, N, H, Dv] for one provider; raises Unavailable."""
    why = provider_status(provider, inp.device)
    if why is not None:
        raise Unavailable(why)
    if provider == "sdpa":
        return _sdpa_fn(inp)
    if provider == "compile":
        return _compile_fn(inp)
    if provider == "flex":
        return _flex_fn(inp)
    return _pool_fn(inp, provider)


def make_callable(provider: str, inp: Inputs) -> Callable:
    """A no-argument callable running the case's mode: fwd returns out; fwd+bwd returns
    (out, dq, dk, dv) through torch.autograd.grad (no .grad accumulation between runs)."""
    f = forward_fn(provider, inp)
    if inp.case.mode == "fwd":
        q, k, v = inp.query, inp.key, inp.value
        return lambda: f(q, k, v)
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (inp.query, inp.key, inp.value))
    go = inp.grad_out

    def fwd_bwd():
        out = f(q, k, v)
        return (out,) + torch.autograd.grad(out, (q, k, v), go)
    return fwd_bwd


# Total bytes the limit measurement rotates through: several times the last-level cache (32 MB
# L3 on the CPU machine here, 50-60 MB L2 on A100/H100/H200), so that every timed call reads
# from memory. A single buffer re-read in a loop would time the cache instead.
_ROTATE_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def limit_callable(nbytes: int, device) -> Callable:
    """Moves `nbytes` once at the machine's best: CPU reads them (sum over a float32 buffer),
    CUDA copies half of them device to device (read + write = nbytes). Each call uses the next
    of several buffers whose total exceeds the caches, so the time is a memory time."""
    device = torch.device(device)
    copies = max(1, min(64, -(-_ROTATE_BYTES.get(device.type, 0) // max(nbytes, 1))))
    if device.type == "cuda":
        pairs = []
        for _ in range(copies):
            src = torch.ones(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
            pairs.append((src, torch.empty_like(src)))
        ring = itertools.cycle(pairs)

        def copy():
            src, dst = next(ring)
            return dst.copy_(src)
        return copy
    bufs = itertools.cycle([torch.ones(max(nbytes // 4, 1), dtype=torch.float32)
                            for _ in range(copies)])
    return lambda: next(bufs).sum()


# ----------------------------------------------------------------------------------------------
# Correctness check against a float64 oracle

_FLOOR = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 3e-3}


@dataclass
class Oracle:
    inp: Inputs
    exact: tuple  # float64 outputs (out[, dq, dk, dv])
    ref_err: float  # error of the reference run in the case's dtype

    def compare(self, outputs) -> float:
        """Largest error over the compared outputs, relative to max(1, |oracle|); inf for NaN."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        rows = self.inp.nonempty
        jagged = self.inp.offsets is not None
        err = 0.0
        for i, (got, want) in enumerate(zip(outputs, self.exact)):
            # out and dq: non-empty rows; dk/dv: non-empty rows when padded, every token when
            # jagged (each token belongs to a non-empty row).
            if not (jagged and i >= 2):
                got, want = got[rows], want[rows]
            if want.numel() == 0:
                continue
            diff = (got.double() - want).abs().nan_to_num(nan=math.inf).max().item()
            err = max(err, diff / max(1.0, want.abs().max().item()))
        return err

    def tolerance(self) -> float:
        return 2 * self.ref_err + _FLOOR[self.inp.case.dtype]


def make_oracle(inp: Inputs) -> Oracle:
    from attnkern.reference import attention_pool_ref

    def run(q, k, v, go):
        kw = ({"offsets": inp.offsets, "max_length": inp.case.shape.L} if inp.offsets is not None
              else {"lengths": inp.lengths})
        if inp.case.mode == "fwd":
            with torch.no_grad():
                return (attention_pool_ref(q, k, v, **kw)[0],)
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = attention_pool_ref(q, k, v, **kw)[0]
        return (out,) + torch.autograd.grad(out, (q, k, v), go)

    tensors = (inp.query, inp.key, inp.value, inp.grad_out)
    exact = tuple(t.detach() for t in run(*(t.double() for t in tensors)))
    oracle = Oracle(inp, exact, 0.0)
    oracle.ref_err = oracle.compare(run(*tensors))
    return oracle


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, device, *, budget_s: float = 0.25, min_reps: int = 3,
              max_reps: int = 200) -> List[float]:
    """Seconds per call after one warm-up call: at least min_reps, then until budget_s is spent.
    CPU: time.perf_counter around each call. CUDA: CUDA events, the L2 cache flushed before
    each call so that a small case is not timed out of cache."""
    device = torch.device(device)
    fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    if device.type == "cuda":
        flush = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return times
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(fn: Callable, device) -> Optional[int]:
    """Peak bytes allocated by one call above what was live before it (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    _sync(device)
    del result
    return int(torch.cuda.max_memory_allocated(device) - base)


# ----------------------------------------------------------------------------------------------
# Running a case


def environment(device) -> dict:
    import attnkern

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    try:
        load = os.getloadavg()[0]  # at the start of the run: a busy machine distorts CPU timings
    except (AttributeError, OSError):
        load = None
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "load_avg": load, "torch_version": torch.__version__,
            "attnkern_version": attnkern.__version__}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "%s (%d cores)" % (line.split(":", 1)[1].strip(), os.cpu_count() or 0)
    except OSError:
        pass
    return "%s (%d cores)" % (platform.processor() or platform.machine(), os.cpu_count() or 0)


@dataclass
class CaseSetup:
    """Everything one case needs: inputs, oracle, byte/FLOP counts and a callable per provider."""

    case: Case
    inputs: Inputs
    nbytes: int
    nflops: int
    _oracle: Optional[Oracle] = field(default=None, repr=False)

    @property
    def oracle(self) -> Oracle:
        if self._oracle is None:
            self._oracle = make_oracle(self.inputs)
        return self._oracle

    def callable(self, provider: str) -> Callable:
        """The timed callable of `provider` ("limit" = the machine's limit); raises Unavailable."""
        if provider == "limit":
            return limit_callable(self.nbytes, self.inputs.device)
        return make_callable(provider, self.inputs)

    def check(self, outputs) -> tuple:
        """(ok, err) of a provider's outputs against the float64 oracle."""
        err = self.oracle.compare(outputs)
        return err <= self.oracle.tolerance(), err


def setup_case(case: Case, device="cpu") -> CaseSetup:
    inp = make_inputs(case, device)
    return CaseSetup(case, inp, bytes_moved(case, inp.total_len), flops(case, inp.total_len))


def _record(setup: CaseSetup, env: dict, provider: str, **fields) -> dict:
    c = setup.case
    shape = dict(c.shape.as_dict(), lengths=c.lengths, total_len=setup.inputs.total_len)
    key = "/".join((OP, provider, c.mode, "%s-%s" % (c.shape.name, c.lengths), c.dtype,
                    env["device"], env["attnkern_version"]))
    rec = {"op": OP, "key": key, "provider": provider, "mode": c.mode, "shape": shape,
           "dtype": c.dtype}
    rec.update(env)
    rec.update(fields)
    return rec


def run_case(setup: CaseSetup, providers: Sequence[str], env: dict, *, budget_s: float = 0.25,
             progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Times the limit and every provider of one case; returns its records (the limit first)."""
    device = setup.inputs.device
    say = progress or (lambda msg: None)
    say("limit")
    lim_times = time_call(setup.callable("limit"), device, budget_s=budget_s)
    lim = statistics.median(lim_times)
    records = [_record(setup, env, "limit", status="ok", median_ms=lim * 1e3,
                       min_ms=min(lim_times) * 1e3, reps=len(lim_times), bytes=setup.nbytes,
                       gbps=setup.nbytes / lim / 1e9, frac_of_limit=1.0,
                       method="d2d copy" if device.type == "cuda" else "sum (read once)")]
    for p in providers:
        say(p)
        try:
            fn = setup.callable(p)
        except Unavailable:
            continue
        except Exception as e:  # a provider that fails to build is reported, never fatal
            status = "unavailable" if p == "flex" else "error"
            records.append(_record(setup, env, p, status=status, reason="%s: %s" % (type(e).__name__, e)))
            continue
        try:
            t0 = time.perf_counter()
            outputs = fn()
            _sync(device)
            first = time.perf_counter() - t0
            ok, err = setup.check(outputs)
            del outputs
            times = time_call(fn, device, budget_s=budget_s)
        except Exception as e:
            # FlexAttention is benchmarked "where it runs": a shape or mode it cannot compile
            # marks it unavailable for the case; any other provider failing is an error.
            status = "unavailable" if p == "flex" else "error"
            reason = "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
            records.append(_record(setup, env, p, status=status, reason=reason))
            continue
        med = statistics.median(times)
        rec = _record(setup, env, p, status="ok", median_ms=med * 1e3, min_ms=min(times) * 1e3,
                      reps=len(times), bytes=setup.nbytes, gbps=setup.nbytes / med / 1e9,
                      frac_of_limit=lim / med, gflops=setup.nflops / med / 1e9,
                      check="ok" if ok else "MISMATCH", max_err=err,
                      first_call_s=first, peak_mem_bytes=peak_memory(fn, device))
        if p in ("compile", "flex"):
            rec["compile_s"] = max(first - med, 0.0)
        records.append(rec)
        del fn
    timed = {r["provider"]: r["median_ms"] for r in records if r.get("status") == "ok"}
    for r in records:
        if r["provider"] != "limit" and r.get("status") == "ok":
            r["speedup_vs"] = {b: timed[b] / r["median_ms"] for b in BASELINES if b in timed}
    return records


# ----------------------------------------------------------------------------------------------
# Reports: text table, markdown, CSV, plot

_COLUMNS = ("provider", "ms", "GB/s", "%limit", "GFLOP/s", "x ref", "x sdpa", "x compile",
            "peak MiB", "compile s", "check")


def _row(r: dict) -> List[str]:
    if r.get("status") != "ok":
        return [r["provider"]] + ["-"] * (len(_COLUMNS) - 2) + [r.get("status", "?")]
    sp = r.get("speedup_vs", {})

    def fx(b):
        return "%.2f" % sp[b] if b in sp else "-"
    peak = r.get("peak_mem_bytes")
    return [
        r["provider"] if r["provider"] != "limit" else "limit (%s)" % r.get("method", ""),
        "%.3f" % r["median_ms"], "%.1f" % r["gbps"], "%.0f%%" % (100 * r["frac_of_limit"]),
        "%.1f" % r["gflops"] if "gflops" in r else "-",
        fx("reference"), fx("sdpa"), fx("compile"),
        "%.1f" % (peak / 2**20) if peak is not None else "-",
        "%.1f" % r["compile_s"] if "compile_s" in r else "-",
        r.get("check", "-"),
    ]


def _case_title(r: dict) -> str:
    s = r["shape"]
    return "%s %s %s %s  (B=%d N=%d H=%d L=%d Dk=%d Dv=%d, %s, %.1f MB moved)" % (
        s["name"], s["lengths"], r["dtype"], r["mode"], s["B"], s["N"], s["H"], s["L"],
        s["Dk"], s["Dv"], s["layout"], r["bytes"] / 1e6)


def _group(records: Sequence[dict]) -> Dict[tuple, List[dict]]:
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        k = (r["shape"]["name"], r["shape"]["lengths"], r["dtype"], r["mode"])
        groups.setdefault(k, []).append(r)
    return groups


def format_table(records: Sequence[dict]) -> str:
    """The plain-text table `attnkern bench` prints: one block per case, the limit first."""
    lines = []
    for rs in _group(records).values():
        lines.append(_case_title(rs[0]))
        rows = [list(_COLUMNS)] + [_row(r) for r in rs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
        for row in rows:
            lines.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        for r in rs:
            if r.get("status") != "ok":
                lines.append("  %s %s: %s" % (r["provider"], r.get("status"), r.get("reason", "")))
        lines.append("")
    return "\n".join(lines)


def format_markdown(records: Sequence[dict]) -> str:
    """One markdown table of every timed provider (the README's results table)."""
    # Peak memory is measured on CUDA only: drop the column when no record has it.
    keep = [i for i, c in enumerate(_COLUMNS)
            if c != "peak MiB" or any(r.get("peak_mem_bytes") is not None for r in records)]
    head = ["shape", "lengths", "dtype", "mode"] + [_COLUMNS[i] for i in keep]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        s = r["shape"]
        row = _row(r)
        out.append("| " + " | ".join([s["name"], s["lengths"], r["dtype"], r["mode"]]
                                     + [row[i] for i in keep]) + " |")
    return "\n".join(out) + "\n"


_CSV_FIELDS = ("key", "op", "provider", "mode", "shape", "B", "N", "H", "L", "Dk", "Dv", "layout",
               "lengths", "total_len", "dtype", "device", "device_name", "threads", "torch_version",
               "attnkern_version", "status", "median_ms", "min_ms", "reps", "bytes", "gbps",
               "frac_of_limit", "gflops", "speedup_vs_reference", "speedup_vs_sdpa",
               "speedup_vs_compile", "peak_mem_bytes", "compile_s", "check", "max_err", "reason")


def write_csv(records: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            flat = dict(r)
            flat.update({k: v for k, v in r["shape"].items() if k != "name"})
            flat["shape"] = r["shape"]["name"]
            for b, v in r.get("speedup_vs", {}).items():
                flat["speedup_vs_" + b] = v
            w.writerow(flat)


def plot_results(records: Sequence[dict], path: str) -> None:
    """Bar chart of median time per provider per shape (log scale), one panel per
    (device, dtype, mode); a black tick marks the machine's limit for the same bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[tuple, List[dict]] = {}
    for r in records:
        if r.get("status") == "ok":
            panels.setdefault((r["device_name"], r["dtype"], r["mode"]), []).append(r)
    if not panels:
        raise ValueError("no timed records to plot")
    providers = [p for p in PROVIDERS if any(r["provider"] == p for rs in panels.values() for r in rs)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.5, 3.7 + 1.6 * max(
        len({(r["shape"]["name"], r["shape"]["lengths"]) for r in rs}) for rs in panels.values())),
        3.6 * len(panels)), squeeze=False)
    width = 0.8 / max(len(providers), 1)
    for ax, ((dev, dtype, mode), rs) in zip(axes[:, 0], sorted(panels.items())):
        cases = sorted({(r["shape"]["name"], r["shape"]["lengths"]) for r in rs})
        t = {(r["shape"]["name"], r["shape"]["lengths"], r["provider"]): r["median_ms"] for r in rs}
        for j, p in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i, c in enumerate(cases) if c + (p,) in t]
            ys = [t[c + (p,)] for c in cases if c + (p,) in t]
            if xs:
                ax.bar(xs, ys, width, label=p)
        lx = [i for i, c in enumerate(cases) if c + ("limit",) in t]
        ax.hlines([t[cases[i] + ("limit",)] for i in lx], [i - 0.45 for i in lx],
                  [i + 0.45 for i in lx], colors="black", label="limit (same bytes)")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(["%s\n%s" % c for c in cases], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms")
        ax.set_title("attention_pool %s %s on %s" % (mode, dtype, dev), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line


def _csv_list(choices):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                "expected a comma-separated list of %s, got %r" % (", ".join(choices), text))
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnkern bench",
        description="Time attention pooling on every available backend and the PyTorch "
                    "alternatives; print a table, write JSON, CSV, markdown and a PNG plot.")
    p.add_argument("--full", action="store_true",
                   help="every shape, uniform and full lengths, float32 and bfloat16 (long)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", type=_csv_list(tuple(DTYPES)), default=None,
                   help="comma-separated dtypes (default float32; --full: float32,bfloat16)")
    p.add_argument("--shapes", type=_csv_list(tuple(SHAPES)), default=None,
                   help="comma-separated shape names: " + ", ".join(SHAPES))
    p.add_argument("--lengths", type=_csv_list(LENGTHS), default=None,
                   help="uniform (randint(0, L+1)) and/or full (all L)")
    p.add_argument("--modes", type=_csv_list(MODES), default=None, help="fwd and/or fwd+bwd")
    p.add_argument("--providers", type=_csv_list(PROVIDERS), default=None,
                   help="comma-separated providers (default: every one that runs here)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of repeats per measurement (default 0.25; --full 1.0)")
    p.add_argument("--out", default=os.path.join("runs", "bench"),
                   help="output folder for bench.json, bench.csv, bench.md, bench.png")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's default)")
    p.add_argument("--cold-compile", action="store_true",
                   help="disable torch.compile's on-disk caches, so that compile_s is a cold "
                        "compile (default: torch's defaults, warm after the first run)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def select_cases(args) -> List[Case]:
    dtypes = args.dtype or (["float32", "bfloat16"] if args.full else ["float32"])
    shapes = args.shapes or (FULL_SHAPES if args.full else QUICK_SHAPES)
    lengths = args.lengths or (LENGTHS if args.full else ("uniform",))
    modes = args.modes or MODES
    return make_cases(shapes, lengths, dtypes, modes)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("attnkern bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            print("attnkern bench: --threads must be >= 1, got %d" % args.threads, file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.cold_compile:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    budget = args.budget if args.budget is not None else (1.0 if args.full else 0.25)
    cases = select_cases(args)
    wanted = args.providers or list(PROVIDERS)
    providers = []
    for p in wanted:
        why = provider_status(p, device)
        if why is None:
            providers.append(p)
        elif args.providers or p not in ("flex",) or device.type == "cuda":
            print("attnkern bench: skipping %s: %s" % (p, why), file=sys.stderr)
    env = environment(device)
    env["compile_cache"] = "off" if args.cold_compile else "default"
    if env["load_avg"] is not None and env["load_avg"] > 0.5 * (os.cpu_count() or 1):
        # OpenMP threads spin-wait at every parallel region: on a busy machine a multi-threaded
        # kernel (torch.compile's C++ code above all) can be slowed many times over.
        print("attnkern bench: warning: the machine is busy (load average %.1f on %d cores); "
              "CPU timings will be noisy and inflated (try --threads 1 or a quiet machine)"
              % (env["load_avg"], os.cpu_count() or 0), file=sys.stderr)
    print("attnkern bench: %d cases x %s on %s (%s), torch %s, %d threads" % (
        len(cases), ", ".join(providers), env["device_name"], device.type, env["torch_version"],
        env["threads"]), file=sys.stderr)

    records: List[dict] = []
    tty = sys.stderr.isatty()
    t_all = time.perf_counter()
    for i, case in enumerate(cases, 1):
        t_case = time.perf_counter()
        prefix = "[%*d/%d] %s" % (len(str(len(cases))), i, len(cases), case.id)

        def progress(what, prefix=prefix):
            if tty:  # a live status line; a log gets the one "done" line per case
                print("\r\033[K%s: %s" % (prefix, what), end="", file=sys.stderr, flush=True)

        setup = setup_case(case, device)
        records.extend(run_case(setup, providers, env, budget_s=budget, progress=progress))
        print("%s%s: done in %.1fs" % ("\r\033[K" if tty else "", prefix, time.perf_counter() - t_case),
              file=sys.stderr, flush=True)
        del setup
    elapsed = time.perf_counter() - t_all

    print(format_table(records))
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, "bench." + ext) for ext in ("json", "csv", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(records, f, indent=1)
    write_csv(records, paths["csv"])
    cmd = "attnkern bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(paths["md"], "w") as f:
        f.write("Command: `%s` (%.0f s) on %s, torch %s, %d threads\n\n" % (
            cmd.strip(), elapsed, env["device_name"], env["torch_version"], env["threads"]))
        f.write(format_markdown(records))
    written = [paths["json"], paths["csv"], paths["md"]]
    if not args.no_plot:
        try:
            plot_results(records, paths["png"])
            written.append(paths["png"])
        except ImportError as e:
            print("attnkern bench: no plot (%s); pip install matplotlib" % e, file=sys.stderr)
    print("attnkern bench: %.0f s; wrote %s" % (elapsed, ", ".join(written)), file=sys.stderr)
    bad = [r["key"] for r in records if r.get("check") == "MISMATCH" or r.get("status") == "error"]
    if bad:
        print("attnkern bench: mismatches or errors in %s" % ", ".join(bad), file=sys.stderr)
    return 0
