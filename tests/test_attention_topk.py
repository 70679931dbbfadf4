"""Property suite of attnkern.attention_topk: every backend against the float64 oracle of
attnkern.topk_testing (layouts, dtypes, N > 1, shared K/V heads, empty rows, k past the row,
bias, exact ties, NaN), the differentiable scores, opcheck, torch.compile, bad input, and the
TWIN recipe of docs/topk.md against an eager re-implementation of FuxiCTR's TWIN target stage."""

import math
import os
import re

import pytest
import torch

import attnkern
from attnkern.ops.topk import TOPK_OP, TOPK_SCHEMA
from attnkern.testing import make_problem
from attnkern.topk_testing import check_topk

BACKENDS = ["reference", "cpu"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runner(backend):
    if not attnkern.backends()[backend].available:
        pytest.skip(attnkern.backends()[backend].reason)

    def run(q, key, k, **kw):
        return attnkern.attention_topk(q, key, k, backend=backend, **kw)
    return run


def problem(layout, dtype=torch.float32, B=5, N=2, H=4, Hkv=2, L=23, Dk=7, seed=0, bias=None,
            bias_heads=None):
    args, kw = make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=1, dtype=dtype, layout=layout,
                            seed=seed, bias=bias, bias_heads=bias_heads)
    return args[0], args[1], (args[3] if bias else None), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_oracle(backend, layout, dtype):
    # edge_lengths gives empty, one-position, full and partial rows; k = 6 passes the short ones.
    q, key, _, kw = problem(layout, dtype)
    assert check_topk(runner(backend), q, key, 6, kw) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout,kind,heads", [("lengths", "shared", 1), ("mask", "per_query", 4),
                                               ("jagged", "per_query", 1), ("jagged", "shared", 4)])
def test_bias(backend, layout, kind, heads):
    q, key, bias, kw = problem(layout, bias=kind, bias_heads=heads, seed=3)
    # -inf drops a position: never selected, as attention_pool never attends it.
    flat = bias.view(-1)
    flat[::5] = -math.inf
    assert check_topk(runner(backend), q, key, 4, kw, bias=bias) == []


# The bodies below take the backend under test as run(q, key, k, **kw) -> (scores, indices) on
# CPU tensors (tests/test_attention_topk_cuda.py passes the cuda backend's).


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_k_past_every_row_and_k_zero(backend, layout):
    check_k_past_every_row_and_k_zero(runner(backend), layout)


def check_k_past_every_row_and_k_zero(run, layout):
    q, key, _, kw = problem(layout, L=9, Dk=16)
    assert check_topk(run, q, key, 9 + 4, kw) == []
    scores, idx = run(q, key, 0, **kw)
    assert scores.shape == idx.shape == (5, 2, 4, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_keep_the_lower_position_first(backend):
    # Small integers: every score is exact, so equal scores are equal on every backend.
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-1, 2, (3, 2, 2, 5), generator=g).float()
    key = torch.randint(-1, 2, (3, 30, 2, 5), generator=g).float()
    kw = {"lengths": torch.tensor([30, 17, 0])}
    assert check_topk(runner(backend), q, key, 8, kw, scale=1.0) == []
    scores, idx = runner(backend)(q, key, 8, scale=1.0, **kw)
    want_s, want_i = attnkern.attention_topk_ref(q, key, 8, **kw, scale=1.0)
    assert torch.equal(idx, want_i) and torch.equal(scores, want_s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_ranks_first_and_masked_positions_are_never_read(backend):
    check_nan_ranks_first_and_masked_positions_are_never_read(runner(backend))


def check_nan_ranks_first_and_masked_positions_are_never_read(run):
    q, key, _, kw = problem("mask", B=3, N=1, H=1, Hkv=1, L=12, Dk=4)
    mask = kw["mask"]
    mask[:, :3] = True
    mask[:, 3] = False
    key[0, 1] = math.nan  # valid: ranks first
    key[:, 3] = math.nan  # masked out: changes nothing
    scores, idx = run(q, key, 4, **kw)
    assert idx[0, 0, 0, 0] == 1 and torch.isnan(scores[0, 0, 0, 0])
    assert not (idx == 3).any()
    assert not torch.isnan(scores[1:]).any()


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_scores_gradient_matches_the_reference(layout):
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    q, key, bias, kw = problem(layout, torch.float64, bias="per_query", seed=5)
    grads = []
    for backend in BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, key, bias)]
        scores, idx = attnkern.attention_topk(leaves[0], leaves[1], 5, **kw, bias=leaves[2], backend=backend)
        assert not idx.requires_grad
        w = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (torch.where(idx >= 0, scores, 0) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_cpu():
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    q, key, _, kw = problem("lengths", torch.float64, B=3, N=1, H=2, Hkv=1, L=6, Dk=3)

    def fn(q, key):
        scores, idx = attnkern.attention_topk(q, key, 3, **kw, backend="cpu")
        return torch.where(idx >= 0, scores, 0)
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), key.requires_grad_()))


