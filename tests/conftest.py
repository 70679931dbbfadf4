"""Shared fixtures: the backends the property suite runs, and the checking body of
attnkern.testing as the tests call it."""

import os

import pytest
import torch

# CI has no GPU: run the Triton kernels on CPU tensors through Triton's interpreter. This must
# happen before triton (and so attnkern) is imported. With a GPU, Triton runs for real.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import attnkern  # noqa: E402
from attnkern import testing  # noqa: E402
from attnkern.testing import make_problem, unused_positions  # noqa: E402,F401  (for the tests)


# The fast subset (-m "not slow") keeps this many Triton-interpreter cases of each test function;
# the rest of a parametrized grid is marked slow (an interpreter case takes about a second on 2
# cores, and the grids hold hundreds). CI runs everything. On a GPU nothing is marked: the
# kernels run compiled there.
INTERPRETER_CASES_IN_FAST_SUBSET = 1
# Test files whose every test runs Triton kernels (the others say so with backend="triton").
_INTERPRETER_FILES = ("test_triton.py", "test_activation_unit_triton.py", "test_bias_triton.py")


def _runs_the_interpreter(item):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if item.path.name in _INTERPRETER_FILES:
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("backend") == "triton"


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects by mark
def pytest_collection_modifyitems(config, items):
    kept = {}
    for item in items:
        if not _runs_the_interpreter(item) or item.get_closest_marker("slow"):
            continue
        key = (item.path, item.originalname)
        kept[key] = kept.get(key, 0) + 1
        if kept[key] > INTERPRETER_CASES_IN_FAST_SUBSET:
            item.add_marker(pytest.mark.slow)


# Where the "cuda" backend's tests run: CUDA tensors with a GPU; CPU tensors in the CUDA
# emulation build (scripts/cuda_emu.sh), where backend="cuda" runs csrc/cuda's kernels through
# the harness of csrc/cuda_emu; None: nowhere (those tests skip).
CUDA_DEVICE = ("cuda" if torch.cuda.is_available()
               else "cpu" if attnkern.backends()["cuda"].emulated else None)
needs_cuda_backend = pytest.mark.skipif(
    CUDA_DEVICE is None, reason="no CUDA GPU (and not the CUDA emulation build)")


def on_cuda_device(*values):
    """`values` with every tensor (also inside dicts) moved to CUDA_DEVICE."""
    def move(x):
        if isinstance(x, dict):
            return {name: move(t) for name, t in x.items()}
        return x.to(CUDA_DEVICE) if isinstance(x, torch.Tensor) else x
    return tuple(move(x) for x in values)


def cuda_op(name):
    """The registered op `name` of the cuda backend (its kernels are the emulation's CPU kernels
    of attnkern::cuda_emu_<name> in the CUDA emulation build)."""
    from attnkern.ops.availability import CUDA_EMU_PREFIX

    prefix = CUDA_EMU_PREFIX if CUDA_DEVICE == "cpu" else ""
    return getattr(torch.ops.attnkern, prefix + name)


def backend_device_pairs(interpreter_slow=False):
    """(backend, device) pairs the property suite runs, each with a skip mark when unavailable.
    interpreter_slow: mark the Triton-on-CPU pair (the interpreter: seconds a case) slow."""
    info = attnkern.backends()
    gpu = torch.cuda.is_available()
    pairs = []
    for backend, device in (
        ("reference", "cpu"),
        ("cpu", "cpu"),
        ("triton", "cuda" if gpu else "cpu"),
        ("cuda", CUDA_DEVICE or "cuda"),
        ("reference", "cuda"),
    ):
        marks = []
        if backend == "cuda" and CUDA_DEVICE is not None:
            pass
        elif device == "cuda" and not gpu:
            marks.append(pytest.mark.skipif(True, reason="no CUDA GPU"))
        elif not info[backend].available:
            marks.append(pytest.mark.skipif(True, reason=info[backend].reason))
        if interpreter_slow and backend == "triton" and device == "cpu":
            marks.append(pytest.mark.slow)
        pairs.append(pytest.param(backend, device, id="%s-%s" % (backend, device), marks=marks))
    return pairs


def check_backend(backend, args, kwargs, *, grads=True, seed=1, max_logit=0.0):
    """The shared property check (attnkern.testing.check_backend): `backend` on `args` against
    the float64 oracle, forward (out, lse) and all three gradients, within the tolerance rule,
    plus no NaN/Inf and exact zeros for empty rows and at positions that take part in no row.
    Returns (out, lse, [grad_query, grad_key, grad_value])."""
    grad_out = testing.random_grad_out(args[0], args[2], seed=seed)
    report = testing.check_backend(backend, args, kwargs, grad_out, grads=grads,
                                   max_logit=max_logit).assert_passed()
    out, lse, *grads_ = report.outputs
    return out, lse, grads_
