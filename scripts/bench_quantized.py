"""Quantized K/V against the bf16 path at the long-history shape (docs/quantized.md): the CPU op
on int8 rows (scale + bias per row), float8_e4m3fn rows (scale per row) and bfloat16 rows, and the
time to read each one's bytes once (attnkern.tools.bench.serving.read_fn), all in one run,
alternating round by round so that a busy machine slows each alike; medians.

    python scripts/bench_quantized.py [--shape 16,1,4,16384,32] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import attnkern
from attnkern.ops.availability import cpu_isa
from attnkern.tools.bench.serving import make_inputs, read_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16,1,4,16384,32", help="B,N,H,L,D")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, N, H, L, D = (int(x) for x in args.shape.split(","))
    q, k, v = make_inputs((B, N, H, L, D), torch.float32)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    i8 = [attnkern.quantize_rows(t, torch.int8) for t in (k, v)]
    f8 = [attnkern.quantize_rows(t, torch.float8_e4m3fn) for t in (k, v)]

    def quant(parts):
        (kd, ks, kbias), (vd, vs, vbias) = parts
        return lambda: attnkern.attention_pool(qb, kd, vd, key_scale=ks, key_bias=kbias, value_scale=vs,
                                               value_bias=vbias, backend="cpu")

    rows = B * L * H
    fns = {
        "bf16": lambda: attnkern.attention_pool(qb, kb, vb, backend="cpu"),
        "int8": quant(i8),
        "fp8_e4m3": quant(f8),
        # bytes the op must read: K and V elements, plus each row's float32 parameters
        "read bf16 K/V": read_fn(2 * rows * D * 2),
        "read int8 K/V + scale, bias": read_fn(2 * rows * (D + 8)),
        "read fp8 K/V + scale": read_fn(2 * rows * (D + 4)),
    }
    samples = {n: [] for n in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(s) for n, s in samples.items()}
    print("shape (B, N, H, L, D) = %s; torch %s, %d threads, cpu ISA path %s, load average %s" % (
        (B, N, H, L, D), torch.__version__, torch.get_num_threads(), cpu_isa(),
        " ".join("%.1f" % x for x in os.getloadavg())))
    for n, t in med.items():
        print("  %-30s %8.3f ms" % (n, t * 1e3))
    print("  int8 / bf16 path            %.2f" % (med["int8"] / med["bf16"]))
    print("  int8 / its read             %.2f" % (med["int8"] / med["read int8 K/V + scale, bias"]))
    print("  fp8 / bf16 path             %.2f" % (med["fp8_e4m3"] / med["bf16"]))
    print("  fp8 / its read              %.2f" % (med["fp8_e4m3"] / med["read fp8 K/V + scale"]))
    print("  bf16 path / its read        %.2f" % (med["bf16"] / med["read bf16 K/V"]))


if __name__ == "__main__":
    main()
