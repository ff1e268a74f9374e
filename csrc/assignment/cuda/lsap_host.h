// Host flow of the CUDA batched LSAP op over a `Device` policy (the members listed in
// ms_deform_attn/cuda/ms_deform_attn_host.h but zeros() and min_threads_in_flight()): the real launcher (lsap_cuda.cu)
// and the SIMT emulator (tests/simt/) share it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <tuple>

#include "assignment/cuda/lsap_kernel.cuh"
#include "assignment/cuda/lsap_launch.h"
#include "assignment/lsap_checks.h"
#include "common/launch_info.h"

namespace deformable_detr {
namespace lsap {

template <class Device>
std::tuple<at::Tensor, at::Tensor> batched_lsap_on(Device& dev, const at::Tensor& cost_in,
                                                   const std::optional<at::Tensor>& num_cols_in) {
  const Batch batch = prepare_batch(cost_in, num_cols_in);
  const int64_t B = batch.B, N = batch.N, M = batch.M;
  if (B == 0) return {batch.assignment, batch.status};
  const at::Tensor cost = dev.adopt(batch.cost);
  const std::optional<at::Tensor> num_cols =
      batch.num_cols.has_value() ? std::optional<at::Tensor>(dev.adopt(*batch.num_cols)) : std::nullopt;
  at::Tensor assignment = dev.empty({B, N}, batch.assignment.options());
  at::Tensor status = dev.empty({B}, batch.status.options());
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "batched_lsap_cuda", [&] {
    const LsapLaunch p = lsap_launch(N, M, sizeof(scalar_t));
    at::Tensor global_state;
    if (!p.state_in_shared) global_state = dev.empty({B * p.state}, cost.options().dtype(at::kByte));
    const LaunchInfo info{p.cache_cost ? "lsap_cached" : (p.state_in_shared ? "lsap_shared" : "lsap_global"), 0,
                          p.threads, 0};
    dev.launch(info, batched_lsap_kernel<scalar_t>, B, p.threads, static_cast<size_t>(p.shared_bytes),
               cost.const_data_ptr<scalar_t>(), num_cols.has_value() ? num_cols->const_data_ptr<int64_t>() : nullptr,
               static_cast<int32_t>(N), static_cast<int32_t>(M), assignment.mutable_data_ptr<int64_t>(),
               status.mutable_data_ptr<int32_t>(),
               p.state_in_shared ? nullptr : static_cast<unsigned char*>(global_state.mutable_data_ptr()),
               static_cast<int32_t>(p.nr_cap), static_cast<int32_t>(p.nc_cap), p.state_in_shared, p.cache_cost);
  });
  return {assignment, status};
}

}  // namespace lsap
}  // namespace deformable_detr
