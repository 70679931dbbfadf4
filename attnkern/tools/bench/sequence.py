"""`attnkern bench --family sequence`: sequence self-attention (`attnkern.sequence_attention`)
against what a user would run instead, on jagged training batches and the serving shape.

    attnkern bench --family sequence                # B=128, L=200, fp32, softmax and SiLU
    attnkern bench --family sequence --full         # + L=1000, bf16, 1 target
    attnkern bench --family sequence --serving      # one user: L=2048 history + 1024 candidates
    attnkern bench --family sequence --quick        # tiny shapes (smoke)

A case: B rows of lengths uniform in [1, L] (jagged [T, H, D] inputs with offsets), H heads of
D, causal, the last ``targets`` positions of each row candidates (each sees the history and
itself), with or without the relative time + position bias (HSTU's: 128 log-bucketed time
gaps and a position table of L rows, one column shared by the heads), softmax or SiLU.

Providers (each skipped with its reason where it cannot run the case):

    eager       generative-recommenders' PyTorch HSTU reference, re-implemented: pad the rows
                to [B, H, N, N] scores, add the dense bias that its
                RelativeBucketedTimeAndPositionBasedBias builds, SiLU / N (or softmax), multiply
                by its _get_valid_attn_mask, back to jagged
    compile     torch.compile of eager (compile time reported apart)
    sdpa        scaled_dot_product_attention on the padded batch: the mask (and bias) as a float
                mask [B, 1, N, N] built from the tables; softmax only
    sdpa_causal SDPA on the padded batch with is_causal=True and no mask (no bias; with more
                than one target it lets candidates see each other: timed, not checked)
    sdpa_rows   SDPA called row by row on the jagged rows (is_causal, or the row's float mask
                with a bias or several targets); softmax only
    flex        FlexAttention (torch.compile'd) with a block mask of the rows and the target
                rule and a score_mod reading the tables; softmax only, where it compiles
    fbgemm      FBGEMM's CPU jagged attention, fbgemm_gpu.sll's
                sll_jagged_flash_attention_basic(use_mask=True), one call per head: a softmax
                over the whole row, / max_seq_len, then a triangular mask (no bias, no target
                rule): different math, timed for its cost and not checked
    reference   attnkern.sequence_attention(backend="reference")
    cpu         attnkern's fused CPU kernels

Each provider's output (and, for fwd+bwd, its gradients w.r.t. q, k, v and the tables) is
checked once against the float64 reference before timing. Providers are timed alternating,
round by round, in one process; the table gives medians and the ratios of medians measured in
that run. FLOPs count the attended pairs only (q.k and p.v, 2 D FLOP each per pair and head;
fwd+bwd 3.5x the forward); "% peak" is against torch.mm in the case's dtype (float32 or
bfloat16, 2048 x 2048) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .activation import measure_peak_gemm

PROVIDERS = ("eager", "compile", "sdpa", "sdpa_causal", "sdpa_rows", "flex", "fbgemm",
             "reference", "cpu")
MODES = ("fwd", "fwd+bwd")
SOFTMAX_ONLY = ("sdpa", "sdpa_causal", "sdpa_rows", "flex", "fbgemm")
UNCHECKED = ("fbgemm",)  # different math: timed for cost only
NUM_TIME_BUCKETS = 128


@dataclass(frozen=True)
class Case:
    B: int
    L: int  # lengths uniform in [1, L] (serving: every row exactly L)
    H: int
    D: int
    dtype: str
    bias: bool
    targets: int
    normalization: str
    mode: str
    full_rows: bool = False

    @property
    def id(self) -> str:
        return "B%d-L%d%s-H%d-D%d-%s-%s-t%d-%s-%s" % (
            self.B, self.L, "full" if self.full_rows else "", self.H, self.D, self.dtype,
            "bias" if self.bias else "nobias", self.targets, self.normalization, self.mode)


GRIDS = {
    # B, L, dtype, bias, targets, normalization, mode (, H, D, full_rows)
    "default": dict(B=[128], L=[200], dtype=["float32"], bias=[False, True], targets=[16],
                    normalization=["softmax", "silu"], mode=list(MODES)),
    "full": dict(B=[128], L=[200, 1000], dtype=["float32", "bfloat16"], bias=[False, True],
                 targets=[1, 16], normalization=["softmax", "silu"], mode=list(MODES)),
    # One user: 2048 history actions and 1024 candidates, ranked (forward only).
    "serving": dict(B=[1], L=[3072], dtype=["float32", "bfloat16"], bias=[False, True],
                    targets=[1024], normalization=["softmax", "silu"], mode=["fwd"],
                    full_rows=True),
    "quick": dict(B=[4], L=[12], dtype=["float32"], bias=[False, True], targets=[3],
                  normalization=["softmax", "silu"], mode=list(MODES), H=2, D=8),
}


def make_cases(grid: str = "default", **override) -> List[Case]:
    """Every combination of a grid's values, with `override` replacing some of its lists."""
    g = dict(GRIDS[grid], **{k: v for k, v in override.items() if v})
    return [Case(B, L, g.get("H", 2), g.get("D", 64), dt, bias, t, norm, mode,
                 g.get("full_rows", False))
            for B in g["B"] for L in g["L"] for dt in g["dtype"] for bias in g["bias"]
            for t in g["targets"] for norm in g["normalization"] for mode in g["mode"]]


