"""`attnkern bench --family serving`: many candidates (N) scored against one history, every
position valid (the ranking-service case).

Providers (PROVIDER_TABLE): the eager reference, SDPA (no mask: every position is valid),
torch.compile of the reference, FlexAttention (CPU, where it compiles) and attnkern's cpu
backend twice: ``cpu`` as a serving stack calls it (under torch.inference_mode: the inference
path, P V with P rounded to bf16 on the avx512_bf16 and amx paths) and ``cpu-train`` (inputs that
require grad: the training forward, P V in fp32; the backward is not timed); and ``int8`` /
``fp8`` (float8_e4m3fn): the cpu op reading K/V quantized row-wise (docs/quantized.md), checked
against the reference on the dequantized K/V and also timed against a read of its own bytes
(data plus per-row parameters). SDPA, compile and flex get the float K/V: what a user must
dequantize to before calling them (the dequantize pass itself is not timed). Timings are
medians over rounds in which the providers run one after another (the machine is shared, so
every ratio is taken within one run). GFLOP/s count the useful FLOPs 2 * N * H * L * (Dk + Dv)
(forward); the machine's peak for a dtype is measured in the same run as the best rate of a
GEMM (torch.mm at a large square size) in that dtype or in float32, whichever is faster (and
every line also gives its share of the same run's bf16 GEMM rate): on a CPU
with AVX512-BF16 or AMX a bfloat16 GEMM runs at twice the float32 rate or more, so that is the
roof of bfloat16 inputs there; without them (and for float16 on most CPUs) every provider
computes in float32 and the float32 roof is theirs. The best of the run's GEMM samples is taken,
not their median: a shared machine only ever slows a GEMM down. The time to read K and V once is
the median time to sum a buffer of their size (one of several buffers, together larger than the
last-level cache).

    attnkern bench --family serving [--dtype float32,bfloat16] [--rounds 7] [--threads 2]

Each provider's output is checked once against the float64 reference (a mismatch is marked and
makes the command exit non-zero); the SIMD path attnkern's CPU launcher takes is recorded.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ...ops.availability import cpu_isa

SERVING_SHAPES = {  # name: (B, N, H, L, D)
    "n1024": (1, 1024, 4, 2048, 32),
    "n512d64": (1, 512, 2, 1024, 64),
    "b8n256": (8, 256, 4, 1000, 32),
    "long": (16, 1, 4, 16384, 32),  # long history, one query: memory-bound
    "n2048h8": (1, 2048, 8, 4096, 64),
}
TINY_SHAPES = {"tiny": (1, 20, 2, 70, 8), "tiny-long": (2, 1, 2, 600, 8)}  # smoke tests only
_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 3e-3}  # max |out - float64 reference|
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def flops(B, N, H, L, D) -> int:
    return 2 * B * N * H * L * (D + D)


def make_inputs(shape, dtype, seed=0):
    B, N, H, L, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=g).to(dtype)
    k = torch.randn(B, L, H, D, generator=g).to(dtype)
    v = torch.randn(B, L, H, D, generator=g).to(dtype)
    return q, k, v


def _reference(q, k, v):
    from attnkern.reference import attention_pool_ref

    return lambda: attention_pool_ref(q, k, v)[0]


def _sdpa(q, k, v):
    import torch.nn.functional as F

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)


def _compile(q, k, v):
    from attnkern.reference import attention_pool_ref

    torch._dynamo.reset()
    c = torch.compile(attention_pool_ref, dynamic=False)
    return lambda: c(q, k, v)[0]


def _flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    fl = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return lambda: fl(qt, kt, vt).transpose(1, 2)


def _cpu_inference(q, k, v):
    import attnkern

    def run():
        with torch.inference_mode():  # as a serving stack calls it: the inference path
            return attnkern.attention_pool(q, k, v, backend="cpu")
    return run


def _cpu_training(q, k, v):
    import attnkern

    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    # The training forward (autograd records it; the backward is not timed).
    return lambda: attnkern.attention_pool(qg, kg, vg, backend="cpu").detach()


def _quantized(qdtype):
    """attnkern's cpu op on K/V quantized row-wise (attnkern.quantize_rows, outside the timed
    call), the query in the run's dtype, as a serving stack calls it. The callable carries the
    dequantized K/V it computes with (the check's oracle) and the bytes it must read."""
    def build(q, k, v):
        import attnkern
        from attnkern.reference import dequantize_rows

        (kd, ks, kb), (vd, vs, vb) = (attnkern.quantize_rows(t, qdtype) for t in (k, v))

        def run():
            with torch.inference_mode():
                return attnkern.attention_pool(q, kd, vd, key_scale=ks, key_bias=kb, value_scale=vs, value_bias=vb,
                                               backend="cpu")
        run.dequantized = (dequantize_rows(kd, ks, kb), dequantize_rows(vd, vs, vb))
        run.kv_bytes = sum(t.numel() * t.element_size() for t in (kd, ks, kb, vd, vs, vb) if t is not None)
        return run
    return build


# The provider table: name -> builder(q, k, v) returning the timed call (float inputs of the
# run's dtype, [B, N, H, D] / [B, L, H, D], every position valid). A provider whose inputs need
# preparing (quantized K/V: int8/fp8 rows and their scales) does that in its builder, outside the
# timed call, and adds itself here; the bench times, checks and reports every entry alike.
PROVIDER_TABLE: Dict[str, Callable] = {
    "reference": _reference,
    "sdpa": _sdpa,
    "compile": _compile,
    "flex": _flex,
    "cpu": _cpu_inference,
    "cpu-train": _cpu_training,
    "int8": _quantized(torch.int8),
    "fp8": _quantized(torch.float8_e4m3fn),
}
PROVIDERS = tuple(PROVIDER_TABLE)


def provider_fn(name: str, q, k, v) -> Callable[[], torch.Tensor]:
    if name not in PROVIDER_TABLE:
        raise ValueError("unknown provider %r; choose from %s" % (name, ", ".join(PROVIDER_TABLE)))
    return PROVIDER_TABLE[name](q, k, v)


def gemm_peak_fn(dtype, n=2048) -> Callable:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return lambda: torch.mm(a, b)


def read_fn(nbytes: int) -> Callable:
    copies = max(2, min(64, -(-(256 << 20) // max(nbytes, 1))))
    bufs = itertools.cycle([torch.ones(max(nbytes // 4, 1), dtype=torch.float32) for _ in range(copies)])
    return lambda: next(bufs).sum()


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class Result:
    shape: tuple
    dtype: str
    times: Dict[str, float]  # provider -> median seconds
    errors: Dict[str, str]
    read_s: float
    peak_gflops: float
    max_err: Dict[str, float]
    peak_dtype: str = "float32"  # the GEMM that set the peak
    bf16_gflops: float = 0.0  # the best bf16 GEMM rate of the same run
    reads: Dict[str, float] = field(default_factory=dict)  # provider -> read of its own bytes (quantized)


def run_shape(shape, dtype_name: str, providers, rounds: int, peak_gflops, check: bool = True) -> Result:
    """Times the providers at one shape; peak_gflops is measure_peak's (GFLOP/s, dtype name)."""
    dtype = DTYPES[dtype_name]
    q, k, v = make_inputs(shape, dtype)
    B, N, H, L, D = shape
    fns, errors, max_err, own_bytes = {}, {}, {}, {}
    want = None
    if check:
        from attnkern.reference import attention_pool_ref

        want = attention_pool_ref(q.double(), k.double(), v.double())[0]
    for p in providers:
        try:
            f = provider_fn(p, q, k, v)
            out = f()  # warm-up (and compile)
            if want is not None:
                # A quantized provider is checked against the reference on the K/V it holds.
                deq = getattr(f, "dequantized", None)
                ref = want if deq is None else attention_pool_ref(q.double(), deq[0].double(), deq[1].double())[0]
                max_err[p] = (out.double() - ref).abs().max().item()
            if hasattr(f, "kv_bytes"):
                own_bytes[p] = f.kv_bytes
            fns[p] = f
        except Exception as e:  # a provider that cannot run here is reported, not fatal
            errors[p] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
    kv_bytes = B * L * H * 2 * D * torch.empty((), dtype=dtype).element_size()
    rd = read_fn(kv_bytes)
    rd()
    gemm_n = 1536
    # The GEMM of the dtype that set the run's peak (measure_peak), timed with the providers.
    peak, peak_of = peak_gflops
    gemm = gemm_peak_fn(DTYPES[peak_of], gemm_n)
    gemm()
    extra = {"read": rd, "gemm": gemm}
    for p, nb in own_bytes.items():  # a provider reading other bytes than K/V gets its own read
        extra["read-" + p] = read_fn(nb)
        extra["read-" + p]()
    if peak_of != "bfloat16":  # every line also gets its share of a bf16 GEMM of the same run
        extra["gemm-bf16"] = gemm_peak_fn(torch.bfloat16, gemm_n)
        extra["gemm-bf16"]()
    samples: Dict[str, List[float]] = {p: [] for p in list(fns) + list(extra)}
    order = list(fns) + list(extra)
    for r in range(rounds):
        # Alternate the order so that no provider always runs right after the same one.
        for p in (order if r % 2 == 0 else order[::-1]):
            samples[p].append(_once(extra.get(p) or fns[p]))
    times = {p: statistics.median(s) for p, s in samples.items() if p not in extra}
    peak = max(peak, 2 * gemm_n ** 3 / min(samples["gemm"]) / 1e9)
    bf16 = peak if peak_of == "bfloat16" else 2 * gemm_n ** 3 / min(samples["gemm-bf16"]) / 1e9
    reads = {p: statistics.median(samples["read-" + p]) for p in own_bytes}
    return Result(shape, dtype_name, times, errors, statistics.median(samples["read"]), peak, max_err, peak_of,
                  bf16, reads)


def measure_peak(dtype_name: str, rounds: int = 3):
    """(GFLOP/s, dtype name): the best GEMM rate of `rounds` runs in float32 and in dtype_name."""
    n = 1536
    best = (0.0, "float32")
    for gd in dict.fromkeys([torch.float32, DTYPES[dtype_name]]):
        f = gemm_peak_fn(gd, n)
        f()
        g = 2 * n ** 3 / min(_once(f) for _ in range(rounds)) / 1e9
        if g > best[0]:
            best = (g, DTYPE_NAMES[gd])
    return best


def format_result(r: Result) -> List[str]:
    B, N, H, L, D = r.shape
    fl = flops(*r.shape)
    lines = ["(B=%d, N=%d, H=%d, L=%d, D=%d) %s  read K/V once: %.3f ms  GEMM peak %.0f GFLOP/s (%s), "
             "bf16 GEMM %.0f GFLOP/s" % (B, N, H, L, D, r.dtype, r.read_s * 1e3, r.peak_gflops, r.peak_dtype,
                                         r.bf16_gflops)]
    sdpa = r.times.get("sdpa")
    for p, t in r.times.items():
        g = fl / t / 1e9
        extra = ""
        if sdpa:
            extra += "  x sdpa %.2f" % (sdpa / t)
        extra += "  /read %.2f" % (t / r.read_s)
        if p in r.reads:
            extra += "  /own read %.2f (%.3f ms)" % (t / r.reads[p], r.reads[p] * 1e3)
        err = r.max_err.get(p)
        lines.append("  %-10s %9.3f ms %7.1f GFLOP/s %5.1f%% peak %5.1f%% bf16 GEMM%s%s" % (
            p, t * 1e3, g, 100 * g / r.peak_gflops, 100 * g / r.bf16_gflops, extra,
            "  err %.1e" % err if err is not None else ""))
    for p, e in r.errors.items():
        lines.append("  %-10s unavailable: %s" % (p, e))
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnkern bench --family serving", description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    ap.add_argument("--shapes", default=",".join(SERVING_SHAPES),
                    help="comma-separated names: " + ", ".join(list(SERVING_SHAPES) + list(TINY_SHAPES)))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    ap.add_argument("--out", default=None, help="write serving.md (the table) into this folder")
    return ap


def run(dtypes, providers, shapes, rounds, out=None) -> int:
    table = {**SERVING_SHAPES, **TINY_SHAPES}
    bad = [s for s in shapes if s not in table]
    if bad:
        raise ValueError("unknown serving shape(s) %s; choose from %s" % (bad, ", ".join(table)))
    head = "torch %s, %d threads, attnkern cpu ISA path: %s" % (torch.__version__, torch.get_num_threads(), cpu_isa())
    print(head, flush=True)
    lines, failed = [head, ""], []
    for dt in dtypes:
        if dt not in DTYPES:
            raise ValueError("unknown dtype %r" % dt)
        peak = measure_peak(dt)
        for name in shapes:
            r = run_shape(table[name], dt, providers, rounds, peak)
            text = format_result(r)
            for p, e in r.max_err.items():
                if not e <= _TOL[dt] * 8 and p != "reference":
                    failed.append("%s %s %s (error %.3g)" % (name, dt, p, e))
                    text.append("  MISMATCH: %s error %.3g against the float64 reference" % (p, e))
            print("\n".join(text), flush=True)
            lines += text
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "serving.md"), "w") as f:
            f.write("```\n" + "\n".join(lines) + "\n```\n")
    if failed:
        print("attnkern bench: mismatches in %s" % "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run([d for d in args.dtype.split(",") if d], [p for p in args.providers.split(",") if p],
               [s for s in args.shapes.split(",") if s], args.rounds, args.out)


if __name__ == "__main__":
    sys.exit(main())
