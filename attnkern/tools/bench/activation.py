"""Benchmark of activation-unit pooling (DIN attention) against FuxiCTR's DIN_Attention.

    attnkern bench --family activation          # B=1024 L=200 E=64, units (64,) and (80, 40)
    attnkern bench --family activation --quick  # a small case (smoke)

Providers:

    eager      FuxiCTR's DIN_Attention written eagerly below (concatenate [q, k, q - k, q * k],
               MLP over [B * L, 4E], mask, weighted sum): what the zoos run
    compile    torch.compile (inductor) of that module; compile time reported apart
    reference  attnkern.activation_unit_pool(..., backend="reference")
    cpu        attnkern's fused CPU kernels (backend="cpu")

Every history is full (all L positions valid), so the eager layer does no wasted work on
padding. Providers are timed in alternation, median of the repetitions, in one process, and
each one's output (and gradients) is checked against the reference once before timing.

FLOPs are those of the fused formulation (the first layer split into a per-query matrix; the
zoo's concatenated first layer does 4x more): per query and valid key 2 * H1 * E + 2 * H1 * H2
+ 2 * H_last + 2 * Dv forward, and 3x that more for the backward (recompute, input and weight
gradients). The machine's peak is a float32 GEMM (torch.mm, 2048^3) measured in the same run.

Peak extra memory (Linux): each provider runs forward+backward once in a fresh process; extra =
peak resident memory (VmHWM, reset right before the call) minus the resident memory with the
inputs built. "workspace" subtracts what every provider must allocate (the output and the
gradients of query, keys and the first layer's weight).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

PROVIDERS = ("eager", "compile", "reference", "cpu")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    B: int
    L: int
    E: int
    units: tuple
    activation: str = "relu"

    @property
    def id(self) -> str:
        return "B%d-L%d-E%d-units%s" % (self.B, self.L, self.E, "x".join(map(str, self.units)))


DEFAULT_CASES = (Case(1024, 200, 64, (64,)), Case(1024, 200, 64, (80, 40)))
QUICK_CASES = (Case(64, 50, 16, (16,)), Case(64, 50, 16, (12, 8)))


class DINAttention(nn.Module):
    """FuxiCTR's DIN_Attention (MLP_Block with ReLU, no batch norm or dropout, raw weights)."""

    def __init__(self, embedding_dim: int, attention_units: Sequence[int]):
        super().__init__()
        self.embedding_dim = embedding_dim
        layers, width = [], 4 * embedding_dim
        for units in attention_units:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        layers.append(nn.Linear(width, 1))
        self.attention_layer = nn.Sequential(*layers)

    def forward(self, target_item, history_sequence, mask):
        seq_len = history_sequence.size(1)
        target_item = target_item.unsqueeze(1).expand(-1, seq_len, -1)
        attention_input = torch.cat([target_item, history_sequence, target_item - history_sequence,
                                     target_item * history_sequence], dim=-1)
        attention_weight = self.attention_layer(attention_input.view(-1, 4 * self.embedding_dim))
        attention_weight = attention_weight.view(-1, seq_len) * mask.float()
        return (attention_weight.unsqueeze(-1) * history_sequence).sum(dim=1)


def flops(case: Case, mode: str) -> int:
    h = case.units
    per = 2 * h[0] * case.E + (2 * h[0] * h[1] if len(h) == 2 else 0) + 2 * h[-1] + 2 * case.E
    return case.B * case.L * per * (1 if mode == "fwd" else 4)


def build(case: Case, seed: int = 0):
    """Inputs (leaves) and the eager module with random weights."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.E, generator=g)
    k = torch.randn(case.B, case.L, case.E, generator=g)
    lengths = torch.full((case.B,), case.L, dtype=torch.int64)
    mask = torch.ones(case.B, case.L, dtype=torch.long)
    torch.manual_seed(seed)
    module = DINAttention(case.E, case.units)
    return q, k, lengths, mask, module


def provider_fn(provider: str, case: Case, q, k, lengths, mask, module, mode: str) -> Callable:
    """A callable running the provider once (forward, or forward+backward), returning
    (out, grads) with grads = (dq, dk, dW1) for fwd+bwd."""
    from attnkern.nn import ActivationUnitPooling

    if provider in ("eager", "compile"):
        f = module if provider == "eager" else torch.compile(module)
        params = [module.attention_layer[0].weight]

        def fwd():
            return f(q, k, mask)
    else:
        pool = ActivationUnitPooling(case.E, case.units, case.activation, backend=provider)
        pool.load_mlp_([m for m in module.modules() if isinstance(m, nn.Linear)])
        params = [pool.hidden[0].weight]

        def fwd():
            return pool(q, k, lengths=lengths)

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fwd(), ()
        return run
    leaves = [q, k] + params

    def run_bwd():
        for x in (q, k):
            x.requires_grad_(True)
        out = fwd()
        grads = torch.autograd.grad(out.sum(), leaves)
        return out.detach(), grads
    return run_bwd


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error. Not the max error: at this size a few float32 pre-activations
    lie within rounding of ReLU's kink, where any two float32 implementations may take different
    sides and so disagree on that key's (and query's) gradient outright."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def measure_peak_gemm(reps: int = 5, n: int = 2048) -> float:
    """float32 GEMM FLOP/s (the best of reps n^3 torch.mm): this machine's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def time_alternating(fns: Dict[str, Callable], reps: int) -> Dict[str, List[float]]:
    times = {p: [] for p in fns}
    for _ in range(reps):
        for p, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[p].append(time.perf_counter() - t)
    return times


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def memory_child(provider: str, case: Case) -> dict:
    """Runs in a fresh process (Linux): peak extra resident memory of one fwd+bwd. The peak
    (VmHWM) is reset through /proc/self/clear_refs right before the call, so imports, input
    building and compilation do not count."""
    q, k, lengths, mask, module = build(case)
    fn = provider_fn(provider, case, q, k, lengths, mask, module, "fwd+bwd")
    if provider == "compile":
        fn()  # compile first (its memory is not the layer's)
    import gc

    gc.collect()
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out, grads = fn()
    peak = _status_bytes("VmHWM")
    unavoidable = out.numel() * 4 + sum(g.numel() * 4 for g in grads)
    return {"provider": provider, "extra_bytes": max(0, peak - base), "unavoidable_bytes": unavoidable,
            "reliable": True}


