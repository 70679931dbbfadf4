"""attnkern.models.TargetAttentionCTR with attention pooling and the sum-pooling baseline."""

import io

import pytest
import torch

from attnkern.models import TargetAttentionCTR


def _batch(B=6, L=9, num_items=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 0, L
    history = torch.randint(1, num_items, (B, L), generator=g)
    history[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    target = torch.randint(1, num_items, (B,), generator=g)
    return history, target, lengths


@pytest.mark.parametrize("pooling", ["attention", "sum"])
@pytest.mark.parametrize("N", [None, 4])
def test_shapes(pooling, N):
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16, num_heads=2, pooling=pooling)
    history, target, lengths = _batch()
    if N is not None:
        target = torch.randint(1, 50, (history.shape[0], N))
    logits = model(history, target, lengths)
    assert logits.shape == target.shape and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_many_candidates_match_one_at_a_time(pooling):
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16, num_heads=4, pooling=pooling)
    history, _, lengths = _batch()
    targets = torch.randint(1, 50, (history.shape[0], 3))
    many = model(history, targets, lengths)
    one = torch.stack([model(history, targets[:, n], lengths) for n in range(3)], dim=1)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_positions_past_length_are_ignored(pooling):
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16, pooling=pooling)
    history, target, lengths = _batch()
    noisy = history.clone()
    pad = torch.arange(history.shape[1])[None, :] >= lengths[:, None]
    noisy[pad] = torch.randint(1, 50, (int(pad.sum()),))
    torch.testing.assert_close(model(noisy, target, lengths), model(history, target, lengths))


def test_same_everything_but_the_pooling():
    a = TargetAttentionCTR(50, embed_dim=16, num_heads=2, pooling="attention")
    s = TargetAttentionCTR(50, embed_dim=16, num_heads=2, pooling="sum")
    names_a = {k: v.shape for k, v in a.state_dict().items() if not k.startswith("pool.")}
    names_s = {k: v.shape for k, v in s.state_dict().items()}
    assert names_a == names_s
    assert any(k.startswith("pool.") for k in a.state_dict())


@pytest.mark.parametrize("pooling", ["attention", "sum"])
def test_gradients_and_padding_row(pooling):
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16, pooling=pooling)
    history, target, lengths = _batch()
    label = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    torch.nn.functional.binary_cross_entropy_with_logits(model(history, target, lengths), label).backward()
    emb = model.embedding.weight
    assert (emb.grad[0] == 0).all() and (emb.detach()[0] == 0).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = TargetAttentionCTR(50, embed_dim=16)
    other.load_state_dict(torch.load(buf, weights_only=True))
    history, target, lengths = _batch()
    torch.testing.assert_close(other(history, target, lengths), model(history, target, lengths), atol=0, rtol=0)


def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    model = TargetAttentionCTR(50, embed_dim=16)
    history, target, lengths = _batch()
    ref = model(history, target, lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(history, target, lengths)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pooling"):
        TargetAttentionCTR(50, pooling="mean")
    with pytest.raises(ValueError, match="num_items"):
        TargetAttentionCTR(1)
    model = TargetAttentionCTR(50, embed_dim=16)
    with pytest.raises(ValueError, match="history"):
        model(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        model(torch.zeros(3, 4, dtype=torch.long), torch.ones(2, dtype=torch.long), torch.zeros(3, dtype=torch.long))