# ---------------------------------------------------------------------------- inputs


class Inputs:
    def __init__(self, case: Case, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dtype = getattr(torch, case.dtype)
        B, L, H, D = case.B, case.L, case.H, case.D
        self.case = case
        self.lengths = (torch.full((B,), L, dtype=torch.long) if case.full_rows
                        else torch.randint(1, L + 1, (B,), generator=g))
        self.offsets = torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)])
        self.N = int(self.lengths.max())
        T = int(self.offsets[-1])
        self.T = T
        self.num_targets = torch.minimum(self.lengths, torch.full_like(self.lengths, case.targets))
        self.q = (torch.randn(T, H, D, generator=g) * 0.5).to(dtype)
        self.k = (torch.randn(T, H, D, generator=g) * 0.5).to(dtype)
        self.v = torch.randn(T, H, D, generator=g).to(dtype)
        self.grad_out = torch.randn(T, H, D, generator=g).to(dtype)
        if case.bias:
            gaps = torch.exp(torch.rand(T, generator=g, dtype=torch.float64) * 14).long()
            self.times = gaps.cumsum(0)  # increasing within each row (rows share one clock)
            self.time_table = (torch.randn(NUM_TIME_BUCKETS, 1, generator=g) * 0.3).to(dtype)
            self.position_table = (torch.randn(L, 1, generator=g) * 0.3).to(dtype)
        else:
            self.times = self.time_table = self.position_table = None
        rows = self.lengths.double()
        h = rows - self.num_targets.double()
        # Attended (query, key) pairs: the causal history and each candidate's history + itself.
        self.pairs = float((h * (h + 1) / 2 + self.num_targets.double() * (h + 1)).sum())

    def leaves(self, mode):
        """Fresh leaves (q, k, v, time_table, position_table) for one call."""
        out = []
        for t in (self.q, self.k, self.v, self.time_table, self.position_table):
            if t is None:
                out.append(None)
            else:
                out.append(t.detach().requires_grad_(mode == "fwd+bwd"))
        return out

    def kwargs(self):
        c = self.case
        kw = dict(offsets=self.offsets, max_length=self.N, causal=True,
                  num_targets=self.num_targets, normalization=c.normalization)
        if c.normalization == "silu":
            kw["attn_scale"] = 1.0 / self.N
        return kw


def flops(inp: Inputs, mode: str) -> float:
    per_pair = 4.0 * inp.case.D * inp.case.H  # q.k and p.v: 2 D FLOP each, per head
    return inp.pairs * per_pair * (1.0 if mode == "fwd" else 3.5)


# ---------------------------------------------------------------------------- the dense formulation


