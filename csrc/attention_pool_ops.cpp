// The attention pool's op schemas, declared once; this file also opens the attnkern library
// (the activation unit's schemas are a fragment of it, activation_unit_ops.cpp). Each backend
// adds its kernels with TORCH_LIBRARY_IMPL(attnkern, CPU|CUDA, m); the Triton kernels are
// separate Python custom ops (attnkern::triton_*). Fake impls and autograd are registered in
// attnkern/ops/autograd.py, the input contract is docs/contract.md (the bias's canonical layout:
// its section 5). `bias` comes last, with a default, so that callers and exported graphs of the
// ops without it stay valid; grad_bias is an empty tensor when bias is None.
#include <torch/library.h>

TORCH_LIBRARY(attnkern, m) {
  m.def(
      "attention_pool_fwd(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
      "float scale, Tensor? bias=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_pool_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? lengths, "
      "Tensor? mask, Tensor lse, Tensor delta, float scale, Tensor? bias=None) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)");
  m.def(
      "jagged_attention_pool_fwd(Tensor query, Tensor key, Tensor value, Tensor offsets, "
      "int max_length, float scale, Tensor? bias=None) -> (Tensor out, Tensor lse)");
  m.def(
      "jagged_attention_pool_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor offsets, int max_length, Tensor lse, Tensor delta, float scale, Tensor? bias=None) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_bias)");
  // The inference forward (CPU only): the forward ops' arguments and results, for calls whose
  // output no gradient will be taken of, so that P V may round P to the input dtype. The public
  // function decides (docs/serving.md); no backward.
  m.def(
      "attention_pool_infer(Tensor query, Tensor key, Tensor value, Tensor? lengths, Tensor? mask, "
      "float scale, Tensor? bias=None) -> (Tensor out, Tensor lse)");
  m.def(
      "jagged_attention_pool_infer(Tensor query, Tensor key, Tensor value, Tensor offsets, "
      "int max_length, float scale, Tensor? bias=None) -> (Tensor out, Tensor lse)");
}
