"""`attnkern bench --family serving` end to end on its tiny shapes (no timing asserted)."""

import pytest

import attnkern
from attnkern.tools import bench
from attnkern.tools.bench import serving

pytestmark = pytest.mark.skipif(not attnkern.backends()["cpu"].available,
                                reason="the attnkern C++ extension (CPU kernels) is not built")


def test_serving_family_runs_and_checks(tmp_path, capsys):
    rc = bench.main(["--family", "serving", "--shapes", "tiny,tiny-long", "--rounds", "1", "--dtype", "float32",
                     "--providers", "reference,sdpa,cpu,cpu-train,int8,fp8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "attnkern cpu ISA path: " + serving.cpu_isa() in out
    for p in ("reference", "sdpa", "cpu", "cpu-train", "int8", "fp8"):
        assert "\n  %-10s" % p in out
    assert "x sdpa" in out and "/read" in out and "% peak" in out and "% bf16 GEMM" in out
    # the quantized providers are also timed against a read of their own bytes
    assert out.count("/own read") == 4
    assert (tmp_path / "serving.md").read_text().count("(B=") == 2


def test_serving_peak_is_the_faster_gemm():
    # The roof of bfloat16 inputs is a bfloat16 GEMM where the CPU runs one faster than float32
    # (AVX512-BF16, AMX), else the float32 one; float32 inputs always get the float32 GEMM.
    g32, d32 = serving.measure_peak("float32", rounds=1)
    assert d32 == "float32" and g32 > 0
    g16, d16 = serving.measure_peak("bfloat16", rounds=1)
    assert d16 in ("float32", "bfloat16") and g16 > 0


def test_serving_bf16_line_names_its_peak(capsys):
    assert serving.run(["bfloat16"], ["sdpa", "cpu"], ["tiny"], 1) == 0
    out = capsys.readouterr().out
    assert "GEMM peak" in out and ("(bfloat16)" in out or "(float32)" in out)


def test_serving_cpu_providers_take_the_inference_and_training_paths(monkeypatch):
    # "cpu" is the inference op (as a serving stack calls it), "cpu-train" the forward op.
    import torch

    seen = []
    for name in ("attention_pool_infer", "attention_pool_fwd"):
        op = getattr(torch.ops.attnkern, name)
        monkeypatch.setattr(torch.ops.attnkern, name, lambda *a, _op=op, _n=name: seen.append(_n) or _op(*a))
    q, k, v = serving.make_inputs(serving.TINY_SHAPES["tiny"], torch.bfloat16)
    serving.provider_fn("cpu", q, k, v)()
    serving.provider_fn("cpu-train", q, k, v)()
    assert seen == ["attention_pool_infer", "attention_pool_fwd"]


def test_serving_quantized_provider_reads_its_rows_and_parameters():
    import torch

    q, k, v = serving.make_inputs(serving.TINY_SHAPES["tiny"], torch.float32)
    f = serving.provider_fn("int8", q, k, v)
    # int8 K and V plus a float32 scale and bias per row
    assert f.kv_bytes == 2 * (k.numel() + 8 * k[..., 0].numel())
    kd, vd = f.dequantized
    assert (kd - k).abs().max() < 0.05 and (vd - v).abs().max() < 0.05
    assert f().shape == q.shape


def test_serving_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown serving shape"):
        serving.run(["float32"], ["cpu"], ["nope"], 1)
