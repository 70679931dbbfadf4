// The CPU launchers of the four attention-pool ops and the two inference ops (attention_pool_launch.cpp), registered for
// the CPU dispatch keys by attention_pool_register.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace attnkern {

std::tuple<at::Tensor, at::Tensor> attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          const std::optional<at::Tensor>& lengths,
                                                          const std::optional<at::Tensor>& mask, double scale,
                                                          const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& mask, const at::Tensor& lse,
    const at::Tensor& delta, double scale, const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_fwd_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                 const at::Tensor& value, const at::Tensor& offsets,
                                                                 int64_t max_length, double scale,
                                                                 const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jagged_attention_pool_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& offsets, int64_t max_length, const at::Tensor& lse, const at::Tensor& delta, double scale,
    const std::optional<at::Tensor>& bias);

// The inference ops (same arguments and results as the forward ops; P V may round P to the input
// dtype).
std::tuple<at::Tensor, at::Tensor> attention_pool_infer_cpu(const at::Tensor& query, const at::Tensor& key,
                                                            const at::Tensor& value,
                                                            const std::optional<at::Tensor>& lengths,
                                                            const std::optional<at::Tensor>& mask, double scale,
                                                            const std::optional<at::Tensor>& bias);

std::tuple<at::Tensor, at::Tensor> jagged_attention_pool_infer_cpu(const at::Tensor& query, const at::Tensor& key,
                                                                   const at::Tensor& value,
                                                                   const at::Tensor& offsets, int64_t max_length,
                                                                   double scale,
                                                                   const std::optional<at::Tensor>& bias);

}  // namespace attnkern
