"""The public function: validation, layout normalisation, backend dispatch. Nothing else."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._jagged import unpack_history
from ._quant_validation import float_stand_in, is_quantized_call, validate_quantized
from ._validation import Problem, check_values, checked_index_values, validate, validate_activation_unit
from .ops import BACKENDS, BackendUnavailable, activation_fused_op, activation_scores_op, backend_info, fused_op, infer_op
from .ops.availability import cuda_emulated, triton_interpret
from .ops.quant import QUANT_FWD, quant_op
from .ops.schemas import TRITON_PREFIX
from .ops.weights import weights_kernels_missing, weights_op
from .ops.dice_statistics import DICE_KERNELS, dice_statistics_op
from .reference import (_masked_softmax_parts, activation_unit_pool_ref, activation_unit_weights_ref,
                        attention_pool_quant_ref, attention_pool_ref, attention_weights_ref,
                        masked_scores_ref, padded_valid, token_rows)

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
    key_scale: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    value_scale: Optional[torch.Tensor] = None,
    value_bias: Optional[torch.Tensor] = None,
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
        key_scale, key_bias, value_scale, value_bias: quantized K/V (docs/quantized.md, forward
            only): key/value stored as torch.int8, uint8, float8_e4m3fn or float8_e5m2 (both the
            same), element = data * scale + bias per (position, head) row; float32 of shape
            [B, L, Hkv] (padded) / [T, Hkv] (jagged); the biases are optional (0). Runs on
            "cpu" (query float16/bfloat16/float32) and "reference"; "auto" takes the reference
            where the fused backend has no quantized kernels. Asking for a gradient is a
            ValueError. attnkern.quantize_rows makes these from float rows.

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
    quant = dict(key_scale=key_scale, key_bias=key_bias, value_scale=value_scale, value_bias=value_bias)
    quantized = is_quantized_call(key, value, quant)
    if quantized:
        validate_quantized(query, key, value, quant, bias)
        stored = (key, value)
        key, value = float_stand_in(key, query.dtype), float_stand_in(value, query.dtype)
    prob = validate(query, key, value, lengths, mask, offsets, max_length, scale, return_lse,
                    values=False, key_padding_mask=key_padding_mask, bias=bias)
    if key_padding_mask is not None:
        mask = ~key_padding_mask
    if quantized:
        out, lse = _attention_pool_quant(prob, backend, *stored, quant, lengths, mask, offsets, max_length)
        return _finish(prob, out, lse, return_lse)
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
    return _finish(prob, out, lse, return_lse)


def _finish(prob: Problem, out: torch.Tensor, lse: torch.Tensor, return_lse: bool):
    out = out.to(prob.query.dtype)  # the C++ ops return their unrounded float32 accumulators
    if prob.squeeze_n:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out


def attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The softmax weights of `attention_pool` (the same arguments, without value):
    ``w[b, n, h, l] = softmax_l(scale * <q[b, n, h], k[b, l, g]> + bias)`` over row b's valid
    positions, ``g = h // (H // Hkv)``.

    Args:
        query: [B, H, Dk] or [B, N, H, Dk].
        key: padded [B, L, Hkv, Dk], or jagged [T, Hkv, Dk] with ``offsets`` (or a torchrec
            ``JaggedTensor``).
        lengths, mask, key_padding_mask, offsets, max_length, scale, bias, backend: as in
            `attention_pool` (mask: True = attend; key_padding_mask: True = padding).

    Returns:
        padded [B, H, L] or [B, N, H, L]; jagged [T, H] or [T, N, H] (the weight of each key
        row for its own row's queries). float32, float64 for float64 inputs. Exactly 0 at
        positions that take part in no row (padding, masked, jagged rows past offsets[-1], a
        -inf bias) and on empty rows (no valid position, or every logit -inf); every other row
        sums to 1. A NaN/inf logit at a valid position propagates as in `attention_pool`.
        Differentiable w.r.t. query, key and bias.
    """
    key, _, offsets = unpack_history(key, None, offsets, lengths=lengths, mask=mask,
                                     key_padding_mask=key_padding_mask)
    prob = validate(query, key, key, lengths, mask, offsets, max_length, scale, False,
                    values=False, key_padding_mask=key_padding_mask, bias=bias)
    if key_padding_mask is not None:
        mask = ~key_padding_mask
    name = _resolve_for_transforms(backend, query)
    fused = name != "reference" and not weights_kernels_missing(name, query.device.type)
    if not (fused and name in _OPS_CHECK_VALUES):  # the C++ weights ops check the values themselves
        check_values(prob, lengths, offsets, max_length)
    if torch.compiler.is_compiling() and not fused:
        lengths, offsets = checked_index_values(prob, lengths, offsets, max_length)
    if name == "reference":
        w = attention_weights_ref(prob.query, key, lengths, mask=mask, offsets=offsets,
                                  max_length=max_length, scale=prob.scale, bias=prob.bias)
    elif fused:
        w = _fused_weights(name, prob, key, lengths, mask, offsets, max_length)
    else:
        w = _composite_weights(prob, key, lengths, mask, offsets)
    return w.squeeze(1) if prob.squeeze_n else w