def measure_memory(provider: str, case: Case) -> dict:
    code = ("import json, sys; from attnkern.tools.bench.activation import memory_child, Case; "
            "print(json.dumps(memory_child(%r, Case(%d, %d, %d, %r))))"
            % (provider, case.B, case.L, case.E, tuple(case.units)))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        return {"provider": provider, "error": res.stderr[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_case(case: Case, providers: Sequence[str], reps: int, peak: float, memory: bool) -> List[dict]:
    import attnkern

    records = []
    avail = [p for p in providers if p not in ("reference", "cpu") or attnkern.backends()[p].available]
    for mode in MODES:
        q, k, lengths, mask, module = build(case)
        fns, compile_s = {}, None
        for p in avail:
            fns[p] = provider_fn(p, case, q, k, lengths, mask, module, mode)
            t = time.perf_counter()
            out, grads = fns[p]()  # warm-up (and compile)
            if p == "compile":
                compile_s = time.perf_counter() - t
            if p == "eager":
                ref_out, ref_grads = out, grads
            else:
                err = max([rel_error(a, b) for a, b in zip((out,) + tuple(grads), (ref_out,) + tuple(ref_grads))])
                assert err < 1e-3, "%s disagrees with eager: relative error %.3g" % (p, err)
        times = time_alternating(fns, reps)
        nfl = flops(case, mode)
        med = {p: statistics.median(t) for p, t in times.items()}
        for p in avail:
            r = {"op": "activation_unit_pool", "case": case.id, "mode": mode, "provider": p,
                 "median_ms": med[p] * 1e3, "gflops": nfl / med[p] / 1e9, "peak_fraction": nfl / med[p] / peak,
                 "speedup_vs_eager": med.get("eager", float("nan")) / med[p],
                 "speedup_vs_compile": med.get("compile", float("nan")) / med[p], "reps": reps}
            if p == "compile":
                r["compile_s"] = compile_s
            records.append(r)
    if memory:
        mem = {p: measure_memory(p, case) for p in avail}
        eager_extra = mem.get("eager", {}).get("extra_bytes")
        for r in records:
            if r["mode"] == "fwd+bwd":
                m = mem[r["provider"]]
                r["extra_mb"] = m.get("extra_bytes", float("nan")) / 2 ** 20
                r["workspace_mb"] = max(0, m.get("extra_bytes", 0) - m.get("unavoidable_bytes", 0)) / 2 ** 20
                r["memory_vs_eager"] = (m.get("extra_bytes", float("nan")) / eager_extra) if eager_extra else float("nan")
                r["memory_reliable"] = m.get("reliable", False)
    return records


def format_table(records: Sequence[dict], peak: float) -> str:
    lines = ["GEMM peak (torch.mm 2048^3 fp32, this run): %.1f GFLOP/s, %d threads" % (peak / 1e9, torch.get_num_threads()),
             "%-24s %-8s %-10s %10s %8s %7s %9s %11s %9s %12s %9s" % (
                 "case", "mode", "provider", "median ms", "GFLOP/s", "% peak", "x eager", "x compile",
                 "extra MB", "workspace MB", "mem/eager")]
    for r in records:
        mem = ("%9.0f %12.1f %9.3f" % (r["extra_mb"], r["workspace_mb"], r["memory_vs_eager"])
               if "extra_mb" in r else "%9s %12s %9s" % ("", "", ""))
        lines.append("%-24s %-8s %-10s %10.1f %8.1f %6.1f%% %9.2f %11.2f %s" % (
            r["case"], r["mode"], r["provider"], r["median_ms"], r["gflops"], 100 * r["peak_fraction"],
            r["speedup_vs_eager"], r["speedup_vs_compile"], mem))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnkern bench --family activation", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small cases (smoke test)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory subprocesses")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    args = p.parse_args(argv)
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    providers = [x for x in args.providers.split(",") if x]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        p.error("unknown providers %s; choose from %s" % (bad, ",".join(PROVIDERS)))
    if args.memory_only:
        for c in cases:
            for prov in providers:
                m = measure_memory(prov, c)
                print("%-26s %-10s extra %8.1f MB  unavoidable %8.1f MB" % (
                    c.id, prov, m.get("extra_bytes", float("nan")) / 2 ** 20,
                    m.get("unavoidable_bytes", float("nan")) / 2 ** 20), m.get("error", ""), flush=True)
        return 0
    peak = measure_peak_gemm()
    records = []
    for c in cases:
        records += run_case(c, providers, args.reps, peak, not args.no_memory)
    peak = max(peak, measure_peak_gemm())
    for r in records:
        r["peak_fraction"] = r["gflops"] * 1e9 / peak
        r["peak_gflops"] = peak / 1e9
    print(format_table(records, peak))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
