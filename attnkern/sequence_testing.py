"""Correctness checking of attnkern.sequence_attention, shared by its tests and `attnkern check`:
the input generator (`random_sequence_problem`), two independent statements of the mask
(`hand_mask`: the rules as words say them; `gr_mask`: generative-recommenders' published
`_get_valid_attn_mask` formula, transcribed), a row-by-row float64 oracle (`sequence_oracle`)
and the checking body (`check_sequence_backend`) with attnkern.testing's tolerance rule."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .reference import time_bucket_ref
from .testing import compare

Tensor = torch.Tensor


def hand_mask(n: int, L: int, causal: bool, nt: int, c: int, m: int) -> Tensor:
    """[L, L] bool: query i attends key j in a row of length n, built pair by pair from the rules
    in words. For rows with more history than contextual positions (c < n - nt)."""
    h = n - nt  # history: [0, h); targets (candidates): [h, n)
    M = torch.zeros(L, L, dtype=torch.bool)

    def slot(p):
        # the local window counts the contextual block as one position and puts every target
        # right after the history
        p = min(p, h)
        return max(p, c - 1) if c > 0 else p

    def in_window(i, j):
        return m == 0 or abs(slot(i) - slot(j)) <= m

    for i in range(n):
        for j in range(n):
            if i == j:
                ok = True
            elif i < c:  # contextual: the whole history; without causality also the window
                ok = j < h or (not causal and in_window(i, j) and slot(i) != slot(j))
            elif i >= h:  # a target: the history, never another target
                ok = j < h and in_window(i, j)
            elif causal:  # history: earlier history (contextual included)
                ok = j < i and in_window(i, j)
            else:
                ok = slot(i) != slot(j) and in_window(i, j)
            M[i, j] = ok
    return M


def gr_mask(L: int, seq_lengths: Tensor, causal: bool, num_targets: Optional[Tensor],
            max_attn_len: int, contextual_seq_len: int) -> Tensor:
    """generative-recommenders' `_get_valid_attn_mask` (ops/pytorch/pt_hstu_attention.py,
    min_full_attn_seq_len = 0), transcribed from its published formula: [B or 1, L, L]."""
    N = L
    ids = torch.arange(0, N).view(1, N)
    max_ids = seq_lengths.view(-1, 1, 1)
    if contextual_seq_len > 0:
        ids = ids - contextual_seq_len + 1
        ids = torch.clamp(ids, min=0)
        max_ids = max_ids - contextual_seq_len + 1
    if num_targets is not None:
        max_ids = max_ids - num_targets.view(-1, 1, 1)
        ids = torch.clamp(ids, max=max_ids)
        row_ids = ids.view(-1, N, 1).expand(-1, N, N)
        col_ids = ids.view(-1, 1, N).expand(-1, N, N)
    else:
        row_ids = ids.view(N, 1).expand(N, N)
        col_ids = row_ids.t()
        row_ids = row_ids.view(1, N, N)
        col_ids = col_ids.view(1, N, N)
    row_col_dist = row_ids - col_ids
    valid = torch.eye(N, dtype=torch.bool).view(1, N, N)
    if not causal:
        row_col_dist = torch.where(row_col_dist > 0, row_col_dist, -row_col_dist)
    valid = torch.logical_or(valid, row_col_dist > 0)
    if max_attn_len > 0:
        valid = torch.logical_and(valid, row_col_dist <= max_attn_len)
    if contextual_seq_len > 0:
        valid = torch.logical_or(valid, torch.logical_and(row_ids == 0, col_ids < max_ids))
    return valid


def random_sequence_problem(lengths, H: int = 2, Hkv: Optional[int] = None, Dk: int = 8,
                            Dv: int = 8, *, layout: str = "jagged", dtype=torch.float32,
                            causal: bool = True, num_targets=None, contextual_len: int = 0,
                            max_attn_len: int = 0, normalization: str = "softmax",
                            time: bool = False, position: bool = False, dense_bias: bool = False,
                            Hb: int = 1, NB: int = 12, P: int = 9, attn_scale=None,
                            time_bucket: str = "log", seed: int = 0,
                            pad_to: Optional[int] = None) -> Tuple[Dict[str, Tensor], dict]:
    """(the differentiable tensors by name, the other keyword arguments of sequence_attention).
    lengths: the rows' lengths; jagged rows are packed back to back, padded rows padded to
    pad_to (default the longest). Padding holds NaN, which must never be read."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    B = lengths.shape[0]
    L = int(pad_to if pad_to is not None else (int(lengths.max()) if B else 0))
    Hkv = H if Hkv is None else Hkv

    def randn(*shape, s=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * s).to(dtype)

    T = int(lengths.sum())
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    t = {"query": randn(T, H, Dk), "key": randn(T, Hkv, Dk), "value": randn(T, Hkv, Dv)}
    times = torch.randint(0, 100000, (T,), generator=g).cumsum(0)
    kw: dict = dict(causal=causal, contextual_len=contextual_len, max_attn_len=max_attn_len,
                    normalization=normalization, time_bucket=time_bucket)
    if time:
        t["time_table"] = randn(NB, Hb, s=0.5)
        kw["query_times"] = times + torch.randint(0, 5000, (T,), generator=g)
        kw["key_times"] = times
    if position:
        t["position_table"] = randn(P, Hb, s=0.5)
    if dense_bias:
        t["bias"] = randn(B, Hb, L, L, s=0.5)
    if num_targets is not None:
        kw["num_targets"] = torch.as_tensor(num_targets, dtype=torch.int64)
    if attn_scale is not None:
        kw["attn_scale"] = attn_scale
    if layout == "jagged":
        kw.update(offsets=offsets, max_length=L)
        return t, kw
    # padded [B, L, ...] with NaN outside the rows
    pos = torch.arange(L)
    valid = pos[None, :] < lengths[:, None]
    idx = (offsets[:-1, None] + pos[None, :]).clamp(max=max(T - 1, 0))

    def pad(x, fill):
        y = x[idx] if T else x.new_zeros((B, L) + tuple(x.shape[1:]))
        shape = valid.shape + (1,) * (y.dim() - 2)
        return torch.where(valid.view(shape), y, torch.full((), fill, dtype=y.dtype))

    for name in ("query", "key", "value"):
        t[name] = pad(t[name], float("nan"))
    for name in ("query_times", "key_times"):
        if name in kw:
            kw[name] = pad(kw[name], 0)
    if isinstance(attn_scale, Tensor):
        kw["attn_scale"] = pad(attn_scale, 0.0)
    kw["lengths"] = lengths
    return t, kw


