// CPU kernel bodies of multi-scale deformable attention, compiled twice: once for the baseline ISA
// (ms_deform_attn_cpu.cpp) and once with AVX2+FMA (ms_deform_attn_cpu_avx2.cpp), picked at run time. Include only
// after defining MSDA_CPU_ISA (the namespace of this copy) and after every system/ATen header, so that a target
// pragma in force around this include reaches our kernels alone.
#include "ms_deform_attn/cpu/ms_deform_attn_cpu_kernels.h"

namespace deformable_detr {
namespace msda {
namespace MSDA_CPU_ISA {
namespace {

// DT > 0 fixes the channel count at compile time (common head dims): the per-head accumulator then lives in
// registers and the channel loops unroll; DT == 0 is the generic path for any D.
template <typename scalar_t, int DT>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out,
                    const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, S = s.S, M = s.M, L = s.L, P = s.P, Q = s.Q;
  const int64_t D = DT > 0 ? DT : s.D;
  const int64_t row_stride = M * D;  // value elements between consecutive spatial positions
  // Roughly 4 corners x D channels x L x P multiply-adds per head: aim for ~32k per task.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * L * P * D * 4));
  (void)N;
  at::parallel_for(0, N * Q, grain, [&](int64_t begin, int64_t end) {
    acc_t acc_fixed[DT > 0 ? DT : 1];
    std::vector<acc_t> acc_dynamic(DT > 0 ? 0 : D);
    acc_t* acc = DT > 0 ? acc_fixed : acc_dynamic.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / Q;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t d = 0; d < D; ++d) acc[d] = 0;
        bool nan_row = false;  // the non-finite rule of ms_deform_attn_math.h, for samples with no corner in the map
        const int64_t sample0 = (nq * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * S + starts[l]) * M + m) * D;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t sample = sample0 + l * P + p;
            const acc_t x = locations[2 * sample], y = locations[2 * sample + 1];
            const Corners<acc_t> c = bilinear_corners<acc_t>(x, y, H, W);
            const acc_t a = weights[sample];
            if (!c.any) {
              nan_row = nan_row || location_is_nan(x, y) || a != a;
              continue;
            }
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const acc_t coeff = a * c.weight[k];
              const scalar_t* v = level + c.offset[k] * row_stride;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) acc[d] += coeff * static_cast<acc_t>(v[d]);
            }
          }
        }
        scalar_t* o = out + nq * row_stride + m * D;
        if (nan_row) {
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(quiet_nan<acc_t>());
          continue;
        }
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// grad_value_acc has shape (chunks, N, S, M, D): task (chunk, n, m) owns slice [chunk, n, :, m, :], so no two
// threads ever write the same element and the result does not depend on scheduling.
//
// The bilinear value and its position gradient are linear in the corner values, so per sample we only need the
// four dot products G_k = <grad_out, v_k> over channels; interpolate() and accumulate_position_grad() are then
// applied to G instead of to each channel (4 reductions per sample instead of 3 per channel).
template <typename scalar_t, int DT>
void backward_kernel(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
                     at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,
                     at::opmath_type<scalar_t>* grad_weights, const Sizes& s, int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = s.N, S = s.S, M = s.M, L = s.L, P = s.P, Q = s.Q;
  const int64_t D = DT > 0 ? DT : s.D;
  const int64_t row_stride = M * D;
  const int64_t queries_per_chunk = (Q + chunks - 1) / chunks;
  at::parallel_for(0, chunks * N * M, 1, [&](int64_t begin, int64_t end) {
    acc_t g_fixed[DT > 0 ? DT : 1];
    std::vector<acc_t> g_dynamic(DT > 0 ? 0 : D);
    acc_t* g = DT > 0 ? g_fixed : g_dynamic.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / (N * M);
      const int64_t n = (task / M) % N;
      const int64_t m = task % M;
      const int64_t q_begin = chunk * queries_per_chunk;
      const int64_t q_end = std::min(Q, q_begin + queries_per_chunk);
      acc_t* gv_head = grad_value_acc + ((chunk * N + n) * S * M + m) * D;
      for (int64_t q = q_begin; q < q_end; ++q) {
        const int64_t nq = n * Q + q;
        const scalar_t* go = grad_out + nq * row_stride + m * D;
        for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);
        const int64_t sample0 = (nq * M + m) * L * P;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * S + starts[l]) * M + m) * D;
          acc_t* gv_level = gv_head + starts[l] * row_stride;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t sample = sample0 + l * P + p;
            const acc_t x = locations[2 * sample], y = locations[2 * sample + 1];
            const Corners<acc_t> c = bilinear_corners<acc_t>(x, y, H, W);
            const acc_t a = weights[sample];
            if (!c.any) {
              // Non-finite rule (ms_deform_attn_math.h): NaN location -> NaN gradients; otherwise the in-map
              // formulas with zero corner values, i.e. a * 0 (NaN for a NaN weight) and a zero weight gradient.
              const bool nan_location = location_is_nan(x, y);
              const acc_t grad_location = nan_location ? quiet_nan<acc_t>() : a * static_cast<acc_t>(0);
              grad_locations[2 * sample] = grad_location;
              grad_locations[2 * sample + 1] = grad_location;
              grad_weights[sample] = nan_location ? quiet_nan<acc_t>() : static_cast<acc_t>(0);
              continue;
            }
            acc_t dots[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              if (!c.valid[k]) continue;
              const scalar_t* v = level + c.offset[k] * row_stride;
              acc_t* dst = gv_level + c.offset[k] * row_stride;
              const acc_t coeff = a * c.weight[k];
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) {
                dot += g[d] * static_cast<acc_t>(v[d]);
                dst[d] += coeff * g[d];
              }
              dots[k] = dot;
            }
            acc_t grad_w_im = 0, grad_h_im = 0, gx, gy;
            accumulate_position_grad(c, dots, a, grad_w_im, grad_h_im);
            position_grad_to_location(grad_w_im, grad_h_im, H, W, gx, gy);
            grad_locations[2 * sample] = gx;
            grad_locations[2 * sample + 1] = gy;
            grad_weights[sample] = interpolate(c, dots);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename Launch>
