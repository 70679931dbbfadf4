#!/usr/bin/env bash
# benchmarks/cpu_kernel_ab/run.sh TREE_A TREE_B [threads] [rounds]: the single-query CPU forward
# (with AB_BACKWARD=1 in the environment, the backward) of two checkouts (e.g. a `git worktree`
# of main and your branch) side by side in one process, on an AVX-512 CPU. Build products go to
# a temporary directory.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
a=$(cd "$1" && pwd)/csrc/cpu
b=$(cd "$2" && pwd)/csrc/cpu
out=$(mktemp -d)
g++ -O3 -fopenmp -I"$a" -DAB_NAME=kernel_a -DAB_BWD=bwd_a -c "$here/kernel.cpp" -o "$out/a.o"
g++ -O3 -fopenmp -I"$b" -DAB_NAME=kernel_b -DAB_BWD=bwd_b -c "$here/kernel.cpp" -o "$out/b.o"
g++ -O3 -fopenmp -I"$a" "$here/main.cpp" "$out/a.o" "$out/b.o" -o "$out/ab"
"$out/ab" "${3:-2}" "${4:-15}"
rm -rf "$out"
