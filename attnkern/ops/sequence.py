"""The sequence-attention ops (attnkern.sequence_attention): their schemas on the Python side,
fake impls and autograd, and the op a fused backend runs.

The C++ ops attnkern::sequence_attention_fwd/_bwd (csrc/sequence_attention_ops.cpp) are the
source of truth; a Python backend (Triton) declares attnkern::<prefix>sequence_attention_fwd/_bwd
with SEQUENCE_SCHEMAS and calls `register_sequence_fakes_and_autograd(prefix)`. The layout of
the arguments is docs/sequence_attention.md."""

from __future__ import annotations

import torch

from .autograd import _NoDoubleBackward, _delta, _save, _saved
from .availability import CUDA_EMU_PREFIX, backend_info, cuda_emulated
from .schemas import TRITON_PREFIX, qualified

_ARGS = (
    "Tensor query, Tensor key, Tensor value, Tensor starts, Tensor lengths, int max_length, "
    "Tensor? num_targets, int contextual_len, int max_attn_len, bool causal, bool silu, "
    "float scale, Tensor? attn_scale, float? attn_scale_value, Tensor? query_times, "
    "Tensor? key_times, Tensor? time_table, Tensor? time_bounds, Tensor? position_table, "
    "Tensor? bias"
)
SEQUENCE_SCHEMAS = {
    "sequence_attention_fwd": "(%s) -> (Tensor out, Tensor lse)" % _ARGS,
    "sequence_attention_bwd": (
        "(Tensor grad_out, Tensor lse, Tensor delta, %s) -> (Tensor grad_query, Tensor grad_key, "
        "Tensor grad_value, Tensor grad_time_table, Tensor grad_position_table, Tensor grad_bias)"
        % _ARGS),
}
SEQUENCE_OPS = ("sequence_attention_fwd", "sequence_attention_bwd")
# The forward's arguments in order (those of the backward after grad_out, lse, delta).
SEQUENCE_FWD_ARGS = tuple(a.split()[-1] for a in _ARGS.split(", "))
# The differentiable forward arguments, in the order of the backward's gradients.
SEQUENCE_GRAD_ARGS = ("query", "key", "value", "time_table", "position_table", "bias")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_check(a: dict) -> None:
    """The shape checks the fake impls share with the kernels (what shapes the outputs)."""
    q, k, v = a["query"], a["key"], a["value"]
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("attnkern: query, key and value must be [T, H(kv), D], got %s, %s, %s"
                         % (list(q.shape), list(k.shape), list(v.shape)))
    T, H = q.shape[0], q.shape[1]
    if k.shape[0] != T or v.shape[0] != T or k.shape[2] != q.shape[2] or \
            v.shape[1] != k.shape[1] or k.shape[1] < 1 or H % k.shape[1] != 0:
        raise ValueError("attnkern: key must be [T, Hkv, Dk] and value [T, Hkv, Dv] with Hkv "
                         "dividing H, got query %s, key %s, value %s"
                         % (list(q.shape), list(k.shape), list(v.shape)))
    for name in ("key", "value", "time_table", "position_table", "bias"):
        t = a.get(name)
        if t is not None and t.dtype != q.dtype:
            raise TypeError("attnkern: %s must have the dtype of query (%s), got %s"
                            % (name, q.dtype, t.dtype))


