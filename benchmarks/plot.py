"""Draws `attnkern bench` results: median time per provider per shape, one panel per
(dtype, mode), log scale, with the machine's limit for the same bytes as a black tick.

    python benchmarks/plot.py runs/bench/bench.json                # writes runs/bench/bench.png
    python benchmarks/plot.py a.json b.json -o compare.png         # several runs in one figure

`attnkern bench` calls the same function (attnkern.tools.bench.plot_results) itself, so that an
installed package, which has no benchmarks/ folder, still writes its PNG.
"""

import argparse
import json
import os
import sys

try:
    from attnkern.tools.bench import plot_results
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from attnkern.tools.bench import plot_results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="bench.json files written by `attnkern bench`")
    p.add_argument("-o", "--output", default=None,
                   help="PNG path (default: bench.png next to the first JSON)")
    args = p.parse_args(argv)
    records = []
    for path in args.results:
        with open(path) as f:
            records.extend(json.load(f))
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results[0])), "bench.png")
    plot_results(records, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
