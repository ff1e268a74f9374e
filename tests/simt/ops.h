// Entry points of the emulator extension (bound to Python in module.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace simt {

// point_start / discrete: the op's points_per_level layout and sampling="discrete" (ms_deform_attn.cpp).
at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                        const std::optional<at::Tensor>& point_start, bool discrete);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool deterministic, const std::optional<at::Tensor>& point_start, bool discrete);
std::tuple<at::Tensor, at::Tensor> lsap(const at::Tensor& cost, const std::optional<at::Tensor>& num_cols);
// Runs one planted-bug kernel (see selftest.cpp); throws the emulator's report, or returns the output.
at::Tensor planted(const std::string& name, uint64_t seed, int poison);

}  // namespace simt
