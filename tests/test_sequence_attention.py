"""attnkern.sequence_attention: the mask semantics (against a pair-by-pair statement of the rules
and against generative-recommenders' published formula), the reference against a row-by-row
float64 oracle, the argument checks, and every fused backend against the oracle."""

import itertools
import math

import pytest
import torch

import attnkern
from attnkern.reference import sequence_mask_ref, time_bucket_ref
from attnkern.sequence import time_bucket_bounds
from attnkern.sequence_testing import (check_sequence_backend, gr_mask, hand_mask,
                                       random_sequence_problem)


# ---- the mask ---------------------------------------------------------------------------------

def _configs():
    # (n, nt, c, m) with c < n - nt (some history past the contextual positions)
    for n, nt, c, m in itertools.product((1, 2, 5, 9), (0, 1, 3), (0, 1, 3), (0, 1, 2, 4)):
        if nt <= n and c < n - nt:
            yield n, nt, c, m


@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_the_rules_pair_by_pair(causal):
    L = 11
    for n, nt, c, m in _configs():
        want = hand_mask(n, L, causal, nt, c, m)
        got = sequence_mask_ref(torch.tensor([n]), L, causal, torch.tensor([nt]), c, m)[0]
        assert torch.equal(got, want), (n, nt, c, m)


@pytest.mark.parametrize("causal", [True, False])
def test_mask_is_generative_recommenders_formula_on_the_valid_positions(causal):
    # Every config, the odd ones too (more contextual positions than history, all targets):
    # ours is the published mask restricted to i, j < n.
    g = torch.Generator().manual_seed(0)
    L = 10
    for c, m in itertools.product((0, 1, 2, 4), (0, 1, 3)):
        n = torch.randint(0, L + 1, (16,), generator=g)
        nt = (torch.rand(16, generator=g) * (n + 1).double()).long()
        for targets in (None, nt):
            want = gr_mask(L, n, causal, targets, m, c)
            inside = (torch.arange(L)[None, :, None] < n[:, None, None]) & \
                     (torch.arange(L)[None, None, :] < n[:, None, None])
            got = sequence_mask_ref(n, L, causal, targets, c, m)
            assert torch.equal(got, want & inside), (c, m, targets is None)


def test_targets_attend_history_and_themselves_only():
    M = sequence_mask_ref(torch.tensor([6]), 6, True, torch.tensor([3]))[0]
    for i in range(3, 6):
        assert M[i].tolist() == [True] * 3 + [j == i for j in range(3, 6)]


# ---- the bias --------------------------------------------------------------------------------

def test_time_buckets_and_their_bounds():
    dt = torch.cat([torch.arange(-3000, 3000), torch.tensor([10 ** 6, -(10 ** 9), 2 ** 40])])
    log = time_bucket_ref(dt, 40, "log")
    want = [min(math.floor(math.log(max(abs(x), 1)) / 0.301), 39) for x in dt.tolist()]
    near = [abs(math.log(max(abs(x), 1)) / 0.301 - round(math.log(max(abs(x), 1)) / 0.301)) < 1e-5
            for x in dt.tolist()]
    assert all(a == b or close for a, b, close in zip(log.tolist(), want, near))
    sq = time_bucket_ref(dt, 30, "sqrt")
    assert sq.tolist() == [min(math.isqrt(max(abs(x), 1)), 29) for x in dt.tolist()]
    for kind, nb in (("log", 40), ("sqrt", 30)):
        bounds = time_bucket_bounds(kind, nb, "cpu")
        counted = (dt.abs()[:, None] >= bounds[None, :]).sum(1)
        assert torch.equal(counted, time_bucket_ref(dt, nb, kind)), kind



def test_time_bucket_bounds_reach_past_2_pow_62():
    # With NB = 200 the log buckets past ln(2^62) / 0.301 ~ 142.8 are reached only by gaps
    # >= 2^62 and those past 145 by none: every gap still counts into the reference's bucket.
    nb = 200
    bounds = time_bucket_bounds("log", nb, "cpu")
    assert bounds.shape == (nb - 1,) and bool((bounds[1:] >= bounds[:-1]).all())
    dt = torch.tensor([0, 1, 3, 10 ** 6, 2 ** 40, 2 ** 61, 2 ** 62 - 1, 2 ** 62, 3 * 2 ** 61,
                       2 ** 63 - 2 ** 40])
    dt = torch.cat([dt, -dt])
    counted = (dt.abs()[:, None] >= bounds[None, :]).sum(1)
    assert torch.equal(counted, time_bucket_ref(dt, nb, "log"))


