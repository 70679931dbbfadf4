# Sourced by scripts/sanitize_cpu.sh and scripts/cuda_emu.sh: the copy of the sources a sanitizer
# build is made in, the environment that runs Python on it, and the verdict on its log.
#
#   sanitizer_copy OUT_DIR          copies the tree's sources into OUT_DIR/src
#   sanitizer_env OUT_DIR SRC_DIR   exports LD_PRELOAD, ASAN_OPTIONS, UBSAN_OPTIONS, PYTHONPATH
#   sanitizer_verdict LOG NAME      non-zero (and the reports shown) when LOG holds one
#   sanitizer_run OUT_DIR NAME FN [ARG...]
#                                   runs the shell function FN ARG... in OUT_DIR/src on that
#                                   environment (once Python imports attnkern from there), its
#                                   output in OUT_DIR/run.log, stopping at its first failing step;
#                                   shows the log's tail; returns FN's status, 1 on a sanitizer
#                                   report
#
# Python itself is not instrumented: the ASan runtime is preloaded, and leak detection is off
# (the interpreter's own allocations at exit are not ours to judge).

sanitizer_copy() {
  mkdir -p "$1/src"
  # cp -a keeps the sources' times, so an unchanged file is not recompiled on a second run.
  cp -a setup.py pyproject.toml README.md pytest.ini csrc attnkern triton_kernels tests scripts "$1/src/"
}

sanitizer_env() {
  local out="$1" src="$2" cxx="${CXX:-c++}"
  # libstdc++ right after the ASan runtime: its __cxa_throw interceptor finds the real one only
  # if libstdc++ is loaded when ASan starts (python itself does not link it), else the first C++
  # exception (any TORCH_CHECK) aborts in a CHECK of the interceptor.
  export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  # Triton's own native module aborts under the preloaded ASan runtime (a CHECK in its
  # __cxa_throw interceptor while Triton's pybind module initialises): it is not under test
  # here, so a stub package hides it (attnkern then reports the triton backend unavailable).
  mkdir -p "$out/no_triton/triton"
  echo 'raise ImportError("triton is hidden in the sanitizer run")' > "$out/no_triton/triton/__init__.py"
  export PYTHONPATH="$src:$out/no_triton${PYTHONPATH:+:$PYTHONPATH}"
}

sanitizer_verdict() {
  local log="$1" name="$2"
  if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
    grep -nE -A30 "ERROR: AddressSanitizer|runtime error:" "$log" | head -80
    echo "$name: sanitizer report (log: $log)"
    return 1
  fi
}

sanitizer_imports_from() {
  python -c "import attnkern, sys; assert attnkern.__file__.startswith(sys.argv[1]), attnkern.__file__" "$1"
}

sanitizer_run() {
  local out="$1" name="$2" fn="$3" status=0
  shift 3
  sanitizer_env "$out" "$out/src"
  export -f sanitizer_imports_from "$fn"
  # A child shell with errexit: the first failing step ends the run with its status (in a
  # subshell here, errexit would be off wherever the caller tests this function's status).
  (cd "$out/src" && bash -eo pipefail -c 'sanitizer_imports_from "$PWD"; "$@"' _ "$fn" "$@") \
    > "$out/run.log" 2>&1 || status=$?
  sanitizer_verdict "$out/run.log" "$name" || return 1
  tail -25 "$out/run.log"
  return $status
}
