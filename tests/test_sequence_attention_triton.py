"""attnkern.sequence_attention on the "triton" backend: every mask, softmax and SiLU, the in-kernel
time/position bias and the dense bias with their gradients, shared K/V heads, float32/bfloat16/
float16, against the float64 oracle of attnkern.sequence_testing; the deterministic table
gradients; the registered ops' own checks.

On CPU the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), with 16-position tiles: rows of up to 40 positions cross several tiles, so that the
key/query blocks a tile skips (causal, local window, contextual prefix) are exercised.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.sequence import canonical_sequence_args  # noqa: E402
from attnkern._sequence_validation import validate_sequence  # noqa: E402
from attnkern.sequence_testing import check_sequence_backend, random_sequence_problem  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

from attnkern.triton_kernels import sequence_attention as K  # noqa: E402
from test_triton_sm90 import CACHE as SM90_CACHE, _has_nvidia_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_interpreter_tiles(monkeypatch):
    # 16-position tiles under the interpreter: the rows below (up to 40 positions) then span
    # several tiles, so that the blocks a tile skips are exercised.
    monkeypatch.setattr(K, "INTERPRET_BLOCK", 16)
LENGTHS = [5, 0, 19, 40]

CASES = [
    dict(Hkv=1),
    dict(num_targets=[1, 0, 4, 6], contextual_len=3, max_attn_len=5, time=True, position=True,
         P=7, NB=9),
    dict(layout="padded", normalization="silu", causal=False, time=True, position=True, Hb=2,
         time_bucket="sqrt", NB=40),
    dict(normalization="silu", attn_scale=0.05, num_targets=[2, 0, 1, 12], dense_bias=True,
         Hkv=1),
    dict(causal=False, max_attn_len=4, contextual_len=2, dense_bias=True, Hb=2,
         position=True, P=40),
]


def _to_device(t, kw):
    def move(x):
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x

    return {k: move(v) for k, v in t.items()}, {k: move(v) for k, v in kw.items()}


def _check(case, dtype, lengths=LENGTHS, seed=0):
    kw = dict(case)
    t, a = random_sequence_problem(lengths, seed=seed, **kw)
    # The checking body takes CPU tensors and runs the oracle there, the backend on DEVICE.
    ok, errors, why = check_sequence_backend("triton", t, a, dtype, device=DEVICE)
    assert ok, why


@pytest.mark.parametrize("case", range(len(CASES)))
def test_against_the_oracle(case):
    _check(CASES[case], torch.float32)


@pytest.mark.parametrize("dtype, case", [
    (torch.bfloat16, dict(num_targets=[1, 2], time=True, position=True, dense_bias=True)),
    (torch.float16, dict(layout="padded", normalization="silu", contextual_len=1, max_attn_len=9,
                         time=True, Hkv=1)),
])
def test_low_precision(dtype, case):
    _check(case, dtype, lengths=[3, 21])


def test_unknown_max_length_and_float64_attn_scale():
    # Without max_length the op reads the rows' lengths (and SiLU's default scale is 1 / the
    # longest); a per-token attn_scale may come in any float dtype.
    for kw in (dict(normalization="silu", attn_scale=torch.rand(11, dtype=torch.float64)),
               dict(normalization="silu"), dict(num_targets=[1, 0, 2])):
        t, a = random_sequence_problem([4, 0, 7], H=2, **kw)
        a.pop("max_length")
        t, a = _to_device(t, a)
        got = attnkern.sequence_attention(**t, **a, backend="triton")
        want = attnkern.sequence_attention(**t, **a, backend="reference")
        torch.testing.assert_close(got, want)


def _canonical(t, a):
    """The op-level arguments of a public call (the wrapper's own normalisation)."""
    prob = validate_sequence(t["query"], t["key"], t["value"], a.get("offsets"), a.get("lengths"),
                             a.get("max_length"), a["causal"], a.get("num_targets"),
                             a["contextual_len"], a["max_attn_len"], a["normalization"],
                             a.get("scale"), a.get("key_times"), a.get("query_times"),
                             t.get("time_table"), t.get("position_table"), a.get("attn_scale"),
                             t.get("bias"), a["time_bucket"], False)
    return canonical_sequence_args(prob, t["query"], t["key"], t["value"], a.get("offsets"),
                                   a.get("lengths"), a.get("max_length"), a["causal"],
                                   a.get("num_targets"), a["contextual_len"], a["max_attn_len"],
                                   a.get("key_times"), a.get("query_times"), t.get("time_table"),
                                   t.get("position_table"), a.get("attn_scale"), t.get("bias"),
                                   a["time_bucket"])


def test_backward_is_deterministic_and_tables_get_every_pair():
    # The table gradients are per-program partial sums reduced in a fixed order: bitwise equal
    # run to run. Each table's gradient sums to that of the scores (every attended pair adds
    # its ds to one row of each table and to one element of the dense bias).
    t, a = _to_device(*random_sequence_problem([7, 33], H=2, num_targets=[1, 3],
                                               time=True, position=True, dense_bias=True, P=6,
                                               NB=7))
    args = _canonical(t, a)
    out, lse = torch.ops.attnkern.triton_sequence_attention_fwd(*args)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    delta = (go.double() * out.double()).sum(-1).float()
    first = torch.ops.attnkern.triton_sequence_attention_bwd(go, lse, delta, *args)
    second = torch.ops.attnkern.triton_sequence_attention_bwd(go, lse, delta, *args)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    d_time, d_pos, d_bias = first[3:]
    total = d_bias.double().sum()
    assert torch.allclose(d_time.double().sum(), total, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d_pos.double().sum(), total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("P", [1, 3, 40])
def test_fold_position_grad_sums_each_pair_into_its_row(P):
    # Partial sums folded by hand: slot d of band index e is the pair distance
    # i - j = (e - DMAX - 1) * block + d, whose table row is min(|i - j|, P - 1); the last
    # index's slot 0 is the sum of the pairs already known to be on row P - 1.
    block, M, H = 4, 4, 2
    dmax = K.band_tiles(P, block, M)
    pg = torch.randn(2, M, H, 2 * dmax + 2, 2 * block, dtype=torch.float64).float()
    pg[:, :, :, -1, 1:] = 0
    want = torch.zeros(P, H, dtype=torch.float64)
    for b in range(2):
        for mb in range(M):
            for e in range(2 * dmax + 1):
                for d in range(2 * block):
                    rel = (e - dmax - 1) * block + d
                    want[min(abs(rel), P - 1)] += pg[b, mb, :, e, d].double()
            want[P - 1] += pg[b, mb, :, -1, 0].double()
    got = K.fold_position_grad(pg, P, block)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def _op_args(**change):
    q = torch.randn(6, 2, 4, device=DEVICE)
    kv = torch.randn(6, 1, 4, device=DEVICE)
    a = dict(query=q, key=kv, value=kv, starts=torch.tensor([0, 2], device=DEVICE),
             lengths=torch.tensor([2, 4], device=DEVICE), max_length=4, num_targets=None,
             contextual_len=0, max_attn_len=0, causal=True, silu=False, scale=0.5,
             attn_scale=None, attn_scale_value=None, query_times=None, key_times=None,
             time_table=None, time_bounds=None, position_table=None, bias=None)
    a.update(change)
    return a


@pytest.mark.parametrize("change, error, words", [
    (dict(query=torch.randn(6, 2, 4, dtype=torch.float64)), TypeError, "query"),
    (dict(key=torch.randn(5, 1, 4)), ValueError, "key/value"),
    (dict(key=torch.randn(6, 3, 4), value=torch.randn(6, 3, 4)), ValueError, "divide"),
    (dict(lengths=torch.tensor([2])), ValueError, "lengths"),
    (dict(num_targets=torch.tensor([1, 1, 1])), ValueError, "num_targets"),
    (dict(starts=torch.tensor([0.0, 2.0])), TypeError, "starts"),
    (dict(max_length=-2), ValueError, "max_length"),
    (dict(time_table=torch.zeros(4, 1)), TypeError, "query_times"),
    (dict(time_table=torch.zeros(4, 1), query_times=torch.zeros(6, dtype=torch.long),
          key_times=torch.zeros(6, dtype=torch.long), time_bounds=torch.zeros(2, dtype=torch.long)),
     ValueError, "time_bounds"),
    (dict(position_table=torch.zeros(4, 3)), ValueError, "position_table"),
    (dict(bias=torch.zeros(2, 1, 3, 3)), ValueError, "max_length"),
    (dict(attn_scale=torch.zeros(5), silu=True), ValueError, "attn_scale"),
])
def test_op_input_checks(change, error, words):
    a = _op_args(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v)
                    for k, v in change.items()})
    with pytest.raises(error, match=words):
        torch.ops.attnkern.triton_sequence_attention_fwd(*a.values())


