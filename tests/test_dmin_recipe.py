"""DMIN's self-attention (FuxiCTR model_zoo/DMIN/src/DMIN.py, default config: num_heads 4,
layer_norm, residuals, no dropout, post padding with a zero padding embedding) on
attnkern.sequence_attention, against an eager re-implementation of its ``get_mask``,
``BehaviorRefinerLayer`` and ``MultiInterestExtractorLayer`` (whose per-head target attention
is test_activation_unit_positions' ``DMINTargetAttention``), same weights, float64.

- Behaviour refiner: DMIN hands ``nn.MultiheadAttention`` the float mask ``1 - allowed``,
  which it *adds* to the logits: every query attends all L positions, padding included, the
  disallowed ones (later positions, padding other than itself) with +1. The recipe passes the
  same ``[B, 1, L, L]`` bias over the full padded rows, so it agrees on every row.
- Multi-interest extractor: ``ScaledDotProductAttention`` fills the disallowed scores with
  -1e9; with post padding a valid query attends exactly the valid keys j <= i, which is
  ``causal=True`` with ``lengths``. Padded queries differ (DMIN: the valid keys and itself;
  attnkern: 0); they reach the interests only through the target attention's masked positions,
  so the interests agree on non-empty rows. On an empty row DMIN gives the mean of the padded
  positions, attnkern 0.
"""

import pytest
import torch
from torch import nn

import attnkern
from attnkern.nn import ActivationUnitPooling
from test_activation_unit_positions import DMINTargetAttention
from test_activation_unit_zoo import BACKENDS

DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


def dmin_get_mask(ids, num_heads):
    """DMIN.get_mask: (pad_mask [B, L], attn_mask [B*H, L, L]), True = allowed."""
    padding_mask = ids == 0
    L = padding_mask.size(1)
    attn_mask = padding_mask.unsqueeze(1).repeat(1, L, 1)
    attn_mask = attn_mask & ~torch.eye(L).bool().unsqueeze(0).expand_as(attn_mask)
    attn_mask = attn_mask | torch.triu(torch.ones(L, L), 1).bool().unsqueeze(0).expand_as(attn_mask)
    attn_mask = attn_mask.unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(end_dim=1)
    return ~padding_mask, ~attn_mask


def _ffn(E):
    return nn.Sequential(nn.Linear(E, 2 * E), nn.ReLU(), nn.Linear(2 * E, E))


class DMINBehaviorRefiner(nn.Module):
    """BehaviorRefinerLayer(model_dim=E, ffn_dim=2E, num_heads=H)."""

    def __init__(self, E, H):
        super().__init__()
        self.attention = nn.MultiheadAttention(E, num_heads=H, batch_first=True)
        self.ffn = _ffn(E)
        self.layer_norm = nn.LayerNorm(E)

    def forward(self, x, attn_mask):
        # The zoo writes attn_mask.float(): the same values, in the model's float32.
        attn, _ = self.attention(x, x, x, attn_mask=1 - attn_mask.to(x.dtype))
        s = self.layer_norm(attn + x)
        return self.ffn(s) + s


class DMINMultiInterestExtractor(nn.Module):
    """MultiInterestExtractorLayer(model_dim=E, ffn_dim=2E, num_heads=H, use_pos_emb=True):
    one interest per head."""

    def __init__(self, E, H, L):
        super().__init__()
        self.num_heads, self.head_dim = H, E // H
        self.scale = self.head_dim ** 0.5
        self.W_qkv = nn.Linear(E, 3 * E, bias=False)
        self.W_o = nn.ModuleList([nn.Linear(self.head_dim, E, bias=False) for _ in range(H)])
        self.layer_norm = nn.ModuleList([nn.LayerNorm(E) for _ in range(H)])
        self.ffn = nn.ModuleList([_ffn(E) for _ in range(H)])
        self.target_attention = nn.ModuleList([DMINTargetAttention(E, L) for _ in range(H)])

    def forward(self, sequence_emb, target_emb, attn_mask, pad_mask):
        B = sequence_emb.size(0)
        q, k, v = (t.view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in torch.chunk(self.W_qkv(sequence_emb), 3, dim=-1))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
        scores = scores.masked_fill(attn_mask.view_as(scores).float() == 0, -1.e9)
        attn = torch.matmul(scores.softmax(dim=-1), v)
        interests = []
        for idx, h_head in enumerate(torch.chunk(attn, self.num_heads, dim=1)):
            s = self.layer_norm[idx](self.W_o[idx](h_head.squeeze(1)) + sequence_emb)
            head_out = self.ffn[idx](s) + s
            interests.append(self.target_attention[idx](head_out, target_emb, pad_mask))
        return interests


# ----------------------------------------------------------------- the recipe (docs/recipes.md)


