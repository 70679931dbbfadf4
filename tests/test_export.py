"""Export for serving: AOTInductor packages and ONNX graphs, reloaded and compared with eager.

The ONNX translation of the ops is checked op by op in onnxruntime (both exporters, every
layout, empty rows), the models through `check_export`, which runs them in a fresh process
that imports no attnkern Python code, at two shapes other than the traced example (B = 1 and
another B, N, L: the dynamic dimensions). Those runs (subprocesses, and AOTInductor compiles
of 30-40 s each on 2 cores) are marked slow; the AOTInductor tests share one compiled package
where they can.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnkern
from attnkern.testing import random_problem
from attnkern.tools import export as ex

try:  # the export extra, part of the test extra; the AOTInductor tests need none of it
    import onnx
    import onnxruntime as ort
    import onnxscript  # noqa: F401
except ImportError:  # pragma: no cover - depends on the install
    onnx = ort = None
needs_onnx = pytest.mark.skipif(ort is None, reason="the export extra is not installed: "
                                "pip install 'attnkern[export]'")

pytestmark = pytest.mark.skipif(
    not attnkern.backends()["cpu"].available,
    reason="the attnkern C++ extension (CPU kernels) is not built",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Pool(torch.nn.Module):
    """attention_pool with return_lse, as a module to export; `layout` picks the keyword."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout

    def forward(self, q, k, v, extra=None):
        kw = {"lengths": {"lengths": extra}, "mask": {"mask": extra}, "jagged": {"offsets": extra},
              "full": {}}[self.layout]
        return attnkern.attention_pool(q, k, v, return_lse=True, **kw)


