"""The public function: validation, layout normalisation, backend dispatch. Nothing else."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._jagged import unpack_history
from ._validation import Problem, check_values, checked_index_values, validate, validate_activation_unit
from .ops import BACKENDS, BackendUnavailable, activation_fused_op, backend_info, fused_op, infer_op
from .ops.availability import cuda_emulated, triton_interpret
from .reference import activation_unit_pool_ref, attention_pool_ref

_resolved: dict = {}
# Backends whose registered ops read and check lengths/offsets values themselves (the C++ CPU
# launcher; the Triton ops through check_values), so checking them here too would do the work
# twice. The "cuda" ops clamp instead of checking, and "reference" has no op.
_OPS_CHECK_VALUES = ("cpu", "triton")


def _resolve_uncached(backend: str, device_type: str) -> Tuple[str, str]:
    if backend == "auto":
        if device_type == "cuda":
            for name in ("cuda", "triton"):
                if backend_info(name).available:
                    return name, ""
            return "reference", ""
        if device_type == "cpu" and backend_info("cpu").available:
            return "cpu", ""
        return "reference", ""
    return backend, backend_info(backend).reason


@torch.compiler.assume_constant_result
def _resolve_name(backend: str, device_type: str) -> Tuple[str, str]:
    """(the backend that runs (backend, device type), why it can't run: "" when it can).
    Resolved once per pair; under torch.compile it is evaluated eagerly and taken as a
    constant, so the availability probes are never traced."""
    resolved = _resolved.get((backend, device_type))
    if resolved is None:
        resolved = _resolve_uncached(backend, device_type)
        _resolved[(backend, device_type)] = resolved
    return resolved


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def _resolve(backend, query: torch.Tensor) -> str:
    if not isinstance(backend, str):
        raise TypeError("backend must be a str, got %s" % type(backend).__name__)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(
            "unknown backend %r; expected one of %s" % (backend, ", ".join(("auto",) + BACKENDS))
        )
    dev = query.device.type
    name, unavailable = _resolve_name(backend, dev)
    if unavailable:
        raise BackendUnavailable(name, unavailable)
    if name == "cpu" and dev != "cpu":
        raise ValueError("backend 'cpu' needs CPU tensors, got query on %s" % query.device)
    if name == "cuda" and dev != "cuda" and not (dev == "cpu" and cuda_emulated()):
        raise ValueError("backend 'cuda' needs CUDA tensors, got query on %s" % query.device)
    if name == "triton" and dev != "cuda" and not (dev == "cpu" and triton_interpret()):
        raise ValueError(
            "backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
            "got query on %s" % query.device
        )
    if name in ("cuda", "triton") and query.dtype == torch.float64:
        raise TypeError(
            "backend %r supports float16, bfloat16 and float32, got float64 "
            "(use backend='cpu' or 'reference' for float64)" % name
        )
    return name


def _resolve_for_transforms(backend, query: torch.Tensor) -> str:
    """`_resolve`, and the reference under torch.func transforms: the fused ops have no vmap
    rule, so transforms (jacrev, vmap, grad, ...) cannot run them; "auto" takes the reference
    there, an explicit fused backend is an error that says so."""
    name = _resolve(backend, query)
    if name != "reference" and _functorch_active():
        if backend != "auto":
            raise RuntimeError(
                "attnkern: torch.func transforms (vmap, grad, jacrev, ...) are not supported by "
                "the %r backend; use backend='reference' (or 'auto', which picks it there)" % name)
        name = "reference"
    return name


def _fold_query_heads(query: torch.Tensor, Hkv: int) -> torch.Tensor:
    """[B, N, H, Dk] -> [B, N * G, Hkv, Dk] with G = H // Hkv: the G query heads that share a
    K/V head become G more candidates of that head, so the fused kernels (one K/V head per
    query head) read each K/V row once per K/V head and their dK/dV sum over the group. A copy
    of the query only; autograd maps the gradient back through the reshape."""
    # Only the head counts (model constants) appear in the shapes, never B or N: a traced or
    # exported graph (TorchScript, ONNX) keeps its batch and candidate sizes dynamic.
    G = query.shape[2] // Hkv
    return query.unflatten(2, (Hkv, G)).transpose(2, 3).flatten(1, 2)


def _fold_bias_heads(bias: torch.Tensor, H: int, Hkv: int) -> torch.Tensor:
    """The bias of _fold_query_heads' folded queries (G = H // Hkv), for the ops' rule "query n
    reads row n % Nb" (docs/contract.md section 5): padded [B, Nb, H, L] -> [B, Nb * G, Hkv, L],
    jagged [T, Nb, H] -> [T, Nb * G, Hkv] (folded query n * G + g reads its own row with
    Nb = N, its head's g with Nb = 1). A bias of every head (Hb = 1) shared by the queries needs
    no fold; one per query has each row repeated G times (the rule cannot say "row n // G")."""
    G = H // Hkv
    if G > 1 and bias.shape[2] == H:
        bias = bias.unflatten(2, (Hkv, G)).transpose(2, 3).flatten(1, 2)
    elif G > 1 and bias.shape[1] > 1:
        bias = bias.repeat_interleave(G, dim=1)
    return bias.contiguous()


def _unfold_query_heads(x: torch.Tensor, G: int) -> torch.Tensor:
    """The inverse of _fold_query_heads (group size G) for out [B, N * G, Hkv, Dv] or
    lse [B, N * G, Hkv]."""
    x = x.unflatten(1, (-1, G)).transpose(2, 3)  # [B, N, Hkv, G, ...]
    return x.flatten(2, 3)


def _no_gradient(*tensors: Optional[torch.Tensor]) -> bool:
    """True when no gradient can be taken of a call's result: grad mode off (torch.no_grad,
    torch.inference_mode) or no input that requires one. torch.compile guards on both (the grad
    mode and each input's requires_grad), and torch.export records the op this picks, so a
    compiled or exported graph takes the path its call would take eagerly."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _pool_op(name: str, layout: str, query, key, value, bias):
    """The registered forward op that runs a call: the cpu backend's inference op (P V with P
    rounded to the input dtype, docs/serving.md) for float16/bfloat16 calls of which no gradient
    can be taken, else the backend's forward op."""
    if (name == "cpu" and query.dtype in (torch.float16, torch.bfloat16)
            and _no_gradient(query, key, value, bias)):
        return infer_op(layout)
    return fused_op(name, layout)


def attention_pool(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Masked scaled-dot-product attention pooling (target attention).

    Each query attends over its row's valid keys/values and gets one pooled vector:
    ``out[b, n, h] = sum_l softmax_l(scale * <q[b, n, h], k[b, l, g]>) * v[b, l, g]`` with
    ``g = h // (H // Hkv)``.

    Args:
        query: [B, H, Dk] or [B, N, H, Dk] (N candidate queries sharing one history).
        key: padded [B, L, Hkv, Dk], or jagged [T, Hkv, Dk] together with ``offsets``, or a
            torchrec ``JaggedTensor`` of those values (its offsets are used; no copy). Hkv
            must divide H: query head h uses K/V head h // (H // Hkv) (SDPA's enable_gqa);
            Hkv = H is plain multi-head, Hkv = 1 one K/V head shared by every query head.
            The gradient of a shared K/V head sums over its query heads.
        value: padded [B, L, Hkv, Dv], or jagged [T, Hkv, Dv] (or a ``JaggedTensor``).
        lengths: padded only, [B] int32/int64: row b's valid prefix is ``key[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part (the SDPA convention).
        key_padding_mask: padded only, [B, L] bool, True = the position is padding
            (nn.MultiheadAttention's convention): the same as ``mask=~key_padding_mask``.
            At most one of ``lengths``, ``mask`` and ``key_padding_mask``; with none of them
            all L positions take part. Left-padded histories need a mask (lengths mean a
            prefix). A 0/1 float mask is refused: pass ``m.bool()`` as the one whose polarity
            it has.
        offsets: jagged only, [B+1] int32/int64: row b is ``key[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional int >= every row's length (sizes GPU launches
            without a device sync; needed for the reference backend under torch.compile).
        scale: logit scale, default ``1/sqrt(Dk)``.
        return_lse: also return the log-sum-exp of the scaled logits, [B, H] or [B, N, H] float32.
        bias: optional additive term of the logit, ``scale * <q, k_l> + bias``: padded
            [B, Hb, L] (shared by the N queries of a row) or [B, N, Hb, L]; jagged [T, Hb] or
            [T, N, Hb]; Hb is 1 (shared by the heads) or H; float32 or the query's dtype.
            Differentiable: its gradient is summed over what it was broadcast to and is exactly
            0 at positions outside every row (never read). A -inf bias drops a position; a row
            whose every logit is -inf is empty.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        out [B, H, Dv] or [B, N, H, Dv] in query's dtype (accumulated in float32, float64 for
        float64 inputs), or (out, lse). A row with no valid position (empty history, fully
        masked) gives out = 0 and lse = -inf, and zero gradients.

    Supported: float16, bfloat16, float32 on every backend, float64 on "reference" and "cpu";
    1 <= Dk, Dv <= 256; any strides. Differentiable w.r.t. query, key, value and bias.

    Inference: a bfloat16/float16 call on the "cpu" backend of which no gradient can be taken
    (grad mode off, ``torch.inference_mode``, or no input that requires grad) runs the inference
    op, which may round the probabilities to the input dtype for ``P V`` (at most twice the
    bf16 reference's error; docs/serving.md says where it does and how accurate each path is).
    """
    key, value, offsets = unpack_history(key, value, offsets, lengths=lengths, mask=mask,
                                         key_padding_mask=key_padding_mask)
    prob = validate(query, key, value, lengths, mask, offsets, max_length, scale, return_lse,
                    values=False, key_padding_mask=key_padding_mask, bias=bias)
    if key_padding_mask is not None:
        mask = ~key_padding_mask
    name = _resolve_for_transforms(backend, query)
    if name not in _OPS_CHECK_VALUES:
        check_values(prob, lengths, offsets, max_length)
    if name == "reference" and torch.compiler.is_compiling():
        # check_values cannot read tensors while torch.compile traces: the graph gets an op
        # that checks them when it runs, and the reference reads its indices through that op.
        lengths, offsets = checked_index_values(prob, lengths, offsets, max_length)
    if name == "reference":  # shared K/V heads natively
        out, lse = attention_pool_ref(
            prob.query, key, value, lengths, mask=mask, offsets=offsets,
            max_length=max_length, scale=prob.scale, bias=prob.bias,
        )
    else:
        query4, group = prob.query, prob.H // prob.Hkv
        if group > 1:
            query4 = _fold_query_heads(query4, prob.Hkv)
        # Only an op call with a bias passes one: the ops' schemas without it stay the graph of
        # a call without (exported models).
        extra = () if prob.bias is None else (_fold_bias_heads(prob.bias, prob.H, prob.Hkv),)
        op = _pool_op(name, prob.layout, query4, key, value, prob.bias)
        if prob.layout == "padded":
            out, lse = op(query4, key, value, lengths, mask, prob.scale, *extra)
        else:
            ml = -1 if max_length is None else int(max_length)
            out, lse = op(query4, key, value, offsets, ml, prob.scale, *extra)
        if group > 1:
            out, lse = _unfold_query_heads(out, group), _unfold_query_heads(lse, group)
    out = out.to(prob.query.dtype)  # the C++ ops return their unrounded float32 accumulators
    if prob.squeeze_n:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def activation_unit_pool(
    query: torch.Tensor,
    key: torch.Tensor,
    value: Optional[torch.Tensor],
    weights: Sequence,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    activation: str = "relu",
    activation_params: Optional[Sequence[torch.Tensor]] = None,
    normalize: Optional[str] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DIN's local activation unit, fused: score each valid history position with an MLP over
    ``[q, k, q - k, q * k]`` and pool the values with those weights.

    ``out[b, n] = sum over valid l of w[b, n, l] * value[b, l]`` with
    ``s = MLP([q, k_l, q - k_l, q * k_l])`` and ``w = s`` (``normalize=None``, DIN's raw
    weights) or ``w = softmax over the valid l of s`` (``normalize="softmax"``). The exact math,
    activations and the first-layer split the kernels use are in attnkern.reference (activation_unit_pool_ref).

    Args:
        query: [B, E] or [B, N, E] (N candidate items sharing one history).
        key: padded [B, L, E], or jagged [T, E] together with ``offsets``, or a torchrec
            ``JaggedTensor`` of those values (its offsets are used; no copy).
        value: padded [B, L, Dv] or jagged [T, Dv]; None (or the key tensor itself) pools the
            keys, as DIN does, with one key gradient instead of two summed.
        weights: the MLP's layers as (weight, bias) pairs in nn.Linear's convention: first
            hidden layer ([H1, 4E], [H1]), optionally a second ([H2, H1], [H2]), then the output
            layer ([1, H], [1]). A bias may be None (no bias). 1 <= H1, H2 <= 256.
        lengths: padded only, [B] int32/int64: row b is valid on ``key[b, :lengths[b]]``.
        mask: padded only, [B, L] bool, True = the position takes part. With neither, all L.
        offsets: jagged only, [B+1] int32/int64: row b is ``key[offsets[b]:offsets[b+1]]``.
        max_length: jagged only, optional int >= every row's length.
        activation: "relu" | "sigmoid" | "prelu" | "dice", for every hidden layer.
        activation_params: one tensor per hidden layer: prelu slopes ([H] or a shared [1]);
            Dice's [3, H] (alpha, scale, shift) from ``attnkern.reference.dice_params``
            (Dice with given statistics: the inference form). None for relu/sigmoid.
        normalize: None (raw scores) or "softmax" (masked softmax over the row).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Returns:
        [B, Dv] or [B, N, Dv] in query's dtype (accumulated in float32, float64 for float64).
        A row with no valid position gives 0 and zero gradients. Positions outside a row are
        never read and get exactly zero key/value gradients. Differentiable w.r.t. query, key,
        value, every weight and bias and the activation parameters.

    Non-finite values follow attention_pool's rule on every backend: a NaN or inf at a valid
    position (or in the query or a weight) is never dropped; it reaches the row's output as it
    does in attnkern.reference (NaN where the reference is NaN, inf where it is inf). A row is
    empty (out = 0) only when it has no valid position, or, with softmax, when every valid
    score is -inf; a NaN row is not empty. A NaN at a position outside every row changes
    nothing.

    All floating tensors share query's dtype (float16, bfloat16, float32; float64 on
    "reference" and "cpu") and device. 1 <= E, Dv <= 256; any strides.
    """
    key, value, offsets = unpack_history(key, value, offsets, lengths=lengths, mask=mask)
    prob = validate_activation_unit(query, key, value, weights, lengths, mask, offsets, max_length,
                                    activation, activation_params, normalize)
    name = _resolve(backend, query)
    a = prob.args
    if name not in _OPS_CHECK_VALUES:
        check_values(Problem(query=a["query"], squeeze_n=False, layout=prob.layout, B=prob.B, N=1, H=1,
                             Hkv=1, Dk=1, Dv=1, L=prob.L, scale=1.0),
                     lengths, offsets, max_length)
    if name == "reference":
        out, _ = activation_unit_pool_ref(*a.values())
    else:
        out, _ = activation_fused_op(name)(*a.values())
        out = out.to(a["query"].dtype)  # the fused ops return their unrounded accumulators
    return out.squeeze(1) if prob.squeeze_n else out
