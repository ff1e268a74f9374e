// CUDA batched linear sum assignment, registered for the CUDA dispatch key. Only the entry point lives here
// (the device policy is common/cuda_device.h); the host flow is lsap_host.h, the launch parameters lsap_launch.h, the
// device code lsap_kernel.cuh — all also run, on the CPU, by the SIMT emulator of tests/simt/. The host never
// synchronises (safe under CUDA graph capture).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "assignment/cuda/lsap_host.h"
#include "common/cuda_device.h"

namespace deformable_detr {
namespace lsap {
namespace {

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
