"""Fake (meta) impls and autograd for every backend's fwd/bwd ops.

The C++ ops (CPU and CUDA kernels) are declared in csrc/attention_pool_ops.cpp and
csrc/activation_unit_ops.cpp; the Triton ops are Python custom ops declared in
attnkern/ops/triton.py with the same schemas (attnkern/ops/schemas.py).
`register_fakes_and_autograd` gives both the same fake impls and the same autograd, which calls
only registered ops: the forward saves lse, the backward recomputes the probabilities from it.
"""

from __future__ import annotations

import torch

from . import checks
from .schemas import (ACTIVATION_FWD_ARGS, ACTIVATION_GRAD_ARGS, ACTIVATION_OPS, INFER_OPS, LAYOUT_OPS,
                      argument_names, qualified)


def fake_fwd_acc(query, value):
    """Every forward op (C++ and Triton): out in the accumulator dtype (float32; float64 for float64 inputs),
    so that the autograd's delta is formed from unrounded values; lse [B, N, H] float32."""
    B, N, H, _ = query.shape
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    out = query.new_empty((B, N, H, value.shape[-1]), dtype=acc)
    lse = query.new_empty((B, N, H), dtype=torch.float32)
    return out, lse


def fake_bwd(query, key, value, bias=None):
    """Output metadata of every backward op: contiguous grads shaped like query/key/value/bias
    (grad_bias: an empty tensor of the query's dtype without bias)."""
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
        query.new_empty((0,)) if bias is None else bias.new_empty(bias.shape),
    )


