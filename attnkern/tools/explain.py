"""`attnkern explain`: why a MovieLens model scores a movie for a user as it does.

For a target-attention model (`attnkern train`'s default, `TargetAttentionCTR` with
`AttentionPooling`), a user and a candidate movie: the predicted click probability, and the
user's history ranked by the attention weight each head gives it (titles and rating dates), as a
terminal table and a PNG of the weights over the history in time order. The model is a
`--checkpoint` of `attnkern train` or trained here on the fly with a small budget. The synthetic
data set (`--data synthetic`) stands in for MovieLens where the data extra is not installed
(items are named by id there). Docs: docs/explain.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import numpy as np
import torch

from . import data as data_mod
from ._args import int_at_least
from .train import RunConfig, build_model, train_step


@dataclass
class Explanation:
    """One (user, candidate) pair explained. weights [heads, n] over the history in time order
    (oldest first); titles and times (seconds) per history item."""

    user: str
    candidate: str
    probability: float
    weights: np.ndarray
    titles: List[str]
    times: np.ndarray

    def ranking(self, head: int) -> List[int]:
        """History positions by the head's weight, highest first (ties: the later item first)."""
        w = self.weights[head]
        return sorted(range(w.shape[0]), key=lambda i: (-w[i], -i))


def _date(seconds) -> str:
    if seconds <= 0:
        return "-"
    return datetime.datetime.fromtimestamp(int(seconds), tz=datetime.timezone.utc).strftime("%Y-%m-%d")


# --------------------------------------------------------------------------- the model


