// Op schemas of the fused attention weights (attnkern.attention_weights), declared once. The math
// is attnkern.reference.attention_weights_ref; the CPU kernels are csrc/cpu/attention_weights_*,
// registered for the CPU key by csrc/cpu/attention_weights_launch.cpp. The autograd
// (attnkern/ops/weights.py, shared by every backend) needs nothing but the weights.
// The canonical layouts and the bias rule are attention_pool_fwd's (csrc/attention_pool.h):
// query [B, N, H, Dk] with key [B, L, H, Dk] (weights [B, N, H, L]) or jagged key [T, H, Dk]
// (weights [T, N, H]); lse [B, N, H]; both float32, float64 for float64 inputs.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "attention_weights_fwd(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, float scale, "
      "Tensor? bias=None) -> (Tensor weights, Tensor lse)");
  m.def(
      "jagged_attention_weights_fwd(Tensor query, Tensor key, Tensor offsets, int max_length, float scale, "
      "Tensor? bias=None) -> (Tensor weights, Tensor lse)");
  // dq and dk (and dS = w (dW - sum_l dW w + dlse) when need_grad_scores, else an empty
  // grad_scores) from the weights and their gradient, both layouts (offsets given = jagged), for
  // backends that fuse them; the autograd forms them in torch ops where a backend has none.
  m.def(
      "attention_weights_bwd(Tensor grad_weights, Tensor weights, Tensor? grad_lse, Tensor query, Tensor key, "
      "Tensor? lengths, Tensor? mask, Tensor? offsets, float scale, bool need_grad_scores=False) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_scores)");
}
