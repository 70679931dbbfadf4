// Op schemas of sequence self-attention (attnkern.sequence_attention), declared once. The math
// is attnkern.reference.sequence_attention_ref; the op-level layout (token-major tensors, rows
// given by starts/lengths, the time bucket as bounds) is docs/sequence_attention.md. Fake
// impls and autograd: attnkern/ops/sequence.py.
#include <torch/library.h>

#define ATTNKERN_SEQ_ARGS                                                                               \
  "Tensor query, Tensor key, Tensor value, Tensor starts, Tensor lengths, int max_length, "             \
  "Tensor? num_targets, int contextual_len, int max_attn_len, bool causal, bool silu, float scale, "   \
  "Tensor? attn_scale, float? attn_scale_value, Tensor? query_times, Tensor? key_times, "               \
  "Tensor? time_table, Tensor? time_bounds, Tensor? position_table, Tensor? bias"

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def("sequence_attention_fwd(" ATTNKERN_SEQ_ARGS ") -> (Tensor out, Tensor lse)");
  m.def("sequence_attention_bwd(Tensor grad_out, Tensor lse, Tensor delta, " ATTNKERN_SEQ_ARGS
        ") -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_time_table, "
        "Tensor grad_position_table, Tensor grad_bias)");
}

#undef ATTNKERN_SEQ_ARGS
