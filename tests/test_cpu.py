"""CPU-kernel-specific tests: the paths the shared backend suite does not aim at.

Split rows (few rows, long histories), many queries per history, every SIMD path the CPU
launcher can pick (ATTNKERN_CPU_ISA caps it), thread-count independence, direct op calls with
bad lengths/offsets, zero gradients at positions that take no part, and gradcheck in float64.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.ops.availability import cpu_isa, extension
from attnkern.reference import attention_pool_ref
from attnkern.testing import check_function, forward_backward, make_problem

pytestmark = pytest.mark.skipif(
    not attnkern.backends()["cpu"].available,
    reason="the attnkern C++ extension (CPU kernels) is not built",
)

LAYOUTS = ("full", "lengths", "mask", "jagged")


def make_inputs(layout, dtype, B, N, H, Dk, Dv, L, *, seed=0, lengths=None):
    # Lengths uniform in [0, L] unless given; three trailing jagged rows that belong to no row.
    args, layout_kw = make_problem(B, N, H, L, Dk, Dv, dtype=dtype, layout=layout,
                                   lengths="uniform" if lengths is None else lengths, seed=seed,
                                   extra_rows=3)
    layout_kw.pop("max_length", None)
    return tuple(args), layout_kw


def call_op(q, k, v, layout_kw, scale, *bias):
    """The registered forward op; bias (optional) in the op's layout."""
    if "offsets" in layout_kw:
        return torch.ops.attnkern.jagged_attention_pool_fwd(q, k, v, layout_kw["offsets"], -1, scale, *bias)
    return torch.ops.attnkern.attention_pool_fwd(q, k, v, layout_kw.get("lengths"), layout_kw.get("mask"), scale,
                                                 *bias)


