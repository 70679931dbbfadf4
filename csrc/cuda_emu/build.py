"""The CUDA emulation build's extension attnkern._cuda_emu (setup.py with ATTNKERN_CUDA_EMULATION=1;
scripts/cuda_emu.sh runs it on a copy of the tree).

csrc/cuda's kernels (*.cu) are compiled as C++ through the harness (cuda_emu.h) after two
rewrites C++ cannot do with macros, written to build/cuda_emu_gen/ with #line markers so that
every report names the original file and line:
  k<<<grid, block, smem, stream>>>(args)   ->  k | ::cuda_emu::LaunchConfig{grid, block, smem, stream}(args)
  extern __shared__ T name[];              ->  T* name = ::cuda_emu::dynamic_shared_as<T>();
  __shared__ T name[N]...;                 ->  auto& name = ::cuda_emu::static_shared_as<T[N]...>("name", line);
The launchers (csrc/cuda/*_cuda.cpp) are compiled unchanged with ATTNKERN_CUDA_EMULATION, and the
self-test kernels of csrc/cuda_emu/selftest.cu (each breaks one rule the harness checks) beside them.

Every file of the module is compiled with -fsanitize=kernel-address and outlined checks: each load
and store calls the hooks of runtime.cpp (AddressSanitizer's verdict, plus the shared-memory
checks), and with UndefinedBehaviorSanitizer; the module links the AddressSanitizer runtime,
which must be preloaded (scripts/cuda_emu.sh does).
"""

from __future__ import annotations

import glob
import os
import re
import sys

_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]*\])*)\s*;")


def translate(text: str) -> str:
    """A .cu source rewritten for a host compiler (same line count: reports keep their lines)."""
    text = _LAUNCH.sub(lambda m: " | ::cuda_emu::LaunchConfig{%s}" % m.group(1), text)
    text = _DYNAMIC_SHARED.sub(lambda m: "%s* %s = ::cuda_emu::dynamic_shared_as<%s>();"
                               % (m.group(1), m.group(2), m.group(1)), text)
    text = _STATIC_SHARED.sub(lambda m: 'auto& %s = ::cuda_emu::static_shared_as<%s%s>("%s", __LINE__);'
                              % (m.group(2), m.group(1), m.group(3), m.group(2)), text)
    return text


def _generate(root: str, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    sources = []
    for path in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))
                       + glob.glob(os.path.join(root, "csrc", "cuda_emu", "*.cu"))):
        rel = os.path.relpath(path, root)
        with open(path) as f:
            text = translate(f.read())
        out = os.path.join(out_dir, rel.replace(os.sep, "_")[: -len(".cu")] + ".cpp")
        body = '#line 1 "%s"\n%s' % (path, text)
        old = open(out).read() if os.path.exists(out) else None
        if old != body:  # unchanged files keep their time stamp (no recompile)
            with open(out, "w") as f:
                f.write(body)
        sources.append(os.path.relpath(out, root))
    return sources


SANITIZE = [
    "-fsanitize=kernel-address,undefined",
    "--param=asan-instrumentation-with-call-threshold=0",
    "--param=asan-stack=0",
    "--param=asan-globals=0",
    "-fno-sanitize-address-use-after-scope",
    "-fno-sanitize-recover=undefined",
]


def _toolkit_include() -> list:
    """The folder with the toolkit's host-side headers (cuda_fp16.h, driver_types.h, ...): the CUDA
    toolkit's, else the pip CUDA wheels' (nvidia/cu*/include), which torch's CUDA builds install."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(CUDA_HOME, "include")] if CUDA_HOME else []
    candidates.append("/usr/local/cuda/include")
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    for c in candidates:
        if all(os.path.exists(os.path.join(c, h)) for h in ("cuda_fp16.h", "crt/host_defines.h")):
            return [c]
    raise RuntimeError("the CUDA emulation needs the CUDA headers (cuda_fp16.h): install a CUDA "
                       "toolkit or a CUDA build of torch (its nvidia-cuda-runtime wheel)")


def extensions(root: str) -> list:
    from torch.utils.cpp_extension import CppExtension

    gen = _generate(root, os.path.join(root, "build", "cuda_emu_gen"))
    sources = gen + sorted(os.path.relpath(p, root) for p in
                           glob.glob(os.path.join(root, "csrc", "cuda", "*_cuda.cpp"))
                           + glob.glob(os.path.join(root, "csrc", "cuda_emu", "*.cpp")))
    # The launchers' shared checks, compiled into this module too (attnkern._C hides its symbols).
    sources += [os.path.join("csrc", "attention_pool_checks.cpp"), os.path.join("csrc", "activation_unit_checks.cpp")]
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off", "-fvisibility=hidden",
             "-DATTNKERN_CUDA_EMULATION"] + SANITIZE
    return [
        CppExtension(
            "attnkern._cuda_emu",
            sources,
            # include/ first: the kernels' <cuda_runtime.h> is the harness.
            include_dirs=[os.path.join(root, "csrc", "cuda_emu", "include"),
                          os.path.join(root, "csrc", "cuda_emu"),
                          os.path.join(root, "csrc", "cuda"),
                          os.path.join(root, "csrc")] + _toolkit_include(),
            extra_compile_args={"cxx": flags},
            extra_link_args=["-fsanitize=address,undefined"],
        )
    ]
