"""The recipes of docs/sequence_layers.md: generative-recommenders' HSTU layers and FuxiCTR's BST
and TransAct transformer layers, their weights loaded into `HSTULayer` / `SequenceSelfAttention`,
give the same outputs and gradients (inputs and every parameter).

The zoo layers are written out below after their published code, with the same parameter and
attribute names and the same math, run eagerly on padded batches as the originals do:

- generative-recommenders, generative_recommenders/modules/stu.py (``STULayer``) through
  ops/hstu_compute.py and ops/pytorch/pt_hstu_attention.py, pt_hstu_linear.py (the PyTorch
  path: the padded [B, H, N, N] scores and its ``_get_valid_attn_mask``), and
  research/modeling/sequential/hstu.py (``SequentialTransductionUnitJagged`` with
  ``RelativeBucketedTimeAndPositionBasedBias``);
- FuxiCTR, model_zoo/BST/src/BST.py (``BehaviorTransformer``, ``TransformerBlock``, the mask
  of ``BST.get_mask``) and model_zoo/TransAct/src/TransAct.py (``TransActTransformer`` over
  ``nn.TransformerEncoderLayer``).

Where the original code can be imported (a checkout named by ATTNKERN_GR_REPO /
ATTNKERN_FUXICTR_REPO, or installed packages; generative-recommenders' PyTorch path needs
FBGEMM's jagged operators), the same recipes also run against it; otherwise those tests skip.
"""

import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkern
from attnkern.nn import HSTULayer, SequenceSelfAttention
from attnkern.sequence_testing import gr_mask  # its _get_valid_attn_mask, transcribed

