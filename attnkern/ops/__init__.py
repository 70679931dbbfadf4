"""The registered ops and what is known about them.

    availability  which backends run here, and why not (imports nothing heavy)
    schemas       the op schemas, declared once on the Python side
    autograd      fake impls and autograd, shared by the C++ and the Triton ops
    extension     the C++ ops of attnkern._C (CPU and CUDA kernels)
    triton        the Triton kernels as custom ops attnkern::triton_*
"""

from __future__ import annotations

import torch

from .availability import BACKENDS, BackendInfo, BackendUnavailable, backend_info, backends
from .schemas import LAYOUT_OPS, TRITON_PREFIX

# Imported for its side effect: loads attnkern._C and registers the fake impls and autograd of
# its ops, so that direct torch.ops.attnkern.* calls are differentiable and traceable.
from . import extension  # noqa: E402,F401

__all__ = ["BACKENDS", "BackendInfo", "BackendUnavailable", "backend_info", "backends",
           "fused_op"]


def fused_op(backend: str, layout: str):
    """The registered forward op of a fused backend ("cpu", "cuda", "triton") for a layout
    ("padded" | "jagged")."""
    prefix = ""
    if backend == "triton":
        # Imported for its side effect: registers attnkern::triton_* on first use (attnkern's
        # __init__ normally has already). An import statement, which torch.compile can trace.
        from . import triton  # noqa: F401
        prefix = TRITON_PREFIX
    return getattr(torch.ops.attnkern, prefix + LAYOUT_OPS[layout][0])