def test_query_without_n_and_key_padding_mask():
    q, key, _, kw = problem("mask", N=1)
    for backend in BACKENDS:
        got = runner(backend)(q[:, 0], key, 3, key_padding_mask=~kw["mask"])
        want = attnkern.attention_topk_ref(q, key, 3, mask=kw["mask"])
        assert got[1].shape == (5, 4, 3)
        assert torch.equal(got[1], want[1][:, 0])


def test_schema_matches_the_python_declaration():
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    op = getattr(torch.ops.attnkern, TOPK_OP).default
    want = torch._C.parse_schema("attnkern::" + TOPK_OP + TOPK_SCHEMA)
    assert str(op._schema) == str(want)


@pytest.mark.parametrize("layout", ["mask", "jagged"])
def test_opcheck(layout):
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    q, key, bias, kw = problem(layout, bias="shared", seed=2)
    bias = bias.unsqueeze(1)
    op = getattr(torch.ops.attnkern, TOPK_OP).default
    args = (q, key, None, kw.get("mask"), kw.get("offsets"), 4, 0.5, bias)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    run = runner(backend)
    q, key, _, kw = problem("lengths")
    # aot_eager traces the op through its fake impl as inductor does, without the code generation.
    compiled = torch.compile(lambda q, key, lengths: run(q, key, 5, lengths=lengths), fullgraph=True,
                             backend="aot_eager")
    got = compiled(q, key, kw["lengths"])
    want = run(q, key, 5, **kw)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_bad_input():
    q, key, _, kw = problem("lengths")
    with pytest.raises(TypeError, match="k must be a Python int"):
        attnkern.attention_topk(q, key, 2.0, **kw)
    with pytest.raises(TypeError, match="k must be a Python int"):
        attnkern.attention_topk(q, key, True, **kw)
    with pytest.raises(ValueError, match="k must be >= 0"):
        attnkern.attention_topk(q, key, -1, **kw)
    with pytest.raises(TypeError, match="key must have the dtype of query"):
        attnkern.attention_topk(q, key.double(), 2, **kw)
    with pytest.raises(ValueError, match="lengths must be <= L"):
        attnkern.attention_topk(q, key, 2, lengths=kw["lengths"] + 30)


