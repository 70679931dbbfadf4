"""Dice's batch statistics op pair attnkern::dice_statistics_fwd/_bwd (schemas in
csrc/dice_statistics_ops.cpp, CPU kernel csrc/cpu/dice_statistics_cpu.cpp): their fake impls, so
that torch.compile(fullgraph=True) traces through them, and their autograd (the backward op
recomputes the layers; nothing [B, L, units] is saved)."""

from __future__ import annotations

import torch

from .availability import extension
from .schemas import qualified

DICE_FWD, DICE_BWD = "dice_statistics_fwd", "dice_statistics_bwd"
_FWD_ARGS = ("query", "key", "lengths", "mask", "offsets", "max_length", "all_positions", "w1", "b1", "act1",
             "w2", "b2")
_GRAD_ARGS = ("query", "key", "w1", "b1", "act1", "w2", "b2")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(query, key, lengths, mask, offsets, max_length, all_positions, w1, b1, act1, w2, b2):
    if query.dim() != 3 or w1.dim() != 2 or (w2 is not None and w2.dim() != 2):
        raise ValueError("attnkern: query must be [B, N, E], w1 [H1, 4E] and w2 [H2, H1], got %s, %s and %s"
                         % (list(query.shape), list(w1.shape), None if w2 is None else list(w2.shape)))
    if key.dtype != query.dtype:
        raise TypeError("attnkern: key must have the dtype of query (%s), got %s" % (query.dtype, key.dtype))
    h = (w1 if w2 is None else w2).shape[0]
    return (query.new_empty((h,), dtype=_acc(query.dtype)), query.new_empty((h,), dtype=_acc(query.dtype)))


def _fake_backward(grad_mean, grad_var, query, key, lengths, mask, offsets, max_length, all_positions, w1, b1,
                   act1, w2, b2, mean):
    return tuple(query.new_empty((0,)) if t is None else t.new_empty(t.shape)
                 for t in (query, key, w1, b1, act1, w2, b2))


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    ctx.max_length, ctx.all_positions = args["max_length"], args["all_positions"]
    ctx.absent = tuple(n for n in _FWD_ARGS if args[n] is None)
    names = tuple(n for n in _FWD_ARGS if isinstance(args[n], torch.Tensor))
    ctx.saved_names = names + ("mean",)
    ctx.save_for_backward(*(args[n] for n in names), output[0])


def _backward(ctx, grad_mean, grad_var):
    s = dict(zip(ctx.saved_names, ctx.saved_tensors))
    for n in ctx.absent:
        s[n] = None
    mean = s["mean"]
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype)
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.to(mean.dtype)
    grads = getattr(torch.ops.attnkern, DICE_BWD)(
        grad_mean, grad_var, s["query"], s["key"], s["lengths"], s["mask"], s["offsets"], ctx.max_length,
        ctx.all_positions, s["w1"], s["b1"], s["act1"], s["w2"], s["b2"], mean)
    by_name = dict(zip(_GRAD_ARGS, grads))
    return tuple(by_name[n] if n in by_name and s.get(n) is not None else None for n in _FWD_ARGS)


def _register() -> bool:
    mod, _ = extension()
    if mod is None or not hasattr(torch.ops.attnkern, DICE_FWD):
        return False
    torch.library.register_fake(qualified(DICE_FWD), _fake_forward)
    torch.library.register_fake(qualified(DICE_BWD), _fake_backward)
    torch.library.register_autograd(qualified(DICE_FWD), _backward, setup_context=_setup_context)
    return True


DICE_KERNELS = _register()


def dice_statistics_op():
    """The registered forward op of the C++ extension (CPU kernel), differentiable."""
    return getattr(torch.ops.attnkern, DICE_FWD)
