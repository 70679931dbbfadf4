"""`attnkern check`: every available backend against the float64 reference on a grid of shapes,
dtypes and layouts, forward and all three gradients (and the score bias's, on rows with one), and
attention_weights by the pooling its weights define, by the checking body and tolerance rule of
attnkern.testing (attention_topk's kept positions by attnkern.topk_testing); prints a pass/fail
table and exits non-zero on any failure."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass

import torch

from attnkern import testing

# (name, B, N, H, L, Dk, Dv[, Hkv]): odd head dims, Dk != Dv, several queries/heads, L off any
# block, and query heads sharing K/V heads (Hkv < H).
SHAPES = [
    ("base", 4, 1, 1, 33, 64, 64),
    ("multi", 3, 4, 2, 17, 7, 40),
    ("wide", 5, 2, 3, 70, 130, 7),
    ("shared", 3, 2, 4, 21, 16, 24, 2),
]
# With a score bias: (name, B, N, H, L, Dk, Dv, Hkv, bias kind, Hb), on the backends of
# BIAS_BACKENDS; a shared bias over every head, and one per query and head on the CPU's tiled
# kernels (N >= 16).
BIAS_SHAPES = [
    ("bias", 3, 2, 4, 21, 16, 24, 2, "shared", 1),
    ("biasq", 3, 17, 2, 70, 16, 8, 2, "per_query", 2),
]
BIAS_BACKENDS = ("reference", "cpu", "triton", "cuda")
LAYOUTS = testing.LAYOUTS
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


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


def pool_function(backend: str, kwargs: dict):
    """What is checked for `backend`: attnkern.attention_pool on it (a seam for the tests)."""
    return testing.pool_function(backend, kwargs)


def check_case(backend, device, layout, dtype, shape) -> Result:
    """One case by the checking body of attnkern.testing (random inputs with empty rows, full
    rows and rows of odd length)."""
    name, B, N, H, L, Dk, Dv = shape[:7]
    Hkv = shape[7] if len(shape) > 7 else H
    bias, Hb = shape[8:10] if len(shape) > 8 else (None, None)
    args, kw = testing.make_problem(B, N, H, L, Dk, Dv, dtype=dtype, layout=layout,
                                    device=device, extra_rows=1, Hkv=Hkv, bias=bias, bias_heads=Hb)
    go = testing.random_grad_out(args[0], args[2])
    reference = None if backend == "reference" else testing.pool_function("reference", kw)
    report = testing.check_function(pool_function(backend, kw), args, kw, go,
                                    reference=reference, scale=Dk ** -0.5, label=backend)
    errors = {label: report.errors.get(full, float("nan")) for label, full in (
        ("out", "out"), ("dq", "grad_query"), ("dk", "grad_key"), ("dv", "grad_value"))}
    note = "" if report.passed else report.failures[0][:80]
    if bias is not None and report.passed:
        note = "db %.2e" % report.errors.get("grad_bias", float("nan"))
    return Result(backend, device, layout, str(dtype).split(".")[-1], name, errors,
                  report.passed, note)


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
            # The CUDA emulation build runs the cuda backend's kernels on CPU tensors.
            devs = ["cpu"] if info[backend].emulated else ["cuda"]
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


# attention_weights: (name, B, N, H, L, Dk, Dv, Hkv, bias kind, Hb), its out and gradients
# checked by the pooling the weights define (attnkern.testing.weights_function).
WEIGHTS_SHAPES = [("weights", 3, 2, 4, 21, 16, 24, 2, "per_query", 4)]


def check_weights_case(backend, device, layout, dtype, shape) -> Result:
    """One attention_weights row: sum_l w v and the gradients through the weights (dq, dk, dv and
    the bias's in the note) against the float64 reference, by the checking body."""
    name, B, N, H, L, Dk, Dv, Hkv, bias, Hb = shape
    args, kw = testing.make_problem(B, N, H, L, Dk, Dv, dtype=dtype, layout=layout, device=device,
                                    extra_rows=1, Hkv=Hkv, bias=bias, bias_heads=Hb)
    go = testing.random_grad_out(args[0], args[2])
    reference = None if backend == "reference" else testing.weights_function("reference", kw)
    report = testing.check_function(testing.weights_function(backend, kw), args, kw, go,
                                    reference=reference, scale=Dk ** -0.5, label=backend)
    errors = {label: report.errors.get(full, float("nan")) for label, full in (
        ("out", "out"), ("dq", "grad_query"), ("dk", "grad_key"), ("dv", "grad_value"))}
    note = report.failures[0][:80] if not report.passed else "db %.2e" % report.errors.get(
        "grad_bias", float("nan"))
    return Result(backend, device, layout, str(dtype).split(".")[-1], name, errors, report.passed, note)


# Activation-unit pooling (DIN): (name, B, N, L, E, Dv, hidden units, activation, softmax).
ACTIVATION_SHAPES = [
    ("din", 4, 1, 49, 16, 16, (32,), "relu", False),
    ("din2", 3, 3, 50, 7, 5, (9, 4), "dice", True),
    ("din3", 5, 2, 17, 40, 3, (80, 40), "prelu", False),
]


def check_activation_case(backend, device, layout, dtype, shape) -> Result:
    """One activation_unit_pool row: out and every gradient (query, key, value, weights, biases,
    activation parameters) against the float64 reference (attnkern.testing.check_activation_backend)."""
    from attnkern.testing import check_activation_backend, random_activation_problem

    name, B, N, L, E, Dv, units, act, softmax = shape
    a = random_activation_problem(B=B, N=N, L=L, E=E, Dv=Dv, units=units, activation=act, softmax=softmax,
                                  layout=layout, dtype=dtype, device=device, extra_rows=1)
    passed, errors, why = check_activation_backend(backend, a)
    short = {"out": errors.get("out", float("nan")), "dq": errors.get("query", float("nan")),
             "dk": errors.get("key", float("nan")), "dv": errors.get("value", float("nan")),
             "dW": max([v for k, v in errors.items() if k not in ("out", "query", "key", "value")] or [float("nan")])}
    return Result(backend, device, layout, str(dtype).split(".")[-1], name, short, passed, why[:80])


# Sequence self-attention: (name, row lengths, options of random_sequence_problem); rows past
# one 64-position block, targets, contextual positions, a window, both normalizations, the
# time/position tables and a dense bias, shared K/V heads.
SEQUENCE_SHAPES = [
    ("hstu", [70, 1, 23], dict(normalization="silu", num_targets=[4, 0, 3], time=True,
                               position=True, Hb=2)),
    ("sasrec", [66, 0, 9], dict(contextual_len=2, max_attn_len=30, dense_bias=True, Hkv=1)),
]


def check_sequence_case(backend, device, layout, dtype, shape) -> Result:
    """One sequence_attention row (run on `device`, compared on the CPU): out and the gradients
    of query, key, value and of the tables / dense bias (dW) against the row-by-row float64
    oracle (attnkern.sequence_testing.check_sequence_backend)."""
    from attnkern.sequence_testing import check_sequence_backend, random_sequence_problem

    name, lengths, kw = shape
    t, a = random_sequence_problem(lengths, layout="jagged" if layout == "jagged" else "padded",
                                   Dk=16, Dv=24, **kw)
    passed, errors, why = check_sequence_backend(backend, t, a, dtype,
                                                 device=None if device == "cpu" else device)
    nan = float("nan")
    short = {"out": errors.get("out", nan), "dq": errors.get("grad_query", nan),
             "dk": errors.get("grad_key", nan), "dv": errors.get("grad_value", nan),
             "dW": max([v for k, v in errors.items() if k in ("grad_time_table", "grad_position_table",
                                                              "grad_bias")] or [nan])}
    return Result(backend, device, layout, str(dtype).split(".")[-1], name, short, passed, why[:80])


# attention_topk: (name, B, N, H, Hkv, L, Dk, k[, bias kind, Hb]) on the backends with top-k
# kernels; out = the largest error of the kept scores (forward only), the row passes when the
# kept positions, their order and scores are right (attnkern.topk_testing).
TOPK_SHAPES = [
    ("topk", 4, 2, 4, 2, 45, 16, 8),
    ("topkb", 3, 3, 2, 2, 30, 7, 40, "per_query", 2),
]


def check_topk_case(backend, device, layout, dtype, shape) -> Result:
    """One attention_topk row: every query's kept positions, their order and scores against the
    float64 oracle (attnkern.topk_testing.check_topk)."""
    import attnkern
    from attnkern.topk_testing import check_topk

    name, B, N, H, Hkv, L, Dk, k = shape[:8]
    bias_kind, Hb = shape[8:] if len(shape) > 8 else (None, None)
    args, kw = testing.make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=1, dtype=dtype, layout=layout,
                                    device=device, extra_rows=1, bias=bias_kind, bias_heads=Hb)
    bias = args[3] if bias_kind else None

    def run(q, key, k, **kw):
        return attnkern.attention_topk(q, key, k, backend=backend, **kw)
    errors = {}
    fails = check_topk(run, args[0], args[1], k, kw, bias=bias, errors=errors)
    nan = float("nan")  # forward only: no gradient columns
    return Result(backend, device, layout, str(dtype).split(".")[-1], name,
                  {"out": errors.get("scores", nan), "dq": nan, "dk": nan, "dv": nan}, not fails,
                  (fails[0] if fails else "")[:80])


