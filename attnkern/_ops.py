"""Registered-op plumbing: fake (meta) impls and autograd for every backend's fwd/bwd ops.

The C++ ops (CPU and CUDA kernels) are declared in csrc/ops.cpp; the Triton ops are
Python custom ops declared in attnkern/_triton_ops.py with the same signatures. Both get
their autograd from `register_pool_autograd`, which calls only registered ops: the forward
saves lse, the backward recomputes the probabilities from it.
"""

from __future__ import annotations

import torch

from ._backends import extension

PADDED_FWD_ARGS = ("query", "key", "value", "lengths", "mask", "scale")
JAGGED_FWD_ARGS = ("query", "key", "value", "offsets", "max_length", "scale")


def fake_fwd(query, value):
    """Output metadata of every forward op: out [B, N, H, Dv] (query dtype), lse [B, N, H] f32."""
    B, N, H, _ = query.shape
    out = query.new_empty((B, N, H, value.shape[-1]))
    lse = query.new_empty((B, N, H), dtype=torch.float32)
    return out, lse


def fake_bwd(query, key, value):
    """Output metadata of every backward op: contiguous grads shaped like query/key/value."""
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
    )


def _save(ctx, **tensors):
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())


def _saved(ctx):
    return dict(zip(ctx.saved_names, ctx.saved_tensors))


def register_pool_autograd(fwd_name: str, bwd_op, layout: str) -> None:
    """Attaches autograd to forward op `fwd_name`, whose backward is the registered `bwd_op`."""
    arg_names = PADDED_FWD_ARGS if layout == "padded" else JAGGED_FWD_ARGS

    def setup_context(ctx, inputs, output):
        args = dict(zip(arg_names, inputs))
        out, lse = output
        ctx.scale = args["scale"]
        if layout == "padded":
            _save(ctx, query=args["query"], key=args["key"], value=args["value"],
                  lengths=args["lengths"], mask=args["mask"], out=out, lse=lse)
        else:
            ctx.max_length = args["max_length"]
            _save(ctx, query=args["query"], key=args["key"], value=args["value"],
                  offsets=args["offsets"], out=out, lse=lse)

    def backward(ctx, grad_out, grad_lse):
        s = _saved(ctx)
        query, out = s["query"], s["out"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        # delta = rowsum(dO * O) - dLSE: the softmax-backward correction term, tiny next to K/V.
        # float32, or float64 for float64 inputs so that their gradients stay float64-accurate.
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        if layout == "padded":
            dq, dk, dv = bwd_op(grad_out, query, s["key"], s["value"], s["lengths"], s["mask"],
                                s["lse"], delta, ctx.scale)
            return dq, dk, dv, None, None, None
        dq, dk, dv = bwd_op(grad_out, query, s["key"], s["value"], s["offsets"], ctx.max_length,
                            s["lse"], delta, ctx.scale)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _register_extension_ops() -> bool:
    mod, _ = extension()
    if mod is None:
        return False

    @torch.library.register_fake("attnkern::attention_pool_fwd")
    def _(query, key, value, lengths, mask, scale):
        return fake_fwd(query, value)

    @torch.library.register_fake("attnkern::jagged_attention_pool_fwd")
    def _(query, key, value, offsets, max_length, scale):
        return fake_fwd(query, value)

    @torch.library.register_fake("attnkern::attention_pool_bwd")
    def _(grad_out, query, key, value, lengths, mask, lse, delta, scale):
        return fake_bwd(query, key, value)

    @torch.library.register_fake("attnkern::jagged_attention_pool_bwd")
    def _(grad_out, query, key, value, offsets, max_length, lse, delta, scale):
        return fake_bwd(query, key, value)

    register_pool_autograd("attnkern::attention_pool_fwd", torch.ops.attnkern.attention_pool_bwd, "padded")
    register_pool_autograd(
        "attnkern::jagged_attention_pool_fwd", torch.ops.attnkern.jagged_attention_pool_bwd, "jagged"
    )
    return True


EXTENSION_OPS = _register_extension_ops()


def fused_ops(backend: str, layout: str):
    """The registered forward op of a fused backend ("cpu", "cuda", "triton") for a layout."""
    if backend == "triton":
        from . import _triton_ops  # noqa: F401  (registers attnkern::triton_*)

        prefix = "triton_"
    else:
        prefix = ""
    name = prefix + ("attention_pool_fwd" if layout == "padded" else "jagged_attention_pool_fwd")
    return getattr(torch.ops.attnkern, name)
