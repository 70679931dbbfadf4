# Sourced by scripts/sanitize_cpu.sh and scripts/cuda_emu.sh: the environment that runs Python on a
# sanitizer build of attnkern, and the verdict on its log.
#
#   sanitizer_env OUT_DIR SRC_DIR   exports LD_PRELOAD, ASAN_OPTIONS, UBSAN_OPTIONS, PYTHONPATH
#   sanitizer_verdict LOG NAME      non-zero (and the reports shown) when LOG holds one
#
# Python itself is not instrumented: the ASan runtime is preloaded, and leak detection is off
# (the interpreter's own allocations at exit are not ours to judge).

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