BACKENDS = [b for b in ("reference", "cpu") if attnkern.backends()[b].available]
DT = torch.float64
TOL = dict(rtol=1e-7, atol=1e-9)
# The original generative-recommenders code runs in float32 only (FBGEMM's CPU jagged operators
# have no float64).
TOL32 = dict(rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------- jagged helpers


def offsets_of(lengths):
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def valid_mask(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]


def jagged_to_padded(values, offsets, n):
    """fbgemm.jagged_to_padded_dense (zero padding), differentiable."""
    lengths = offsets[1:] - offsets[:-1]
    b, pos = valid_mask(lengths, n).nonzero(as_tuple=True)
    out = values.new_zeros((lengths.numel(), n) + tuple(values.shape[1:]))
    return out.index_put((b, pos), values)


def padded_to_jagged(dense, offsets):
    """fbgemm.dense_to_jagged."""
    return dense[valid_mask(offsets[1:] - offsets[:-1], dense.shape[1])]


# ---------------------------------------------------------------------------- generative-recommenders, written out


def gr_hstu_mha(max_seq_len, alpha, q, k, v, seq_offsets, causal=True, num_targets=None,
                max_attn_len=0, contextual_seq_len=0):
    """pt_hstu_attention.pytorch_hstu_mha (no dropout)."""
    L, H, _ = q.shape
    V = v.shape[2]
    pad = lambda t: jagged_to_padded(t, seq_offsets, max_seq_len).transpose(1, 2)  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    qk_attn = torch.einsum("bhxa,bhya->bhxy", q, k) * alpha
    qk_attn = F.silu(qk_attn) / max_seq_len
    valid_attn_mask = gr_mask(max_seq_len, seq_offsets[1:] - seq_offsets[:-1], causal,
                              num_targets, max_attn_len, contextual_seq_len)
    qk_attn = qk_attn * valid_attn_mask.unsqueeze(1)
    attn_dense = torch.einsum("bhxd,bhdv->bhxv", qk_attn, v)
    return padded_to_jagged(attn_dense.transpose(1, 2).flatten(2, 3), seq_offsets).view(L, H, V)


class GRSTULayer(nn.Module):
    """modules/stu.py STULayer, HammerKernel.PYTORCH: hstu_compute_uqvk, hstu_mha,
    pytorch_hstu_compute_output (concat_ux=True)."""

    def __init__(self, embedding_dim, num_heads, hidden_dim, attention_dim,
                 output_dropout_ratio=0.0, causal=True, target_aware=True, max_attn_len=None,
                 attn_alpha=None, use_group_norm=False, contextual_seq_len=0):
        super().__init__()
        self._num_heads = num_heads
        self._embedding_dim = embedding_dim
        self._hidden_dim = hidden_dim
        self._attention_dim = attention_dim
        self._output_dropout_ratio = output_dropout_ratio
        self._target_aware = target_aware
        self._causal = causal
        self._max_attn_len = max_attn_len or 0
        self._attn_alpha = attn_alpha or 1.0 / (attention_dim ** 0.5)
        self._use_group_norm = use_group_norm
        self._contextual_seq_len = contextual_seq_len
        width = (hidden_dim * 2 + attention_dim * 2) * num_heads
        self._uvqk_weight = nn.Parameter(torch.empty(embedding_dim, width))
        nn.init.xavier_uniform_(self._uvqk_weight)
        self._uvqk_beta = nn.Parameter(torch.zeros(width))
        self._input_norm_weight = nn.Parameter(torch.ones(embedding_dim))
        self._input_norm_bias = nn.Parameter(torch.zeros(embedding_dim))
        self._output_weight = nn.Parameter(torch.empty(hidden_dim * num_heads * 3, embedding_dim))
        nn.init.xavier_uniform_(self._output_weight)
        norm_shape = hidden_dim * num_heads if not use_group_norm else num_heads
        self._output_norm_weight = nn.Parameter(torch.ones(norm_shape))
        self._output_norm_bias = nn.Parameter(torch.zeros(norm_shape))

    def forward(self, x, x_lengths, x_offsets, max_seq_len, num_targets):
        H, A, D = self._num_heads, self._attention_dim, self._hidden_dim
        normed_x = F.layer_norm(x, (self._embedding_dim,), self._input_norm_weight,
                                self._input_norm_bias, 1e-6)
        uvqk = torch.addmm(self._uvqk_beta, normed_x, self._uvqk_weight)
        u, v, q, k = torch.split(uvqk, [D * H, D * H, A * H, A * H], dim=1)
        u = F.silu(u)
        attn = gr_hstu_mha(max_seq_len, self._attn_alpha, q.view(-1, H, A), k.view(-1, H, A),
                           v.view(-1, H, D), x_offsets, self._causal,
                           num_targets if self._target_aware else None, self._max_attn_len,
                           self._contextual_seq_len).view(-1, D * H)
        if self._use_group_norm:
            normed = F.group_norm(attn.view(-1, H, D), num_groups=H, weight=self._output_norm_weight,
                                  bias=self._output_norm_bias, eps=1e-6).view(-1, H * D)
        else:
            normed = F.layer_norm(attn, (attn.shape[-1],), self._output_norm_weight,
                                  self._output_norm_bias, 1e-6)
        y = torch.cat([u, attn, u * normed], dim=1)
        y = F.dropout(y, p=self._output_dropout_ratio, training=self.training)
        return torch.addmm(x, y, self._output_weight)


class GRRelativeBucketedTimeAndPositionBasedBias(nn.Module):
    """research/modeling/sequential/hstu.py, verbatim math."""

    def __init__(self, max_seq_len, num_buckets, bucketization_fn):
        super().__init__()
        self._max_seq_len = max_seq_len
        self._ts_w = nn.Parameter(torch.empty(num_buckets + 1).normal_(mean=0, std=0.02))
        self._pos_w = nn.Parameter(torch.empty(2 * max_seq_len - 1).normal_(mean=0, std=0.02))
        self._num_buckets = num_buckets
        self._bucketization_fn = bucketization_fn

    def forward(self, all_timestamps):
        B = all_timestamps.size(0)
        N = self._max_seq_len
        t = F.pad(self._pos_w[: 2 * N - 1], [0, N]).repeat(N)
        t = t[..., :-N].reshape(1, N, 3 * N - 2)
        r = (2 * N - 1) // 2
        ext_timestamps = torch.cat([all_timestamps, all_timestamps[:, N - 1: N]], dim=1)
        bucketed_timestamps = torch.clamp(
            self._bucketization_fn(ext_timestamps[:, 1:].unsqueeze(2) - ext_timestamps[:, :-1].unsqueeze(1)),
            min=0, max=self._num_buckets).detach()
        rel_pos_bias = t[:, :, r:-r]
        rel_ts_bias = torch.index_select(self._ts_w, dim=0, index=bucketed_timestamps.view(-1)).view(B, N, N)
        return rel_pos_bias + rel_ts_bias


def gr_log_buckets(x):
    """HSTU's bucketization_fn."""
    return (torch.log(torch.abs(x).clamp(min=1)) / 0.301).long()


class GRSequentialTransductionUnitJagged(nn.Module):
    """research/modeling/sequential/hstu.py, normalization="rel_bias", linear_config="uvqk",
    no cache (delta_x_offsets=None)."""

    def __init__(self, embedding_dim, linear_hidden_dim, attention_dim, dropout_ratio,
                 attn_dropout_ratio, num_heads, linear_activation,
                 relative_attention_bias_module=None, normalization="rel_bias",
                 concat_ua=False, epsilon=1e-6):
        super().__init__()
        self._embedding_dim = embedding_dim
        self._linear_dim = linear_hidden_dim
        self._attention_dim = attention_dim
        self._dropout_ratio = dropout_ratio
        self._attn_dropout_ratio = attn_dropout_ratio
        self._num_heads = num_heads
        self._rel_attn_bias = relative_attention_bias_module
        self._normalization = normalization
        self._linear_config = "uvqk"
        self._uvqk = nn.Parameter(torch.empty(
            embedding_dim, linear_hidden_dim * 2 * num_heads + attention_dim * num_heads * 2
        ).normal_(mean=0, std=0.02))
        self._linear_activation = linear_activation
        self._concat_ua = concat_ua
        self._o = nn.Linear(linear_hidden_dim * num_heads * (3 if concat_ua else 1), embedding_dim)
        nn.init.xavier_uniform_(self._o.weight)
        self._eps = epsilon

    def forward(self, x, x_offsets, all_timestamps, invalid_attn_mask):
        n = invalid_attn_mask.size(-1)
        normed_x = F.layer_norm(x, normalized_shape=[self._embedding_dim], eps=self._eps)
        batched_mm_output = torch.mm(normed_x, self._uvqk)
        if self._linear_activation == "silu":
            batched_mm_output = F.silu(batched_mm_output)
        H, D, A = self._num_heads, self._linear_dim, self._attention_dim
        u, v, q, k = torch.split(batched_mm_output, [D * H, D * H, A * H, A * H], dim=1)
        B = x_offsets.size(0) - 1
        padded_q = jagged_to_padded(q, x_offsets, n)
        padded_k = jagged_to_padded(k, x_offsets, n)
        qk_attn = torch.einsum("bnhd,bmhd->bhnm", padded_q.view(B, n, H, A), padded_k.view(B, n, H, A))
        assert self._rel_attn_bias is not None
        if all_timestamps is not None:
            qk_attn = qk_attn + self._rel_attn_bias(all_timestamps).unsqueeze(1)
        qk_attn = F.silu(qk_attn) / n
        qk_attn = qk_attn * invalid_attn_mask.unsqueeze(0).unsqueeze(0)
        attn_output = padded_to_jagged(torch.einsum(
            "bhnm,bmhd->bnhd", qk_attn, jagged_to_padded(v, x_offsets, n).reshape(B, n, H, D),
        ).reshape(B, n, H * D), x_offsets)
        norm = lambda t: F.layer_norm(t, normalized_shape=[D * H], eps=self._eps)  # noqa: E731
        if self._concat_ua:
            a = norm(attn_output)
            o_input = torch.cat([u, a, u * a], dim=-1)
        else:
            o_input = u * norm(attn_output)
        return self._o(F.dropout(o_input, p=self._dropout_ratio, training=self.training)) + x


# ---------------------------------------------------------------------------- the recipes (docs/sequence_layers.md)


def stu_recipe(stu, backend):
    ours = HSTULayer.from_generative_recommenders(stu, backend=backend)

    def call(x, x_lengths, x_offsets, max_seq_len, num_targets):
        return ours(x, x_offsets, max_length=max_seq_len,
                    num_targets=num_targets if stu._target_aware else None,
                    attn_scale=1.0 / max_seq_len)
    return ours, call


def research_recipe(unit, backend):
    ours = HSTULayer.from_generative_recommenders(unit, backend=backend)

    def call(x, x_offsets, all_timestamps, N):
        lengths = x_offsets[1:] - x_offsets[:-1]
        valid = valid_mask(lengths, N)
        times = {}
        if all_timestamps is not None:
            # Its query time is the next action's (the last position keeps its own).
            nxt = torch.cat([all_timestamps, all_timestamps[:, -1:]], dim=1)[:, 1:]
            times = dict(timestamps=all_timestamps[valid], query_times=nxt[valid])
        return ours(x, x_offsets, max_length=N, attn_scale=1.0 / N, **times)
    return ours, call


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _close(a, b, what, tol=TOL):
    assert a is not None and b is not None, what
    torch.testing.assert_close(a, b, msg=lambda m: "%s: %s" % (what, m), **tol)


def _jagged_batch(lengths, E, seed):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_of(lengths)
    x = torch.randn(int(offsets[-1]), E, generator=g, dtype=DT)
    return x, offsets


STU_CONFIGS = [
    # heads, hidden, attention, target_aware, max_attn_len, contextual, group_norm
    dict(num_heads=2, hidden_dim=4, attention_dim=3),
    dict(num_heads=1, hidden_dim=5, attention_dim=6, max_attn_len=2),
    dict(num_heads=2, hidden_dim=3, attention_dim=4, contextual_seq_len=2, use_group_norm=True),
    dict(num_heads=2, hidden_dim=4, attention_dim=4, target_aware=False, attn_alpha=0.7),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", range(len(STU_CONFIGS)))
def test_stu_layer_recipe(backend, config):
    torch.manual_seed(config)
    stu = GRSTULayer(embedding_dim=8, **STU_CONFIGS[config]).to(DT).eval()
    _randomize(stu, config)
    check_stu(stu, backend, seed=config)


def check_stu(stu, backend, seed, dtype=DT):
    """STULayer(x, x_lengths, x_offsets, max_seq_len, num_targets) against the recipe: outputs,
    the input's and every parameter's gradients. Returns the largest difference seen."""
    lengths = torch.tensor([5, 0, 3, 7, 1])
    num_targets = torch.tensor([2, 0, 1, 3, 1])
    x, offsets = _jagged_batch(lengths, stu._embedding_dim, seed)
    x = x.to(dtype).requires_grad_(True)
    max_seq_len = 9  # the padded length it runs at: larger than every row here
    ours, call = stu_recipe(stu, backend)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    want = stu(x, lengths, offsets, max_seq_len, num_targets)
    got = call(x, lengths, offsets, max_seq_len, num_targets)
    theirs = [x, stu._uvqk_weight, stu._uvqk_beta, stu._input_norm_weight, stu._input_norm_bias,
              stu._output_norm_weight, stu._output_norm_bias, stu._output_weight]
    mine = [x, ours.uvqk.weight, ours.uvqk.bias, ours.input_norm.weight, ours.input_norm.bias,
            ours.output_norm.weight, ours.output_norm.bias, ours.out_proj.weight]
    gw = _grads((want * g).sum(), theirs)
    gg = _grads((got * g).sum(), mine)
    pairs = [("out", got, want)] + [
        ("grad %d" % i, b.t() if i in (1, 7) else b, a) for i, (a, b) in enumerate(zip(gw, gg))]
    return _compare(pairs, dtype)


def _compare(pairs, dtype):
    """Asserts each (what, got, want) close at the dtype's tolerance; returns the largest
    absolute difference."""
    worst = 0.0
    for what, got, want in pairs:
        _close(got, want, what, TOL if dtype == DT else TOL32)
        worst = max(worst, (got.double() - want.double()).abs().max().item())
    return worst


RESEARCH_CONFIGS = [
    dict(num_heads=2, linear_hidden_dim=4, attention_dim=3, concat_ua=False),
    dict(num_heads=1, linear_hidden_dim=5, attention_dim=4, concat_ua=True),
    dict(num_heads=2, linear_hidden_dim=3, attention_dim=3, concat_ua=True),
]


def make_research_unit(cls_unit, cls_bias, config, N, seed):
    torch.manual_seed(seed)
    c = dict(RESEARCH_CONFIGS[config])
    bias = cls_bias(max_seq_len=N, num_buckets=16, bucketization_fn=gr_log_buckets)
    unit = cls_unit(embedding_dim=8, dropout_ratio=0.0, attn_dropout_ratio=0.0,
                    linear_activation="silu", relative_attention_bias_module=bias, **c)
    unit = unit.to(DT).eval()
    _randomize(unit, seed)
    return unit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", range(len(RESEARCH_CONFIGS)))
def test_sequential_transduction_unit_recipe(backend, config):
    unit = make_research_unit(GRSequentialTransductionUnitJagged,
                              GRRelativeBucketedTimeAndPositionBasedBias, config, N=9, seed=config)
    check_research(unit, backend, N=9, seed=config)


def check_research(unit, backend, N, seed, dtype=DT):
    lengths = torch.tensor([9, 0, 4, 7, 1])
    x, offsets = _jagged_batch(lengths, unit._embedding_dim, seed)
    x = x.to(dtype).requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 2)
    # Gaps from seconds to a year, so that the log buckets are all visited and clamped.
    gaps = torch.exp(torch.rand(5, N, generator=g, dtype=torch.float64) * 17).long()
    all_timestamps = 1_600_000_000 + gaps.cumsum(1)
    all_timestamps = all_timestamps * valid_mask(lengths, N)  # padding holds 0, as its loader gives
    invalid_attn_mask = 1.0 - torch.triu(torch.ones(N, N, dtype=dtype), diagonal=1)
    rel = unit._rel_attn_bias
    ours, call = research_recipe(unit, backend)
    want = unit(x, offsets, all_timestamps, invalid_attn_mask)
    got = call(x, offsets, all_timestamps, N)
    w = torch.randn(x.shape, generator=g, dtype=dtype)
    theirs = [x, unit._uvqk, unit._o.weight, unit._o.bias, rel._ts_w, rel._pos_w]
    mine = [x, ours.uvqk.weight, ours.out_proj.weight, ours.out_proj.bias,
            ours.relative_bias.time_table, ours.relative_bias.position_table]
    gw = _grads((want * w).sum(), theirs)
    gg = _grads((got * w).sum(), mine)
    pairs = [("out", got, want), ("grad x", gg[0], gw[0]), ("grad uvqk", gg[1].t(), gw[1]),
             ("grad o.weight", gg[2], gw[2]), ("grad o.bias", gg[3], gw[3]),
             ("grad ts_w", gg[4].view(-1), gw[4]),
             ("grad pos_w", gg[5].view(-1).flip(0), gw[5][:N]),
             # Its position weights past N - 1 (key after query) are masked: zero gradient.
             ("grad pos_w, masked half", torch.zeros_like(gw[5][N:]), gw[5][N:])]
    return _compare(pairs, dtype)


# ---------------------------------------------------------------------------- FuxiCTR, written out


class FuxiTransformerBlock(nn.Module):
    """model_zoo/BST/src/BST.py TransformerBlock."""

    def __init__(self, model_dim=64, ffn_dim=64, num_heads=8, attn_dropout=0.0, net_dropout=0.0,
                 layer_norm=True, use_residual=True):
        super().__init__()
        self.attention = nn.MultiheadAttention(model_dim, num_heads=num_heads, dropout=attn_dropout,
                                               batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(model_dim, ffn_dim), nn.LeakyReLU(),
                                 nn.Linear(ffn_dim, model_dim))
        self.use_residual = use_residual
        self.dropout1 = nn.Dropout(net_dropout)
        self.dropout2 = nn.Dropout(net_dropout)
        self.layer_norm1 = nn.LayerNorm(model_dim) if layer_norm else None
        self.layer_norm2 = nn.LayerNorm(model_dim) if layer_norm else None

    def forward(self, x, attn_mask=None):
        attn, _ = self.attention(x, x, x, attn_mask=attn_mask)
        s = self.dropout1(attn)
        if self.use_residual:
            s += x
        if self.layer_norm1 is not None:
            s = self.layer_norm1(s)
        out = self.dropout2(self.ffn(s))
        if self.use_residual:
            out += s
        if self.layer_norm2 is not None:
            out = self.layer_norm2(out)
        return out


class FuxiBehaviorTransformer(nn.Module):
    """model_zoo/BST/src/BST.py BehaviorTransformer (sinusoidal position embedding concatenated)."""

    def __init__(self, seq_len=1, model_dim=64, num_heads=8, stacked_transformer_layers=1,
                 attn_dropout=0.0, net_dropout=0.0, use_position_emb=True, position_dim=4,
                 layer_norm=True, use_residual=True):
        super().__init__()
        self.position_dim = position_dim
        self.use_position_emb = use_position_emb
        self.transformer_blocks = nn.ModuleList(
            FuxiTransformerBlock(model_dim=model_dim, ffn_dim=model_dim, num_heads=num_heads,
                                 attn_dropout=attn_dropout, net_dropout=net_dropout,
                                 layer_norm=layer_norm, use_residual=use_residual)
            for _ in range(stacked_transformer_layers))
        if self.use_position_emb:
            self.position_emb = nn.Parameter(torch.Tensor(seq_len, position_dim))
            pe = torch.zeros(seq_len, position_dim)
            position = torch.arange(0, seq_len).float().unsqueeze(1)
            div_term = torch.exp(torch.arange(0, position_dim, 2).float() * (-np.log(10000.0) / position_dim))
            pe[:, 0::2] = torch.sin(position * div_term)
            pe[:, 1::2] = torch.cos(position * div_term)
            self.position_emb.data = pe

    def forward(self, x, attn_mask=None):
        if self.use_position_emb:
            x = torch.cat([x, self.position_emb.unsqueeze(0).repeat(x.size(0), 1, 1)], dim=-1)
        for block in self.transformer_blocks:
            x = block(x, attn_mask=attn_mask)
        return x


def fuxi_bst_mask(history_ids, num_heads, use_causal_mask):
    """BST.get_mask: (padding_mask [B, L+1], attn_mask [B*H, L+1, L+1]), True = masked."""
    padding_mask = history_ids == 0
    padding_mask = torch.cat([padding_mask, torch.zeros(history_ids.size(0), 1).bool()], dim=-1)
    seq_len = padding_mask.size(1)
    attn_mask = padding_mask.unsqueeze(1).repeat(1, seq_len, 1)
    diag_zeros = ~torch.eye(seq_len).bool().unsqueeze(0).expand_as(attn_mask)
    attn_mask = attn_mask & diag_zeros
    if use_causal_mask:
        causal_mask = torch.triu(torch.ones(seq_len, seq_len), 1).bool().unsqueeze(0).expand_as(attn_mask)
        attn_mask = attn_mask | causal_mask
    attn_mask = attn_mask.unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(end_dim=1)
    return padding_mask, attn_mask


class FuxiTransActTransformer(nn.Module):
    """model_zoo/TransAct/src/TransAct.py TransActTransformer (no time-window mask)."""

    def __init__(self, transformer_in_dim, dim_feedforward=64, num_heads=1, dropout=0,
                 transformer_layers=1, first_k_cols=1, concat_max_pool=True):
        super().__init__()
        self.concat_max_pool = concat_max_pool
        self.first_k_cols = first_k_cols
        encoder_layer = nn.TransformerEncoderLayer(d_model=transformer_in_dim, nhead=num_heads,
                                                   dim_feedforward=dim_feedforward, dropout=dropout,
                                                   batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(encoder_layer, num_layers=transformer_layers,
                                                         enable_nested_tensor=False)
        if self.concat_max_pool:
            self.out_linear = nn.Linear(transformer_in_dim, transformer_in_dim)

    def forward(self, target_emb, sequence_emb, time_interval_seq=None, mask=None):
        seq_len = sequence_emb.size(1)
        concat_seq_emb = torch.cat([sequence_emb, target_emb.unsqueeze(1).expand(-1, seq_len, -1)], dim=-1)
        key_padding_mask = self.adjust_mask(mask)
        tfmr_out = self.transformer_encoder(src=concat_seq_emb, src_key_padding_mask=key_padding_mask)
        return self.tail(tfmr_out, key_padding_mask)

    def tail(self, tfmr_out, key_padding_mask):
        tfmr_out = tfmr_out.masked_fill(key_padding_mask.unsqueeze(-1).repeat(1, 1, tfmr_out.shape[-1]), 0.)
        output_concat = [tfmr_out[:, -self.first_k_cols:].flatten(start_dim=1)]
        if self.concat_max_pool:
            tfmr_out = tfmr_out.masked_fill(
                key_padding_mask.unsqueeze(-1).repeat(1, 1, tfmr_out.shape[-1]), -1e9)
            output_concat.append(self.out_linear(tfmr_out.max(dim=1).values))
        return torch.cat(output_concat, dim=-1)

    @staticmethod
    def adjust_mask(mask):
        fully_masked = mask.all(dim=-1)
        mask[fully_masked, -1] = 0
        return mask


# ---------------------------------------------------------------------------- the FuxiCTR recipes


def transformer_block_recipe(block, causal, backend):
    """BST's TransformerBlock over each row's valid tokens, jagged [T, d]."""
    attn = SequenceSelfAttention.from_multihead_attention(block.attention, causal=causal, backend=backend)

    def call(x, offsets):
        s = attn(x, offsets) + x if block.use_residual else attn(x, offsets)
        if block.layer_norm1 is not None:
            s = block.layer_norm1(s)
        out = block.ffn(s) + s if block.use_residual else block.ffn(s)
        if block.layer_norm2 is not None:
            out = block.layer_norm2(out)
        return out
    return attn, call


def encoder_layer_recipe(layer, backend):
    """nn.TransformerEncoderLayer (post-norm, as TransAct builds it) over jagged [T, d]."""
    if layer.norm_first:
        raise ValueError("this recipe is the post-norm layer")
    attn = SequenceSelfAttention.from_multihead_attention(layer.self_attn, causal=False, backend=backend)

    def call(x, offsets):
        h = layer.norm1(x + attn(x, offsets))
        return layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))
    return attn, call


