// The attention pool's work decomposition (attention_pool_work.h).
#include "attention_pool_work.h"

namespace attnkern {
namespace cpu {

Rows padded_rows(const PoolDims& d, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask) {
  Rows r;
  r.B = d.B;
  r.L = d.L;
  if (lengths.has_value()) {
    check_lengths_values_cpu(*lengths, d.L);
    r.keep_alive = lengths->to(at::kLong).contiguous();
    r.lengths = r.keep_alive.data_ptr<int64_t>();
  } else if (mask.has_value()) {
    r.keep_alive = mask->contiguous();
    r.mask = r.keep_alive.data_ptr<bool>();
  }
  return r;
}

Rows jagged_rows(const PoolDims& d, const at::Tensor& offsets, int64_t max_length) {
  check_offsets_values_cpu(offsets, d.L, max_length);
  Rows r;
  r.B = d.B;
  r.L = d.L;
  r.keep_alive = offsets.to(at::kLong).contiguous();
  r.offsets = r.keep_alive.data_ptr<int64_t>();
  return r;
}

std::vector<Item> split_plan(const Rows& rows, int64_t H, int dtype) {
  std::vector<Item> items;
  if (rows.B * H > kSplitMaxTasks || dtype == kF64) return items;
  bool any = false;
  std::vector<int64_t> counts(rows.B);
  for (int64_t b = 0; b < rows.B; ++b) {
    counts[b] = rows.count(b, nullptr);
    any = any || counts[b] > kSplitLen;
  }
  if (!any) return items;
  std::vector<int64_t> piece_l0;  // mask position where each piece of the row starts
  for (int64_t b = 0; b < rows.B; ++b) {
    const int64_t c = counts[b];
    piece_l0.clear();
    if (rows.mask) {  // one scan of the row's mask
      const bool* m = rows.mask + b * rows.L;
      for (int64_t l = 0, v = 0; l < rows.L; ++l)
        if (m[l] && v++ % kSplitLen == 0) piece_l0.push_back(l);
    }
    for (int64_t h = 0; h < H; ++h) {
      if (c == 0) items.push_back({b * H + h, 0, 0, 0});
      for (int64_t i0 = 0, k = 0; i0 < c; i0 += kSplitLen, ++k)
        items.push_back({b * H + h, i0, std::min(c, i0 + kSplitLen), rows.mask ? piece_l0[k] : 0});
    }
  }
  return items;
}

std::vector<int64_t> execution_order(const std::vector<Item>& items, int64_t H) {
  std::vector<int64_t> order;
  order.reserve(items.size());
  for (size_t r0 = 0; r0 < items.size();) {  // the items of one row: H runs of equal length
    const int64_t b = items[r0].task / H;
    size_t r1 = r0;
    while (r1 < items.size() && items[r1].task / H == b) ++r1;
    const size_t pieces = (r1 - r0) / size_t(H);
    for (size_t k = 0; k < pieces; ++k)
      for (int64_t h = 0; h < H; ++h) order.push_back(int64_t(r0 + size_t(h) * pieces + k));
    r0 = r1;
  }
  return order;
}

bool heads_are_neighbours(const FwdParams& p) {
  return p.H > 1 && p.k_sh == p.Dk && p.v_sh == p.Dv && p.k_sl == p.H * p.Dk && p.v_sl == p.H * p.Dv;
}

int64_t grain_for(int64_t per_task_cost) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, per_task_cost));
}

}  // namespace cpu
}  // namespace attnkern
