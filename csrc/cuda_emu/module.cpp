// The Python module attnkern._cuda_emu: loading it registers the launchers of csrc/cuda as the
// CPU kernels of attnkern::cuda_emu_<op> (cuda_launch.h); selftest runs the harness's own test
// kernels (selftest.cu).
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cuda_emu.h"

namespace cuda_emu_selftest {
std::vector<float> run(const std::string& name);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "attnkern's CUDA kernels run on the CPU through the emulation harness";
  mod.def("selftest", &cuda_emu_selftest::run,
          "Runs a self-test kernel of the harness; its output, or RuntimeError with the report");
  mod.def("sm_count", &cuda_emu::emulated_sm_count,
          "The multiprocessor count the launchers plan for (ATTNKERN_CUDA_EMU_SMS, default 4)");
}
