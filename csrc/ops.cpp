// The op schemas, declared once. Each backend adds its kernels with
// TORCH_LIBRARY_IMPL(attnkern, CPU|CUDA, m); the Triton kernels are separate Python custom ops
// (attnkern::triton_*), fake impls and autograd are registered in attnkern/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention_pool.h"
#include "cpu/isa_dispatch.h"

TORCH_LIBRARY(attnkern, m) {
  m.def(
      "attention_pool_fwd(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
      "float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_pool_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, "
      "Tensor? mask, Tensor lse, Tensor delta, float scale) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  m.def(
      "jagged_attention_pool_fwd(Tensor query, Tensor key, Tensor value, Tensor offsets, "
      "int max_length, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "jagged_attention_pool_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor offsets, int max_length, Tensor lse, Tensor delta, float scale) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

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
}
