"""TargetAttentionCTR(pooling="din") and ActivationUnitPooling in a model: backends agree,
gradients flow to every parameter, [B, N] targets, jagged input to the layer, state dicts."""

import pytest
import torch

import attnkern
from attnkern.models import TargetAttentionCTR
from attnkern.nn import ActivationUnitPooling


def _batch(g, B=6, L=9, num_items=50, N=None):
    lengths = torch.tensor([0, 1, L, 4, L - 2, 3][:B])
    history = torch.randint(1, num_items, (B, L), generator=g)
    target = torch.randint(1, num_items, (B,) if N is None else (B, N), generator=g)
    return history, target, lengths


@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="extension not built")
@pytest.mark.parametrize("N", [None, 3])
def test_din_model_backends_agree(N):
    g = torch.Generator().manual_seed(0)
    history, target, lengths = _batch(g, N=N)
    torch.manual_seed(0)
    ref = TargetAttentionCTR(50, 8, pooling="din", backend="reference", din_units=(12, 6))
    cpu = TargetAttentionCTR(50, 8, pooling="din", backend="cpu", din_units=(12, 6))
    cpu.load_state_dict(ref.state_dict())
    a, b = ref(history, target, lengths), cpu(history, target, lengths)
    assert a.shape == ((6,) if N is None else (6, N))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(ref.named_parameters(), cpu.parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
    assert cpu.pool.prelu_weight[0].grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "prelu", "dice"])
def test_layer_jagged_equals_padded(activation):
    g = torch.Generator().manual_seed(1)
    pool = ActivationUnitPooling(5, (7,), activation, "softmax", dice_statistics="valid")
    lengths = torch.tensor([3, 0, 5, 1])
    k = torch.randn(4, 5, 5, generator=g)
    q = torch.randn(4, 5, generator=g)
    valid = torch.arange(5)[None, :] < lengths[:, None]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    padded = pool(q, k, lengths=lengths)
    jagged = pool(q, k[valid], offsets=offsets)
    torch.testing.assert_close(jagged, padded)


def test_layer_rejects_bad_config():
    with pytest.raises(ValueError, match="hidden_units"):
        ActivationUnitPooling(8, (8, 8, 8))
    with pytest.raises(ValueError, match="hidden_units"):
        ActivationUnitPooling(8, (300,))
    with pytest.raises(ValueError, match="activation"):
        ActivationUnitPooling(8, (8,), "tanh")
    with pytest.raises(ValueError, match="normalize"):
        ActivationUnitPooling(8, (8,), normalize="sum")
    with pytest.raises(ValueError, match="pooling"):
        TargetAttentionCTR(10, pooling="dien")
