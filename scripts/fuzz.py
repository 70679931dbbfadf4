#!/usr/bin/env python
"""Runs the suite's fuzzer (tests/fuzzing.py) for a number of minutes over the public API and
the raw ops on every available backend, and prints the outcome counts per target.

    python scripts/fuzz.py --minutes 30 [--seed 0] [--targets api:cpu,raw:cpu,au:cpu,seq:cpu]

Targets: api:<backend> (attention_pool), raw:<backend> (its registered ops), au:<backend>
(activation_unit_pool, forward and every gradient), seq:<backend> (sequence_attention, forward
and every gradient).

Exit status 1 when any case was neither a correct result nor a clean error; the first failures
are printed with a description of the case."""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
if "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"  # no GPU: the Triton kernels through the interpreter

import fuzzing  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="", help="comma-separated subset of %s" % fuzzing.available_targets())
    ap.add_argument("--show", type=int, default=10, help="failures to print in full")
    args = ap.parse_args(argv)
    targets = args.targets.split(",") if args.targets else fuzzing.available_targets()
    counts = collections.defaultdict(collections.Counter)
    failures = []

    def record(outcome, case, msg):
        failures.append((outcome, fuzzing.describe(case), msg))

    end = time.monotonic() + 60 * args.minutes
    i = 0
    while time.monotonic() < end:
        draw = fuzzing.RandomDraw(args.seed * 1_000_003 + i)
        target = draw.choice(targets)
        outcome = fuzzing.fuzz_one(draw, [target], record)
        counts[target][outcome] += 1
        i += 1
    total = collections.Counter()
    print("%-14s %8s %12s %9s %10s" % ("target", "ok", "clean_error", "mismatch", "bad_error"))
    for t in targets:
        c = counts[t]
        total.update(c)
        print("%-14s %8d %12d %9d %10d" % (t, c["ok"], c["clean_error"], c["mismatch"], c["bad_error"]))
    print("%-14s %8d %12d %9d %10d   (%d cases in %.1f min)" % (
        "total", total["ok"], total["clean_error"], total["mismatch"], total["bad_error"], i, args.minutes))
    for outcome, desc, msg in failures[: args.show]:
        print("\n%s: %s\n  case: %s" % (outcome, msg, desc))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
