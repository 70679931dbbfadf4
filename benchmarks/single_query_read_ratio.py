"""The single-query path (N = 1) against reading its valid K/V bytes once, alternating call by
call in one run: the training shape (B=1024, L=200 ragged, H=1, D=64) and the long history
(16, 1, 4, 16384, 32), float32 and bfloat16, under torch.inference_mode.

    python benchmarks/single_query_read_ratio.py [threads, default 2] [rounds, default 15]
"""
import statistics
import sys
import time

import torch

import attnkern
from attnkern.tools.bench.serving import read_fn

SHAPES = {"training": (1024, 200, 1, 64, True), "long": (16, 16384, 4, 32, False)}


def once(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main():
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    for name, (B, L, H, D, ragged) in SHAPES.items():
        for dt in (torch.float32, torch.bfloat16):
            q = torch.randn(B, 1, H, D).to(dt)
            k, v = torch.randn(B, L, H, D).to(dt), torch.randn(B, L, H, D).to(dt)
            lens = torch.randint(1, L + 1, (B,)) if ragged else torch.full((B,), L)
            nbytes = int(lens.sum()) * H * D * 2 * k.element_size()
            read = read_fn(nbytes)

            def op():
                with torch.inference_mode():
                    attnkern.attention_pool(q, k, v, lengths=lens, backend="cpu")

            for _ in range(3):
                op()
                read()
            to, tr = [], []
            for _ in range(rounds):
                to.append(once(op))
                tr.append(once(read))
            mo, mr = statistics.median(to), statistics.median(tr)
            ratio = statistics.median(a / b for a, b in zip(to, tr))
            print("%-8s %-8s op %.3f ms  read %.3f ms (%.1f GB/s)  op/read %.2f (fastest %.2f)"
                  % (name, str(dt).split(".")[1], mo * 1e3, mr * 1e3, nbytes / mr / 1e9, ratio, min(to) / min(tr)))


if __name__ == "__main__":
    main()
