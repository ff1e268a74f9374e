// Host flow of the MSDA CUDA op (check, allocate, pick the launch shape, launch), written once over a `Device`
// policy: the real one (ms_deform_attn_cuda.cu) allocates with ATen and launches with <<<>>>; the SIMT emulator's
// (tests/simt/) allocates guarded host memory and runs every CUDA thread as a fiber. The policy provides
//   at::Tensor empty(sizes, options), zeros(sizes, options);  // outputs / scratch the kernels touch
//   at::Tensor adopt(const at::Tensor&);                      // an input the kernels read (identity on CUDA)
//   int64_t min_threads_in_flight();                          // kMinThreadsInFlight (tests lower it)
//   void launch(const LaunchInfo&, kernel, blocks, threads, shared_bytes, args...);
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <tuple>

#include "ms_deform_attn/cuda/ms_deform_attn_kernels.cuh"
#include "ms_deform_attn/cuda/ms_deform_attn_launch.h"
#include "ms_deform_attn/ms_deform_attn_checks.h"

namespace deformable_detr {
namespace msda {

template <class Device>
DenseInputs adopt_inputs(Device& dev, const DenseInputs& in) {
  return {dev.adopt(in.value),
          dev.adopt(in.spatial_shapes),
          dev.adopt(in.level_start_index),
          dev.adopt(in.sampling_locations),
          dev.adopt(in.attention_weights),
          in.point_start.defined() ? dev.adopt(in.point_start) : at::Tensor()};
}

template <class Device>
at::Tensor forward_on(Device& dev, const at::Tensor& value, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                      const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start = {},
                      bool discrete = false) {
  const Sizes checked = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     point_start, discrete);
  // Every element is written by the kernel, so no zero fill.
  at::Tensor out = dev.empty({checked.N, checked.Q, checked.M * checked.D}, value.options());
  if (out.numel() == 0) return out;
  const DenseInputs in = adopt_inputs(
      dev, dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start));
  const Sizes s = in.with_points(checked);
  const int64_t items = s.N * s.Q * s.M;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LaunchShape shape =
        launch_shape<scalar_t>(s.D, items, {in.value.data_ptr(), out.data_ptr()}, dev.min_threads_in_flight());
    dispatch_vec<scalar_t>(shape.vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      dev.launch(LaunchInfo{"forward", VEC, shape.group_size, shape.tiles}, kernels::forward_kernel<scalar_t, VEC>,
                 shape.blocks, kThreads, 0, in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
                 in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<acc_t>(),
                 in.attention_weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), s, shape.group_size, shape.tiles);
    });
  });
  return out;
}

// grad_value without atomics (see kernels::destination_keys_kernel). Extra device memory, E = N * Q * M * K * 4
// entries: keys, sorted keys and sort indices (3 x 8E bytes), run-start flags (E bytes), run starts (<= 8E bytes)
// plus the sort's own temporaries; benchmarks/NOTES.md has the numbers. One host sync (nonzero) for the run count.
template <typename scalar_t, class Device>
void deterministic_grad_value(Device& dev, const at::Tensor& go_c, const DenseInputs& in, const Sizes& s,
                              at::Tensor& grad_value_acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t samples = s.N * s.Q * s.M * s.K;
  const int64_t entries = samples * 4;
  if (entries == 0) return;
  at::Tensor keys = dev.empty({entries}, go_c.options().dtype(at::kLong));
  dev.launch(LaunchInfo{"destination_keys", 0, 0, 0}, kernels::destination_keys_kernel<acc_t>, blocks_for(samples),
             kThreads, 0, in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
             in.sampling_locations.data_ptr<acc_t>(), keys.data_ptr<int64_t>(), s);
  // A stable sort has exactly one result, whatever the implementation's internal order: ties keep entry order.
  at::Tensor sorted_keys, entry_ids;
  std::tie(sorted_keys, entry_ids) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  keys.reset();
  sorted_keys = dev.adopt(sorted_keys.contiguous());
  entry_ids = dev.adopt(entry_ids.contiguous());
  at::Tensor flags = dev.empty({entries}, go_c.options().dtype(at::kBool));
  dev.launch(LaunchInfo{"run_start_flags", 0, 0, 0}, kernels::run_start_flags_kernel, blocks_for(entries), kThreads, 0,
             sorted_keys.data_ptr<int64_t>(), flags.data_ptr<bool>(), entries);
  const at::Tensor run_starts = dev.adopt(at::nonzero(flags).reshape({-1}).contiguous());
  flags.reset();
  const int64_t runs = run_starts.numel();
  if (runs == 0) return;  // every corner outside its map: grad_value stays zero
  const LaunchShape shape = launch_shape<scalar_t>(s.D, runs, {go_c.data_ptr()}, dev.min_threads_in_flight());
  dispatch_vec<scalar_t>(shape.vec, [&](auto vec_constant) {
    constexpr int VEC = decltype(vec_constant)::value;
    dev.launch(LaunchInfo{"gather_grad_value", VEC, shape.group_size, shape.tiles},
               kernels::gather_grad_value_kernel<scalar_t, VEC>, shape.blocks, kThreads, 0, go_c.data_ptr<scalar_t>(),
               in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
               in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(),
               sorted_keys.data_ptr<int64_t>(), entry_ids.data_ptr<int64_t>(), run_starts.data_ptr<int64_t>(), runs,
               entries, grad_value_acc.data_ptr<acc_t>(), s, shape.group_size, shape.tiles);
  });
}

