// The CUDA Device policy of the ops' host flows (ms_deform_attn/cuda/ms_deform_attn_host.h,
// assignment/cuda/lsap_host.h): ATen allocation, <<<>>> launches on the current stream, each launch checked. The
// caller holds the device guard. The SIMT emulator's policy (tests/simt/device.h) has the same members and runs the
// same host flows on the CPU. Included by .cu files only (it needs the CUDA runtime).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>
#include <cstdint>

#include "common/launch_info.h"

namespace deformable_detr {

struct CudaDevice {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }
  at::Tensor zeros(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::zeros(sizes, options); }
  at::Tensor adopt(const at::Tensor& t) { return t; }  // inputs are read in place

  template <typename Kernel, typename... Args>
  void launch(const LaunchInfo&, Kernel kernel, int64_t blocks, int threads, size_t shared, Args... args) {
    kernel<<<static_cast<unsigned>(blocks), threads, shared, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace deformable_detr
