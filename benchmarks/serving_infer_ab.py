"""The bf16 inference path against SDPA and the bf16 GEMM, alternating in one run.

Each round times, in turn, SDPA (bf16), attnkern's inference path (``attention_pool`` under
``torch.inference_mode()``, backend "cpu") and a bf16 ``torch.mm`` at each serving shape, so
that all three see the same machine load; reports the median and the fastest round of each,
the inference path's speed over SDPA's and its rate as a share of the bf16 GEMM's (both from
medians and from the fastest rounds), and the load average before and after.

    python benchmarks/serving_infer_ab.py [--rounds 15] [--threads 2] [--clock wall|cpu] [--out DIR]

--clock cpu (with --threads 1) times the CPU time the process ran (time.process_time) instead of
the wall clock: on a machine shared with other jobs it leaves out the time the scheduler gave to
them, so that the ratios stay those of the arithmetic (the caches are still shared).
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from attnkern.tools.bench.serving import _cpu_inference, _sdpa, flops, gemm_peak_fn, make_inputs

SHAPES = [(1, 1024, 4, 2048, 32), (1, 512, 2, 1024, 64), (8, 256, 4, 1000, 32), (1, 2048, 8, 4096, 64)]
GEMM_N = 1536


def _time(fn, reps, clock):
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="calls per provider per round (the fastest is kept)")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into the shape list, or all")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.clock == "cpu" and a.threads != 1:
        ap.error("--clock cpu needs --threads 1 (the process's CPU time sums its threads')")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    shapes = SHAPES if a.shapes == "all" else [SHAPES[int(i)] for i in a.shapes.split(",")]
    gemm = gemm_peak_fn(torch.bfloat16, GEMM_N)
    gemm_flop = 2 * GEMM_N ** 3
    load0 = os.getloadavg()
    rows = []
    for shape in shapes:
        q, k, v = make_inputs(shape, torch.bfloat16)
        fns = {"sdpa": _sdpa(q, k, v), "cpu": _cpu_inference(q, k, v), "gemm": gemm}
        ref = fns["sdpa"]().float()
        err = (fns["cpu"]().float() - ref).abs().max().item()
        for f in fns.values():
            f()
        t = {n: [] for n in fns}
        for _ in range(a.rounds):
            for n, f in fns.items():
                t[n].append(_time(f, a.reps, clock))
        med = {n: statistics.median(x) for n, x in t.items()}
        best = {n: min(x) for n, x in t.items()}
        fl = flops(*shape)
        row = {
            "shape": shape, "median_ms": {n: 1e3 * x for n, x in med.items()},
            "best_ms": {n: 1e3 * x for n, x in best.items()},
            "x_sdpa_median": med["sdpa"] / med["cpu"], "x_sdpa_best": best["sdpa"] / best["cpu"],
            "gflops_median": fl / med["cpu"] / 1e9, "gemm_gflops_median": gemm_flop / med["gemm"] / 1e9,
            "gemm_share_median": (fl / med["cpu"]) / (gemm_flop / med["gemm"]),
            "gemm_share_best": (fl / best["cpu"]) / (gemm_flop / best["gemm"]),
            "max_abs_diff_vs_sdpa": err,
        }
        rows.append(row)
        print("%-24s sdpa %8.3f ms (best %8.3f)  cpu %8.3f ms (best %8.3f)  x SDPA %.2f (best %.2f)  "
              "%.0f GFLOP/s = %.0f%% of bf16 GEMM %.0f (best rounds %.0f%%)  |cpu - sdpa| %.1e" % (
                  str(shape), row["median_ms"]["sdpa"], row["best_ms"]["sdpa"], row["median_ms"]["cpu"],
                  row["best_ms"]["cpu"], row["x_sdpa_median"], row["x_sdpa_best"], row["gflops_median"],
                  100 * row["gemm_share_median"], row["gemm_gflops_median"], 100 * row["gemm_share_best"], err),
              flush=True)
    load1 = os.getloadavg()
    import attnkern._C as C

    meta = {"rounds": a.rounds, "threads": a.threads, "reps": a.reps, "clock": a.clock, "load_before": load0, "load_after": load1,
            "isa": C.cpu_isa(), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    print("load average before %s after %s, ISA path %s" % (load0, load1, meta["isa"]))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "serving_infer_ab-%s-%dt.json" % (a.clock, a.threads)), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
