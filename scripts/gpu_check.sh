#!/usr/bin/env bash
# GPU proof of attnkern in one call of at most 8 minutes on one H100/H200, with torch, Triton,
# nvcc, ninja and compute-sanitizer preinstalled and no network:
#
#   scripts/gpu_check.sh [--dry-run] OUT_DIR
#
# Steps, each under its own time limit, logged to OUT_DIR/<step>.log and recorded in
# OUT_DIR/summary.json as soon as it ends (a failing step does not stop the later ones):
#   build        the extension in place, sm_90 only, ninja (required), all cores
#   tests-*      the CUDA and Triton tests in four parallel shards, autotuning off
#                (ATTNKERN_TRITON_AUTOTUNE=0: one fixed config per case); JUnit XML per shard,
#                also on a timeout (pytest is interrupted first, so it writes its own; else a
#                fallback XML carries the log's end)
#   memcheck, synccheck, initcheck
#                compute-sanitizer on small raw-op cases (scripts/gpu_check.py case): empty
#                rows, out-of-range lengths/offsets, masks, split-L, odd head dims; in parallel
#                with the tests
#   check        `python -m attnkern check --quick --device cuda`
#   autotune     one autotuned fwd+bwd per Triton path (scripts/gpu_check.py autotune)
#   bench        `python -m attnkern bench` on the GPU, alone: copy limit, sdpa, triton, cuda
#   bench-compiled  then flex and compile (once per shape) with the time left; every case is
#                appended to OUT_DIR/bench*/bench.jsonl as soon as it is measured
#
# --dry-run (or ATTNKERN_GPU_CHECK_DRY=1) runs every step on CPU: Triton through its
# interpreter, the cpu backend standing in for cuda, the sanitizer steps as plain runs of the
# same case script, tiny test selections and bench cases. tests/test_gpu_check.py runs it.
#
# Time limits (seconds; override with ATTNKERN_T_<STEP>=N, the whole run with
# ATTNKERN_T_TOTAL): every limit is also cut to what is left of the total, so the script ends
# inside it. Sizing (H200, 16 cores) is described in docs/gpu_check.md.
set -u -o pipefail

DRY=${ATTNKERN_GPU_CHECK_DRY:-0}
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
OUT=${1:?usage: scripts/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
NPROC=$(nproc 2>/dev/null || echo 4)

# The extension is built in place: the repo must be on the import path of every step.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export ATTNKERN_TRITON_AUTOTUNE=0
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/triton-cache}

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DEV=cpu
  FUSED=cpu
  T_TOTAL=${ATTNKERN_T_TOTAL:-1500}
else
  unset TRITON_INTERPRET
  DEV=cuda
  FUSED=cuda
  T_TOTAL=${ATTNKERN_T_TOTAL:-470}
fi
# The dry run's limits are those of a busy 2-core CI machine running the same steps at once.
if [ "$DRY" = 1 ]; then D=3; else D=1; fi
T_BUILD=${ATTNKERN_T_BUILD:-$((180 * D))}
T_TESTS=${ATTNKERN_T_TESTS:-$((200 * D))}
T_SANITIZE=${ATTNKERN_T_SANITIZE:-$((200 * D))}
T_CHECK=${ATTNKERN_T_CHECK:-$((150 * D))}
T_AUTOTUNE=${ATTNKERN_T_AUTOTUNE:-$((60 * D))}
T_BENCH=${ATTNKERN_T_BENCH:-$((90 * D))}
T0=$SECONDS

rm -rf "$OUT/steps" "$OUT/summary.json"
mkdir -p "$OUT/steps" "$OUT/junit"

left() { echo $((T_TOTAL - (SECONDS - T0))); }
cap() {  # cap LIMIT: LIMIT, cut to the time left (minus a margin for the records)
  local l=$1 r
  r=$(($(left) - 5))
  [ "$r" -lt "$l" ] && l=$r
  [ "$l" -lt 1 ] && l=1
  echo "$l"
}

record() {  # record NAME STATUS SECONDS LIMIT LOG [JUNIT]
  "$PY" scripts/gpu_check.py record "$OUT" "$@" || echo "gpu_check: could not record $1" >&2
}

