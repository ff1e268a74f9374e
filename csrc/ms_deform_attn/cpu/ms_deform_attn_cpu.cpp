// CPU entry points of multi-scale deformable attention: input checks, allocation, and the call into the kernel
// copy chosen for this CPU (ms_deform_attn_cpu_capability.cpp). Forward parallelises over output
// rows, backward over (batch, head, query chunk) slices. Per-sample math: ms_deform_attn_math.h, shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

#define DDETR_CPU_ISA base
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels_impl.h"
#undef DDETR_CPU_ISA

namespace deformable_detr {
namespace msda {
namespace {

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start,
                              bool discrete) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               point_start, discrete);
  check_levels_host(spatial_shapes, level_start_index, s.S);
  if (point_start) check_points_host(*point_start, s.K);
  if (value.scalar_type() == at::kHalf) {
    // x86 has no cheap scalar fp16 -> fp32 conversion (bf16 is a shift): widening value once and running the fp32
    // kernel measured ~7x faster than converting at every corner read. Same numerics: fp32 math, one final rounding.
    return ms_deform_attn_cpu(value.to(at::kFloat), spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, point_start, discrete)
        .to(at::kHalf);
  }
  // Every element is written by the kernel (NaN, a sum, or 0 for rows with no sample in a map): no memset.
  auto out = at::empty({s.N, s.Q, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  const DenseInputs in =
      dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start);
  const Sizes ks = in.with_points(s);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* fn = cpu_kernel(&base::forward<scalar_t>, &avx2::forward<scalar_t>, &avx512::forward<scalar_t>);
    fn(in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(), in.level_start_index.data_ptr<int64_t>(),
       in.sampling_locations.data_ptr<acc_t>(), in.attention_weights.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), ks);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const std::optional<at::Tensor>& point_start, bool discrete) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               point_start, discrete);
  check_levels_host(spatial_shapes, level_start_index, s.S);
  if (point_start) check_points_host(*point_start, s.K);
  check_grad_output(grad_output, value, s);
  if (value.scalar_type() == at::kHalf) {  // see ms_deform_attn_cpu: fp16 runs the fp32 kernel on widened copies
    auto [grad_value, grad_locations, grad_weights] =
        ms_deform_attn_backward_cpu(grad_output.to(at::kFloat), value.to(at::kFloat), spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights, point_start, discrete);
    return {grad_value.to(at::kHalf), grad_locations, grad_weights};
  }
  // Every level empty (S = 0) still runs the kernel: the NaN rule gives NaN gradients to NaN samples there too.
  if (s.N * s.Q * s.M == 0 || s.D == 0) {
    return {at::zeros_like(value, at::MemoryFormat::Contiguous),
            at::zeros_like(sampling_locations, at::MemoryFormat::Contiguous),
            at::zeros_like(attention_weights, at::MemoryFormat::Contiguous)};
  }
  // The kernel writes every sample's location and weight gradient: no memset.
  auto grad_locations = at::empty_like(sampling_locations, at::MemoryFormat::Contiguous);
  auto grad_weights = at::empty_like(attention_weights, at::MemoryFormat::Contiguous);
  const auto acc_dtype = position_dtype(value.scalar_type());
  // Split queries into chunks (each with a private gradient buffer) only when (N, M) slices alone cannot keep
  // every thread busy; the chunks are summed in a fixed order, so the result is deterministic.
  const int64_t threads = at::get_num_threads();
  const int64_t slices = s.N * s.M;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(s.Q, (threads + slices - 1) / slices));
  const bool direct = chunks == 1 && acc_dtype == value.scalar_type();
  at::Tensor grad_value_acc = direct ? at::zeros_like(value, at::MemoryFormat::Contiguous)
                                     : at::zeros({chunks, s.N, s.S, s.M, s.D}, value.options().dtype(acc_dtype));
  const auto go_c = grad_output.contiguous();
  const DenseInputs in =
      dense_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start);
  const Sizes ks = in.with_points(s);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto* fn = cpu_kernel(&base::backward<scalar_t>, &avx2::backward<scalar_t>, &avx512::backward<scalar_t>);
    fn(go_c.data_ptr<scalar_t>(), in.value.data_ptr<scalar_t>(), in.spatial_shapes.data_ptr<int64_t>(),
       in.level_start_index.data_ptr<int64_t>(), in.sampling_locations.data_ptr<acc_t>(),
       in.attention_weights.data_ptr<acc_t>(), grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
       grad_weights.data_ptr<acc_t>(), ks, chunks);
  });
  at::Tensor grad_value = direct ? grad_value_acc : grad_value_acc.sum(0).to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace
}  // namespace msda
}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn", &deformable_detr::msda::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::msda::ms_deform_attn_backward_cpu);
}