@pytest.mark.parametrize("layout", ["jagged", "padded"])
def test_check_row_of_the_reference_in_bfloat16(layout):
    # `attnkern check --backend reference`: the hstu row's table gradients sum many terms off by
    # the bfloat16 rounding of the inputs; the reference answers for its arithmetic only.
    from attnkern.tools.check import SEQUENCE_SHAPES, check_sequence_case

    r = check_sequence_case("reference", "cpu", layout, torch.bfloat16, SEQUENCE_SHAPES[0])
    assert r.passed, r.note

# ---- the reference ---------------------------------------------------------------------------

REF_CASES = [
    dict(),
    dict(causal=False, time=True, position=True, Hb=2),
    dict(num_targets=[2, 0, 1, 3], contextual_len=1, max_attn_len=3, time=True, position=True),
    dict(normalization="silu", num_targets=[1, 0, 1, 2], time=True, position=True, dense_bias=True),
    dict(normalization="silu", attn_scale=0.3, causal=False, max_attn_len=2, Hkv=1),
    dict(dense_bias=True, Hb=2, Hkv=1, time_bucket="sqrt", time=True, NB=40),
]


@pytest.mark.parametrize("layout", ["jagged", "padded"])
@pytest.mark.parametrize("case", range(len(REF_CASES)))
def test_reference_against_the_oracle(case, layout):
    kw = dict(REF_CASES[case])
    t, a = random_sequence_problem([5, 0, 1, 7], layout=layout, **kw)
    ok, errors, why = check_sequence_backend("reference", t, a, torch.float64)
    assert ok, why


def test_reference_per_token_attn_scale_and_hstu_formula():
    # HSTU (generative-recommenders' pytorch_hstu_mha): silu(alpha * q.k) / N over its mask.
    lengths = [6, 3]
    t, a = random_sequence_problem(lengths, layout="padded", normalization="silu",
                                   num_targets=[2, 1], dtype=torch.float64)
    q, k, v = (torch.nan_to_num(t[n]) for n in ("query", "key", "value"))
    out = attnkern.sequence_attention(q, k, v, backend="reference", scale=0.7, **a)
    N = q.shape[1]
    s = torch.nn.functional.silu(torch.einsum("bxhd,byhd->bhxy", q, k) * 0.7) / N
    s = s * gr_mask(N, torch.tensor(lengths), True, a["num_targets"], 0, 0).unsqueeze(1)
    want = torch.einsum("bhxy,byhd->bxhd", s, v)
    valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    torch.testing.assert_close(out[valid], want[valid])
    per_token = torch.rand(2, N, dtype=torch.float64)
    out2 = attnkern.sequence_attention(q, k, v, backend="reference", attn_scale=per_token, **a)
    base = attnkern.sequence_attention(q, k, v, backend="reference", attn_scale=1.0, **a)
    torch.testing.assert_close(out2[valid], (base * per_token[..., None, None])[valid])


def test_reference_gradcheck_float64():
    t, a = random_sequence_problem([4, 2], H=2, Dk=3, Dv=2, dtype=torch.float64, time=True,
                                   position=True, dense_bias=True, num_targets=[1, 0], NB=5, P=4)
    names = list(t)

    def f(*xs):
        return attnkern.sequence_attention(**dict(zip(names, xs)), **a, backend="reference")
    assert torch.autograd.gradcheck(f, [x.requires_grad_() for x in t.values()])


