"""attnkern::time_bias_fwd / _bwd (csrc/cpu/time_bias_cpu.cpp, schemas there): the score bias
of AttentionPooling's time and recency tables in one pass over a padded history. Here: their
fake impls and autograd, the bucket bounds they take, and `fused_time_bias`, the layer's call.

    bias[b, h, l] = time_table[h, log_time_bucket(query_time[b] - key_times[b, l])]
                  + recency_table[h, min(lengths[b] - 1 - l, NR - 1)]     (l < lengths[b]; else 0)

The buckets are attnkern.reference.log_time_bucket's exactly: the op counts the bounds <= |dt|,
bounds found by bisection on that formula (which is non-decreasing in |dt|)."""

from __future__ import annotations

import functools

import torch

from ..reference import time_bucket_ref
from .autograd import _NoDoubleBackward, _save, _saved

FWD, BWD = "attnkern::time_bias_fwd", "attnkern::time_bias_bwd"
FWD_ARGS = ("key_times", "query_time", "lengths", "time_bounds", "time_table", "recency_table")


@functools.lru_cache(maxsize=64)
def _bounds_cpu(time_bucket: str, num_buckets: int) -> torch.Tensor:
    # Bisection on the formula itself over every int64 gap (up to 2^63 - 1: the log buckets past
    # ln(2^62) / TIME_BUCKET_WIDTH are reached only there); buckets no gap reaches get no bound.
    # Cached across calls: never an inference tensor (a first call under torch.inference_mode
    # would make one, which a later call that takes gradients could not save for backward).
    with torch.inference_mode(False), torch.no_grad():
        want = torch.arange(1, num_buckets, dtype=torch.int64)
        lo = torch.zeros_like(want)               # bucket(lo) < want
        hi = torch.full_like(want, 2 ** 63 - 1)   # bucket(hi) >= want, or want is never reached
        for _ in range(64):
            mid = lo + (hi - lo) // 2
            ok = time_bucket_ref(mid, num_buckets, time_bucket) >= want
            hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        reached = time_bucket_ref(hi, num_buckets, time_bucket) >= want
        return hi[reached].clone()


@torch.compiler.assume_constant_result
def _bounds_const(time_bucket: str, num_buckets: int) -> torch.Tensor:
    # Under torch.compile: computed eagerly, a constant of the graph.
    return _bounds_cpu(time_bucket, num_buckets)


def reached_bounds(time_bucket: str, num_buckets: int, device) -> torch.Tensor:
    """int64 [<= NB - 1]: bounds[b - 1] = the smallest |dt| whose bucket
    (attnkern.reference.time_bucket_ref, "log" or "sqrt") is >= b, for the buckets b that some
    int64 gap reaches, so that bucket(dt) = the number of bounds <= |dt|."""
    return _bounds_const(time_bucket, int(num_buckets)).to(device)


def time_bias_bounds(num_buckets: int, device) -> torch.Tensor:
    """The time_bias op's bounds: those of the log buckets (reached_bounds)."""
    return reached_bounds("log", num_buckets, device)


def _table(a: dict) -> torch.Tensor:
    return a["time_table"] if a.get("time_table") is not None else a["recency_table"]


def _fake_fwd(key_times, query_time, lengths, time_bounds, time_table=None, recency_table=None):
    table = time_table if time_table is not None else recency_table
    if table is None:
        raise ValueError("attnkern: time_bias needs a time_table, a recency_table or both")
    if key_times.dim() != 2:
        raise ValueError("attnkern: key_times must be [B, L], got %s" % list(key_times.shape))
    return table.new_empty((key_times.shape[0], table.shape[0], key_times.shape[1]))


def _fake_bwd(grad_bias, key_times, query_time, lengths, time_bounds, time_table=None,
              recency_table=None):
    table = time_table if time_table is not None else recency_table
    return tuple(table.new_empty((0,)) if t is None else t.new_empty(t.shape)
                 for t in (time_table, recency_table))


def _setup_context(ctx, inputs, output):
    args = dict(zip(FWD_ARGS, inputs))
    ctx.has = {n: args[n] is not None for n in ("time_table", "recency_table")}
    _save(ctx, **{n: x for n, x in args.items() if x is not None})


def _backward(ctx, grad_bias):
    s = _saved(ctx)
    args = [s.get(n) for n in FWD_ARGS]
    d_time, d_recency = torch.ops.attnkern.time_bias_bwd(grad_bias.to(_table(s).dtype), *args)
    if torch.is_grad_enabled():
        d_time, d_recency = _NoDoubleBackward.apply(2, d_time, d_recency, grad_bias, _table(s))
    return (None, None, None, None, d_time if ctx.has["time_table"] else None,
            d_recency if ctx.has["recency_table"] else None)


def _register() -> bool:
    if not hasattr(torch.ops.attnkern, "time_bias_fwd"):
        return False  # no attnkern._C: the layer uses the PyTorch formula
    torch.library.register_fake(FWD, _fake_fwd)
    torch.library.register_fake(BWD, _fake_bwd)
    torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)
    return True


TIME_BIAS_OP = _register()


def _exporting() -> bool:
    # Exported graphs (AOTInductor, ONNX) keep the PyTorch formula: it is standard ops, which the
    # ONNX translation table does not need to know.
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export())


def fused_time_bias(key_times, query_time, lengths, time_table, recency_table, L: int):
    """The [B, H, L] bias by the fused op (0 at padded positions), or None where it does not
    apply: not CPU, int64-incompatible or floating times, tables not float32/float64, an
    exported graph. `lengths` None: every position is valid."""
    if not TIME_BIAS_OP or _exporting():
        return None
    tables = [t for t in (time_table, recency_table) if t is not None]
    if time_table is None or key_times.device.type != "cpu" or \
            any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
                or t.dtype != tables[0].dtype for t in tables):
        return None
    if key_times.is_floating_point() or query_time.is_floating_point() or \
            torch.promote_types(key_times.dtype, query_time.dtype) != torch.int64:
        return None  # narrower ints subtract with their own wrap-around: the formula keeps it
    B = key_times.shape[0]
    if lengths is None:
        lengths = torch.full((B,), L, dtype=torch.int64, device=key_times.device)
    return torch.ops.attnkern.time_bias_fwd(
        key_times.long(), query_time.long(), lengths, time_bias_bounds(time_table.shape[1], "cpu"),
        time_table, recency_table)