def _pad(x, offsets, N):
    """Jagged [T, H, D] -> padded [B, H, N, D] (zeros past each row), differentiable."""
    lengths = offsets[1:] - offsets[:-1]
    valid = torch.arange(N)[None, :] < lengths[:, None]
    out = x.new_zeros((lengths.numel(), N) + tuple(x.shape[1:]))
    out = out.index_put(valid.nonzero(as_tuple=True), x)
    return out.transpose(1, 2), valid


def _dense_bias(inp: Inputs, tt, pt, N):
    """[B, N, N] bias as RelativeBucketedTimeAndPositionBasedBias builds it, from the tables."""
    from attnkern.reference import time_bucket_ref

    lengths = inp.lengths
    B = lengths.numel()
    valid = torch.arange(N)[None, :] < lengths[:, None]
    ts = inp.times.new_zeros(B, N).index_put(valid.nonzero(as_tuple=True), inp.times)
    pos = torch.arange(N)
    d = (pos[:, None] - pos[None, :]).abs().clamp(max=pt.shape[0] - 1)
    buckets = time_bucket_ref(ts[:, :, None] - ts[:, None, :], tt.shape[0])
    return pt[d, 0].unsqueeze(0) + tt[buckets, 0]


def _dense_mask(inp: Inputs, N):
    from attnkern.reference import sequence_mask_ref

    return sequence_mask_ref(inp.lengths, N, True, inp.num_targets)  # [B, N, N]


def eager_fn(inp: Inputs):
    """generative-recommenders' padded formulation (pt_hstu_attention.pytorch_hstu_mha, and its
    research layer's dense bias), softmax or SiLU."""
    c = inp.case
    N = inp.N
    scale = 1.0 / math.sqrt(c.D)

    def run(q, k, v, tt, pt):
        pq, valid = _pad(q, inp.offsets, N)
        pk, _ = _pad(k, inp.offsets, N)
        pv, _ = _pad(v, inp.offsets, N)
        s = torch.einsum("bhxa,bhya->bhxy", pq, pk) * scale
        if c.bias:
            s = s + _dense_bias(inp, tt, pt, N).unsqueeze(1).to(s.dtype)
        mask = _dense_mask(inp, N).unsqueeze(1)
        if c.normalization == "silu":
            p = F.silu(s) / N * mask
        else:
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
        o = torch.einsum("bhxy,bhyv->bhxv", p, pv)
        return o.transpose(1, 2)[valid]
    return run


def sdpa_fn(inp: Inputs, causal_only: bool):
    c = inp.case
    N = inp.N

    def run(q, k, v, tt, pt):
        pq, valid = _pad(q, inp.offsets, N)
        pk, _ = _pad(k, inp.offsets, N)
        pv, _ = _pad(v, inp.offsets, N)
        if causal_only:
            o = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True)
        else:
            mask = _dense_mask(inp, N) | ~valid[:, :, None]  # padded queries: any finite row
            m = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            if c.bias:
                m = m + _dense_bias(inp, tt, pt, N).to(q.dtype)
            o = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=m.unsqueeze(1))
        return o.transpose(1, 2)[valid]
    return run


def sdpa_rows_fn(inp: Inputs):
    c = inp.case
    from attnkern.reference import sequence_mask_ref, time_bucket_ref

    bounds = inp.offsets.tolist()
    nts = inp.num_targets.tolist()

    def run(q, k, v, tt, pt):
        outs = []
        for b in range(len(bounds) - 1):
            s0, s1 = bounds[b], bounds[b + 1]
            n = s1 - s0
            qb, kb, vb = (x[s0:s1].transpose(0, 1) for x in (q, k, v))
            if not c.bias and nts[b] <= 1:
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
            else:
                mask = sequence_mask_ref(torch.tensor([n]), n, True, torch.tensor([nts[b]]))[0]
                m = torch.zeros((n, n), dtype=q.dtype).masked_fill(~mask, float("-inf"))
                if c.bias:
                    pos = torch.arange(n)
                    d = (pos[:, None] - pos[None, :]).abs().clamp(max=pt.shape[0] - 1)
                    t = inp.times[s0:s1]
                    m = m + (pt[d, 0] + tt[time_bucket_ref(t[:, None] - t[None, :], tt.shape[0]), 0]).to(q.dtype)
                o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)
    return run