def test_empty_rows_and_jagged_padded_agree():
    t, a = random_sequence_problem([0, 3, 0, 4], layout="jagged", time=True, position=True)
    tp, ap = random_sequence_problem([0, 3, 0, 4], layout="padded", time=True, position=True)
    oj = attnkern.sequence_attention(**t, **a, backend="reference")
    op = attnkern.sequence_attention(**tp, **ap, backend="reference")
    valid = torch.arange(4)[None, :] < ap["lengths"][:, None]
    torch.testing.assert_close(op[valid], oj)
    assert bool((op[~valid] == 0).all())


# ---- argument checks -------------------------------------------------------------------------

def _ok():
    t, a = random_sequence_problem([3, 2], time=True, position=True)
    return t, a


@pytest.mark.parametrize("change, error, words", [
    (dict(normalization="relu"), ValueError, "normalization"),
    (dict(time_bucket="linear"), ValueError, "time_bucket"),
    (dict(contextual_len=-1), ValueError, "contextual_len"),
    (dict(max_attn_len=1.5), TypeError, "max_attn_len"),
    (dict(causal=1), TypeError, "causal"),
    (dict(query_times=None), ValueError, "query_times"),
    (dict(key_times=torch.zeros(5)), TypeError, "key_times"),
    (dict(key_times=torch.zeros(4, dtype=torch.long)), ValueError, "key_times"),
    (dict(time_table=torch.zeros(4, 3)), ValueError, "time_table"),
    (dict(position_table=torch.zeros(4, 2, dtype=torch.float64)), TypeError, "position_table"),
    (dict(position_table=torch.zeros(4, 2)), ValueError, "Hb"),
    (dict(attn_scale=0.5), ValueError, "attn_scale"),
    (dict(num_targets=torch.tensor([4, 0])), ValueError, "num_targets[0]"),
    (dict(num_targets=torch.tensor([1])), ValueError, "num_targets"),
    (dict(bias=torch.zeros(2, 1, 2, 2)), ValueError, "bias"),
    (dict(lengths=torch.tensor([3, 2])), ValueError, "lengths"),
    (dict(return_lse=True, normalization="silu"), ValueError, "return_lse"),
    (dict(offsets=torch.tensor([0, 3, 6])), ValueError, "offsets"),
    (dict(max_length=2), ValueError, "max_length"),
])
def test_bad_arguments_name_themselves(change, error, words):
    t, a = _ok()
    for name in change:
        t.pop(name, None)
    a.update(change)
    with pytest.raises(error, match=r"(?s).*" + words.replace("[", r"\[").replace("]", r"\]")):
        attnkern.sequence_attention(**t, **a, backend="reference")


# ---- the fused CPU op --------------------------------------------------------------------------

needs_cpu = pytest.mark.skipif(not attnkern.backends()["cpu"].available,
                               reason="attnkern._C not built: %s" % attnkern.backends()["cpu"].reason)

# Rows longer than one block (64) so that skipped, full and partial block pairs all occur.
CPU_CASES = [
    dict(lengths=[70, 0, 1, 130], time=True, position=True),
    dict(lengths=[70, 3, 129], num_targets=[5, 1, 17], contextual_len=2, max_attn_len=50,
         time=True, position=True, Hb=2, normalization="silu"),
    dict(lengths=[66, 9], causal=False, dense_bias=True, Hkv=1, H=2),
    dict(lengths=[100, 5], causal=False, num_targets=[10, 2], contextual_len=3, max_attn_len=20,
         normalization="silu", attn_scale=0.25, time=True, time_bucket="sqrt", NB=30),
    dict(lengths=[150, 2], num_targets=[70, 0], Dk=12, Dv=20, H=4, Hkv=2, position=True,
         dense_bias=True),
]


@needs_cpu
@pytest.mark.parametrize("layout", ["jagged", "padded"])
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_cpu_against_the_oracle(case, layout):
    kw = dict(CPU_CASES[case])
    t, a = random_sequence_problem(kw.pop("lengths"), layout=layout, seed=case, **kw)
    for dtype in (torch.float32, torch.float64) if layout == "jagged" else (torch.float32,):
        ok, errors, why = check_sequence_backend("cpu", t, a, dtype)
        assert ok, why


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision(dtype):
    t, a = random_sequence_problem([90, 7], num_targets=[4, 1], time=True, position=True,
                                   normalization="softmax")
    ok, errors, why = check_sequence_backend("cpu", t, a, dtype)
    assert ok, why


