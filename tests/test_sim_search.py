"""SIM's long-history search (FuxiCTR model_zoo/LongCTR/SIM/SIM.py) on attnkern.attention_topk:
FuxiCTR scores position l with (W_a target) . (W_b item_l) multiplied by the mask, so padding
scores 0, takes the top-k of all L positions, and lets only the valid picks into the second
stage. The recipe of docs/census.md (row 9): attention_topk over the valid positions, keeping
a pick of score <= 0 only if its rank plus the row's padding count is below k. Checked here
against an eager re-implementation of that first stage: the same valid positions reach the
second stage."""

import pytest
import torch

import attnkern

CPU = ["reference"] + (["cpu"] if attnkern.backends()["cpu"].available else [])


def sim_zoo_picks(q, k, mask, topk):
    """FuxiCTR SIM's first stage: the valid positions among the top-k of the masked scores."""
    qk = torch.bmm(q.unsqueeze(1), k.transpose(-1, -2)).squeeze(1) * mask
    idx = qk.topk(min(topk, qk.shape[1]), dim=1, largest=True, sorted=True)[1]
    picked = torch.zeros_like(mask, dtype=torch.bool).scatter(1, idx, True)
    return picked & mask.bool()


def sim_search(q, k, mask, topk, backend):
    """The recipe: the valid positions SIM's second stage sees, from attnkern.attention_topk."""
    B, L, _ = k.shape
    scores, idx = attnkern.attention_topk(q[:, None, :], k[:, :, None, :], min(topk, L), mask=mask.bool(),
                                          scale=1.0, backend=backend)
    scores, idx = scores[:, 0], idx[:, 0]                    # [B, k]
    n_pad = (L - mask.bool().sum(1))[:, None]
    rank = torch.arange(idx.shape[1])[None, :]
    keep = (idx >= 0) & ((scores > 0) | (rank + n_pad < topk))
    return torch.zeros(B, L, dtype=torch.bool).scatter(1, idx.clamp_min(0), keep) & mask.bool()


@pytest.mark.parametrize("backend", CPU)
def test_sim_search_keeps_the_zoo_picks(backend):
    gen = torch.Generator().manual_seed(4)
    B, L, D, topk = 7, 30, 8, 10
    q = torch.randn(B, D, generator=gen)
    k = torch.randn(B, L, D, generator=gen)
    lengths = torch.tensor([0, 3, 12, 30, 25, 10, 21])
    # Front padding as FuxiCTR's sequences, and one row with holes.
    mask = (torch.arange(L)[None, :] >= (L - lengths)[:, None]).float()
    mask[6] = (torch.rand(L, generator=gen) < 0.7).float()
    want = sim_zoo_picks(q, k, mask, topk)
    got = sim_search(q, k, mask, topk, backend)
    # The case the keep rule is for: a row whose padding outranks some of its negative scores.
    assert (got.sum(1) < torch.minimum(mask.sum(1), torch.tensor(float(topk)))).any()
    assert torch.equal(got, want)
