"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

Each launch variant (kernel, dtype, query block, head blocks, BLOCK_L, warps, stages) is
compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` (capability
9.0, warp size 32: what Triton's CUDA driver reports for an H100/H200); Triton runs
its own ptxas (shipped with Triton) and the compiled kernel's metadata gives the shared memory
it needs. Register use and spills come from ptxas's own report of that compile (Triton prints
it with knobs.nvidia.dump_ptxas_log; a compile served from Triton's cache is re-assembled with
the same ptxas to get it). This is what tests/test_triton_sm90.py asserts on (no spills,
shared memory within the limit) and what

    python -m attnkern.triton_kernels.aot [--all] [--json FILE]

prints as a table. Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels).
The signature mimics a launch on contiguous 16-byte-aligned tensors with lengths (int32): unit
strides are constants and the other strides divisible by 16, as Triton specialises them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

import triton
import triton.language as tl

from . import attention_pool as K

# The H100/H200's shared memory per block (opt-in maximum): 227 KB.
SM90_SHARED_LIMIT = 227 * 1024
_TL_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Variant:
    kernel: str  # fwd | dq | dkdv
    dtype: str  # float16 | bfloat16 | float32
    block_n: int
    block_dk: int
    block_dv: int
    block_l: int
    num_warps: int
    num_stages: int
    dot_precision: str = "ieee"
    bias: int = 0  # BIAS_MODE (and the dk/dv kernel's DBIAS_MODE): 0 none, 2 a row per query

    @property
    def name(self) -> str:
        return "%s-%s-n%d-dk%d-dv%d-l%d-w%d-s%d%s%s" % (
            self.kernel, self.dtype, self.block_n, self.block_dk, self.block_dv, self.block_l,
            self.num_warps, self.num_stages,
            "" if self.dot_precision == "ieee" else "-" + self.dot_precision,
            "-bias" if self.bias else "")


_KERNELS = {
    "fwd": (K._attention_pool_fwd_kernel,
            {"Q": "x", "K": "x", "V": "x", "IDX": "i32", "MASK": "x", "BIAS": "fp32", "OUT": "x",
             "LSE": "fp32"}),
    "dq": (K._attention_pool_bwd_dq_kernel,
           {"Q": "x", "K": "x", "V": "x", "IDX": "i32", "MASK": "x", "BIAS": "fp32", "DO": "x",
            "LSE": "fp32", "DELTA": "fp32", "DQ": "x", "ANCH": "fp32"}),
    "dkdv": (K._attention_pool_bwd_dkdv_kernel,
             {"Q": "x", "K": "x", "V": "x", "IDX": "i32", "MASK": "x", "BIAS": "fp32", "DO": "x",
              "ANCH": "fp32", "DELTA": "fp32", "DK_OUT": "x", "DV_OUT": "x", "DBIAS": "fp32"}),
}
_FLOAT_ARGS = ("scale", "restat_above")
_UNIT_STRIDES = re.compile(r"^stride_\w*d$")  # the head-dim strides: 1 for contiguous tensors


def _jit_fn(fn):
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset "
                           "(the interpreter replaces the kernels)")
    return fn


def source(v: Variant):
    """(ASTSource, options) of one variant."""
    from triton.compiler import ASTSource

    fn, pointers = _KERNELS[v.kernel]
    fn = _jit_fn(fn)
    tl_dtype = _TL_NAMES[v.dtype]
    constexprs = dict(LAYOUT=K.LENGTHS.value, BLOCK_N=v.block_n, BLOCK_L=v.block_l,
                      BLOCK_DK=v.block_dk, BLOCK_DV=v.block_dv, USE_DOT=v.block_n > K.SMALL_N,
                      DOT_PRECISION=v.dot_precision, NATIVE_DOT=True, BIAS_MODE=v.bias,
                      DBIAS_MODE=v.bias)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
        elif name in pointers:
            signature[name] = "*" + (tl_dtype if pointers[name] == "x" else pointers[name])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif _UNIT_STRIDES.match(name):
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, consts, attrs)
    return src, {"num_warps": v.num_warps, "num_stages": v.num_stages, "maxnreg": K.maxnreg(v.num_warps, _dtype_bytes(v.dtype))}


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str):
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILLS.findall(log)
    if not regs or not spills:
        return None
    return int(regs[-1]), int(spills[-1][0]) + int(spills[-1][1])


def _ptxas_report(ptx: str, capability: int) -> str:
    """ptxas -v on the compiled PTX (for a compile that Triton served from its cache)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # Triton versions whose get_ptxas takes no argument
        ptxas = get_ptxas().path
    arch = "sm_%da" % capability if capability >= 90 else "sm_%d" % capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=" + arch, src,
                            "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
        if r.returncode != 0:  # older ptxas without --regAllocOptLevel
            r = subprocess.run([ptxas, "-v", "--gpu-name=" + arch, src, "-o",
                                os.path.join(d, "k.o")], capture_output=True, text=True)
        return r.stdout + r.stderr


def _sidecar(ck) -> str:
    """Where the ptxas numbers of a compiled kernel are kept next to Triton's cache."""
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton",
                                                              "cache")
    h = getattr(ck.metadata, "hash", None)
    if not h:
        return ""
    os.makedirs(os.path.join(base, "attnkern-aot"), exist_ok=True)
    return os.path.join(base, "attnkern-aot", h + ".json")


def compile_for(src, options: Dict, capability: int = 90):
    """(compiled kernel, registers, spilled bytes) of an ASTSource compiled for
    sm_<capability> (-1, -1 when ptxas gave no report)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    buf = io.StringIO()
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = old
    parsed = _parse_ptxas(buf.getvalue())
    side = _sidecar(ck)
    if parsed is None and side and os.path.exists(side):  # served from Triton's cache
        with open(side) as f:
            parsed = tuple(json.load(f))
    if parsed is None:  # served from the cache before a sidecar existed: assemble again
        parsed = _parse_ptxas(_ptxas_report(ck.asm["ptx"], capability))
    if parsed is not None and side:
        with open(side, "w") as f:
            json.dump(list(parsed), f)
    regs, spills = parsed if parsed is not None else (-1, -1)
    return ck, regs, spills


def compile_variant(v: Variant, capability: int = 90) -> Dict:
    """Compiles one variant for sm_<capability>; returns its row of the table."""
    src, options = source(v)
    t0 = time.time()
    ck, regs, spills = compile_for(src, options, capability)
    row = asdict(v)
    row.update(name=v.name, shared=int(ck.metadata.shared), n_regs=regs, n_spills=spills,
               seconds=round(time.time() - t0, 2),
               fits=K._fits(v.block_n, v.block_l, v.block_dk, v.block_dv, v.num_warps,
                            v.num_stages, _dtype_bytes(v.dtype), kind=v.kernel,
                            bias=bool(v.bias)))
    return row


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


# ----------------------------------------------------------------------------------------------
# Which variants ship
# ----------------------------------------------------------------------------------------------

HEAD_BLOCKS = (16, 32, 64, 128, 256)
QUERY_BLOCKS = (1, 2, 4, 16, 32, 64)
DTYPES = ("float16", "bfloat16", "float32")


def kept_configs(kernel: str, dtype: str, block_n: int, block_dk: int, block_dv: int):
    """The autotune configs that the launcher's pruning keeps for these blocks."""
    configs = K.FWD_CONFIGS if kernel == "fwd" else K.BWD_CONFIGS
    return K.prune_configs(configs, {}, kind=kernel, BLOCK_N=block_n, BLOCK_DK=block_dk,
                           BLOCK_DV=block_dv, dtype_bytes=_dtype_bytes(dtype))


def default_variant(kernel: str, dtype: str, block_n: int, block_dk: int, block_dv: int,
                    bias: bool = False) -> Variant:
    """The config used with autotuning off (ATTNKERN_TRITON_AUTOTUNE=0); with bias, a bias
    row per query (K.QUERY_BIAS)."""
    bl, w, s = K.default_config(block_n, block_dk, block_dv, _dtype_bytes(dtype), kind=kernel,
                                bias=bias)
    return Variant(kernel, dtype, block_n, block_dk, block_dv, bl, w, s,
                   bias=K.QUERY_BIAS.value if bias else 0)


def all_variants(kernels=("fwd", "dq", "dkdv"), dtypes=DTYPES, query_blocks=QUERY_BLOCKS,
                 head_blocks=HEAD_BLOCKS) -> List[Variant]:
    """Every shipped variant: the kept autotune configs and the untuned default, for each
    kernel, dtype, query block and (equal) head blocks, plus the most unequal head blocks."""
    pairs = [(d, d) for d in head_blocks] + [(head_blocks[0], head_blocks[-1]),
                                              (head_blocks[-1], head_blocks[0])]
    out = []
    for kernel in kernels:
        for dtype in dtypes:
            for n in query_blocks:
                for bdk, bdv in pairs:
                    bn = K.query_block(n, bdk, bdv, _dtype_bytes(dtype), kernel)
                    seen = set()
                    for c in kept_configs(kernel, dtype, bn, bdk, bdv):
                        seen.add(Variant(kernel, dtype, bn, bdk, bdv, c.kwargs["BLOCK_L"],
                                         c.num_warps, c.num_stages))
                    seen.add(default_variant(kernel, dtype, bn, bdk, bdv))
                    out.extend(v for v in sorted(seen, key=lambda v: v.name) if v not in out)
    return out


def representative_variants() -> List[Variant]:
    """The CI subset: per kernel, dtype class (16-bit / float32) and query count (16, 64: the
    tl.dot path, with the query block the launcher picks) at head blocks 64 and 256, the kept config with the most shared memory (largest
    BLOCK_L x stages) and the one with the most registers per thread (largest BLOCK_L, fewest
    warps), plus the untuned default; and the broadcast path at one query, head block 256."""
    out = []
    for kernel in ("fwd", "dq", "dkdv"):
        for dtype in ("float16", "float32"):
            for n in (16, 64):
                for d in (64, 128, 256):
                    bn = K.query_block(n, d, d, _dtype_bytes(dtype), kernel)
                    kept = kept_configs(kernel, dtype, bn, d, d)
                    pick = {max(kept, key=lambda c: (c.kwargs["BLOCK_L"] * c.num_stages,
                                                     -c.num_warps)),
                            max(kept, key=lambda c: (c.kwargs["BLOCK_L"], -c.num_warps,
                                                     c.num_stages))}
                    vs = {Variant(kernel, dtype, bn, d, d, c.kwargs["BLOCK_L"], c.num_warps,
                                  c.num_stages) for c in pick}
                    vs.add(default_variant(kernel, dtype, bn, d, d))
                    out.extend(v for v in sorted(vs, key=lambda v: v.name) if v not in out)
            out.append(default_variant(kernel, dtype, 1, 256, 256))
            # With a bias row per query (the most it adds: a [BLOCK_N, BLOCK_L] tile), at the
            # largest query block and the widest head block its default config takes.
            bn = K.query_block(64, 128, 128, _dtype_bytes(dtype), kernel)
            v = default_variant(kernel, dtype, bn, 128, 128, bias=True)
            out.append(v)
    return out


def check_rows(rows: Iterable[Dict], shared_limit: int = SM90_SHARED_LIMIT) -> List[str]:
    """Problems found in compiled rows: spills, or shared memory over the limit."""
    bad = []
    for r in rows:
        if r["n_spills"] != 0:
            bad.append("%s: %s bytes of register spills (%d registers)"
                       % (r["name"], r["n_spills"], r["n_regs"]))
        if r["shared"] > shared_limit:
            bad.append("%s: %d bytes of shared memory > %d" % (r["name"], r["shared"], shared_limit))
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every shipped variant (else the CI subset)")
    ap.add_argument("--kernel", action="append", help="fwd, dq or dkdv (repeatable)")
    ap.add_argument("--capability", type=int, default=90)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    variants = all_variants() if args.all else representative_variants()
    if args.kernel:
        variants = [v for v in variants if v.kernel in args.kernel]
    rows = []
    t0 = time.time()
    print("%-44s %8s %5s %7s %5s %6s" % ("variant", "shared", "regs", "spills", "fits", "s"))

    def show(r):
        rows.append(r)
        print("%-44s %8d %5d %7d %5s %6.1f" % (r["name"], r["shared"], r["n_regs"],
                                               r["n_spills"], r["fits"], r["seconds"]), flush=True)

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            for r in pool.map(compile_variant, variants, [args.capability] * len(variants)):
                show(r)
    else:
        for v in variants:
            show(compile_variant(v, args.capability))
    bad = check_rows(rows)
    print("%d variants in %.0f s; %d problems" % (len(rows), time.time() - t0, len(bad)))
    for b in bad:
        print("  " + b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "capability": args.capability,
                       "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
