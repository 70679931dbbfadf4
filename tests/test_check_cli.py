"""`attnkern check` and the command-line entry point."""

import subprocess
import sys

import torch

from attnkern import check, cli


def test_check_passes_on_available_backends(capsys):
    assert check.main(["--quick", "--dtype", "float32", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "0 failed" in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    real_run = check._run

    def run(backend, args, kw, go):
        if backend == "broken":  # a kernel whose output is off by 0.1
            res = real_run("reference", args, kw, go)
            res[0] = res[0] + 0.1
            return res
        return real_run(backend, args, kw, go)

    monkeypatch.setattr(check, "_run", run)
    monkeypatch.setattr(check, "_plan", lambda b, d, t: iter([("cpu", "broken", torch.float32)]))
    assert check.main(["--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "attnkern", "--help"], capture_output=True,
                         text=True, check=True)
    assert "check" in out.stdout and "bench" in out.stdout and "train" in out.stdout


def test_unknown_command_exits_nonzero():
    assert subprocess.run([sys.executable, "-m", "attnkern", "frobnicate"],
                          capture_output=True).returncode != 0
    assert cli.main([]) == 2
