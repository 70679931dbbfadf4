"""ActivationUnitPooling as a drop-in for the zoos' DIN attention: small eager modules written
here that reproduce FuxiCTR's DIN_Attention (fuxictr/pytorch/layers/attentions/target_attention.py,
MLP_Block, get_activation, Dice) and DeepCTR-Torch's AttentionSequencePoolingLayer
(deepctr_torch/layers/sequence.py, LocalActivationUnit, DNN, activation_layer, Dice), their
weights loaded with `load_mlp_`, outputs and gradients compared on non-empty rows; and what each
gives on an empty history."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkern
from attnkern.nn import ActivationUnitPooling

BACKENDS = [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
                not attnkern.backends()["cpu"].available, reason="extension not built"))]


# ---- FuxiCTR ------------------------------------------------------------------------------------

class FuxiDice(nn.Module):
    """FuxiCTR's Dice: BatchNorm1d(affine=False, eps=1e-9), p * x + alpha * (1 - p) * x."""

    def __init__(self, input_dim, eps=1e-9):
        super().__init__()
        self.bn = nn.BatchNorm1d(input_dim, affine=False, eps=eps, momentum=0.01)
        self.alpha = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x):
        p = torch.sigmoid(self.bn(x))
        return p * x + self.alpha * (1 - p) * x


def fuxi_activation(name, units):
    """FuxiCTR's get_activation for one hidden layer."""
    return {"relu": lambda: nn.ReLU(), "sigmoid": lambda: nn.Sigmoid(),
            "prelu": lambda: nn.PReLU(units, init=0.1), "dice": lambda: FuxiDice(units)}[name]()


class FuxiDINAttention(nn.Module):
    """FuxiCTR's DIN_Attention with MLP_Block (no batch norm, no dropout, no output activation)."""

    def __init__(self, embedding_dim, attention_units, hidden_activations, use_softmax):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.use_softmax = use_softmax
        layers, width = [], 4 * embedding_dim
        for units in attention_units:
            layers += [nn.Linear(width, units), fuxi_activation(hidden_activations, units)]
            width = units
        layers.append(nn.Linear(width, 1))
        self.attention_layer = nn.Sequential(*layers)

    def forward(self, target_item, history_sequence, mask=None):
        seq_len = history_sequence.size(1)
        target_item = target_item.unsqueeze(1).expand(-1, seq_len, -1)
        attention_input = torch.cat([target_item, history_sequence, target_item - history_sequence,
                                     target_item * history_sequence], dim=-1)
        attention_weight = self.attention_layer(attention_input.view(-1, 4 * self.embedding_dim))
        attention_weight = attention_weight.view(-1, seq_len)
        if mask is not None:
            attention_weight = attention_weight * mask.float()
        if self.use_softmax:
            if mask is not None:
                attention_weight = attention_weight + -1.e9 * (1 - mask.float())
            attention_weight = attention_weight.softmax(dim=-1)
        return (attention_weight.unsqueeze(-1) * history_sequence).sum(dim=1)


# ---- DeepCTR-Torch ------------------------------------------------------------------------------

class DeepDice(nn.Module):
    """DeepCTR's Dice with dim=3: BatchNorm1d(emb_size, eps=1e-8) (affine) over [B, H, T]."""

    def __init__(self, emb_size, epsilon=1e-8):
        super().__init__()
        self.bn = nn.BatchNorm1d(emb_size, eps=epsilon)
        self.alpha = nn.Parameter(torch.zeros((emb_size, 1)))

    def forward(self, x):
        x = torch.transpose(x, 1, 2)
        x_p = torch.sigmoid(self.bn(x))
        out = self.alpha * (1 - x_p) * x + x_p * x
        return torch.transpose(out, 1, 2)


def deep_activation(name, units):
    """DeepCTR's activation_layer (dice_dim=3 as LocalActivationUnit passes it)."""
    return {"relu": lambda: nn.ReLU(), "sigmoid": lambda: nn.Sigmoid(), "prelu": lambda: nn.PReLU(),
            "dice": lambda: DeepDice(units)}[name]()


class DeepAttentionSequencePoolingLayer(nn.Module):
    """DeepCTR's AttentionSequencePoolingLayer(supports_masking=False) with its
    LocalActivationUnit (DNN: Linear then activation on every hidden layer, then dense to 1);
    return_score: the [B, 1, T] scores instead of the pooled keys (DIEN's use)."""

    def __init__(self, att_hidden_units, att_activation, weight_normalization, embedding_dim,
                 return_score=False):
        super().__init__()
        self.weight_normalization = weight_normalization
        self.return_score = return_score
        widths = [4 * embedding_dim] + list(att_hidden_units)
        self.linears = nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for i in range(len(att_hidden_units)))
        self.activation_layers = nn.ModuleList(deep_activation(att_activation, u) for u in att_hidden_units)
        self.dense = nn.Linear(widths[-1], 1)

    def forward(self, query, keys, keys_length):
        batch_size, max_length, _ = keys.size()
        keys_masks = torch.arange(max_length, dtype=keys_length.dtype).repeat(batch_size, 1)
        keys_masks = (keys_masks < keys_length.view(-1, 1)).unsqueeze(1)  # [B, 1, T]
        queries = query.expand(-1, max_length, -1)
        x = torch.cat([queries, keys, queries - keys, queries * keys], dim=-1)
        for lin, act in zip(self.linears, self.activation_layers):
            x = act(lin(x))
        outputs = torch.transpose(self.dense(x), 1, 2)  # [B, 1, T]
        if self.weight_normalization:
            paddings = torch.ones_like(outputs) * (-2 ** 32 + 1)
        else:
            paddings = torch.zeros_like(outputs)
        outputs = torch.where(keys_masks, outputs, paddings)
        if self.weight_normalization:
            outputs = F.softmax(outputs, dim=-1)
        if self.return_score:
            return outputs
        return torch.matmul(outputs, keys)  # [B, 1, E]


