// Op schemas of DIN's activation-unit pooling (declared once; see attnkern/reference.py,
// activation_unit_pool_ref, for the math, which every backend implements exactly; the contract
// is docs/contract.md).
//
// One forward and one backward op serve both layouts: `offsets` given = jagged (key [T, E],
// value [T, Dv]), else padded (key [B, L, E], value [B, L, Dv]) with at most one of
// lengths [B] / mask [B, L] (True = the position takes part). max_length is for the jagged
// layout (-1 = unknown) and ignored for the padded one.
//
// MLP (nn.Linear convention, y = x W^T + b), over x_l = [q, k_l, q - k_l, q * k_l]:
//   w1 [H1, 4E], b1 [H1]; optional second hidden layer w2 [H2, H1], b2 [H2] (both or neither);
//   w_out [1, Hlast], b_out [1]. 1 <= H1, H2 <= 256, 1 <= E, Dv <= 256.
// activation: "relu" | "sigmoid" | "prelu" | "dice", the same for every hidden layer.
//   act1 / act2: parameters of hidden layer 1 / 2 ([P, H] with the query's dtype), None for
//   relu/sigmoid; prelu: P = 1 (row 0 = slope); dice: P = 3 (rows alpha, scale, shift:
//   y = x * (alpha + (1 - alpha) * sigmoid(scale * x + shift))).
// value None: the keys are also the values (DIN pools its history itself); the backward then
//   returns one grad_key holding both contributions and an empty grad_value, so no second
//   [B, L, E] gradient is materialised and summed.
// softmax: false = raw scores as weights (DIN), true = masked softmax over the row.
// Outputs: out [B, N, Dv] and lse [B, N], both float64 for float64 inputs, else float32 (out
//   unrounded, so that the autograd forms delta from it; the public function rounds it):
//   the log-sum-exp of the scores when softmax (-inf on empty rows), 0 otherwise.
// Scores (attnkern.activation_unit_weights): activation_unit_scores_fwd takes the forward's
//   arguments without value and returns (scores, lse): padded [B, N, L] / jagged [T, N], the
//   raw scores or (softmax) the masked softmax weights, 0 at positions outside every row and on
//   empty rows, in lse's dtype; lse as the forward's. No backward op of its own: the gradient of
//   sum_l w_l dW_l is the pooling backward's with dW as the values (attnkern/ops/activation_scores.py).
// Backward: delta [B, N] (dtype of lse) = sum_d grad_out * out (read only when softmax).
//   Returns the gradients of query, key, value, w1, b1, w2, b2, w_out, b_out, act1, act2, each
//   shaped like its input; those of absent optional inputs are empty [0] tensors.
#include <torch/library.h>

#include <memory>
#include <vector>

#include "input_checks.h"

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "activation_unit_pool_fwd(Tensor query, Tensor key, Tensor? value, Tensor? lengths, "
      "Tensor? mask, Tensor? offsets, int max_length, Tensor w1, Tensor b1, Tensor? w2, "
      "Tensor? b2, Tensor w_out, Tensor b_out, Tensor? act1, Tensor? act2, str activation, "
      "bool softmax) -> (Tensor out, Tensor lse)");
  m.def(
      "activation_unit_pool_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor? value, "
      "Tensor? lengths, Tensor? mask, Tensor? offsets, int max_length, Tensor w1, Tensor b1, "
      "Tensor? w2, Tensor? b2, Tensor w_out, Tensor b_out, Tensor? act1, Tensor? act2, "
      "str activation, bool softmax, Tensor lse, Tensor delta) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_w1, "
      "Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_w_out, Tensor grad_b_out, "
      "Tensor grad_act1, Tensor grad_act2)");
  m.def(
      "activation_unit_scores_fwd(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, "
      "Tensor? offsets, int max_length, Tensor w1, Tensor b1, Tensor? w2, Tensor? b2, Tensor w_out, "
      "Tensor b_out, Tensor? act1, Tensor? act2, str activation, bool softmax) "
      "-> (Tensor scores, Tensor lse)");
}

// Sparse, mkldnn and nested tensors dispatch to keys of their own, where no kernel could run
// them: there check_dense() turns them into a TypeError that names the argument,
// instead of the dispatcher's "could not run ... with arguments from the SparseCPU backend".
namespace {

void reject_non_strided(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (v.isTensor()) attnkern::check_dense(v.toTensor(), args[i].name().c_str());
  }
  TORCH_CHECK_TYPE(false, "attnkern: ", op.schema().name(), " takes dense (strided) tensors only");
}

// One registration per layout key (CPU and CUDA alike: no kernel runs there).
const bool kLayoutsRejected = [] {
  static std::vector<std::unique_ptr<torch::Library>> libraries;
  for (const auto key : {c10::DispatchKey::SparseCPU, c10::DispatchKey::SparseCsrCPU, c10::DispatchKey::MkldnnCPU,
                         c10::DispatchKey::NestedTensorCPU, c10::DispatchKey::SparseCUDA,
                         c10::DispatchKey::SparseCsrCUDA, c10::DispatchKey::NestedTensorCUDA}) {
    libraries.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "attnkern", key, __FILE__, __LINE__));
    for (const char* op : {"activation_unit_pool_fwd", "activation_unit_pool_bwd", "activation_unit_scores_fwd"})
      libraries.back()->impl(op, torch::CppFunction::makeFromBoxedFunction<&reject_non_strided>());
  }
  return true;
}();

}  // namespace
