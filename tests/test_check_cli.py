"""`attnkern check` and the command-line entry point."""

import subprocess
import sys

import pytest
import torch

from attnkern.tools import check, cli


@pytest.mark.slow
def test_check_passes_on_available_backends(capsys):
    assert check.main(["--quick", "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failed" in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    real_pool = check.pool_function

    def pool(backend, kw):
        if backend == "broken":  # a kernel whose output is off by 0.1
            fn = real_pool("reference", kw)
            return lambda q, k, v: (fn(q, k, v)[0] + 0.1, fn(q, k, v)[1])
        return real_pool(backend, kw)

    monkeypatch.setattr(check, "pool_function", pool)
    monkeypatch.setattr(check, "_plan", lambda b, d, t: iter([("cpu", "broken", torch.float32)]))
    assert check.main(["--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "attnkern", "--help"], capture_output=True,
                         text=True, check=True)
    assert "check" in out.stdout and "bench" in out.stdout and "train" in out.stdout


@pytest.mark.slow
def test_unknown_command_exits_nonzero():
    assert subprocess.run([sys.executable, "-m", "attnkern", "frobnicate"],
                          capture_output=True).returncode != 0
    assert cli.main([]) == 2


def test_plan_runs_the_emulated_cuda_backend_on_cpu_tensors(monkeypatch):
    # The CUDA emulation build (docs/cuda_emulation.md) registers the CUDA kernels for CPU
    # tensors: its rows must be planned on the CPU, not on a device that does not exist.
    import attnkern
    from attnkern.ops.availability import BackendInfo

    real = attnkern.backends()
    fake = dict(real, cuda=BackendInfo(available=True, reason="emulated", emulated=True))
    monkeypatch.setattr(attnkern, "backends", lambda: fake)
    plan = list(check._plan(["cuda"], ["cpu", "cuda"], [torch.float32]))
    assert plan == [("cpu", "cuda", torch.float32)]
