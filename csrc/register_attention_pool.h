// Registers the four attention-pool launchers of a backend under one dispatch key. Each backend
// registers them under its device key and under the keys of the layouts it refuses (sparse,
// sparse CSR, nested, mkldnn): the launchers' first checks (check_dense) turn those into a
// TypeError that names the argument, instead of the dispatcher's "could not run ... with
// arguments from the SparseCPU backend".
//
// NAME maps an op name to the registered name (identity, or the CUDA emulation's prefix).
#pragma once

#include <torch/library.h>

#define ATTNKERN_OP_NAME(NAME) NAME

#define ATTNKERN_REGISTER_POOL(KEY, NAME, FWD, BWD, JFWD, JBWD)   \
  TORCH_LIBRARY_IMPL(attnkern, KEY, m) {                          \
    m.impl(NAME("attention_pool_fwd"), &FWD);                     \
    m.impl(NAME("attention_pool_bwd"), &BWD);                     \
    m.impl(NAME("jagged_attention_pool_fwd"), &JFWD);             \
    m.impl(NAME("jagged_attention_pool_bwd"), &JBWD);             \
  }
