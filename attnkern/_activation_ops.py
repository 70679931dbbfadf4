"""Registered-op plumbing of activation-unit pooling: fake (meta) impls and autograd.

The C++ ops attnkern::activation_unit_pool_fwd / _bwd are declared in
csrc/activation_unit_ops.cpp. A fused backend registered as Python custom ops with the same
signatures (e.g. attnkern::triton_activation_unit_pool_fwd / _bwd) gets its fake impls from
`fake_fwd` / `fake_bwd` and its autograd from `register_activation_autograd`, which calls only
registered ops: the forward saves out and lse, the backward recomputes the MLP from the inputs.
"""

from __future__ import annotations

import torch

from ._activation_inputs import FWD_ARGS, GRAD_ARGS
from ._backends import extension

FWD_OP = "attnkern::activation_unit_pool_fwd"
BWD_OP = "attnkern::activation_unit_pool_bwd"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_fwd(query, value):
    """Output metadata of the forward: out [B, N, Dv] (query dtype), lse [B, N] (acc dtype)."""
    B, N, _ = query.shape
    return (query.new_empty((B, N, value.shape[-1])),
            query.new_empty((B, N), dtype=acc_dtype(query.dtype)))


def fake_bwd(query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2):
    """Output metadata of the backward: contiguous grads shaped like the inputs; [0] for absent."""
    def like(t):
        return query.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return tuple(like(t) for t in (query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2))


def register_activation_autograd(fwd_name: str, bwd_op) -> None:
    """Attaches autograd to forward op `fwd_name` (FWD_ARGS signature), whose backward is the
    registered `bwd_op` (the signature of attnkern::activation_unit_pool_bwd)."""

    def setup_context(ctx, inputs, output):
        args = dict(zip(FWD_ARGS, inputs))
        out, lse = output
        ctx.max_length = args["max_length"]
        ctx.activation = args["activation"]
        ctx.softmax = args["softmax"]
        names = tuple(n for n in FWD_ARGS if isinstance(args[n], torch.Tensor))
        ctx.saved_names = names + ("out", "lse")
        ctx.absent = tuple(n for n in FWD_ARGS if args[n] is None)
        ctx.save_for_backward(*[args[n] for n in names], out, lse)

    def backward(ctx, grad_out, grad_lse):
        s = dict(zip(ctx.saved_names, ctx.saved_tensors))
        for n in ctx.absent:
            s[n] = None
        query, out, lse = s["query"], s["out"], s["lse"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        acc = acc_dtype(query.dtype)
        # delta = rowsum(dO * O): the softmax-backward correction term (unused without softmax).
        delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
        if ctx.softmax and grad_lse is not None:
            delta = delta - grad_lse.to(acc)
        grads = bwd_op(grad_out, query, s["key"], s["value"], s["lengths"], s["mask"], s["offsets"],
                       ctx.max_length, s["w1"], s["b1"], s["w2"], s["b2"], s["w_out"], s["b_out"],
                       s["act1"], s["act2"], ctx.activation, ctx.softmax, lse, delta)
        by_name = dict(zip(GRAD_ARGS, grads))
        return tuple(by_name[n] if n in by_name and s.get(n) is not None else None for n in FWD_ARGS)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _register_extension_ops() -> bool:
    mod, _ = extension()
    if mod is None or not hasattr(torch.ops.attnkern, "activation_unit_pool_fwd"):
        return False

    @torch.library.register_fake(FWD_OP)
    def _(query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out, b_out,
          act1, act2, activation, softmax):
        return fake_fwd(query, value)

    @torch.library.register_fake(BWD_OP)
    def _(grad_out, query, key, value, lengths, mask, offsets, max_length, w1, b1, w2, b2, w_out,
          b_out, act1, act2, activation, softmax, lse, delta):
        return fake_bwd(query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2)

    register_activation_autograd(FWD_OP, torch.ops.attnkern.activation_unit_pool_bwd)
    return True


EXTENSION_OPS = _register_extension_ops()


_missing: dict = {}


@torch.compiler.assume_constant_result
def _missing_kernels(backend: str) -> bool:
    """True when this build has no activation-unit kernels for `backend`. Probed once per
    backend; under torch.compile evaluated eagerly and taken as a constant."""
    if backend not in _missing:
        if backend == "triton":
            has = hasattr(torch.ops.attnkern, "triton_activation_unit_pool_fwd")
        else:
            try:
                has = EXTENSION_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(FWD_OP, backend.upper())
            except RuntimeError:
                has = False
        _missing[backend] = not has
    return _missing[backend]


def fused_op(backend: str):
    """The registered forward op of a fused backend ("cpu", "cuda", "triton"), or a RuntimeError
    saying that this build has no activation-unit kernels for it."""
    if _missing_kernels(backend):
        raise RuntimeError(
            "attnkern backend %r has no activation_unit_pool kernels in this build; use "
            "backend='reference' (or 'cpu' for CPU tensors)" % backend)
    if backend == "triton":
        return torch.ops.attnkern.triton_activation_unit_pool_fwd
    return torch.ops.attnkern.activation_unit_pool_fwd
