// In the CUDA emulation build this folder comes first on the include path: the kernels'
// <cuda_runtime.h> is the harness (csrc/cuda_emu/cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
