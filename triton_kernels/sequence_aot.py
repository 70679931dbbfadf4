"""Ahead-of-time compilation of the sequence-attention Triton kernels for sm_90 (H100/H200),
without a GPU: each kernel with every feature on (targets, time and position tables, dense
bias; softmax and SiLU), at the launch configuration `launch_config` picks, compiled by
Triton's own ptxas. Prints one JSON row per variant (registers, spilled bytes, shared memory);
tests/test_sequence_attention_triton.py asserts on them. Must run with TRITON_INTERPRET unset:

    python -m attnkern.triton_kernels.sequence_aot [--dtypes float16,float32] [--head 64]
        [--only fwd:float32:softmax,dq:bfloat16:silu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import sequence_attention as S
from .aot import _TL_NAMES, _UNIT_STRIDES, _jit_fn, compile_for

KERNELS = {"fwd": S._seq_fwd_kernel, "dq": S._seq_bwd_dq_kernel, "dkdv": S._seq_bwd_dkdv_kernel}
# Pointer arguments: "x" = the inputs' dtype.
_POINTERS = {"Q": "x", "K": "x", "V": "x", "STARTS": "i64", "LENS": "i64", "NT": "i64",
             "QT": "i64", "KT": "i64", "TT": "x", "BOUNDS": "i64", "PT": "x", "AS": "fp32",
             "BIAS": "x", "OUT": "fp32", "LSE": "fp32", "DO": "x", "DELTA": "fp32", "DQ": "x",
             "DBIAS": "fp32", "TG": "fp32", "PG": "fp32", "DK_OUT": "x", "DV_OUT": "x"}


def features(silu: bool) -> dict:
    """Every optional input on (64 time buckets): the largest variant of each kernel."""
    return dict(CAUSAL=True, SILU=silu, HAS_TARGETS=True, HAS_TIME=True, LOG_NB=6, HAS_POS=True,
                HAS_BIAS=True, AS_PER_TOKEN=silu, BIAS_GRAD=True, TIME_GRAD=True, POS_GRAD=True,
                BLOCK_NB=64)


def compile_variant(kernel: str, dtype: str, silu: bool, head: int = 64) -> dict:
    from triton.compiler import ASTSource

    fn = _jit_fn(KERNELS[kernel])
    block_d = S.head_block(head)
    block, warps, stages = S.launch_config(getattr(torch, dtype), block_d, block_d)
    consts_by_name = dict(features(silu), BLOCK_M=block, BLOCK_N=block, BLOCK_DK=block_d,
                          BLOCK_DV=block_d, DOT_PRECISION="ieee", NATIVE_DOT=True)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts_by_name:
            signature[name], consts[name] = "constexpr", consts_by_name[name]
        elif name in _POINTERS:
            kind = _POINTERS[name]
            signature[name] = "*" + (_TL_NAMES[dtype] if kind == "x" else kind)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "as_value"):
            signature[name] = "fp32"
        elif _UNIT_STRIDES.match(name):
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
    t0 = time.time()
    ck, regs, spills = compile_for(ASTSource(fn, signature, consts, attrs),
                                   {"num_warps": warps[kernel], "num_stages": stages,
                                    "maxnreg": S.MAXNREG[kernel]})
    return dict(kernel=kernel, dtype=dtype, silu=silu, head=head, block=block, num_warps=warps[kernel],
                num_stages=stages, n_regs=regs, n_spills=spills, shared=int(ck.metadata.shared),
                seconds=round(time.time() - t0, 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--head", type=int, default=64)
    ap.add_argument("--only", default="", help="kernel:dtype:softmax|silu, comma-separated")
    args = ap.parse_args(argv)
    if args.only:
        variants = [(k, d, n == "silu") for k, d, n in (v.split(":") for v in args.only.split(","))]
    else:
        variants = [(k, d, silu) for d in args.dtypes.split(",") for k in KERNELS
                    for silu in (False, True)]
    for kernel, dtype, silu in variants:
        print(json.dumps(compile_variant(kernel, dtype, silu, args.head)), flush=True)


if __name__ == "__main__":
    main()
