"""Serving latency of the exported `TargetAttentionCTR`: eager, AOTInductor, onnxruntime.

One request: B users (default 1) x N candidates (1024) against a history of L items (2048,
all valid). The same model (random weights, E = 128, H = 4 heads of 32) is run eagerly with
the fused "cpu" backend, from its AOTInductor package (the fused ops called from the
compiled graph) and from its ONNX export in onnxruntime (standard ONNX ops: onnxruntime's
MatMul/Softmax kernels, not attnkern's). The providers take turns call by call, so that a
load change on the machine hits all of them alike; the report gives p50/p99/mean per call,
the outputs' agreement with eager, the machine and the versions.

    python -m attnkern.tools.bench.serving_latency [--iters 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from ...ops.availability import cpu_isa
from .. import export as ex

PROVIDERS = ("eager", "aoti", "onnxruntime")


def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _machine() -> Dict[str, object]:
    cpu = _cpuinfo()
    model = cpu.get("model name") or platform.processor() or platform.machine()
    import onnxruntime

    info = {"cpu": model, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            # The machine may be shared: its load during the run is part of the numbers.
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    info["attnkern_cpu_isa"] = cpu_isa()
    return info


def _percentiles(ms: List[float]) -> Dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "min_ms": float(a.min()), "calls": int(a.size)}


def export_both(model, workdir: str, example: "ex.Shape" = ex.EXAMPLE):
    """The AOTInductor package and the ONNX file of `model` in `workdir`, traced on an example
    of shape `example` (the serving shape: it sets the attention layer's evaluation order), and
    their export times in seconds."""
    t0 = time.perf_counter()
    pt2 = ex.export_aoti(model, os.path.join(workdir, "model.pt2"), example=example)
    t1 = time.perf_counter()
    onnx_path = ex.export_onnx(model, os.path.join(workdir, "model.onnx"), example=example)
    t2 = time.perf_counter()
    return pt2, onnx_path, {"aoti_export_s": t1 - t0, "onnx_export_s": t2 - t1}


def build_providers(model, inputs: ex.Inputs, pt2: str, onnx_path: str) -> Dict[str, Callable]:
    """One zero-argument callable per provider, each returning the logits as a torch tensor."""
    import onnxruntime as ort

    runner = torch._inductor.aoti_load_package(pt2)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the same cores as torch
    opts.inter_op_num_threads = 1
    # No spin-waiting after a run: onnxruntime's idle pool threads would otherwise spin on the
    # cores the next provider's call (taking turns with it) runs on, timing the contention.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    feeds = {n: t.numpy() for n, t in zip(inputs.names, inputs.flat())}
    args, kwargs = inputs.args, inputs.kwargs
    fns = {
        "eager": lambda: model(*args, **kwargs),
        "aoti": lambda: runner(*args, **kwargs),
        "onnxruntime": lambda: torch.from_numpy(sess.run(None, feeds)[0]),
    }
    return fns


def measure(fns: Dict[str, Callable], iters: int, warmup: int) -> Dict[str, Dict[str, float]]:
    """Milliseconds per call of each provider: p50, p99, mean, min. The providers take turns
    call by call, the order rotating, so that no provider always runs right after another."""
    names = list(fns)
    times: Dict[str, List[float]] = {p: [] for p in names}
    for _ in range(warmup):
        for p in names:
            fns[p]()
    for i in range(iters):
        for j in range(len(names)):
            p = names[(i + j) % len(names)]
            t = time.perf_counter()
            fns[p]()
            times[p].append((time.perf_counter() - t) * 1e3)
    return {p: _percentiles(times[p]) for p in names}


def run(batch: int = 1, candidates: int = 1024, history: int = 2048, *, embed_dim: int = 128,
        heads: int = 4, num_items: int = 10000, iters: int = 200, warmup: int = 5,
        seed: int = 0) -> dict:
    model = ex.build_model(ex.ModelConfig("target_attention_ctr", embed_dim=embed_dim,
                                          num_heads=heads, num_items=num_items, seed=seed))
    shape = ex.Shape(batch, candidates, history)
    inputs = ex.make_inputs(model, shape, seed=seed, lengths=[history] * batch)  # all valid
    with tempfile.TemporaryDirectory(prefix="attnkern-latency-") as tmp, torch.inference_mode():
        pt2, onnx_path, export_s = export_both(model, tmp, example=shape)
        fns = build_providers(model, inputs, pt2, onnx_path)
        ref = fns["eager"]()
        agree = {p: float((fn() - ref).abs().max()) for p, fn in fns.items()}
        results = measure(fns, iters, warmup)
    return {
        "shape": {"batch": batch, "candidates": candidates, "history": history,
                  "embed_dim": embed_dim, "heads": heads, "head_dim": embed_dim // heads},
        "machine": _machine(), "export_s": export_s, "max_abs_err_vs_eager": agree,
        "results": results,
    }


def markdown(report: dict) -> str:
    s, m = report["shape"], report["machine"]
    eager = report["results"]["eager"]["p50_ms"]
    lines = [
        "TargetAttentionCTR, B=%d, N=%d candidates, L=%d (all valid), E=%d, H=%d x %d, float32"
        % (s["batch"], s["candidates"], s["history"], s["embed_dim"], s["heads"], s["head_dim"]),
        "",
        "| provider | p50 ms | p99 ms | mean ms | p50 vs eager | max abs err vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for p, r in report["results"].items():
        lines.append("| %s | %.2f | %.2f | %.2f | %.2fx | %.1e |" % (
            p, r["p50_ms"], r["p99_ms"], r["mean_ms"], eager / r["p50_ms"],
            report["max_abs_err_vs_eager"][p]))
    load = m.get("load_average_1min")
    lines += ["", "%s, %s logical CPUs, %d threads; torch %s (CPU capability %s%s), "
              "onnxruntime %s, Python %s; %d calls per provider, taking turns%s."
              % (m["cpu"], m["logical_cpus"], m["threads"], m["torch"], m["torch_cpu_capability"],
                 ", attnkern kernels %s" % m["attnkern_cpu_isa"] if "attnkern_cpu_isa" in m else "",
                 m["onnxruntime"], m["python"], report["results"]["eager"]["calls"],
                 "; load average %.1f" % load if load is not None else "")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnkern.tools.bench.serving_latency",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--candidates", type=int, default=1024)
    p.add_argument("--history", type=int, default=2048)
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and onnxruntime threads (default: torch's default)")
    p.add_argument("--out", default=None, help="folder for latency.json and latency.md")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    report = run(a.batch, a.candidates, a.history, embed_dim=a.embed_dim, heads=a.heads,
                 iters=a.iters)
    text = markdown(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "latency.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(a.out, "latency.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
