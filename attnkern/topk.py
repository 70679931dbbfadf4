"""attnkern.attention_topk: the k best-scoring valid positions of each query (SIM / TWIN's
search stage), fused on CPU. Validation, layout normalisation, backend dispatch; the layouts,
ties and padding rules are docs/topk.md."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._jagged import unpack_history
from ._validation import check_topk_k, check_values, checked_index_values, validate
from .functional import _functorch_active, _resolve_for_transforms, _resolve_name
from .ops.topk import TOPK_KERNELS, topk_op
from .reference import _compute_dtype, attention_topk_ref, canonical_bias

# The backends with top-k kernels; "auto" runs the reference where none applies.
TOPK_BACKENDS = ("reference", "cpu", "cuda", "triton")
# The largest k of the cuda and triton kernels (csrc/cuda/attention_topk_kernels.h kTopkMaxK,
# triton_kernels/attention_topk.py MAX_K); "auto" takes the reference above it.
TOPK_MAX_K = 256


def _resolve_topk(backend, query: torch.Tensor, k: int) -> str:
    if backend == "auto" and query.device.type == "cuda":
        # The GPU kernels where they run (k <= 256, 16/32-bit inputs, no torch.func transform),
        # else the reference.
        if k > TOPK_MAX_K or query.dtype == torch.float64 or _functorch_active():
            return "reference"
    name = _resolve_for_transforms(backend, query)
    if name in ("cpu", "cuda") and not TOPK_KERNELS:
        if backend == "auto":
            return "reference"
        raise RuntimeError("attnkern backend %r has no attention_topk kernels in this build; "
                           "use backend='reference'" % name)
    return name if name in TOPK_BACKENDS else "reference"


def selected_scores(query: torch.Tensor, key: torch.Tensor, indices: torch.Tensor,
                    offsets: Optional[torch.Tensor], scale: float,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The scores ``scale * <q, k_l> + bias[l]`` at the selected positions ``indices``
    [B, N, H, k] (-1: none, score -inf), recomputed differentiably from the inputs: query
    [B, N, H, Dk], key padded [B, L, Hkv, Dk] or jagged [T, Hkv, Dk] with offsets, bias with
    its query axis (padded [B, Nb, Hb, L], jagged [T, Nb, Hb]) or None. Reads only the k
    selected keys of each query: its gradient is the selection's (a piecewise-constant choice)."""
    B, N, H, K = indices.shape
    Hkv = key.shape[-2]
    cdt = _compute_dtype(query.dtype)
    dev = query.device
    pos = indices.clamp_min(0)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    n = torch.arange(N, device=dev).view(1, N, 1, 1)
    h = torch.arange(H, device=dev).view(1, 1, H, 1)
    g = h // (H // Hkv)
    if offsets is not None:
        row = offsets[:-1].to(torch.long).view(B, 1, 1, 1) + pos
        # An empty jagged history has no row to read: any row will do, the slot is -inf.
        row = row.clamp(0, max(key.shape[0] - 1, 0))
        keys = key[row, g] if key.shape[0] > 0 else key.new_zeros(pos.shape + (key.shape[-1],))
    else:
        row = pos
        keys = key[b, pos, g] if key.shape[1] > 0 else key.new_zeros(pos.shape + (key.shape[-1],))
    s = torch.einsum("bnhd,bnhkd->bnhk", query.to(cdt), keys.to(cdt)) * scale
    if bias is not None:
        nb, hb = n % bias.shape[1], h % bias.shape[2]
        if offsets is not None:
            s = s + (bias[row, nb, hb].to(cdt) if bias.shape[0] > 0 else 0)
        elif bias.shape[-1] > 0:
            s = s + bias[b, nb, hb, pos].to(cdt)
    return torch.where(indices >= 0, s, torch.full_like(s, float("-inf")))


def attention_topk(
    query: torch.Tensor,
    key: torch.Tensor,
    k: int,
    lengths: Optional[torch.Tensor] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    max_length: Optional[int] = None,
    scale: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k highest-scoring valid positions of each query and head, and their scores.

    ``s[l] = scale * <q[b, n, h], k[b, l, g]> + bias[b, n, h, l]`` (``g = h // (H // Hkv)``)
    over the valid positions l of row b, as attention_pool scores them; the fused backend keeps
    a running top-k per query and never forms the [B, N, H, L] score tensor.

    Args:
        query: [B, H, Dk] or [B, N, H, Dk].
        key: padded [B, L, Hkv, Dk], or jagged [T, Hkv, Dk] with ``offsets`` (or a torchrec
            ``JaggedTensor``); Hkv divides H.
        k: how many positions to keep (a Python int >= 0).
        lengths, mask, key_padding_mask, offsets, max_length, scale, bias: as in
            attnkern.attention_pool (mask True = attend; key_padding_mask True = padding).
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton". "auto" runs "cpu" on CPU
            tensors, "cuda" (else "triton") on CUDA tensors (k <= 256, not float64) and the
            reference elsewhere.

    Returns:
        (scores, indices), each [B, H, k] or [B, N, H, k], best first. indices (int64) are
        positions in the row: into L for the padded layout, from the row's first element for
        the jagged one (add ``offsets[b]`` for a row of the jagged key). scores are float32
        (float64 for float64 inputs). Ties keep the lower position first (deterministic); a NaN
        score ranks above every number. A row with fewer than k valid positions, or an empty
        row, fills the rest with index -1 and score -inf; a position whose score is -inf (a
        -inf bias) is never selected.

    The scores are differentiable w.r.t. query, key and bias (recomputed from the k selected
    keys when a gradient is needed: the selection itself is piecewise constant); the indices
    are not.
    """
    key, _, offsets = unpack_history(key, key, offsets, lengths=lengths, mask=mask,
                                     key_padding_mask=key_padding_mask)
    k = check_topk_k(k)
    prob = validate(query, key, key, lengths, mask, offsets, max_length, scale, False,
                    values=False, key_padding_mask=key_padding_mask, bias=bias)
    if key_padding_mask is not None:
        mask = ~key_padding_mask
    name = _resolve_topk(backend, query, k)
    check_values(prob, lengths, offsets, max_length)
    if name == "reference" and torch.compiler.is_compiling():
        lengths, offsets = checked_index_values(prob, lengths, offsets, max_length)
    if name == "reference":
        scores, indices = attention_topk_ref(prob.query, key, k, lengths, mask=mask, offsets=offsets,
                                             max_length=max_length, scale=prob.scale, bias=prob.bias)
    else:
        scores, indices = topk_op(name)(prob.query, key, lengths, mask, offsets, k, prob.scale, prob.bias)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (query, key, bias))
        if needs_grad:
            scores = selected_scores(prob.query, key, indices, offsets, prob.scale, prob.bias)
    if prob.squeeze_n:
        scores, indices = scores.squeeze(1), indices.squeeze(1)
    return scores, indices
