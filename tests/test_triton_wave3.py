"""The Triton kernels of attention_topk and quantized-K/V attention_pool against the float64
oracles of attnkern.topk_testing / the quantized reference, their ops' schemas against the C++
ops', and the backend choice. On CPU the kernels run through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported): tiny shapes."""

import math

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern.ops.schemas import TRITON_PREFIX, qualified  # noqa: E402
from attnkern.ops.topk import TOPK_OP  # noqa: E402
from attnkern.testing import make_problem  # noqa: E402
from attnkern.topk_testing import check_topk  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _topk(q, key, k, **kw):
    return attnkern.attention_topk(q, key, k, backend="triton", **kw)


def _on_device(*values):
    def move(x):
        if isinstance(x, dict):
            return {n: move(v) for n, v in x.items()}
        return x.to(DEVICE) if isinstance(x, torch.Tensor) else x
    return [move(v) for v in values]


def _topk_problem(layout, dtype=torch.float32, B=4, N=2, H=2, Hkv=1, L=21, Dk=5, seed=0, bias=None,
                  bias_heads=None):
    args, kw = make_problem(B=B, N=N, H=H, Hkv=Hkv, L=L, Dk=Dk, Dv=1, dtype=dtype, layout=layout,
                            seed=seed, bias=bias, bias_heads=bias_heads)
    return _on_device(args[0], args[1], args[3] if bias else None, kw)


# ---- top-k by score ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,dtype", [("lengths", torch.float32), ("mask", torch.bfloat16),
                                          ("jagged", torch.float16), ("full", torch.float32)])
def test_topk_matches_the_oracle(layout, dtype):
    # Empty, one-position, partial and full rows (edge lengths); k = 6 passes the short ones;
    # two query heads share one K/V head.
    q, key, _, kw = _topk_problem(layout, dtype)
    assert check_topk(_topk, q, key, 6, kw) == []


@pytest.mark.parametrize("layout,kind,heads", [("lengths", "per_query", 2), ("jagged", "shared", 1)])
def test_topk_bias_and_many_queries(layout, kind, heads):
    # N = 6 takes the tl.dot query block; -inf bias positions are never selected.
    q, key, bias, kw = _topk_problem(layout, N=6, L=40, bias=kind, bias_heads=heads, seed=3)
    bias.view(-1)[::5] = -math.inf
    assert check_topk(_topk, q, key, 3, kw, bias=bias) == []


def test_topk_ties_nan_k_past_the_row_and_k_zero():
    g = torch.Generator().manual_seed(0)
    # Small integers: exact scores, so ties are exact; 40 positions cross two interpreter tiles.
    q = torch.randint(-1, 2, (3, 1, 2, 4), generator=g).float()
    key = torch.randint(-1, 2, (3, 40, 2, 4), generator=g).float()
    key[1, 7] = math.nan
    lengths = torch.tensor([40, 17, 0])
    q, key, lengths = _on_device(q, key, lengths)
    for k in (5, 45):
        got = _topk(q, key, k, lengths=lengths, scale=1.0)
        want = attnkern.attention_topk_ref(q, key, k, lengths, scale=1.0)
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0))
    assert got[1][1, 0, 0, 0] == 7 and torch.isnan(got[0][1, 0, 0, 0])
    scores, idx = _topk(q, key, 0, lengths=lengths)
    assert scores.shape == idx.shape == (3, 1, 2, 0)


def test_topk_limits_and_direct_op_checks():
    q, key, _, kw = _topk_problem("jagged")
    with pytest.raises(ValueError, match="at most k = 256"):
        _topk(q, key, 257, **kw)
    op = getattr(torch.ops.attnkern, TRITON_PREFIX + TOPK_OP)
    bad = kw["offsets"].clone()
    bad[1] = bad[2] + 1
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="offsets must be non-decreasing"):
            op(q, key, None, None, bad, 3, 1.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        op(q, key, None, None, kw["offsets"], -1, 1.0)
    with pytest.raises(TypeError, match="triton backend supports query"):
        op(q.double(), key.double(), None, None, kw["offsets"], 3, 1.0)


def test_topk_auto_picks_triton_on_cuda_tensors():
    from attnkern.topk import _resolve_topk

    # Only the device type and dtype decide: a stand-in for a CUDA tensor, no GPU needed.
    cuda_like = type("T", (), {"device": torch.device("cuda"), "dtype": torch.float16})()
    assert _resolve_topk("auto", cuda_like, 8) == "triton"
    assert _resolve_topk("auto", cuda_like, 300) == "reference"
    cuda_like.dtype = torch.float64
    assert _resolve_topk("auto", cuda_like, 8) == "reference"


def test_topk_op_schema_matches_the_cpp_op():
    if not attnkern.backends()["cpu"].available:
        pytest.skip(attnkern.backends()["cpu"].reason)
    cpp = getattr(torch.ops.attnkern, TOPK_OP).default._schema
    tri = getattr(torch.ops.attnkern, TRITON_PREFIX + TOPK_OP).default._schema
    assert str(tri) == qualified(TRITON_PREFIX + TOPK_OP) + str(cpp)[len(qualified(TOPK_OP)):]