run_step() {  # run_step NAME LIMIT [--junit XML] CMD...
  local name=$1 limit junit="" t0=$SECONDS rc status
  limit=$(cap "$2")
  shift 2
  if [ "${1:-}" = "--junit" ]; then
    junit=$2
    shift 2
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
  # SIGINT first: pytest then stops cleanly and still writes its JUnit XML and failure list.
  timeout -s INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124 | 137 | 130) status=timeout ;;
    *) status="fail($rc)" ;;
  esac
  if [ -n "$junit" ] && [ ! -s "$junit" ]; then
    "$PY" scripts/gpu_check.py junit-fallback "$junit" "$name" "$status" "$OUT/$name.log"
  fi
  record "$name" "$status" $((SECONDS - t0)) "$limit" "$OUT/$name.log" $junit
  echo "   -> $status in $((SECONDS - t0))s (log: $OUT/$name.log)" | tee -a "$OUT/steps.txt"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  [ "$status" = pass ]
}

skip_step() {  # skip_step NAME REASON
  echo "$2" >"$OUT/$1.log"
  record "$1" skipped 0 0 "$OUT/$1.log"
  echo "== $1: skipped ($2)" | tee -a "$OUT/steps.txt"
}

# ---------------------------------------------------------------- environment
{
  date -u
  echo "dry_run=$DRY root=$ROOT nproc=$NPROC"
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" -c "import sys, torch, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc && nvcc --version | tail -n 2
  command -v ninja && ninja --version
  command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null
} >"$OUT/env.log" 2>&1
"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, os, sys, time
out, dry = sys.argv[1], sys.argv[2] == "1"
meta = {"dry_run": dry, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
try:
    import torch
    meta.update(torch=torch.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
except Exception as e:  # recorded, not fatal
    meta["torch_error"] = str(e)
try:
    import triton
    meta["triton"] = triton.__version__
except Exception as e:
    meta["triton_error"] = str(e)
with open(os.path.join(out, "run.json"), "w") as f:
    json.dump(meta, f, indent=1)
PYEOF

# ---------------------------------------------------------------- 1. build
if ! command -v ninja >/dev/null 2>&1; then
  echo "gpu_check: ninja is not on PATH; without it the build runs serially and cannot finish" \
       "in time (pip install ninja, or put it on PATH)" | tee "$OUT/build.log" >&2
  record build "fail(no ninja)" 0 0 "$OUT/build.log"
  exit 2
fi
if [ "$DRY" = 1 ] && compgen -G "attnkern/_C*.so" >/dev/null; then
  # The dry run compiles the CPU kernels into $OUT, not in place: the checkout's own extension
  # (perhaps built with the CUDA kernels) is what its later steps use, and it stays as it is.
  run_step build "$T_BUILD" env ATTNKERN_CUDA=0 MAX_JOBS="$NPROC" "$PY" setup.py build_ext \
    --build-lib "$OUT/dry-build/lib" --build-temp "$OUT/dry-build/temp"
elif [ "$DRY" = 1 ]; then  # nothing built yet: the later steps need an extension in place
  run_step build "$T_BUILD" env ATTNKERN_CUDA=0 MAX_JOBS="$NPROC" "$PY" setup.py build_ext --inplace
else
  SAN_PATH=$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")
  export PATH="$PATH:$SAN_PATH"
  run_step build "$T_BUILD" env TORCH_CUDA_ARCH_LIST=9.0 ATTNKERN_CUDA=1 MAX_JOBS="$NPROC" \
    "$PY" setup.py build_ext --inplace
fi
BUILD_OK=$?

# ---------------------------------------------------------------- 2./3./4. in parallel
# Test shards: pytest -k selections (the dry run narrows each to a few tiny cases).
if [ "$DRY" = 1 ]; then
  K_TRITON="launchers_match_reference and lengths"
  K_BACKENDS="(triton or cuda) and huge_logits"
  K_OTHER="(cuda or triton) and runs_here"
  CASE_ARGS=(--device cpu --tiny)
else
  K_TRITON=""
  K_BACKENDS="triton or cuda"
  K_OTHER="cuda or triton"
  CASE_ARGS=(--device cuda)
fi
PYTEST=("$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider -m "not slow")

shard() {  # shard NAME PYTEST-ARGS...
  local name=$1
  shift
  run_step "tests-$name" "$T_TESTS" --junit "$OUT/junit/tests-$name.xml" \
    "${PYTEST[@]}" --junitxml="$OUT/junit/tests-$name.xml" "$@"
}

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
sanitize() {  # sanitize TOOL: compute-sanitizer TOOL on the case script (dry: a plain run)
  local tool=$1
  if [ "$DRY" = 1 ]; then
    run_step "$tool" "$T_SANITIZE" "$PY" scripts/gpu_check.py case "${CASE_ARGS[@]}"
  elif [ -x "$SAN" ]; then
    # No caching allocator: the checker then sees every allocation's real bounds.
    run_step "$tool" "$T_SANITIZE" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" \
      --error-exitcode 1 "$PY" scripts/gpu_check.py case "${CASE_ARGS[@]}"
  else
    skip_step "$tool" "compute-sanitizer not found"
  fi
}

if [ $BUILD_OK -eq 0 ]; then
  PIDS=()
  if [ -n "$K_TRITON" ]; then
    shard triton tests/test_triton.py -k "$K_TRITON" & PIDS+=($!)
  else
    shard triton tests/test_triton.py & PIDS+=($!)
  fi
  shard backends tests/test_backends.py -k "$K_BACKENDS" & PIDS+=($!)
  shard other tests -k "$K_OTHER" --ignore=tests/test_triton.py \
    --ignore=tests/test_backends.py --ignore=tests/test_triton_sm90.py --ignore=tests/test_gpu_check.py \
    & PIDS+=($!)
  for tool in memcheck synccheck initcheck; do
    sanitize "$tool" & PIDS+=($!)
  done
  if [ "$DRY" = 1 ]; then
    run_step check "$T_CHECK" "$PY" -m attnkern check --quick --device cpu --backend "$FUSED" \
      --backend triton --dtype float32 & PIDS+=($!)
  else
    run_step check "$T_CHECK" "$PY" -m attnkern check --quick --device cuda & PIDS+=($!)
  fi
  for pid in "${PIDS[@]}"; do wait "$pid"; done

  # ------------------------------------------------------------ 5. autotune, 6. bench (alone)
  run_step autotune "$T_AUTOTUNE" "$PY" scripts/gpu_check.py autotune --device "$DEV"
  # Two passes, so that the fused kernels' numbers never wait behind torch.compile's: the
  # copy limit, sdpa and the fused backends on every case first, then flex and compile
  # (compiled once per shape) with the time that is left. Each appends every case to its
  # bench.jsonl as soon as it is measured.
  mkdir -p "$OUT/bench" "$OUT/bench-compiled"
  if [ "$DRY" = 1 ]; then
    BENCH=(--device cpu --shapes tiny --modes fwd --dtype float32 --no-plot --budget 0.01)
    run_step bench "$T_BENCH" "$PY" -m attnkern bench "${BENCH[@]}" \
      --providers sdpa,triton,"$FUSED" --out "$OUT/bench"
    run_step bench-compiled "$T_BENCH" "$PY" -m attnkern bench "${BENCH[@]}" \
      --providers compile --out "$OUT/bench-compiled"
  else
    BENCH=(--device cuda --no-plot --budget 0.1)
    run_step bench "$T_BENCH" "$PY" -m attnkern bench "${BENCH[@]}" \
      --providers sdpa,triton,cuda --out "$OUT/bench"
    run_step bench-compiled "$(left)" "$PY" -m attnkern bench "${BENCH[@]}" \
      --providers flex,compile --out "$OUT/bench-compiled"
  fi
else
  for s in tests memcheck synccheck initcheck check autotune bench bench-compiled; do
    skip_step "$s" "the build failed"
  done
fi

# ---------------------------------------------------------------- summary
"$PY" scripts/gpu_check.py summary "$OUT"
"$PY" - "$OUT" "$((SECONDS - T0))" <<'PYEOF'
import json, os, sys
out, total = sys.argv[1], int(sys.argv[2])
path = os.path.join(out, "summary.json")
s = json.load(open(path))
s["total_seconds"] = total
json.dump(s, open(path, "w"), indent=1)
for st in s["steps"]:
    extra = ""
    if "tests" in st:
        extra = " (%d tests, %d failures, %d errors, %d skipped)" % (
            st["tests"], st["failures"], st["errors"], st["skipped"])
    print("%-10s %-12s %4ds / %4ds%s" % (st["name"], st["status"], st["seconds"], st["limit_s"], extra))
print("total %d s; %s" % (total, "all passed" if s["ok"] else "FAILED: " + ", ".join(s["failed"])))
sys.exit(0 if s["ok"] else 1)
PYEOF
