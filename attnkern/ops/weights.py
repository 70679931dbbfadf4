"""The attention-weights ops attnkern::attention_weights_fwd / jagged_attention_weights_fwd
(schemas: WEIGHTS_SCHEMAS, declared in C++ by csrc/attention_weights_ops.cpp; CPU kernels in
csrc/cpu/attention_weights_*): their fake impls and their autograd, shared by every backend.

The backward needs nothing of [.., L] but the forward's output w: with dW the incoming gradient,
``dS = w * (dW - sum_l dW * w + dlse)`` (the softmax's backward; lse's own gradient is w), then
``dq = scale dS K``, ``dk = scale dS^T Q`` and ``dbias = dS`` summed to the bias's broadcast
shape, in torch ops on the tensors' device, so that a Triton or CUDA op of the same schema gets
the same autograd from `register_weights_fakes_and_autograd(prefix)`. On CPU tensors the C++ op
attnkern::attention_weights_bwd takes dW and w and forms dS inside its kernel (and returns it only
when the bias needs its gradient).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks
from .availability import CUDA_EMU_PREFIX, cuda_emulated, extension
from .schemas import TRITON_PREFIX, WEIGHTS_BWD_SCHEMAS, WEIGHTS_OPS, WEIGHTS_SCHEMAS, qualified
from ..reference import padded_valid, token_rows


WEIGHTS_BWD_OP = "attention_weights_bwd"
# Padded calls with more queries per row than this take the torch GEMMs on CPU too (measured at
# the serving shape B=1, N=512, L=1024: the GEMMs ~1.5x faster than the C++ loops).
_CPU_BWD_MAX_N = 16


def _names(name: str):
    schema = torch._C.parse_schema(qualified(name) + {**WEIGHTS_SCHEMAS, **WEIGHTS_BWD_SCHEMAS}[name])
    return tuple(a.name for a in schema.arguments)


def _bound(names, args, kwargs) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake(layout: str, a: dict):
    """The forward's checks (those of attention_pool_fwd with the key as the values) and output
    metadata: weights [B, N, H, L] / [T, N, H] and lse [B, N, H] in the accumulator dtype."""
    checks.fwd(layout, dict(a, value=a["key"]))
    query, key = a["query"], a["key"]
    B, N, H, _ = query.shape
    acc = _acc(query.dtype)
    shape = (B, N, H, key.shape[1]) if layout == "padded" else (key.shape[0], N, H)
    return query.new_empty(shape, dtype=acc), query.new_empty((B, N, H), dtype=acc)


def _bias_grad(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ds [B, N, H, L] or [T, N, H] summed to bias's [B, Nb, Hb, L] / [T, Nb, Hb] (query n reads
    bias row n % Nb; Hb 1 or H)."""
    Nb, Hb = bias.shape[1], bias.shape[2]
    g = ds.unflatten(1, (-1, Nb)).sum(1)
    if Hb != ds.shape[2]:
        g = g.sum(2, keepdim=True)
    return g.to(bias.dtype)


def weights_backward(layout: str, grad_w, grad_lse, w, query, key, index, scale: float,
                     bias: Optional[torch.Tensor]):
    """(dq, dk, dbias) of the weights ops from their output w; index is (lengths, mask) padded,
    (offsets,) jagged; bias None when no gradient of it is wanted. Positions that take part in no
    row have w = 0, so dS = 0 there; their keys (which may hold anything) are never read: the CPU
    op skips them, the torch ops zero them before the products."""
    acc = w.dtype
    dw = torch.zeros_like(w) if grad_w is None else grad_w.to(acc)
    dlse = None if grad_lse is None else grad_lse.to(acc)
    padded = layout == "padded"
    # The C++ op forms dS inside (one pass over each query's row for sum_l dW w, as the pool's
    # backward forms its delta) and reads the valid keys only (no zeroed copy of the key: the cost
    # when few queries share a row); many queries per row make dq and dk GEMMs, which torch runs
    # faster.
    if key.device.type == "cpu" and WEIGHTS_KERNELS and (not padded or query.shape[1] <= _CPU_BWD_MAX_N):
        dq, dk, ds = getattr(torch.ops.attnkern, WEIGHTS_BWD_OP)(
            dw, w, dlse, query, key, index[0] if padded else None, index[1] if padded else None,
            None if padded else index[0], scale, bias is not None)
        dbias = None if bias is None else _bias_grad(ds, bias)
        return dq.to(query.dtype), dk.to(key.dtype), dbias
    if padded:
        rowdot = (dw * w).sum(-1, keepdim=True)
        if dlse is not None:
            rowdot = rowdot - dlse.unsqueeze(-1)
        ds = w * (dw - rowdot)  # [B, N, H, L]
        k = key.to(acc)
        if index[0] is not None or index[1] is not None:
            valid = padded_valid(key, *index)
            k = torch.where(valid[:, :, None, None], k, torch.zeros((), dtype=acc, device=key.device))
        # Batched GEMMs over (b, h): dS [B, H, N, L] with K [B, H, L, Dk] and Q [B, H, N, Dk].
        ds_bh = ds.transpose(1, 2)
        dq = torch.matmul(ds_bh, k.transpose(1, 2)).transpose(1, 2) * scale
        dk = torch.matmul(ds_bh.transpose(-1, -2), (query.to(acc) * scale).transpose(1, 2)).transpose(1, 2)
    else:
        row, _, inside = token_rows(index[0], key.shape[0])
        rowdot = w.new_zeros((query.shape[0],) + tuple(w.shape[1:])).index_add(0, row, dw * w)  # [B, N, H]
        if dlse is not None:
            rowdot = rowdot - dlse
        ds = w * (dw - rowdot[row])  # [T, N, H]
        k = torch.where(inside[:, None, None], key.to(acc), torch.zeros((), dtype=acc, device=key.device))
        dq = query.new_zeros(query.shape, dtype=acc).index_add(
            0, row, ds.unsqueeze(-1) * k.unsqueeze(1)) * scale
        dk = torch.einsum("tnh,tnhd->thd", ds, query.to(acc)[row]) * scale
    dbias = None if bias is None else _bias_grad(ds, bias)
    return dq.to(query.dtype), dk.to(key.dtype), dbias