def left_padded(lengths, L):
    """Valid positions of histories padded "pre" (on the left), FuxiCTR's default."""
    return torch.arange(L)[None, :] >= (L - lengths)[:, None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_bst_recipe(backend, causal):
    check_bst(FuxiBehaviorTransformer, backend, causal, seed=int(causal))


def check_bst(cls, backend, causal, seed, layers=2, dtype=DT):
    torch.manual_seed(seed)
    B, L, E, P, H = 4, 6, 6, 4, 2
    model = cls(seq_len=L + 1, model_dim=E + P, num_heads=H, stacked_transformer_layers=layers,
                position_dim=P).to(dtype).eval()
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 0, 3, 1])
    hist_valid = left_padded(lengths, L)
    ids = torch.randint(1, 100, (B, L), generator=g) * hist_valid
    seq = torch.randn(B, L + 1, E, generator=g, dtype=dtype) * torch.cat(
        [hist_valid, torch.ones(B, 1, dtype=torch.bool)], 1)[..., None]
    seq.requires_grad_(True)
    _, attn_mask = fuxi_bst_mask(ids, H, causal)
    want = model(seq, attn_mask)
    # The recipe: each row's valid tokens (history, then the target), jagged, with the
    # position embedding of their padded position concatenated as BehaviorTransformer does.
    valid = torch.cat([hist_valid, torch.ones(B, 1, dtype=torch.bool)], 1)
    offsets = offsets_of(valid.sum(1))
    x = torch.cat([seq, model.position_emb.unsqueeze(0).expand(B, -1, -1)], -1)[valid]
    recipes = [transformer_block_recipe(blk, causal, backend) for blk in model.transformer_blocks]
    for _, call in recipes:
        x = call(x, offsets)
    w = torch.randn(x.shape, generator=g, dtype=dtype)
    mha = [blk.attention for blk in model.transformer_blocks]
    theirs = [seq, model.position_emb] + [p for m in mha for p in (m.in_proj_weight, m.out_proj.weight)]
    mine_attn = [a for a, _ in recipes]
    # The FFN and norms are the block's own modules in both runs.
    ffn = [p for blk in model.transformer_blocks for p in blk.ffn.parameters()]
    gw = _grads((want[valid] * w).sum(), theirs + ffn)
    gg_all = _grads((x * w).sum(), [seq, model.position_emb] + [
        p for a in mine_attn for p in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                       a.out_proj.weight)] + ffn)
    gg = list(gg_all[:2])
    for i in range(len(mine_attn)):
        q, k, v, o = gg_all[2 + 4 * i: 6 + 4 * i]
        gg += [torch.cat([q, k, v]), o]
    gg += list(gg_all[2 + 4 * len(mine_attn):])
    pairs = [("out", x, want[valid])] + [("grad %d" % i, b, a) for i, (a, b) in enumerate(zip(gw, gg))]
    return _compare(pairs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transact_recipe(backend):
    check_transact(FuxiTransActTransformer, backend, seed=0)


def check_transact(cls, backend, seed, dtype=DT):
    torch.manual_seed(seed)
    B, L, E = 4, 5, 4
    model = cls(2 * E, dim_feedforward=16, num_heads=2, transformer_layers=2, first_k_cols=2).to(dtype).eval()
    _randomize(model, seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 0, 2, 1])  # 0: every action masked, adjust_mask unmasks the last
    target = torch.randn(B, E, generator=g, dtype=dtype).requires_grad_(True)
    sequence = torch.randn(B, L, E, generator=g, dtype=dtype).requires_grad_(True)
    padding_mask = ~left_padded(lengths, L)
    want = model(target, sequence, mask=padding_mask.clone())
    # The recipe: the valid actions of each row, jagged, through the encoder layers; the
    # padded output (zeros elsewhere) goes through TransAct's own tail.
    key_padding_mask = model.adjust_mask(padding_mask.clone())
    valid = ~key_padding_mask
    offsets = offsets_of(valid.sum(1))
    x = torch.cat([sequence, target.unsqueeze(1).expand(-1, L, -1)], -1)[valid]
    recipes = [encoder_layer_recipe(layer, backend) for layer in model.transformer_encoder.layers]
    for _, call in recipes:
        x = call(x, offsets)
    dense = x.new_zeros(B, L, 2 * E).index_put(valid.nonzero(as_tuple=True), x)
    got = model.tail(dense, key_padding_mask)
    w = torch.randn(want.shape, generator=g, dtype=dtype)
    layers = model.transformer_encoder.layers
    theirs = [target, sequence] + [p for m in layers for p in (m.self_attn.in_proj_weight,
                                                                m.self_attn.in_proj_bias)]
    gw = _grads((want * w).sum(), theirs)
    gg_all = _grads((got * w).sum(), [target, sequence] + [
        p for a, _ in recipes for p in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight,
                                        a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)])
    gg = list(gg_all[:2])
    for i in range(len(recipes)):
        qw, kw, vw, qb, kb, vb = gg_all[2 + 6 * i: 8 + 6 * i]
        gg += [torch.cat([qw, kw, vw]), torch.cat([qb, kb, vb])]
    pairs = [("out", got, want)] + [("grad %d" % i, b, a) for i, (a, b) in enumerate(zip(gw, gg))]
    return _compare(pairs, dtype)


