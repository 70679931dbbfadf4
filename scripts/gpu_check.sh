#!/usr/bin/env bash
# GPU validation of attnkern on a machine with a CUDA GPU, torch preinstalled and no network.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Steps (each under its own timeout, all logged; a failing step does not stop the later ones):
#   1. build the extension in place for the local GPU arch only
#   2. the CUDA and Triton tests (pytest -k "cuda or triton")
#   3. compute-sanitizer memcheck on a small forward+backward (empty rows, out-of-range
#      lengths/offsets that the kernels must clamp, masks, split-L, odd head dims), and
#      racecheck on the backward
#   4. `python -m attnkern check` (every backend against the reference)
#   5. `python -m attnkern bench --device cuda` (JSON results into OUT_DIR/bench)
# Writes OUT_DIR/<step>.log and OUT_DIR/summary.json; exits non-zero if any step failed.
# Sized to finish within 8 minutes on an H200; override a step's limit with e.g.
# ATTNKERN_T_BUILD=300.
set -u -o pipefail

OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}

T_BUILD=${ATTNKERN_T_BUILD:-150}
T_TESTS=${ATTNKERN_T_TESTS:-100}
T_MEMCHECK=${ATTNKERN_T_MEMCHECK:-90}
T_RACECHECK=${ATTNKERN_T_RACECHECK:-30}
T_CHECK=${ATTNKERN_T_CHECK:-40}
T_BENCH=${ATTNKERN_T_BENCH:-60}

declare -a NAMES=() STATUS=() SECONDS_TAKEN=()

run_step() {  # run_step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$((SECONDS - t0))
  NAMES+=("$name")
  SECONDS_TAKEN+=("$dt")
  if [ $rc -eq 0 ]; then
    STATUS+=("pass")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    STATUS+=("timeout")
  else
    STATUS+=("fail($rc)")
  fi
  echo "   -> ${STATUS[-1]} in ${dt}s (log: $OUT/$name.log)" | tee -a "$OUT/steps.txt"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  return $rc
}

# ---------------------------------------------------------------- environment
{
  date -u
  nvidia-smi 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0), 'cap', torch.cuda.get_device_capability(0))"
  command -v nvcc && nvcc --version
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true
} >"$OUT/env.log" 2>&1

ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null)
ARCH=${ARCH:-9.0}

# ---------------------------------------------------------------- 1. build
run_step build "$T_BUILD" env TORCH_CUDA_ARCH_LIST="$ARCH" ATTNKERN_CUDA=1 \
  MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
BUILD_OK=$?

if [ $BUILD_OK -eq 0 ]; then
  # ------------------------------------------------------------ 2. tests
  run_step tests "$T_TESTS" "$PY" -m pytest tests -q -k "cuda or triton" --maxfail=25 \
    -p no:cacheprovider --junitxml="$OUT/tests.xml"

  # ------------------------------------------------------------ 3. compute-sanitizer
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  cat >"$OUT/sanitize_case.py" <<'PYEOF'
# Small forward + backward through the raw ops: empty rows, lengths/offsets out of range (the
# kernels clamp them), a mask with holes, a split-L case, odd and unequal head dims, every dtype.
import sys

import torch

import attnkern  # noqa: F401  (registers the ops)

ops = torch.ops.attnkern
dev = "cuda"
phase = sys.argv[1] if len(sys.argv) > 1 else "all"
torch.manual_seed(0)


def bwd(op, out, lse, *args):
    go = torch.randn_like(out)
    delta = (go.float() * out.float()).sum(-1)
    return op(go, *args, lse, delta, 0.3)


for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for (dk, dv) in ((40, 40), (7, 130), (64, 32)):
        for B, N, H, L in ((5, 1, 2, 33), (3, 3, 1, 9), (1, 1, 1, 700)):
            q = torch.randn(B, N, H, dk, device=dev, dtype=dtype)
            k = torch.randn(B, L, H, dk, device=dev, dtype=dtype)
            v = torch.randn(B, L, H, dv, device=dev, dtype=dtype)
            lengths = torch.tensor(([0, L + 1000, -7, 1, L] * 2)[:B], device=dev)
            mask = torch.rand(B, L, device=dev) > 0.5
            mask[0] = False
            for lens, msk in ((lengths, None), (None, mask), (None, None)):
                out, lse = ops.attention_pool_fwd(q, k, v, lens, msk, 0.3)
                if phase in ("all", "bwd"):
                    bwd(ops.attention_pool_bwd, out, lse, q, k, v, lens, msk)
            T = B * L
            kj, vj = k.reshape(T, H, dk), v.reshape(T, H, dv)
            offs = torch.tensor(([-2, 0, L, T + 5, 3, T * 3] * 2)[: B + 1], device=dev)
            for max_length in (-1, 5):
                out, lse = ops.jagged_attention_pool_fwd(q, kj, vj, offs, max_length, 0.3)
                if phase in ("all", "bwd"):
                    bwd(ops.jagged_attention_pool_bwd, out, lse, q, kj, vj, offs, max_length)
torch.cuda.synchronize()
print("sanitize case done")
PYEOF
  if [ -x "$SAN" ]; then
    # No caching allocator: memcheck then sees every allocation's real bounds.
    run_step memcheck "$T_MEMCHECK" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck \
      --error-exitcode 1 --leak-check no "$PY" "$OUT/sanitize_case.py" all
    run_step racecheck "$T_RACECHECK" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck \
      --error-exitcode 1 "$PY" "$OUT/sanitize_case.py" bwd
  else
    echo "compute-sanitizer not found" >"$OUT/memcheck.log"
    NAMES+=("memcheck")
    STATUS+=("skipped(no compute-sanitizer)")
    SECONDS_TAKEN+=(0)
  fi

  # ------------------------------------------------------------ 4./5. check and bench
  run_step check "$T_CHECK" "$PY" -m attnkern check
  mkdir -p "$OUT/bench"
  run_step bench "$T_BENCH" "$PY" -m attnkern bench --device cuda --out "$OUT/bench"
fi

# ---------------------------------------------------------------- summary
FAILED=0
{
  echo "{"
  echo "  \"arch\": \"$ARCH\","
  echo "  \"steps\": ["
  for i in "${!NAMES[@]}"; do
    sep=","
    [ "$i" -eq $((${#NAMES[@]} - 1)) ] && sep=""
    echo "    {\"name\": \"${NAMES[$i]}\", \"status\": \"${STATUS[$i]}\", \"seconds\": ${SECONDS_TAKEN[$i]}}$sep"
    case "${STATUS[$i]}" in pass | skipped*) ;; *) FAILED=1 ;; esac
  done
  echo "  ]"
  echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
exit $FAILED
