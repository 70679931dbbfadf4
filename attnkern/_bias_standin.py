"""`attention_pool` for the layers, with a score ``bias=`` where the op does not take one yet:
the pooling written out in PyTorch (scores plus bias, masked softmax, weighted sum). Calls
without a bias go to `attnkern.attention_pool` unchanged. To be replaced by the op's own
``bias=`` (SPEC section 7.1) once it lands."""

from __future__ import annotations

import inspect
import math

import torch

from .functional import attention_pool as _attention_pool

_OP_TAKES_BIAS = "bias" in inspect.signature(_attention_pool).parameters


def attention_pool(query, key, value, lengths=None, *, mask=None, key_padding_mask=None,
                   offsets=None, max_length=None, scale=None, return_lse=False, bias=None,
                   backend="auto"):
    kw = dict(mask=mask, key_padding_mask=key_padding_mask, offsets=offsets,
              max_length=max_length, scale=scale, return_lse=return_lse, backend=backend)
    if bias is None:
        return _attention_pool(query, key, value, lengths, **kw)
    if _OP_TAKES_BIAS:
        return _attention_pool(query, key, value, lengths, bias=bias, **kw)
    squeeze = query.dim() == 3
    q = query.unsqueeze(1) if squeeze else query  # [B, N, H, Dk]
    B, N, H, Dk = q.shape
    if offsets is not None:
        lens = offsets[1:] - offsets[:-1]
        L = int(lens.max()) if B else 0
        pos = torch.arange(L, device=key.device)
        valid = pos[None] < lens[:, None]
        idx = torch.where(valid, offsets[:-1, None] + pos[None], 0)
        key, value, bias = key[idx], value[idx], bias[idx].transpose(1, 2)  # bias [B, Hb, L]
    else:
        L = key.shape[1]
        if key_padding_mask is not None:
            mask = ~key_padding_mask
        if mask is None:
            pos = torch.arange(L, device=key.device)[None]
            mask = pos < (lengths[:, None] if lengths is not None else L)
        valid = mask
    G = H // key.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = key.repeat_interleave(G, dim=2).to(acc)
    v = value.repeat_interleave(G, dim=2).to(acc)
    s = torch.einsum("bnhd,blhd->bnhl", q.to(acc), k) * (Dk ** -0.5 if scale is None else scale)
    s = (s + bias.to(acc).unsqueeze(1)).masked_fill(~valid[:, None, None, :], -math.inf)
    lse = torch.logsumexp(s, -1)
    # An empty row (every logit -inf) pools to 0 with lse = -inf, as the op does.
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse.clamp(min=-1e30)[..., None]), 0.0)
    out = torch.einsum("bnhl,blhd->bnhd", p, v).to(q.dtype)
    lse = lse.float()
    if squeeze:
        out, lse = out.squeeze(1), lse.squeeze(1)
    return (out, lse) if return_lse else out
