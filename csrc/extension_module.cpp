// The Python module attnkern._C: build facts, the CPU instruction sets and the ops' size
// limits (csrc/op_limits.h). Importing it also registers every op of this library (the schemas
// in attention_pool_ops.cpp and activation_unit_ops.cpp, the kernels in cpu/ and cuda/).
#include <torch/extension.h>

#include "cpu/isa_dispatch.h"
#include "op_limits.h"

namespace {
bool built_with_cuda() {
#ifdef ATTNKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "attnkern compiled kernels (op schemas, CPU and CUDA implementations)";
  mod.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");
  mod.def("cpu_isa", [] { return std::string(attnkern::cpu_isa()); }, attnkern::kCpuIsaDoc);
  mod.def("cpu_isas", &attnkern::cpu_isas, attnkern::kCpuIsasDoc);
  mod.attr("MAX_HEAD_DIM") = attnkern::kMaxHeadDim;
  mod.attr("MAX_UNITS") = attnkern::kMaxUnits;
}