def train_on_the_fly(splits: data_mod.CTRSplits, epochs: int = 1, seed: int = 0,
                     batch_size: int = 256, lr: float = 3e-3) -> torch.nn.Module:
    """A target-attention model trained briefly (the default RunConfig otherwise)."""
    cfg = RunConfig(data=splits.name, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                    max_length=splits.max_length)
    torch.manual_seed(seed)
    model = build_model(cfg, splits.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=batch_size, shuffle=True,
                                         collate_fn=data_mod.identity_collate,
                                         generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            train_step(model, optimizer, batch, "cpu")
    return model.eval()


def load_checkpoint(path: str):
    """(model, RunConfig) of an `attnkern train` checkpoint (its best epoch's weights)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    known = {f.name for f in fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in ckpt["config"].items() if k in known})
    if cfg.model != "target" or cfg.pooling != "attention" or cfg.time_buckets or cfg.recency_buckets:
        raise ValueError("attnkern explain needs a target-attention model without time tables "
                         "(attnkern train --pooling attention); %s holds model=%r pooling=%r"
                         % (path, cfg.model, cfg.variant))
    return cfg, ckpt.get("best_model") or ckpt["model"]


def weights_of(model, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor):
    """(click probability [B], attention weights [B, heads, L]) of a TargetAttentionCTR."""
    with torch.no_grad():
        logits = model(history, target, lengths)
        h, t = model.embedding(history), model.embedding(target)
        _, weights = model.pool(t, h, lengths=lengths, need_weights=True)
    return torch.sigmoid(logits.float()), weights.float()


# --------------------------------------------------------------------------- the data


class _Catalogue:
    """Names, history items and candidate ids of one data set."""

    def __init__(self, splits: data_mod.CTRSplits, ratings=None):
        self.splits = splits
        self.movielens = splits.name == "movielens"
        self.item_of_movie: Dict[int, int] = {}
        if self.movielens:
            for part in (splits.train, splits.valid, splits.test):
                for m, i in zip(part.meta["movie"], part.target.numpy()):
                    self.item_of_movie.setdefault(int(m), int(i))
            df = ratings if ratings is not None else data_mod._load_ratings()
            self.title = {int(m): "%s (%d)" % (t, int(y)) if "year" in df and y == y else str(t)
                          for m, t, y in zip(df["movieId"], df["title"],
                                             df["year"] if "year" in df else df["title"])}
            order = np.lexsort((df["movieId"].to_numpy(), df["timestamp"].to_numpy(), df["userId"].to_numpy()))
            self.sorted_movies = df["movieId"].to_numpy()[order]

    def sample(self, user: Optional[int]) -> int:
        """The test sample to explain: the user's last one (MovieLens user id), or sample
        `user` of the synthetic test split."""
        test = self.splits.test
        if not self.movielens:
            i = 0 if user is None else int(user)
            if not 0 <= i < len(test):
                raise ValueError("--user must be a test sample in [0, %d) of the synthetic data, got %d"
                                 % (len(test), i))
            return i
        users = test.meta["user"]
        if user is None:
            user = int(users[0])
        rows = np.flatnonzero(users == user)
        if rows.size == 0:
            raise ValueError("--user %d has no test rating; try one of %s" % (user, sorted(set(users.tolist()))[:5]))
        return int(rows[np.argmax(test.meta["position"][rows])])

    def candidate(self, movie: Optional[str], sample: int):
        """(item id, name) of --movie (a MovieLens movieId, or part of a title) or the sample's
        own target."""
        test = self.splits.test
        if movie is None:
            item = int(test.target[sample])
            name = self.title.get(int(test.meta["movie"][sample]), "?") if self.movielens else "item %d" % item
            return item, name
        if not self.movielens:
            item = int(movie)
            if not 1 <= item < self.splits.num_items:
                raise ValueError("--movie must be an item id in [1, %d) of the synthetic data, got %d"
                                 % (self.splits.num_items, item))
            return item, "item %d" % item
        if movie.isdigit() and int(movie) in self.title:
            mid = int(movie)
        else:
            hits = sorted(m for m, t in self.title.items() if movie.lower() in t.lower())
            if not hits:
                raise ValueError("--movie %r matches no MovieLens movieId or title" % movie)
            mid = hits[0]
        return self.item_of_movie.get(mid, data_mod.OOV), self.title[mid]

    def history(self, sample: int):
        """(titles, times) of the sample's history, oldest first."""
        test = self.splits.test
        n = int(test.lengths[sample])
        times = test.meta["history_times"][sample][:n]
        if not self.movielens:
            return ["item %d" % int(i) for i in test.history[sample, :n]], times
        pos = int(test.meta["position"][sample])
        movies = self.sorted_movies[pos - n:pos]
        return [self.title.get(int(m), str(m)) for m in movies], times


# --------------------------------------------------------------------------- output


def explain(model, catalogue: _Catalogue, user=None, movie=None) -> Explanation:
    sample = catalogue.sample(user)
    item, name = catalogue.candidate(movie, sample)
    test = catalogue.splits.test
    history, lengths = test.history[sample:sample + 1], test.lengths[sample:sample + 1]
    prob, w = weights_of(model, history, torch.tensor([item]), lengths)
    n = int(lengths[0])
    titles, times = catalogue.history(sample)
    who = "user %d" % int(test.meta["user"][sample]) if catalogue.movielens else "sample %d" % sample
    return Explanation(who, name, float(prob[0]), w[0, :, :n].numpy(), titles, np.asarray(times))


def table(e: Explanation, top: int = 10) -> str:
    lines = ["%s, candidate %s: click probability %.3f" % (e.user, e.candidate, e.probability),
             "history: %d items, ranked by attention weight per head" % len(e.titles)]
    for h in range(e.weights.shape[0]):
        lines.append("")
        lines.append("head %d   %4s  %7s  %-10s  %s" % (h, "rank", "weight", "rated", "title"))
        for r, i in enumerate(e.ranking(h)[:top]):
            lines.append("         %4d  %7.4f  %-10s  %s" % (r + 1, e.weights[h, i], _date(e.times[i]), e.titles[i]))
    return "\n".join(lines)


def plot(e: Explanation, path: str, top: int = 3) -> str:
    """The weights over the history in time order (one line per head), the top items named."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(e.titles))
    for h in range(e.weights.shape[0]):
        ax.plot(x, e.weights[h], marker="o", markersize=3, label="head %d" % h)
        for i in e.ranking(h)[:top]:
            ax.annotate(e.titles[i][:30], (i, e.weights[h, i]), fontsize=7, rotation=20,
                        xytext=(3, 3), textcoords="offset points")
    if len(x):
        step = max(1, len(x) // 8)
        ax.set_xticks(x[::step], [_date(t) for t in e.times[::step]], fontsize=8)
    ax.set_xlabel("history, oldest first (rating date)")
    ax.set_ylabel("attention weight")
    ax.set_title("%s, candidate %s: p(click) = %.3f" % (e.user, e.candidate[:50], e.probability), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkern explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("auto", "movielens", "synthetic"), default="auto",
                   help="auto: MovieLens when the data extra is installed, else synthetic")
    p.add_argument("--checkpoint", help="an `attnkern train` checkpoint.pt (default: train here)")
    p.add_argument("--user", type=int, help="MovieLens userId (synthetic: a test sample index); "
                   "default: the first test user")
    p.add_argument("--movie", help="candidate: a MovieLens movieId or part of a title "
                   "(synthetic: an item id); default: the user's own next rated movie")
    p.add_argument("--epochs", type=int_at_least(1), default=1, help="on-the-fly training epochs")
    p.add_argument("--samples", type=int_at_least(100), default=30000, help="synthetic data set size")
    p.add_argument("--max-length", type=int_at_least(1), default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int_at_least(1), default=10, help="rows per head in the table")
    p.add_argument("--png", default="explain.png", help="where the plot goes ('' for none)")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    state = None
    if a.checkpoint:
        cfg, state = load_checkpoint(a.checkpoint)
        name, max_length, seed, samples = cfg.data, cfg.max_length, cfg.seed, cfg.synthetic_samples
    else:
        name = a.data
        if name == "auto":
            name = "movielens" if data_mod.movielens_available() else "synthetic"
        max_length, seed, samples = a.max_length, a.seed, a.samples
    extra = {"num_samples": samples} if name == "synthetic" else {}
    splits = data_mod.load(name, max_length=max_length, seed=seed, **extra)
    if state is not None:
        model = build_model(cfg, splits.num_items)
        model.load_state_dict(state)
        model.eval()
    else:
        model = train_on_the_fly(splits, epochs=a.epochs, seed=seed)
    e = explain(model, _Catalogue(splits), a.user, a.movie)
    print(table(e, a.top))
    if a.png:
        print("\nplot: %s" % plot(e, os.path.abspath(a.png)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
