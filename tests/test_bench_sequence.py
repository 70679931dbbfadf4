"""`attnkern bench --family sequence` cannot rot: it runs end to end on the tiny cases, checks
every provider against the float64 reference (and flags a wrong one), covers the shapes
docs/benchmarks.md promises, and is reached through --family. No timing is asserted."""

import json

import pytest
import torch

from attnkern.tools import bench
from attnkern.tools.bench import sequence


def test_sequence_family_runs_and_checks(tmp_path, capsys):
    out = tmp_path / "seq.json"
    rc = sequence.main(["--quick", "--providers", "eager,sdpa,sdpa_causal,sdpa_rows,reference,cpu",
                        "--rounds", "1", "--out", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert {r["case"] for r in records} == {c.id for c in sequence.make_cases("quick")}
    ran = [r for r in records if r["status"] == "ok"]
    for r in ran:
        assert r["check"] in ("ok", "n/a (other mask)") and r["median_ms"] > 0 and r["gflops"] > 0, r
    assert {(r["provider"], r["normalization"]) for r in ran} >= {
        ("eager", "silu"), ("eager", "softmax"), ("sdpa", "softmax"), ("sdpa_rows", "softmax"),
        ("reference", "silu"), ("reference", "softmax")}
    # SiLU has no SDPA; the causal-only SDPA takes no bias: skipped with the reason.
    assert all(r["status"] == "skipped" for r in records
               if r["provider"].startswith("sdpa") and r["normalization"] == "silu")
    assert all(r["peak_gflops"] > 0 for r in records)
    assert "GFLOP/s" in capsys.readouterr().out


def test_peak_is_measured_in_the_case_dtype():
    # bf16 cases are measured against a bf16 torch.mm, float32 ones against a float32 one
    assert sequence.measure_peak("bfloat16", 64) > 0 and sequence.measure_peak("float32", 64) > 0


@pytest.mark.parametrize("bias", [False, True])
def test_oracle_flags_a_wrong_provider(bias):
    case = sequence.Case(3, 9, 2, 8, "float32", bias, 2, "softmax", "fwd+bwd")
    inp = sequence.Inputs(case)
    want = sequence.oracle(inp, case.mode)
    for p in ("eager", "sdpa", "sdpa_rows"):
        out, grads = sequence.wrap(sequence.make_fn(p, inp), inp, case.mode)()
        assert sequence.check((out, grads), want, "float32")[0], p
        assert not sequence.check((out, grads[:-1] + (grads[-1] * 1.1,)), want, "float32")[0], p
        assert not sequence.check((out * 1.01, grads), want, "float32")[0], p


def test_grids_cover_the_issue_shapes():
    full = sequence.make_cases("full")
    got = {(c.B, c.L, c.H, c.D, c.dtype, c.bias, c.targets, c.mode) for c in full}
    for L in (200, 1000):
        for dt in ("float32", "bfloat16"):
            for bias in (False, True):
                for t in (1, 16):
                    for mode in ("fwd", "fwd+bwd"):
                        assert (128, L, 2, 64, dt, bias, t, mode) in got
    serving = sequence.make_cases("serving")
    assert {(c.B, c.L, c.targets, c.full_rows, c.mode) for c in serving} == {(1, 3072, 1024, True, "fwd")}


def test_sequence_family_is_reached_and_rejects_bad_arguments(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sequence, "main", lambda a: calls.append(a) or 0)
    assert bench.main(["--family", "sequence", "--quick"]) == 0
    assert calls == [["--quick"]]
    monkeypatch.undo()
    for argv in (["--providers", "nope"], ["--dtype", "float8"], ["--rounds", "0"]):
        with pytest.raises(SystemExit):
            sequence.main(argv)
