// The MSDA CUDA host flow and device code (csrc/ms_deform_attn/cuda/) run under the emulator.
#include "simt.h"
// clang-format off
#include "device.h"
#include "ops.h"
#include "ms_deform_attn/cuda/ms_deform_attn_host.h"
// clang-format on

namespace simt {

at::Tensor msda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                        const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                        const std::optional<at::Tensor>& point_start, bool discrete) {
  SimtDevice dev{value.scalar_type()};
  return deformable_detr::msda::forward_on(dev, value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, point_start, discrete)
      .clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msda_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    bool deterministic, const std::optional<at::Tensor>& point_start, bool discrete) {
  SimtDevice dev{value.scalar_type()};
  auto [gv, gl, gw] =
      deformable_detr::msda::backward_on(dev, deterministic, grad_output, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights, point_start, discrete);
  return {gv.clone(), gl.clone(), gw.clone()};
}

}  // namespace simt
