"""The benchmark code cannot rot: `attnkern bench` runs end to end on the tiny case and writes
its JSON, CSV, markdown and PNG; the pytest-benchmark suite runs its tiny cases once; the case
set covers the shapes benchmarks/README.md promises; and one flag, --family, reaches every
family. No timing is ever asserted."""

import json
import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_main_writes_json_csv_md_png(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench.main(["--shapes", "tiny", "--budget", "0", "--providers", "reference,sdpa,compile",
                     "--out", str(out)])
    assert rc == 0
    records = json.loads((out / "bench.json").read_text())
    cases = {(r["shape"]["name"], r["mode"]) for r in records}
    assert cases == {("tiny", "fwd"), ("tiny", "fwd+bwd")}
    for mode in bench.MODES:
        by_provider = {r["provider"]: r for r in records if r["mode"] == mode}
        assert set(by_provider) == {"limit", "reference", "sdpa", "compile"}
        for p in ("reference", "sdpa", "compile"):
            r = by_provider[p]
            assert r["status"] == "ok" and r["check"] == "ok", r
            assert r["median_ms"] > 0 and r["gbps"] > 0 and r["frac_of_limit"] > 0
            assert set(r["speedup_vs"]) == {"reference", "sdpa", "compile"}
            assert r["key"] == "attention_pool/%s/%s/tiny-uniform/float32/cpu/%s" % (
                p, mode, r["attnkern_version"])
            for k in ("B", "N", "H", "L", "Dk", "Dv", "layout", "lengths"):
                assert k in r["shape"]
            for k in ("dtype", "device", "device_name", "torch_version", "attnkern_version"):
                assert r[k]
        assert by_provider["compile"]["compile_s"] >= 0
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "bench.csv").read_text().startswith("key,op,provider")
    assert "| tiny | uniform | float32 | fwd | reference |" in (out / "bench.md").read_text()
    printed = capsys.readouterr().out
    assert "tiny uniform float32 fwd+bwd" in printed and "sdpa" in printed


def test_bench_help_lists_every_family(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--family {op,activation,layer,serving,sequence}" in text
    for family in ("op:", "activation: activation_unit_pool", "layer:", "serving:"):
        assert family in text


@pytest.mark.parametrize("argv, family, rest", [
    (["--family", "activation", "--quick"], "activation", ["--quick"]),
    (["--quick", "--family=activation"], "activation", ["--quick"]),
    (["--op", "activation_unit_pool", "--quick"], "activation", ["--quick"]),
    (["--family", "serving", "--rounds", "1"], "serving", ["--rounds", "1"]),
])
def test_bench_family_reaches_its_own_parser(monkeypatch, argv, family, rest):
    """--family activation|serving (and the older --op activation_unit_pool) hand the rest of
    the command line to that family's own main."""
    from attnkern.tools.bench import activation, serving

    calls = []
    monkeypatch.setattr(activation, "main", lambda a: calls.append(("activation", a)) or 0)
    monkeypatch.setattr(serving, "main", lambda a: calls.append(("serving", a)) or 0)
    assert bench.main(argv) == 0
    assert calls == [(family, rest)]


def test_bench_refuses_an_op_that_contradicts_the_family(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--op", "activation_unit_pool", "--family", "layer"])
    assert e.value.code == 2
    assert "--op activation_unit_pool is --family activation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--family", "nope"])


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "float8"])
    with pytest.raises(SystemExit):
        bench.main(["--providers", "nope"])


