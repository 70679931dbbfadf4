#!/usr/bin/env bash
# GPU validation of attnkern on a machine with a CUDA GPU, torch preinstalled and no network.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Steps (each under its own timeout, all logged; a failing step does not stop the later ones):
#   1. build the extension in place for the local GPU arch only
#   2. the CUDA and Triton tests (pytest -k "cuda or triton")
#   3. compute-sanitizer memcheck on a small forward+backward (empty rows, out-of-range
#      lengths/offsets that the kernels must clamp, masks, split-L, odd head dims; attention
#      and activation-unit pooling), and racecheck on the backward
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

# Activation-unit pooling (DIN) through its raw ops: lengths/offsets out of range (clamped),
# empty rows, a mask with holes, one and two hidden layers, M_q staged and not (E = 256).
def au_mlp(E, units, dtype):
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)
    u = lambda h: torch.stack([0.5 * torch.rand(h), 0.5 + torch.rand(h), torch.rand(h) - 0.5]).to(dev, dtype)
    H1, Hl = units[0], units[-1]
    two = len(units) == 2
    return (r(H1, 4 * E) * (4 * E) ** -0.5, r(H1), r(units[1], H1) * H1 ** -0.5 if two else None,
            r(units[1]) if two else None, r(1, Hl) * Hl ** -0.5, r(1), u(H1), u(units[1]) if two else None)


for dtype in (torch.float32, torch.bfloat16):
    for E, Dv, units in ((13, 9, (80, 40)), (64, 64, (64,)), (256, 7, (256,))):
        B, N, L = 5, 2, 37
        q = torch.randn(B, N, E, device=dev, dtype=dtype)
        k = torch.randn(B, L, E, device=dev, dtype=dtype)
        v = torch.randn(B, L, Dv, device=dev, dtype=dtype)
        w = au_mlp(E, units, dtype)
        lengths = torch.tensor([0, L + 1000, -7, 1, L], device=dev)
        mask = torch.rand(B, L, device=dev) > 0.5
        mask[0] = False
        T = B * L
        offs = torch.tensor([-2, 0, L, T + 5, 3, T * 3], device=dev)
        layouts = ((k, v, lengths, None, None, -1), (k, v, None, mask, None, -1),
                   (k.reshape(T, E), v.reshape(T, Dv), None, None, offs, -1),
                   (k.reshape(T, E), v.reshape(T, Dv), None, None, offs, 5))
        for kk, vv, lens, msk, off, ml in layouts:
            for softmax in (False, True):
                args = (q, kk, vv, lens, msk, off, ml, *w, "dice", softmax)
                out, lse = ops.activation_unit_pool_fwd(*args)
                if phase in ("all", "bwd"):
                    go = torch.randn_like(out)
                    ops.activation_unit_pool_bwd(go, *args, lse, (go.float() * out.float()).sum(-1))
torch.cuda.synchronize()
print("activation-unit sanitize case done")
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
