// Host-side input validation shared by the CPU and CUDA entry points. Each message names the argument and
// the expected shape or dtype, raised as ValueError / TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).
// Shapes, dtypes and devices are checked on every call (the Python wrapper checks them too, with messages in its
// own terms, for every backend); the tables' values are checked here only by the CPU entry, once per table
// (cpu/ms_deform_attn_cpu.cpp), and the Python wrapper leaves them to it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "ms_deform_attn/ms_deform_attn_math.h"

namespace deformable_detr {
namespace msda {

// Sizes and layout of one call, passed by value to every kernel. Points of one (n, q, m) row: K of them, level l
// owning [l * P, (l + 1) * P) in the uniform layout (point_start == nullptr), else
// [point_start[l], point_start[l + 1]) (the points_per_level layout; point_start is on the kernels' device).
struct Sizes {
  int64_t N, S, M, D, L, P, Q;
  int64_t K;                             // points per row: L * P, or sum of points_per_level
  const int64_t* point_start = nullptr;  // (L + 1,) level point starts, or nullptr for the uniform layout
  bool discrete = false;                 // sampling="discrete" (nearest pixel) instead of bilinear
};

struct PointRange {
  int64_t begin, end;
};

// Points of level l. A device table cannot be validated without a sync, so its entries are clamped to [0, K]
// (and end >= begin): a corrupt table gives missing or repeated points, never a read outside the row.
DDETR_HOST_DEVICE_INLINE PointRange level_points(const Sizes& s, int64_t l) {
  if (s.point_start == nullptr) return {l * s.P, (l + 1) * s.P};
  int64_t begin = s.point_start[l], end = s.point_start[l + 1];
  begin = begin < 0 ? 0 : (begin > s.K ? s.K : begin);
  end = end < begin ? begin : (end > s.K ? s.K : end);
  return {begin, end};
}

// The level of point p of a row (the inverse of level_points; L is small, so a linear scan).
DDETR_HOST_DEVICE_INLINE int64_t level_of_point(const Sizes& s, int64_t p) {
  if (s.point_start == nullptr) return s.P > 0 ? p / s.P : 0;
  int64_t l = 0;
  while (l + 1 < s.L && level_points(s, l).end <= p) ++l;
  return l;
}

// Dtype that sampling locations and attention weights must have for a given value dtype: the value dtype for
// float32/float64, float32 for float16/bfloat16 (half-precision locations cost ~0.1 px at W = 167).
inline at::ScalarType position_dtype(at::ScalarType value_dtype) {
  return (value_dtype == at::kHalf || value_dtype == at::kBFloat16) ? at::kFloat : value_dtype;
}

inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights, const std::optional<at::Tensor>& point_start = {},
                          bool discrete = false) {
  const bool ragged = point_start.has_value();
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must have shape (N, S, M, D), got ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must have shape (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1, "ms_deform_attn: level_start_index must have shape (L,), got ",
                    level_start_index.sizes());
  if (ragged) {
    TORCH_CHECK_VALUE(sampling_locations.dim() == 5 && sampling_locations.size(4) == 2,
                      "ms_deform_attn: with point_start, sampling_locations must have shape (N, Q, M, K, 2), got ",
                      sampling_locations.sizes());
    TORCH_CHECK_VALUE(attention_weights.dim() == 4,
                      "ms_deform_attn: with point_start, attention_weights must have shape (N, Q, M, K), got ",
                      attention_weights.sizes());
  } else {
    TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                      "ms_deform_attn: sampling_locations must have shape (N, Q, M, L, P, 2), got ",
                      sampling_locations.sizes());
    TORCH_CHECK_VALUE(attention_weights.dim() == 5,
                      "ms_deform_attn: attention_weights must have shape (N, Q, M, L, P), got ",
                      attention_weights.sizes());
  }
  const auto dt = value.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
                   spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: level_start_index must be int64, got ", level_start_index.scalar_type());
  const auto pos_dt = position_dtype(dt);
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == pos_dt, "ms_deform_attn: sampling_locations must be ", pos_dt,
                   " for value of dtype ", dt, ", got ", sampling_locations.scalar_type());
  TORCH_CHECK_TYPE(attention_weights.scalar_type() == pos_dt, "ms_deform_attn: attention_weights must be ", pos_dt,
                   " for value of dtype ", dt, ", got ", attention_weights.scalar_type());
  Sizes s{value.size(0),
          value.size(1),
          value.size(2),
          value.size(3),
          spatial_shapes.size(0),
          ragged ? 0 : sampling_locations.size(4),
          sampling_locations.size(1),
          ragged ? sampling_locations.size(3) : spatial_shapes.size(0) * sampling_locations.size(4),
          nullptr,
          discrete};
  TORCH_CHECK_VALUE(level_start_index.size(0) == s.L, "ms_deform_attn: level_start_index must have shape (L,) = (", s.L,
                    ",), got ", level_start_index.sizes());
  if (ragged) {
    const at::Tensor& ps = *point_start;
    TORCH_CHECK_VALUE(ps.dim() == 1 && ps.size(0) == s.L + 1,
                      "ms_deform_attn: point_start must have shape (L + 1,) = (", s.L + 1, ",), got ", ps.sizes());
    TORCH_CHECK_TYPE(ps.scalar_type() == at::kLong, "ms_deform_attn: point_start must be int64, got ",
                     ps.scalar_type());
    TORCH_CHECK_VALUE(ps.device() == value.device(), "ms_deform_attn: point_start must be on ", value.device(),
                      ", got ", ps.device());
    TORCH_CHECK_VALUE(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
                      "ms_deform_attn: sampling_locations must have shape (N, Q, M, K, 2) = (", s.N, ", Q, ", s.M,
                      ", K, 2), got ", sampling_locations.sizes());
    TORCH_CHECK_VALUE(attention_weights.size(0) == s.N && attention_weights.size(1) == s.Q &&
                          attention_weights.size(2) == s.M && attention_weights.size(3) == s.K,
                      "ms_deform_attn: attention_weights must have shape (N, Q, M, K) = (", s.N, ", ", s.Q, ", ", s.M,
                      ", ", s.K, "), got ", attention_weights.sizes());
  } else {
    TORCH_CHECK_VALUE(
        sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M && sampling_locations.size(3) == s.L,
        "ms_deform_attn: sampling_locations must have shape (N, Q, M, L, P, 2) = (", s.N, ", Q, ", s.M, ", ", s.L,
        ", P, 2), got ", sampling_locations.sizes());
    TORCH_CHECK_VALUE(attention_weights.size(0) == s.N && attention_weights.size(1) == s.Q &&
                          attention_weights.size(2) == s.M && attention_weights.size(3) == s.L &&
                          attention_weights.size(4) == s.P,
                      "ms_deform_attn: attention_weights must have shape (N, Q, M, L, P) = (", s.N, ", ", s.Q, ", ",
                      s.M, ", ", s.L, ", ", s.P, "), got ", attention_weights.sizes());
  }
  const auto dev = value.device();
  TORCH_CHECK_VALUE(spatial_shapes.device() == dev && level_start_index.device() == dev &&
                        sampling_locations.device() == dev && attention_weights.device() == dev,
                    "ms_deform_attn: all tensors must be on the same device as value (", dev, ")");
  return s;
}

