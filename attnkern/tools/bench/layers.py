"""The layer and model family of `attnkern bench`: what a user swapping the layer into a CTR
model sees, next to the op cases.

    attnkern bench --family layer              # layer fwd, fwd+bwd and the model step, quick set
    attnkern bench --family layer --full       # every shape of the grid below
    attnkern bench --family layer --layer-shape 1024,64,2,200,1 --no-model   # one shape

Layer cases: B=1024, E=64, H in {2, 4}, L in {100, 200, 1000}, N in {1, 64}, lengths uniform in
[0, L], float32. Providers:

    attnkern            AttentionPooling (absorb="auto": the order `absorb_cost` picks)
    attnkern-projected  AttentionPooling(absorb=False): K and V projected over the history
    eager               a FuxiCTR-style MultiHeadTargetAttention written out in PyTorch:
                        projections, a -1e9 mask fill, softmax, a weighted sum (matmuls)
    mha                 torch.nn.MultiheadAttention(batch_first=True) with key_padding_mask
    attnkern-time       AttentionPooling(time_buckets=64, recency_buckets=64): the time-aware
                        layer, its [B, H, L] bias built in one pass (attnkern::time_bias_fwd
                        on CPU) and passed to the fused op
    eager-time          the eager layer with the same tables: the bias (the same lookup) added
                        to the scores before the mask fill and softmax

The time-aware providers take key times (ages log-uniform from 1 s to 3 years) and a query
time per row.

Model case: one TargetAttentionCTR training step (forward, BCE loss, backward, Adam) at
B=1024, L=200, E=64, H=2, N=1, 10,000 items, with the attnkern layer, the eager layer in
its place, pooling="sum", and the time-aware model with either layer.

Providers are timed in rounds, alternating, so that the machine's load drifts over all of
them alike; the table reports each one's median and its speedup over "eager". Before timing,
each layer provider is checked (same weights) against AttentionPooling(absorb=False) on the
non-empty rows; the error goes to the records (max_abs_err).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from attnkern.models import TargetAttentionCTR
from attnkern.nn import AttentionPooling, recency, time_bucket

LAYER_PROVIDERS = ("attnkern", "attnkern-projected", "eager", "mha", "attnkern-time", "eager-time")
MODEL_PROVIDERS = ("attnkern", "eager", "sum", "attnkern-time", "eager-time")
MODES = ("fwd", "fwd+bwd")
TIME_PROVIDERS = ("attnkern-time", "eager-time")
TIME_BUCKETS = RECENCY_BUCKETS = 64


class EagerTargetAttention(nn.Module):
    """FuxiCTR's MultiHeadTargetAttention (use_qkvo=True, use_scale=True, no dropout) as a
    model written in eager PyTorch holds it: bias-free W_q, W_k, W_v, W_o; scores by matmul,
    scaled by 1/sqrt(head_dim), padding filled with -1e9, softmax, a matmul with V. N > 1
    queries per row are batched the same way. Takes the arguments of AttentionPooling, so it
    drops into TargetAttentionCTR."""

    def __init__(self, embed_dim: int, num_heads: int = 1, attention_dim: Optional[int] = None):
        super().__init__()
        attention_dim = attention_dim or embed_dim
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.W_q = nn.Linear(embed_dim, attention_dim, bias=False)
        self.W_k = nn.Linear(embed_dim, attention_dim, bias=False)
        self.W_v = nn.Linear(embed_dim, attention_dim, bias=False)
        self.W_o = nn.Linear(attention_dim, embed_dim, bias=False)

    def forward(self, query, keys, values=None, lengths=None, *, mask=None, bias=None):
        values = keys if values is None else values
        B, L = keys.shape[0], keys.shape[1]
        if mask is None:
            mask = torch.arange(L, device=keys.device)[None, :] < lengths[:, None]
        mask = mask.float()  # FuxiCTR's data loaders hand the layer a 0/1 float mask
        squeeze = query.dim() == 2
        q = self.W_q(query if not squeeze else query.unsqueeze(1))
        k = self.W_k(keys)
        v = self.W_v(values)
        H, D = self.num_heads, self.head_dim
        q = q.view(B, -1, H, D).transpose(1, 2)  # [B, H, N, D]
        k = k.view(B, -1, H, D).transpose(1, 2)  # [B, H, L, D]
        v = v.view(B, -1, H, D).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) / D ** 0.5
        if bias is not None:  # [B, H, L], shared by the N queries
            scores = scores + bias.unsqueeze(2)
        scores = scores.masked_fill(mask.view(B, 1, 1, L) == 0, -1.0e9)
        attention = scores.softmax(dim=-1)
        out = torch.matmul(attention, v).transpose(1, 2).reshape(B, -1, H * D)
        out = self.W_o(out)
        return out.squeeze(1) if squeeze else out


class EagerTimeAttention(nn.Module):
    """The eager layer with AttentionPooling's time and recency tables: the same bucket lookup
    gives a [B, H, L] bias that is added to the scores before the mask fill and softmax."""

    def __init__(self, embed_dim: int, num_heads: int, time_buckets: int, recency_buckets: int):
        super().__init__()
        self.attn = EagerTargetAttention(embed_dim, num_heads)
        self.time_buckets, self.recency_buckets = time_buckets, recency_buckets
        self.time_bias_weight = nn.Parameter(torch.zeros(num_heads, time_buckets))
        self.recency_bias_weight = nn.Parameter(torch.zeros(num_heads, recency_buckets))

    def forward(self, query, keys, values=None, lengths=None, *, key_times=None, query_time=None):
        with torch.no_grad():
            t = time_bucket(query_time[:, None] - key_times, self.time_buckets)
            r = recency(keys.shape[1], lengths).clamp(max=self.recency_buckets - 1)
        # The layer's lookup (index_select, whose backward is a fast index_add), so that the
        # two providers differ in the attention only.
        H = self.time_bias_weight.shape[0]
        bias = (self.time_bias_weight.index_select(1, t.reshape(-1)).view(H, *t.shape)
                + self.recency_bias_weight.index_select(1, r.reshape(-1)).view(H, *r.shape))
        return self.attn(query, keys, values, lengths, bias=bias.transpose(0, 1))  # [B, H, L]


class MHAPooling(nn.Module):
    """nn.MultiheadAttention as people use it for target attention: key_padding_mask
    (True = padding). Rows with an empty history give NaN there; the timing does not care."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, query, keys, values=None, lengths=None):
        values = keys if values is None else values
        L = keys.shape[1]
        pad = torch.arange(L, device=keys.device)[None, :] >= lengths[:, None]
        squeeze = query.dim() == 2
        q = query.unsqueeze(1) if squeeze else query
        out, _ = self.mha(q, keys, values, key_padding_mask=pad, need_weights=False)
        return out.squeeze(1) if squeeze else out


