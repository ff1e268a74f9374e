// CUDA batched linear sum assignment, registered for the CUDA dispatch key. Only the device policy lives here
// (ATen allocation, <<<>>> launch); the host flow is lsap_host.h, the launch parameters lsap_launch.h, the device
// code lsap_kernel.cuh — all also run, on the CPU, by the SIMT emulator of tests/simt/. The host never synchronises
// (safe under CUDA graph capture).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "assignment/cuda/lsap_host.h"

namespace deformable_detr {
namespace lsap {
namespace {

struct CudaDevice {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
  at::Tensor adopt(const at::Tensor& t) { return t; }

  template <typename Kernel, typename... Args>
  void launch(const msda::LaunchInfo&, Kernel kernel, int64_t blocks, int threads, size_t shared, Args... args) {
    kernel<<<static_cast<unsigned>(blocks), threads, shared, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> batched_lsap_cuda(const at::Tensor& cost,
                                                     const std::optional<at::Tensor>& num_cols) {
  const c10::cuda::CUDAGuard guard(cost.device());
  CudaDevice dev;
  return batched_lsap_on(dev, cost, num_cols);
}

}  // namespace
}  // namespace lsap
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CUDA, m) { m.impl("batched_lsap", &deformable_detr::lsap::batched_lsap_cuda); }
