"""HSTURanker (attnkern.models) and `attnkern train --model hstu`: the candidates-as-targets
layout (a candidate sees the history and itself, never another candidate), timestamps, and a
short training run on the synthetic data."""

import json

import pytest
import torch

import attnkern
from attnkern.models import HSTURanker
from attnkern.tools import data, train

BACKEND = "cpu" if attnkern.backends()["cpu"].available else "reference"


def _batch(B=5, L=7, N=1, num_items=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 0, 3, 1, 5])[:B]
    valid = torch.arange(L)[None] < lengths[:, None]
    history = torch.randint(1, num_items, (B, L), generator=g) * valid
    times = torch.randint(1, 10 ** 5, (B, L), generator=g).cumsum(1) * valid
    target = torch.randint(1, num_items, (B, N), generator=g)
    target_times = times.max(1).values[:, None] + torch.randint(1, 10 ** 6, (B, N), generator=g)
    return history, target, lengths, times, target_times


def test_candidates_do_not_see_each_other():
    """N candidates in one sequence score as N one-candidate sequences: the target rule keeps
    them apart. (Without a position table: with one, candidate k sits at position len + k.)"""
    torch.manual_seed(0)
    model = HSTURanker(50, embed_dim=8, num_heads=2, mlp_dims=(8,), max_positions=0,
                       num_time_buckets=16, backend=BACKEND).double().eval()
    history, target, lengths, times, target_times = _batch(N=3)
    together = model(history, target, lengths, times, target_times)
    assert together.shape == (5, 3)
    for k in range(3):
        alone = model(history, target[:, k], lengths, times, target_times[:, k])
        torch.testing.assert_close(together[:, k], alone, rtol=1e-9, atol=1e-12)


def test_positions_past_the_length_are_ignored_and_every_parameter_learns():
    torch.manual_seed(0)
    model = HSTURanker(50, embed_dim=8, num_heads=2, mlp_dims=(8,), backend=BACKEND).double()
    history, target, lengths, times, target_times = _batch()
    out = model(history, target[:, 0], lengths, times, target_times[:, 0])
    junk = ~(torch.arange(7)[None] < lengths[:, None])
    history2 = history + junk * 11
    times2 = times + junk * 12345
    torch.testing.assert_close(model(history2, target[:, 0], lengths, times2, target_times[:, 0]), out)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "embedding" not in name:
            assert p.grad.abs().sum() > 0, name


def test_bad_arguments():
    model = HSTURanker(50, embed_dim=8, num_heads=2, backend=BACKEND)
    history, target, lengths, times, target_times = _batch()
    with pytest.raises(ValueError, match="history_times"):
        model(history, target, lengths)
    with pytest.raises(ValueError, match="takes no timestamps"):
        HSTURanker(50, embed_dim=8, num_time_buckets=0)(history, target, lengths, times, target_times)
    with pytest.raises(ValueError, match="num_layers"):
        HSTURanker(50, num_layers=0)
    with pytest.raises(ValueError, match="target must be"):
        model(history, target[:3], lengths, times, target_times)


def test_movielens_history_times_follow_the_history():
    import pandas as pd

    ratings = pd.DataFrame({"userId": [7] * 5, "movieId": [10, 20, 30, 40, 50],
                            "rating": [5, 1, 4, 3.5, 4], "timestamp": [50, 10, 20, 30, 40]})
    s = data.movielens(max_length=3, min_count=1, ratings=ratings)
    # ordered by time: 20 (10), 30 (20), 40 (30), 50 (40), 10 (50)
    i = list(s.train.meta["movie"]).index(40)
    assert s.train.meta["history_times"][i].tolist() == [10, 20, 0]
    timed = train.TimedDataset(s.train)
    batch = timed.__getitems__([i])
    assert len(batch) == 6 and batch[4].tolist() == [[10, 20, 0]] and batch[5].tolist() == [30]


@pytest.mark.slow
def test_synthetic_training_learns(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = data.synthetic(num_samples=6000, num_items=100, num_topics=8, max_length=12, seed=0)
        cfg = train.RunConfig(data="synthetic", pooling="hstu", model="hstu", seed=0,
                              backend=BACKEND, epochs=4, batch_size=64, lr=1e-2, embed_dim=16,
                              num_heads=2, num_layers=1, mlp_dims=[16], max_length=12,
                              progress=False)
        result = train.run(cfg, splits, str(tmp_path))
    finally:
        torch.set_num_threads(n)
    # The planted signal (chance: 0.5; the true click probability gives about 0.97).
    assert result["test"]["auc"] >= 0.65
    saved = json.loads((tmp_path / "synthetic-hstu-seed0" / "results.json").read_text())
    assert saved["config"]["model"] == "hstu" and len(saved["epochs"]) == 4