// The fast path sums grad_value with float atomics, whose order varies between runs; `deterministic`
// (torch.use_deterministic_algorithms(True) on CUDA) sums it by sort + gather instead (deterministic_grad_value).
template <class Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_on(
    Device& dev, bool deterministic, const at::Tensor& grad_output, const at::Tensor& value,
    const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start = {}, bool discrete = false) {
  const Sizes checked = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                     point_start, discrete);
  check_grad_output(grad_output, value, checked);
  at::Tensor grad_locations = dev.zeros(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_weights = dev.zeros(attention_weights.sizes(), attention_weights.options());
  // Every level empty (S = 0) still runs the kernel: the NaN rule gives NaN gradients to NaN samples there too.
  if (checked.N * checked.Q * checked.M == 0 || checked.D == 0) {
    return {at::zeros_like(value, at::MemoryFormat::Contiguous), grad_locations, grad_weights};
  }
  const auto acc_dtype = position_dtype(value.scalar_type());
  const bool direct = acc_dtype == value.scalar_type();
  // Half types accumulate grad_value in an fp32 buffer (atomics on half lose low bits), cast once at the end.
  at::Tensor grad_value_acc = dev.zeros(value.sizes(), value.options().dtype(acc_dtype));
  const at::Tensor go_c = dev.adopt(grad_output.contiguous());
  const DenseInputs in = adopt_inputs(
      dev, dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start));
  const Sizes s = in.with_points(checked);
  const int64_t items = s.N * s.Q * s.M;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The fp32 buffer is a fresh allocation, so only value and grad_output constrain the vector width.
    const LaunchShape shape =
        launch_shape<scalar_t>(s.D, items, {in.value.data_ptr(), go_c.data_ptr()}, dev.min_threads_in_flight());
    dispatch_vec<scalar_t>(shape.vec, [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      auto launch = [&](const char* name, auto kernel) {
        dev.launch(LaunchInfo{name, VEC, shape.group_size, shape.tiles}, kernel, shape.blocks, kThreads, 0,
                   go_c.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
                   in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<acc_t>(),
                   in.attention_weights.data_ptr<acc_t>(), grad_value_acc.data_ptr<acc_t>(),
                   grad_locations.data_ptr<acc_t>(), grad_weights.data_ptr<acc_t>(), s, shape.group_size, shape.tiles);
      };
      if (deterministic) {
        launch("backward_no_atomics", kernels::backward_kernel<scalar_t, VEC, false>);
      } else {
        launch("backward_atomics", kernels::backward_kernel<scalar_t, VEC, true>);
      }
    });
    if (deterministic) deterministic_grad_value<scalar_t>(dev, go_c, in, s, grad_value_acc);
  });
  at::Tensor grad_value = direct ? grad_value_acc : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace msda
}  // namespace deformable_detr
