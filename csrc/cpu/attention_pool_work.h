// The attention pool's work decomposition on the CPU: which positions of each row take part,
// and how the (row, head) tasks are cut into parallel items and run in order.
//
// One task per (row, head); a task reads only the valid positions of its row (padded prefix,
// mask list or jagged slice) in one online-softmax pass. When there are few (row, head) tasks
// (a shape-only rule, so the result never depends on the thread count), long rows are cut into
// fixed-length slices computed in parallel and merged with their log-sum-exp in a fixed order
// (attention_pool_launch.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "attention_pool.h"
#include "attention_pool_kernels.h"

namespace attnkern {
namespace cpu {

// Rows with more valid positions than this are split when there are few (row, head) tasks.
constexpr int64_t kSplitLen = 512;
constexpr int64_t kSplitMaxTasks = 64;

// Which positions of row b take part: padded rows [0, len) or a mask, jagged rows a slice.
struct Rows {
  int64_t B = 0;
  int64_t L = 0;                    // padded length (positions per row in key)
  const int64_t* lengths = nullptr;  // padded + lengths
  const bool* mask = nullptr;        // padded + mask, [B, L] contiguous
  const int64_t* offsets = nullptr;  // jagged
  at::Tensor keep_alive;

  int64_t start(int64_t b) const { return offsets ? offsets[b] : 0; }
  // Valid count; for a mask row also fills idx with the valid positions.
  int64_t count(int64_t b, std::vector<int64_t>* idx) const {
    if (offsets) return offsets[b + 1] - offsets[b];
    if (lengths) return lengths[b];
    if (mask) {
      const bool* m = mask + b * L;
      int64_t c = 0;
      if (idx) {
        idx->resize(L);
        for (int64_t l = 0; l < L; ++l)
          if (m[l]) (*idx)[c++] = l;
      } else {
        for (int64_t l = 0; l < L; ++l) c += m[l];
      }
      return c;
    }
    return L;
  }
};

// The rows of the padded layout (a lengths or mask tensor, checked here) and of the jagged one.
Rows padded_rows(const PoolDims& d, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask);
Rows jagged_rows(const PoolDims& d, const at::Tensor& offsets, int64_t max_length);

// A unit of parallel work: (row, head) task, and the slice [i0, i1) of its valid positions;
// for a mask row, l0 is the mask position of valid position i0 (so that an item's positions
// are found by scanning only its own part of the mask).
struct Item {
  int64_t task;
  int64_t i0, i1;
  int64_t l0;
};

// The split plan: empty when no row is split (then items are the tasks themselves).
// float64 rows are never split: their backward recomputes the softmax statistics over the
// whole row.
std::vector<Item> split_plan(const Rows& rows, int64_t H, int dtype);

// The order in which the split items run: within a row, piece by piece, and for each piece
// every head in turn. In the padded [B, L, H, D] and jagged [T, H, D] layouts the heads of a
// position are neighbours in memory, so the H items of one piece together read one contiguous
// stretch of K and V (a head alone reads D of every H * D elements: a strided stream that ran
// at about half the memory bandwidth). The merge still finds a task's items contiguous in
// `items` (the plan's order: row, head, piece).
std::vector<int64_t> execution_order(const std::vector<Item>& items, int64_t H);

// Whether each position's K rows of all heads (and its V rows) lie back to back in memory, so
// that the first head of a split piece can prefetch them all in one stream.
bool heads_are_neighbours(const FwdParams& p);

// The at::parallel_for grain of tasks that cost about per_task_cost multiply-adds each.
int64_t grain_for(int64_t per_task_cost);

// Runs f(t, span) for the (row, head) tasks [t0, t1) in order, span = the task's valid
// positions. Before each task runs, the first rows of the next one are prefetched, so that they
// arrive while this one computes (the kernels prefetch the rest of a task as they go). Mask rows
// are left to the kernels: their positions are known only when the row starts.
// With step = H (t0 a multiple of H), one call per row, its span at head 0 (p.heads = H).
template <class F>
void for_each_task(const FwdParams& p, const Rows& rows, int64_t t0, int64_t t1, int64_t step, F&& f) {
  const int64_t H = p.H;
  auto prefetch = [&](int64_t t) {
    const int64_t b = t / H;
    if (!rows.mask) prefetch_span_head(p, Span{b, t % H, rows.start(b), rows.count(b, nullptr), nullptr});
  };
  std::vector<int64_t> idx;
  int64_t idx_row = -1, cnt = 0;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t b = t / H;
    if (b != idx_row) {
      cnt = rows.count(b, &idx);
      idx_row = b;
    }
    if (t == t0) prefetch(t);
    if (t + step < t1) prefetch(t + step);
    f(t, Span{b, t % H, rows.start(b), cnt, rows.mask ? idx.data() : nullptr});
  }
}

// Runs f(j, span) for the split items order[j] (execution_order), j = j0, j0 + step, ... < j1:
// span = positions [it.i0, it.i1) of the item's task. Before each item runs, the first rows of
// the next one are prefetched (of every head when p.heads says so): the kernels
// prefetch only inside their own span, so each piece would otherwise start on cold memory.
template <class F>
void for_each_item(const FwdParams& p, const Rows& rows, const std::vector<Item>& items,
                   const std::vector<int64_t>& order, int64_t j0, int64_t j1, int64_t step, F&& f) {
  const int64_t H = p.H;
  std::vector<int64_t> idx;
  auto span_of = [&](const Item& it, int64_t n) {
    // A piece that starts a row and is shorter than a split is the whole row.
    return Span{it.task / H, it.task % H, rows.start(it.task / H) + (rows.mask ? 0 : it.i0), n,
                rows.mask ? idx.data() : nullptr, it.i0 == 0 && it.i1 < kSplitLen};
  };
  auto prefetch = [&](int64_t j) {
    const Item& it = items[order[j]];
    if (!rows.mask && it.i1 > it.i0) prefetch_span_head(p, span_of(it, it.i1 - it.i0));
  };
  for (int64_t j = j0; j < j1; j += step) {
    if (j == j0) prefetch(j);
    if (j + step < j1) prefetch(j + step);
    const Item& it = items[order[j]];
    const int64_t b = it.task / H;
    const int64_t n = it.i1 - it.i0;
    if (rows.mask) {  // this item's positions only: its part of the mask, from l0
      idx.resize(std::max<int64_t>(n, 1));
      const bool* m = rows.mask + b * rows.L;
      for (int64_t l = it.l0, c = 0; c < n; ++l)
        if (m[l]) idx[c++] = l;
    }
    f(j, span_of(it, n));
  }
}

}  // namespace cpu
}  // namespace attnkern
