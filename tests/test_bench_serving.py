"""`attnkern bench --family serving` end to end on its tiny shapes (no timing asserted)."""

import pytest

import attnkern
from attnkern.tools import bench
from attnkern.tools.bench import serving

pytestmark = pytest.mark.skipif(not attnkern.backends()["cpu"].available,
                                reason="the attnkern C++ extension (CPU kernels) is not built")


def test_serving_family_runs_and_checks(tmp_path, capsys):
    rc = bench.main(["--family", "serving", "--shapes", "tiny,tiny-long", "--rounds", "1", "--dtype", "float32",
                     "--providers", "reference,sdpa,cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "attnkern cpu ISA path: " + serving.cpu_isa() in out
    for p in ("reference", "sdpa", "cpu"):
        assert "\n  %-10s" % p in out
    assert "x sdpa" in out and "/read" in out and "% peak" in out
    assert (tmp_path / "serving.md").read_text().count("(B=") == 2


def test_serving_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown serving shape"):
        serving.run(["float32"], ["cpu"], ["nope"], 1)