def test_direct_op_call_checks_its_inputs():
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    q, key, _, kw = problem("jagged")
    op = getattr(torch.ops.attnkern, TOPK_OP)
    bad = kw["offsets"].clone()
    bad[-1] = key.shape[0] + 1
    with pytest.raises(ValueError, match="offsets must be non-decreasing and <= T"):
        op(q, key, None, None, bad, 3, 1.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        op(q, key, None, None, kw["offsets"], -2, 1.0)


# ---- TWIN: top-k by score, then softmax attention over the k (docs/topk.md) -------------------


class EagerTopKAttention(torch.nn.Module):
    """FuxiCTR's TWIN target stage (model_zoo/LongCTR/TWIN/TWIN.py, MultiHeadTopKAttention with
    its default Kc_cross_features=0 and no dropout), re-implemented eagerly line for line: the
    oracle of the recipe."""

    def __init__(self, input_dim, attention_dim, topk, num_heads):
        super().__init__()
        self.num_heads, self.topk = num_heads, topk
        self.head_dim = attention_dim // num_heads
        self.scale = self.head_dim ** 0.5
        self.W_q = torch.nn.Linear(input_dim, attention_dim, bias=False)
        self.W_h = torch.nn.Linear(input_dim, attention_dim, bias=False)
        self.W_v = torch.nn.Linear(input_dim, attention_dim, bias=False)
        self.W_o = torch.nn.Linear(attention_dim, input_dim, bias=False)

    def forward(self, target_item, item_sequence, mask):
        B = target_item.size(0)
        query = self.W_q(target_item).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        key_h = self.W_h(item_sequence).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.W_v(item_sequence).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(query, key_h.transpose(-1, -2)) / self.scale
        mask = mask.view(B, 1, 1, -1).expand(B, self.num_heads, 1, -1)
        scores = scores.masked_fill_(mask.float() == 0, -1.e9)
        topk = min(self.topk, scores.shape[-1])
        topk_scores, topk_index = scores.topk(topk, dim=-1, largest=True, sorted=True)
        topk_value = torch.gather(value, 2, topk_index.transpose(-1, -2).expand(-1, -1, -1, value.shape[-1]))
        attention = topk_scores.softmax(dim=-1)
        output = torch.matmul(attention, topk_value)
        output = output.transpose(1, 2).contiguous().view(-1, self.num_heads * self.head_dim)
        return self.W_o(output)


def _recipe():
    """The python blocks of docs/topk.md, run in one namespace."""
    with open(os.path.join(ROOT, "docs", "topk.md")) as f:
        text = f.read()
    namespace = {}
    for block in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M):
        exec(compile(block, "docs/topk.md", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("topk,L", [(5, 40), (50, 30)])
def test_twin_recipe_matches_the_eager_target_stage(backend, topk, L):
    runner(backend)
    twin_long_interest = _recipe()["twin_long_interest"]
    torch.manual_seed(0)
    eager = EagerTopKAttention(input_dim=12, attention_dim=16, topk=topk, num_heads=2).double()
    B = 6
    target = torch.randn(B, 12, dtype=torch.float64, requires_grad=True)
    history = torch.randn(B, L, 12, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([L, 1, 7, L - 3, 20, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]  # every row non-empty: see docs/topk.md
    w = torch.randn(B, 12, dtype=torch.float64)
    outs = []
    for fn in (lambda: eager(target, history, mask.long()),
               lambda: twin_long_interest(eager, target, history, mask, backend=backend)):
        out = fn()
        grads = torch.autograd.grad((out * w).sum(), [target, history] + list(eager.parameters()))
        outs.append([out] + list(grads))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_cpu_narrower_isa_paths(isa):
    """The kernels of the instruction sets below the widest (which every other test runs):
    ATTNKERN_CPU_ISA is read once per process."""
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    import subprocess
    import sys

    code = (
        "import torch, attnkern\n"
        "from attnkern.testing import make_problem\n"
        "from attnkern.topk_testing import check_topk\n"
        "run = lambda q, key, k, **kw: attnkern.attention_topk(q, key, k, backend='cpu', **kw)\n"
        "for layout, dt in (('mask', torch.float32), ('jagged', torch.bfloat16), ('lengths', torch.float16)):\n"
        "    args, kw = make_problem(B=4, N=2, H=2, Hkv=1, L=37, Dk=19, Dv=1, dtype=dt, layout=layout,\n"
        "                            bias='per_query')\n"
        "    fails = check_topk(run, args[0], args[1], 7, kw, bias=args[3])\n"
        "    assert not fails, fails[:3]\n"
        "print('ok')\n"
    )
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
