"""attnkern.attention_topk on the "cuda" backend against the float64 oracle of
attnkern.topk_testing: every layout, float32 / bfloat16 / float16, N > 1 across query blocks,
shared K/V heads, empty rows, k past the row, the bias with -inf entries, rows of several key
tiles whose exact ties cross the tiles (the merge of the running top-k), NaN, and the op's own
input checks and clamping.

Runs on a GPU, or on CPU tensors in the CUDA emulation build (scripts/cuda_emu.sh, where every
access is checked: tiny shapes); skips elsewhere.
"""

import math

import pytest
import torch

import attnkern
from attnkern.topk import TOPK_MAX_K
from attnkern.topk_testing import check_topk
from conftest import CUDA_DEVICE, cuda_op, needs_cuda_backend, on_cuda_device
from test_attention_topk import (check_k_past_every_row_and_k_zero,
                                 check_nan_ranks_first_and_masked_positions_are_never_read, problem)

pytestmark = needs_cuda_backend


def run(q, key, k, **kw):
    q, key, kw = on_cuda_device(q, key, kw)
    scores, idx = attnkern.attention_topk(q, key, k, backend="cuda", **kw)
    return scores.cpu(), idx.cpu()


@pytest.mark.parametrize("layout,dtype", [("lengths", torch.float32), ("mask", torch.bfloat16),
                                          ("jagged", torch.float16), ("full", torch.float32)])
def test_cuda_topk_matches_oracle(layout, dtype):
    q, key, _, kw = problem(layout, dtype)
    assert check_topk(run, q, key, 6, kw) == []


@pytest.mark.parametrize("layout,kind,heads", [("lengths", "shared", 1), ("jagged", "per_query", 4)])
def test_cuda_topk_bias(layout, kind, heads):
    q, key, bias, kw = problem(layout, bias=kind, bias_heads=heads, seed=3)
    bias.view(-1)[::5] = -math.inf  # never selected
    assert check_topk(run, q, key, 4, kw, bias=bias) == []


def test_cuda_topk_k_past_every_row_and_k_zero():
    check_k_past_every_row_and_k_zero(run, "jagged")


def test_cuda_topk_ties_across_tiles_equal_the_reference():
    # Small integers: every score is exact, so the kept list must equal the reference's, ties in
    # position order, across three key tiles of 128 and two query blocks (N = 5), with a list
    # that fills in the first tile and is cut by the threshold after.
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-1, 2, (2, 5, 1, 3), generator=g).float()
    key = torch.randint(-1, 2, (2, 300, 1, 3), generator=g).float()
    kw = {"lengths": torch.tensor([300, 140])}
    want = attnkern.attention_topk_ref(q, key, 40, **kw, scale=1.0)
    first = run(q, key, 40, scale=1.0, **kw)
    assert torch.equal(first[1], want[1]) and torch.equal(first[0], want[0])
    assert all(torch.equal(x, y) for x, y in zip(first, run(q, key, 40, scale=1.0, **kw)))


def test_cuda_topk_nan_ranks_first_and_masked_positions_are_never_read():
    check_nan_ranks_first_and_masked_positions_are_never_read(run)


def test_cuda_topk_op_checks_and_clamps():
    q, key, _, kw = problem("jagged", B=3, N=1, H=2, Hkv=1, L=6, Dk=8)
    q, key, kw = on_cuda_device(q, key, kw)
    op = cuda_op("attention_topk_fwd")
    with pytest.raises(ValueError, match=r"k must be in \[0, %d\]" % TOPK_MAX_K):
        op(q, key, None, None, kw["offsets"], TOPK_MAX_K + 1, 1.0)
    with pytest.raises(TypeError, match="key must have the dtype of query"):
        op(q, key.half(), None, None, kw["offsets"], 2, 1.0)
    # Offsets past the keys (no host check in the op): each row is clamped to the T keys, so
    # the result is the clamped rows' (and nothing is read out of bounds).
    T = key.shape[0]
    bad = torch.tensor([0, 4, T + 7, T + 9], device=CUDA_DEVICE)
    got = op(q, key, None, None, bad, 5, 1.0)
    fixed = torch.tensor([0, 4, T, T], device=CUDA_DEVICE)
    want = op(q, key, None, None, fixed, 5, 1.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (got[1][2] == -1).all()


def test_cuda_topk_opcheck():
    q, key, bias, kw = problem("mask", bias="shared", seed=2, B=3, L=9)
    q, key, bias, kw = on_cuda_device(q, key, bias, kw)
    args = (q, key, None, kw["mask"], None, 4, 0.5, bias.unsqueeze(1))
    torch.library.opcheck(cuda_op("attention_topk_fwd").default, args)
