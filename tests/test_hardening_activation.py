"""Regression tests of the second hardening round: the activation unit keeps the attention op's
rules (a non-finite value at a valid position propagates; a row is empty only when it has no
valid position), low-precision gradients of softmax pooling are formed from the unrounded
output, the tiled CPU backward keeps a one-key softmax constant, and ActivationUnitPooling
names the input that is wrong. Each compares with the float64 reference under the suite's
tolerance rule (attnkern.testing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.reference import activation_unit_pool_ref
from attnkern.testing import (check_activation_backend, check_backend, make_problem,
                              random_activation_problem, to_public)
from conftest import CUDA_DEVICE

BACKENDS = attnkern.backends()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _backend_param(name):
    info = BACKENDS[name]
    return pytest.param(name, marks=pytest.mark.skipif(not info.available, reason=info.reason or name))


# "cuda": CPU tensors in the CUDA emulation build (conftest.CUDA_DEVICE).
DEVICE = {"cpu": "cpu", "cuda": CUDA_DEVICE or "cuda",
          "triton": "cuda" if torch.cuda.is_available() else "cpu"}
FUSED = [_backend_param(b) for b in ("cpu", "triton", "cuda")]
needs_cpu = pytest.mark.skipif(not BACKENDS["cpu"].available, reason=BACKENDS["cpu"].reason or "cpu")


# -- 1. non-finite values at valid positions ---------------------------------------------------

NAN, INF = float("nan"), float("inf")
# Where the non-finite value goes: (tensor, index, value). Row 0 of the problem below has
# length 5 (all valid), row 1 is empty, row 2 has one position.
PLACES = {
    "query": ("query", (0, 0, 1), NAN),
    "key": ("key", (0, 2, 1), NAN),  # the reproducer
    "w1": ("w1", (0, 0), NAN),       # every row with a valid position turns NaN
    "key_inf": ("key", (0, 3, 0), INF),
    "value_inf": ("value", (0, 1, 2), INF),
}


def _nonfinite_problem(backend, activation, softmax, place):
    a = random_activation_problem(B=3, N=1, L=5, E=4, Dv=3, units=(8,), activation=activation,
                                  softmax=softmax, layout="lengths", lengths=[5, 0, 1], seed=0,
                                  device=DEVICE[backend])
    name, index, value = PLACES[place]
    a[name] = a[name].clone()
    a[name][index] = value
    return a


def _rows(backend, a):
    """(out [B, N, Dv], lse [B, N]) through the public function (out) and the raw op (lse)."""
    args, kw = to_public(a)
    with torch.no_grad():
        out = attnkern.activation_unit_pool(*args, **kw, backend=backend).cpu()
        if backend == "reference":
            lse = activation_unit_pool_ref(*a.values())[1]
        else:
            prefix = "triton_" if backend == "triton" else ""
            lse = getattr(torch.ops.attnkern, prefix + "activation_unit_pool_fwd")(*a.values())[1]
    return out, lse.cpu()


def assert_nonfinite_as_reference(backend, a):
    out, lse = _rows(backend, a)
    ref, ref_lse = _rows("reference", {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                       for k, v in a.items()})
    fin, ref_fin = torch.isfinite(out).all(-1), torch.isfinite(ref).all(-1)
    assert torch.equal(fin, ref_fin), (out, ref)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), (lse, ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), (lse, ref_lse)
    # Empty rows (row 1 has no valid position) stay exactly 0, whatever the other rows hold.
    assert (out[1] == 0).all() and (ref[1] == 0).all()
    both = fin & ref_fin
    torch.testing.assert_close(out[both].double(), ref[both].double(), rtol=1e-4, atol=1e-5)


@needs_cpu
@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "prelu", "dice"])
def test_nonfinite_at_valid_position_propagates_cpu(activation, softmax, place):
    a = _nonfinite_problem("cpu", activation, softmax, place)
    assert_nonfinite_as_reference("cpu", a)


@pytest.mark.parametrize("backend", [b for b in FUSED if b.values[0] != "cpu"])
def test_nonfinite_at_valid_position_propagates(backend):
    # One test per backend (the Triton interpreter takes a while a call): every activation and
    # both normalisations, NaN at a valid key position.
    for activation in ("relu", "sigmoid", "prelu", "dice"):
        for softmax in (False, True):
            for place in ("key", "w1"):
                assert_nonfinite_as_reference(backend, _nonfinite_problem(backend, activation, softmax, place))


@needs_cpu
def test_nan_row_is_not_empty_and_nan_padding_is_never_read():
    """The issue's reproducer: a NaN key at a valid position makes the row NaN, not 0; the same
    NaN at a padded position changes nothing."""
    a = _nonfinite_problem("cpu", "sigmoid", True, "key")
    out, lse = _rows("cpu", a)
    assert torch.isnan(out[0]).all() and torch.isnan(lse[0]).all()
    assert torch.isfinite(out[2]).all() and torch.isfinite(lse[2]).all()
    b = _nonfinite_problem("cpu", "sigmoid", True, "key")
    b["key"][2, 3] = NAN  # row 2 has one valid position: 3 is padding
    b["key"][0, 2, 1] = a["key"][0, 2, 0]
    out_b, _ = _rows("cpu", b)
    assert torch.isfinite(out_b).all()


# -- 2. low-precision gradients of softmax pooling ---------------------------------------------

def _lowp_problem(backend, dtype, seed):
    return random_activation_problem(B=3, N=33, L=5, E=3, Dv=17, units=(1,), activation="relu",
                                     softmax=True, layout="full", seed=seed, dtype=dtype,
                                     device=DEVICE[backend])


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_softmax_gradients_cpu(dtype):
    # Seeds that failed before: the output-bias, w_out and b1 gradients were off by the rounding
    # of out to float16/bfloat16, from which delta was formed.
    for seed in range(12):
        ok, errors, why = check_activation_backend("cpu", _lowp_problem("cpu", dtype, seed))
        assert ok, "seed %d: %s" % (seed, why)


@pytest.mark.parametrize("backend", [b for b in FUSED if b.values[0] != "cpu"])
def test_low_precision_softmax_gradients(backend):
    for dtype in (torch.float16, torch.bfloat16):
        ok, errors, why = check_activation_backend(backend, _lowp_problem(backend, dtype, 4))
        assert ok, "%s: %s" % (dtype, why)


@pytest.mark.parametrize("backend", FUSED)
def test_forward_op_returns_unrounded_output(backend):
    a = _lowp_problem(backend, torch.bfloat16, 4)
    prefix = "triton_" if backend == "triton" else ""
    out, lse = getattr(torch.ops.attnkern, prefix + "activation_unit_pool_fwd")(*a.values())
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    args, kw = to_public(a)
    public = attnkern.activation_unit_pool(*args, **kw, backend=backend)
    assert public.dtype == torch.bfloat16 and torch.equal(public, out.to(torch.bfloat16))


# -- 3. one valid key per row, many queries (the tiled CPU backward) ----------------------------

@needs_cpu
@pytest.mark.parametrize("N", [2, 5, 8, 15, 16, 64, 298])
def test_one_key_rows_keep_softmax_constant(N):
    """A softmax over one key is constant: the key gradient is 0 up to rounding, however many
    queries add into it (N < 16: the general kernels; N >= 16: the tiled ones)."""
    for seed in range(5):
        args, kw = make_problem(B=1, N=N, H=2, L=1, Dk=3, Dv=255, layout="full", seed=seed)
        check_backend("cpu", args, kw).assert_passed()


@needs_cpu
@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_one_key_rows_among_others(layout):
    # Rows of one key next to empty and longer rows, in both tiled layouts.
    args, kw = make_problem(B=4, N=40, H=1, L=3, Dk=8, Dv=64, layout=layout, seed=3, lengths=[1, 0, 3, 1])
    check_backend("cpu", args, kw).assert_passed()


@pytest.mark.slow  # one subprocess per instruction set
@needs_cpu
@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512", "avx512_bf16", "amx"])
def test_cpu_fixes_on_every_isa(isa):
    """This file's CPU tests under each instruction set the launcher can select here (the
    activation unit has generic and AVX2 kernels; the tiled attention kernels all five)."""
    from test_cpu import cpu_isa_runs

    if not cpu_isa_runs(isa):
        pytest.skip("this CPU has no %s (and this is not the emulation build)" % isa)
    env = dict(os.environ, ATTNKERN_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.abspath(__file__), "-m", "not slow", "-k", "cpu or one_key or nan_row"],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


# -- 4. ActivationUnitPooling's errors ---------------------------------------------------------

@pytest.mark.parametrize("units", [None, "abc", 3.5, (), (8, 8, 8), (0,), (8, 300)])
def test_hidden_units_error_names_the_argument(units):
    with pytest.raises(ValueError, match="hidden_units must be one or two ints"):
        attnkern.nn.ActivationUnitPooling(8, hidden_units=units)


def test_wrong_query_width_blames_the_query():
    layer = attnkern.nn.ActivationUnitPooling(4, (8,))
    with pytest.raises(ValueError, match=r"query must have last dimension embed_dim = 4, got shape \[2, 5\]"):
        layer(torch.randn(2, 5), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match=r"keys must have last dimension embed_dim = 4, got shape \[2, 6, 5\]"):
        layer(torch.randn(2, 4), torch.randn(2, 6, 5))