@needs_cpu
def test_cpu_gradcheck_float64():
    # A row past one block (64); the dense bias's gradient is checked against the oracle above
    # (gradcheck would perturb each of its L * L entries).
    t, a = random_sequence_problem([67, 3], H=2, Hkv=1, Dk=3, Dv=2, dtype=torch.float64, time=True,
                                   position=True, num_targets=[3, 1], NB=6, P=5,
                                   contextual_len=2, max_attn_len=40)
    names = list(t)
    for norm in ("softmax", "silu"):
        a["normalization"] = norm

        def f(*xs):
            return attnkern.sequence_attention(**dict(zip(names, xs)), **a, backend="cpu")
        assert torch.autograd.gradcheck(f, [x.detach().requires_grad_() for x in t.values()],
                                        atol=1e-7, fast_mode=True)


@needs_cpu
@pytest.mark.parametrize("rows,extra", [
    ([200, 150, 90, 64, 1], dict(time=True, position=True)),
    # one long row: its backward is split over the K/V heads (both threads busy); the shared
    # table column gets each head group's partial sums, added in a fixed order
    ([300], dict(time=True, position=True, Hb=1, num_targets=[40])),
    ([300], dict(time=True, position=True, Hb=2, normalization="silu")),
    # a dense bias of one column: its rows are not split
    ([130, 7], dict(position=True, dense_bias=True, Hb=1)),
])
def test_cpu_table_gradients_are_deterministic_across_threads(rows, extra):
    t, a = random_sequence_problem(rows, **extra)
    leaves = {k: v.requires_grad_() for k, v in t.items()}
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            out = attnkern.sequence_attention(**leaves, **a, backend="cpu")
            results.append((out.detach(),) + torch.autograd.grad(out.square().sum(), list(leaves.values())))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for x, y in zip(results[0], r):
            assert torch.equal(x, y)


@needs_cpu
@pytest.mark.parametrize("order", ["shuffled", "descending"])
def test_cpu_time_buckets_of_unsorted_and_reversed_times(order):
    # The kernels find a block's buckets by runs where the keys' times are sorted and walk key
    # by key otherwise; both against the oracle, with gaps of both signs.
    t, a = random_sequence_problem([150, 70], time=True, position=True, num_targets=[5, 3], NB=20)
    g = torch.Generator().manual_seed(3)
    kt = a["key_times"]
    a["key_times"] = kt[torch.randperm(kt.numel(), generator=g)] if order == "shuffled" else kt.flip(0)
    a["query_times"] = a["query_times"] - 40000
    ok, errors, why = check_sequence_backend("cpu", t, a)
    assert ok, why



@needs_cpu
def test_cpu_time_buckets_of_huge_gaps():
    # Gaps up to past 2^63 (wrapping as int64 subtraction does) with NB = 200: buckets that
    # only gaps >= 2^62 reach, and the kernels' |dt| cells at the top of the range.
    t, a = random_sequence_problem([40, 30], time=True, position=True, NB=200)
    T = t["query"].shape[0]
    step = 2 ** 57 - 12345  # never a gap of exactly -2^63
    a["key_times"] = -torch.arange(T) * step
    a["query_times"] = torch.arange(T) * step
    ok, errors, why = check_sequence_backend("cpu", t, a)
    assert ok, why


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_empty_batch_backward_gives_zero_gradients(backend):
    t, a = random_sequence_problem([0, 0], time=True, position=True)
    leaves = {k: v.detach().requires_grad_(True) for k, v in t.items()}
    out = attnkern.sequence_attention(**leaves, **a, backend=backend)
    assert out.shape == (0, 2, 8) and out.requires_grad
    out.sum().backward()
    for name, x in leaves.items():
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any(), name

