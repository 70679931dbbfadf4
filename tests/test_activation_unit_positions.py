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


class DMRUser2ItemNet(nn.Module):
    """DMR's User2ItemNet without context features (its default): query_l = ReLU(W_q pos_emb[l]),
    raw scores s_l of the activation unit, history row i attends with softmax(s) to the valid
    positions j <= i and to itself (its causal mask's diagonal, valid or not);
    user_i = ReLU(W_o sum_j p_ij seq_j). Returns rel_u2i = <user_{L-1}, target> and user_{L-2}
    (the auxiliary loss's)."""

    def __init__(self, E, L, pos_emb_dim=8):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.randn(L, pos_emb_dim) * 0.5)
        self.W_q = nn.Sequential(nn.Linear(pos_emb_dim, E), nn.ReLU())
        self.attn_mlp = _mlp(E)
        self.W_o = nn.Sequential(nn.Linear(E, E), nn.ReLU())

    def position_query(self, batch):
        return self.W_q(self.pos_emb.unsqueeze(0).expand(batch, -1, -1))

    def forward(self, target_emb, sequence_emb, mask):
        B, L, E = sequence_emb.shape
        q = self.position_query(B)
        x = torch.cat([q, sequence_emb, q - sequence_emb, q * sequence_emb], dim=-1)
        s = self.attn_mlp(x.view(-1, 4 * E)).view(-1, L)
        attn_mask = mask.unsqueeze(1).repeat(1, L, 1) & torch.tril(torch.ones(L, L)).bool()
        attn_mask = attn_mask | torch.eye(L).bool()
        p = s.unsqueeze(1).repeat(1, L, 1).masked_fill(~attn_mask, -1.e9).softmax(dim=-1)
        user = self.W_o(torch.bmm(p, sequence_emb))
        return (user[:, -1] * target_emb).sum(-1, keepdim=True), user[:, -2]


def user2item(u2i, pool, target_emb, sequence_emb, mask):
    """The recipe (docs/recipes.md): the two rows DMR reads, each the position-query unit with
    softmax over its causal row's positions."""
    B, L, _ = sequence_emb.shape
    q_pos = u2i.position_query(B)
    pos = torch.arange(L)
    rows = []
    for i in (L - 1, L - 2):
        valid = (mask & (pos <= i)) | (pos == i)
        rows.append(u2i.W_o(pool.forward_positions(q_pos, sequence_emb, mask=valid)))
    return (rows[0] * target_emb).sum(-1, keepdim=True), rows[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmr_user2item_causal_rows(backend):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    B, L, E = 5, 6, 8
    zoo = DMRUser2ItemNet(E, L).double()
    ours = ActivationUnitPooling(E, (80, 40), "ReLU", "softmax", backend=backend).double()
    ours.load_mlp_([m for m in zoo.attn_mlp if isinstance(m, nn.Linear)])
    target = torch.randn(B, E, generator=gen, dtype=torch.double, requires_grad=True)
    seq = torch.randn(B, L, E, generator=gen, dtype=torch.double, requires_grad=True)
    # Padding on either side, and an empty history (the causal diagonal still attends).
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                         [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    want_rel, want_aux = zoo(target, seq, mask)
    got_rel, got_aux = user2item(zoo, ours, target, seq, mask)
    torch.testing.assert_close(got_rel, want_rel, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_aux, want_aux, atol=1e-12, rtol=1e-12)
    inputs = [target, seq, zoo.pos_emb] + [p for m in (zoo.W_q[0], zoo.W_o[0]) for p in (m.weight, m.bias)]
    mlp_zoo = [p for m in zoo.attn_mlp if isinstance(m, nn.Linear) for p in (m.weight, m.bias)]
    mlp_ours = [p for m in list(ours.hidden) + [ours.out] for p in (m.weight, m.bias)]
    r = torch.randn(want_aux.shape, generator=gen, dtype=torch.double)
    gz = torch.autograd.grad(want_rel.sum() + (want_aux * r).sum(), inputs + mlp_zoo)
    go = torch.autograd.grad(got_rel.sum() + (got_aux * r).sum(), inputs + mlp_ours)
    for a, b in zip(gz, go):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)
