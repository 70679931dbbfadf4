"""The shipped Triton launch configs compile for sm_90 (H100/H200) without register spills and
within the 227 KB of shared memory a block may have. No GPU needed: Triton compiles ahead of
time for GPUTarget("cuda", 90, 128) with the ptxas it ships (attnkern.triton_kernels.aot).

The representative subset (attnkern.triton_kernels.aot.representative_variants: 44 variants,
the extreme kept configs and the untuned defaults of each kernel, 16-bit and float32, for the
tl.dot and broadcast paths) is compiled in a subprocess with TRITON_INTERPRET unset (the
interpreter replaces the kernels) into a persistent Triton cache (with the ptxas numbers kept
beside it, so a rerun assembles nothing).
Every shipped variant: `python -m attnkern.triton_kernels.aot --all --jobs N`.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("ATTNKERN_AOT_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "attnkern", "triton-sm90"))


def _has_nvidia_backend():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend (ptxas)")
def test_shipped_configs_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = CACHE
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "attnkern.triton_kernels.aot", "--json", str(out),
                        "--jobs", str(min(4, os.cpu_count() or 1))],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    report = r.stdout[-6000:] + r.stderr[-3000:]
    assert out.exists(), report
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 40, report
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"fwd", "dq", "dkdv"}
    assert {row["dtype"] for row in rows} >= {"float16", "float32"}
    assert any(row["block_n"] >= 16 for row in rows) and any(row["block_n"] == 1 for row in rows)
    for row in rows:
        assert row["n_regs"] > 0, "ptxas report missing for %s\n%s" % (row["name"], report)
    spills = [(row["name"], row["n_spills"]) for row in rows if row["n_spills"] != 0]
    assert not spills, "register spills: %s" % spills
    over = [(row["name"], row["shared"]) for row in rows if row["shared"] > 227 * 1024]
    assert not over, "shared memory over 227 KB: %s" % over
    # every shipped config is one the cost model admits (the model is what prunes at launch)
    assert all(row["fits"] for row in rows), [row["name"] for row in rows if not row["fits"]]
    assert r.returncode == 0, report
