#!/usr/bin/env bash
# Runs csrc/cuda's kernels on the CPU: builds attnkern._cuda_emu (the CUDA kernels and their
# launchers compiled as C++ through the emulation harness of csrc/cuda_emu, every access checked
# by AddressSanitizer and the harness, UndefinedBehaviorSanitizer on) in its own folder (a copy
# of the sources under $ATTNKERN_CUDA_EMU_DIR, default build-cuda-emu/: the normal in-place
# extension is left alone), then runs the harness's self-tests and the cuda backend's tests on
# CPU tensors with that copy first on PYTHONPATH. Any sanitizer report fails the run.
#
#   scripts/cuda_emu.sh [extra pytest arguments]
#
# docs/cuda_emulation.md says what runs and what cannot be emulated.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${ATTNKERN_CUDA_EMU_DIR:-$ROOT/build-cuda-emu}"
start=$(date +%s)

. scripts/sanitizer_env.sh
sanitizer_copy "$OUT"
# attnkern._C (op schemas, CPU kernels): the checkout's own build when it has one (copied above),
# else a CPU-only build in the copy.
if ! ls "$OUT"/src/attnkern/_C*.so >/dev/null 2>&1; then
  (cd "$OUT/src" && ATTNKERN_CUDA=0 python setup.py -q build_ext --inplace > "$OUT/build_C.log" 2>&1) \
    || { tail -50 "$OUT/build_C.log"; echo "cuda_emu: build of attnkern._C failed"; exit 1; }
fi
(cd "$OUT/src" && ATTNKERN_CUDA_EMULATION=1 python setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1) \
  || { grep -E -A5 "error" "$OUT/build.log" | head -80; echo "cuda_emu: build failed"; exit 1; }
built=$(date +%s)

emu_checks() {
  python -c "import attnkern; info = attnkern.backends()['cuda']; \
assert info.available and info.emulated, info; print('cuda backend:', info.reason)"
  # The harness's own checks, then every test of the cuda backend (their GPU cases run on CPU
  # tensors here: tests/conftest.py CUDA_DEVICE).
  python -m pytest -q -x -p no:cacheprovider -m "not slow" -k "cuda" "$@" tests/test_cuda_emulation.py \
    tests/test_backends.py tests/test_shared_kv_heads.py tests/test_hardening.py \
    tests/test_activation_unit_cuda.py tests/test_hardening_activation.py tests/test_cuda_build.py \
    tests/test_bias_cuda.py tests/test_sequence_cuda.py tests/test_activation_unit_weights.py \
    tests/test_attention_topk_cuda.py tests/test_quantized_cuda.py tests/test_attention_weights_cuda.py
}
status=0
sanitizer_run "$OUT" cuda_emu emu_checks "$@" || status=$?
end=$(date +%s)
echo "cuda_emu: build $((built - start)) s, tests $((end - built)) s, status $status"
exit $status
