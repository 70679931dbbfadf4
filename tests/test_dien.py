"""DIEN served: the attention scores that gate DIEN's interest-evolution GRU, from attnkern, with
the zoos' weights loaded by the recipes of docs/attention_weights.md. Small eager modules written
here reproduce FuxiCTR's DIEN `AttentionLayer` (model_zoo/DIEN/src/DIEN.py: bilinear, dot and
DIN attention, masked softmax or raw scores) and DeepCTR-Torch's
`AttentionSequencePoolingLayer(return_score=True)` (deepctr_torch/layers/sequence.py) feeding the
AUGRU / AGRU / AIGRU of both zoos; scores, the evolved interest and the gradients of every
parameter are compared on non-empty rows, in float64 and float32. Both zoos drop rows with an
empty history before the evolution (their output there is 0, as here)."""

import pytest
import torch
from torch import nn

import attnkern
from attnkern.nn import ActivationUnitPooling
from test_activation_unit_zoo import (DeepAttentionSequencePoolingLayer, FuxiDINAttention, _acts, _linears,
                                      _randomise_)

BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
                not attnkern.backends()["cpu"].available, reason="extension not built"))]


# ---- FuxiCTR ------------------------------------------------------------------------------------

class FuxiDIENAttention(nn.Module):
    """FuxiCTR's DIEN AttentionLayer (attention_dropout 0): the [B, L] scores of the history."""

    def __init__(self, model_dim, attention_type, attention_hidden_units, attention_activation,
                 use_attention_softmax):
        super().__init__()
        self.attention_type = attention_type
        self.use_attention_softmax = use_attention_softmax
        if attention_type == "bilinear_attention":
            self.W_kernel = nn.Parameter(torch.eye(model_dim))
        elif attention_type == "din_attention":  # the MLP_Block of FuxiCTR's DIN_Attention
            self.attn_mlp = FuxiDINAttention(model_dim, attention_hidden_units, attention_activation,
                                             False).attention_layer

    def forward(self, sequence_emb, target_emb, mask=None):
        seq_len = sequence_emb.size(1)
        if self.attention_type == "dot_attention":
            attn_score = sequence_emb @ target_emb.unsqueeze(-1)
        elif self.attention_type == "bilinear_attention":
            attn_score = (sequence_emb @ self.W_kernel) @ target_emb.unsqueeze(-1)
        else:
            target_emb = target_emb.unsqueeze(1).expand(-1, seq_len, -1)
            din_concat = torch.cat([target_emb, sequence_emb, target_emb - sequence_emb,
                                    target_emb * sequence_emb], dim=-1)
            attn_score = self.attn_mlp(din_concat.view(-1, 4 * target_emb.size(-1)))
        attn_score = attn_score.view(-1, seq_len)
        if mask is not None:
            attn_score = attn_score * mask.float()
        if self.use_attention_softmax:
            if mask is not None:
                attn_score += -1.e9 * (1 - mask.float())
            attn_score = attn_score.softmax(dim=-1)
        return attn_score


def fuxi_scores_attnkern(layer, sequence_emb, target_emb, mask, units, activation, backend):
    """The recipe of docs/attention_weights.md for FuxiCTR's AttentionLayer: ([B, L] scores, the
    parameters that hold the attention's weights on attnkern's side)."""
    if layer.attention_type == "din_attention":
        pool = ActivationUnitPooling(target_emb.shape[-1], units, activation,
                                     "softmax" if layer.use_attention_softmax else None, dice_eps=1e-9,
                                     backend=backend, dtype=target_emb.dtype)
        pool.load_mlp_(_linears(layer), _acts(layer))
        pool.train(layer.training)  # Dice: batch statistics in train(), running ones in eval()
        _, w = pool(target_emb, sequence_emb, mask=mask.bool(), need_weights=True)
        return w, [pool.hidden[0].weight]
    bilinear = layer.attention_type == "bilinear_attention"
    query = target_emb @ layer.W_kernel.T if bilinear else target_emb
    w = attnkern.attention_weights(query.unsqueeze(1), sequence_emb.unsqueeze(2), mask=mask.bool(),
                                   scale=1.0, backend=backend)[:, 0]
    return w, [layer.W_kernel] if bilinear else []


# ---- DeepCTR-Torch ------------------------------------------------------------------------------

def deep_scores_attnkern(layer, query, keys, keys_length, units, activation, backend):
    """The recipe of docs/attention_weights.md for DeepCTR's layer: ([B, 1, T] scores, the
    ActivationUnitPooling holding its weights)."""
    pool = ActivationUnitPooling(keys.shape[-1], units, activation,
                                 "softmax" if layer.weight_normalization else None, dice_eps=1e-8,
                                 dice_affine=activation == "dice", backend=backend, dtype=keys.dtype)
    pool.load_mlp_(_linears(layer), _acts(layer))
    pool.train(layer.training)  # Dice: batch statistics in train(), running ones in eval()
    _, w = pool(query, keys, lengths=keys_length.view(-1), need_weights=True)  # query [B, 1, E]: w [B, 1, T]
    return w, pool


# ---- the interest evolution (both zoos) ---------------------------------------------------------

