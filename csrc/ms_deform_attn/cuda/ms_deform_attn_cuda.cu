// CUDA entry points of multi-scale deformable attention, registered for the CUDA dispatch key. Same contract and
// dtype rule as cpu/ms_deform_attn_cpu.cpp. Only the device policy lives here (ATen allocation, <<<>>> launch);
// the host flow is ms_deform_attn_host.h, the launch shapes ms_deform_attn_launch.h, the device code
// ms_deform_attn_kernels.cuh — all three are also run, on the CPU, by the SIMT emulator of tests/simt/.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ms_deform_attn/cuda/ms_deform_attn_host.h"

namespace deformable_detr {
namespace msda {
namespace {

struct CudaDevice {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
  at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::zeros(sizes, options); }
  at::Tensor adopt(const at::Tensor& t) { return t; }
  int64_t min_threads_in_flight() const { return kMinThreadsInFlight; }

  template <typename Kernel, typename... Args>
  void launch(const LaunchInfo&, Kernel kernel, int64_t blocks, int threads, size_t shared, Args... args) {
    kernel<<<static_cast<unsigned>(blocks), threads, shared, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda_inputs(const at::Tensor& value) {
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn (CUDA): value must be a CUDA tensor, got ", value.device());
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start,
                               bool discrete) {
  check_cuda_inputs(value);
  const c10::cuda::CUDAGuard device_guard(value.device());
  CudaDevice dev;
  return forward_on(dev, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start,
                    discrete);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const std::optional<at::Tensor>& point_start, bool discrete) {
  check_cuda_inputs(value);
  const c10::cuda::CUDAGuard device_guard(value.device());
  CudaDevice dev;
  return backward_on(dev, at::globalContext().deterministicAlgorithms(), grad_output, value, spatial_shapes,
                     level_start_index, sampling_locations, attention_weights, point_start, discrete);
}

}  // namespace
}  // namespace msda
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) {
  m.impl("ms_deform_attn", &deformable_detr::msda::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &deformable_detr::msda::ms_deform_attn_backward_cuda);
}