def refine(refiner, x, attn_mask, backend, **options):
    """BehaviorRefinerLayer(x, attn_mask): its attention on sequence_attention, every position
    of the padded rows attended, the zoo's additive mask as a bias (``options``: another mask)."""
    B, L, E = x.shape
    mha = refiner.attention
    H = mha.num_heads
    qkv = nn.functional.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(B, L, 3, H, E // H).unbind(2)
    if not options:
        options = dict(causal=False, bias=1 - attn_mask.view(B, H, L, L)[:, :1].to(x.dtype))
    a = attnkern.sequence_attention(q, k, v, backend=backend, **options)
    s = refiner.layer_norm(mha.out_proj(a.reshape(B, L, E)) + x)
    return refiner.ffn(s) + s


def extract(extractor, pools, x, target, lengths, backend):
    """MultiInterestExtractorLayer(x, target, attn_mask, pad_mask) on its non-empty rows."""
    B, L, E = x.shape
    H = extractor.num_heads
    q, k, v = extractor.W_qkv(x).view(B, L, 3, H, E // H).unbind(2)
    a = attnkern.sequence_attention(q, k, v, lengths=lengths, causal=True, scale=1 / extractor.scale,
                                    backend=backend)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    interests = []
    for h in range(H):
        s = extractor.layer_norm[h](extractor.W_o[h](a[:, :, h]) + x)
        head_out = extractor.ffn[h](s) + s
        ta = extractor.target_attention[h]
        interests.append(pools[h].forward_positions(ta.position_query(target), head_out, mask=mask))
    return interests


def _setup(backend, seed=0):
    torch.manual_seed(seed)
    B, L, E, H = 6, 7, 16, 4
    lengths = torch.tensor([7, 0, 3, 1, 5, 2])
    ids = torch.randint(1, 50, (B, L)) * (torch.arange(L)[None, :] < lengths[:, None])
    x = (torch.randn(B, L, E, dtype=DT) * (ids != 0)[..., None]).requires_grad_()
    target = torch.randn(B, E, dtype=DT, requires_grad=True)
    refiner = DMINBehaviorRefiner(E, H).to(DT)
    extractor = DMINMultiInterestExtractor(E, H, L).to(DT)
    with torch.no_grad():  # non-trivial biases and norms, as after training
        for p in list(refiner.parameters()) + list(extractor.parameters()):
            p.copy_(torch.randn_like(p) * 0.3)
    pools = []
    for ta in extractor.target_attention:
        pool = ActivationUnitPooling(E, (80, 40), "ReLU", "softmax", backend=backend).to(DT)
        pool.load_mlp_([m for m in ta.attn_mlp if isinstance(m, nn.Linear)])
        pools.append(pool)
    return ids, lengths, x, target, refiner, extractor, pools


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmin_self_attention_recipe(backend):
    ids, lengths, x, target, refiner, extractor, pools = _setup(backend)
    pad_mask, attn_mask = dmin_get_mask(ids, extractor.num_heads)
    want_r = refiner(x, attn_mask)
    want = extractor(want_r, target, attn_mask, pad_mask.long())
    got_r = refine(refiner, x, attn_mask, backend)
    got = extract(extractor, pools, got_r, target, lengths, backend)

    ok = lengths > 0
    torch.testing.assert_close(got_r, want_r, **TOL)  # every row, padding and empty rows included
    for g, w in zip(got, want):
        torch.testing.assert_close(g[ok], w[ok], **TOL)
        assert (g[~ok] == 0).all() and (w[~ok] != 0).any()

    mlps_zoo = [p for ta in extractor.target_attention for m in ta.attn_mlp if isinstance(m, nn.Linear)
                for p in (m.weight, m.bias)]
    mlps_ours = [p for pool in pools for m in list(pool.hidden) + [pool.out] for p in (m.weight, m.bias)]
    others = [x, target] + list(refiner.parameters()) + [p for p in extractor.parameters()
                                                          if all(p is not q for q in mlps_zoo)]
    gz = torch.autograd.grad(want_r[ok].square().sum() + sum(w[ok].square().sum() for w in want),
                             others + mlps_zoo)
    go = torch.autograd.grad(got_r[ok].square().sum() + sum(g[ok].square().sum() for g in got),
                             others + mlps_ours)
    for a, b in zip(gz, go):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmin_refiner_mask_is_an_additive_bias(backend):
    """The refiner's float mask is a +1 on the disallowed logits, not a mask: attending only the
    valid keys j <= i (what its boolean mask means) gives other outputs on the valid rows."""
    ids, lengths, x, _, refiner, _, _ = _setup(backend, seed=1)
    _, attn_mask = dmin_get_mask(ids, refiner.attention.num_heads)
    want = refiner(x, attn_mask)
    torch.testing.assert_close(refine(refiner, x, attn_mask, backend), want, **TOL)
    masked = refine(refiner, x, attn_mask, backend, lengths=lengths, causal=True)
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    assert (masked[valid] - want[valid]).abs().max() > 1e-2