@dataclass(frozen=True)
class LayerShape:
    B: int
    E: int
    H: int
    L: int
    N: int

    @property
    def name(self) -> str:
        return "b%d_e%d_h%d_l%d_n%d" % (self.B, self.E, self.H, self.L, self.N)

    def as_dict(self) -> dict:
        return {"name": self.name, "B": self.B, "E": self.E, "H": self.H, "L": self.L, "N": self.N}


FULL_LAYER_SHAPES = tuple(LayerShape(1024, 64, H, L, N) for N in (1, 64) for H in (2, 4)
                          for L in (100, 200, 1000))
QUICK_LAYER_SHAPES = (LayerShape(1024, 64, 2, 200, 1), LayerShape(1024, 64, 4, 200, 1),
                      LayerShape(1024, 64, 2, 200, 64))
MODEL_SHAPE = LayerShape(1024, 64, 2, 200, 1)
MODEL_ITEMS = 10_000


def make_layer(provider: str, shape: LayerShape, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    E, H = shape.E, shape.H
    if provider == "attnkern":
        return AttentionPooling(E, H)
    if provider == "attnkern-projected":
        return AttentionPooling(E, H, absorb=False)
    if provider == "eager":
        return EagerTargetAttention(E, H)
    if provider == "mha":
        return MHAPooling(E, H)
    if provider == "attnkern-time":
        return AttentionPooling(E, H, time_buckets=TIME_BUCKETS, recency_buckets=RECENCY_BUCKETS)
    if provider == "eager-time":
        return EagerTimeAttention(E, H, TIME_BUCKETS, RECENCY_BUCKETS)
    raise ValueError("unknown layer provider %r; expected one of %s" % (provider, ", ".join(LAYER_PROVIDERS)))


def layer_inputs(shape: LayerShape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, E, L, N = shape.B, shape.E, shape.L, shape.N
    query = torch.randn((B, E) if N == 1 else (B, N, E), generator=g)
    keys = torch.randn(B, L, E, generator=g)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    return query, keys, lengths


def time_inputs(B: int, L: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Key times and a query time per row (int64 seconds): ages log-uniform in [1 s, 3 years]."""
    g = torch.Generator().manual_seed(seed + 1)
    query_time = 1_700_000_000 + torch.randint(0, 10 ** 6, (B,), generator=g)
    age = (10 ** (8 * torch.rand(B, L, generator=g, dtype=torch.float64))).long()
    return {"key_times": query_time[:, None] - age, "query_time": query_time}


def _layer_kwargs(provider: str, shape: LayerShape, lengths) -> dict:
    kw = {"lengths": lengths}
    if provider in TIME_PROVIDERS:
        kw.update(time_inputs(lengths.shape[0], shape.L))
    return kw


def layer_callable(provider: str, shape: LayerShape, mode: str) -> Callable:
    layer = make_layer(provider, shape)
    query, keys, lengths = layer_inputs(shape)
    kw = _layer_kwargs(provider, shape, lengths)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return layer(query, keys, **kw)
        return fwd
    query.requires_grad_(True)
    keys.requires_grad_(True)

    def fwd_bwd():
        for p in layer.parameters():
            p.grad = None
        query.grad = keys.grad = None
        out = layer(query, keys, **kw)
        out.sum().backward()
        return out
    return fwd_bwd


def make_model(provider: str, shape: LayerShape = MODEL_SHAPE, items: int = MODEL_ITEMS,
               seed: int = 0) -> TargetAttentionCTR:
    torch.manual_seed(seed)
    pooling = "sum" if provider == "sum" else "attention"
    tables = ({"time_buckets": TIME_BUCKETS, "recency_buckets": RECENCY_BUCKETS}
              if provider in TIME_PROVIDERS else {})
    model = TargetAttentionCTR(items, embed_dim=shape.E, num_heads=shape.H, pooling=pooling, **tables)
    if provider == "eager":
        model.pool = EagerTargetAttention(shape.E, shape.H)
    elif provider == "eager-time":
        model.pool = EagerTimeAttention(shape.E, shape.H, TIME_BUCKETS, RECENCY_BUCKETS)
    elif provider not in MODEL_PROVIDERS:
        raise ValueError("unknown model provider %r; expected one of %s" % (provider, ", ".join(MODEL_PROVIDERS)))
    return model


def model_step_callable(provider: str, shape: LayerShape = MODEL_SHAPE, items: int = MODEL_ITEMS) -> Callable:
    """One training step of TargetAttentionCTR: forward, BCE-with-logits loss, backward, Adam."""
    model = make_model(provider, shape, items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    B, L = shape.B, shape.L
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    history = torch.randint(1, items, (B, L), generator=g)
    history[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    target = torch.randint(1, items, (B,), generator=g)
    label = torch.randint(0, 2, (B,), generator=g).float()
    loss_fn = nn.BCEWithLogitsLoss()
    times = ()
    if provider in TIME_PROVIDERS:
        t = time_inputs(B, L)
        times = (t["key_times"], t["query_time"])

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(history, target, lengths, *times), label)
        loss.backward()
        opt.step()
        return loss
    return step


def time_rounds(fns: Dict[str, Callable], *, rounds: int = 5, reps: int = 3,
                warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of each callable: `rounds` rounds, each timing every callable `reps`
    times in turn, so that load drifts hit all providers alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------
# Checking: every provider computes the same function when it holds the same weights


def share_weights(layers: Dict[str, nn.Module]) -> None:
    """Copies the weights of layers["attnkern"] (biases zero at initialisation) into the other
    providers' layers, so that their outputs can be compared; the time-aware layers get the
    same random tables."""
    src = layers["attnkern"]
    g = torch.Generator().manual_seed(7)
    time_w = torch.randn(src.num_heads, TIME_BUCKETS, generator=g)
    recency_w = torch.randn(src.num_heads, RECENCY_BUCKETS, generator=g)
    with torch.no_grad():
        for name, layer in layers.items():
            if hasattr(layer, "time_bias_weight"):
                layer.time_bias_weight.copy_(time_w)
                layer.recency_bias_weight.copy_(recency_w)
                layer = getattr(layer, "attn", layer)
            if isinstance(layer, AttentionPooling):
                layer.load_state_dict(src.state_dict(), strict=False)
            elif isinstance(layer, EagerTargetAttention):
                layer.W_q.weight.copy_(src.q_proj.weight)
                layer.W_k.weight.copy_(src.k_proj.weight)
                layer.W_v.weight.copy_(src.v_proj.weight)
                layer.W_o.weight.copy_(src.out_proj.weight)
            elif isinstance(layer, MHAPooling):
                layer.mha.in_proj_weight.copy_(torch.cat(
                    [src.q_proj.weight, src.k_proj.weight, src.v_proj.weight]))
                layer.mha.in_proj_bias.copy_(torch.cat(
                    [src.q_proj.bias, src.k_proj.bias, src.v_proj.bias]))
                layer.mha.out_proj.weight.copy_(src.out_proj.weight)
                layer.mha.out_proj.bias.copy_(src.out_proj.bias)


def check_layers(shape: LayerShape, providers: Sequence[str], rows: int = 64) -> Dict[str, float]:
    """Max abs difference of each provider's output from AttentionPooling(absorb=False) (with
    the tables, for the time-aware providers) on the non-empty rows of a `rows`-row slice of
    the case, with shared weights."""
    layers = {p: make_layer(p, shape) for p in set(providers) | {"attnkern", "attnkern-projected"}}
    layers["projected-time"] = AttentionPooling(shape.E, shape.H, absorb=False, time_buckets=TIME_BUCKETS,
                                                recency_buckets=RECENCY_BUCKETS)
    share_weights(layers)
    query, keys, lengths = layer_inputs(shape)
    query, keys, lengths = query[:rows], keys[:rows], lengths[:rows]
    times = time_inputs(shape.B, shape.L)
    times = {k: v[:rows] for k, v in times.items()}
    with torch.no_grad():
        ref = layers["attnkern-projected"](query, keys, lengths=lengths)
        ref_time = layers["projected-time"](query, keys, lengths=lengths, **times)
        nonempty = lengths > 0
        out = {}
        for p in providers:
            if p in TIME_PROVIDERS:
                out[p] = (layers[p](query, keys, lengths=lengths, **times) - ref_time)[nonempty].abs().max().item()
            else:
                out[p] = (layers[p](query, keys, lengths=lengths) - ref)[nonempty].abs().max().item()
        return out


# ----------------------------------------------------------------------------------------------
# Running the family


def order_of(provider: str, shape: LayerShape) -> str:
    if provider in ("attnkern", "attnkern-time"):
        return "absorbed" if AttentionPooling(shape.E, shape.H).uses_absorbed_order(shape.N, shape.L) else "projected"
    if provider == "attnkern-projected":
        return "projected"
    return ""


def run_layer_case(shape: LayerShape, mode: str, providers: Sequence[str], env: dict, *,
                   rounds: int = 5, reps: int = 3) -> List[dict]:
    errors = check_layers(shape, providers)
    fns = {p: layer_callable(p, shape, mode) for p in providers}
    times = time_rounds(fns, rounds=rounds, reps=reps)
    del fns
    med = {p: statistics.median(t) for p, t in times.items()}
    base = med.get("eager")
    out = []
    for p in providers:
        out.append({
            "family": "layer", "provider": p, "mode": mode, "shape": shape.as_dict(),
            "order": order_of(p, shape), "ms": med[p] * 1e3,
            "x_eager": base / med[p] if base else None, "max_abs_err": errors[p],
            "time_over_plain": _time_over_plain(p, med), "reps": len(times[p]), **env,
        })
    return out


def _time_over_plain(provider: str, med: Dict[str, float]) -> Optional[float]:
    """A time-aware provider's time over the same layer's without tables, in the same rounds."""
    plain = {"attnkern-time": "attnkern", "eager-time": "eager"}.get(provider)
    return med[provider] / med[plain] if plain in med else None


def run_model_case(providers: Sequence[str], env: dict, *, rounds: int = 5, reps: int = 3,
                   shape: LayerShape = MODEL_SHAPE, items: int = MODEL_ITEMS) -> List[dict]:
    fns = {p: model_step_callable(p, shape, items) for p in providers}
    times = time_rounds(fns, rounds=rounds, reps=reps)
    med = {p: statistics.median(t) for p, t in times.items()}
    out = []
    for p in providers:
        out.append({
            "family": "model", "provider": p, "mode": "train step", "shape": dict(shape.as_dict(), items=items),
            "order": order_of(p, shape), "ms": med[p] * 1e3,
            "x_eager": med["eager"] / med[p] if "eager" in med else None,
            "vs_sum": med[p] / med["sum"] if "sum" in med else None,
            "time_over_plain": _time_over_plain(p, med),
            "reps": len(times[p]), **env,
        })
    return out


def format_layer_markdown(records: Sequence[dict]) -> str:
    """One table per mode for the layer cases (ms and speedup over the eager layer per
    provider), then the model step."""
    lines = []
    layer = [r for r in records if r["family"] == "layer"]
    providers = [p for p in LAYER_PROVIDERS if any(r["provider"] == p for r in layer)]
    for mode in MODES:
        rows = [r for r in layer if r["mode"] == mode]
        if not rows:
            continue
        lines.append("Layer %s, ms (speedup over eager):\n" % mode)
        lines.append("| B | E | H | L | N | auto order | " + " | ".join(providers) + " |")
        lines.append("|---" * (6 + len(providers)) + "|")
        shapes = []
        for r in rows:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        for s in shapes:
            by = {r["provider"]: r for r in rows if r["shape"] == s}
            order = by["attnkern"]["order"] if "attnkern" in by else ""
            cells = []
            for p in providers:
                r = by.get(p)
                cells.append("" if r is None else "%.3g (%.2gx)" % (r["ms"], r["x_eager"] or 0.0))
            lines.append("| %d | %d | %d | %d | %d | %s | %s |" % (
                s["B"], s["E"], s["H"], s["L"], s["N"], order, " | ".join(cells)))
        lines.append("")
    model = [r for r in records if r["family"] == "model"]
    if model:
        s = model[0]["shape"]
        lines.append("TargetAttentionCTR training step (forward, backward, Adam), B=%d, L=%d, E=%d, "
                     "H=%d, %d items:\n" % (s["B"], s["L"], s["E"], s["H"], s["items"]))
        lines.append("| pooling | ms | speedup over eager | time / sum pooling's | time-aware / plain |")
        lines.append("|---|---|---|---|---|")
        for r in model:
            lines.append("| %s | %.3g | %s | %s | %s |" % (
                r["provider"], r["ms"], "%.2fx" % r["x_eager"] if r["x_eager"] else "",
                "%.2f" % r["vs_sum"] if r["vs_sum"] else "",
                "%.2f" % r["time_over_plain"] if r.get("time_over_plain") else ""))
        lines.append("")
    timed = [r for r in records if r.get("time_over_plain")]
    if timed:
        lines.append("Time-aware (time + recency tables) over plain, same rounds:\n")
        lines.append("| family | mode | B | L | N | provider | ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in timed:
            s = r["shape"]
            lines.append("| %s | %s | %d | %d | %d | %s | %.2f |" % (
                r["family"], r["mode"], s["B"], s["L"], s["N"], r["provider"], r["time_over_plain"]))
        lines.append("")
    return "\n".join(lines)


def parse_layer_shape(text: str) -> LayerShape:
    """"B,E,H,L,N" -> LayerShape (the --layer-shape option)."""
    try:
        B, E, H, L, N = (int(t) for t in text.split(","))
    except ValueError:
        raise ValueError("a layer shape is B,E,H,L,N (five ints), got %r" % text) from None
    if min(B, E, H, N) < 1 or L < 0 or E % H != 0:
        raise ValueError("a layer shape needs B, E, H, N >= 1, L >= 0 and H dividing E, got %r" % text)
    return LayerShape(B, E, H, L, N)


def run_family(shapes: Sequence[LayerShape], modes: Sequence[str], env: dict, *,
               model: bool = True, rounds: int = 5, reps: int = 3,
               model_shape: LayerShape = MODEL_SHAPE, model_items: int = MODEL_ITEMS,
               progress: Optional[Callable[[str], None]] = None) -> List[dict]:
    """Every layer case (each shape x mode, all LAYER_PROVIDERS) and then the model step."""
    records: List[dict] = []
    for shape in shapes:
        for mode in modes:
            if progress:
                progress("layer %s %s" % (shape.name, mode))
            records.extend(run_layer_case(shape, mode, LAYER_PROVIDERS, env, rounds=rounds, reps=reps))
    if model:
        if progress:
            progress("model step %s, %d items" % (model_shape.name, model_items))
        records.extend(run_model_case(MODEL_PROVIDERS, env, rounds=rounds, reps=reps,
                                      shape=model_shape, items=model_items))
    return records