def test_bias_case_checks_every_provider():
    """The tiny shape with a score bias: the fused op, the eager reference, SDPA (a float mask)
    and torch.compile agree with the oracle, forward and backward; a provider that drops the
    bias does not."""
    providers = ["reference", "sdpa"] + (["cpu"] if attnkern.backends()["cpu"].available else [])
    for mode in ("fwd+bwd", "fwd"):
        setup = bench.setup_case(bench.Case(bench.SHAPES["tiny_bias"], "uniform", "float32", mode))
        assert setup.inputs.bias is not None
        for provider in providers:
            assert setup.check(setup.callable(provider)())[0], provider
    plain = bench.setup_case(bench.Case(bench.SHAPES["tiny"], "uniform", "float32", "fwd"))
    assert not setup.check(plain.callable("reference")())[0]


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_oracle_flags_a_wrong_provider(layout):
    name = "tiny" if layout == "padded" else "tiny_jagged"
    setup = bench.setup_case(bench.Case(bench.SHAPES[name], "uniform", "float32", "fwd+bwd"))
    outputs = setup.callable("reference")()
    assert setup.check(outputs)[0]
    out, dq, dk, dv = outputs
    assert not setup.check((out, dq, dk, dv * 1.1))[0]
    # Empty rows are not compared: SDPA gives NaN there.
    empty = ~setup.inputs.nonempty
    assert bool(empty.any())
    assert setup.check((out.masked_fill(empty[:, None, None, None], float("nan")), dq, dk, dv))[0]


def test_case_sets_cover_the_issue_shapes():
    full = {(c.shape.B, c.shape.H, c.shape.L, c.shape.Dk, c.shape.N, c.shape.layout)
            for c in bench.full_cases()}
    for shape in [(1024, 1, 50, 64, 1, "padded"), (1024, 1, 200, 64, 1, "padded"),
                  (256, 4, 1000, 32, 1, "padded"), (4096, 1, 100, 128, 1, "padded"),
                  (256, 1, 200, 64, 64, "padded"), (1024, 1, 200, 64, 1, "jagged")]:
        assert shape in full
    combos = {(c.lengths, c.dtype, c.mode) for c in bench.full_cases()}
    assert combos == {(ln, dt, m) for ln in ("uniform", "full") for dt in ("float32", "bfloat16")
                      for m in ("fwd", "fwd+bwd")}
    assert {c.mode for c in bench.quick_cases()} == {"fwd", "fwd+bwd"}


def test_bytes_model():
    shape = bench.SHAPES["b1024_l50_d64"]
    fwd = bench.Case(shape, "full", "bfloat16", "fwd")
    inp = bench.make_inputs(fwd)
    assert inp.total_len == 1024 * 50
    valid_kv = 1024 * 50 * 1 * (64 + 64) * 2
    q_and_o = 1024 * 1 * 1 * (64 + 64) * 2
    assert bench.bytes_moved(fwd, inp.total_len) == valid_kv + q_and_o
    assert bench.bytes_moved(bench.Case(shape, "full", "bfloat16", "fwd+bwd"), inp.total_len) == \
        3 * (valid_kv + q_and_o)
    assert bench.flops(fwd, inp.total_len) == 2 * (64 + 64) * 1024 * 50
    # with padding, the backward still writes the whole dK/dV (zeros at padded positions)
    uni = bench.Case(shape, "uniform", "bfloat16", "fwd+bwd")
    n = bench.make_inputs(uni).total_len
    assert n < 1024 * 50
    kv = n * (64 + 64) * 2
    assert bench.bytes_moved(uni, n) == (kv + q_and_o) + (kv + 2 * q_and_o) + 1024 * 50 * (64 + 64) * 2


def test_jagged_inputs_pack_the_padded_lengths():
    padded = bench.make_inputs(bench.Case(bench.SHAPES["b1024_l200_d64"], "uniform", "float32", "fwd"))
    jagged = bench.make_inputs(bench.Case(bench.SHAPES["jagged_b1024_l200_d64"], "uniform", "float32", "fwd"))
    assert padded.lengths.tolist() == jagged.lengths.tolist()
    assert jagged.key.shape == (padded.total_len, 1, 64)
    assert jagged.offsets[-1].item() == padded.total_len


@pytest.mark.slow
def test_pytest_benchmark_suite_runs_tiny_cases():
    # torch.compile is exercised by test_bench_main_writes_json_csv_md_png; skipping it here
    # keeps this run to a few seconds.
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-k", "tiny and not compile", "--benchmark-disable", "-q",
         "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout


