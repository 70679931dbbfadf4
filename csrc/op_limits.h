// The ops' size limits, defined once for every C++ and CUDA file. attnkern._C exposes them
// (csrc/extension_module.cpp); the Python package defines the same numbers in attnkern/limits.py
// and tests/test_contract.py checks that the two agree.
#pragma once

#include <cstdint>

namespace attnkern {

// attention_pool: 1 <= Dk, Dv <= kMaxHeadDim (the kernels' per-thread and per-tile buffers).
constexpr int64_t kMaxHeadDim = 256;
// activation_unit_pool: 1 <= E, Dv, H1, H2 <= kMaxUnits (the kernels' per-thread buffers and
// the hidden activations of a key tile).
constexpr int64_t kMaxUnits = 256;

}  // namespace attnkern
