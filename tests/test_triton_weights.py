"""attention_weights on the Triton backend (attnkern::triton_attention_weights_fwd and its jagged
twin): the weights and their gradients (the device-agnostic autograd of attnkern/ops/weights.py)
against the reference through the suite's checking body, the exact zeros and row sums, opcheck
and torch.compile (the ops' schemas: test_triton_wave3.py). On CPU the kernel runs through
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py): tiny shapes."""

import pytest
import torch

pytest.importorskip("triton")

import attnkern  # noqa: E402
from attnkern import testing  # noqa: E402
from attnkern.ops.schemas import TRITON_PREFIX, WEIGHTS_OPS  # noqa: E402
from attnkern.ops.weights import weights_kernels_missing  # noqa: E402
from conftest import make_problem  # noqa: E402
from test_backends import assert_compiles_fullgraph  # noqa: E402
import test_attention_weights as suite  # noqa: E402

if not attnkern.backends()["triton"].available:
    pytest.skip(attnkern.backends()["triton"].reason, allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_triton_ops_run():
    # Without its ops the public function would fall back to the composite in PyTorch ops.
    assert not weights_kernels_missing("triton", DEVICE)


@pytest.mark.parametrize("layout,N,H,Hkv,bias,Hb,dtype", [
    ("lengths", 3, 4, 2, "shared", 1, torch.float32), ("mask", 6, 2, 1, "per_query", 2, torch.bfloat16),
    ("jagged", 6, 4, 2, "per_query", 4, torch.float32), ("full", 1, 2, 2, None, None, torch.float16)])
def test_weights_and_gradients_against_the_reference(layout, N, H, Hkv, bias, Hb, dtype):
    # N = 6 takes the tl.dot query block; L = 19 crosses two interpreter tiles.
    args, kwargs = make_problem(B=5, N=N, H=H, Hkv=Hkv, L=19, Dk=7, Dv=5, layout=layout, bias=bias,
                                bias_heads=Hb, dtype=dtype, device=DEVICE)
    suite._check("triton", args, kwargs)
    assert suite._weights("triton", args, kwargs).dtype == torch.float32


@pytest.mark.parametrize("layout", ["mask", "jagged"])
def test_exact_zeros_and_sums(layout):
    suite.check_exact_zeros_and_sums("triton", layout, device=DEVICE)


def test_padding_conventions_agree():
    suite.check_padding_conventions_agree("triton", device=DEVICE)


def test_opcheck_and_compile():
    args, kwargs = make_problem(B=3, N=2, H=2, L=6, Dk=4, Dv=2, layout="jagged", device=DEVICE)
    op = getattr(torch.ops.attnkern, TRITON_PREFIX + WEIGHTS_OPS["jagged"]).default
    torch.library.opcheck(op, (args[0], args[1], kwargs["offsets"], 6, 0.5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    kwargs["max_length"] = 6
    assert_compiles_fullgraph(lambda q, k: attnkern.attention_weights(q, k, **kwargs, backend="triton"),
                              args[:2])
