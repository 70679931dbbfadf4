#!/usr/bin/env bash
# Builds the CPU extension a second time with AddressSanitizer + UndefinedBehaviorSanitizer, in
# its own folder (a copy of the sources under $ATTNKERN_ASAN_DIR, default build-asan/: the
# normal in-place extension is left alone), then runs the CPU tests (avx2; emulated avx512,
# avx512_bf16 and amx; generic kernels; the activation unit's on emulated avx512) and a short fuzz run with that copy first on PYTHONPATH. Any sanitizer report
# fails the run (exit status non-zero).
#
#   scripts/sanitize_cpu.sh [fuzz minutes, default 1]
#
# The run's environment and the verdict on its log: scripts/sanitizer_env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${ATTNKERN_ASAN_DIR:-$ROOT/build-asan}"
FUZZ_MINUTES="${1:-1}"
start=$(date +%s)

. scripts/sanitizer_env.sh
sanitizer_copy "$OUT"
rm -f "$OUT"/src/attnkern/_C*.so
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# -DATTNKERN_EMULATE_AVX512: the AVX-512 kernels are built on portable stand-ins of their
# intrinsics (csrc/cpu/avx512_emulation.h, and the AMX kernels on amx_emulation.h), so that
# ATTNKERN_CPU_ISA=avx512 (avx512_bf16, amx) runs them, lane by lane, on a CPU without those
# instructions too, their masked loads and stores touching only the lanes the hardware would.
(cd "$OUT/src" && ATTNKERN_CUDA=0 ATTNKERN_CPU_EXTRA_FLAGS="$SAN -DATTNKERN_EMULATE_AVX512" python setup.py -q build_ext --inplace \
  > "$OUT/build.log" 2>&1) || { tail -50 "$OUT/build.log"; echo "sanitize_cpu: build failed"; exit 1; }
built=$(date +%s)

cpu_checks() {
  python -c "import attnkern; assert attnkern.backends()['cpu'].available, attnkern.backends()['cpu'].reason"
  # The score bias's CPU cases on every path (tests/test_bias.py: the general and tiled kernels,
  # block boundaries, split rows, -inf and NaN entries).
  BIAS_K="(against and cpu) or many_queries or block_boundaries or split or deterministic or (minus_inf and cpu) or (nan_bias and cpu) or (broadcasts and cpu)"
  # avx2: the CPU kernel tests and the hardening regressions; avx512 (emulated): the same and
  # the tiled kernels' and the activation unit's tests; avx512_bf16 and amx (emulated): the tiled
  # kernels' tests; generic: the regressions that reach its arithmetic paths.
  ATTNKERN_CPU_ISA=avx2 python -m pytest -q -x -p no:cacheprovider -m "not slow" \
    tests/test_cpu.py tests/test_hardening.py
  ATTNKERN_CPU_ISA=avx2 python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_bias.py -k "$BIAS_K"
  if [ "$(uname -m)" = x86_64 ]; then
    ATTNKERN_CPU_ISA=avx512 python -c "import attnkern._C as C; isa = C.cpu_isa(); print('avx512 run:', isa); \
assert isa == 'avx512-emulated', isa"
    ATTNKERN_CPU_ISA=avx512 python -m pytest -q -x -p no:cacheprovider -m "not slow" \
      tests/test_cpu.py tests/test_cpu_tiles.py tests/test_hardening.py tests/test_activation_unit.py
    # The weights kernels (attention_weights forward and backward ops, the activation unit's
    # scores mode) and the Dice statistics kernels on emulated avx512.
    ATTNKERN_CPU_ISA=avx512 python -m pytest -q -x -p no:cacheprovider -m "not slow" \
      tests/test_attention_weights.py tests/test_activation_unit_weights.py tests/test_activation_unit_dice_train.py \
      -k "not triton and not cuda and not isa and not compile"
    # avx512_bf16 differs from avx512 only in the tiled kernels' bf16 scoring, amx only in their
    # bf16 matrix products (the tile unit, amx_emulation.h here); the activation unit runs its
    # avx512 kernels under both.
    ATTNKERN_CPU_ISA=avx512 python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_bias.py -k "$BIAS_K"
    ATTNKERN_CPU_ISA=avx512_bf16 python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_cpu_tiles.py
    ATTNKERN_CPU_ISA=amx python -c "import attnkern._C as C; isa = C.cpu_isa(); print('amx run:', isa); \
assert isa == 'amx-emulated', isa"
    ATTNKERN_CPU_ISA=amx python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_cpu_tiles.py
    ATTNKERN_CPU_ISA=amx python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_bias.py \
      -k "many_queries or split or block_boundaries"
    # The fuzzer on the amx kernels too (its many-query calls reach the tiles).
    ATTNKERN_CPU_ISA=amx python scripts/fuzz.py --minutes "$1" --targets api:cpu,raw:cpu
  fi
  # The sequence-attention CPU kernels (tiled forward and backward, the bias tables).
  python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_sequence_attention.py -k "cpu"
  # The time-aware layer's bias op (every gap size and sign, padded and empty rows).
  python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_time_bias.py
  ATTNKERN_CPU_ISA=generic python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_hardening.py \
    -k "large_logits or fp16_near or nonfinite or nan_row or peaked or mask_split"
  # The quantized-K/V kernel (tests/test_quantized.py) on each of its instruction sets: the
  # float8 e4m3 rows (the most bit work in the widening loads), empty / zero-scale / non-finite
  # rows, strided rows. Its fuzz target q:cpu runs in tests/test_fuzz.py below.
  QUANT_K="(cpu_matches_reference and qdtype2) or empty or non_finite or strided or score_bias"
  for isa in generic avx2 avx512; do
    ATTNKERN_CPU_ISA=$isa python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_quantized.py -k "$QUANT_K"
  done
  # avx512_bf16: the one-query integer (VNNI) kernel for bf16/fp16 queries and int8/uint8 rows.
  ATTNKERN_CPU_ISA=avx512_bf16 python -m pytest -q -x -p no:cacheprovider -m "not slow" tests/test_quantized.py \
    -k "one_query or empty or non_finite"
  python -m pytest -q -x -p no:cacheprovider tests/test_fuzz.py -k "cpu"
  python scripts/fuzz.py --minutes "$1" --targets api:cpu,raw:cpu,seq:cpu
}
status=0
sanitizer_run "$OUT" sanitize_cpu cpu_checks "$FUZZ_MINUTES" || status=$?
end=$(date +%s)
echo "sanitize_cpu: build $((built - start)) s, tests + fuzz $((end - built)) s, status $status"
exit $status
