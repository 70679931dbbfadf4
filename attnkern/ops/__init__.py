"""The registered ops and what is known about them.

    availability  which backends run here, and why not (imports nothing heavy)
    schemas       the op schemas, declared once on the Python side
    autograd      fake impls and autograd, shared by the C++ and the Triton ops
    extension     the C++ ops of attnkern._C (CPU and CUDA kernels)
    triton        the Triton kernels as custom ops attnkern::triton_*
"""

from __future__ import annotations

import torch

from .availability import (BACKENDS, CUDA_EMU_PREFIX, BackendInfo, BackendUnavailable, backend_info,
                           backends, cuda_emulated)
from .schemas import INFER_OPS, LAYOUT_OPS, TRITON_PREFIX

# Imported for its side effect: loads attnkern._C and registers the fake impls and autograd of
# its ops, so that direct torch.ops.attnkern.* calls are differentiable and traceable.
from . import extension  # noqa: E402,F401
from . import sequence as _sequence  # noqa: E402,F401  (the same for the sequence-attention ops)

__all__ = ["BACKENDS", "BackendInfo", "BackendUnavailable", "backend_info", "backends",
           "fused_op", "infer_op", "activation_fused_op", "activation_scores_op"]


def _prefix(backend: str) -> str:
    """The name prefix of a fused backend's registered ops."""
    if backend == "triton":
        return TRITON_PREFIX
    return CUDA_EMU_PREFIX if backend == "cuda" and cuda_emulated() else ""


def fused_op(backend: str, layout: str):
    """The registered forward op of a fused backend ("cpu", "cuda", "triton") for a layout
    ("padded" | "jagged")."""
    prefix = _prefix(backend)
    if backend == "triton":
        # Imported for its side effect: registers attnkern::triton_* on first use (attnkern's
        # __init__ normally has already). An import statement, which torch.compile can trace.
        from . import triton  # noqa: F401
    return getattr(torch.ops.attnkern, prefix + LAYOUT_OPS[layout][0])


def infer_op(layout: str):
    """The cpu backend's inference forward op for a layout (INFER_OPS): the forward's arguments
    and results, P V allowed to round P to the input dtype; no gradient."""
    return getattr(torch.ops.attnkern, INFER_OPS[layout])


_activation_missing: dict = {}


@torch.compiler.assume_constant_result
def activation_kernels_missing(backend: str) -> bool:
    """True when this build has no activation-unit kernels for fused `backend`. Probed once per
    backend; under torch.compile evaluated eagerly and taken as a constant."""
    if backend not in _activation_missing:
        if backend == "triton":
            has = hasattr(torch.ops.attnkern, TRITON_PREFIX + "activation_unit_pool_fwd")
        else:
            # The CUDA emulation's kernels are CPU kernels of its prefixed ops.
            key = "CPU" if _prefix(backend) == CUDA_EMU_PREFIX else backend.upper()
            try:
                has = extension.EXTENSION_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
                    "attnkern::%sactivation_unit_pool_fwd" % _prefix(backend), key)
            except RuntimeError:
                has = False
        _activation_missing[backend] = not has
    return _activation_missing[backend]


def activation_fused_op(backend: str):
    """The registered activation-unit forward op of a fused backend, or a RuntimeError saying that
    this build has none for it."""
    if backend == "triton":
        from . import triton  # noqa: F401  (registers attnkern::triton_* on first use)
    if activation_kernels_missing(backend):
        raise RuntimeError(
            "attnkern backend %r has no activation_unit_pool kernels in this build; use "
            "backend='reference' (or 'cpu' for CPU tensors)" % backend)
    return getattr(torch.ops.attnkern, _prefix(backend) + "activation_unit_pool_fwd")


def activation_scores_op(backend: str):
    """The registered activation-unit scores op (attnkern/ops/activation_scores.py) of a fused
    backend, or None where this build has none for it (the caller then computes the weights with
    the reference's PyTorch ops)."""
    if activation_kernels_missing(backend):
        return None
    name = _prefix(backend) + "activation_unit_scores_fwd"
    return getattr(torch.ops.attnkern, name) if _scores_registered(name) else None


@torch.compiler.assume_constant_result
def _scores_registered(name: str) -> bool:
    return hasattr(torch.ops.attnkern, name)