// The totals a table's values add up to, against the call's sizes: S = value.shape[1] for the level pair, K =
// sampling_locations.shape[3] for point_start. Part of the value checks below, and all that is left to check for a
// table whose values were checked before (cpu/ms_deform_attn_cpu.cpp).
inline void check_level_total(int64_t total, int64_t S) {
  TORCH_CHECK_VALUE(total == S, "ms_deform_attn: sum of H*W over spatial_shapes (", total,
                    ") must equal value.shape[1] (S = ", S, ")");
}
inline void check_point_total(int64_t total, int64_t K) {
  TORCH_CHECK_VALUE(total == K, "ms_deform_attn: point_start[L] must equal K = sampling_locations.shape[3] (", K,
                    "), got ", total);
}

// A host point_start table's values: 0, non-decreasing, ending at K (the kernels clamp a device table instead).
inline void check_points_host(const at::Tensor& point_start_cpu, int64_t K) {
  const auto ps = point_start_cpu.contiguous();
  const int64_t* p = ps.data_ptr<int64_t>();
  const int64_t L = ps.size(0) - 1;
  TORCH_CHECK_VALUE(p[0] == 0, "ms_deform_attn: point_start[0] must be 0, got ", p[0]);
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(p[l + 1] >= p[l],
                      "ms_deform_attn: point_start must be non-decreasing (points per level >= 0), "
                      "got point_start[",
                      l, "] = ", p[l], " > point_start[", l + 1, "] = ", p[l + 1]);
  }
  check_point_total(p[L], K);
}

// Value-dependent checks (need the shapes on the host): every level non-empty-or-zero, starts consistent,
// sum of H * W equal to S. Called by the CPU entry for a table it has not checked before.
inline void check_levels_host(const at::Tensor& spatial_shapes_cpu, const at::Tensor& level_start_cpu, int64_t S) {
  const auto shapes = spatial_shapes_cpu.contiguous();
  const auto starts = level_start_cpu.contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK_VALUE(sh[2 * l] >= 0 && sh[2 * l + 1] >= 0, "ms_deform_attn: spatial_shapes[", l,
                      "] must be non-negative, got (", sh[2 * l], ", ", sh[2 * l + 1], ")");
    total += sh[2 * l] * sh[2 * l + 1];
  }
  check_level_total(total, S);
  int64_t start = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK_VALUE(st[l] == start, "ms_deform_attn: level_start_index[", l, "] must be ", start,
                      " (the sum of H*W of the previous levels), got ", st[l]);
    start += sh[2 * l] * sh[2 * l + 1];
  }
}

// The backward's upstream gradient: (N, Q, M*D), value's dtype and device.
inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& s) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Q &&
                        grad_output.size(2) == s.M * s.D,
                    "ms_deform_attn_backward: grad_output must have shape (N, Q, M*D) = (", s.N, ", ", s.Q, ", ",
                    s.M * s.D, "), got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(),
                   "ms_deform_attn_backward: grad_output must have dtype ", value.scalar_type(), ", got ",
                   grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output must be on ",
                    value.device(), ", got ", grad_output.device());
}

// The inputs in the dense layout the kernels index (contiguous() is free for inputs that already are).
// point_start is undefined for the uniform layout.
struct DenseInputs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start;

  // The sizes with the dense point table's pointer filled in (what the kernels take).
  Sizes with_points(Sizes s) const {
    s.point_start = point_start.defined() ? point_start.data_ptr<int64_t>() : nullptr;
    return s;
  }
};

inline DenseInputs dense_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                const at::Tensor& attention_weights,
                                const std::optional<at::Tensor>& point_start = {}) {
  return {value.contiguous(),
          spatial_shapes.contiguous(),
          level_start_index.contiguous(),
          sampling_locations.contiguous(),
          attention_weights.contiguous(),
          point_start.has_value() ? point_start->contiguous() : at::Tensor()};
}

}  // namespace msda
}  // namespace deformable_detr
