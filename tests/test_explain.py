"""`attnkern explain` on the synthetic data (as CI runs it): the score, the history ranked by
each head's attention weight, the table and the PNG; a checkpoint of `attnkern train` loads."""

import dataclasses
import os

import numpy as np
import pytest
import torch

from attnkern.tools import data as data_mod
from attnkern.tools import explain as ex
from attnkern.tools.cli import main as cli_main


@pytest.fixture(scope="module")
def trained():
    splits = data_mod.load("synthetic", max_length=12, seed=0, num_samples=1500)
    return splits, ex.train_on_the_fly(splits, epochs=1)


def test_explanation_ranks_the_history_by_the_models_weights(trained):
    splits, model = trained
    e = ex.explain(model, ex._Catalogue(splits), user=3, movie="7")
    test = splits.test
    n = int(test.lengths[3])
    assert e.weights.shape == (2, n) and len(e.titles) == n and e.times.shape == (n,)
    np.testing.assert_allclose(e.weights.sum(-1), 1.0, rtol=1e-5)
    # The score is the model's own on this history and candidate.
    with torch.no_grad():
        logit = model(test.history[3:4], torch.tensor([7]), test.lengths[3:4])
    assert abs(e.probability - float(torch.sigmoid(logit[0]))) < 1e-6
    for h in range(2):
        ranked = e.weights[h, e.ranking(h)]
        assert (np.diff(ranked) <= 0).all()
    text = ex.table(e, top=4)
    top = e.ranking(0)[0]
    assert "click probability %.3f" % e.probability in text
    assert e.titles[top] in text.split("head 1")[0]
    assert len(text.split("head 1")[1].strip().splitlines()) == 1 + min(4, n)


def test_png(trained, tmp_path):
    splits, model = trained
    e = ex.explain(model, ex._Catalogue(splits))
    path = ex.plot(e, str(tmp_path / "w.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_command_line_with_a_checkpoint(trained, tmp_path, capsys):
    splits, model = trained
    cfg = ex.RunConfig(data="synthetic", max_length=12, synthetic_samples=1500)
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg)}, tmp_path / "checkpoint.pt")
    png = tmp_path / "e.png"
    assert cli_main(["explain", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--user", "2",
                     "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "sample 2, candidate item" in out and "head 1" in out and png.exists()


def test_bad_arguments(trained):
    splits, model = trained
    with pytest.raises(ValueError, match="--user must be a test sample"):
        ex.explain(model, ex._Catalogue(splits), user=10 ** 6)
    with pytest.raises(ValueError, match="--movie must be an item id"):
        ex.explain(model, ex._Catalogue(splits), movie="0")