def check_against_reference(layout, dtype, B, N, H, Dk, Dv, L, *, seed=0, lengths=None, noncontig=False):
    """The op called directly, by the checking body of attnkern.testing; returns the layout
    kwargs and (out, lse, grad_query, grad_key, grad_value)."""
    (q, k, v), layout_kw = make_inputs(layout, dtype, B, N, H, Dk, Dv, L, seed=seed, lengths=lengths)
    if noncontig:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = torch.cat([k, torch.zeros_like(k)], dim=-1)[..., :Dk]
    scale = 1.0 / math.sqrt(Dk)
    ref = lambda q_, k_, v_: attention_pool_ref(q_, k_, v_, scale=scale, **layout_kw)  # noqa: E731
    raw_out = []

    def got(q_, k_, v_):
        out, lse = call_op(q_, k_, v_, layout_kw, scale)
        raw_out.append(out)
        return out.to(q_.dtype), lse  # the cast the public function makes

    grad_out = torch.randn(B, N, H, Dv, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    report = check_function(got, [q, k, v], layout_kw, grad_out, reference=ref, label="cpu op")
    report.assert_passed()
    result = list(report.outputs)
    # The raw op's out is its unrounded accumulator: float32 (float64 for float64 inputs).
    assert raw_out[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert raw_out[0].is_contiguous() and result[1].is_contiguous()
    return layout_kw, result


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,N,H,Dk,Dv,L",
    [
        (6, 1, 1, 64, 64, 37),  # L not a multiple of any block
        (5, 3, 2, 7, 40, 33),  # odd dims, several heads and queries
        (3, 2, 3, 130, 1, 17),
        (4, 2, 1, 1, 130, 16),  # L exactly one 16-block
        (2, 1, 2, 33, 17, 1100),  # few rows, long: split path
        (3, 6, 2, 7, 130, 45),  # N >= 4: query-blocked path plus a remainder query
        (3, 5, 1, 130, 7, 40),  # N >= 4 with Dk > Dv (transposed K block the larger one)
        # One query, head dims of 1, 2 and 4 vectors, whole and partial: the register-resident
        # single-query kernel (with the long rows, also its split path).
        (3, 1, 1, 16, 16, 20),
        (4, 1, 2, 30, 20, 41),
        (3, 1, 1, 32, 32, 33),
        (3, 1, 1, 60, 50, 40),
        (2, 1, 1, 64, 64, 1100),
        (3, 1, 2, 128, 128, 40),  # 8 whole vectors (AVX-512)
    ],
)
def test_matches_reference(layout, dtype, B, N, H, Dk, Dv, L):
    check_against_reference(layout, dtype, B, N, H, Dk, Dv, L)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N,Dk,Dv", [(3, 24, 40), (1, 32, 32)])  # general and single-query kernels
def test_noncontiguous_inputs(layout, N, Dk, Dv):
    check_against_reference(layout, torch.float32, 4, N, 2, Dk, Dv, 29, noncontig=True)


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_block_boundaries(layout, dtype):
    # One row, lengths around the 512-position slice and 16-position block boundaries, and
    # empty rows mixed in: the split path and its log-sum-exp merge.
    lengths = [0, 511, 512, 513, 1, 1024 + 17, 0, 16]
    check_against_reference(layout, dtype, len(lengths), 2, 1, 32, 48, 1100, lengths=lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_queries_per_history(dtype):
    check_against_reference("lengths", dtype, 5, 64, 1, 64, 64, 70)


def test_large_logits_and_empty_rows_are_finite():
    (q, k, v), kw = make_inputs("lengths", torch.float32, 4, 2, 1, 16, 16, 20, lengths=[0, 20, 3, 0])
    q = q * 300.0  # |scale * q.k| in the thousands
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = call_op(*leaves, kw, 0.25)
    out.sum().backward()
    for t in [out] + [x.grad for x in leaves]:
        assert torch.isfinite(t).all()
    assert torch.isinf(lse[0]).all() and torch.isinf(lse[3]).all()
    assert (out[0] == 0).all() and (leaves[0].grad[0] == 0).all()


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged"])
def test_zero_gradients_where_no_row_attends(layout):
    kw_len = {} if layout == "mask" else {"lengths": [3, 0, 7]}
    layout_kw, result = check_against_reference(layout, torch.float32, 3, 2, 2, 8, 8, 9, **kw_len)
    grad_key, grad_value = result[3], result[4]
    if layout == "jagged":
        end = int(layout_kw["offsets"][-1])
        assert (grad_key[end:] == 0).all() and (grad_value[end:] == 0).all()
        return
    if layout == "mask":
        valid = layout_kw["mask"]
    else:
        valid = torch.arange(9)[None, :] < layout_kw["lengths"].long()[:, None]
    assert (grad_key[~valid] == 0).all() and (grad_value[~valid] == 0).all()


def assert_thread_count_independent(q, k, v, kw, grad_out, *bias):
    """The op's outputs and gradients (scale 0.3; with a bias in the op's layout, its gradient
    too) are bitwise the same with 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(forward_backward(lambda *t: call_op(*t[:3], kw, 0.3, *t[3:]), [q, k, v, *bias], grad_out))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("L", [5, 1100])  # the second one takes the split path
def test_thread_count_independent(layout, L):
    (q, k, v), kw = make_inputs(layout, torch.float32, 3, 2, 2, 20, 24, L)
    grad_out = torch.randn(3, 2, 2, 24, dtype=torch.float64)
    assert_thread_count_independent(q, k, v, kw, grad_out)


def test_empty_shapes():
    for B, L in [(0, 5), (3, 0)]:
        (q, k, v), _ = make_inputs("full", torch.float32, B, 2, 1, 8, 8, L)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = call_op(*leaves, {}, 0.5)
        assert out.shape == (B, 2, 1, 8) and (out == 0).all() and torch.isinf(lse).all()
        out.sum().backward()
        assert all((t.grad == 0).all() for t in leaves)
    q = torch.randn(2, 1, 1, 8)
    k, v = torch.randn(0, 1, 8), torch.randn(0, 1, 8)
    out, lse = torch.ops.attnkern.jagged_attention_pool_fwd(q, k, v, torch.zeros(3, dtype=torch.int64), -1, 0.5)
    assert (out == 0).all() and torch.isinf(lse).all()


@pytest.mark.parametrize(
    "lengths,match",
    [([1, -1], "lengths must be >= 0"), ([1, 9], "lengths must be <= L")],
)
def test_bad_lengths_raise(lengths, match):
    q, k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 8, 1, 4), torch.randn(2, 8, 1, 4)
    lens = torch.tensor(lengths)
    with pytest.raises(ValueError, match=match):
        torch.ops.attnkern.attention_pool_fwd(q, k, v, lens, None, 0.5)
    lse, delta = torch.zeros(2, 1, 1), torch.zeros(2, 1, 1)
    with pytest.raises(ValueError, match=match):
        torch.ops.attnkern.attention_pool_bwd(q, q, k, v, lens, None, lse, delta, 0.5)


@pytest.mark.parametrize(
    "offsets,max_length,match",
    [
        ([1, 2, 3], -1, r"offsets\[0\] must be 0"),
        ([0, 3, 2], -1, "non-decreasing"),
        ([0, 2, 9], -1, r"offsets\[-1\] must be <= T"),
        ([0, 5, 6], 4, "max_length"),
    ],
)
def test_bad_offsets_raise(offsets, max_length, match):
    q, k, v = torch.randn(2, 1, 1, 4), torch.randn(8, 1, 4), torch.randn(8, 1, 4)
    offs = torch.tensor(offsets, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        torch.ops.attnkern.jagged_attention_pool_fwd(q, k, v, offs, max_length, 0.5)
    lse, delta = torch.zeros(2, 1, 1), torch.zeros(2, 1, 1)
    with pytest.raises(ValueError, match=match):
        torch.ops.attnkern.jagged_attention_pool_bwd(q, q, k, v, offs, max_length, lse, delta, 0.5)


def _heads_apart(t, jagged):
    """The same values with each head's rows contiguous ([B, H, L, D] or [H, T, D] storage,
    viewed back as [B, L, H, D] / [T, H, D]): the launcher then runs one head at a time."""
    d = 0 if jagged else 1
    return t.transpose(d, d + 1).contiguous().transpose(d, d + 1)


@pytest.mark.parametrize("layout", ["lengths", "mask", "jagged", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,D", [(2, 32), (3, 20), (4, 8), (5, 16), (8, 32)])
@pytest.mark.parametrize("rows", ["split", "whole"])
def test_all_heads_of_a_row_together(layout, dtype, H, D, rows):
    """One query, heads that are neighbours in memory: each row (or, for few rows with long
    histories, each piece of a row) runs as one pass over all heads (the strided
    one-head-at-a-time read ran at about half the memory bandwidth). Bit for bit what the
    one-head kernel gives, and the reference's."""
    if rows == "split":  # few (row, head) tasks, long rows: split into pieces
        B, L, lengths = 3, 1100, [1100, 0, 613]
    else:  # B * H > 64: whole rows
        B, L, lengths = 17, 70, [70, 0] + [3 * i for i in range(15)]
    kw_len = {} if layout in ("mask", "full") else {"lengths": lengths}
    layout_kw, result = check_against_reference(layout, dtype, B, 1, H, D, D, L, seed=H, **kw_len)
    (q, k, v), kw = make_inputs(layout, dtype, B, 1, H, D, D, L, seed=H, **kw_len)
    jagged = "offsets" in kw
    together = call_op(q, k, v, kw, 0.3)
    apart = call_op(q, _heads_apart(k, jagged), _heads_apart(v, jagged), kw, 0.3)
    assert torch.equal(together[0], apart[0]) and torch.equal(together[1], apart[1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout):
    (q, k, v), kw = make_inputs(layout, torch.float64, 3, 2, 2, 5, 3, 6, lengths=None if layout == "mask" else [2, 0, 6])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    # Only `out`: lse is float32 whatever the input dtype, too coarse for finite differences.
    assert torch.autograd.gradcheck(lambda *t: call_op(*t, kw, 0.7)[0], leaves)


_SUBPROCESS_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests")
from test_cpu import check_against_reference
for layout in ("full", "lengths", "mask", "jagged"):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape in %r:
            check_against_reference(layout, dtype, *shape)
"""


def check_against_reference_in_subprocess(shapes, **env_vars):
    """check_against_reference for every layout, fp32/bf16/fp16 and each (B, N, H, Dk, Dv, L) of
    shapes, in a fresh interpreter with env_vars set (what the launcher reads once at start)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_vars)
    script = _SUBPROCESS_SCRIPT % (list(shapes),)
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@functools.lru_cache(maxsize=None)
def cpu_isa_in_subprocess(cap: str) -> str:
    """The instruction set the launcher picks with ATTNKERN_CPU_ISA=cap ("" = unset), as a
    fresh interpreter's attnkern._C.cpu_isa() reports it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ATTNKERN_CPU_ISA", None)
    if cap:
        env["ATTNKERN_CPU_ISA"] = cap
    proc = subprocess.run([sys.executable, "-c", "import attnkern._C as C; print(C.cpu_isa())"], cwd=root,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip()


def cpu_isas() -> list:
    """Every instruction set ATTNKERN_CPU_ISA can select here (attnkern._C.cpu_isas())."""
    return list(extension()[0].cpu_isas())


def cpu_isa_runs(isa: str) -> bool:
    """Whether ATTNKERN_CPU_ISA=isa selects that instruction set here (natively, or emulated in
    the avx512_emulation.h test build)."""
    return isa in cpu_isas() or isa + "-emulated" in cpu_isas()


_WIDTH = {"generic": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3, "amx": 4}


def _width(isa: str) -> int:
    return _WIDTH[isa.replace("-emulated", "")]


def _expected_isa(cap: str) -> str:
    # The widest selectable set within the cap; emulated ones only when the cap names them.
    fits = [i for i in cpu_isas() if (_width(i) <= _width(cap) if cap else not i.endswith("-emulated"))]
    return max(fits, key=_width)


def test_cpu_isa_reports_the_path_in_use():
    isas = cpu_isas()
    assert isas[0] == "generic" and all(_width(a) < _width(b) for a, b in zip(isas, isas[1:])), isas
    isa = extension()[0].cpu_isa()
    assert isa in isas and cpu_isa() == isa
    assert isa == _expected_isa(os.environ.get("ATTNKERN_CPU_ISA", ""))
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if all(f in flags for f in ("avx2", "fma", "f16c")):
        assert "avx2" in isas
    if "avx512f" not in flags:
        assert not any(i in isas for i in ("avx512", "avx512_bf16", "amx"))
    if "amx_bf16" not in flags:
        assert "amx" not in isas


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["", "generic", "avx2", "avx512", "avx512_bf16", "amx"])
def test_cpu_isa_follows_the_cpu_and_the_cap(cap):
    # ATTNKERN_CPU_ISA never widens the choice past what the CPU runs (only the emulation test
    # build offers avx512 without the instructions, and only on request).
    assert cpu_isa_in_subprocess(cap) == _expected_isa(cap)


@pytest.mark.parametrize("var,value", [("ATTNKERN_CPU_ISA", "generic"), ("ATTNKERN_CPU_ISA", "avx2"),
                                       ("ATTNKERN_CPU_PREFETCH_KB", "0"), ("ATTNKERN_CPU_PREFETCH_KB", "1")])
@pytest.mark.slow
def test_narrower_simd_paths_and_prefetch_settings(var, value):
    # The launcher picks the widest SIMD path at run time; ATTNKERN_CPU_ISA caps it so that
    # the narrower kernels (what older x86-64 CPUs and aarch64 run) are checked here too.
    # Software prefetch must never change a result: off, and at its shortest distance.
    check_against_reference_in_subprocess(
        [(3, 5, 2, 19, 33, 45), (2, 1, 1, 64, 64, 1100), (3, 1, 1, 32, 32, 45), (3, 1, 2, 12, 10, 45),
         (2, 1, 4, 16, 16, 1100), (3, 1, 3, 8, 8, 45)],
        **{var: value})


def test_large_gradients_reuse_cached_buffers():
    # Key/value gradients of 4 MiB and more come from huge-page buffers that are reused once
    # freed: a reused buffer must be fully rewritten (padded positions included).
    (q, k, v), kw = make_inputs("lengths", torch.float32, 64, 1, 1, 64, 64, 300, seed=3)
    grad_out = torch.randn(64, 1, 1, 64, dtype=torch.float64)
    ref = forward_backward(lambda *t: attention_pool_ref(*t, scale=0.125, **kw), [q, k, v], grad_out)
    first = forward_backward(lambda *t: call_op(*t, kw, 0.125), [q, k, v], grad_out)
    assert first[3].numel() * 4 >= 4 << 20
    for a, r in zip(first[2:], ref[2:]):
        assert (a - r).abs().max().item() < 1e-4
    valid = torch.arange(300)[None, :] < kw["lengths"].long()[:, None]
    for _ in range(2):
        k_junk = torch.full_like(k, 7.0)  # leaves non-zero data in the freed buffers
        forward_backward(lambda *t: call_op(*t, kw, 0.125), [q, k_junk, v], grad_out)
        again = forward_backward(lambda *t: call_op(*t, kw, 0.125), [q, k, v], grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        assert (again[3][~valid] == 0).all() and (again[4][~valid] == 0).all()
    lse, delta = first[1], (grad_out.float() * first[0]).sum(-1)
    torch.library.opcheck(
        torch.ops.attnkern.attention_pool_bwd,
        (grad_out.float(), q, k, v, kw["lengths"], None, lse, delta, 0.125),
        test_utils=("test_schema", "test_faketensor"),
    )
