"""The top-k op attnkern::attention_topk_fwd (csrc/attention_topk_ops.cpp, CPU kernels in
csrc/cpu/attention_topk_*): its fake impl, so that torch.compile(fullgraph=True) traces through
it. Forward only: the op has no autograd; attnkern.attention_topk makes the selected scores
differentiable by recomputing them from the indices."""

from __future__ import annotations

import torch

from .availability import CUDA_EMU_PREFIX, cuda_emulated, extension
from .schemas import TRITON_PREFIX, qualified

TOPK_OP = "attention_topk_fwd"
TOPK_SCHEMA = (
    "(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, Tensor? offsets, int k, float scale, "
    "Tensor? bias=None) -> (Tensor scores, Tensor indices)"
)


def _fake_forward(query, key, lengths, mask, offsets, k, scale, bias=None):
    if query.dim() != 4:
        raise ValueError("attnkern: query must be [B, N, H, Dk], got %s" % list(query.shape))
    if key.dtype != query.dtype:
        raise TypeError("attnkern: key must have the dtype of query (%s), got %s" % (query.dtype, key.dtype))
    if k < 0:
        raise ValueError("attnkern: k must be >= 0, got %d" % k)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    shape = tuple(query.shape[:3]) + (k,)
    return query.new_empty(shape, dtype=acc), query.new_empty(shape, dtype=torch.int64)


def register_topk_fake(prefix: str = "") -> None:
    """The fake impl of the top-k op named `prefix` + TOPK_OP (the CUDA emulation's ops carry a
    prefix: attnkern/ops/extension.py)."""
    torch.library.register_fake(qualified(prefix + TOPK_OP), _fake_forward)


def _register() -> bool:
    mod, _ = extension()
    if mod is None or not hasattr(torch.ops.attnkern, TOPK_OP):
        return False
    register_topk_fake()
    return True


TOPK_KERNELS = _register()


def topk_op(backend: str = "cpu"):
    """The registered top-k op of the C++ extension: CPU and CUDA kernels under one name, the
    CUDA emulation's under its prefix."""
    if backend == "triton":
        from . import triton  # noqa: F401  (registers attnkern::triton_* on first use)

        return getattr(torch.ops.attnkern, TRITON_PREFIX + TOPK_OP)
    prefix = CUDA_EMU_PREFIX if backend == "cuda" and cuda_emulated() else ""
    return getattr(torch.ops.attnkern, prefix + TOPK_OP)