def _rows(kw: dict, T_or_BL) -> List[Tuple[int, int]]:
    """(start token, length) of every row, tokens flattened."""
    if "offsets" in kw:
        o = kw["offsets"].tolist()
        return [(o[b], o[b + 1] - o[b]) for b in range(len(o) - 1)]
    B, L = T_or_BL
    return [(b * L, int(n)) for b, n in enumerate(kw["lengths"].tolist())]


def sequence_oracle(t: Dict[str, Tensor], kw: dict) -> Tuple[Tensor, Tensor]:
    """(out, lse) in float64, row by row, with gr_mask as the mask: independent of
    attnkern.reference except for the time bucket function. Differentiable."""
    t = {k: v.double() for k, v in t.items()}
    q, k, v = t["query"], t["key"], t["value"]
    padded = "offsets" not in kw
    lead = q.shape[:-2]
    H, Hkv, Dk, Dv = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    qf, kf, vf = q.reshape(-1, H, Dk), k.reshape(-1, Hkv, Dk), v.reshape(-1, Hkv, Dv)
    rows = _rows(kw, tuple(lead))
    L = lead[1] if padded else int(kw["max_length"])
    scale = kw.get("scale") or 1.0 / math.sqrt(Dk)
    silu = kw["normalization"] == "silu"
    nts = kw.get("num_targets")
    out = torch.zeros(qf.shape[0], H, Dv, dtype=torch.float64)
    lse = torch.full((qf.shape[0], H), -math.inf, dtype=torch.float64)
    outs, lses = [], []
    G = H // Hkv
    for b, (s0, n) in enumerate(rows):
        if n == 0:
            continue
        mask = gr_mask(n, torch.tensor([n]), kw["causal"],
                       None if nts is None else nts[b:b + 1], kw["max_attn_len"],
                       kw["contextual_len"])[0]
        qb = qf[s0:s0 + n].transpose(0, 1)                            # [H, n, Dk]
        kb = kf[s0:s0 + n].repeat_interleave(G, 1).transpose(0, 1)
        vb = vf[s0:s0 + n].repeat_interleave(G, 1).transpose(0, 1)
        s = scale * qb @ kb.transpose(1, 2)                            # [H, n, n]
        i = torch.arange(n).view(n, 1)
        j = torch.arange(n).view(1, n)
        if "position_table" in t:
            pt = t["position_table"]
            s = s + pt[(i - j).abs().clamp(max=pt.shape[0] - 1)].permute(2, 0, 1)
        if "time_table" in t:
            tt = t["time_table"]
            qt = kw["query_times"].reshape(-1)[s0:s0 + n]
            kt = kw["key_times"].reshape(-1)[s0:s0 + n]
            bk = time_bucket_ref(qt.view(n, 1) - kt.view(1, n), tt.shape[0], kw["time_bucket"])
            s = s + tt[bk].permute(2, 0, 1)
        if "bias" in t:
            s = s + t["bias"][b, :, :n, :n]
        if silu:
            a = kw.get("attn_scale")
            if a is None:
                a = torch.full((n,), 1.0 / L, dtype=torch.float64)
            elif isinstance(a, Tensor):
                a = a.reshape(-1)[s0:s0 + n].double()
            else:
                a = torch.full((n,), float(a), dtype=torch.float64)
            w = torch.where(mask, torch.nn.functional.silu(s), 0.0) * a.view(1, n, 1)
            ob = w @ vb
            lb = torch.zeros(H, n, dtype=torch.float64)
        else:
            sm = s.masked_fill(~mask, -math.inf)  # every row has its diagonal
            lb = torch.logsumexp(sm, -1)
            ob = torch.softmax(sm, -1) @ vb
        outs.append((s0, n, ob.transpose(0, 1), lb.transpose(0, 1)))
    for s0, n, ob, lb in outs:
        idx = torch.arange(s0, s0 + n)
        out = out.index_put((idx,), ob)
        lse = lse.index_put((idx,), lb)
    return out.reshape(lead + (H, Dv)), lse.reshape(lead + (H,))


