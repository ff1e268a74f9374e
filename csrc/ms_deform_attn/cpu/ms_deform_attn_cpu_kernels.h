// Declarations of the CPU kernel entry points, one copy per instruction set (see ms_deform_attn_cpu_kernels_impl.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/ms_deform_attn_checks.h"
#include "ms_deform_attn/ms_deform_attn_math.h"

namespace deformable_detr {
namespace msda {

// How the backward runs: `chunks` query chunks, each with its own slice of grad_value_acc (summed afterwards), and
// the order of value and grad_value_acc: (N, S, M, D) as the op takes value, or head-major (N, M, S, D), where a
// head's rows are contiguous and a sample's corners (w0, w0 + 1) are neighbouring rows in memory. grad_value_acc
// has shape (chunks, N, ...) in the same order.
struct BackwardPlan {
  int64_t chunks = 1;
  bool head_major = false;
};

#define DDETR_MSDA_DECLARE_CPU_KERNELS(ns)                                                                          \
  namespace ns {                                                                                                    \
  template <typename scalar_t>                                                                                      \
  void forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,                                 \
               const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights, scalar_t* out, \
               const Sizes& s);                                                                                     \
  template <typename scalar_t>                                                                                      \
  void backward(const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes, const int64_t* starts,      \
                const at::opmath_type<scalar_t>* locations, const at::opmath_type<scalar_t>* weights,               \
                at::opmath_type<scalar_t>* grad_value_acc, at::opmath_type<scalar_t>* grad_locations,               \
                at::opmath_type<scalar_t>* grad_weights, const Sizes& s, const BackwardPlan& plan);                 \
  }
DDETR_MSDA_DECLARE_CPU_KERNELS(base)
DDETR_MSDA_DECLARE_CPU_KERNELS(avx2)
DDETR_MSDA_DECLARE_CPU_KERNELS(avx512)
#undef DDETR_MSDA_DECLARE_CPU_KERNELS

// Kernel copies by instruction set, in increasing order; ms_deform_attn_cpu_capability.cpp picks one per process.
enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The copy this process runs: the best one compiled and supported by the CPU, lowered by the environment variable
// DEFORMABLE_DETR_CPU_CAPABILITY (default | avx2 | avx512). Chosen at the first call.
CpuCapability cpu_capability();

// Whether a copy was compiled for this target (the AVX copies need x86-64 and GCC/Clang).
bool cpu_kernels_compiled(CpuCapability capability);
bool avx2_copy_compiled();
bool avx512_copy_compiled();

// The entry point of the chosen copy among one function's three copies.
template <typename Fn>
Fn cpu_kernel(Fn default_copy, Fn avx2_copy, Fn avx512_copy) {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512:
      return avx512_copy;
    case CpuCapability::kAvx2:
      return avx2_copy;
    default:
      return default_copy;
  }
}

// A copy that could not be compiled for this target: entry points that are never selected (cpu_kernels_compiled
// is false for it), defined so that every file links on every target.
#define DDETR_MSDA_DEFINE_ABSENT_CPU_KERNELS(ns)                                                                      \
  namespace ns {                                                                                                      \
  template <typename scalar_t>                                                                                        \
  void forward(const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,                     \
               const at::opmath_type<scalar_t>*, scalar_t*, const Sizes&) {                                           \
    TORCH_CHECK(false, "ms_deform_attn: the " #ns " CPU kernels were not compiled for this target");                  \
  }                                                                                                                   \
  template <typename scalar_t>                                                                                        \
  void backward(const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, const at::opmath_type<scalar_t>*,   \
                const at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*, at::opmath_type<scalar_t>*,             \
                at::opmath_type<scalar_t>*, const Sizes&, const BackwardPlan&) {                                      \
    TORCH_CHECK(false, "ms_deform_attn: the " #ns " CPU kernels were not compiled for this target");                  \
  }                                                                                                                   \
  template void forward<float>(const float*, const int64_t*, const int64_t*, const float*, const float*, float*,      \
                               const Sizes&);                                                                         \
  template void forward<double>(const double*, const int64_t*, const int64_t*, const double*, const double*, double*, \
                                const Sizes&);                                                                        \
  template void forward<c10::BFloat16>(const c10::BFloat16*, const int64_t*, const int64_t*, const float*,            \
                                       const float*, c10::BFloat16*, const Sizes&);                                   \
  template void backward<float>(const float*, const float*, const int64_t*, const int64_t*, const float*,             \
                                const float*, float*, float*, float*, const Sizes&, int64_t);                         \
  template void backward<double>(const double*, const double*, const int64_t*, const int64_t*, const double*,         \
                                 const double*, double*, double*, double*, const Sizes&, int64_t);                    \
  template void backward<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, const int64_t*, const int64_t*,   \
                                        const float*, const float*, float*, float*, float*, const Sizes&, int64_t);   \
  }

}  // namespace msda
}  // namespace deformable_detr
