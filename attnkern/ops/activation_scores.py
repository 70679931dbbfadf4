"""The activation unit's weights as a fused op: attnkern::<prefix>activation_unit_scores_fwd.

The forward is the activation-unit forward kernel's scoring pass with the scores written out
instead of pooled (csrc/activation_unit_ops.cpp states the schema and results). It has no backward
op of its own: the gradient of sum_l w_l dW_l w.r.t. the query, key, MLP weights and activation
parameters is exactly the pooling backward's with the upstream gradient as the values. Per
query n, with Dv = N queries taken together (chunks of at most MAX_QUERIES_PER_CALL):

    value[b, l, j] = dW[b, j, l]     (jagged: value[t, j] = dW[t, j])
    grad_out[b, n] = e_n             (so that out[b, n, n] = sum_l w[b, n, l] dW[b, n, l])
    delta[b, n]    = sum_l w[b, n, l] dW[b, n, l] - dlse[b, n]    (read with softmax only)

and grad_value is dropped. So nothing [.., L] is saved beyond the output, and every backend that
has the pooling backward differentiates its scores.
"""

from __future__ import annotations

import torch

from . import checks
from .autograd import _NoDoubleBackward, _acc_dtype, _bound, _save, _saved
from .schemas import ACTIVATION_GRAD_ARGS, ACTIVATION_SCORES_SCHEMAS, argument_names, qualified

SCORES_OP = "activation_unit_scores_fwd"
SCORES_SCHEMAS = ACTIVATION_SCORES_SCHEMAS
SCORES_ARGS = argument_names(SCORES_OP)
# The pooling backward's Dv limit (csrc/op_limits.h): queries beyond it go in further calls.
MAX_QUERIES_PER_CALL = 256
_PARAMS = ("w1", "b1", "w2", "b2", "w_out", "b_out", "act1", "act2")


def fake_scores(*args, **kwargs):
    """Output metadata: scores padded [B, N, L] / jagged [T, N] and lse [B, N], in the accumulator
    dtype (float64 for float64 inputs, else float32); the forward's checks first."""
    a = _bound(SCORES_ARGS, args, kwargs)
    checks.activation_unit_fwd({**a, "value": None})
    query, key = a["query"], a["key"]
    B, N, _ = query.shape
    acc = _acc_dtype(query.dtype)
    shape = (key.shape[0], N) if a["offsets"] is not None else (B, N, key.shape[1])
    return query.new_empty(shape, dtype=acc), query.new_empty((B, N), dtype=acc)


def _row_sums(x: torch.Tensor, offsets) -> torch.Tensor:
    """Per row b and query n, the sum over the row's positions of x (padded [B, N, L] -> [B, N];
    jagged [T, N] -> [B, N] by the offsets, shapes static for torch.compile)."""
    if offsets is None:
        return x.sum(-1)
    csum = torch.cat([x.new_zeros((1, x.shape[1])), x.cumsum(0)])
    o = offsets.long()
    return csum[o[1:]] - csum[o[:-1]]


def register_scores_autograd(fwd_name: str, bwd_op) -> None:
    """Autograd of scores op `fwd_name` (qualified) through the registered pooling backward
    `bwd_op` (the module docstring's identity)."""

    def setup_context(ctx, inputs, output):
        args = dict(zip(SCORES_ARGS, inputs))
        scores, lse = output
        ctx.max_length, ctx.activation, ctx.softmax = args["max_length"], args["activation"], args["softmax"]
        ctx.absent = tuple(n for n in SCORES_ARGS if args[n] is None)
        _save(ctx, **{n: args[n] for n in SCORES_ARGS if isinstance(args[n], torch.Tensor)}, scores=scores, lse=lse)

    def backward(ctx, grad_scores, grad_lse):
        s = {**dict.fromkeys(ctx.absent), **_saved(ctx)}
        query, scores, offsets = s["query"], s["scores"], s["offsets"]
        grad_scores = torch.zeros_like(scores) if grad_scores is None else grad_scores
        # float16/bfloat16: the backward runs on float32 copies (exact), so that dW, the values
        # here, is not rounded to the inputs' dtype.
        dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
        t = {n: (None if s[n] is None else s[n].to(dtype)) for n in ("query", "key") + _PARAMS}
        delta_dtype = _acc_dtype(dtype)
        B, N, _ = query.shape
        dq_parts, total = [], None
        for c0 in range(0, N, MAX_QUERIES_PER_CALL):
            c1 = min(N, c0 + MAX_QUERIES_PER_CALL)
            n = c1 - c0
            dw = grad_scores[:, c0:c1]
            value = (dw if offsets is not None else dw.transpose(1, 2)).to(dtype).contiguous()
            grad_out = torch.eye(n, dtype=dtype, device=query.device).expand(B, n, n).contiguous()
            if ctx.softmax:  # summed in float64, as the pooling autograd's delta
                delta = _row_sums(scores[:, c0:c1].double() * dw.double(), offsets)
                if grad_lse is not None:
                    delta = delta - grad_lse[:, c0:c1].double()
            else:  # not read by the backward op
                delta = query.new_zeros((B, n), dtype=delta_dtype)
            grads = bwd_op(grad_out, t["query"][:, c0:c1], t["key"], value, s["lengths"], s["mask"], offsets,
                           ctx.max_length, t["w1"], t["b1"], t["w2"], t["b2"], t["w_out"], t["b_out"], t["act1"],
                           t["act2"], ctx.activation, ctx.softmax, s["lse"][:, c0:c1].contiguous(),
                           delta.to(delta_dtype))
            g = dict(zip(ACTIVATION_GRAD_ARGS, grads))
            dq_parts.append(g.pop("query"))
            g.pop("value")
            total = g if total is None else {k: total[k] + v for k, v in g.items()}
        total["query"] = dq_parts[0] if len(dq_parts) == 1 else torch.cat(dq_parts, dim=1)
        names = tuple(n for n in ("query", "key") + _PARAMS if s[n] is not None)
        out = tuple(total[n].to(s[n].dtype) for n in names)
        if torch.is_grad_enabled():  # create_graph=True: these gradients may be differentiated
            out = _NoDoubleBackward.apply(len(out), *out, grad_scores, *(s[n] for n in names))
        by_name = dict(zip(names, out))
        return tuple(by_name.get(n) for n in SCORES_ARGS)

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_scores(prefix: str, bwd_name: str = "activation_unit_pool_bwd") -> None:
    """Fake impl and autograd of attnkern::<prefix>activation_unit_scores_fwd, whose backward is
    attnkern::<prefix><bwd_name>."""
    torch.library.register_fake(qualified(prefix + SCORES_OP), fake_scores)
    register_scores_autograd(qualified(prefix + SCORES_OP), getattr(torch.ops.attnkern, prefix + bwd_name))
