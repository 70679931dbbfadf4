"""`attnkern bench`: every attention-pooling backend against every PyTorch alternative, as a
fraction of this machine's memory limit.

    attnkern bench                      # quick default set (fp32, 3 shapes, fwd and fwd+bwd)
    attnkern bench --full               # every shape, uniform and full lengths, fp32 and bf16
    attnkern bench --device cuda --dtype bfloat16 --out runs/bench-gpu
    attnkern bench --family activation  # DIN's activation unit (bench/activation.py, own options)
    attnkern bench --family layer       # the layer and a model training step (bench/layers.py)
    attnkern bench --family serving     # many candidates per history (bench/serving.py, own options)
    attnkern bench --family sequence    # sequence self-attention (bench/sequence.py, own options)

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
against a float64 oracle on the non-empty rows, by the tolerance rule of attnkern.testing; a
mismatch is marked in the table and makes the command exit non-zero.

Modules: cases (shapes, inputs, bytes, oracle), providers (the callables), timing (measurement
and one case's records), report (table, markdown, CSV, plot); the command line is here.

The case definitions, providers and measurement are importable so that the pytest-benchmark
suite in benchmarks/ runs the very same cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List

import torch

# Re-exported: `attnkern.tools.bench` is the one name benchmarks/ and the tests import.
from .._args import non_negative_float
from .cases import (BASELINES, DTYPES, FULL_SHAPES, LENGTHS, MODES, OP, PROVIDERS,  # noqa: F401
                    QUICK_SHAPES, SHAPES, Case, Inputs, Oracle, Shape, bytes_moved, flops,
                    full_cases, make_cases, make_inputs, make_oracle, quick_cases, tiny_cases)
from .providers import (CaseSetup, Unavailable, forward_fn, limit_callable,  # noqa: F401
                        make_callable, provider_status, setup_case)
from .report import format_markdown, format_table, plot_results, write_csv  # noqa: F401
from .timing import environment, peak_memory, run_case, time_call  # noqa: F401

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


FAMILIES = ("op", "activation", "layer", "serving", "sequence")
# `--op NAME`, the older spelling of the two op families, still selects them.
OP_FAMILIES = {"attention_pool": "op", "activation_unit_pool": "activation"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="attnkern bench",
        description="Time attention pooling on every available backend and the PyTorch "
                    "alternatives; print a table, write JSON, CSV, markdown and a PNG plot.")
    p.add_argument("--family", choices=FAMILIES, default="op",
                   help="op: attention_pool against the PyTorch alternatives (default); "
                        "activation: activation_unit_pool (DIN's activation unit) against "
                        "FuxiCTR's DIN_Attention and its torch.compile (its own options: "
                        "--family activation --help); layer: AttentionPooling against an eager "
                        "FuxiCTR-style layer and nn.MultiheadAttention, and a TargetAttentionCTR "
                        "training step; serving: many candidates per history (its own options: "
                        "--family serving --help); sequence: sequence_attention against "
                        "generative-recommenders' PyTorch HSTU math, SDPA, FlexAttention, FBGEMM "
                        "(its own options: --family sequence --help). --op "
                        "attention_pool|activation_unit_pool is "
                        "an older spelling of --family op|activation")
    p.add_argument("--op", choices=tuple(OP_FAMILIES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true",
                   help="every shape, uniform and full lengths, float32 and bfloat16 (long); "
                        "with --family layer every shape of the layer grid")
    p.add_argument("--layer-shape", action="append", default=None, metavar="B,E,H,L,N",
                   help="--family layer: a layer shape (repeatable; default: the quick set)")
    p.add_argument("--no-model", action="store_true",
                   help="--family layer: skip the model training step")
    p.add_argument("--rounds", type=int, default=5,
                   help="--family layer: timing rounds (each times every provider 3 times)")
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
    p.add_argument("--budget", type=non_negative_float, default=None,
                   help="seconds of repeats per measurement (default 0.25; --full 1.0)")
    p.add_argument("--out", default=os.path.join("runs", "bench"),
                   help="output folder for bench.json, bench.jsonl (one record a line, appended per case), bench.csv, bench.md, bench.png")
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


def _append_records(path: str, records: List[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, records: List[dict]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def _family(argv):
    """The family argv selects, and argv without it (the activation and serving families parse
    the rest with their own options)."""
    p = argparse.ArgumentParser(prog="attnkern bench", add_help=False)
    p.add_argument("--family", choices=FAMILIES, default=None)
    p.add_argument("--op", choices=tuple(OP_FAMILIES), default=None)
    known, rest = p.parse_known_args(argv)
    if known.family and known.op and OP_FAMILIES[known.op] != known.family:
        p.error("--op %s is --family %s, not --family %s" % (
            known.op, OP_FAMILIES[known.op], known.family))
    return known.family or OP_FAMILIES.get(known.op, "op"), rest


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    family, rest = _family(argv)
    if family == "activation":
        from . import activation

        return activation.main(rest)
    if family == "serving":
        from . import serving

        return serving.main(rest)
    if family == "sequence":
        from . import sequence

        return sequence.main(rest)
    args = build_parser().parse_args(argv)
    args.family = family
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
    if args.family == "layer":
        return _main_layer(args, argv, device)
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
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, "bench." + ext)
             for ext in ("json", "jsonl", "csv", "md", "png")}
    # Written as it goes: every case's records are appended to bench.jsonl (one JSON object a
    # line) and bench.json is rewritten as soon as the case is measured, so a run stopped
    # at a time limit keeps every case it finished.
    open(paths["jsonl"], "w").close()
    tty = sys.stderr.isatty()
    t_all = time.perf_counter()
    for i, case in enumerate(cases, 1):
        t_case = time.perf_counter()
        prefix = "[%*d/%d] %s" % (len(str(len(cases))), i, len(cases), case.id)

        def progress(what, prefix=prefix):
            if tty:  # a live status line; a log gets the one "done" line per case
                print("\r\033[K%s: %s" % (prefix, what), end="", file=sys.stderr, flush=True)

        setup = setup_case(case, device)
        case_records = run_case(setup, providers, env, budget_s=budget, progress=progress)
        records.extend(case_records)
        _append_records(paths["jsonl"], case_records)
        _write_json(paths["json"], records)
        print("%s%s: done in %.1fs" % ("\r\033[K" if tty else "", prefix, time.perf_counter() - t_case),
              file=sys.stderr, flush=True)
        del setup
    elapsed = time.perf_counter() - t_all

    print(format_table(records))
    _write_json(paths["json"], records)
    write_csv(records, paths["csv"])
    cmd = "attnkern bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(paths["md"], "w") as f:
        f.write("Command: `%s` (%.0f s) on %s, torch %s, %d threads\n\n" % (
            cmd.strip(), elapsed, env["device_name"], env["torch_version"], env["threads"]))
        f.write(format_markdown(records))
    written = [paths["json"], paths["jsonl"], paths["csv"], paths["md"]]
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
        return 1
    return 0


def _main_layer(args, argv, device) -> int:
    """`attnkern bench --family layer`: see attnkern/tools/bench/layers.py."""
    from . import layers

    if device.type != "cpu":
        print("attnkern bench: --family layer runs on CPU only for now", file=sys.stderr)
        return 2
    try:
        shapes = ([layers.parse_layer_shape(t) for t in args.layer_shape] if args.layer_shape
                  else list(layers.FULL_LAYER_SHAPES if args.full else layers.QUICK_LAYER_SHAPES))
    except ValueError as e:
        print("attnkern bench: --layer-shape: %s" % e, file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("attnkern bench: --rounds must be >= 1", file=sys.stderr)
        return 2
    env = environment(device)
    print("attnkern bench: layer family, %d shapes x %s%s on %s, torch %s, %d threads" % (
        len(shapes), ",".join(args.modes or layers.MODES), "" if args.no_model else " + model step",
        env["device_name"], env["torch_version"], env["threads"]), file=sys.stderr)
    t0 = time.perf_counter()
    records = layers.run_family(
        shapes, args.modes or layers.MODES, env, model=not args.no_model, rounds=args.rounds,
        progress=lambda what: print("attnkern bench: %s" % what, file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    table = layers.format_layer_markdown(records)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, "layer." + ext) for ext in ("json", "md")]
    with open(paths[0], "w") as f:
        json.dump(records, f, indent=1)
    cmd = "attnkern bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(paths[1], "w") as f:
        f.write("Command: `%s` (%.0f s) on %s, torch %s, %d threads, load average %s\n\n" % (
            cmd.strip(), elapsed, env["device_name"], env["torch_version"], env["threads"],
            "%.1f" % env["load_avg"] if env["load_avg"] is not None else "?"))
        f.write(table)
    print("attnkern bench: %.0f s; wrote %s" % (elapsed, ", ".join(paths)), file=sys.stderr)
    bad = [r for r in records if r["family"] == "layer" and not r["max_abs_err"] <= 1e-3]
    if bad:
        print("attnkern bench: layer outputs disagree: %s" % ", ".join(
            "%s %s (%.3g)" % (r["provider"], r["shape"]["name"], r["max_abs_err"]) for r in bad),
            file=sys.stderr)
        return 1
    return 0