# ---- helpers ------------------------------------------------------------------------------------

def _randomise_(module, gen):
    """Random weights (the zoos' inits are tiny), random Dice statistics, eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module.eval()


def _linears(m):
    return [x for x in m.modules() if isinstance(x, nn.Linear)]


def _acts(m):
    return [x for x in m.modules() if isinstance(x, (nn.PReLU, FuxiDice, DeepDice))]


def _problem(gen, B=6, L=9, E=8):
    lengths = torch.tensor([0, 1, L, 4, L - 2, 3][:B])
    q = torch.randn(B, E, generator=gen)
    k = torch.randn(B, L, E, generator=gen)
    return q, k, lengths


def _zoo_grid(two_units, flag):
    """Parametrizes a zoo test over backend x activation x units ((16,) or two_units) x the
    zoo's softmax flag (argument name `flag`)."""
    def wrap(test):
        test = pytest.mark.parametrize(flag, [False, True], ids=["raw", "softmax"])(test)
        test = pytest.mark.parametrize("units", [(16,), two_units], ids=["one", "two"])(test)
        test = pytest.mark.parametrize("activation", ["relu", "sigmoid", "prelu", "dice"])(test)
        return pytest.mark.parametrize("backend", BACKENDS)(test)
    return wrap


def _layer_like(zoo, E, units, activation, softmax, backend, **dice):
    """An ActivationUnitPooling holding zoo's MLP weights and activation parameters."""
    ours = ActivationUnitPooling(E, units, activation, "softmax" if softmax else None, backend=backend, **dice)
    ours.load_mlp_(_linears(zoo), _acts(zoo))
    return ours.train(zoo.training)


def _compare_grads(zoo, ours, loss_zoo, loss_ours):
    gz = torch.autograd.grad(loss_zoo, [p for p in _linears(zoo)[0].parameters()])
    go = torch.autograd.grad(loss_ours, [ours.hidden[0].weight, ours.hidden[0].bias])
    for a, b in zip(gz, go):
        torch.testing.assert_close(b, a, atol=2e-4, rtol=2e-4)


@_zoo_grid((12, 6), "use_softmax")
def test_fuxictr_din_attention(backend, activation, units, use_softmax):
    gen = torch.Generator().manual_seed(0)
    E = 8
    zoo = _randomise_(FuxiDINAttention(E, list(units), activation, use_softmax), gen)
    ours = _layer_like(zoo, E, units, activation, use_softmax, backend, dice_eps=1e-9)
    q, k, lengths = _problem(gen, E=E)
    mask = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    want = zoo(q, k, mask.long())
    got = ours(q, k, lengths=lengths)
    nonempty = lengths > 0
    torch.testing.assert_close(got[nonempty], want[nonempty], atol=2e-5, rtol=2e-5)
    # An empty history: FuxiCTR gives 0 with raw weights, and with softmax the mean of the whole
    # (padding) row, every score being shifted by -1e9 alike; this layer gives 0 either way.
    assert (got[~nonempty] == 0).all()
    if use_softmax:
        # (float32 cannot hold s - 1e9 apart from -1e9 for scores of size O(1): uniform weights)
        torch.testing.assert_close(want[~nonempty], k[~nonempty].mean(1))
    else:
        assert (want[~nonempty] == 0).all()
    _compare_grads(zoo, ours, want[nonempty].square().sum(), got[nonempty].square().sum())


@_zoo_grid((80, 40), "weight_normalization")
def test_deepctr_attention_sequence_pooling(backend, activation, units, weight_normalization):
    gen = torch.Generator().manual_seed(1)
    E = 4
    zoo = _randomise_(DeepAttentionSequencePoolingLayer(units, activation, weight_normalization, E), gen)
    ours = _layer_like(zoo, E, units, activation, weight_normalization, backend, dice_eps=1e-8,
                       dice_affine=activation == "dice")
    q, k, lengths = _problem(gen, E=E)
    want = zoo(q[:, None, :], k, lengths[:, None])  # [B, 1, E]
    got = ours(q[:, None, :], k, lengths=lengths)  # [B, 1, E]
    nonempty = lengths > 0
    torch.testing.assert_close(got[nonempty], want[nonempty], atol=2e-5, rtol=2e-5)
    # Empty history: DeepCTR gives 0 with raw weights; with weight_normalization every position
    # holds the padding score -2^32 + 1, so the softmax is uniform: the mean of the padded keys.
    assert (got[~nonempty] == 0).all()
    if weight_normalization:
        torch.testing.assert_close(want[~nonempty][:, 0], k[~nonempty].mean(1))
    else:
        assert (want[~nonempty] == 0).all()
    _compare_grads(zoo, ours, want[nonempty].square().sum(), got[nonempty].square().sum())


def test_load_mlp_rejects_mismatches():
    ours = ActivationUnitPooling(4, (8,), "dice")
    zoo = DeepAttentionSequencePoolingLayer((8,), "dice", False, 4)
    with pytest.raises(ValueError, match="dice_affine"):
        ours.load_mlp_(_linears(zoo), _acts(zoo))
    with pytest.raises(ValueError, match="linears"):
        ours.load_mlp_(_linears(zoo)[:1], _acts(zoo))
    with pytest.raises(ValueError, match="weight shape"):
        ActivationUnitPooling(5, (8,), "relu").load_mlp_(_linears(zoo))