def _fused_weights(name: str, prob: Problem, key, lengths, mask, offsets, max_length) -> torch.Tensor:
    """The weights by backend `name`'s registered weights op (attnkern/ops/weights.py), which sees
    one query head per K/V head: shared K/V heads are folded into the queries as in
    attention_pool."""
    query4, group = prob.query, prob.H // prob.Hkv
    if group > 1:
        query4 = _fold_query_heads(query4, prob.Hkv)
    extra = () if prob.bias is None else (_fold_bias_heads(prob.bias, prob.H, prob.Hkv),)
    op = weights_op(name, prob.layout)
    if prob.layout == "padded":
        w, _ = op(query4, key, lengths, mask, prob.scale, *extra)
    else:
        w, _ = op(query4, key, offsets, -1 if max_length is None else int(max_length), prob.scale, *extra)
    return _unfold_query_heads(w, group) if group > 1 else w


def _composite_weights(prob, key, lengths, mask, offsets) -> torch.Tensor:
    """The weights on a fused backend that has no weights op for the tensors' device (this build
    or that backend lacks one), in PyTorch ops: padded, the reference's masked softmax; jagged,
    per key row without padding the keys (the row max by a segment reduction). The max is a
    shift only (no gradient through it); autograd's softmax backward is
    ``dS = w * (dW - sum_l dW * w)``."""
    if prob.layout == "padded":
        p, _, _, _, safe_denom = _masked_softmax_parts(masked_scores_ref(
            prob.query, key, padded_valid(key, lengths, mask), prob.scale, prob.bias))
        return (p / safe_denom).flatten(2, 3)
    query, H, Hkv = prob.query, prob.H, prob.Hkv
    cdt = torch.float64 if query.dtype == torch.float64 else torch.float32
    T = key.shape[0]
    if prob.B == 0:
        return query.new_zeros((T, prob.N, H), dtype=cdt)
    row, _, inside = token_rows(offsets, T)
    q = query.to(cdt).unflatten(2, (Hkv, H // Hkv))  # [B, N, Hkv, G, Dk]
    s = torch.einsum("tnkgd,tkd->tnkg", q[row], key.to(cdt)).flatten(2, 3) * prob.scale  # [T, N, H]
    if prob.bias is not None:
        s = s + prob.bias.to(cdt)
    s = s.masked_fill(~inside[:, None, None], float("-inf"))
    with torch.no_grad():
        m = s.new_full((prob.B, prob.N, H), float("-inf")).scatter_reduce(
            0, row[:, None, None].expand_as(s), s, "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=cdt, device=m.device))
    p = torch.exp(s - m[row])
    denom = p.new_zeros((prob.B, prob.N, H)).index_add(0, row, p)
    return p / _safe(denom)[row]


def _safe(denom: torch.Tensor) -> torch.Tensor:
    """A softmax denominator with the empty rows' 0 (their every p is 0) replaced by 1."""
    return torch.where(denom != 0, denom, torch.ones((), dtype=denom.dtype, device=denom.device))


# The fused backends with quantized-K/V kernels.
_QUANT_BACKENDS = ("cpu", "cuda", "triton")


def _attention_pool_quant(prob: Problem, backend, key, value, quant: dict, lengths, mask, offsets,
                          max_length):
    """attention_pool's quantized-K/V path (validated): the CPU or triton op, or the reference (which
    "auto" takes for float64 queries and on devices without quantized kernels)."""
    name = _resolve_for_transforms(backend, prob.query)
    f64 = name in _QUANT_BACKENDS and prob.query.dtype == torch.float64
    if name not in _QUANT_BACKENDS + ("reference",) or f64:
        if backend != "auto":
            raise (TypeError if f64 else ValueError)(
                "backend %r has no kernels for %s; use backend='reference' (or 'auto', which picks it)"
                % (name, "float64 queries with quantized key/value" if f64 else "quantized key/value"))
        name = "reference"
    if name not in _OPS_CHECK_VALUES:
        check_values(prob, lengths, offsets, max_length)
    if name == "reference" and torch.compiler.is_compiling():
        lengths, offsets = checked_index_values(prob, lengths, offsets, max_length)
    if name == "reference":
        return attention_pool_quant_ref(
            prob.query, key, value, quant["key_scale"], quant["key_bias"], quant["value_scale"],
            quant["value_bias"], lengths, mask=mask, offsets=offsets, max_length=max_length,
            scale=prob.scale, bias=prob.bias)
    query4, group = prob.query, prob.H // prob.Hkv
    if group > 1:
        query4 = _fold_query_heads(query4, prob.Hkv)
    extra = () if prob.bias is None else (_fold_bias_heads(prob.bias, prob.H, prob.Hkv),)
    ml = -1 if max_length is None else int(max_length)
    out, lse = quant_op(name)(query4, key, value, quant["key_scale"], quant["key_bias"], quant["value_scale"],
                              quant["value_bias"], lengths, mask, offsets, ml, prob.scale, *extra)
    if group > 1:
        out, lse = _unfold_query_heads(out, group), _unfold_query_heads(lse, group)
    return out, lse


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


def activation_unit_weights(
    query: torch.Tensor,
    key: torch.Tensor,
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
    """The weights `activation_unit_pool` pools with (the same arguments, without value): the
    activation unit's raw scores (``normalize=None``, DIN) or their masked softmax over the
    row (``normalize="softmax"``), as the layer is configured.

    Returns:
        padded [B, L] or [B, N, L]; jagged [T] or [T, N] (the weight of each key row for its own
        row's queries). float32, float64 for float64 inputs. Exactly 0 at positions that take
        part in no row and on empty rows; with softmax every other row sums to 1.
        Differentiable w.r.t. query, key, every weight and bias and the activation parameters.

    The fused backends run the activation-unit forward kernel's scoring pass and write the
    scores out (attnkern::activation_unit_scores_fwd; the pooling backward op gives their
    gradient, docs/attention_weights.md). A backend whose build has no scores kernel evaluates
    the reference's math (activation_unit_weights_ref) in PyTorch ops on the tensors' device.
    """
    key, _, offsets = unpack_history(key, None, offsets, lengths=lengths, mask=mask)
    prob = validate_activation_unit(query, key, None, weights, lengths, mask, offsets, max_length,
                                    activation, activation_params, normalize)
    name = _resolve(backend, query)  # an unknown or unavailable backend is an error here too
    check_values(Problem(query=prob.args["query"], squeeze_n=False, layout=prob.layout, B=prob.B, N=1,
                         H=1, Hkv=1, Dk=1, Dv=1, L=prob.L, scale=1.0),
                 lengths, offsets, max_length)
    op = None if name == "reference" else activation_scores_op(name)
    if op is None:
        w = activation_unit_weights_ref(*prob.args.values())
    else:
        w, _ = op(*(v for n, v in prob.args.items() if n != "value"))
    return w.squeeze(-1 if prob.layout == "jagged" else 1) if prob.squeeze_n else w


DICE_STATISTICS = ("all", "valid")


def dice_batch_statistics(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: Sequence,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    dice_alpha: Sequence[torch.Tensor] = (),
    dice_weight: Optional[Sequence[torch.Tensor]] = None,
    dice_bias: Optional[Sequence[torch.Tensor]] = None,
    eps: float = 1e-8,
    positions: str = "all",
    backend: str = "auto",
) -> list:
    """Dice's batch statistics in training: per hidden layer of `activation_unit_pool`'s MLP,
    the mean and the biased variance of that layer's pre-activation per unit, over every
    (row, query, position) sample of the batch, as ``nn.BatchNorm1d`` computes them in
    training. The pass that runs before the fused scoring pass: its results, folded into
    Dice's (alpha, scale, shift) by ``attnkern.reference.dice_params``, make the fused op
    compute Dice in training mode, and gradients flow through them (they are torch ops).

    Arguments as `activation_unit_pool`'s (query, key, weights, lengths/mask/offsets/max_length);
    ``dice_alpha`` (and, with an affine BatchNorm, ``dice_weight`` / ``dice_bias``): one [H]
    tensor per hidden layer, needed to form the second layer's input; ``eps`` Dice's epsilon.
    ``positions``: "all" counts every padded position [B, L] of the padded layout, padding
    included, as FuxiCTR's ``DIN_Attention`` and DeepCTR-Torch's ``LocalActivationUnit`` do
    (they apply their MLP to all B * L positions); "valid" counts only the valid ones. The
    jagged layout has no padding: both count its T rows. ``backend``: "cpu" (and "auto" for CPU
    tensors) runs the fused kernel (attnkern::dice_statistics_fwd/_bwd: float64 accumulators, a
    fixed order, nothing [B, L, units] formed); any other backend the torch ops below.

    Returns [(mean [H], var [H], count)] per hidden layer, in the compute dtype (float32;
    float64 for float64 inputs); count is the number of samples (a Python int for "all" on
    the padded layout; otherwise it may be a 0-dim tensor, as it may depend on the data).
    """
    from .reference import _compute_dtype, activate, dice_params, jagged_to_padded, padded_valid

    if positions not in DICE_STATISTICS:
        raise ValueError("positions must be one of %s, got %r" % (", ".join(map(repr, DICE_STATISTICS)), positions))
    key, _, offsets = unpack_history(key, None, offsets, lengths=lengths, mask=mask)
    prob = validate_activation_unit(query, key, None, weights, lengths, mask, offsets, max_length,
                                    "relu", None, None)
    a = prob.args
    hidden = [a["w1"]] + ([a["w2"]] if a["w2"] is not None else [])
    biases = [a["b1"]] + ([a["b2"]] if a["w2"] is not None else [])
    for name, seq in (("dice_alpha", dice_alpha), ("dice_weight", dice_weight), ("dice_bias", dice_bias)):
        if seq is None and name != "dice_alpha":
            continue
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence) or len(seq) != len(hidden):
            raise ValueError("%s must hold one [H] tensor per hidden layer (%d)" % (name, len(hidden)))
    cdt = _compute_dtype(query.dtype)
    if _resolve(backend, query) == "cpu" and DICE_KERNELS:
        return _fused_dice_statistics(prob, hidden, biases, dice_alpha, dice_weight, dice_bias, eps,
                                      positions, cdt)
    q = a["query"].to(cdt)                                     # [B, N, E]
    B, N, E = q.shape
    if prob.layout == "jagged":
        ml = None if a["max_length"] < 0 else a["max_length"]
        k, _, valid = jagged_to_padded(key, key, offsets, ml)
        positions = "valid"
    else:
        k = key
        valid = padded_valid(key, lengths, mask)
    k = k.to(cdt)
    if positions == "all":
        count = B * N * k.shape[1]
        w = None
    else:
        w = valid.to(cdt)[:, None, :, None]                  # [B, 1, L, 1]
        count = w.sum() * N
    wa, wb, wc, wd = hidden[0].to(cdt).split(E, dim=1)
    # The first layer by its exact split (attnkern.reference): h = c_q + A_q k with
    # c_q = (Wa + Wc) q + b1 and A_q = (Wb - Wc) + Wd diag(q); never the [.., 4E] concatenation.
    c = q @ (wa + wc).T + biases[0].to(cdt)                   # [B, N, H1]
    if len(hidden) == 1:
        return [_first_layer_moments(q, k, w, c, wb - wc, wd, count)]
    h = (k @ (wb - wc).T)[:, None] + (q[:, :, None, :] * k[:, None]) @ wd.T + c[:, :, None, :]
    stats = []
    for i in range(len(hidden)):
        if i > 0:
            h = h @ hidden[i].to(cdt).T + biases[i].to(cdt)
        if w is None:
            mean = h.mean(dim=(0, 1, 2))
            var = (h - mean).square().mean(dim=(0, 1, 2))
        else:
            safe = count.clamp_min(1)
            mean = (h * w).sum(dim=(0, 1, 2)) / safe
            var = ((h - mean).square() * w).sum(dim=(0, 1, 2)) / safe
        stats.append((mean, var, count))
        if i + 1 < len(hidden):
            act = dice_params(dice_alpha[i].to(cdt), mean, var, eps,
                              None if dice_weight is None else dice_weight[i].to(cdt),
                              None if dice_bias is None else dice_bias[i].to(cdt))
            h = activate(h, "dice", act)
    return stats


def _fused_dice_statistics(prob, hidden, biases, dice_alpha, dice_weight, dice_bias, eps, positions, cdt):
    """dice_batch_statistics on the fused CPU op: one pass per hidden layer (the second layer's
    recomputes the first, whose Dice parameters it takes from the first pass's statistics)."""
    from .reference import dice_params

    a = prob.args
    B, N = a["query"].shape[:2]
    every = positions == "all" and prob.layout == "padded"
    if every:
        count = B * N * a["key"].shape[1]
    elif prob.layout == "jagged":
        count = (a["offsets"][-1] - a["offsets"][0]) * N
    elif a["lengths"] is not None:
        count = a["lengths"].sum() * N
    elif a["mask"] is not None:
        count = a["mask"].sum() * N
    else:
        count = B * N * a["key"].shape[1]
    common = (a["query"], a["key"], a["lengths"], a["mask"], a["offsets"], a["max_length"], every,
              hidden[0], biases[0])
    op = dice_statistics_op()
    mean, var = op(*common, None, None, None)
    stats = [(mean, var, count)]
    if len(hidden) == 2:
        act = dice_params(dice_alpha[0].to(cdt), mean, var, eps,
                          None if dice_weight is None else dice_weight[0].to(cdt),
                          None if dice_bias is None else dice_bias[0].to(cdt))
        mean, var = op(*common, act.to(a["query"].dtype), hidden[1], biases[1])
        stats.append((mean, var, count))
    return stats


def _first_layer_moments(q, k, w, c, wk, wd, count):
    """Mean and biased variance of the first layer's h = c_q + A_q k, A_q = Wk + Wd diag(q),
    over the counted (row, query, position) samples without forming h [B, N, L, H]: from each
    row's key mean m_b and centred keys kc = w (k - m_b), by the law of total variance

        var = (sum_bn diag(A_q C_b A_q^T) + sum_bn n_b (mu_bn - mean)^2) / n,
        mu_bn = c_q + A_q m_b,  C_b = sum_l kc kc^T,

    both terms sums of squares (no cancellation as in E[h^2] - E[h]^2). Summed over the
    samples, the first term needs only three [E, E] moments of the centred keys, each one GEMM
    over all B * L positions."""
    B, N, E = q.shape
    if w is None:
        n_b = k.new_full((B,), float(k.shape[1]))
        m = k.mean(dim=1) if k.shape[1] else k.new_zeros(B, E)
        kc = k - m[:, None]
    else:
        wv = w[:, 0]                                           # [B, L, 1]
        n_b = wv.sum(dim=(1, 2))
        m = (k * wv).sum(dim=1) / n_b.clamp_min(1)[:, None]
        kc = (k - m[:, None]) * wv
    # g1 = sum_bn C_b, g2 = sum_bn diag(q) C_b, g3 = sum_bn diag(q) C_b diag(q); with one query
    # per row all three are blocks of one GEMM (one pass over the keys, and one back).
    if N == 1:
        x = torch.cat([kc, kc * q], dim=-1).reshape(-1, 2 * E)
        g = x.T @ x
        g1, g2, g3 = g[:E, :E], g[E:, :E], g[E:, E:]
    else:
        flat = kc.reshape(-1, E)
        g1 = N * (flat.T @ flat)
        g2 = (kc * q.sum(dim=1)[:, None, :]).reshape(-1, E).T @ flat
        g3 = 0
        for n in range(N):
            qk = (kc * q[:, n, None, :]).reshape(-1, E)
            g3 = g3 + qk.T @ qk
    within = ((wk @ g1) * wk).sum(-1) + 2 * ((wd @ g2) * wk).sum(-1) + ((wd @ g3) * wd).sum(-1)
    mu = c + (m @ wk.T)[:, None] + (q * m[:, None]) @ wd.T   # [B, N, H]
    total = count if isinstance(count, int) else count.clamp_min(1)
    nb = n_b[:, None, None]
    mean = (mu * nb).sum(dim=(0, 1)) / total
    between = ((mu - mean).square() * nb).sum(dim=(0, 1))
    return mean, (within + between) / total, count


def position_query_inputs(position_query: torch.Tensor, key: torch.Tensor, weights: Sequence):
    """Rewrites an activation unit whose query depends on the position (DMR's and DMIN's
    position embeddings: FuxiCTR's ``use_pos_emb=True`` gives position l the query
    q_l = f(target, pos_emb[l])) as `activation_unit_pool`'s shared-query form, exactly.

    The first layer is linear, so with W1 = [Wa | Wb | Wc | Wd] over [q_l, k_l, q_l - k_l,
    q_l * k_l]: W1 x_l = (Wa + Wc) q_l + (Wb - Wc) k_l + Wd (q_l * k_l), a linear map of the
    widened key [k_l, q_l * k_l, q_l] (3E) with a zero query. Returns (query [B, 3E] or the
    jagged layout's [B, 3E] zeros, key [B, L, 3E] or [T, 3E], weights with the first layer
    [H1, 12E]); pass the original keys (or other values) as the values. Needs 3E <= 256.

    position_query and key: padded [B, L, E] (or jagged [T, E]); weights as
    `activation_unit_pool`'s. Differentiable w.r.t. all of them.
    """
    for x, name in ((position_query, "position_query"), (key, "key")):
        if not isinstance(x, torch.Tensor):
            raise TypeError("%s must be a torch.Tensor, got %s" % (name, type(x).__name__))
    if position_query.shape != key.shape or key.dim() not in (2, 3):
        raise ValueError("position_query must have the shape of key (padded [B, L, E] or jagged [T, E]), "
                         "got %s and key %s" % (list(position_query.shape), list(key.shape)))
    E = key.shape[-1]
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence) or len(weights) not in (2, 3) \
            or not isinstance(weights[0], Sequence) or len(weights[0]) != 2:
        raise TypeError("weights must be a sequence of 2 or 3 (weight, bias) pairs")
    w1, b1 = weights[0]
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2 or w1.shape[1] != 4 * E:
        raise ValueError("weights[0] weight must be [units, 4E] = [units, %d], got %s"
                         % (4 * E, list(getattr(w1, "shape", []))))
    wa, wb, wc, wd = w1.split(E, dim=1)
    zero = torch.zeros_like(w1[:, :3 * E])
    wide = torch.cat([zero, torch.cat([wb - wc, wd, wa + wc], dim=1), zero, zero], dim=1)
    wide_key = torch.cat([key, position_query * key, position_query], dim=-1)
    B = key.shape[0] if key.dim() == 3 else None
    query = None if B is None else key.new_zeros(B, 3 * E)
    return query, wide_key, [(wide, b1)] + list(weights[1:])
