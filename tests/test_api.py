"""The public API's contract: validation of every malformed call (docs/contract.md §3), dispatch rules,
backends(), set_validation."""

import pytest
import torch

import attnkern
from attnkern import functional


@pytest.fixture(autouse=True)
def restore_validation():
    """Every test here may turn validation on or off: put it back as it was."""
    before = attnkern.validation_enabled()
    yield
    attnkern.set_validation(before)


def _ok(B=2, N=None, H=2, L=5, Dk=4, Dv=3, dtype=torch.float32):
    qshape = (B, H, Dk) if N is None else (B, N, H, Dk)
    return (torch.randn(qshape, dtype=dtype), torch.randn(B, L, H, Dk, dtype=dtype),
            torch.randn(B, L, H, Dv, dtype=dtype))


def _jagged(B=2, T=6, H=2, Dk=4, Dv=3):
    return torch.randn(B, H, Dk), torch.randn(T, H, Dk), torch.randn(T, H, Dv)


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        attnkern.attention_pool(*args, **kwargs)


def test_valid_calls_and_shapes():
    q, k, v = _ok()
    assert attnkern.attention_pool(q, k, v).shape == (2, 2, 3)
    out, lse = attnkern.attention_pool(q, k, v, torch.tensor([5, 0]), return_lse=True)
    assert out.shape == (2, 2, 3) and lse.shape == (2, 2) and lse.dtype == torch.float32
    q4, k, v = _ok(N=3)
    assert attnkern.attention_pool(q4, k, v, mask=torch.ones(2, 5, dtype=torch.bool)).shape == (2, 3, 2, 3)
    qj, kj, vj = _jagged()
    out = attnkern.attention_pool(qj, kj, vj, offsets=torch.tensor([0, 2, 6]), max_length=4)
    assert out.shape == (2, 2, 3)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_non_tensor_is_type_error(name):
    q, k, v = _ok()
    args = {"query": q, "key": k, "value": v}
    args[name] = args[name].tolist()
    _raises(TypeError, name, args["query"], args["key"], args["value"])