void dispatch_head_dim(int64_t D, Launch&& launch) {
  switch (D) {
    case 16:
      launch(std::integral_constant<int, 16>{});
      break;
    case 32:
      launch(std::integral_constant<int, 32>{});
      break;
    case 64:
      launch(std::integral_constant<int, 64>{});
      break;
    default:
      launch(std::integral_constant<int, 0>{});
  }
}

}  // namespace

template <typename scalar_t>
void forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
             const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out,
             const Sizes& s) {
  dispatch_head_dim<scalar_t>(s.D, [&](auto dt) {
    forward_kernel<scalar_t, decltype(dt)::value>(value, shapes, starts, locations, weights, out, s);
  });
}

template <typename scalar_t>
void backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
              const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,
              at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,
              at::opmath_type<scalar_t>* grad_weights, const Sizes& s, int64_t chunks) {
  dispatch_head_dim<scalar_t>(s.D, [&](auto dt) {
    backward_kernel<scalar_t, decltype(dt)::value>(grad_out, value, shapes, starts, locations, weights, grad_value_acc,
                                                   grad_locations, grad_weights, s, chunks);
  });
}

#define MSDA_INSTANTIATE(T)                                                                                           \
  template void forward<T>(const T*, const int64_t*, const int64_t*, const at::opmath_type<T>*,                       \
                           const at::opmath_type<T>*, T*, const Sizes&);                                              \
  template void backward<T>(const T*, const T*, const int64_t*, const int64_t*, const at::opmath_type<T>*,            \
                            const at::opmath_type<T>*, at::opmath_type<T>*, at::opmath_type<T>*, at::opmath_type<T>*, \
                            const Sizes&, int64_t);
MSDA_INSTANTIATE(float)
MSDA_INSTANTIATE(double)
MSDA_INSTANTIATE(c10::BFloat16)
#undef MSDA_INSTANTIATE

}  // namespace MSDA_CPU_ISA
}  // namespace msda
}  // namespace deformable_detr