class AttentionalGRU(nn.Module):
    """The zoos' AUGRU / AGRU cell (x2h, h2h; update gate scaled by the score, or the score as the
    update gate), run over each row's valid prefix from h = 0: the final state of their DynamicGRU
    on the packed sequence (0 for an empty row). AIGRU is a plain nn.GRU over keys * score."""

    def __init__(self, dim, gru_type):
        super().__init__()
        self.gru_type = gru_type
        if gru_type == "AIGRU":
            self.gru = nn.GRU(dim, dim, batch_first=True)
        else:
            self.x2h = nn.Linear(dim, 3 * dim)
            self.h2h = nn.Linear(dim, 3 * dim)

    def forward(self, keys, scores, lengths):
        B, L, E = keys.shape
        h = keys.new_zeros(B, E)
        if self.gru_type == "AIGRU":
            x = keys * scores.unsqueeze(-1)
        for t in range(L):
            if self.gru_type == "AIGRU":
                _, new = self.gru(x[:, t:t + 1], h.unsqueeze(0))
                new = new[0]
            else:
                i_u, i_r, i_n = self.x2h(keys[:, t]).chunk(3, 1)
                h_u, h_r, h_n = self.h2h(h).chunk(3, 1)
                reset = torch.sigmoid(i_r + h_r)
                cand = torch.tanh(i_n + reset * h_n)
                a = scores[:, t:t + 1]
                update = a * torch.sigmoid(i_u + h_u) if self.gru_type == "AUGRU" else a
                new = h + update * (cand - h)
            h = torch.where((t < lengths)[:, None], new, h)
        return h


def _problem(gen, dtype, B=5, L=7, E=6):
    lengths = torch.tensor([3, 0, L, 1, 5][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    target = torch.randn(B, E, generator=gen).to(dtype)
    keys = torch.randn(B, L, E, generator=gen).to(dtype)
    return target, keys, lengths, mask


def _evolve_and_compare(zoo_scores, our_scores, keys, lengths, gru, params, dtype):
    """The two score tensors through one GRU: scores and final states equal on non-empty rows,
    and so the gradients of `params` (the attention's and the GRU's) and of the keys."""
    nonempty = lengths > 0
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(our_scores[nonempty].to(dtype), zoo_scores[nonempty], **tol)
    states = [gru(keys, s.to(dtype), lengths) for s in (zoo_scores, our_scores)]
    torch.testing.assert_close(states[1][nonempty], states[0][nonempty], **tol)
    grads = [torch.autograd.grad(st[nonempty].square().sum() + st[nonempty].sum(), ps + [keys])
             for st, ps in zip(states, params)]
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("attention_type,gru_type,softmax", [
    ("bilinear_attention", "AUGRU", True),  # FuxiCTR's DIEN default
    ("dot_attention", "AGRU", True),
    ("din_attention", "AIGRU", True),
    ("din_attention", "AUGRU", False),
])
def test_fuxictr_dien(backend, dtype, attention_type, gru_type, softmax):
    gen = torch.Generator().manual_seed(0)
    E, units = 6, (8, 4)
    zoo = _randomise_(FuxiDIENAttention(E, attention_type, units, "dice", softmax), gen).to(dtype)
    gru = _randomise_(AttentionalGRU(E, gru_type), gen).to(dtype)
    target, keys, lengths, mask = _problem(gen, dtype, E=E)
    keys.requires_grad_()
    zoo_scores = zoo(keys, target, mask.long())
    # The recipe runs on a copy of the zoo layer, so that the two sides' gradients are apart.
    twin = FuxiDIENAttention(E, attention_type, units, "dice", softmax).to(dtype).eval()
    twin.load_state_dict(zoo.state_dict())
    ours, our_params = fuxi_scores_attnkern(twin, keys, target, mask, units, "dice", backend)
    zoo_params = ([zoo.W_kernel] if attention_type == "bilinear_attention"
                  else [_linears(zoo)[0].weight] if attention_type == "din_attention" else [])
    _evolve_and_compare(zoo_scores, ours, keys, lengths, gru, [zoo_params, our_params], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation,weight_normalization,gru_type", [
    ("relu", True, "AUGRU"),  # DeepCTR's DIEN default attention (att_hidden_units=(64, 16))
    ("dice", True, "AGRU"),
    ("sigmoid", False, "AIGRU"),
])
def test_deepctr_dien(backend, dtype, activation, weight_normalization, gru_type):
    gen = torch.Generator().manual_seed(1)
    E, units = 4, (6, 3)
    zoo = _randomise_(DeepAttentionSequencePoolingLayer(units, activation, weight_normalization, E,
                                                         return_score=True), gen).to(dtype)
    gru = _randomise_(AttentionalGRU(E, gru_type), gen).to(dtype)
    target, keys, lengths, _ = _problem(gen, dtype, E=E)
    keys.requires_grad_()
    zoo_scores = zoo(target[:, None], keys, lengths[:, None])[:, 0]  # [B, T]
    ours, pool = deep_scores_attnkern(zoo, target[:, None], keys, lengths[:, None], units, activation,
                                      backend)
    _evolve_and_compare(zoo_scores, ours[:, 0], keys, lengths, gru,
                        [[_linears(zoo)[0].weight], [pool.hidden[0].weight]], dtype)
