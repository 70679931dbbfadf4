"""Fake (meta) impls and autograd for every backend's fwd/bwd ops.

The C++ ops (CPU and CUDA kernels) are declared in csrc/ops.cpp; the Triton ops are Python
custom ops declared in attnkern/ops/triton.py with the same schemas (attnkern/ops/schemas.py).
`register_fakes_and_autograd` gives both the same fake impls and the same autograd, which calls
only registered ops: the forward saves lse, the backward recomputes the probabilities from it.
"""

from __future__ import annotations

import torch

from . import checks
from .schemas import LAYOUT_OPS, argument_names, qualified


def fake_fwd(query, value):
    """Output metadata of every forward op: out [B, N, H, Dv] (query dtype), lse [B, N, H] f32."""
    B, N, H, _ = query.shape
    out = query.new_empty((B, N, H, value.shape[-1]))
    lse = query.new_empty((B, N, H), dtype=torch.float32)
    return out, lse


def fake_fwd_acc(query, value):
    """The C++ forward ops: out in the accumulator dtype (float32; float64 for float64 inputs),
    so that the autograd's delta is formed from unrounded values; lse [B, N, H] float32."""
    B, N, H, _ = query.shape
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = query.new_empty((B, N, H, value.shape[-1]), dtype=acc)
    lse = query.new_empty((B, N, H), dtype=torch.float32)
    return out, lse


def fake_bwd(query, key, value):
    """Output metadata of every backward op: contiguous grads shaped like query/key/value."""
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
    )


def _bound(names, args, kwargs) -> dict:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _save(ctx, **tensors):
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())


def _saved(ctx):
    return dict(zip(ctx.saved_names, ctx.saved_tensors))


class _NoDoubleBackward(torch.autograd.Function):
    """Passes the gradients through, tied to the tensors they depend on, so that differentiating
    them (double backward) raises a clear error instead of silently giving zeros."""

    @staticmethod
    def forward(dq, dk, dv, *inputs):
        return dq.clone(), dk.clone(), dv.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "attnkern: double backward (a gradient of a gradient) is not supported by the fused "
            "backends; use backend='reference' for higher-order gradients")


def register_pool_autograd(fwd_name: str, bwd_op, layout: str) -> None:
    """Attaches autograd to forward op `fwd_name` (qualified), whose backward is `bwd_op`."""
    arg_names = argument_names(LAYOUT_OPS[layout][0])
    index_names = ("lengths", "mask") if layout == "padded" else ("offsets",)

    def setup_context(ctx, inputs, output):
        args = dict(zip(arg_names, inputs))
        out, lse = output
        ctx.scale = args["scale"]
        ctx.max_length = args.get("max_length")
        _save(ctx, query=args["query"], key=args["key"], value=args["value"],
              **{n: args[n] for n in index_names}, out=out, lse=lse)

    def backward(ctx, grad_out, grad_lse):
        s = _saved(ctx)
        query, out = s["query"], s["out"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        # delta = rowsum(dO * O) - dLSE: the softmax-backward correction term, tiny next to K/V.
        # Summed in float64 (every ds = p (dp - delta) inherits its rounding, and dq sums many
        # of them), from the op's out (the C++ ops' is unrounded); passed as float32, or float64
        # for float64 inputs so that their gradients stay float64-accurate.
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        delta = (grad_out.double() * out.double()).sum(-1)
        if grad_lse is not None:
            delta = delta - grad_lse.double()
        delta = delta.to(acc)
        index = ((s["lengths"], s["mask"]) if layout == "padded"
                 else (s["offsets"], ctx.max_length))
        dq, dk, dv = bwd_op(grad_out, query, s["key"], s["value"], *index, s["lse"], delta,
                            ctx.scale)
        if torch.is_grad_enabled():  # create_graph=True: these gradients may be differentiated
            dq, dk, dv = _NoDoubleBackward.apply(dq, dk, dv, grad_out, query, s["key"], s["value"])
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_fakes_and_autograd(prefix: str = "") -> None:
    """Fake impls for the four ops attnkern::<prefix><op> of SCHEMAS, and autograd for the two
    forward ops. prefix "" are the C++ ops, "triton_" the Triton ones."""
    cpp = prefix == ""  # the C++ ops return their float32 accumulator as out
    for layout, (fwd, bwd) in LAYOUT_OPS.items():
        fwd_names, bwd_names = argument_names(fwd), argument_names(bwd)

        # The fake impls check what the C++ kernels check (a meta tensor mixed with real ones
        # reaches the fake impl instead of a kernel): the same errors, never garbage.
        def fake_forward(*args, _names=fwd_names, _layout=layout, **kwargs):
            a = _bound(_names, args, kwargs)
            checks.fwd(_layout, a)
            return (fake_fwd_acc if cpp else fake_fwd)(a["query"], a["value"])

        def fake_backward(*args, _names=bwd_names, _layout=layout, **kwargs):
            a = _bound(_names, args, kwargs)
            checks.bwd_extras(checks.fwd(_layout, a), a["query"], a["grad_out"], a["lse"], a["delta"])
            return fake_bwd(a["query"], a["key"], a["value"])

        torch.library.register_fake(qualified(prefix + fwd), fake_forward)
        torch.library.register_fake(qualified(prefix + bwd), fake_backward)
        register_pool_autograd(qualified(prefix + fwd),
                               getattr(torch.ops.attnkern, prefix + bwd), layout)
