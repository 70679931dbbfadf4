// Op schema of the fused top-k by score (attnkern.attention_topk), declared once. The math is
// attnkern.reference.attention_topk_ref; the kernels are csrc/cpu/attention_topk_*. One op for
// both layouts: offsets given = jagged. Forward only (the public function makes the selected
// scores differentiable by recomputing them from the indices). Fake impl: attnkern/ops/topk.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(attnkern, m) {
  m.def(
      "attention_topk_fwd(Tensor query, Tensor key, Tensor? lengths, Tensor? mask, Tensor? offsets, int k, "
      "float scale, Tensor? bias=None) -> (Tensor scores, Tensor indices)");
}