def _op_args(t, a):
    from attnkern._sequence_validation import validate_sequence
    from attnkern.sequence import canonical_sequence_args

    kw = dict(offsets=a["offsets"], lengths=None, max_length=a["max_length"],
              causal=a["causal"], num_targets=a.get("num_targets"),
              contextual_len=a["contextual_len"], max_attn_len=a["max_attn_len"],
              key_times=a.get("key_times"), query_times=a.get("query_times"),
              time_table=t.get("time_table"), position_table=t.get("position_table"),
              attn_scale=a.get("attn_scale"), bias=t.get("bias"))
    prob = validate_sequence(t["query"], t["key"], t["value"], kw["offsets"], None,
                             kw["max_length"], kw["causal"], kw["num_targets"],
                             kw["contextual_len"], kw["max_attn_len"], a["normalization"], None,
                             kw["key_times"], kw["query_times"], kw["time_table"],
                             kw["position_table"], kw["attn_scale"], kw["bias"], a["time_bucket"],
                             False)
    return canonical_sequence_args(prob, t["query"], t["key"], t["value"], time_bucket=a["time_bucket"],
                                   **kw)


@needs_cpu
def test_opcheck_and_compile():
    t, a = random_sequence_problem([70, 5], num_targets=[3, 1], time=True, position=True,
                                   dense_bias=True, Dk=4, Dv=4)
    t = {k: v.requires_grad_() for k, v in t.items()}
    args = _op_args(t, a)
    torch.library.opcheck(torch.ops.attnkern.sequence_attention_fwd.default, args)
    f = torch.compile(attnkern.sequence_attention, fullgraph=True, backend="eager")
    out = f(**t, **a, backend="cpu")
    want = attnkern.sequence_attention(**t, **a, backend="cpu")
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert t["time_table"].grad is not None and t["position_table"].grad is not None


@needs_cpu
def test_cpu_op_checks_its_inputs():
    t, a = random_sequence_problem([5, 3], time=True)
    args = list(_op_args(t, a))
    bad = list(args)
    bad[4] = torch.tensor([5, 4])  # lengths past the tokens
    with pytest.raises(ValueError, match="rows"):
        torch.ops.attnkern.sequence_attention_fwd(*bad)
    bad = list(args)
    bad[17] = torch.tensor([3, 1] + [5] * (args[16].shape[0] - 3))  # decreasing bounds
    with pytest.raises(ValueError, match="time_bounds"):
        torch.ops.attnkern.sequence_attention_fwd(*bad)


@pytest.mark.slow
@needs_cpu
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16"])
def test_cpu_every_isa_path(isa):
    """Each instruction set's kernels (ATTNKERN_CPU_ISA is read once per process): a cap this CPU
    does not reach runs its widest set below; avx512_bf16 runs the avx512 kernels."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from attnkern.sequence_testing import check_sequence_backend as check, random_sequence_problem as r\n"
        "t, a = r([70, 3], Dk=12, Dv=20, H=2, Hkv=1, time=True, position=True, num_targets=[5, 1],\n"
        "         contextual_len=2, max_attn_len=50)\n"
        "for dt, norm in ((torch.float32, 'softmax'), (torch.bfloat16, 'silu')):\n"
        "    a['normalization'] = norm\n"
        "    ok, e, why = check('cpu', t, a, dt)\n"
        "    assert ok, why\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@needs_cpu
def test_cpu_masks_on_odd_rows():
    # Every mask option on rows the block intervals find hard: more contextual positions than
    # history, rows of candidates only, windows wider than the row, rows across block edges.
    g = torch.Generator().manual_seed(3)
    for trial in range(12):
        lengths = torch.randint(0, 140, (3,), generator=g)
        nt = (torch.rand(3, generator=g) * (lengths + 1).double()).long()
        if trial % 4 == 0:
            nt = lengths.clone()
        t, a = random_sequence_problem(lengths.tolist(), H=1, Dk=4, Dv=4, seed=trial,
                                       causal=bool(trial % 2), num_targets=nt.tolist(),
                                       contextual_len=[0, 1, 5, 90][trial % 4],
                                       max_attn_len=[0, 3, 70, 200][(trial // 2) % 4],
                                       normalization=["softmax", "silu"][(trial // 3) % 2],
                                       position=True)
        want = attnkern.sequence_attention(**t, **a, backend="reference")
        got = attnkern.sequence_attention(**t, **a, backend="cpu")
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=str((trial, lengths, nt, a)))