def test_dtype_errors():
    q, k, v = _ok()
    _raises(TypeError, "query must be float16", q.int(), k.int(), v.int())
    _raises(TypeError, "key must have the dtype of query", q, k.double(), v)
    _raises(TypeError, "value must have the dtype of query", q, k, v.half())
    _raises(TypeError, "lengths must be int32 or int64", q, k, v, torch.tensor([1.0, 2.0]))
    _raises(TypeError, "mask must be a bool", q, k, v, mask=torch.ones(2, 5))
    # a 0/1 float mask: the message says how to convert it, for either polarity
    _raises(TypeError, r"True = attend.*mask=m\.bool\(\)", q, k, v, mask=torch.ones(2, 5))
    _raises(TypeError, r"key_padding_mask must be a bool tensor \(True = padding\).*"
            r"key_padding_mask=m\.bool\(\)", q, k, v, key_padding_mask=torch.zeros(2, 5))
    _raises(ValueError, "key_padding_mask must have shape", q, k, v,
            key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    qj, kj, vj = _jagged()
    _raises(TypeError, "offsets must be int32 or int64", qj, kj, vj,
            offsets=torch.tensor([0.0, 2.0, 6.0]))
    _raises(TypeError, "max_length must be a Python int", qj, kj, vj,
            offsets=torch.tensor([0, 2, 6]), max_length=4.0)
    _raises(TypeError, "scale must be a float", q, k, v, scale="1")
    _raises(TypeError, "return_lse must be a bool", q, k, v, return_lse=1)
    _raises(TypeError, "backend must be a str", q, k, v, backend=None)


def test_shape_errors():
    q, k, v = _ok()
    _raises(ValueError, "query must be", q[0], k, v)
    _raises(ValueError, "query must be", q[None, None], k, v)
    _raises(ValueError, "key must be", q, k[:1], v)
    _raises(ValueError, "key must be", q, k[..., :3], v)
    _raises(ValueError, "value must be", q, k[:, :, :1], v)  # K and V head counts differ
    q3 = torch.randn(2, 3, 4)
    _raises(ValueError, "Hkv that divides the query's H = 3", q3, k, v)  # 2 K/V heads, 3 query heads
    _raises(ValueError, "Hkv that divides the query's H = 2", q, k[:, :, :0], v[:, :, :0])
    _raises(ValueError, "value must be", q, k, v[:, :4])
    _raises(ValueError, "value must be", q, k, v[0])
    _raises(ValueError, "a 3-D key is jagged: pass offsets", q, k[0], v[0])
    _raises(ValueError, "Dk must be in", torch.randn(2, 2, 257), torch.randn(2, 5, 2, 257), v)
    _raises(ValueError, "Dv must be in", q, k, torch.randn(2, 5, 2, 300))
    _raises(ValueError, "Dk must be in", torch.randn(2, 2, 0), torch.randn(2, 5, 2, 0), v)
    _raises(ValueError, "H >= 1", torch.randn(2, 0, 4), torch.randn(2, 5, 0, 4), torch.randn(2, 5, 0, 3))
    _raises(ValueError, "N >= 1", torch.randn(2, 0, 2, 4), k, v)
    _raises(ValueError, "lengths must have shape", q, k, v, torch.tensor([1, 2, 3]))
    _raises(ValueError, "mask must have shape", q, k, v, mask=torch.ones(2, 4, dtype=torch.bool))


def test_layout_conflicts():
    q, k, v = _ok()
    lengths = torch.tensor([1, 2])
    mask = torch.ones(2, 5, dtype=torch.bool)
    _raises(ValueError, "at most one of lengths, mask and key_padding_mask, got lengths and mask",
            q, k, v, lengths, mask=mask)
    _raises(ValueError, "got mask and key_padding_mask", q, k, v, mask=mask, key_padding_mask=~mask)
    _raises(ValueError, "got lengths and key_padding_mask", q, k, v, lengths, key_padding_mask=~mask)
    qj, kj, vj = _jagged()
    offsets = torch.tensor([0, 2, 6])
    _raises(ValueError, "lengths is for the padded layout", qj, kj, vj, lengths, offsets=offsets)
    _raises(ValueError, "mask is for the padded layout", qj, kj, vj, mask=mask, offsets=offsets)
    _raises(ValueError, "key_padding_mask is for the padded layout", qj, kj, vj,
            key_padding_mask=mask, offsets=offsets)
    _raises(ValueError, "key must be jagged", q, k, v, offsets=offsets)
    _raises(ValueError, "max_length is for the jagged layout", q, k, v, max_length=3)
    _raises(ValueError, "offsets must have shape", qj, kj, vj, offsets=torch.tensor([0, 6]))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_value_errors_lengths_offsets(backend):
    # "auto" reaches the CPU kernels, whose op checks the values; "reference" is checked in Python.
    q, k, v = _ok()
    b = {"backend": backend}
    _raises(ValueError, "lengths must be >= 0", q, k, v, torch.tensor([-1, 2]), **b)
    _raises(ValueError, r"lengths must be <= L = 5", q, k, v, torch.tensor([6, 2]), **b)
    qj, kj, vj = _jagged()
    _raises(ValueError, r"offsets\[0\] must be 0", qj, kj, vj, offsets=torch.tensor([1, 2, 6]), **b)
    _raises(ValueError, "non-decreasing", qj, kj, vj, offsets=torch.tensor([0, 4, 3]), **b)
    _raises(ValueError, r"offsets\[-1\] must be <= T = 6", qj, kj, vj, offsets=torch.tensor([0, 2, 7]), **b)
    _raises(ValueError, "max_length", qj, kj, vj, offsets=torch.tensor([0, 1, 6]), max_length=4, **b)
    _raises(ValueError, "max_length must be >= 0", qj, kj, vj, offsets=torch.tensor([0, 1, 6]),
            max_length=-1, **b)


def test_bad_scale_and_backend():
    q, k, v = _ok()
    _raises(ValueError, "scale must be finite", q, k, v, scale=float("nan"))
    _raises(ValueError, "scale must be finite", q, k, v, scale=float("inf"))
    _raises(ValueError, "unknown backend 'fast'", q, k, v, backend="fast")


def test_device_mismatch_is_value_error():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="key must be on the device of query"):
        attnkern.attention_pool(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="lengths must be on the device of query"):
        attnkern.attention_pool(q, k, v, torch.tensor([1, 2], device="meta"))


def test_backends_records():
    info = attnkern.backends()
    assert set(info) == {"reference", "cpu", "cuda", "triton"}
    for name, rec in info.items():
        assert isinstance(rec.available, bool) and isinstance(rec.reason, str)
        assert rec.available == (rec.reason == ""), name
    assert info["reference"].available


def test_unavailable_backend_raises_runtime_error_with_reason():
    q, k, v = _ok()
    for name, rec in attnkern.backends().items():
        if not rec.available:
            with pytest.raises(RuntimeError, match="unavailable: " + rec.reason[:20].replace("(", r"\(")):
                attnkern.attention_pool(q, k, v, backend=name)


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    q, k, v = _ok()
    want = "cpu" if attnkern.backends()["cpu"].available else "reference"
    assert functional._resolve("auto", q) == want


def test_float64_rejected_on_gpu_backends():
    q, k, v = _ok(dtype=torch.float64)
    for name in ("triton",):
        if attnkern.backends()[name].available:
            with pytest.raises(TypeError, match="float64"):
                attnkern.attention_pool(q, k, v, backend=name)