# ---------------------------------------------------------------------------- the layers themselves


@pytest.mark.parametrize("backend", BACKENDS)
def test_hstu_layer_padded_equals_jagged(backend):
    torch.manual_seed(0)
    layer = HSTULayer(8, 2, num_time_buckets=8, num_positions=6, output="gate", backend=backend).to(DT)
    lengths = torch.tensor([4, 0, 6])
    valid = valid_mask(lengths, 6)
    xp = torch.randn(3, 6, 8, dtype=DT)
    tp = torch.randint(0, 10 ** 6, (3, 6)).cumsum(1)
    nt = torch.tensor([1, 0, 2])
    padded = layer(xp, lengths=lengths, num_targets=nt, timestamps=tp)
    jagged = layer(xp[valid], offsets_of(lengths), max_length=6, num_targets=nt, timestamps=tp[valid])
    torch.testing.assert_close(padded[valid], jagged, **TOL)


def test_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match="bias_heads"):
        HSTULayer(8, 2, num_time_buckets=4, bias_heads=3)
    with pytest.raises(ValueError, match="output"):
        HSTULayer(8, 2, output="sum")
    with pytest.raises(ValueError, match="silu"):
        HSTULayer(8, 2, silu="v")
    with pytest.raises(ValueError, match="embed_dim .7. must be divisible by num_heads"):
        HSTULayer(7, 2)
    with pytest.raises(ValueError, match="normalization"):
        SequenceSelfAttention(8, 2, normalization="sigmoid")
    with pytest.raises(ValueError, match="num_kv_heads"):
        SequenceSelfAttention(8, 4, num_kv_heads=3)
    layer = HSTULayer(8, 2, num_time_buckets=4)
    x, offsets = torch.randn(5, 8), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="timestamps"):
        layer(x, offsets)
    with pytest.raises(ValueError, match=r"jagged \[T, 8\]"):
        layer(torch.randn(5, 7), offsets, timestamps=torch.arange(5))
    with pytest.raises(ValueError, match=r"padded \[B, L, 8\]"):
        layer(x, timestamps=torch.arange(5))
    with pytest.raises(ValueError, match="no time bias"):
        HSTULayer(8, 2)(x, offsets, timestamps=torch.arange(5))
    with pytest.raises(ValueError, match="attn_scale"):
        SequenceSelfAttention(8, 2)(x, offsets, attn_scale=0.5)
    with pytest.raises(TypeError, match="STULayer"):
        HSTULayer.from_generative_recommenders(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="add_bias_kv"):
        SequenceSelfAttention.from_multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True))