def test_op_fake_and_compile():
    # The fake impls give the shapes without running a kernel; torch.compile(fullgraph=True)
    # traces the op, its autograd and the backward op whole, and gets eager's gradients.
    a = _op_args(position_table=torch.randn(3, 1, device=DEVICE))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fa = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        fo, fl = torch.ops.attnkern.triton_sequence_attention_fwd(*fa.values())
    assert fo.shape == (6, 2, 4) and fl.shape == (6, 2) and fo.dtype == torch.float32

    def loss(q, pt):
        b = dict(a, query=q, position_table=pt)
        return torch.ops.attnkern.triton_sequence_attention_fwd(*b.values())[0].square().sum()

    leaves = [a["query"].clone().requires_grad_(), a["position_table"].clone().requires_grad_()]
    want = torch.autograd.grad(loss(*leaves), leaves)
    got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves),
                              leaves)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


def test_opcheck():
    q = torch.randn(6, 2, 4, device=DEVICE, requires_grad=True)
    pt = torch.randn(3, 1, device=DEVICE, requires_grad=True)
    a = _op_args(query=q, position_table=pt, silu=True, num_targets=torch.tensor([0, 1], device=DEVICE))
    torch.library.opcheck(torch.ops.attnkern.triton_sequence_attention_fwd.default, tuple(a.values()))


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend (ptxas)")
def test_kernels_compile_for_sm90_without_spills():
    # No GPU in CI: each kernel with every feature on is compiled for sm_90 by Triton's ptxas
    # (in a subprocess: the interpreter, set above, replaces the kernels), at the tiles the
    # launcher picks; the two normalizations and both tile sizes (16-bit, float32) covered.
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = SM90_CACHE
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    only = "fwd:bfloat16:softmax,dq:float32:silu,dkdv:bfloat16:silu,dkdv:float32:softmax"
    r = subprocess.run([sys.executable, "-m", "attnkern.triton_kernels.sequence_aot", "--only", only],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    for row in rows:
        assert row["n_regs"] > 0 and row["n_spills"] == 0, row
        assert row["shared"] <= 227 * 1024, row
