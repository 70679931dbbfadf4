"""The inference path of attention_pool on the cpu backend (docs/serving.md).

The public function runs the inference ops (attnkern::attention_pool_infer and its jagged
twin: P V with the probabilities rounded to the input dtype where that is faster) for
float16/bfloat16 calls of which no gradient can be taken: grad mode off, inference mode, or no
input that requires grad. Checked here: that decision, eagerly, under torch.compile (which
guards on it) and in a torch.export graph; that the training path still calls the forward
op; that the inference ops refuse a gradient and pass opcheck; and that the ISA paths that
round P (avx512_bf16, amx) do, the others computing exactly the forward's result. Their
accuracy against the float64 reference is in tests/test_cpu_tiles.py (run on every ISA path).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkern
from attnkern.ops.availability import cpu_isa
from attnkern.ops.schemas import INFER_SCHEMAS, qualified

pytestmark = pytest.mark.skipif(
    not attnkern.backends()["cpu"].available,
    reason="the attnkern C++ extension (CPU kernels) is not built",
)

# The ISA paths whose tiled kernels run P V on bf16 pairs for the inference op.
ROUNDING_ISAS = ("avx512_bf16", "amx")


def _inputs(dtype=torch.bfloat16, N=20, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, N, 2, 16, generator=g).to(dtype)
    k = torch.randn(2, 40, 2, 16, generator=g).to(dtype)
    v = torch.randn(2, 40, 2, 24, generator=g).to(dtype)
    lengths = torch.tensor([40, 33])
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, lengths


class _OpsSeen(TorchDispatchMode):
    """Records the attnkern ops that run."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attnkern":
            self.names.append(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def _ops_run(fn):
    with _OpsSeen() as seen:
        fn()
    return seen.names


def _pool(q, k, v, lengths):
    return attnkern.attention_pool(q, k, v, lengths, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_gradient_takes_the_inference_op(dtype):
    q, k, v, lengths = _inputs(dtype)
    assert _ops_run(lambda: _pool(q, k, v, lengths)) == ["attention_pool_infer"]  # nothing requires grad
    qg, kg, vg, _ = _inputs(dtype, requires_grad=True)
    with torch.no_grad():
        assert _ops_run(lambda: _pool(qg, kg, vg, lengths)) == ["attention_pool_infer"]
    with torch.inference_mode():
        assert _ops_run(lambda: _pool(qg, kg, vg, lengths)) == ["attention_pool_infer"]
    offsets = torch.tensor([0, 40, 73])
    kj, vj = k.reshape(80, 2, 16)[:73], v.reshape(80, 2, 24)[:73]
    assert _ops_run(lambda: attnkern.attention_pool(q, kj, vj, offsets=offsets, backend="cpu")) == [
        "jagged_attention_pool_infer"]


def test_a_gradient_takes_the_forward_op():
    q, k, v, lengths = _inputs(requires_grad=True)
    assert _ops_run(lambda: _pool(q, k, v, lengths)) == ["attention_pool_fwd"]
    # One input that requires grad is enough.
    q, k, v, lengths = _inputs()
    v.requires_grad_(True)
    assert _ops_run(lambda: _pool(q, k, v, lengths)) == ["attention_pool_fwd"]
    # float32 has nothing to round: always the forward op.
    q, k, v, lengths = _inputs(torch.float32)
    assert _ops_run(lambda: _pool(q, k, v, lengths)) == ["attention_pool_fwd"]


def test_training_path_is_the_forward_op_bit_for_bit():
    q, k, v, lengths = _inputs(requires_grad=True)
    out = _pool(q, k, v, lengths)
    fwd, _ = torch.ops.attnkern.attention_pool_fwd(q, k, v, lengths, None, 0.25)
    assert torch.equal(out, fwd.to(q.dtype))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def test_only_the_rounding_paths_differ_from_the_forward():
    q, k, v, lengths = _inputs(N=40)
    infer, lse_i = torch.ops.attnkern.attention_pool_infer(q, k, v, lengths, None, 0.25)
    fwd, lse_f = torch.ops.attnkern.attention_pool_fwd(q, k, v, lengths, None, 0.25)
    if cpu_isa().replace("-emulated", "") in ROUNDING_ISAS:
        assert not torch.equal(infer, fwd)
        torch.testing.assert_close(infer, fwd, atol=2e-2, rtol=2e-2)
        # avx512_bf16 sums its probabilities from a shorter exp2 (relative error 7.5e-5, for P
        # that is rounded to bf16): lse within that of the forward's; amx's are the forward's.
        torch.testing.assert_close(lse_i, lse_f, atol=2e-4, rtol=1e-6)
    else:
        assert torch.equal(infer, fwd)
        assert torch.equal(lse_i, lse_f)  # the softmax statistics are the forward's
    # fp16 keeps fp32 P V on every path (no fp16 dot product on these ISAs).
    q, k, v, _ = _inputs(torch.float16, N=40)
    assert torch.equal(torch.ops.attnkern.attention_pool_infer(q, k, v, lengths, None, 0.25)[0],
                       torch.ops.attnkern.attention_pool_fwd(q, k, v, lengths, None, 0.25)[0])


def test_inference_op_thread_count_independent():
    # Few (row, head) tasks of many queries: the launcher chunks the queries, as many chunks as
    # the thread count asks for (tile_chunks_for_threads); the results must not move with it, on
    # the rounding paths and the others, with and without a score bias.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 130, 3, 16, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 600, 3, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 600, 3, 24, generator=g).to(torch.bfloat16)
    bias = torch.randn(1, 1, 3, 600, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.attnkern.attention_pool_infer(q, k, v, None, None, 0.25)
                           + torch.ops.attnkern.attention_pool_infer(q, k, v, None, None, 0.25, bias))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_inference_ops_refuse_a_gradient():
    q, k, v, lengths = _inputs(requires_grad=True)
    out, _ = torch.ops.attnkern.attention_pool_infer(q, k, v, lengths, None, 0.25)
    with pytest.raises(RuntimeError, match="has no gradient"):
        out.sum().backward()


@pytest.mark.parametrize("name", sorted(INFER_SCHEMAS))
def test_inference_op_schemas_and_opcheck(name):
    cpp = getattr(torch.ops.attnkern, name).default._schema
    assert str(cpp) == qualified(name) + INFER_SCHEMAS[name]
    q, k, v, lengths = _inputs()
    if name.startswith("jagged"):
        args = (q, k.reshape(80, 2, 16), v.reshape(80, 2, 24), torch.tensor([0, 40, 73]), -1, 0.25)
    else:
        args = (q, k, v, lengths, None, 0.25)
    torch.library.opcheck(getattr(torch.ops.attnkern, name), args)


def _graph_ops(gm) -> list:
    """The attnkern ops a graph calls (packet or overload: dynamo records the one, export the
    other)."""
    return [str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("attnkern.")]


def test_torch_compile_guards_on_the_decision():
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(_graph_ops(gm))
        return gm.forward

    compiled = torch.compile(_pool, backend=backend, fullgraph=True)
    q, k, v, lengths = _inputs(requires_grad=True)
    with torch.no_grad():
        out = compiled(q, k, v, lengths)
    assert graphs[-1] == ["attention_pool_infer"]
    with torch.no_grad():
        assert torch.equal(out, _pool(q, k, v, lengths))
    compiled(q, k, v, lengths)  # grad mode on and inputs that require grad: a new graph
    assert graphs[-1] == ["attention_pool_fwd"]
    assert len(graphs) == 2


class _Pool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16, dtype=torch.bfloat16)

    def forward(self, q, k, v, lengths):
        return attnkern.attention_pool(self.proj(q), k, v, lengths, backend="cpu")


def test_export_under_no_grad_records_the_inference_op():
    q, k, v, lengths = _inputs()
    model = _Pool()
    with torch.no_grad():
        prog = torch.export.export(model, (q, k, v, lengths))
    assert _graph_ops(prog.graph_module) == ["attention_pool_infer"]
    with torch.no_grad():
        assert torch.equal(prog.module()(q, k, v, lengths), model(q, k, v, lengths))
    # With grad mode on the parameters require grad: the forward op, as in training.
    prog = torch.export.export(model, (q, k, v, lengths))
    assert _graph_ops(prog.graph_module) == ["attention_pool_fwd"]
