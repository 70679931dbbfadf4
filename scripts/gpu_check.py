"""Helpers of scripts/gpu_check.sh (run from the repository root, the repo on PYTHONPATH).

    python scripts/gpu_check.py case --device cuda        small raw-op cases for the sanitizers
    python scripts/gpu_check.py autotune --device cuda    one autotuned fwd+bwd per Triton path
    python scripts/gpu_check.py record OUT NAME STATUS SECONDS LIMIT LOG [JUNIT]
    python scripts/gpu_check.py junit-fallback XML NAME STATUS LOG
    python scripts/gpu_check.py summary OUT

`case` runs a small forward + backward through the fused C++ backend's raw ops (cuda, or cpu
in the dry run) and through the Triton launchers: empty rows, lengths/offsets out of range
(clamped in-kernel; the CPU ops reject them, so the dry run passes them clamped there), a
mask with holes, split-L, odd and unequal head dims, every dtype; and the activation-unit
(DIN) raw ops over the same kinds of index values. Each result is checked
against the float64 reference, so a kernel that runs clean under the sanitizer but computes
garbage still fails.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import xml.sax.saxutils as xml_escape


def _ref(q, k, v, lengths=None, mask=None, offsets=None, max_length=None, scale=None):
    from attnkern.reference import attention_pool_ref

    return attention_pool_ref(q, k, v, lengths, mask=mask, offsets=offsets,
                              max_length=max_length, scale=scale)


def _close(name, got, want, dtype, failures):
    import torch

    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    got, want = got.double().cpu(), want.double().cpu()
    if got.shape != want.shape:
        failures.append("%s: shape %s != %s" % (name, tuple(got.shape), tuple(want.shape)))
        return
    if got.numel() == 0:
        return
    bad = ~torch.isclose(got, want, atol=tol, rtol=tol, equal_nan=True)
    if bad.any():
        failures.append("%s: %d of %d values off (max err %.3g)" % (
            name, int(bad.sum()), got.numel(), (got - want).abs().nan_to_num(0).max().item()))


def _activation_unit_cases(dev, bad_indices, tiny, failures) -> int:
    """The activation-unit (DIN) raw ops: lengths/offsets out of range (clamped in-kernel;
    passed clamped where bad_indices is False), empty rows, a mask with holes, one and two
    hidden layers, M_q staged and not (E = 256). Forward checked against the reference."""
    import torch

    from attnkern.reference import activation_unit_pool_ref

    ops = torch.ops.attnkern
    n_calls = 0
    dtypes = (torch.float32,) if tiny else (torch.float32, torch.bfloat16)
    dims = ((13, 9, (80, 40)),) if tiny else ((13, 9, (80, 40)), (64, 64, (64,)), (256, 7, (256,)))
    for dtype in dtypes:
        for E, Dv, units in dims:
            B, N, L = 5, 2, 37
            r = lambda *shape: torch.randn(*shape, device=dev, dtype=dtype)  # noqa: E731
            two = len(units) == 2

            def act(h):
                return torch.stack([0.5 * torch.rand(h), 0.5 + torch.rand(h),
                                    torch.rand(h) - 0.5]).to(dev, dtype)

            w = (r(units[0], 4 * E) * (4 * E) ** -0.5, r(units[0]),
                 r(units[1], units[0]) * units[0] ** -0.5 if two else None,
                 r(units[1]) if two else None, r(1, units[-1]) * units[-1] ** -0.5, r(1),
                 act(units[0]), act(units[1]) if two else None)
            q, k, v = r(B, N, E), r(B, L, E), r(B, L, Dv)
            bad = torch.tensor([0, L + 1000, -7, 1, L], device=dev)
            lengths = bad if bad_indices else bad.clamp(0, L)
            mask = torch.rand(B, L, device=dev) > 0.5
            mask[0] = False
            T = B * L
            offs_bad = torch.tensor([-2, 0, L, T + 5, 3, T * 3], device=dev)
            offs_good = torch.cummax(offs_bad.clamp(0, T), 0).values
            offs_good[0] = 0
            offs = offs_bad if bad_indices else offs_good
            layouts = [(k, v, lengths, None, None, -1), (k, v, None, mask, None, -1),
                       (k.reshape(T, E), v.reshape(T, Dv), None, None, offs, -1)]
            if bad_indices:
                layouts.append((k.reshape(T, E), v.reshape(T, Dv), None, None, offs, 5))
            for kk, vv, lens, msk, off, ml in layouts:
                for softmax in (False, True):
                    args = (q, kk, vv, lens, msk, off, ml, *w, "dice", softmax)
                    out, lse = ops.activation_unit_pool_fwd(*args)  # out unrounded, float32
                    go = torch.randn_like(out).to(q.dtype)
                    ops.activation_unit_pool_bwd(go, *args, lse, (go.float() * out.float()).sum(-1))
                    n_calls += 2
                    if lens is not None:
                        ref_args = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                    else a for a in args]
                        ref_args[3] = lens.clamp(0, L)
                        ref, _ = activation_unit_pool_ref(*ref_args)
                        _close("activation-unit fwd %s E=%d units=%s softmax=%s"
                               % (str(dtype)[6:], E, units, softmax), out, ref, dtype, failures)
    return n_calls


def cmd_case(argv) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="gpu_check.py case")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="fewer shapes and dtypes (dry run)")
    args = ap.parse_args(argv)

    import torch

    import attnkern
    from attnkern.triton_kernels import attention_pool as K

    dev = args.device
    ops = torch.ops.attnkern
    fused = "cuda" if dev == "cuda" else "cpu"
    have_fused = attnkern.backends()[fused].available
    have_triton = attnkern.backends()["triton"].available
    print("fused backend %s: %s; triton: %s" % (fused, have_fused, have_triton), flush=True)
    if not (have_fused or have_triton):
        print("no backend to run", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    failures = []
    dtypes = (torch.float32, torch.bfloat16) if args.tiny else (torch.float32, torch.float16,
                                                               torch.bfloat16)
    dims = ((7, 9),) if args.tiny else ((40, 40), (7, 130), (64, 32))
    shapes = ((3, 3, 1, 9), (1, 1, 1, 40)) if args.tiny else ((5, 1, 2, 33), (3, 17, 1, 9),
                                                              (1, 1, 1, 700))
    n_calls = 0
    t0 = time.time()
    for dtype in dtypes:
        for dk, dv in dims:
            for B, N, H, L in shapes:
                q = torch.randn(B, N, H, dk, device=dev, dtype=dtype)
                k = torch.randn(B, L, H, dk, device=dev, dtype=dtype)
                v = torch.randn(B, L, H, dv, device=dev, dtype=dtype)
                bad = torch.tensor(([0, L + 1000, -7, 1, L] * 2)[:B], device=dev)
                good = bad.clamp(0, L)
                mask = torch.rand(B, L, device=dev) > 0.5
                mask[0] = False
                go = torch.randn(B, N, H, dv, device=dev, dtype=dtype)
                T = B * L
                kj, vj = k.reshape(T, H, dk), v.reshape(T, H, dv)
                offs_bad = torch.tensor(([-2, 0, L, T + 5, 3, T * 3] * 2)[: B + 1], device=dev)
                offs_good = torch.cummax(offs_bad.clamp(0, T), 0).values
                offs_good[0] = 0
                tag = "%s dk=%d dv=%d B=%d N=%d L=%d" % (str(dtype)[6:], dk, dv, B, N, L)
                # The fused C++ backend's raw ops: bad index values on CUDA (clamped in-kernel),
                # clamped ones on CPU (whose ops reject bad values).
                if have_fused:
                    lens = bad if fused == "cuda" else good
                    offs = offs_bad if fused == "cuda" else offs_good
                    for lens_, msk in ((lens, None), (None, mask), (None, None)):
                        out, lse = ops.attention_pool_fwd(q, k, v, lens_, msk, 0.3)
                        delta = (go.float() * out.float()).sum(-1)
                        ops.attention_pool_bwd(go, q, k, v, lens_, msk, lse, delta, 0.3)
                        ref, _ = _ref(q.double(), k.double(), v.double(),
                                      None if lens_ is None else lens_.clamp(0, L), msk,
                                      scale=0.3)
                        _close("%s fwd %s" % (fused, tag), out, ref, dtype, failures)
                        n_calls += 2
                    # (the CPU ops also reject rows longer than max_length)
                    for max_length in ((-1, 5) if fused == "cuda" else (-1,)):
                        out, lse = ops.jagged_attention_pool_fwd(q, kj, vj, offs, max_length, 0.3)
                        delta = (go.float() * out.float()).sum(-1)
                        ops.jagged_attention_pool_bwd(go, q, kj, vj, offs, max_length, lse, delta, 0.3)
                        n_calls += 2
                # The Triton launchers (no host checks): bad values everywhere, split-L too.
                if have_triton:
                    for kw in ({"lengths": bad}, {"mask": mask}, {"offsets": offs_bad, "max_length": 5},
                               {"offsets": offs_bad}):
                        kk, vv = (kj, vj) if "offsets" in kw else (k, v)
                        for splits in (None, 3):
                            out, lse = K.attention_pool_fwd(q, kk, vv, scale=0.3, num_splits=splits, **kw)
                            n_calls += 1
                        delta = (go.float() * out.float()).sum(-1)
                        K.attention_pool_bwd(go, q, kk, vv, lse, delta, scale=0.3, **kw)
                        n_calls += 1
                        if "lengths" in kw:
                            ref, _ = _ref(q.double(), k.double(), v.double(), bad.clamp(0, L), scale=0.3)
                            _close("triton fwd %s" % tag, out, ref, dtype, failures)
    if have_fused:
        n_calls += _activation_unit_cases(dev, fused == "cuda", args.tiny, failures)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("%d raw-op calls in %.1f s" % (n_calls, time.time() - t0))
    for f in failures:
        print("MISMATCH " + f)
    print("sanitize case done: %s" % ("FAIL" if failures else "ok"), flush=True)
    return 1 if failures else 0


def cmd_autotune(argv) -> int:
    """One autotuned forward + backward per Triton path (broadcast N=1, tl.dot N=64, float16,
    D=64), through the public API, checked against the reference; prints the chosen configs."""
    import argparse

    ap = argparse.ArgumentParser(prog="gpu_check.py autotune")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    os.environ["ATTNKERN_TRITON_AUTOTUNE"] = "1"

    import torch

    import attnkern
    from attnkern.triton_kernels import attention_pool as K

    if not attnkern.backends()["triton"].available:
        print("triton backend unavailable: %s" % attnkern.backends()["triton"].reason)
        return 1
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    failures = []
    for N in (1, 64):
        t0 = time.time()
        g = torch.Generator().manual_seed(N)
        # (on CPU, the dry run, through the interpreter: a tiny problem)
        B, H, L, D = (8, 2, 300, 64) if args.device == "cuda" else (2, 1, 20, 16)
        q = torch.randn(B, N, H, D, generator=g).to(args.device, dtype).requires_grad_()
        k = torch.randn(B, L, H, D, generator=g).to(args.device, dtype).requires_grad_()
        v = torch.randn(B, L, H, D, generator=g).to(args.device, dtype).requires_grad_()
        lengths = torch.randint(0, L + 1, (B,), generator=g).to(args.device)
        out = attnkern.attention_pool(q, k, v, lengths, backend="triton")
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        ref = attnkern.attention_pool(q, k, v, lengths, backend="reference")
        ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads, (ref,) + ref_grads):
            _close("autotuned N=%d %s" % (N, name), a.detach(), b.detach(), dtype, failures)
        best = {name: str(getattr(t, "best_config", None))
                for name, t in (("fwd", K._fwd_tuned), ("dq", K._dq_tuned), ("dkdv", K._dkdv_tuned))}
        print("N=%d: %.1f s; best configs %s" % (N, time.time() - t0, best), flush=True)
    for f in failures:
        print("MISMATCH " + f)
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# Step records, JUnit fallback, summary
# ----------------------------------------------------------------------------------------------


def _tail(path, lines=60):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def cmd_record(argv) -> int:
    out, name, status, seconds, limit, log = argv[:6]
    junit = argv[6] if len(argv) > 6 else ""
    rec = {"name": name, "status": status, "seconds": int(seconds), "limit_s": int(limit),
           "log": os.path.basename(log), "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime())}
    if junit and os.path.exists(junit):
        rec["junit"] = os.path.basename(junit)
        rec.update(_junit_counts(junit))
    if status != "pass":
        rec["log_tail"] = _tail(log, 30)
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    path = os.path.join(out, "steps", name + ".json")
    with open(path + ".tmp", "w") as f:  # steps end concurrently: write, then rename
        json.dump(rec, f, indent=1)
    os.replace(path + ".tmp", path)
    return cmd_summary([out])


def _junit_counts(path):
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"junit_error": str(e)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for key in counts:
            counts[key] += int(s.get(key, 0) or 0)
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append("%s::%s" % (case.get("classname", ""), case.get("name", "")))
    counts["failed_tests"] = failed[:50]
    return counts


def cmd_junit_fallback(argv) -> int:
    """Writes a JUnit XML for a test step that produced none (killed at its time limit): one
    failed test case holding the end of the step's log."""
    xml_path, name, status, log = argv[:4]
    tail = _tail(log, 150)
    body = ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<testsuites><testsuite name="%s" tests="1" failures="1" errors="0" skipped="0">'
            '<testcase classname="gpu_check" name="%s"><failure message=%s>%s</failure>'
            '</testcase></testsuite></testsuites>\n') % (
        xml_escape.escape(name), xml_escape.escape(name),
        xml_escape.quoteattr("%s: no JUnit XML was written (%s)" % (name, status)),
        xml_escape.escape(tail))
    with open(xml_path, "w") as f:
        f.write(body)
    return 0


def cmd_summary(argv) -> int:
    out = argv[0]
    steps = []
    for path in sorted(glob.glob(os.path.join(out, "steps", "*.json")),
                       key=lambda p: os.path.getmtime(p)):
        with open(path) as f:
            steps.append(json.load(f))  # complete: records are renamed into place
    meta = {}
    meta_path = os.path.join(out, "run.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    failed = [s["name"] for s in steps if s["status"] not in ("pass", "skipped")]
    summary = dict(meta, steps=steps, ran=[s["name"] for s in steps], failed=failed,
                   ok=not failed and bool(steps))
    tmp = os.path.join(out, "summary.json.%d.tmp" % os.getpid())
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "summary.json"))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"case": cmd_case, "autotune": cmd_autotune, "record": cmd_record,
                "junit-fallback": cmd_junit_fallback, "summary": cmd_summary}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return int(commands[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