def test_bench_exits_nonzero_when_a_provider_mismatches(tmp_path, monkeypatch, capsys):
    from attnkern.tools.bench import providers

    real = providers.make_callable

    def wrong_reference(provider, inp):
        fn = real(provider, inp)
        if provider != "reference":
            return fn
        # every output 10% off: the oracle must flag it and the command must fail
        return lambda: tuple(t * 1.1 for t in fn()) if inp.case.mode == "fwd+bwd" else fn() * 1.1

    monkeypatch.setattr(providers, "make_callable", wrong_reference)
    rc = bench.main(["--shapes", "tiny", "--budget", "0", "--providers", "reference,sdpa",
                     "--no-plot", "--out", str(tmp_path / "bench")])
    assert rc != 0
    assert "mismatches or errors" in capsys.readouterr().err
    records = json.loads((tmp_path / "bench" / "bench.json").read_text())
    checks = {(r["provider"], r["mode"]): r.get("check") for r in records if r["provider"] != "limit"}
    assert checks == {("reference", "fwd"): "MISMATCH", ("reference", "fwd+bwd"): "MISMATCH",
                      ("sdpa", "fwd"): "ok", ("sdpa", "fwd+bwd"): "ok"}


def test_bench_streams_every_case_and_compiles_once_per_run(tmp_path, monkeypatch):
    # torch.compile replaced by a counter (eager): the compile provider's wrapper is made once
    # for the whole run, not once per case (each shape then compiles once, under guards).
    from attnkern.tools.bench import providers

    calls = []

    def fake_compile(fn, **kw):
        calls.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(providers, "_COMPILED", {})
    out = tmp_path / "bench"
    seen = []
    real_run_case = bench.run_case

    def run_case(*a, **kw):
        # every case before this one is already on disk, in bench.jsonl and bench.json
        if seen:
            lines = (out / "bench.jsonl").read_text().splitlines()
            assert len(lines) == len(seen)
            assert json.loads((out / "bench.json").read_text()) == [json.loads(x) for x in lines]
        recs = real_run_case(*a, **kw)
        seen.extend(recs)
        return recs

    monkeypatch.setattr(bench, "run_case", run_case)
    rc = bench.main(["--shapes", "tiny,tiny_jagged", "--budget", "0", "--providers",
                     "compile,sdpa", "--out", str(out), "--no-plot"])
    assert rc == 0
    records = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert records == json.loads((out / "bench.json").read_text()) and len(records) == len(seen)
    assert len({(r["shape"]["name"], r["mode"]) for r in records}) == 4
    assert len(calls) == 1


def test_layer_family_runs_and_checks(tmp_path, capsys):
    """`attnkern bench --family layer` on a tiny shape: every provider agrees with the layer
    (same weights), and the records and tables are written."""
    out = tmp_path / "layer"
    rc = bench.main(["--family", "layer", "--layer-shape", "8,8,2,6,1", "--layer-shape",
                     "8,8,2,6,3", "--no-model", "--rounds", "1", "--out", str(out)])
    assert rc == 0
    records = json.loads((out / "layer.json").read_text())
    from attnkern.tools.bench import layers

    assert {(r["provider"], r["mode"]) for r in records} == {
        (p, m) for p in layers.LAYER_PROVIDERS for m in layers.MODES}
    assert all(r["max_abs_err"] <= 1e-5 and r["ms"] > 0 for r in records)
    assert {r["order"] for r in records if r["provider"] == "attnkern"} == {"absorbed"}
    assert "auto order" in (out / "layer.md").read_text()
    assert rc == 0 and "Layer fwd+bwd" in capsys.readouterr().out


def test_model_step_providers_train():
    """One step of each model provider at a tiny shape lowers nothing to NaN and changes the
    weights; the eager layer really is in the model."""
    from attnkern.tools.bench import layers

    shape = layers.LayerShape(16, 8, 2, 6, 1)
    for provider in layers.MODEL_PROVIDERS:
        model = layers.make_model(provider, shape, items=50)
        assert isinstance(model.pool, layers.EagerTargetAttention) == (provider == "eager")
        step = layers.model_step_callable(provider, shape, items=50)
        assert torch.isfinite(step())


def test_bad_layer_shape(capsys):
    assert bench.main(["--family", "layer", "--layer-shape", "8,8,3,6,1"]) == 2
    assert "H dividing E" in capsys.readouterr().err
