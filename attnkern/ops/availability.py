"""Which backends exist in this install, and why not when they don't.

Imports nothing heavy and nothing else of attnkern: the compiled extension and Triton are
imported on first use, inside the probes, and nothing here touches the GPU at import time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class BackendInfo:
    """Availability record of one backend: `reason` says why not and how to get it; `emulated`:
    the backend's kernels run on the CPU through an emulation (the CUDA emulation build)."""

    available: bool
    reason: str = ""
    emulated: bool = False


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run in this install; `reason` says why."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__("attnkern backend %r is unavailable: %s" % (backend, reason))
        self.backend = backend
        self.reason = reason


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled module attnkern._C, or None; and the import error text. Importing it
    registers the C++ ops (schemas and kernels) with the dispatcher."""
    try:
        mod = importlib.import_module("attnkern._C")
    except ImportError as e:  # pragma: no cover - depends on the install
        return None, str(e)
    return mod, ""


CUDA_EMU_PREFIX = "cuda_emu_"


@functools.lru_cache(maxsize=None)
def cuda_emulation() -> str:
    """"" when this build carries the CUDA emulation (attnkern._cuda_emu, scripts/cuda_emu.sh)
    and it can load; else why not ("absent" when this is not that build). Imports nothing."""
    if importlib.util.find_spec("attnkern._cuda_emu") is None:
        return "absent"
    import ctypes

    # The module is AddressSanitizer-instrumented: without the preloaded runtime, loading it
    # would end the process.
    if not hasattr(ctypes.CDLL(None), "__asan_init"):
        return ("attnkern._cuda_emu is a sanitizer build and needs the AddressSanitizer runtime "
                "preloaded; run it through scripts/cuda_emu.sh")
    return ""


@torch.compiler.assume_constant_result
def cuda_emulated() -> bool:
    """True when backend "cuda" runs csrc/cuda's kernels on CPU tensors through the emulation.
    Under torch.compile evaluated eagerly and taken as a constant."""
    return cuda_emulation() == ""


def cpu_isa() -> str:
    """The instruction set attnkern's CPU kernels run on in this process: the extension's own
    answer (amx, avx512_bf16, avx512, avx2 or generic; "-emulated" appended in the emulation
    test build), else, without the extension, the launcher's rule applied to the CPU's flags (the
    widest of amx (AMX-TILE and AMX-BF16 on top of avx512_bf16; the extension also needs the
    kernel's permission to use the tiles), avx512_bf16, avx512 (F/BW/VL/DQ, FMA) and avx2 (FMA,
    F16C) the CPU has, capped by ATTNKERN_CPU_ISA)."""
    mod, _ = extension()
    if mod is not None and hasattr(mod, "cpu_isa"):
        return str(mod.cpu_isa())
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = os.environ.get("ATTNKERN_CPU_ISA", "")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "avx2"} <= flags
    if avx512 and {"avx512_bf16", "amx_tile", "amx_bf16"} <= flags and cap in ("", "amx"):
        return "amx (from the CPU flags)"
    if avx512 and "avx512_bf16" in flags and cap in ("", "avx512_bf16", "amx"):
        return "avx512_bf16 (from the CPU flags)"
    if avx512 and cap in ("", "avx512", "avx512_bf16", "amx"):
        return "avx512 (from the CPU flags)"
    if {"avx2", "fma", "f16c"} <= flags and cap != "generic":
        return "avx2 (from the CPU flags)"
    return "generic (from the CPU flags)"


def _has_kernel(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:
        return False


def triton_interpret() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_status() -> BackendInfo:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return BackendInfo(False, "Triton is not installed (%s): pip install triton" % e)
    try:
        importlib.import_module("attnkern.triton_kernels.attention_pool")
    except ImportError as e:
        return BackendInfo(False, "the Triton kernels failed to import: %s" % e)
    if triton_interpret():
        from attnkern.triton_kernels.attention_pool import interpreter_problem

        problem = interpreter_problem()
        return BackendInfo(not problem, problem)
    if not torch.cuda.is_available():
        return BackendInfo(
            False,
            "Triton needs a CUDA GPU and none is visible; set TRITON_INTERPRET=1 before "
            "importing attnkern to run the Triton kernels on CPU tensors through the interpreter",
        )
    return BackendInfo(True)


def backend_info(name: str) -> BackendInfo:
    if name == "reference":
        return BackendInfo(True)
    if name == "triton":
        return _triton_status()
    mod, err = extension()
    if mod is None:
        return BackendInfo(
            False,
            "the compiled extension attnkern._C failed to import (%s); reinstall with "
            "`pip install --no-build-isolation -e .` next to an installed torch" % err,
        )
    if name == "cpu":
        if _has_kernel("attnkern::attention_pool_fwd", "CPU"):
            return BackendInfo(True)
        return BackendInfo(False, "attnkern._C has no CPU kernels; rebuild the extension")
    if name == "cuda":
        if cuda_emulated():  # on CPU tensors, through the harness of csrc/cuda_emu
            return BackendInfo(True, emulated=True)
        if cuda_emulation() != "absent":
            return BackendInfo(False, cuda_emulation())
        if not mod.built_with_cuda():
            return BackendInfo(
                False,
                "attnkern._C was built without CUDA kernels; rebuild with a CUDA build of torch "
                "and nvcc on PATH (ATTNKERN_CUDA=1 pip install --no-build-isolation -e .)",
            )
        if not torch.cuda.is_available():
            return BackendInfo(False, "the CUDA kernels are built but no CUDA GPU is visible")
        return BackendInfo(True)
    raise ValueError("unknown backend %r; expected one of %s" % (name, ", ".join(BACKENDS)))


def backends() -> dict:
    """Maps each backend name to a BackendInfo(available, reason)."""
    return {name: backend_info(name) for name in BACKENDS}


def cuda_kernels_built() -> bool:
    """True when the extension carries CUDA kernels (whether or not a GPU is visible)."""
    mod, _ = extension()
    return mod is not None and bool(mod.built_with_cuda())