def test_set_validation_toggle(monkeypatch):
    assert attnkern.validation_enabled() in (True, False)
    before = attnkern.validation_enabled()
    attnkern.set_validation(True)
    assert attnkern.validation_enabled()
    attnkern.set_validation(False)
    assert not attnkern.validation_enabled()
    attnkern.set_validation(before)


@pytest.mark.slow
def test_validate_env_variable():
    import subprocess
    import sys

    code = "import attnkern; print(attnkern.validation_enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "ATTNKERN_VALIDATE": "1"}, check=True)
    assert out.stdout.strip() == "True"


def test_cpu_tensors_always_value_checked_even_with_validation_off():
    q, k, v = _ok()
    attnkern.set_validation(False)
    _raises(ValueError, "lengths must be <= L", q, k, v, torch.tensor([9, 2]))


@pytest.mark.skipif(not attnkern.backends()["cpu"].available, reason="CPU kernels not built")
def test_direct_op_calls_check_their_inputs():
    """torch.ops.attnkern.* check in C++: bad lengths/offsets raise, never read out of bounds."""
    ops = torch.ops.attnkern
    q, k, v = _ok(N=1)
    with pytest.raises(ValueError, match="lengths"):
        ops.attention_pool_fwd(q, k, v, torch.tensor([7, 1]), None, 1.0)
    with pytest.raises(ValueError, match="lengths"):
        ops.attention_pool_fwd(q, k, v, torch.tensor([-3, 1]), None, 1.0)
    with pytest.raises(ValueError, match="not both"):
        ops.attention_pool_fwd(q, k, v, torch.tensor([1, 1]), torch.ones(2, 5, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="key must be"):
        ops.attention_pool_fwd(q, k[:, :, :1], v, None, None, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention_pool_fwd(q, k.double(), v, None, None, 1.0)
    qj, kj, vj = _jagged()
    qj = qj[:, None]
    for bad, msg in (([0, 9, 6], "non-decreasing"), ([0, 2, 60], "offsets"), ([2, 2, 6], "offsets"),
                     ([0, 2], "offsets")):
        with pytest.raises(ValueError, match=msg):
            ops.jagged_attention_pool_fwd(qj, kj, vj, torch.tensor(bad), -1, 1.0)
    with pytest.raises(ValueError, match="max_length"):
        ops.jagged_attention_pool_fwd(qj, kj, vj, torch.tensor([0, 1, 6]), 3, 1.0)
    out, lse = ops.attention_pool_fwd(q, k, v, torch.tensor([5, 0]), None, 1.0)
    g = torch.ones_like(out)
    with pytest.raises(ValueError, match="lengths"):
        ops.attention_pool_bwd(g, q, k, v, torch.tensor([6, 0]), None, lse, lse.clone(), 1.0)
    with pytest.raises(ValueError, match="grad_out"):
        ops.attention_pool_bwd(g[:, :, :1], q, k, v, torch.tensor([5, 0]), None, lse, lse.clone(), 1.0)


def test_every_install_has_the_cpu_kernels():
    """setup.py always builds them: a missing extension must fail the run, not skip its tests."""
    info = attnkern.backends()["cpu"]
    assert info.available, info.reason


def test_triton_backend_runs_here():
    """With Triton installed, the triton backend is available: on a GPU, or on CPU tensors
    through the interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU)."""
    pytest.importorskip("triton")
    from attnkern.triton_kernels.attention_pool import interpret_mode, interpreter_problem

    if interpret_mode() and interpreter_problem():
        pytest.skip(interpreter_problem())
    info = attnkern.backends()["triton"]
    assert info.available, info.reason


@pytest.mark.parametrize("layout", ["lengths", "jagged"])
def test_reference_checks_values_under_torch_compile(layout):
    """The reference backend's value checks of CPU lengths/offsets run inside a compiled graph
    too (as an op of the graph), not only in eager mode."""
    torch._dynamo.reset()
    if layout == "lengths":
        q, k, v = _ok()

        def f(q, k, v, idx):
            return attnkern.attention_pool(q, k, v, idx, backend="reference")
        good, bad, match = torch.tensor([5, 2]), torch.tensor([6, 2]), "lengths must be <= L = 5"
    else:
        q, k, v = _jagged()

        def f(q, k, v, idx):
            return attnkern.attention_pool(q, k, v, offsets=idx, max_length=4, backend="reference")
        good, bad, match = torch.tensor([0, 2, 6]), torch.tensor([0, 4, 3]), "non-decreasing"
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, good), f(q, k, v, good))
    with pytest.raises(ValueError, match=match):
        compiled(q, k, v, bad)
