"""The `attnkern` command line: check | bench | train | export | explain."""

from __future__ import annotations

import argparse
import importlib
import sys

_COMMANDS = {
    "check": ("attnkern.tools.check", "run every available backend against the reference (pass/fail table)"),
    "bench": ("attnkern.tools.bench", "time every backend and the PyTorch alternatives"),
    "export": ("attnkern.tools.export", "export a model for serving (AOTInductor or ONNX); --check reloads and compares"),
    "train": ("attnkern.tools.train", "train the target-attention CTR model (and the sum-pooling baseline)"),
    "explain": ("attnkern.tools.explain", "a user's history ranked by attention weight for a candidate movie (table and PNG)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="attnkern", description="Fused attention-pooling kernels for recommender systems."
    )
    parser.add_argument("command", choices=sorted(_COMMANDS), help="; ".join(
        "%s: %s" % (k, v[1]) for k, v in sorted(_COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(_COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
