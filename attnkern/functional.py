"""The public function: validation, layout normalisation, backend dispatch. Nothing else."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._validation import check_values, checked_index_values, validate
from .ops import BACKENDS, BackendUnavailable, backend_info, fused_op
from .ops.availability import triton_interpret
from .reference import attention_pool_ref

_resolved: dict = {}
# Backends whose registered ops read and check lengths/offsets values themselves (the C++ CPU
# launcher; the Triton ops through check_values), so checking them here too would do the work
# twice. The "cuda" ops clamp instead of checking, and "reference" has no op.
_OPS_CHECK_VALUES = ("cpu", "triton")


def _resolve_uncached(backend: str, device_type: str) -> Tuple[str, str]:
    if backend == "auto":
        if device_type == "cuda":
            for name in ("cuda", "triton"):
                if backend_info(name).available:
                    return name, ""
            return "reference", ""
        if device_type == "cpu" and backend_info("cpu").available:
            return "cpu", ""
        return "reference", ""
    return backend, backend_info(backend).reason


@torch.compiler.assume_constant_result
def _resolve_name(backend: str, device_type: str) -> Tuple[str, str]:
    """(the backend that runs (backend, device type), why it can't run: "" when it can).
    Resolved once per pair; under torch.compile it is evaluated eagerly and taken as a
    constant, so the availability probes are never traced."""
    resolved = _resolved.get((backend, device_type))
    if resolved is None:
        resolved = _resolve_uncached(backend, device_type)
        _resolved[(backend, device_type)] = resolved
    return resolved


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _resolve(backend, query: torch.Tensor) -> str:
    if not isinstance(backend, str):
        raise TypeError("backend must be a str, got %s" % type(backend).__name__)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            "unknown backend %r; expected one of %s" % (backend, ", ".join(("auto",) + BACKENDS))
        )
    dev = query.device.type
    name, unavailable = _resolve_name(backend, dev)
    if unavailable:
        raise BackendUnavailable(name, unavailable)
    if name == "cpu" and dev != "cpu":
        raise ValueError("backend 'cpu' needs CPU tensors, got query on %s" % query.device)
    if name == "cuda" and dev != "cuda":
        raise ValueError("backend 'cuda' needs CUDA tensors, got query on %s" % query.device)
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and triton_interpret()):
        raise ValueError(
            "backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            "got query on %s" % query.device
        )
    if name in ("cuda", "triton") and query.dtype == torch.float64:
        raise TypeError(
            "backend %r supports float16, bfloat16 and float32, got float64 "
            "(use backend='cpu' or 'reference' for float64)" % name
        )
    return name


def attention_pool(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Masked scaled-dot-product attention pooling (target attention).

    Each query attends over its row's valid keys/values and gets one pooled vector:
    ``out[b, n, h] = sum_l softmax_l(scale * <q[b, n, h], k[b, l, h]>) * v[b, l, h]``.

    Args:
        query: [B, H, Dk] or [B, N, H, Dk] (N candidate queries sharing one history).
        key: padded [B, L, H, Dk], or jagged [T, H, Dk] together with ``offsets``.
        value: padded [B, L, H, Dv], or jagged [T, H, Dv].
        lengths: padded only, [B] int32/int64: row b's valid prefix is ``key[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part (the SDPA convention).
            With neither ``lengths`` nor ``mask``, all L positions take part.
        offsets: jagged only, [B+1] int32/int64: row b is ``key[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional int >= every row's length (sizes GPU launches
            without a device sync; needed for the reference backend under torch.compile).
        scale: logit scale, default ``1/sqrt(Dk)``.
        return_lse: also return the log-sum-exp of the scaled logits, [B, H] or [B, N, H] float32.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        out [B, H, Dv] or [B, N, H, Dv] in query's dtype (accumulated in float32, float64 for
        float64 inputs), or (out, lse). A row with no valid position (empty history, fully
        masked) gives out = 0 and lse = -inf, and zero gradients.

    Supported: float16, bfloat16, float32 on every backend, float64 on "reference" and "cpu";
    1 <= Dk, Dv <= 256; any strides. Differentiable w.r.t. query, key and value.
    """
    prob = validate(query, key, value, lengths, mask, offsets, max_length, scale, return_lse,
                    values=False)
    name = _resolve(backend, query)
    if name != "reference" and _functorch_active():
        # The fused ops have no vmap rule, so torch.func transforms (jacrev, vmap, grad, ...)
        # cannot run them: "auto" takes the reference there, an explicit fused backend is an
        # error that says so.
        if backend != "auto":
            raise RuntimeError(
                "attnkern: torch.func transforms (vmap, grad, jacrev, ...) are not supported by "
                "the %r backend; use backend='reference' (or 'auto', which picks it there)" % name)
        name = "reference"
    if name not in _OPS_CHECK_VALUES:
        check_values(prob, lengths, offsets, max_length)
    if name == "reference" and torch.compiler.is_compiling():
        # check_values cannot read tensors while torch.compile traces: the graph gets an op
        # that checks them when it runs, and the reference reads its indices through that op.
        lengths, offsets = checked_index_values(prob, lengths, offsets, max_length)
    if name == "reference":
        out, lse = attention_pool_ref(
            prob.query, key, value, lengths, mask=mask, offsets=offsets,
            max_length=max_length, scale=prob.scale,
        )
    elif prob.layout == "padded":
        out, lse = fused_op(name, "padded")(prob.query, key, value, lengths, mask, prob.scale)
    else:
        ml = -1 if max_length is None else int(max_length)
        out, lse = fused_op(name, "jagged")(prob.query, key, value, offsets, ml, prob.scale)
    out = out.to(prob.query.dtype)  # the C++ ops return their unrounded float32 accumulators
    if prob.squeeze_n:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out