def flex_fn(inp: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnkern.reference import time_bucket_ref

    c = inp.case
    T = inp.T
    doc = torch.repeat_interleave(torch.arange(inp.lengths.numel()), inp.lengths)
    pos = torch.arange(T) - inp.offsets[:-1][doc]
    first_target = (inp.lengths - inp.num_targets)[doc]
    times = inp.times

    def mask_mod(b, h, qi, ki):
        same = doc[qi] == doc[ki]
        hist_k = pos[ki] < first_target[ki]
        causal = pos[ki] <= pos[qi]
        return same & ((causal & hist_k) | (qi == ki))

    block_mask = create_block_mask(mask_mod, None, None, T, T, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, tt, pt):
        score_mod = None
        if c.bias:
            P = pt.shape[0]

            def score_mod(score, b, h, qi, ki):
                d = (pos[qi] - pos[ki]).abs().clamp(max=P - 1)
                bk = time_bucket_ref(times[qi] - times[ki], tt.shape[0])
                return score + pt[d, 0] + tt[bk, 0]
        o = flex(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                 v.transpose(0, 1).unsqueeze(0), score_mod=score_mod, block_mask=block_mask)
        return o[0].transpose(0, 1)
    return run


def fbgemm_fn(inp: Inputs):
    import torch as _t

    ops = _t.ops.fbgemm
    N = inp.N
    offsets = inp.offsets

    def run(q, k, v, tt, pt):
        outs = [ops.sll_jagged_flash_attention_basic(q[:, h].contiguous(), k[:, h].contiguous(),
                                                    v[:, h].contiguous(), offsets, N, True)
                for h in range(q.shape[1])]
        return torch.stack(outs, 1)
    return run


def attnkern_fn(inp: Inputs, backend: str):
    import attnkern

    kw = inp.kwargs()

    def run(q, k, v, tt, pt):
        extra = {}
        if inp.case.bias:
            extra = dict(key_times=inp.times, query_times=inp.times, time_table=tt,
                         position_table=pt)
        return attnkern.sequence_attention(q, k, v, backend=backend, **kw, **extra)
    return run


def provider_status(provider: str, case: Case) -> Optional[str]:
    """None when the provider can run the case, else why not."""
    import attnkern

    if provider in SOFTMAX_ONLY and case.normalization != "softmax":
        return "softmax only"
    if provider in ("sdpa_causal", "fbgemm") and case.bias:
        return "no bias"
    if provider == "fbgemm":
        from attnkern.tools._fbgemm import status_with

        return status_with("fbgemm_gpu.sll")
    if provider == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return "no FlexAttention (%s)" % e
    if provider in ("reference", "cpu"):
        info = attnkern.backends()[provider]
        if not info.available:
            return info.reason
    return None


def make_fn(provider: str, inp: Inputs) -> Callable:
    if provider == "eager":
        return eager_fn(inp)
    if provider == "compile":
        return torch.compile(eager_fn(inp), dynamic=False)
    if provider in ("sdpa", "sdpa_causal"):
        return sdpa_fn(inp, causal_only=provider == "sdpa_causal")
    if provider == "sdpa_rows":
        return sdpa_rows_fn(inp)
    if provider == "flex":
        return flex_fn(inp)
    if provider == "fbgemm":
        return fbgemm_fn(inp)
    return attnkern_fn(inp, provider)


def wrap(fn: Callable, inp: Inputs, mode: str) -> Callable:
    """A callable running fn once (fwd, or fwd + bwd) -> (out, grads)."""
    def call():
        leaves = inp.leaves(mode)
        if mode == "fwd":
            with torch.no_grad():
                return fn(*leaves), ()
        out = fn(*leaves)
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, wrt, inp.grad_out, allow_unused=True)
        return out.detach(), grads
    return call


# ---------------------------------------------------------------------------- checking, timing


