"""Dice in training mode in the fused activation unit: batch statistics over the counted
positions (a pass before the fused scoring pass, differentiated through), running statistics
updated like nn.BatchNorm1d, against the eager re-implementations of FuxiCTR's DIN_Attention
and DeepCTR-Torch's AttentionSequencePoolingLayer in tests/test_activation_unit_zoo.py (their
Dice: a BatchNorm1d over every padded position), in train() and eval() mode; and a short
training run of TargetAttentionCTR(pooling="din", activation="dice")."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import attnkern
from attnkern.functional import dice_batch_statistics
from attnkern.models import TargetAttentionCTR
from attnkern.nn import ActivationUnitPooling
from test_activation_unit_zoo import (BACKENDS, DeepAttentionSequencePoolingLayer, FuxiDINAttention,
                                      _acts, _linears, _randomise_)


def _bn(m):
    return [x.bn for x in _acts(m)]


def _problem(gen, B=5, L=7, E=4):
    lengths = torch.tensor([0, 1, L, 4, 3][:B])
    q = torch.randn(B, E, generator=gen)
    # Random (non-zero) padding: the zoos' statistics count it, so the test sees that ours do.
    k = torch.randn(B, L, E, generator=gen)
    return q, k, lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zoo_name", ["fuxictr", "deepctr"])
@pytest.mark.parametrize("softmax", [False, True], ids=["raw", "softmax"])
def test_dice_train_and_eval_match_the_zoo(backend, zoo_name, softmax):
    gen = torch.Generator().manual_seed(3)
    E = 4
    if zoo_name == "fuxictr":
        units = (16,)
        zoo = _randomise_(FuxiDINAttention(E, list(units), "dice", softmax), gen)
        dice = dict(dice_eps=1e-9)
    else:
        units = (12, 6)
        zoo = _randomise_(DeepAttentionSequencePoolingLayer(units, "dice", softmax, E), gen)
        dice = dict(dice_eps=1e-8, dice_affine=True)
    ours = ActivationUnitPooling(E, units, "dice", "softmax" if softmax else None, backend=backend, **dice)
    ours.load_mlp_(_linears(zoo), _acts(zoo))
    assert ours.dice_momentum == _bn(zoo)[0].momentum
    zoo.train()
    ours.train()
    q, k, lengths = _problem(gen, E=E)
    q.requires_grad_(True)
    k.requires_grad_(True)
    nonempty = lengths > 0
    mask = (torch.arange(k.shape[1])[None, :] < lengths[:, None]).long()

    def zoo_out():
        return zoo(q, k, mask) if zoo_name == "fuxictr" else zoo(q[:, None, :], k, lengths[:, None])[:, 0]

    # Two steps: the second normalises with its own batch again while the running statistics
    # have moved twice; gradients through the batch statistics (query, keys, every weight,
    # alpha and the affine BatchNorm's weight and bias) on the non-empty rows' outputs.
    for _ in range(2):
        want, got = zoo_out(), ours(q, k, lengths=lengths)
        torch.testing.assert_close(got[nonempty], want[nonempty], atol=5e-5, rtol=5e-5)
        assert (got[~nonempty] == 0).all()
        for i, bn in enumerate(_bn(zoo)):
            torch.testing.assert_close(getattr(ours, "dice_running_mean_%d" % i), bn.running_mean,
                                       atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(getattr(ours, "dice_running_var_%d" % i), bn.running_var,
                                       atol=1e-6, rtol=1e-5)
        gw = torch.autograd.grad(want[nonempty].square().sum(), [q, k] + _linears_params(zoo) + _dice_params(zoo))
        go = torch.autograd.grad(got[nonempty].square().sum(), [q, k] + _linears_params(ours) + _dice_params(ours))
        for a, b in zip(gw, go):
            torch.testing.assert_close(b.reshape(a.shape), a, atol=2e-4, rtol=2e-4)
    # eval(): the running statistics, as the zoo's BatchNorm in eval mode.
    zoo.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(q, k, lengths=lengths)[nonempty], zoo_out()[nonempty],
                                   atol=5e-5, rtol=5e-5)


def _linears_params(m):
    return [p for lin in _linears(m) for p in (lin.weight, lin.bias)]


def _dice_params(m):
    if isinstance(m, ActivationUnitPooling):
        return list(m.dice_alpha) + [p for pair in zip(m.dice_weight, m.dice_bias) for p in pair]
    out = [a.alpha for a in _acts(m)]
    return out + [p for a in _acts(m) if a.bn.affine for p in (a.bn.weight, a.bn.bias)]


class _MaskedDice(nn.Module):
    """Dice whose batch statistics count only the valid positions: the masked mean and biased
    variance, the running ones updated with the unbiased variance (eager, written out)."""

    def __init__(self, units, eps, momentum):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(units) * 0.5)
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(units))
        self.register_buffer("running_var", torch.ones(units))

    def forward(self, x, valid):  # x [B, L, H], valid [B, L]
        xs = x[valid]
        n = xs.shape[0]
        mean, var = xs.mean(0), xs.var(0, unbiased=False)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / (n - 1))
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + self.alpha * (1 - p) * x


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_positions_statistics_and_jagged(backend):
    gen = torch.Generator().manual_seed(5)
    E, H = 4, 6
    q, k, lengths = _problem(gen, E=E)
    valid = torch.arange(k.shape[1])[None, :] < lengths[:, None]
    lin, out, dice = nn.Linear(4 * E, H), nn.Linear(H, 1), _MaskedDice(H, 1e-5, 0.2)
    ours = ActivationUnitPooling(E, (H,), "Dice", backend=backend, dice_eps=1e-5, dice_momentum=0.2,
                                 dice_statistics="valid")
    with torch.no_grad():
        for src, dst in ((lin, ours.hidden[0]), (out, ours.out)):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        ours.dice_alpha[0].copy_(dice.alpha)
    qe = q[:, None, :].expand_as(k)
    s = out(dice(lin(torch.cat([qe, k, qe - k, qe * k], -1)), valid)).squeeze(-1)
    want = (torch.where(valid, s, 0)[..., None] * k).sum(1)
    torch.testing.assert_close(ours(q, k, lengths=lengths), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ours.dice_running_mean_0, dice.running_mean)
    torch.testing.assert_close(ours.dice_running_var_0, dice.running_var)
    # The jagged layout has no padding: the same statistics as "valid" on the padded one.
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    torch.testing.assert_close(ours(q, k[valid], offsets=offsets), want, atol=2e-5, rtol=2e-5)


def test_batch_with_fewer_than_two_positions_uses_the_running_statistics():
    gen = torch.Generator().manual_seed(6)
    ours = ActivationUnitPooling(3, (5,), "dice", dice_statistics="valid", backend="reference")
    with torch.no_grad():
        ours.dice_running_mean_0.copy_(torch.randn(5, generator=gen))
    before = ours.dice_running_mean_0.clone()
    q, k = torch.randn(2, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    got = ours(q, k, lengths=torch.tensor([1, 0]))
    assert torch.equal(ours.dice_running_mean_0, before)
    torch.testing.assert_close(got, ours.eval()(q, k, lengths=torch.tensor([1, 0])))


def test_gradcheck_through_the_batch_statistics():
    gen = torch.Generator().manual_seed(7)
    ours = ActivationUnitPooling(3, (4, 3), "dice", "softmax", dice_affine=True, backend="reference").double()
    q = torch.randn(3, 3, generator=gen, dtype=torch.double, requires_grad=True)
    k = torch.randn(3, 4, 3, generator=gen, dtype=torch.double, requires_grad=True)
    lengths = torch.tensor([4, 2, 0])
    backends = ["reference"] + (["cpu"] if attnkern.backends()["cpu"].available else [])
    for backend in backends:
        ours.backend = backend
        assert torch.autograd.gradcheck(lambda q, k: ours(q, k, lengths=lengths), (q, k))


def test_dice_batch_statistics_rejects_bad_arguments():
    q, k = torch.randn(2, 3), torch.randn(2, 4, 3)
    w = [(torch.randn(5, 12), None), (torch.randn(1, 5), None)]
    with pytest.raises(ValueError, match="positions must be one of 'all', 'valid'"):
        dice_batch_statistics(q, k, w, dice_alpha=[torch.zeros(5)], positions="padded")
    with pytest.raises(ValueError, match=r"dice_alpha must hold one \[H\] tensor per hidden layer \(1\)"):
        dice_batch_statistics(q, k, w, dice_alpha=[])
    with pytest.raises(ValueError, match="dice_statistics"):
        ActivationUnitPooling(3, (5,), "dice", dice_statistics="padded")
    with pytest.raises(ValueError, match="dice_momentum must be a float in"):
        ActivationUnitPooling(3, (5,), "dice", dice_momentum=None)


def test_din_model_trains_with_dice():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    B, L, items = 64, 10, 40
    history = torch.randint(1, items, (B, L), generator=g)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    target = torch.randint(1, items, (B,), generator=g)
    # A learnable rule: click when the target appears in the valid history.
    valid = torch.arange(L)[None, :] < lengths[:, None]
    label = ((history == target[:, None]) & valid).any(1).float()
    model = TargetAttentionCTR(items, 8, pooling="din", activation="Dice", din_units=(16,))
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    before = model.pool.dice_running_mean_0.clone()
    for _ in range(15):
        loss = nn.functional.binary_cross_entropy_with_logits(model(history, target, lengths), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.pool.dice_alpha[0].grad.abs().sum() > 0
    assert not torch.equal(model.pool.dice_running_mean_0, before)
    # Below the loss of the best constant prediction (the entropy of the click rate): it learnt
    # the rule, not the rate.
    p = label.mean()
    assert loss.item() < 0.6 * -(p * p.log() + (1 - p) * (1 - p).log()).item()


# ---- the fused statistics kernel (attnkern::dice_statistics_fwd/_bwd) against the torch ops ----

_CPU = attnkern.backends()["cpu"].available
needs_cpu = pytest.mark.skipif(not _CPU, reason="the C++ extension is not built")


def _stats_problem(seed, layout, N, units, dtype, affine=False, E=5, shift=0.0):
    """A batch with an empty row, a full one and random padding, the MLP's layers and Dice's
    parameters; layout "lengths" / "mask" (padded) or "jagged"."""
    gen = torch.Generator().manual_seed(seed)
    B, L = 5, 9
    lengths = torch.tensor([0, 1, L, 4, 6])
    q = (torch.randn(B, N, E, generator=gen) + shift).to(dtype)
    k = (torch.randn(B, L, E, generator=gen) + shift).to(dtype)
    widths = (4 * E,) + tuple(units)
    weights = [((torch.randn(widths[i + 1], widths[i], generator=gen) * 0.4).to(dtype),
                (torch.randn(widths[i + 1], generator=gen) * 0.4).to(dtype)) for i in range(len(units))]
    weights.append((torch.randn(1, units[-1], generator=gen).to(dtype), torch.zeros(1, dtype=dtype)))
    dice = dict(dice_alpha=[(torch.randn(h, generator=gen) * 0.5).to(dtype) for h in units])
    if affine:
        dice["dice_weight"] = [(1 + 0.3 * torch.randn(h, generator=gen)).to(dtype) for h in units]
        dice["dice_bias"] = [(0.3 * torch.randn(h, generator=gen)).to(dtype) for h in units]
    if layout == "jagged":
        valid = torch.arange(L)[None, :] < lengths[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return q, k[valid], dict(offsets=offsets), weights, dice
    if layout == "mask":
        return q, k, dict(mask=torch.rand(B, L, generator=gen) < 0.6), weights, dice
    return q, k, dict(lengths=lengths), weights, dice


def _leaves(q, k, weights, dice):
    ts = [q, k] + [t for pair in weights[:-1] for t in pair] + [t for seq in dice.values() for t in seq]
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _stats_and_grads(backend, q, k, kw, weights, dice, positions, eps=1e-6):
    """The statistics and the gradients of a random linear function of them w.r.t. every input."""
    leaves = _leaves(q, k, weights, dice)
    q, k = leaves[:2]
    nl = len(weights) - 1
    w = [(leaves[2 + 2 * i], leaves[3 + 2 * i]) for i in range(nl)] + [weights[-1]]
    rest = iter(leaves[2 + 2 * nl:])
    d = {name: [next(rest) for _ in seq] for name, seq in dice.items()}
    stats = dice_batch_statistics(q, k, w, **kw, **d, eps=eps, positions=positions, backend=backend)
    gen = torch.Generator().manual_seed(11)
    loss = sum((m * torch.randn(m.shape, generator=gen, dtype=m.dtype)).sum()
               + (v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for m, v, _ in stats)
    # The last layer's Dice parameters do not enter its own statistics: zero gradients.
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return stats, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@needs_cpu
@pytest.mark.parametrize("layout,positions", [("lengths", "all"), ("mask", "valid"), ("jagged", "valid")])
@pytest.mark.parametrize("units,N", [((7,), 1), ((6, 3), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_statistics_match_the_torch_ops(layout, positions, units, N, dtype):
    q, k, kw, weights, dice = _stats_problem(20, layout, N, units, dtype, affine=N == 2)
    want, gw = _stats_and_grads("reference", q, k, kw, weights, dice, positions)
    got, gg = _stats_and_grads("cpu", q, k, kw, weights, dice, positions)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    for (mg, vg, ng), (mw, vw, nw) in zip(got, want):
        assert mg.dtype == mw.dtype and int(ng) == int(nw)
        torch.testing.assert_close(mg, mw, **tol)
        torch.testing.assert_close(vg, vw, **tol)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, **tol)
    if layout == "lengths":
        # Positions outside the rows are counted ("all"): their keys get a gradient too.
        assert (gg[1][0] != 0).all()


@needs_cpu
def test_fused_statistics_keep_the_variance_of_a_large_mean():
    # Pre-activations with mean ~1e3 times their spread: E[z^2] - E[z]^2 in float32 would lose
    # every digit of the variance; the block moments merged in float64 keep it.
    q, k, kw, weights, dice = _stats_problem(21, "lengths", 1, (4,), torch.float32, E=3)
    weights[0] = (weights[0][0], weights[0][1] + 3e3)
    q64, k64 = q.double(), k.double()
    w64 = [(w.double(), b.double()) for w, b in weights]
    want = dice_batch_statistics(q64, k64, w64, **kw, **dice, backend="reference")[0]
    got = dice_batch_statistics(q, k, weights, **kw, **dice, backend="cpu")[0]
    assert (want[0].abs() / want[1].sqrt()).min() > 100
    torch.testing.assert_close(got[1].double(), want[1], atol=0, rtol=1e-3)


@needs_cpu
def test_fused_statistics_do_not_depend_on_the_thread_count():
    q, k, kw, weights, dice = _stats_problem(22, "mask", 2, (6, 3), torch.float32)
    threads = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 3):
            torch.set_num_threads(t)
            runs.append(_stats_and_grads("cpu", q, k, kw, weights, dice, "valid"))
    finally:
        torch.set_num_threads(threads)
    (s1, g1), (s2, g2) = runs
    for a, b in zip([t for m, v, _ in s1 for t in (m, v)] + list(g1), [t for m, v, _ in s2 for t in (m, v)] + list(g2)):
        assert torch.equal(a, b)


@needs_cpu
def test_fused_statistics_gradcheck_and_opcheck():
    from attnkern.ops.dice_statistics import dice_statistics_op

    q, k, kw, weights, dice = _stats_problem(23, "lengths", 2, (4, 3), torch.float64, E=3)
    (w1, b1), (w2, b2) = weights[:2]
    act1 = torch.randn(3, 4, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, w1, b1, act1, w2, b2)]

    def f(q, k, w1, b1, act1, w2, b2):
        return dice_statistics_op()(q, k, kw["lengths"], None, None, -1, False, w1, b1, act1, w2, b2)

    assert torch.autograd.gradcheck(f, leaves)
    torch.library.opcheck(dice_statistics_op(), (q.float(), k.float(), None, None, None, -1, True, w1.float(),
                                                 b1.float(), act1.float(), w2.float(), b2.float()))


@needs_cpu
def test_fused_statistics_every_isa_path():
    """The activation unit's block kernels of each instruction set (ATTNKERN_CPU_ISA, chosen once
    per process), one subprocess each, run side by side; 40 units leave a column panel of one
    AVX-512 vector next to a full one."""
    code = (
        "import torch, attnkern, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_activation_unit_dice_train import _stats_problem, _stats_and_grads\n"
        "q, k, kw, w, d = _stats_problem(24, 'lengths', 2, (40, 20), torch.float32, affine=True)\n"
        "(sw, gw), (sg, gg) = [_stats_and_grads(b, q, k, kw, w, d, 'valid') for b in ('reference', 'cpu')]\n"
        "for a, b in zip([t for m, v, _ in sg for t in (m, v)] + list(gg), [t for m, v, _ in sw for t in (m, v)] + list(gw)):\n"
        "    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)\n"
        "print('ok', attnkern._C.cpu_isa())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = {isa: subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, ATTNKERN_CPU_ISA=isa), cwd=root,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for isa in ("generic", "avx2", "avx512")}
    for isa, p in runs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.startswith("ok"), (isa, err[-2000:])