# ---------------------------------------------------------------------------- against the original code, where it imports


def _with_repo(env):
    path = os.environ.get(env)
    if path and path not in sys.path:
        sys.path.insert(0, path)
    return path


def _gr():
    _with_repo("ATTNKERN_GR_REPO")
    from attnkern.tools._fbgemm import status_with

    why = status_with("fbgemm_gpu")  # its PyTorch path calls torch.ops.fbgemm's jagged operators
    if why is not None:
        pytest.skip(why)
    try:
        stu = importlib.import_module("generative_recommenders.modules.stu")
        hstu = importlib.import_module("generative_recommenders.research.modeling.sequential.hstu")
    except Exception as e:  # noqa: BLE001 - absent, or present without its dependencies
        pytest.skip("generative-recommenders does not import here (%s: %s)" % (type(e).__name__, e))
    return stu, hstu


def _fuxi(relpath, name):
    root = _with_repo("ATTNKERN_FUXICTR_REPO")
    if not root or not os.path.exists(os.path.join(root, relpath)):
        pytest.skip("ATTNKERN_FUXICTR_REPO does not name a FuxiCTR checkout")
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, relpath))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        pytest.skip("FuxiCTR does not import here (%s: %s)" % (type(e).__name__, e))
    return module


class _RealSTU(nn.Module):
    """The original STULayer behind GRSTULayer's call signature."""

    def __init__(self, stu_mod, **kw):
        super().__init__()
        names = dict(embedding_dim=kw.pop("embedding_dim"), num_heads=kw.pop("num_heads"),
                     hidden_dim=kw.pop("hidden_dim"), attention_dim=kw.pop("attention_dim"))
        cfg = stu_mod.STULayerConfig(output_dropout_ratio=0.0, **names, **kw)
        self.layer = stu_mod.STULayer(cfg)
        # Its PyTorch path (the default is its Triton kernels, GPU only).
        common = importlib.import_module("generative_recommenders.common")
        self.layer._hammer_kernel = common.HammerKernel.PYTORCH

    def __getattr__(self, name):
        if name.startswith("_") and name not in ("_parameters", "_buffers", "_modules"):
            return getattr(self._modules["layer"], name)
        return super().__getattr__(name)

    def forward(self, x, x_lengths, x_offsets, max_seq_len, num_targets):
        return self.layer(x=x, x_lengths=x_lengths, x_offsets=x_offsets, max_seq_len=max_seq_len,
                          num_targets=num_targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_original_generative_recommenders(backend):
    stu_mod, hstu_mod = _gr()
    for i, config in enumerate(STU_CONFIGS):
        torch.manual_seed(i)
        stu = _RealSTU(stu_mod, embedding_dim=8, **config).float().eval()
        _randomize(stu, i)
        check_stu(stu, backend, seed=i, dtype=torch.float32)
    for i in range(len(RESEARCH_CONFIGS)):
        unit = make_research_unit(hstu_mod.SequentialTransductionUnitJagged,
                                  hstu_mod.RelativeBucketedTimeAndPositionBasedBias, i, N=9, seed=i)
        check_research(_ResearchCall(unit.float()), backend, N=9, seed=i, dtype=torch.float32)


class _ResearchCall(nn.Module):
    """The original unit's forward returns (output, cache states): keep the output."""

    def __init__(self, unit):
        super().__init__()
        self.unit = unit

    def __getattr__(self, name):
        if name.startswith("_") and name not in ("_parameters", "_buffers", "_modules"):
            return getattr(self._modules["unit"], name)
        return super().__getattr__(name)

    def forward(self, x, x_offsets, all_timestamps, invalid_attn_mask):
        return self.unit(x=x, x_offsets=x_offsets, all_timestamps=all_timestamps,
                         invalid_attn_mask=invalid_attn_mask)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_original_fuxictr(backend):
    bst = _fuxi(os.path.join("model_zoo", "BST", "src", "BST.py"), "fuxictr_bst")
    transact = _fuxi(os.path.join("model_zoo", "TransAct", "src", "TransAct.py"), "fuxictr_transact")
    for causal in (False, True):
        check_bst(bst.BehaviorTransformer, backend, causal, seed=int(causal))

    class TransAct(transact.TransActTransformer):
        tail = FuxiTransActTransformer.tail

    check_transact(TransAct, backend, seed=0)