def _delta(grad_out, out, grad_lse, dtype: torch.dtype) -> torch.Tensor:
    """delta = rowsum(dO * O) - dLSE: the softmax-backward correction term of both ops. Summed in
    float64 (every ds = p (dp - delta) inherits its rounding, and dq sums many of them), from the
    op's out, which every forward op returns unrounded (float32 accumulators): from an out
    rounded to float16/bfloat16 the gradients of a softmax would be off by that rounding. Passed
    as float32, or float64 for float64 inputs so that their gradients stay float64-accurate."""
    delta = (grad_out.double() * out.double()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.double()
    return delta.to(torch.float64 if dtype == torch.float64 else torch.float32)


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
    def forward(ngrads, *tensors):
        return tuple(t.clone() for t in tensors[:ngrads])

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
              **{n: args[n] for n in index_names}, out=out, lse=lse, bias=args.get("bias"))

    def backward(ctx, grad_out, grad_lse):
        s = _saved(ctx)
        query, out = s["query"], s["out"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        delta = _delta(grad_out, out, grad_lse, query.dtype)
        index = ((s["lengths"], s["mask"]) if layout == "padded"
                 else (s["offsets"], ctx.max_length))
        bias = s["bias"]
        dq, dk, dv, dbias = bwd_op(grad_out, query, s["key"], s["value"], *index, s["lse"], delta,
                                   ctx.scale, bias)
        grads = (dq, dk, dv) if bias is None else (dq, dk, dv, dbias)
        if torch.is_grad_enabled():  # create_graph=True: these gradients may be differentiated
            tied = (grad_out, query, s["key"], s["value"]) + (() if bias is None else (bias,))
            grads = _NoDoubleBackward.apply(len(grads), *grads, *tied)
        dq, dk, dv = grads[:3]
        return dq, dk, dv, None, None, None, (grads[3] if bias is not None else None)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_fakes_and_autograd(prefix: str = "") -> None:
    """Fake impls for the four ops attnkern::<prefix><op> of SCHEMAS, and autograd for the two
    forward ops. prefix "" are the C++ ops, "triton_" the Triton ones."""
    for layout, (fwd, bwd) in LAYOUT_OPS.items():
        fwd_names, bwd_names = argument_names(fwd), argument_names(bwd)

        # The fake impls check what the C++ kernels check (a meta tensor mixed with real ones
        # reaches the fake impl instead of a kernel): the same errors, never garbage.
        def fake_forward(*args, _names=fwd_names, _layout=layout, **kwargs):
            a = _bound(_names, args, kwargs)
            checks.fwd(_layout, a)
            # The C++ and the Triton ops both return their float32 result as out.
            return fake_fwd_acc(a["query"], a["value"])

        def fake_backward(*args, _names=bwd_names, _layout=layout, **kwargs):
            a = _bound(_names, args, kwargs)
            checks.bwd_extras(checks.fwd(_layout, a), a["query"], a["grad_out"], a["lse"], a["delta"])
            return fake_bwd(a["query"], a["key"], a["value"], a.get("bias"))

        torch.library.register_fake(qualified(prefix + fwd), fake_forward)
        torch.library.register_fake(qualified(prefix + bwd), fake_backward)
        register_pool_autograd(qualified(prefix + fwd),
                               getattr(torch.ops.attnkern, prefix + bwd), layout)


def register_infer_fakes() -> None:
    """Fake impls of the C++ inference ops (INFER_OPS: the forward's checks and results) and an
    autograd that refuses a gradient: they run P V with P rounded, which the backward's delta
    cannot take (the public function calls them only where no gradient can be taken)."""
    for layout, name in INFER_OPS.items():
        names = argument_names(name)

        def fake_infer(*args, _names=names, _layout=layout, **kwargs):
            a = _bound(_names, args, kwargs)
            checks.fwd(_layout, a)
            return fake_fwd_acc(a["query"], a["value"])

        def backward(ctx, *grads, _name=name, _layout=layout):
            raise RuntimeError(
                "attnkern: %s has no gradient (it rounds the probabilities for P V); call "
                "attention_pool with grad mode on and an input that requires grad, or the forward op "
                "%s" % (qualified(_name), qualified(LAYOUT_OPS[_layout][0])))

        torch.library.register_fake(qualified(name), fake_infer)
        torch.library.register_autograd(qualified(name), backward, setup_context=lambda ctx, inputs, output: None)


# ---- activation-unit pooling (DIN) --------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_activation_fwd(query, value):
    """Output metadata of the activation-unit forward: out [B, N, Dv] and lse [B, N], both in the
    accumulator dtype (float64 for float64 inputs, else float32: out is unrounded, as the
    attention op's, so that the autograd's delta is formed from unrounded values)."""
    B, N, _ = query.shape
    acc = _acc_dtype(query.dtype)
    return (query.new_empty((B, N, value.shape[-1]), dtype=acc), query.new_empty((B, N), dtype=acc))


def fake_activation_bwd(query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2):
    """Output metadata of the activation-unit backward: grads shaped like the inputs, [0] for
    absent optional ones."""
    def like(t):
        return query.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return tuple(like(t) for t in (query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2))


def register_activation_autograd(fwd_name: str, bwd_op) -> None:
    """Attaches autograd to activation-unit forward op `fwd_name` (qualified), whose backward is
    the registered `bwd_op`. The forward saves out and lse; the backward op recomputes the MLP."""

    def setup_context(ctx, inputs, output):
        args = dict(zip(ACTIVATION_FWD_ARGS, inputs))
        out, lse = output
        ctx.max_length = args["max_length"]
        ctx.activation = args["activation"]
        ctx.softmax = args["softmax"]
        names = tuple(n for n in ACTIVATION_FWD_ARGS if isinstance(args[n], torch.Tensor))
        ctx.absent = tuple(n for n in ACTIVATION_FWD_ARGS if args[n] is None)
        _save(ctx, **{n: args[n] for n in names}, out=out, lse=lse)

    def backward(ctx, grad_out, grad_lse):
        s = _saved(ctx)
        for n in ctx.absent:
            s[n] = None
        query, out = s["query"], s["out"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        # Read by the backward op only with softmax (lse is 0 without it).
        delta = _delta(grad_out, out, grad_lse if ctx.softmax else None, query.dtype)
        grads = bwd_op(grad_out, query, s["key"], s["value"], s["lengths"], s["mask"], s["offsets"],
                       ctx.max_length, s["w1"], s["b1"], s["w2"], s["b2"], s["w_out"], s["b_out"],
                       s["act1"], s["act2"], ctx.activation, ctx.softmax, s["lse"], delta)
        by_name = dict(zip(ACTIVATION_GRAD_ARGS, grads))
        return tuple(by_name[n] if n in by_name and s.get(n) is not None else None
                     for n in ACTIVATION_FWD_ARGS)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_activation_fakes_and_autograd(prefix: str = "") -> None:
    """Fake impls and autograd of attnkern::<prefix>activation_unit_pool_fwd/_bwd (prefix "": the
    C++ ops; a Python backend such as Triton calls this with its own prefix)."""
    fwd, bwd = ACTIVATION_OPS
    fwd_names, bwd_names = argument_names(fwd), argument_names(bwd)

    # As the attention pool's: the fake impls check what the kernels check.
    def fake_forward(*args, **kwargs):
        a = _bound(fwd_names, args, kwargs)
        checks.activation_unit_fwd(a)
        return fake_activation_fwd(a["query"], a["key"] if a["value"] is None else a["value"])

    def fake_backward(*args, **kwargs):
        a = _bound(bwd_names, args, kwargs)
        checks.activation_unit_bwd_extras(checks.activation_unit_fwd(a), a["query"], a["grad_out"], a["lse"],
                                          a["delta"])
        return fake_activation_bwd(*(a[n] for n in ACTIVATION_GRAD_ARGS))

    torch.library.register_fake(qualified(prefix + fwd), fake_forward)
    torch.library.register_fake(qualified(prefix + bwd), fake_backward)
    register_activation_autograd(qualified(prefix + fwd), getattr(torch.ops.attnkern, prefix + bwd))