def register_sequence_fakes_and_autograd(prefix: str = "") -> None:
    fwd, bwd = (qualified(prefix + n) for n in SEQUENCE_OPS)
    bwd_op = getattr(torch.ops.attnkern, prefix + SEQUENCE_OPS[1])
    bwd_names = ("grad_out", "lse", "delta") + SEQUENCE_FWD_ARGS

    def fake_forward(*args, **kwargs):
        a = dict(zip(SEQUENCE_FWD_ARGS, args), **kwargs)
        _fake_check(a)
        q, v = a["query"], a["value"]
        acc = _acc(q.dtype)
        return (q.new_empty((q.shape[0], q.shape[1], v.shape[2]), dtype=acc),
                q.new_empty((q.shape[0], q.shape[1]), dtype=acc))

    def fake_backward(*args, **kwargs):
        a = dict(zip(bwd_names, args), **kwargs)
        _fake_check(a)
        return tuple(a["query"].new_empty((0,)) if a[n] is None else a[n].new_empty(a[n].shape)
                     for n in SEQUENCE_GRAD_ARGS)

    torch.library.register_fake(fwd, fake_forward)
    torch.library.register_fake(bwd, fake_backward)

    def setup_context(ctx, inputs, output):
        args = dict(zip(SEQUENCE_FWD_ARGS, inputs))
        out, lse = output
        ctx.tensor_names = tuple(n for n, x in args.items() if isinstance(x, torch.Tensor))
        ctx.others = {n: x for n, x in args.items() if not isinstance(x, torch.Tensor)}
        _save(ctx, **{n: args[n] for n in ctx.tensor_names}, out=out, lse=lse)

    def backward(ctx, grad_out, grad_lse):
        s = _saved(ctx)
        out, lse = s.pop("out"), s.pop("lse")
        args = dict(ctx.others, **s)
        query = args["query"]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.to(query.dtype)
        if args["silu"]:
            delta = lse  # not read
        else:
            delta = _delta(grad_out, out, grad_lse, query.dtype).to(lse.dtype)
        grads = bwd_op(grad_out, lse, delta, *(args[n] for n in SEQUENCE_FWD_ARGS))
        if torch.is_grad_enabled():
            dq, dk, dv = _NoDoubleBackward.apply(grads[0], grads[1], grads[2], grad_out, query,
                                                 args["key"], args["value"])
            grads = (dq, dk, dv) + tuple(grads[3:])
        by_name = dict(zip(SEQUENCE_GRAD_ARGS, grads))
        return tuple(by_name[n] if n in by_name and args.get(n) is not None else None
                     for n in SEQUENCE_FWD_ARGS)

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _prefix(backend: str) -> str:
    if backend == "triton":
        return TRITON_PREFIX
    # The CUDA emulation build's kernels are the CPU kernels of attnkern::cuda_emu_<op>.
    return CUDA_EMU_PREFIX if backend == "cuda" and cuda_emulated() else ""


_missing: dict = {}


@torch.compiler.assume_constant_result
def sequence_kernels_missing(backend: str) -> bool:
    """True when this build has no sequence-attention kernels for fused `backend`. Probed once
    per backend; under torch.compile evaluated eagerly and taken as a constant."""
    if backend not in _missing:
        name = _prefix(backend) + SEQUENCE_OPS[0]
        key = {"cpu": "CPU", "cuda": "CPU" if _prefix(backend) else "CUDA"}.get(backend)
        has = hasattr(torch.ops.attnkern, name)
        if has and key is not None:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(qualified(name), key)
        _missing[backend] = not has
    return _missing[backend]


def sequence_fused_op(backend: str):
    """The registered sequence-attention forward op of fused `backend`, or a RuntimeError saying
    this build has none for it."""
    if backend == "triton":
        from . import triton  # noqa: F401  (registers attnkern::triton_* on first use)
    name = _prefix(backend) + SEQUENCE_OPS[0]
    if sequence_kernels_missing(backend):
        raise RuntimeError(
            "attnkern backend %r has no sequence_attention kernels in this build; use "
            "backend='reference' (or 'cpu' for CPU tensors)" % backend)
    return getattr(torch.ops.attnkern, name)


def _register() -> bool:
    if not backend_info("cpu").available or not hasattr(torch.ops.attnkern, SEQUENCE_OPS[0]):
        return False
    register_sequence_fakes_and_autograd("")
    return True


SEQUENCE_EXTENSION_OPS = _register()