def _problem(layout, dtype, B, L, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[L, 0, 1, L // 2 + 1][i % 4] for i in range(B)])
    q, k, v, kw = random_problem(B, 3, 2, L, 8, 6, layout, lengths, generator=g, dtype=dtype,
                                 extra_rows=2)
    kw.pop("max_length", None)
    return (q, k, v) + tuple(kw.values()), lengths


def _axes(layout):
    """Dynamic axes of each input, by name: b = batch, l = history, t = jagged total."""
    kv = {0: "t"} if layout == "jagged" else {0: "b", 1: "l"}
    axes = {"q": {0: "b"}, "k": kv, "v": kv}
    if layout != "full":
        axes["extra"] = {"lengths": {0: "b"}, "mask": {0: "b", 1: "l"},
                         "jagged": {0: "b+1"}}[layout]
    return axes


def _export_pool(module, args, layout, exporter, path):
    from attnkern.ops import onnx_translation as tr

    axes = _axes(layout)
    names = list(axes)
    if exporter == "dynamo":
        dims = {n: torch.export.Dim(n, min=1) for n in "blt"}
        dims["b+1"] = dims["b"] + 1
        ds = {n: {a: dims[d] for a, d in ax.items()} for n, ax in axes.items()}
        torch.onnx.export(module, args, path, dynamo=True, dynamic_shapes=ds, input_names=names,
                          opset_version=tr.OPSET, custom_translation_table=tr.translation_table())
    else:
        tr.register_torchscript_symbolics()
        axes.update({"out": {0: "b"}, "lse": {0: "b"}})
        torch.onnx.export(module, args, path, dynamo=False, opset_version=tr.OPSET,
                          input_names=names, output_names=["out", "lse"], dynamic_axes=axes)
    return names


# Every layout on both exporters in float32; float64 (accumulated in float64) on one.
TRANSLATION_CASES = [(e, layout, torch.float32) for e in ex.EXPORTERS
                     for layout in ("lengths", "mask", "jagged", "full")]
TRANSLATION_CASES += [("dynamo", "lengths", torch.float64), ("torchscript", "mask", torch.float64)]
# The dynamo exporter takes about a second a case: the fast subset keeps one of them.
TRANSLATION_PARAMS = [
    pytest.param(e, lay, d, id="%s-%s-%s" % (e, lay, str(d)[6:]),
                 marks=[pytest.mark.slow] if e == "dynamo" and (lay, d) != ("lengths", torch.float32) else [])
    for e, lay, d in TRANSLATION_CASES]


@needs_onnx
@pytest.mark.parametrize("exporter,layout,dtype", TRANSLATION_PARAMS)
def test_onnx_translation_matches_op(tmp_path, exporter, layout, dtype):
    module = _Pool(layout)
    args, _ = _problem(layout, dtype, 3, 7, seed=0)
    path = str(tmp_path / "pool.onnx")
    names = _export_pool(module, args, layout, exporter, path)
    graph = onnx.load(path).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, "non-standard ops in the graph"
    assert not any(n.op_type.startswith("attention") for n in graph.node)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for B, L, seed in ((1, 9, 1), (5, 4, 2)):  # other B and L than the traced example
        args, lengths = _problem(layout, dtype, B, L, seed)
        out, lse = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
        want_out, want_lse = module(*args)
        assert out.dtype == want_out.numpy().dtype and lse.dtype == np.float32
        np.testing.assert_allclose(out, want_out.numpy(), atol=tol, rtol=tol * 10)
        np.testing.assert_allclose(lse, want_lse.numpy(), atol=1e-5, rtol=1e-5)
        if layout in ("lengths", "jagged") and B > 1:
            assert (out[1] == 0).all() and np.isneginf(lse[1]).all(), "empty row: 0 and -inf"


def _cfg(model, **kw):
    return ex.ModelConfig(model=model, embed_dim=16, num_heads=2, num_items=50, **kw)


def _assert_checked(records):
    assert len(records) == len(ex.CHECK_SHAPES)
    for r in records:
        assert r["ok"], r
        assert r["attnkern_imported"] is False
    sizes = {(r["shape"]["batch"], r["shape"]["history"]) for r in records}
    assert len({b for b, _ in sizes}) == 2 and len({l for _, l in sizes}) == 2


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("model", ex.MODELS)
def test_onnx_model_fresh_process(tmp_path, model):
    m = ex.build_model(_cfg(model))
    path = ex.export_onnx(m, str(tmp_path / "m.onnx"))
    _assert_checked(ex.check_export("onnx", path, m))


@needs_onnx
@pytest.mark.slow
def test_onnx_torchscript_exporter_model(tmp_path):
    m = ex.build_model(_cfg("target_attention_ctr"))
    path = ex.export_onnx(m, str(tmp_path / "m.onnx"), exporter="torchscript")
    _assert_checked(ex.check_export("onnx", path, m))


@needs_onnx
@pytest.mark.slow
def test_check_catches_a_different_model(tmp_path):
    # The check must be able to fail: other weights give other logits.
    m = ex.build_model(_cfg("target_attention_ctr"))
    path = ex.export_onnx(m, str(tmp_path / "m.onnx"))
    other = ex.build_model(_cfg("target_attention_ctr", seed=1))
    assert not any(r["ok"] for r in ex.check_export("onnx", path, other))


@needs_onnx
@pytest.mark.slow
def test_cli_onnx_from_checkpoint(tmp_path):
    trained = attnkern.models.TargetAttentionCTR(40, embed_dim=8, num_heads=2, mlp_dims=(8,))
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": trained.state_dict(),
                "config": {"embed_dim": 8, "num_heads": 2, "mlp_dims": [8],
                           "pooling": "attention"}},
               ckpt)
    out = tmp_path / "ctr.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "attnkern", "export", "--format", "onnx",
                          "--model", "target_attention_ctr", "--checkpoint", str(ckpt),
                          "--out", str(out), "--check"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" ok") == len(ex.CHECK_SHAPES)
    # The export holds the checkpoint's weights.
    inp = ex.make_inputs(trained.eval(), ex.Shape(2, 3, 5))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(inp.names, inp.flat())})[0]
    np.testing.assert_allclose(got, trained(*inp.args).detach().numpy(), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_aoti_time_aware_ctr_fresh_process(tmp_path):
    # The time-aware model: times as two more inputs, the bias built in the graph (buckets,
    # the tables' lookup) and passed to the fused op.
    m = ex.build_model(_cfg("target_attention_ctr", time_buckets=16, recency_buckets=8))
    assert m.uses_times and ex.make_inputs(m, ex.EXAMPLE).names[3:] == ("history_times", "target_time")
    path = ex.export_aoti(m, str(tmp_path / "ctr.pt2"))
    _assert_checked(ex.check_export("aoti", path, m))


@needs_onnx
@pytest.mark.slow
def test_cli_onnx_time_aware_ctr(tmp_path, capsys):
    out = tmp_path / "ctr.onnx"
    assert ex.main(["--format", "onnx", "--model", "target_attention_ctr", "--time-bias", "16",
                    "--recency-bias", "8", "--embed-dim", "16", "--num-items", "50",
                    "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert text.count(" ok") == len(ex.CHECK_SHAPES) and "history_times" in text
    # The bias reaches the scores: the graph tiles it over the queries and adds it.
    assert "Tile" in {n.op_type for n in onnx.load(str(out)).graph.node}


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        ex.build_model(ex.ModelConfig(model="din"))
    m = ex.build_model(_cfg("attention_pooling"))
    with pytest.raises(ValueError, match="exporter must be one of"):
        ex.export_onnx(m, "unused.onnx", exporter="jit")
    with pytest.raises(ValueError, match="checkpoint"):
        ex.build_model(_cfg("attention_pooling", checkpoint="x.pt"))
    with pytest.raises(ValueError, match="tables are for target_attention_ctr"):
        ex.build_model(_cfg("attention_pooling", time_buckets=4))
    with pytest.raises(SystemExit) as e:
        ex.main(["--format", "onnx", "--model", "attention_pooling", "--time-bias", "--out", "unused.onnx"])
    assert e.value.code == 2


@pytest.mark.parametrize("example, absorbed", [(ex.Shape(3, 2, 7), True), (ex.Shape(2, 256, 64), False)])
def test_export_order_follows_the_example(monkeypatch, example, absorbed):
    # absorb="auto" under torch.export decides from the traced example's N and L (their hints,
    # no guard): few candidates, absorbed; a serving example with many candidates, projected,
    # the order eager takes there. N and L stay dynamic either way.
    from attnkern.nn import AttentionPooling

    m = AttentionPooling(32, 2).eval()
    seen = []
    real = AttentionPooling.uses_absorbed_order

    def spy(self, n, length):
        seen.append(real(self, n, length))
        return seen[-1]

    monkeypatch.setattr(AttentionPooling, "uses_absorbed_order", spy)
    ep = ex.export_program(m, ex.make_inputs(m, example))
    assert seen and all(a == absorbed for a in seen)
    assert real(m, example.candidates, example.history) == absorbed  # eager's choice at that shape
    monkeypatch.setattr(AttentionPooling, "uses_absorbed_order", real)
    for shape in (ex.Shape(2, 1, 5), ex.Shape(4, 300, 9)):  # other N and L: still dynamic
        inp = ex.make_inputs(m, shape, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*inp.args, **inp.kwargs), m(*inp.args, **inp.kwargs),
                                       atol=1e-5, rtol=1e-4)


def test_example_shape_option():
    assert ex.example_shape(ex.Shape(1, 1024, 2048)) == ex.Shape(2, 1024, 2048)  # B = 1 would pin B
    assert ex._parse_shape("1,1024,2048") == ex.Shape(1, 1024, 2048)
    for bad in ("1,2", "a,b,c", "0,4,7"):
        with pytest.raises(ValueError, match="--example-shape"):
            ex._parse_shape(bad)
    with pytest.raises(SystemExit) as e:  # the command line: usage and the message, exit 2
        ex.main(["--format", "onnx", "--out", "unused.onnx", "--example-shape", "1,0,5"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- AOTInductor


@pytest.fixture(scope="module")
def ctr_package(tmp_path_factory):
    """One compiled AOTInductor package of a small TargetAttentionCTR, shared by the tests."""
    m = ex.build_model(_cfg("target_attention_ctr"))
    path = ex.export_aoti(m, str(tmp_path_factory.mktemp("aoti") / "ctr.pt2"))
    return m, path


@pytest.mark.slow
def test_aoti_ctr_fresh_process(ctr_package):
    m, path = ctr_package
    _assert_checked(ex.check_export("aoti", path, m))


@pytest.mark.slow
def test_aoti_attention_pooling_fresh_process(tmp_path):
    m = ex.build_model(_cfg("attention_pooling"))
    path = ex.export_aoti(m, str(tmp_path / "pool.pt2"))
    _assert_checked(ex.check_export("aoti", path, m))


@pytest.mark.slow
def test_aoti_quantized_ctr_fresh_process(tmp_path):
    # A model serving from an int8 item table: the package calls the quantized-K/V op itself
    # (no dequantized copy of the history in the graph) and matches eager in a fresh process.
    m = ex.build_model(_cfg("target_attention_ctr"))
    m.quantize_(torch.int8)
    path = ex.export_aoti(m, str(tmp_path / "q.pt2"))
    code = ex.export_program(m).graph_module.print_readable(print_output=False)
    assert "torch.ops.attnkern.attention_pool_quant_fwd" in code
    _assert_checked(ex.check_export("aoti", path, m))


@needs_onnx
@pytest.mark.slow
def test_serving_latency_smoke(ctr_package, tmp_path):
    from attnkern.tools.bench import serving_latency as lat

    m, pt2 = ctr_package
    onnx_path = ex.export_onnx(m, str(tmp_path / "ctr.onnx"))
    inputs = ex.make_inputs(m, ex.Shape(1, 8, 16), lengths=[16])
    with torch.inference_mode():
        fns = lat.build_providers(m, inputs, pt2, onnx_path)
        ref = fns["eager"]()
        for fn in fns.values():
            torch.testing.assert_close(fn(), ref, atol=1e-5, rtol=1e-4)
        results = lat.measure(fns, iters=3, warmup=1)
    assert set(results) == set(lat.PROVIDERS)
    for r in results.values():
        assert r["calls"] == 3 and 0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"]


def _libpython():
    import sysconfig

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    path = os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME"))
    return path if os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_libpython() is None, reason="this Python has no shared libpython to preload")
def test_cpp_serving_example(ctr_package, tmp_path):
    # examples/serve_aoti.cpp: the package served from C++ with no interpreter, as docs/export.md
    # describes; its logits must be eager's on the same (deterministic) inputs.
    m, pt2 = ctr_package
    tlib = os.path.join(os.path.dirname(torch.__file__), "lib")
    tinc = os.path.join(os.path.dirname(torch.__file__), "include")
    exe = str(tmp_path / "serve_aoti")
    build = subprocess.run(
        ["g++", "-std=c++20", "-O0", os.path.join(ROOT, "examples", "serve_aoti.cpp"),
         "-I" + tinc, "-I" + os.path.join(tinc, "torch", "csrc", "api", "include"),
         "-L" + tlib, "-Wl,-rpath," + tlib, "-ltorch", "-ltorch_cpu", "-lc10", "-o", exe],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    B, N, L = 3, 4, 9
    env = dict(os.environ, LD_LIBRARY_PATH=tlib, LD_PRELOAD=_libpython())
    res = subprocess.run([exe, pt2, ex.op_library(), str(B), str(N), str(L)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.tensor([float(x) for x in res.stdout.split()]).reshape(B, N)
    history = torch.arange(B * L).reshape(B, L) % 40 + 1
    target = torch.arange(B * N).reshape(B, N) * 7 % 40 + 1
    lengths = torch.full((B,), L // 2 + 1)
    lengths[0], lengths[1] = L, 0
    with torch.inference_mode():
        want = m(history, target, lengths)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
