"""The quantized-K/V attention-pool op attnkern::attention_pool_quant_fwd (csrc/attention_pool_quant_ops.cpp,
the schema's source of truth): its fake impl, and an autograd that refuses a gradient, since the
op is forward-only (a gradient through int8/float8 rows has no meaning and the query's alone
would need a backward the serving path does not carry)."""

from __future__ import annotations

import torch

from .autograd import fake_fwd_acc
from .availability import CUDA_EMU_PREFIX, cuda_emulated
from .schemas import TRITON_PREFIX, qualified

QUANT_FWD = "attention_pool_quant_fwd"
_ARGS = ("query", "key", "value", "key_scale", "key_bias", "value_scale", "value_bias", "lengths",
         "mask", "offsets", "max_length", "scale", "bias")
FORWARD_ONLY = ("attnkern: attention_pool with quantized key/value is forward-only; no gradient "
                "flows through it (call it under torch.no_grad() / torch.inference_mode(), or "
                "detach the query and the bias)")


def _fake(*args, **kwargs):
    a = dict(zip(_ARGS, args))
    a.update(kwargs)
    q, k, v = a["query"], a["key"], a["value"]
    rank = 3 if a["offsets"] is not None else 4
    if q.dim() != 4 or k.dim() != rank or v.dim() != rank:
        raise ValueError("attnkern: attention_pool_quant_fwd takes query [B, N, H, Dk] and %s key/value, "
                         "got %s, %s, %s" % ("jagged [T, H, D]" if rank == 3 else "padded [B, L, H, D]",
                                             list(q.shape), list(k.shape), list(v.shape)))
    return fake_fwd_acc(q, v)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_out, grad_lse):
    raise RuntimeError(FORWARD_ONLY)


def register(prefix: str = "") -> None:
    """Fake impl and autograd of the op named `prefix` + QUANT_FWD (the CUDA emulation's ops
    carry a prefix: attnkern/ops/extension.py)."""
    name = qualified(prefix + QUANT_FWD)
    torch.library.register_fake(name, _fake)
    torch.library.register_autograd(name, _backward, setup_context=_setup_context)


def quant_op(backend: str = "cpu"):
    """The registered forward op: CPU and CUDA kernels under one name, the CUDA emulation's
    under its prefix."""
    if backend == "triton":
        from . import triton  # noqa: F401  (registers attnkern::triton_* on first use)

        return getattr(torch.ops.attnkern, TRITON_PREFIX + QUANT_FWD)
    prefix = CUDA_EMU_PREFIX if backend == "cuda" and cuda_emulated() else ""
    return getattr(torch.ops.attnkern, prefix + QUANT_FWD)
