"""The registered sequence self-attention ops of each fused backend (docs/sequence_attention.md:
one schema, attnkern::<prefix>sequence_attention_fwd/_bwd)."""

from __future__ import annotations

import torch

from .schemas import TRITON_PREFIX


def sequence_fused_op(backend: str):
    """The registered forward op of a fused backend ("cpu", "cuda", "triton"), or a
    RuntimeError saying that this build has none for it."""
    if backend == "triton":
        # Imported for its side effect: registers attnkern::triton_sequence_attention_* on
        # first use (attnkern's __init__ normally has already).
        from . import triton_sequence  # noqa: F401
        return getattr(torch.ops.attnkern, TRITON_PREFIX + "sequence_attention_fwd")
    if not hasattr(torch.ops.attnkern, "sequence_attention_fwd"):
        raise RuntimeError(
            "attnkern backend %r has no sequence_attention kernels in this build; use "
            "backend='reference' (or 'triton')" % backend)
    return torch.ops.attnkern.sequence_attention_fwd