def _row(check, backend, dev, layout, dt, shape, dw=False) -> Result:
    """Runs one case (a crash is a failure, reported with its message) and prints its row; dw:
    also the largest weight/bias/activation gradient error."""
    try:
        r = check(backend, dev, layout, dt, shape)
    except Exception as exc:
        r = Result(backend, dev, layout, str(dt).split(".")[-1], shape[0], {}, False,
                   "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0][:80]))
    e = r.errors
    extra = " dW %.2e" % e.get("dW", float("nan")) if dw else ""
    print("%-9s %-6s %-8s %-9s %-6s %10.2e %10.2e %10.2e %10.2e  %s%s %s" % (
        r.backend, r.device, r.layout, r.dtype, r.shape, e.get("out", float("nan")),
        e.get("dq", float("nan")), e.get("dk", float("nan")), e.get("dv", float("nan")),
        "PASS" if r.passed else "FAIL", extra, r.note), flush=True)
    return r


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
    if args.device and "cuda" in args.device and not torch.cuda.is_available():
        parser.error("argument --device: cuda needs a CUDA GPU and none is visible here (torch "
                     "%s, CUDA build %s); accepted here: cpu" % (torch.__version__, torch.version.cuda))

    import attnkern

    backends = args.backend or [b for b in ("cpu", "cuda", "triton") if attnkern.backends()[b].available]
    if not backends:
        backends = ["reference"]
    devices = args.device or ["cpu", "cuda"]
    dtypes = [DTYPES[d] for d in (args.dtype or ["float32", "float16", "bfloat16", "float64"])]
    shapes = SHAPES[:1] if args.quick else SHAPES

    results, skipped, no_bias = [], [], set()
    header = "%-9s %-6s %-8s %-9s %-6s %10s %10s %10s %10s  %s" % (
        "backend", "device", "layout", "dtype", "shape", "out", "dq", "dk", "dv", "result")
    print(header)
    print("-" * len(header))
    t0 = time.time()
    for dev, backend, dt in _plan(backends, devices, dtypes):
        if dev is None:
            skipped.append((backend, dt))
            continue
        bias_shapes = BIAS_SHAPES[:1] if args.quick else BIAS_SHAPES
        if backend not in BIAS_BACKENDS:
            bias_shapes = []
            no_bias.add(backend)
        for layout, shape in itertools.product(LAYOUTS, shapes + bias_shapes):
            results.append(_row(check_case, backend, dev, layout, dt, shape))
        for layout in (("lengths", "jagged") if args.quick else LAYOUTS):  # attention_weights
            results.append(_row(check_weights_case, backend, dev, layout, dt, WEIGHTS_SHAPES[0]))
    # activation_unit_pool rows (dW: the largest error of the weight/bias/activation gradients)
    from attnkern.ops import activation_kernels_missing

    au_shapes = ACTIVATION_SHAPES[:1] if args.quick else ACTIVATION_SHAPES
    no_kernels = set()
    for dev, backend, dt in _plan(backends, devices, dtypes):
        if dev is None:
            continue
        if backend != "reference" and activation_kernels_missing(backend):
            no_kernels.add(backend)
            continue
        for layout, shape in itertools.product(LAYOUTS, au_shapes):
            results.append(_row(check_activation_case, backend, dev, layout, dt, shape, dw=True))
    for backend in sorted(no_kernels):
        print("skipped activation_unit_pool on backend %s: no kernels for it in this build" % backend)
    for backend in sorted(no_bias):
        print("skipped the bias rows on backend %s: it has no score-bias path yet" % backend)
    # sequence_attention rows, on CPU tensors (dW: the largest table / dense-bias gradient error)
    from attnkern.ops.sequence import sequence_kernels_missing

    seq_shapes = SEQUENCE_SHAPES[:1] if args.quick else SEQUENCE_SHAPES
    for dev, backend, dt in _plan(backends, ["cpu"] if "cpu" in devices else [], dtypes):
        if dev is None or (backend != "reference" and sequence_kernels_missing(backend)):
            continue
        if backend in ("cuda", "triton") and dt == torch.float64:
            continue
        for layout, shape in itertools.product(("jagged", "lengths"), seq_shapes):
            results.append(_row(check_sequence_case, backend, dev, layout, dt, shape, dw=True))
    # the cuda backend's sequence rows: CUDA tensors on a GPU, CPU tensors in the emulation build
    cuda_info = attnkern.backends()["cuda"]
    cuda_dev = "cpu" if cuda_info.emulated else "cuda"
    if "cuda" in backends and cuda_info.available and cuda_dev in devices and \
            not sequence_kernels_missing("cuda"):
        for dt, layout, shape in itertools.product(dtypes, ("jagged", "lengths"), seq_shapes):
            if dt != torch.float64:
                results.append(_row(check_sequence_case, "cuda", cuda_dev, layout, dt, shape,
                                    dw=True))
    # attention_topk rows (forward only), on the backends with top-k kernels
    from attnkern.topk import TOPK_BACKENDS

    topk_shapes = TOPK_SHAPES[:1] if args.quick else TOPK_SHAPES
    for dev, backend, dt in _plan([b for b in backends if b in TOPK_BACKENDS], devices, dtypes):
        if dev is None:
            continue
        for layout, shape in itertools.product(LAYOUTS, topk_shapes):
            results.append(_row(check_topk_case, backend, dev, layout, dt, shape))
    for backend, reason in skipped:
        print("skipped backend %s: %s" % (backend, reason))
    if not results:
        # Every backend asked for was skipped, or runs on none of the devices asked for.
        parser.error("nothing to check for --backend %s on --device %s (cpu runs on cpu, cuda on "
                     "cuda, triton on cuda where a GPU is visible, else on cpu)"
                     % (",".join(backends), ",".join(devices)))
    failed = sum(not r.passed for r in results)
    print("%d passed, %d failed  (%.1f s; max abs errors vs the float64 reference)" % (
        len(results) - failed, failed, time.time() - t0))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
