"""attnkern.sequence_attention on the "cuda" backend: every mask rule, softmax and SiLU (attn_scale
a float or per token), the in-kernel time/position bias and the dense bias with their gradients,
shared K/V heads, float32 and bfloat16, jagged and padded, an empty row and a row longer than one
kernel tile, against the float64 oracle of attnkern.sequence_testing; the backward run twice is
bitwise identical (the table gradients are reduced in a fixed order).

Runs on a GPU, or on CPU tensors in the CUDA emulation build (scripts/cuda_emu.sh, where every
access is checked: tiny shapes); skips elsewhere.
"""

import pytest
import torch

import attnkern
from attnkern._sequence_validation import validate_sequence
from attnkern.sequence import canonical_sequence_args
from attnkern.sequence_testing import check_sequence_backend, random_sequence_problem
from conftest import CUDA_DEVICE, cuda_op, needs_cuda_backend

pytestmark = needs_cuda_backend

# An empty row and one of two kernel tiles (32 positions each).
LENGTHS = [5, 0, 37]

CASES = [
    dict(Hkv=1),
    dict(num_targets=[1, 0, 4], contextual_len=3, max_attn_len=5, time=True, position=True, P=7,
         NB=9),
    dict(layout="padded", normalization="silu", causal=False, time=True, position=True, Hb=2,
         time_bucket="sqrt", NB=40),
    dict(normalization="silu", attn_scale=0.05, num_targets=[2, 0, 1], dense_bias=True, Hkv=1),
    dict(causal=False, max_attn_len=4, contextual_len=2, dense_bias=True, Hb=2, position=True,
         P=40),
]


def _check(case, dtype, lengths=LENGTHS):
    t, a = random_sequence_problem(lengths, **case)
    # CPU tensors in the emulation build, the GPU otherwise; the oracle runs on the CPU.
    ok, errors, why = check_sequence_backend("cuda", t, a, dtype, device=CUDA_DEVICE)
    assert ok, why


@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_sequence_against_the_oracle(case):
    _check(CASES[case], torch.float32)


def test_cuda_sequence_bfloat16_per_token_attn_scale():
    T = sum(LENGTHS)
    a = torch.rand(T, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 0.1
    _check(dict(normalization="silu", attn_scale=a, num_targets=[1, 0, 3], time=True,
                position=True, Hkv=1), torch.bfloat16)


def _op_args(lengths, **case):
    """The op-level arguments (the wrapper's own normalisation) of a random problem."""
    t, a = random_sequence_problem(lengths, **case)
    t = {k: v.to(CUDA_DEVICE) for k, v in t.items()}
    a = {k: v.to(CUDA_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    prob = validate_sequence(t["query"], t["key"], t["value"], a["offsets"], None, a["max_length"],
                             a["causal"], a.get("num_targets"), a["contextual_len"],
                             a["max_attn_len"], a["normalization"], None, a.get("key_times"),
                             a.get("query_times"), t.get("time_table"), t.get("position_table"),
                             a.get("attn_scale"), t.get("bias"), a["time_bucket"], False)
    return canonical_sequence_args(prob, t["query"], t["key"], t["value"], a["offsets"], None,
                                   a["max_length"], a["causal"], a.get("num_targets"),
                                   a["contextual_len"], a["max_attn_len"], a.get("key_times"),
                                   a.get("query_times"), t.get("time_table"),
                                   t.get("position_table"), a.get("attn_scale"), t.get("bias"),
                                   a["time_bucket"])


def test_cuda_sequence_backward_is_deterministic():
    args = _op_args([7, 33], num_targets=[1, 3], time=True, position=True, dense_bias=True, P=6,
                    NB=7)
    out, lse = cuda_op("sequence_attention_fwd")(*args)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(CUDA_DEVICE)
    delta = (go.double() * out.double()).sum(-1).float()
    bwd = cuda_op("sequence_attention_bwd")
    first, second = bwd(go, lse, delta, *args), bwd(go, lse, delta, *args)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    # every attended pair adds its logit gradient to one entry of each table and of the bias
    d_time, d_pos, d_bias = (g.double().sum() for g in first[3:])
    assert torch.allclose(d_time, d_bias, rtol=1e-4, atol=1e-5)
    assert torch.allclose(d_pos, d_bias, rtol=1e-4, atol=1e-5)


def test_cuda_sequence_opcheck():
    args = [x.requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in _op_args([5, 3], num_targets=[1, 0], normalization="silu", position=True,
                              time=True, P=3, NB=4)]
    torch.library.opcheck(cuda_op("sequence_attention_fwd").default, tuple(args))


def test_cuda_sequence_unknown_max_length():
    # Without max_length the kernels take SiLU's default scale, 1 / the longest row, from the
    # rows on the device (no host read).
    t, a = random_sequence_problem([4, 0, 7], normalization="silu")
    a.pop("max_length")
    want = attnkern.sequence_attention(**t, **a, backend="reference")
    got = attnkern.sequence_attention(**t, **a, backend="cuda")
    torch.testing.assert_close(got, want)


def test_cuda_sequence_ops_clamp_malformed_rows():
    # A direct op call (no wrapper checks) with a row past the tokens, one starting past them and
    # more targets than positions: the kernels clamp each row (no access out of bounds, which the
    # emulation checks) and give exactly the result of the clamped rows.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(10, 2, 8, generator=g).to(CUDA_DEVICE) for _ in range(3))

    def run(starts, lengths, nt, silu):
        def longs(x):
            return torch.tensor(x, dtype=torch.long, device=CUDA_DEVICE)

        args = (q, k, v, longs(starts), longs(lengths), -1, longs(nt), 0, 0, True, silu, 0.3,
                None, None, None, None, None, None, None, None)
        out, lse = cuda_op("sequence_attention_fwd")(*args)
        grads = cuda_op("sequence_attention_bwd")(torch.ones_like(out), lse, lse, *args)
        return (out, lse) + tuple(grads[:3])

    for silu in (False, True):
        got = run([0, 6, 12], [6, 100, 3], [9, 1, 0], silu)
        want = run([0, 6, 10], [6, 4, 0], [6, 1, 0], silu)
        assert all(torch.equal(x, y) for x, y in zip(got, want))
