"""`attnkern check`: every available backend against the float64 reference on a grid of shapes,
dtypes and layouts, forward and all three gradients; prints a pass/fail table and exits
non-zero on any failure."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass

import torch

from attnkern._inputs import edge_lengths, random_problem

# (name, B, N, H, L, Dk, Dv): odd head dims, Dk != Dv, several queries/heads, L off any block.
SHAPES = [
    ("base", 4, 1, 1, 33, 64, 64),
    ("multi", 3, 4, 2, 17, 7, 40),
    ("wide", 5, 2, 3, 70, 130, 7),
]
LAYOUTS = ("lengths", "mask", "jagged", "full")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
# The tolerance rule, shared with the test suite (tests/conftest.py): a backend's error against
# the float64 oracle may be LOW_PRECISION_FACTOR times the error of the reference run in the
# same precision, plus FLOOR[dtype] times the oracle's magnitude (at least 1).
LOW_PRECISION_FACTOR = 2.0
FLOOR = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class Result:
    backend: str
    device: str
    layout: str
    dtype: str
    shape: str
    errors: dict
    passed: bool
    note: str = ""


def make_inputs(B, N, H, L, Dk, Dv, dtype, layout, device, seed=0):
    """Random inputs with empty rows, full rows and rows of odd length."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, kw = random_problem(B, N, H, L, Dk, Dv, layout, edge_lengths(B, L), generator=g, extra_rows=1)
    kw = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    go = torch.randn(B, N, H, Dv, generator=g)
    return [t.to(device, dtype) for t in (q, k, v)], kw, go.to(device, dtype)


def _run(backend, args, kw, go):
    import attnkern

    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    out = attnkern.attention_pool(*leaves, **kw, backend=backend)
    grads = torch.autograd.grad(out, leaves, go.to(out.dtype))
    return [out.detach()] + [g.detach() for g in grads]


def _max_err(a, b):
    return 0.0 if a.numel() == 0 else (a.double().cpu() - b.double().cpu()).abs().max().item()


def check_case(backend, device, layout, dtype, shape) -> Result:
    name, B, N, H, L, Dk, Dv = shape
    args, kw, go = make_inputs(B, N, H, L, Dk, Dv, dtype, layout, device)
    oracle = _run("reference", [a.double() for a in args], kw, go.double())
    lowp = oracle if dtype == torch.float64 else _run("reference", args, kw, go)
    got = _run(backend, args, kw, go)
    errors, passed = {}, True
    for label, x, lp, ref in zip(("out", "dq", "dk", "dv"), got, lowp, oracle):
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        allowed = LOW_PRECISION_FACTOR * _max_err(lp, ref) + FLOOR[dtype] * scale
        err = _max_err(x, ref)
        finite = bool(torch.isfinite(x).all())
        errors[label] = err
        passed &= finite and err <= allowed
    return Result(backend, device, layout, str(dtype).split(".")[-1], name, errors, passed)


def _plan(backends, devices, dtypes):
    import attnkern

    info = attnkern.backends()
    gpu = torch.cuda.is_available()
    for backend in backends:
        if not info[backend].available:
            yield None, backend, info[backend].reason
            continue
        if backend == "cpu":
            devs = ["cpu"]
        elif backend == "cuda":
            devs = ["cuda"]
        elif backend == "triton":
            devs = ["cuda"] if gpu else ["cpu"]
        else:
            devs = ["cpu"] + (["cuda"] if gpu else [])
        for dev in devs:
            if dev not in devices:
                continue
            for dt in dtypes:
                if dt == torch.float64 and backend in ("cuda", "triton"):
                    continue
                yield dev, backend, dt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnkern check", description=__doc__)
    parser.add_argument("--backend", action="append", choices=["reference", "cpu", "cuda", "triton"],
                        help="backend(s) to check (default: every available fused backend)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"],
                        help="device(s) to check on (default: all present)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="dtype(s) (default: float32, float16, bfloat16, float64)")
    parser.add_argument("--quick", action="store_true", help="one shape per layout and dtype")
    args = parser.parse_args(argv)

    import attnkern

    backends = args.backend or [b for b in ("cpu", "cuda", "triton") if attnkern.backends()[b].available]
    if not backends:
        backends = ["reference"]
    devices = args.device or ["cpu", "cuda"]
    dtypes = [DTYPES[d] for d in (args.dtype or ["float32", "float16", "bfloat16", "float64"])]
    shapes = SHAPES[:1] if args.quick else SHAPES

    results, skipped = [], []
    header = "%-9s %-6s %-8s %-9s %-6s %10s %10s %10s %10s  %s" % (
        "backend", "device", "layout", "dtype", "shape", "out", "dq", "dk", "dv", "result")
    print(header)
    print("-" * len(header))
    t0 = time.time()
    for dev, backend, dt in _plan(backends, devices, dtypes):
        if dev is None:
            skipped.append((backend, dt))
            continue
        for layout, shape in itertools.product(LAYOUTS, shapes):
            try:
                r = check_case(backend, dev, layout, dt, shape)
            except Exception as e:  # a crash is a failure, reported with its message
                r = Result(backend, dev, layout, str(dt).split(".")[-1], shape[0], {}, False,
                           "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:80]))
            results.append(r)
            e = r.errors
            print("%-9s %-6s %-8s %-9s %-6s %10.2e %10.2e %10.2e %10.2e  %s %s" % (
                r.backend, r.device, r.layout, r.dtype, r.shape, e.get("out", float("nan")),
                e.get("dq", float("nan")), e.get("dk", float("nan")), e.get("dv", float("nan")),
                "PASS" if r.passed else "FAIL", r.note), flush=True)
    for backend, reason in skipped:
        print("skipped backend %s: %s" % (backend, reason))
    failed = sum(not r.passed for r in results)
    print("%d passed, %d failed  (%.1f s; max abs errors vs the float64 reference)" % (
        len(results) - failed, failed, time.time() - t0))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
