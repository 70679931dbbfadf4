"""scripts/gpu_check.sh in its dry run (every step on CPU: Triton's interpreter, the cpu
backend for cuda, plain runs for the sanitizer steps), so that the plumbing of the GPU proof
(import paths, step records, JUnit XML, the summary) is tested without a GPU; and the helpers
that write JUnit XML for a step killed at its time limit."""

import glob
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
HELPER = os.path.join(ROOT, "scripts", "gpu_check.py")
STEPS = ["build", "tests-triton", "tests-backends", "tests-other", "memcheck", "synccheck",
         "initcheck", "check", "autotune", "bench", "bench-compiled"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _dry_run(out, **extra):
    return subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=_env(**extra),
                          capture_output=True, text=True, timeout=1500)


def _have_build_tools():
    return shutil.which("ninja") is not None or os.path.exists(
        os.path.join(os.path.dirname(sys.executable), "ninja"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_build_tools(), reason="ninja is not installed")
def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu"
    built = sorted(glob.glob(os.path.join(ROOT, "attnkern", "_C*.so")))
    before = [(p, os.stat(p).st_mtime_ns) for p in built]
    r = _dry_run(out)
    # its build goes into OUT: the checkout's own extension (perhaps with the CUDA kernels) stays
    assert [(p, os.stat(p).st_mtime_ns) for p in built] == before
    report = r.stdout[-4000:] + r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(statuses) == STEPS or sorted(statuses) == sorted(STEPS), (statuses, report)
    assert all(st == "pass" for st in statuses.values()), (statuses, report)
    assert summary["ok"] and not summary["failed"] and r.returncode == 0, report
    for step in summary["steps"]:
        assert 0 < step["limit_s"] and step["seconds"] <= step["limit_s"] + 20
        assert (out / step["log"]).exists()
    # one JUnit XML per test shard, each with tests that ran and none failing
    for shard in ("triton", "backends", "other"):
        root = ET.parse(out / "junit" / ("tests-%s.xml" % shard)).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert int(suite.get("tests")) >= 1 and int(suite.get("failures")) == 0
    # the case script ran the fused ops and the Triton launchers and checked them
    assert "sanitize case done: ok" in (out / "memcheck.log").read_text()
    assert "passed, 0 failed" in (out / "check.log").read_text()
    bench = json.loads((out / "bench" / "bench.json").read_text())
    # (the bench never times Triton's interpreter: it says so and goes on)
    assert {r["provider"] for r in bench} >= {"limit", "sdpa", "cpu"}
    assert "skipping triton" in (out / "bench.log").read_text()
    lines = (out / "bench" / "bench.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == bench
    compiled = json.loads((out / "bench-compiled" / "bench.json").read_text())
    assert [r["status"] for r in compiled if r["provider"] == "compile"] == ["ok"]


def test_junit_fallback_for_a_killed_step(tmp_path):
    log = tmp_path / "tests-x.log"
    log.write_text("collected 12 items\n" + "".join("line %d <&>\n" % i for i in range(300)))
    xml = tmp_path / "tests-x.xml"
    subprocess.run([sys.executable, HELPER, "junit-fallback", str(xml), "tests-x", "timeout",
                    str(log)], check=True)
    root = ET.parse(xml).getroot()
    case = root.find("testsuite").find("testcase")
    failure = case.find("failure")
    assert "timeout" in failure.get("message") and "line 299 <&>" in failure.text
    # the record of that step carries the JUnit counts and the log's end into the summary
    out = tmp_path / "out"
    subprocess.run([sys.executable, HELPER, "record", str(out), "tests-x", "timeout", "200",
                    "200", str(log), str(xml)], check=True)
    summary = json.loads((out / "summary.json").read_text())
    step = summary["steps"][0]
    assert step["status"] == "timeout" and step["failures"] == 1 and step["tests"] == 1
    assert "line 299" in step["log_tail"]
    assert summary["failed"] == ["tests-x"] and not summary["ok"]