def register_weights_fakes_and_autograd(prefix: str = "") -> None:
    """Fake impls and autograd of attnkern::<prefix><weights op> for both layouts (prefix "": the
    C++ ops; a Python backend such as Triton calls this with its own prefix after defining them
    with WEIGHTS_SCHEMAS)."""
    for layout, name in WEIGHTS_OPS.items():
        names = _names(name)

        def fake(*args, _names=names, _layout=layout, **kwargs):
            return _fake(_layout, _bound(_names, args, kwargs))

        def setup_context(ctx, inputs, output, _names=names, _layout=layout):
            a = dict(zip(_names, inputs))
            ctx.scale = a["scale"]
            index = (a["lengths"], a["mask"]) if _layout == "padded" else (a["offsets"],)
            ctx.index = tuple(t is not None for t in index)
            ctx.has_bias = a.get("bias") is not None
            tensors = (output[0], a["query"], a["key"]) + tuple(t for t in index if t is not None)
            ctx.save_for_backward(*tensors, *((a["bias"],) if ctx.has_bias else ()))

        def backward(ctx, grad_w, grad_lse, _layout=layout):
            saved = list(ctx.saved_tensors)
            w, query, key = saved[:3]
            rest = saved[3:]
            index = []
            for present in ctx.index:
                index.append(rest.pop(0) if present else None)
            # (query, key, lengths, mask, scale, bias) or (query, key, offsets, max_length, scale, bias)
            bias = rest[0] if ctx.has_bias and ctx.needs_input_grad[5] else None
            dq, dk, dbias = weights_backward(_layout, grad_w, grad_lse, w, query, key, index, ctx.scale, bias)
            return dq, dk, None, None, None, dbias

        torch.library.register_fake(qualified(prefix + name), fake)
        torch.library.register_autograd(qualified(prefix + name), backward, setup_context=setup_context)


def _fake_bwd(grad_weights, weights, grad_lse, query, key, lengths, mask, offsets, scale, need_grad_scores=False):
    layout = "padded" if offsets is None else "jagged"
    checks.fwd(layout, dict(query=query, key=key, value=key, lengths=lengths, mask=mask, offsets=offsets,
                            max_length=-1, scale=scale))
    acc = _acc(query.dtype)
    ds = weights.new_empty(weights.shape if need_grad_scores else (0,), dtype=acc)
    return query.new_empty(query.shape, dtype=acc), key.new_empty(key.shape, dtype=acc), ds


def _register() -> bool:
    mod, _ = extension()
    if mod is None or not hasattr(torch.ops.attnkern, WEIGHTS_OPS["padded"]):
        return False
    register_weights_fakes_and_autograd("")
    torch.library.register_fake(qualified(WEIGHTS_BWD_OP), _fake_bwd)
    return True


WEIGHTS_KERNELS = _register()

_has: dict = {}


@torch.compiler.assume_constant_result
def weights_kernels_missing(backend: str, device_type: str) -> bool:
    """True when fused `backend` has no registered weights op for tensors of `device_type`
    (cpu: the C++ kernels; triton: attnkern::triton_attention_weights_fwd; cuda: a CUDA kernel of
    attnkern::attention_weights_fwd). Probed once; under torch.compile evaluated eagerly and
    taken as a constant."""
    key = (backend, device_type)
    if key not in _has:
        if backend == "triton":
            from . import triton  # noqa: F401  (registers attnkern::triton_* on first use)
            has = hasattr(torch.ops.attnkern, TRITON_PREFIX + WEIGHTS_OPS["padded"])
        elif backend == "cuda" and cuda_emulated():  # its kernels are CPU kernels of prefixed ops
            has = hasattr(torch.ops.attnkern, CUDA_EMU_PREFIX + WEIGHTS_OPS["padded"])
        else:
            try:
                has = WEIGHTS_KERNELS and torch._C._dispatch_has_kernel_for_dispatch_key(
                    qualified(WEIGHTS_OPS["padded"]), "CPU" if device_type == "cpu" else "CUDA")
            except RuntimeError:
                has = False
        _has[key] = not has
    return _has[key]


def weights_op(backend: str, layout: str):
    """The registered weights op of a fused backend for a layout (check weights_kernels_missing
    first)."""
    prefix = TRITON_PREFIX if backend == "triton" else CUDA_EMU_PREFIX if backend == "cuda" and cuda_emulated() else ""
    return getattr(torch.ops.attnkern, prefix + WEIGHTS_OPS[layout])
