// Op schema of the quantized-K/V attention-pool forward (attnkern.attention_pool with int8 /
// uint8 / float8 key and value), declared once. One op for both layouts: offsets given = jagged
// (key [T, H, Dk]), else padded (key [B, L, H, Dk] with lengths or mask). Forward only; the
// input contract is docs/quantized.md, the math attnkern.reference.attention_pool_quant_ref.
// Fake impl and the autograd that refuses a gradient: attnkern/ops/quant.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "attention_pool_quant_fwd(Tensor query, Tensor key, Tensor value, Tensor key_scale, "
      "Tensor? key_bias, Tensor value_scale, Tensor? value_bias, Tensor? lengths, Tensor? mask, "
      "Tensor? offsets, int max_length, float scale, Tensor? bias=None) -> (Tensor out, Tensor lse)");
}
