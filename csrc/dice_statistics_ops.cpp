// Op schemas of Dice's batch statistics in training (attnkern.functional.dice_batch_statistics;
// the math in torch ops is that function's reference path), declared once.
//
// The inputs are activation_unit_pool_fwd's (csrc/activation_unit_ops.cpp): query [B, N, E],
// key padded [B, L, E] with at most one of lengths / mask, or jagged [T, E] with offsets;
// w1 [H1, 4E], b1 [H1]. all_positions: count every padded position [B, L] of every query,
// padding included (the zoos' layers run their MLP on all of them); false, or the jagged layout:
// only the valid positions.
//
// fwd: the mean and the biased variance, per unit, of the last given layer's pre-activation over
//   the counted (row, query, position) samples: the first layer's (act1, w2, b2 absent), or the
//   second layer's (act1 [3, H1]: Dice's alpha, scale, shift of the first layer, in the query's
//   dtype; w2 [H2, H1], b2 [H2]). float64 for float64 inputs, else float32; accumulated in
//   float64 in a fixed order (the thread count changes nothing). No counted sample: 0 and 0.
// bwd: given grad_mean and grad_var ([H], dtype of mean) and the forward's mean, the gradients of
//   query, key, w1, b1, act1, w2, b2, each shaped like its input ([0] for the absent ones);
//   positions outside the counted ones get exactly zero key gradient.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "dice_statistics_fwd(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, Tensor? offsets, "
      "int max_length, bool all_positions, Tensor w1, Tensor b1, Tensor? act1, Tensor? w2, Tensor? b2) "
      "-> (Tensor mean, Tensor var)");
  m.def(
      "dice_statistics_bwd(Tensor grad_mean, Tensor grad_var, Tensor query, Tensor key, Tensor? lengths, "
      "Tensor? mask, Tensor? offsets, int max_length, bool all_positions, Tensor w1, Tensor b1, Tensor? act1, "
      "Tensor? w2, Tensor? b2, Tensor mean) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_w1, Tensor grad_b1, Tensor grad_act1, "
      "Tensor grad_w2, Tensor grad_b2)");
}
