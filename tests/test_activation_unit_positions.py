"""Position-aware activation units: DMR's and DMIN's target attention with FuxiCTR's default
``use_pos_emb=True`` (each position's query mixes the target with that position's embedding)
through ActivationUnitPooling.forward_positions, against eager re-implementations of FuxiCTR's
DMIN ``TargetAttention`` and DMR ``Item2ItemNet`` (model_zoo/DMIN/src/DMIN.py,
model_zoo/DMR/src/DMR.py) in their default configurations (attention units [80, 40], ReLU,
pos_emb_dim 8): outputs and gradients on non-empty rows."""

import pytest
import torch
from torch import nn

import attnkern
from attnkern.functional import position_query_inputs
from attnkern.nn import ActivationUnitPooling
from test_activation_unit_zoo import BACKENDS


def _mlp(E, units=(80, 40)):
    """FuxiCTR's MLP_Block(4E -> units, ReLU, -> 1), no batch norm or dropout."""
    layers, width = [], 4 * E
    for u in units:
        layers += [nn.Linear(width, u), nn.ReLU()]
        width = u
    return nn.Sequential(*layers, nn.Linear(width, 1))


class DMINTargetAttention(nn.Module):
    """DMIN's TargetAttention(use_pos_emb=True): query_l = W_proj [target, pos_emb[l]]."""

    def __init__(self, E, L, pos_emb_dim=8):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(L, pos_emb_dim) * 0.5)
        self.W_proj = nn.Linear(E + pos_emb_dim, E)
        self.attn_mlp = _mlp(E)

    def position_query(self, target):
        L = self.pos_emb.shape[0]
        t = target.unsqueeze(1).expand(-1, L, -1)
        return self.W_proj(torch.cat([t, self.pos_emb.expand(t.size(0), -1, -1)], dim=-1))

    def forward(self, sequence_emb, target_emb, mask):
        seq_len = sequence_emb.size(1)
        q = self.position_query(target_emb)
        x = torch.cat([q, sequence_emb, q - sequence_emb, q * sequence_emb], dim=-1)
        s = self.attn_mlp(x.view(-1, 4 * q.size(-1))).view(-1, seq_len)
        s = s.masked_fill(mask.float() == 0, -1.e9).softmax(dim=-1)
        return (s.unsqueeze(-1) * sequence_emb).sum(dim=1)


class DMRItem2ItemNet(nn.Module):
    """DMR's Item2ItemNet(use_pos_emb=True), no context: query_l = ReLU(W_q [target,
    pos_emb[l]]); returns the softmax-pooled history and rel_i2i, the sum of the raw scores."""

    def __init__(self, E, L, pos_emb_dim=8):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(L, pos_emb_dim) * 0.5)
        self.W_q = nn.Sequential(nn.Linear(E + pos_emb_dim, E), nn.ReLU())
        self.attn_mlp = _mlp(E)

    def position_query(self, target):
        L = self.pos_emb.shape[0]
        t = target.unsqueeze(1).expand(-1, L, -1)
        return self.W_q(torch.cat([t, self.pos_emb.unsqueeze(0).expand(t.size(0), -1, -1)], dim=-1))

    def forward(self, target_emb, sequence_emb, mask):
        seq_len = sequence_emb.size(1)
        q = self.position_query(target_emb)
        x = torch.cat([q, sequence_emb, q - sequence_emb, q * sequence_emb], dim=-1)
        s = self.attn_mlp(x.view(-1, 4 * q.size(-1))).view(-1, seq_len)
        attn_out = (s.masked_fill(mask.float() == 0, -1.e9).softmax(dim=-1).unsqueeze(-1) * sequence_emb).sum(1)
        rel_i2i = (s * mask.float()).sum(dim=1, keepdim=True)
        return attn_out, rel_i2i


def _setup(cls, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    B, L, E = 5, 6, 8
    zoo = cls(E, L)
    ours = ActivationUnitPooling(E, (80, 40), "ReLU", "softmax", backend=backend)
    ours.load_mlp_([m for m in zoo.attn_mlp if isinstance(m, nn.Linear)])
    target = torch.randn(B, E, generator=gen, requires_grad=True)
    seq = torch.randn(B, L, E, generator=gen, requires_grad=True)
    lengths = torch.tensor([6, 0, 3, 1, 5])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return zoo, ours, target, seq, mask


def _check_grads(loss_zoo, loss_ours, zoo, ours, target, seq):
    inputs = [target, seq, zoo.pos_emb] + [p for m in zoo.modules() if isinstance(m, nn.Linear)
                                           and m not in set(zoo.attn_mlp) for p in (m.weight, m.bias)]
    mlp_zoo = [p for m in zoo.attn_mlp if isinstance(m, nn.Linear) for p in (m.weight, m.bias)]
    mlp_ours = [p for m in list(ours.hidden) + [ours.out] for p in (m.weight, m.bias)]
    gz = torch.autograd.grad(loss_zoo, inputs + mlp_zoo, retain_graph=True)
    go = torch.autograd.grad(loss_ours, inputs + mlp_ours, retain_graph=True)
    for a, b in zip(gz, go):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmin_target_attention_with_position_embeddings(backend):
    zoo, ours, target, seq, mask = _setup(DMINTargetAttention, backend, 0)
    want = zoo(seq, target, mask.long())
    got = ours.forward_positions(zoo.position_query(target), seq, mask=mask)
    ok = mask.any(1)
    torch.testing.assert_close(got[ok], want[ok], atol=2e-5, rtol=2e-5)
    assert (got[~ok] == 0).all()  # the zoo gives the mean of the padded row there
    _check_grads(want[ok].square().sum(), got[ok].square().sum(), zoo, ours, target, seq)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmr_item2item_with_position_embeddings(backend):
    zoo, ours, target, seq, mask = _setup(DMRItem2ItemNet, backend, 1)
    want_out, want_rel = zoo(target, seq, mask.long())
    pq = zoo.position_query(target)
    got_out = ours.forward_positions(pq, seq, mask=mask)
    # rel_i2i: the raw scores summed over the valid positions = the same unit pooling ones.
    weights = [(m.weight, m.bias) for m in list(ours.hidden) + [ours.out]]
    q0, wide, wide_weights = position_query_inputs(pq, seq, weights)
    got_rel = attnkern.activation_unit_pool(q0, wide, seq.new_ones(seq.shape[:2] + (1,)), wide_weights,
                                           mask=mask, backend=backend)
    ok = mask.any(1)
    torch.testing.assert_close(got_out[ok], want_out[ok], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_rel, want_rel, atol=2e-5, rtol=2e-5)
    _check_grads(want_out[ok].square().sum() + want_rel.sum(), got_out[ok].square().sum() + got_rel.sum(),
                 zoo, ours, target, seq)


def test_position_query_inputs_rejects_bad_shapes():
    k = torch.randn(2, 3, 4)
    w = [(torch.randn(5, 16), None), (torch.randn(1, 5), None)]
    with pytest.raises(ValueError, match="position_query must have the shape of key"):
        position_query_inputs(k[:, :2], k, w)
    with pytest.raises(ValueError, match=r"weights\[0\] weight must be \[units, 4E\]"):
        position_query_inputs(k, k, [(torch.randn(5, 12), None), (torch.randn(1, 5), None)])