def oracle(inp: Inputs, mode: str):
    """float64 reference outputs (and gradients)."""
    import attnkern

    leaves = [None if t is None else t.detach().double().requires_grad_(mode == "fwd+bwd")
              for t in (inp.q, inp.k, inp.v, inp.time_table, inp.position_table)]
    extra = {}
    if inp.case.bias:
        extra = dict(key_times=inp.times, query_times=inp.times, time_table=leaves[3],
                     position_table=leaves[4])
    out = attnkern.sequence_attention(*leaves[:3], backend="reference", **inp.kwargs(), **extra)
    if mode == "fwd":
        return out.detach(), ()
    wrt = [t for t in leaves if t is not None]
    return out.detach(), torch.autograd.grad(out, wrt, inp.grad_out.double())


def check(result, want, dtype: str):
    """(ok, max relative error): each tensor's max abs error over its max abs value."""
    tol = 2e-3 if dtype == "float32" else 5e-2
    worst = 0.0
    for got, ref in zip((result[0],) + tuple(result[1]), (want[0],) + tuple(want[1])):
        if got is None:
            return False, float("inf")
        err = (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        worst = max(worst, err)
    return worst <= tol, worst


def run_case(case: Case, providers: Sequence[str], rounds: int, budget_s: float = 0.0,
             progress: Callable[[str], None] = lambda s: None) -> List[dict]:
    inp = Inputs(case)
    want = oracle(inp, case.mode)
    fns: Dict[str, Callable] = {}
    records = []
    base = {"case": case.id, **asdict(case), "T": inp.T, "max_len": inp.N,
            "gflop": flops(inp, case.mode) / 1e9}
    for p in providers:
        why = provider_status(p, case)
        if why is not None:
            records.append(dict(base, provider=p, status="skipped", reason=why))
            continue
        progress("%s %s" % (case.id, p))
        try:
            fn = wrap(make_fn(p, inp), inp, case.mode)
            t0 = time.perf_counter()
            result = fn()
            first = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - a provider that cannot run the case is reported
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            records.append(dict(base, provider=p, status="unavailable",
                                reason="%s: %s" % (type(e).__name__, msg[:200])))
            continue
        if p in UNCHECKED or (p == "sdpa_causal" and case.targets > 1):
            ok, err, chk = True, None, "n/a (other mask)"
        else:
            ok, err = check(result, want, case.dtype)
            chk = "ok" if ok else "MISMATCH"
        fns[p] = fn
        records.append(dict(base, provider=p, status="ok", check=chk, max_rel_err=err,
                            first_call_s=first))
    times: Dict[str, List[float]] = {p: [] for p in fns}
    start = time.perf_counter()
    r = 0
    while r < rounds or (budget_s and time.perf_counter() - start < budget_s and r < 50):
        for p, fn in fns.items():  # alternating, round by round
            t0 = time.perf_counter()
            fn()
            times[p].append(time.perf_counter() - t0)
        r += 1
    med = {p: statistics.median(t) for p, t in times.items()}
    for rec in records:
        p = rec["provider"]
        if p in med:
            rec["median_ms"] = med[p] * 1e3
            rec["reps"] = len(times[p])
            rec["gflops"] = base["gflop"] / med[p]
            rec["speedup_vs"] = {b: med[b] / med[p] for b in med}
            if p in ("compile", "flex"):
                rec["compile_s"] = max(rec["first_call_s"] - med[p], 0.0)
    return records


def measure_peak(dtype: str, n: int) -> float:
    """FLOP/s of torch.mm in dtype (the best of a few n x n products): the practical peak that
    the cases of that dtype are measured against."""
    if dtype == "float32":
        return measure_peak_gemm(n=n)
    a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def format_table(records: Sequence[dict], peaks: Dict[str, float]) -> str:
    lines = ["GEMM peak (torch.mm, this run): %s, %d threads" % (
        ", ".join("%s %.1f GFLOP/s" % (dt, pk / 1e9) for dt, pk in sorted(peaks.items())),
        torch.get_num_threads())]
    # "x P": how many times faster than provider P this one ran (ratio of the run's medians).
    head = "%-52s %-11s %10s %8s %7s %9s %9s %9s %9s  %s" % (
        "case", "provider", "median ms", "GFLOP/s", "% peak", "x eager", "x sdpa", "x rows",
        "x causal", "check")
    lines.append(head)
    for r in records:
        if r["status"] != "ok":
            lines.append("%-52s %-11s %s: %s" % (r["case"], r["provider"], r["status"], r.get("reason", "")))
            continue
        sv = r["speedup_vs"]
        fmt = lambda k: "%9.2f" % (sv[k]) if k in sv else "%9s" % "-"  # noqa: E731
        lines.append("%-52s %-11s %10.2f %8.1f %6.1f%% %s %s %s %s  %s" % (
            r["case"], r["provider"], r["median_ms"], r["gflops"], 100 * r["gflops"] * 1e9 / peaks[r["dtype"]],
            fmt("eager"), fmt("sdpa"), fmt("sdpa_rows"), fmt("sdpa_causal"), r["check"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnkern bench --family sequence",
                                description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke)")
    p.add_argument("--full", action="store_true", help="L=200 and 1000, fp32 and bf16, 1 and 16 targets")
    p.add_argument("--serving", action="store_true", help="the serving shape: B=1, 2048 + 1024 candidates")
    p.add_argument("--providers", default=",".join(PROVIDERS),
                   help="comma-separated, from: " + ", ".join(PROVIDERS))
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (each times every provider once)")
    p.add_argument("--lengths", default=None, help="comma-separated L (max row length), e.g. 200,1000")
    p.add_argument("--dtype", default=None, help="float32 and/or bfloat16")
    p.add_argument("--norm", default=None, help="softmax and/or silu")
    p.add_argument("--bias", default=None, help="none and/or timepos")
    p.add_argument("--targets", default=None, help="comma-separated targets per row")
    p.add_argument("--modes", default=None, help="fwd and/or fwd+bwd")
    p.add_argument("--batch", type=int, default=None, help="B (default 128)")
    p.add_argument("--out", default=None, help="write the records as JSON here")
    args = p.parse_args(argv)
    providers = [x for x in args.providers.split(",") if x]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad:
        p.error("unknown providers %s; choose from %s" % (",".join(bad), ",".join(PROVIDERS)))
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    grid = "quick" if args.quick else "serving" if args.serving else "full" if args.full else "default"
    split = lambda text, conv=str: [conv(x) for x in text.split(",") if x] if text else None  # noqa: E731
    try:
        cases = make_cases(grid, B=[args.batch] if args.batch else None, L=split(args.lengths, int),
                           dtype=split(args.dtype), normalization=split(args.norm),
                           mode=split(args.modes), targets=split(args.targets, int),
                           bias=[b == "timepos" for b in split(args.bias)] if args.bias else None)
    except ValueError as e:
        p.error(str(e))
    for c in cases:
        if c.dtype not in ("float32", "bfloat16") or c.normalization not in ("softmax", "silu") \
                or c.mode not in MODES or c.L < 1 or c.B < 1 or c.targets < 0:
            p.error("bad case %s: dtype float32|bfloat16, norm softmax|silu, modes fwd|fwd+bwd, "
                    "positive sizes" % c.id)
    if args.bias and any(b not in ("none", "timepos") for b in split(args.bias)):
        p.error("--bias takes none and/or timepos")
    gemm = 256 if args.quick else 2048  # the smoke run needs no meaningful peak
    # measured before and after the cases (the best of both: a shared machine's load varies)
    peaks = {dt: measure_peak(dt, gemm) for dt in sorted({c.dtype for c in cases})}
    records = []
    for c in cases:
        records += run_case(c, providers, args.rounds,
                            progress=lambda s: print("attnkern bench: %s" % s, file=sys.stderr, flush=True))
    peaks = {dt: max(pk, measure_peak(dt, gemm)) for dt, pk in peaks.items()}
    for r in records:
        r["peak_gflops"] = peaks[r["dtype"]] / 1e9
        r["torch"] = torch.__version__
        r["threads"] = torch.get_num_threads()
    print(format_table(records, peaks))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    bad = [r for r in records if r.get("check") == "MISMATCH"]
    if bad:
        print("attnkern bench: mismatches: %s" % ", ".join(
            "%s %s" % (r["case"], r["provider"]) for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
