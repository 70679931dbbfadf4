"""`attnkern bench` measurement: timing a callable, peak memory, the machine's description,
and one case's records (the limit first, then every provider, each checked once)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch

from .cases import BASELINES, OP
from .providers import CaseSetup, Unavailable

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