def run_sequence(backend: str, t: Dict[str, Tensor], kw: dict, grad_out: Tensor,
                 dtype=None, device=None) -> Dict[str, Tensor]:
    """out, lse and the gradients of out . grad_out of sequence_attention on `backend`
    (tensors cast to dtype and run on `device`, results on the CPU; backend None:
    sequence_oracle)."""
    import attnkern

    if device is not None:
        results = run_sequence(
            backend, {k: v.to(device) for k, v in t.items()},
            {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()},
            grad_out.to(device), dtype)
        return {k: None if v is None else v.cpu() for k, v in results.items()}
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().clone().requires_grad_(True)
              for k, v in t.items()}
    if backend is None:
        out, lse = sequence_oracle(leaves, kw)
        lse = lse if kw["normalization"] == "softmax" else None
    else:
        if kw["normalization"] == "softmax":
            out, lse = attnkern.sequence_attention(**leaves, **kw, backend=backend,
                                                   return_lse=True)
        else:
            out, lse = attnkern.sequence_attention(**leaves, **kw, backend=backend), None
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out.to(out.dtype),
                                allow_unused=True)
    res = {"out": out.detach(), "lse": None if lse is None else lse.detach()}
    for n, g in zip(names, grads):
        res["grad_" + n] = torch.zeros_like(leaves[n]) if g is None else g
    return res


def check_sequence_backend(backend: str, t: Dict[str, Tensor], kw: dict, dtype=torch.float32,
                           seed: int = 1, device=None) -> Tuple[bool, Dict[str, float], str]:
    """(passed, max error by output, failures) of sequence_attention on `backend` in `dtype`
    against the float64 oracle, with attnkern.testing's rule (the reference run in dtype as the
    low-precision baseline); also: no NaN, exact zeros at padding and for padded positions'
    gradients. t and kw are CPU tensors; `device`: where the backend runs (default the CPU)."""
    g = torch.Generator().manual_seed(seed)
    v = t["value"]
    grad_out = torch.randn(t["query"].shape[:-1] + (v.shape[-1],), generator=g,
                           dtype=torch.float64)
    padded = "lengths" in kw
    if padded:
        B, L = t["query"].shape[:2]
        valid = torch.arange(L)[None, :] < kw["lengths"][:, None]
        grad_out = torch.where(valid[..., None, None], grad_out, 0.0)
        clean = {k: (torch.where(valid.view(valid.shape + (1,) * (x.dim() - 2)), x,
                                 torch.zeros((), dtype=x.dtype)) if k in ("query", "key", "value")
                     else x) for k, x in t.items()}
    else:
        clean = t
    if backend == "reference" and dtype != torch.float64:
        # The reference has no low-precision baseline but itself, so it answers for its own
        # arithmetic only: its oracle takes the inputs it was given, rounded to dtype (a
        # bfloat16 table gradient sums hundreds of terms, each off by the rounding of q, k, v
        # and the tables: several times the floor). The fused backends keep the oracle of the
        # exact inputs, with the reference's error, rounding included, as their baseline.
        clean = {k: x.to(dtype).to(x.dtype) if x.is_floating_point() else x for k, x in clean.items()}
        grad_out = grad_out.to(dtype).double()
    oracle = run_sequence(None, clean, kw, grad_out, torch.float64)
    got = run_sequence(backend, t, kw, grad_out, dtype, device)
    lowp = oracle if dtype == torch.float64 or backend == "reference" else \
        run_sequence("reference", t, kw, grad_out, dtype)
    errors, failures = {}, []
    for name, want in oracle.items():
        if want is None:
            continue
        have = got[name]
        if padded and name in ("out", "lse", "grad_query", "grad_key", "grad_value"):
            m = valid.view(valid.shape + (1,) * (have.dim() - 2)).expand_as(have)
            if name != "lse" and not bool((have[~m] == 0).all()):
                failures.append("%s must be exactly 0 at padded positions" % name)
            have, want, lp = have[m], want[m], lowp[name][m]
        else:
            lp = lowp[name]
        if name == "lse":
            fin = torch.isfinite(want)
            if not torch.equal(torch.isneginf(have), torch.isneginf(want)):
                failures.append("lse must be -inf exactly where the oracle is")
            have, want, lp = have[fin], want[fin], lp[fin]
        c = compare(name, have.double(), lp.double(), want, dtype)
        errors[name] = c.error
        if not c.ok:
            failures.append(c.message(" (%s, %s)" % (backend, str(dtype).split(".")[-1])))
    return not failures, errors, "; ".join(failures)
